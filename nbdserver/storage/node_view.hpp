// One node's writable view of a generation: the Overlay plus the files
// behind it, nodes/<node>/<image>.<gen>.{diff,bitmap}.
//
// Durability (the full argument is in docs/ARCHITECTURE.md, "Node views"):
// - Data before map: a block's bit is set in memory only after its write to
//   the diff completed, and the map is persisted only after an fdatasync of
//   the diff that began after the map was snapshotted. So a persisted map
//   never names a block whose data is not durable.
// - FLUSH and FUA: snapshot the map (encode a slot), fdatasync the diff,
//   then, if the map changed since the last persisted one, write the slot
//   into the bitmap file's free A/B slot and fdatasync the bitmap. Flushes
//   that find the map unchanged (rewrites of dirty blocks) cost one
//   fdatasync, like a plain file.
// - Unflushed writes may be lost at a crash: their blocks read as before
//   (old map) or as written (dirty block rewritten in place); copy-up writes
//   go to blocks that the durable map does not name, so they never show torn.
// - An fdatasync or map write that fails is sticky: the view refuses writes
//   and flushes with EIO until an admin resets or the server restarts it.
//
// Threads: after attach, a NodeView is used only by its owner loop (the
// loop that serves all of the node's connections). open() and the
// destructor do synchronous file I/O and run outside the data path (attach
// and the last detach).
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "storage/generation.hpp"
#include "storage/map_log.hpp"
#include "storage/overlay.hpp"

namespace storage {

enum class NodeMode { kPersistent, kEphemeral };
const char* mode_name(NodeMode m);
bool parse_mode(const std::string& s, NodeMode* m);

class NodeView {
 public:
  // Opens the node's layer over `gen` from files `<prefix>.diff/.bitmap`;
  // creates an empty layer when none exists. `resume` (a reconnect within
  // one boot) needs the layer to exist. Ephemeral nodes are emptied by
  // their attach, not here.
  // `lock_fd` (an flock held on the node) passes to the view, which releases
  // it when destroyed. Returns nullptr and sets *err when the layer is
  // corrupt, truncated or belongs to something else; the files are left as
  // they are for an admin to inspect.
  static std::unique_ptr<NodeView> open(const std::string& node, const std::string& prefix,
                                        std::shared_ptr<Generation> gen, uint32_t block_size,
                                        NodeMode mode, bool resume, int lock_fd,
                                        std::string* err);
  // Read-only view of a delta generation (no own layer).
  static std::unique_ptr<NodeView> generation_only(std::shared_ptr<Generation> gen);
  // Persists the map if it changed (after an fdatasync of the diff), then
  // closes everything and releases the node lock.
  ~NodeView();
  NodeView(const NodeView&) = delete;
  NodeView& operator=(const NodeView&) = delete;

  const std::string& node() const { return node_; }
  NodeMode mode() const { return mode_; }
  Generation& generation() const { return *gen_; }
  Overlay& overlay() { return overlay_; }
  const Overlay& overlay() const { return overlay_; }
  BlockLocks& locks() { return locks_; }
  int diff_fd() const { return diff_fd_; }
  int map_fd() const { return map_fd_; }
  // The descriptor for a read piece's source (not kFromZero).
  int fd_for(int from) const { return from == kFromDiff ? diff_fd_ : gen_->layer_fd(size_t(from)); }
  // The diff's read-only mapping (nullptr when unmapped), for page-cached reads.
  const uint8_t* diff_mapping() const { return diff_map_; }

  // Persisting the map: the loop encodes a snapshot with snapshot(), writes
  // `slot` at `offset` and fdatasyncs, calls persisted(), then writes
  // `trailer` at `trailer_at` in the diff (layer_file.hpp: the durable seq).
  struct Snapshot {
    std::string slot, trailer;
    uint64_t seq = 0, version = 0, offset = 0, trailer_at = 0;
  };
  bool map_changed() const { return overlay_.version() != persisted_version_; }
  Snapshot snapshot() const;
  void persisted(const Snapshot& s);

  // The map log (map_log.hpp): records made under log_seq() (the newest
  // snapshot taken) until the next snapshot. The owner loop collects
  // records, places them with place_log() and writes them before it
  // acknowledges the mutations they describe.
  int log_fd() const { return log_fd_; }
  uint64_t log_seq() const { return log_seq_; }
  void note_snapshot(uint64_t seq) {
    if (seq > log_seq_) log_seq_ = seq;
  }
  struct LogRecord {
    MapChange change;
    uint64_t seq;
  };
  struct LogWrite {
    uint64_t offset;
    std::string bytes;
  };
  // Where `recs` go: appended to their seq's region. Records superseded by
  // a durable map are left out. False (nothing placed) when a region is
  // full: the caller must make those mutations durable with a flush.
  bool place_log(const std::vector<LogRecord>& recs, std::vector<LogWrite>* out);

  // 0, or the errno that made this view refuse writes.
  int sticky_error() const { return sticky_; }
  void set_sticky_error(int err) {
    if (!sticky_) sticky_ = err;
  }

  // Drops every change (ephemeral views at a new attach): clears the map
  // and punches the diff. Synchronous; only with no request in flight.
  void drop_changes();

  // The loop that serves this view: -1 until the first attach claims it.
  std::atomic<int> owner{-1};
  // Owner loop only: a connection has attached before.
  bool attached_once = false;

 private:
  NodeView(std::shared_ptr<Generation> gen, LayerId id, BlockMap map, bool writable);
  void map_diff();

  std::string node_;
  NodeMode mode_ = NodeMode::kPersistent;
  std::shared_ptr<Generation> gen_;
  Overlay overlay_;
  BlockLocks locks_;
  int diff_fd_ = -1, map_fd_ = -1, lock_fd_ = -1, log_fd_ = -1;
  uint64_t log_seq_ = 0;
  static constexpr uint64_t kUnused = UINT64_MAX;
  uint64_t region_seq_[2] = {kUnused, kUnused};
  uint64_t region_off_[2] = {0, 0};
  uint8_t* diff_map_ = nullptr;
  uint64_t persisted_version_ = 0;
  uint64_t persisted_seq_ = 0;
  int sticky_ = 0;
};

}  // namespace storage
