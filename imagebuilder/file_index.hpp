// files.idx: what a generation was built from, one record per source
// entry, kept beside the manifest. An incremental build compares the new
// scan with the parent's index to find what changed.
//
// Text, one line per entry in depth-first order:
//   <escaped path> TAB mode uid gid size mtime_ns ctime_ns rdev ino nlink xattr_hash link_hash
// Paths escape '\\', TAB, newline and bytes outside 0x20..0x7e as \xHH.
#pragma once

#include "source_tree.hpp"
#include "status.hpp"

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace ib {

struct IndexRecord {
  std::string path;
  uint32_t mode = 0;
  uint32_t uid = 0, gid = 0;
  uint64_t size = 0;
  int64_t mtime_ns = 0, ctime_ns = 0;
  uint64_t rdev = 0;
  uint64_t ino = 0;
  uint32_t nlink = 0;
  uint64_t xattr_hash = 0;
  uint64_t link_hash = 0;

  bool operator==(const IndexRecord&) const = default;
};

IndexRecord record_of(const SourceEntry& e);
std::string encode_index(const std::vector<IndexRecord>& records);
Result<std::vector<IndexRecord>> decode_index(const std::string& text, const std::string& where);

// How one path differs between the parent's index and the new scan.
enum class Change {
  kNone,
  kAdded,     // only in the new tree
  kRemoved,   // only in the parent
  kReplaced,  // type changed, or part of a hard-link group that changed: remove, then add
  kContent,   // regular file, same inode in the source, new size or mtime: rewrite data
  kMetadata,  // mode, owner, times or xattrs only
};

// The changes from `old_records` to `scan`, in an order that can be applied:
// removals children first, then additions and updates parents first.
struct ChangeSet {
  std::vector<std::string> removed;                // old paths to delete (incl. replaced)
  std::vector<std::pair<size_t, Change>> updated;  // scan index, kind (added/replaced/content/metadata)
  uint64_t changed_bytes = 0;                      // bytes of regular files to write
};
ChangeSet compare(const std::vector<IndexRecord>& old_records, const SourceTree& scan);

// Paths whose records differ between two indices (diff GEN1 GEN2),
// prefixed "+ ", "- " or "M ".
std::vector<std::string> diff_indices(const std::vector<IndexRecord>& a,
                                      const std::vector<IndexRecord>& b);

}  // namespace ib
