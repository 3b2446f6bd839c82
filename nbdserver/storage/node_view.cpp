#include "storage/node_view.hpp"

#include <fcntl.h>
#include <linux/falloc.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace storage {

const char* mode_name(NodeMode m) {
  return m == NodeMode::kPersistent ? "persistent" : "ephemeral";
}

bool parse_mode(const std::string& s, NodeMode* m) {
  if (s == "persistent") *m = NodeMode::kPersistent;
  else if (s == "ephemeral") *m = NodeMode::kEphemeral;
  else return false;
  return true;
}

namespace {

// The newest valid map (seq `served`) must be the newest the node ever had
// durable. Evidence of a newer one: the diff trailer's durable seq, and map
// log records that followed a later snapshot (map_log.hpp). With evidence
// the node is refused: serving the older map would roll back flushed
// writes. Without, a rejected slot is what a crash in the middle of a map
// write leaves, and is logged.
bool check_newest_map(const std::string& node, const std::string& log_path, const LayerId& id,
                      uint64_t served, const OtherSlot& other, uint64_t trailer_seq,
                      std::string* err) {
  uint64_t log_seq = 0;
  int lfd = ::open(log_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (lfd >= 0) {
    log_seq = newest_log_seq(lfd, id.layer_tag);
    ::close(lfd);
  }
  std::string evidence;
  if (trailer_seq > served) {
    evidence = "the diff's trailer records map " + std::to_string(trailer_seq) + " as durable";
  } else if (log_seq > served + 1) {
    evidence = "its map log holds changes logged after map " + std::to_string(log_seq) +
               " was begun, so map " + std::to_string(log_seq - 1) + " was durable";
  }
  const std::string slot = std::string("slot ") + other.name;
  if (!evidence.empty()) {
    *err = (other.written && !other.valid
                ? "bitmap " + slot + " is not valid (" + other.why + ") and "
                : "the bitmap holds no map newer than " + std::to_string(served) + " but ") +
           evidence + "; serving map " + std::to_string(served) + " from slot " + other.served +
           " would roll back flushed writes";
    return false;
  }
  if (other.written && !other.valid)
    spdlog::warn("node '{}': bitmap {} rejected ({}); serving map {} from slot {} (a crash "
                 "while a map was written leaves this)",
                 node, slot, other.why, served, other.served);
  return true;
}

}  // namespace

NodeView::NodeView(std::shared_ptr<Generation> gen, LayerId id, BlockMap map, bool writable)
    : gen_(std::move(gen)),
      overlay_(id, std::move(map), gen_->stack(), writable) {}

std::unique_ptr<NodeView> NodeView::generation_only(std::shared_ptr<Generation> gen) {
  LayerId id{gen->block_size(), gen->size(), gen->tag(), 0};
  return std::unique_ptr<NodeView>(new NodeView(gen, id, BlockMap(), false));
}

std::unique_ptr<NodeView> NodeView::open(const std::string& node, const std::string& prefix,
                                         std::shared_ptr<Generation> gen, uint32_t block_size,
                                         NodeMode mode, bool resume, int lock_fd,
                                         std::string* err) {
  const std::string diff = prefix + ".diff", bitmap = prefix + ".bitmap";
  if (resume && access(diff.c_str(), F_OK) != 0) {
    *err = "node '" + node + "' has no changes on disk to resume (" + diff +
           " is missing: reset or deleted while the node ran?); the node must reboot";
    ::close(lock_fd);
    return nullptr;
  }
  if (gen->size() % block_size) {
    *err = "the image size " + std::to_string(gen->size()) + " is not a multiple of the " +
           std::to_string(block_size) + "-byte block size";
    ::close(lock_fd);
    return nullptr;
  }
  if (gen->size() / block_size > UINT32_MAX) {
    *err = "the image has more than 2^32 blocks of " + std::to_string(block_size) +
           " bytes; use a larger block size";
    ::close(lock_fd);
    return nullptr;
  }
  LayerId id{block_size, gen->size(), gen->tag(), 0};
  // An ephemeral node starts clean at every boot, but that is for its
  // attach to do (Loop::attach_view): opening the view may be a mere query
  // (NBD_OPT_INFO, a listing), or the node resuming.
  const bool fresh = access(diff.c_str(), F_OK) != 0;
  if (fresh) {
    if (access(bitmap.c_str(), F_OK) == 0 && mode == NodeMode::kPersistent) {
      *err = diff + " is missing but its bitmap exists; refusing to start the node afresh";
      ::close(lock_fd);
      return nullptr;
    }
    id.layer_tag = new_layer_tag();
    if (!create_layer(diff, bitmap, id, err)) {
      ::close(lock_fd);
      return nullptr;
    }
  }
  int dfd = ::open(diff.c_str(), O_RDWR | O_CLOEXEC);
  int mfd = ::open(bitmap.c_str(), O_RDWR | O_CLOEXEC);
  if (dfd < 0 || mfd < 0) {
    *err = (dfd < 0 ? diff : bitmap) + ": cannot open: " + strerror(errno);
    if (dfd >= 0) ::close(dfd);
    if (mfd >= 0) ::close(mfd);
    ::close(lock_fd);
    return nullptr;
  }
  BlockMap map;
  LayerId found;
  OtherSlot other;
  uint64_t trailer_seq = 0;
  bool ok = load_map(mfd, id, &map, &found, err, &other);
  if (ok) {
    id.layer_tag = found.layer_tag;
    ok = load_layer(dfd, mfd, id, &map, err, &trailer_seq);
  }
  if (ok) ok = check_newest_map(node, prefix + ".log", id, map.seq, other, trailer_seq, err);
  if (!ok) {
    *err = prefix + ": " + *err;
    ::close(dfd);
    ::close(mfd);
    ::close(lock_fd);
    return nullptr;
  }
  // Writes acknowledged after the last flush of a server that was killed:
  // replay the map log over the durable map (same host boot only), make the
  // result durable, and start the log afresh.
  const std::string log_path = prefix + ".log";
  int lfd = open_map_log(log_path, err);
  size_t replayed = 0;
  if (lfd >= 0) {
    for (const MapChange& c : read_map_log(lfd, map.seq, id.layer_tag, host_boot_id())) {
      if (!apply_change(&map, c, id.blocks())) break;
      ++replayed;
    }
    bool saved = true;
    if (replayed) {
      spdlog::info("node '{}': {} map changes after its last flush recovered from its map log",
                   node, replayed);
      // Into the slot after the durable one (never over it).
      saved = fdatasync(dfd) == 0 && store_map(mfd, id, &map, err);
      if (!saved && err->empty()) *err = strerror(errno);
      if (saved) note_durable_map(dfd, id, map.seq);
    }
    saved = saved && reset_map_log(lfd, log_path, err);
    if (!saved) {
      *err = prefix + ": cannot recover its map log: " + *err;
      ::close(lfd);
      lfd = -1;
    }
  }
  if (lfd < 0) {
    ::close(dfd);
    ::close(mfd);
    ::close(lock_fd);
    return nullptr;
  }
  std::unique_ptr<NodeView> v(new NodeView(gen, id, std::move(map), true));
  v->node_ = node;
  v->mode_ = mode;
  v->diff_fd_ = dfd;
  v->map_fd_ = mfd;
  v->lock_fd_ = lock_fd;
  v->log_fd_ = lfd;
  v->persisted_seq_ = v->overlay_.map().seq;
  v->log_seq_ = v->persisted_seq_;
  v->map_diff();
  return v;
}

bool NodeView::place_log(const std::vector<LogRecord>& recs, std::vector<LogWrite>* out) {
  uint64_t seq[2] = {region_seq_[0], region_seq_[1]}, off[2] = {region_off_[0], region_off_[1]};
  std::vector<LogWrite> writes;
  const uint64_t boot = host_boot_id(), tag = overlay_.id().layer_tag;
  for (const LogRecord& r : recs) {
    const int k = int(r.seq % 2);
    if (seq[k] != kUnused && r.seq < seq[k]) continue;  // in a durable map already
    if (seq[k] == kUnused || r.seq > seq[k]) {
      seq[k] = r.seq;  // the region's records before are superseded
      off[k] = 0;
    }
    if (off[k] + kLogRecordSize > kLogRegionSize) return false;
    const uint64_t at = uint64_t(k) * kLogRegionSize + off[k];
    if (writes.empty() || writes.back().offset + writes.back().bytes.size() != at)
      writes.push_back({at, {}});
    writes.back().bytes += encode_log_record(r.change, r.seq, tag, boot);
    off[k] += kLogRecordSize;
  }
  for (int k : {0, 1}) {
    region_seq_[k] = seq[k];
    region_off_[k] = off[k];
  }
  for (LogWrite& w : writes) out->push_back(std::move(w));
  return true;
}

void NodeView::map_diff() {
  void* p = mmap(nullptr, overlay_.id().size, PROT_READ, MAP_SHARED, diff_fd_, 0);
  if (p != MAP_FAILED) diff_map_ = static_cast<uint8_t*>(p);
}

NodeView::~NodeView() {
  if (diff_fd_ >= 0 && !sticky_ && map_changed()) {
    Snapshot s = snapshot();
    bool ok = fdatasync(diff_fd_) == 0 && pwrite(map_fd_, s.slot.data(), s.slot.size(),
                                                 off_t(s.offset)) == ssize_t(s.slot.size()) &&
              fdatasync(map_fd_) == 0;
    if (!ok) spdlog::error("node '{}': cannot save its block map at detach: {}", node_, strerror(errno));
    if (ok) note_durable_map(diff_fd_, overlay_.id(), s.seq);
  }
  if (diff_map_) munmap(diff_map_, overlay_.id().size);
  for (int fd : {diff_fd_, map_fd_, log_fd_, lock_fd_})
    if (fd >= 0) ::close(fd);
}

void NodeView::drop_changes() {
  overlay_.clear();
  // The log says so too, or a kill before the next flush would bring the
  // old changes back over the punched diff.
  std::vector<LogWrite> w;
  if (!place_log({{{MapChange::kClear, 0, 0}, log_seq_}}, &w) ||
      (!w.empty() && pwrite(log_fd_, w[0].bytes.data(), w[0].bytes.size(), off_t(w[0].offset)) !=
                         ssize_t(w[0].bytes.size())))
    spdlog::warn("node '{}': cannot log the dropping of its changes; they come back if the "
                 "server is killed before the next flush", node_);
  if (fallocate(diff_fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                off_t(overlay_.id().size)) != 0 &&
      errno != EOPNOTSUPP)
    spdlog::warn("node '{}': cannot punch its old diff: {}", node_, strerror(errno));
}

NodeView::Snapshot NodeView::snapshot() const {
  Snapshot s;
  s.seq = persisted_seq_ + 1;
  s.version = overlay_.version();
  s.slot = encode_map_slot(overlay_.id(), s.seq, overlay_.map().dirty, overlay_.map().zero);
  s.offset = (s.seq % 2) * slot_stride(overlay_.id().blocks());
  s.trailer = trailer_header(overlay_.id(), s.seq);
  s.trailer_at = trailer_offset(overlay_.id());
  return s;
}

void NodeView::persisted(const Snapshot& s) {
  persisted_seq_ = s.seq;
  if (s.version > persisted_version_) persisted_version_ = s.version;
}

}  // namespace storage
