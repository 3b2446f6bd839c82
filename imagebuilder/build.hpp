// `build`: a source directory becomes a new generation of an image.
//
// Steps: scan the source (nothing in the store changes if that fails),
// make the store (the first build: mkdir -p, images/, nodes/) and the
// image's directories where missing, take the image lock (flock on
// images/<image>/.lock, failing at once if another build holds it), remove
// temporaries of interrupted builds, then write the generation in
// images/<image>/.tmp-<gen>/ and rename it into generations/ once complete
// and synced. Any failure removes the temporary (and the directories this
// build made), so the store is left as it was.
//
// Full build: mke2fs makes an empty ext4 file with fixed UUID, hash seed and
// times (all derived from the image name, or SOURCE_DATE_EPOCH), fully
// initialised inode tables and journal; FsWriter then creates every entry.
// Incremental build: a LayerWriter over the parent generation's chain,
// opened with libext2fs through device_io; FsWriter applies only the
// ChangeSet between the parent's files.idx and the new scan. When the tree
// no longer fits the parent's size, or the chain would get longer than
// max_depth, the result is a full generation instead (see docs). Either
// way the chunk digests (chunks.sha256, digests.hpp) are written next.
//
// Test stops (pause_point, $NBDROOT_IB_PAUSE_AT): "tmp" the temporary is
// made and empty; "copy" half the entries (full) or changes (delta) are
// written; "image" the image or layer is complete and synced; "digests"
// chunks.sha256 (digests.hpp) is written and synced; "manifest" files.idx
// and manifest.json are synced, not yet renamed; "renamed" the generation
// is in generations/ and synced.
#pragma once

#include "progress.hpp"
#include "status.hpp"
#include "store.hpp"

#include <cstdint>
#include <optional>
#include <string>

namespace ib {

struct BuildOptions {
  std::string image;
  std::string source;
  std::optional<uint64_t> size;           // bytes; none = automatic
  unsigned headroom_pct = 25;             // free space left for nodes, % of the tree
  bool full = false;                      // never a delta
  std::optional<std::string> parent;      // default: the newest generation
  unsigned max_depth = 8;                 // deltas above a full image before flattening
};

// Returns the new generation's id.
Result<std::string> build(const Store& store, const BuildOptions& opt, Progress* progress);

// Fixed filesystem time: $SOURCE_DATE_EPOCH, else a constant.
int64_t filesystem_epoch();

}  // namespace ib
