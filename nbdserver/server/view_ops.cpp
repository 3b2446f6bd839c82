// Requests on node views: reads split by source, mutations under block
// locks with copy-up, and flushes that make diff and map durable.
//
// A view request runs as one Op with sub-operations (Sub), each one file
// operation tagged Kind::kSub. Op::pending counts the subs in flight, and
// view_step() moves the request on when it reaches zero.
//
// Mutation stages (Op::stage): 0 new, 1 waiting for its block lock, 2
// filling partial blocks from below (copy-up), 3 writing the diff and
// punching zeroed blocks, 4 waiting for the flush a FUA asked for, 5 waiting
// for the map log to hold every map change made up to its own.
//
// View flush steps (ViewState::step): 1 fdatasync of the diff, 2 writing the
// map snapshot taken before step 1, 3 fdatasync of the bitmap file, 4 noting
// the map as durable in the diff's trailer (not synced; see layer_file.hpp).
#include <fcntl.h>
#include <linux/falloc.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cassert>
#include <cstring>

#include "server/loop.hpp"

namespace server {
namespace {

enum SubKind : uint8_t { kSubRead, kSubWrite, kSubPunch };

uint64_t lock_owner(uint32_t op, uint32_t gen) { return uint64_t(gen) << 32 | op; }

std::string errno_text(int err) { return strerror(err); }

const uint64_t kPage = uint64_t(sysconf(_SC_PAGESIZE));

// Page residency of one mapping over the span of a read plan's pieces,
// asked of the kernel (one mincore) only when a piece first needs it.
class SpanResidency {
 public:
  SpanResidency(const uint8_t* map, std::vector<unsigned char>* scratch,
                const std::vector<storage::Piece>& pieces)
      : map_(map), v_(scratch) {
    if (pieces.empty()) return;
    off_ = pieces.front().off & ~(kPage - 1);
    end_ = pieces.back().off + pieces.back().len;
  }
  const uint8_t* map() const { return map_; }
  // Every page of [off, off + len) (inside the span) is in the page cache.
  bool covers(uint64_t off, uint64_t len) {
    if (state_ == 0) {
      v_->resize((end_ - off_ + kPage - 1) / kPage);
      state_ = map_ && mincore(const_cast<uint8_t*>(map_) + off_, end_ - off_, v_->data()) == 0
                   ? 1 : -1;
    }
    if (state_ < 0) return false;
    for (uint64_t pg = (off - off_) / kPage; pg <= (off + len - 1 - off_) / kPage; ++pg)
      if (!((*v_)[pg] & 1)) return false;
    return true;
  }

 private:
  const uint8_t* map_;
  std::vector<unsigned char>* v_;
  uint64_t off_ = 0, end_ = 0;
  int state_ = 0;  // 0 not asked yet, 1 known, -1 unavailable
};

// Zeros to send from: a read-only anonymous mapping that is never written,
// so every page of it is the kernel's zero page. nullptr past its size.
const uint8_t* zero_pages(uint64_t len) {
  static constexpr uint64_t kSize = 64 << 20;
  static const uint8_t* zeros = [] {
    void* p = mmap(nullptr, kSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? nullptr : static_cast<const uint8_t*>(p);
  }();
  return len <= kSize ? zeros : nullptr;
}

}  // namespace

// ---------------------------------------------------------------- attach

uint32_t Loop::view_slot(storage::NodeView* v) {
  auto it = view_slots_.find(v);
  if (it != view_slots_.end()) return it->second;
  uint32_t slot;
  if (!free_views_.empty()) {
    slot = free_views_.back();
    free_views_.pop_back();
  } else {
    slot = uint32_t(views_.size());
    views_.emplace_back();
  }
  view_slots_[v] = slot;
  return slot;
}

void Loop::attach_view(Connection& c) {
  storage::NodeView* v = c.exp->view.get();
  ViewState& vs = views_[view_slot(v)];
  if (!vs.view) vs.view = c.exp->view;
  // An ephemeral node that attaches anew (a boot) starts from the clean
  // generation, whatever its files or open view hold; one that resumes
  // (reconnects within its boot) keeps its changes.
  if (vs.conns == 0 && v->mode() == storage::NodeMode::kEphemeral && !c.exp->resume &&
      (v->attached_once || v->overlay().map().dirty.cardinality() ||
       v->overlay().map().zero.cardinality())) {
    spdlog::info("node '{}': ephemeral, attached anew: dropping its changes", v->node());
    v->drop_changes();
  }
  v->attached_once = true;
  // A resume means the node gave up on its other connections (the kernel
  // shut them down and re-sends what was on them). Requests still unread
  // on them are stale: run late, they could land over newer writes. Close
  // them now; requests already running finish first (block locks).
  if (c.exp->resume) {
    for (auto& other : conns_) {
      if (!other || other.get() == &c || other->fd < 0 || !other->view_attached ||
          other->exp->view.get() != v || other->phase == Connection::Phase::kClosing)
        continue;
      spdlog::info("conn {}: node '{}' resumed on conn {}: closing this older connection",
                   other->id, v->node(), c.id);
      close_connection(*other, "superseded by the node's resumed connection", false);
    }
  }
  if (c.exp->counters) {
    exports::NodeCounters& n = *c.exp->counters;
    if (vs.conns == 0 && !c.exp->resume) exports::bump(n.boots);
    exports::bump(n.connections);
    n.last_attach.store(time(nullptr), std::memory_order_relaxed);
    vs.counters = c.exp->counters;
  }
  ++vs.conns;
  c.view_attached = true;
  c.exp->store->attached(v->node(), +1);
  publish_dirty(vs);
}

void Loop::publish_dirty(const ViewState& vs) {
  if (!vs.counters) return;
  const storage::Overlay& o = vs.view->overlay();
  vs.counters->dirty_bytes.store(int64_t(o.map().dirty.cardinality() * o.block_size()),
                                 std::memory_order_relaxed);
}

// The node's last connection on this loop going away: flush, then let go
// of the view (see on_view_flush).
void Loop::detach_view(Connection& c) {
  storage::NodeView* v = c.exp->view.get();
  const uint32_t slot = view_slot(v);
  c.view_attached = false;
  c.exp->store->attached(v->node(), -1);
  if (exports::NodeCounters* n = c.exp->counters.get()) {
    exports::bump(n->connections, -1);
    n->last_attach.store(time(nullptr), std::memory_order_relaxed);
    if (views_[slot].conns == 1) n->dirty_bytes.store(-1, std::memory_order_relaxed);
  }
  if (--views_[slot].conns == 0) view_flush(slot, kNone);
}

// ---------------------------------------------------------------- requests

void Loop::execute_view(uint32_t op) {
  Op& o = ops_[op];
  Connection& c = *conns_[o.conn];
  storage::NodeView& v = *c.exp->view;
  const nbd::Request& r = o.req;
  const bool mutates = r.type == nbd::kCmdWrite || r.type == nbd::kCmdTrim ||
                       r.type == nbd::kCmdWriteZeroes || r.type == nbd::kCmdFlush;
  if (mutates && v.sticky_error())
    return finish(op, nbd::kEIO, "node '" + v.node() + "' had an I/O error (" +
                                     errno_text(v.sticky_error()) +
                                     "); it refuses writes until an admin resets it");
  switch (r.type) {
    case nbd::kCmdRead:
      if (r.length == 0) return finish(op, nbd::kOk, {});
      return view_read(op);
    case nbd::kCmdWrite:
    case nbd::kCmdTrim:
    case nbd::kCmdWriteZeroes:
      if (r.length == 0) return finish(op, nbd::kOk, {});
      return view_mutate(op);
    case nbd::kCmdFlush:
      if (!v.overlay().writable()) return finish(op, nbd::kOk, {});
      o.stage = 4;
      return view_flush(view_slot(&v), op);
    case nbd::kCmdCache:
    case nbd::kCmdBlockStatus:
      return finish(op, nbd::kOk, {});
    default:
      assert(false && "validate() let through an unknown command");
      return finish(op, nbd::kEINVAL, "unknown command");
  }
}

// A read whose pieces are all page-cached in the diff or the full image,
// or zeros, is answered at once with an iovec list that points into the
// mappings (and zero pages): no read operation and no assembly copy. False
// when it cannot be (the caller reads it the normal way).
bool Loop::view_mapped_read(Connection& c, const nbd::Request& req) {
  const storage::NodeView& v = *c.exp->view;
  v.overlay().plan_read(req.offset, req.length, &pieces_);
  if (pieces_.empty() || pieces_.size() > SendQueue::kMaxParts) return false;
  const int full = int(v.generation().deltas());
  SpanResidency res[2] = {{v.diff_mapping(), &residency_, pieces_},
                          {v.generation().full()->mapping(), &residency2_, pieces_}};
  std::vector<iovec> parts;
  parts.reserve(pieces_.size());
  for (const storage::Piece& p : pieces_) {
    const uint8_t* base = nullptr;
    if (p.from == storage::kFromZero) {
      base = zero_pages(p.len);
      if (!base) return false;
      parts.push_back({const_cast<uint8_t*>(base), p.len});
      continue;
    }
    SpanResidency* r = p.from == storage::kFromDiff ? &res[0] : p.from == full ? &res[1] : nullptr;
    if (!r || !r->covers(p.off, p.len)) return false;
    parts.push_back({const_cast<uint8_t*>(r->map() + p.off), p.len});
  }
  uint32_t op = new_op(c, req);
  if (parts.size() == 1 && pieces_[0].from != storage::kFromZero) {
    ops_[op].mapped = static_cast<const uint8_t*>(parts[0].iov_base);
  } else {
    ops_[op].parts = std::move(parts);
  }
  finish(op, nbd::kOk, {});
  return true;
}

void Loop::view_read(uint32_t op) {
  Op& o = ops_[op];
  const storage::NodeView& v = *conns_[o.conn]->exp->view;
  v.overlay().plan_read(o.req.offset, o.req.length, &pieces_);
  if (!fill(op, pieces_, o.req.offset, o.buf.data())) return finish(op, nbd::kOk, {});
}

// Fills `buf` (view bytes from `start`) with `pieces`: zeros in place,
// page-cached bytes copied from a mapping, the rest as read subs. Returns
// true when subs were submitted (view_step continues), false when done.
bool Loop::fill(uint32_t op, const std::vector<storage::Piece>& pieces, uint64_t start,
                uint8_t* buf) {
  const storage::NodeView& v = *conns_[ops_[op].conn]->exp->view;
  const int full = int(v.generation().deltas());
  // Page residency of the diff and of the full image over the pieces' whole
  // span, one mincore() each and only if a piece needs it.
  SpanResidency res[2] = {{v.diff_mapping(), &residency_, pieces},
                          {v.generation().full()->mapping(), &residency2_, pieces}};
  for (const storage::Piece& p : pieces) {
    uint8_t* dst = buf + (p.off - start);
    if (p.from == storage::kFromZero) {
      memset(dst, 0, p.len);
      continue;
    }
    SpanResidency* r = p.from == storage::kFromDiff ? &res[0] : p.from == full ? &res[1] : nullptr;
    if (r && r->covers(p.off, p.len)) {
      memcpy(dst, r->map() + p.off, p.len);
      continue;
    }
    add_sub(op, kSubRead, v.fd_for(p.from), dst, p.off, p.len);
  }
  return ops_[op].pending > 0;
}

void Loop::view_mutate(uint32_t op) {
  Op& o = ops_[op];
  storage::NodeView& v = *conns_[o.conn]->exp->view;
  const uint64_t bs = v.overlay().block_size();
  o.stage = 1;
  if (v.locks().lock(o.req.offset / bs, (o.req.offset + o.req.length - 1) / bs,
                     lock_owner(op, o.gen)))
    view_locked(op);
}

// Holding the lock: plan, then copy up what partial blocks need.
void Loop::view_locked(uint32_t op) {
  Op& o = ops_[op];
  storage::NodeView& v = *conns_[o.conn]->exp->view;
  const nbd::Request& r = o.req;
  auto p = std::make_unique<storage::MutationPlan>(
      r.type == nbd::kCmdWrite ? v.overlay().plan_write(r.offset, r.length)
                               : v.overlay().plan_zero(r.offset, r.length,
                                                       r.type == nbd::kCmdTrim));
  o.stage = 2;
  const bool widened = r.type == nbd::kCmdWrite && (p->start != r.offset || p->end != r.offset + r.length);
  if (r.type != nbd::kCmdWrite || widened) {
    // Writes that only cover part of a block, and zeroed partial edges,
    // are assembled in a buffer of their own.
    for (auto [s, e, b] : {std::tuple{p->start, p->end, &o.wbuf}, {p->start2, p->end2, &o.wbuf2}}) {
      if (s == e) continue;
      *b = pool_.get(e - s);
      if (!*b) {
        o.err = ENOMEM;
        o.plan = std::move(p);
        return view_committed(op);
      }
      if (r.type == nbd::kCmdWrite) {
        memcpy(b->data() + (r.offset - s), o.buf.data(), r.length);
      } else {
        memset(b->data(), 0, e - s);
      }
    }
    fill(op, p->fill, p->start, o.wbuf.data());
    if (p->end2 > p->start2) fill(op, p->fill2, p->start2, o.wbuf2.data());
  }
  o.plan = std::move(p);
  if (o.pending == 0) view_write(op);
}

void Loop::view_write(uint32_t op) {
  Op& o = ops_[op];
  storage::NodeView& v = *conns_[o.conn]->exp->view;
  const storage::MutationPlan& p = *o.plan;
  if (o.err) return view_committed(op);
  o.stage = 3;
  if (p.end > p.start)
    add_sub(op, kSubWrite, v.diff_fd(), o.wbuf ? o.wbuf.data() : o.buf.data(), p.start,
            p.end - p.start);
  if (p.end2 > p.start2) add_sub(op, kSubWrite, v.diff_fd(), o.wbuf2.data(), p.start2, p.end2 - p.start2);
  if (p.punch && ring_.features().fallocate) {
    const uint64_t bs = v.overlay().block_size();
    add_sub(op, kSubPunch, v.diff_fd(), nullptr, p.zero_first * bs,
            (p.zero_end - p.zero_first) * bs);
  }
  if (o.pending == 0) view_committed(op);
}

// The diff holds the data (or the mutation failed): update the map, let
// waiting requests take the lock, and answer.
void Loop::view_committed(uint32_t op) {
  Op& o = ops_[op];
  storage::NodeView& v = *conns_[o.conn]->exp->view;
  const int err = o.err;
  bool logged = false;
  if (!err) {
    const uint64_t seq = v.log_seq();
    const storage::MapChanges changes = v.overlay().commit(*o.plan);
    if (!changes.empty()) {
      ViewState& vs = views_[view_slot(&v)];
      for (const storage::MapChange& c : changes) vs.log_recs.push_back({c, seq});
      logged = true;
    }
  }
  if (err == EIO) v.set_sticky_error(EIO);
  for (uint64_t owner : v.locks().unlock(lock_owner(op, o.gen))) {
    const uint32_t w = uint32_t(owner);
    assert(ops_[w].used && ops_[w].gen == uint32_t(owner >> 32));
    view_locked(w);
  }
  if (err) {
    // Blocks not yet marked dirty still read from below; a dirty block may
    // hold part of the failed write, as with any failed write to a disk.
    return finish(op, nbd::error_from_errno(err, o.req.flags & nbd::kCmdFlagFastZero),
                  std::string(nbd::cmd_name(o.req.type)) + " to node '" + v.node() +
                      "' failed: " + errno_text(err));
  }
  // Answered once its map change is in the log (see map_log.hpp). A
  // mutation that changed nothing in the map may still rest on changes
  // made before it whose records are not written yet (a rewrite of a block
  // that an earlier write made dirty, a zeroing of a block an earlier trim
  // zeroed): it waits for those records, or a kill right after its reply
  // would take it back.
  const uint32_t slot = view_slot(&v);
  ViewState& vs = views_[slot];
  o.stage = 5;
  if (logged || !vs.log_recs.empty()) {
    vs.log_waiting.push_back(op);
    if (vs.log_left == 0) start_view_log(slot);
    return;
  }
  if (vs.log_left > 0) return vs.log_running.push_back(op);  // the batch in flight holds them
  view_logged(op);
}

void Loop::view_logged(uint32_t op) {
  Op& o = ops_[op];
  if (!(o.req.flags & nbd::kCmdFlagFua)) return finish(op, nbd::kOk, {});
  o.stage = 4;
  view_flush(view_slot(conns_[o.conn]->exp->view.get()), op);
}

// Writes the records collected since the last log write, in one or two
// writes (one per region); the requests they describe wait for it.
void Loop::start_view_log(uint32_t slot) {
  ViewState& vs = views_[slot];
  std::vector<storage::NodeView::LogRecord> recs;
  recs.swap(vs.log_recs);
  vs.log_running.swap(vs.log_waiting);
  vs.log_writes.clear();
  vs.log_err = 0;
  // A full log region: a flush makes these changes durable instead.
  if (!vs.view->place_log(recs, &vs.log_writes)) return log_batch_done(slot, false);
  // All superseded by a durable map: nothing to write.
  if (vs.log_writes.empty()) return log_batch_done(slot, true);
  if (log_delay_.tv_sec || log_delay_.tv_nsec) {
    // Fault injection (tests): the batch's writes start after a delay.
    vs.log_left = 1;
    io_uring_prep_timeout(file_sqe(io::make_tag(io::Kind::kViewLog, slot, kLogDelayed)),
                          &log_delay_, 0, 0);
    return;
  }
  submit_view_log(slot);
}

void Loop::submit_view_log(uint32_t slot) {
  ViewState& vs = views_[slot];
  vs.log_left = unsigned(vs.log_writes.size());
  for (uint32_t i = 0; i < vs.log_writes.size(); ++i) {
    const storage::NodeView::LogWrite& w = vs.log_writes[i];
    io_uring_sqe* q = file_sqe(io::make_tag(io::Kind::kViewLog, slot, i));
    io_uring_prep_write(q, vs.view->log_fd(), w.bytes.data(), unsigned(w.bytes.size()), w.offset);
  }
}

void Loop::on_view_log(uint32_t slot, uint32_t index, int res) {
  ViewState& vs = views_[slot];
  if (index == kLogDelayed) return submit_view_log(slot);
  assert(vs.log_left > 0 && index < vs.log_writes.size());
  // The log is preallocated and written in place; a short or failed write
  // leaves these changes to the next flush, which the requests then wait for.
  if (!vs.log_err && (res < 0 || size_t(res) != vs.log_writes[index].bytes.size()))
    vs.log_err = res < 0 ? -res : EIO;
  if (--vs.log_left > 0) return;
  if (vs.log_err)
    spdlog::warn("node '{}': map log write failed ({}); its requests wait for a flush",
                 vs.view->node(), errno_text(vs.log_err));
  log_batch_done(slot, vs.log_err == 0);
  if (!views_[slot].log_waiting.empty()) start_view_log(slot);
}

// The running batch's requests go on: answered if their records are in the
// log, else after the next flush, which makes their changes durable.
void Loop::log_batch_done(uint32_t slot, bool logged) {
  std::vector<uint32_t> ops;
  ops.swap(views_[slot].log_running);
  for (uint32_t op : ops) {
    if (logged) {
      view_logged(op);
    } else {
      ops_[op].stage = 4;
      view_flush(slot, op);
    }
  }
}

void Loop::view_step(uint32_t op) {
  Op& o = ops_[op];
  if (o.req.type == nbd::kCmdRead) {
    if (o.err == EIO) conns_[o.conn]->exp->view->set_sticky_error(EIO);
    return finish(op, o.err ? nbd::error_from_errno(o.err, false) : nbd::kOk,
                  o.err ? "read failed: " + errno_text(o.err) : "");
  }
  if (o.stage == 2) return view_write(op);
  assert(o.stage == 3);
  view_committed(op);
}

// ---------------------------------------------------------------- subs

void Loop::add_sub(uint32_t op, uint8_t kind, int fd, uint8_t* buf, uint64_t off, uint64_t len) {
  uint32_t s;
  if (!free_subs_.empty()) {
    s = free_subs_.back();
    free_subs_.pop_back();
  } else {
    s = uint32_t(subs_.size());
    subs_.emplace_back();
  }
  Sub& u = subs_[s];
  u.gen++;
  u.used = true;
  u.op = op;
  u.kind = kind;
  u.fd = fd;
  u.buf = buf;
  u.off = off;
  u.len = len;
  u.done = 0;
  ++ops_[op].pending;
  submit_sub(s);
}

void Loop::submit_sub(uint32_t s) {
  Sub& u = subs_[s];
  io_uring_sqe* q = file_sqe(io::make_tag(io::Kind::kSub, s, u.gen));
  const unsigned left = unsigned(u.len - u.done);
  switch (u.kind) {
    case kSubRead: io_uring_prep_read(q, u.fd, u.buf + u.done, left, u.off + u.done); break;
    case kSubWrite: io_uring_prep_write(q, u.fd, u.buf + u.done, left, u.off + u.done); break;
    default:
      io_uring_prep_fallocate(q, u.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, u.off, u.len);
  }
}

void Loop::on_sub(uint32_t s, int res) {
  Sub& u = subs_[s];
  if (res == -EAGAIN || res == -EINTR) return submit_sub(s);
  Op& o = ops_[u.op];
  if (u.kind == kSubPunch) {
    // A diff that cannot punch holes keeps the bytes; the map says zero.
    if (res < 0 && res != -EOPNOTSUPP && !o.err) o.err = -res;
  } else if (res > 0) {
    u.done += uint64_t(res);
    if (u.done < u.len) return submit_sub(s);
  } else if (!o.err) {
    o.err = res == 0 ? EIO : -res;  // the files are never shorter than the view
  }
  const uint32_t op = u.op;
  u.used = false;
  free_subs_.push_back(s);
  if (--o.pending == 0) view_step(op);
}

// ---------------------------------------------------------------- flush

// Queues request `op` (or kNone: a flush at detach) for the view's next
// flush; starts one if none is running.
void Loop::view_flush(uint32_t slot, uint32_t op) {
  ViewState& vs = views_[slot];
  if (op != kNone) vs.waiting.push_back(op);
  if (!vs.in_flight) start_view_flush(slot);
}

void Loop::start_view_flush(uint32_t slot) {
  ViewState& vs = views_[slot];
  vs.running.swap(vs.waiting);
  // Snapshot the map now: every write it names has completed, so the
  // fdatasync below covers its data.
  vs.has_snap = vs.view->map_changed();
  if (vs.has_snap) {
    vs.snap = vs.view->snapshot();
    // Later changes are logged as following this snapshot.
    vs.view->note_snapshot(vs.snap.seq);
  }
  vs.in_flight = true;
  vs.step = 1;
  submit_view_flush(slot);
}

void Loop::submit_view_flush(uint32_t slot) {
  ViewState& vs = views_[slot];
  io_uring_sqe* q = file_sqe(io::make_tag(io::Kind::kViewFlush, slot, vs.step));
  switch (vs.step) {
    case 1: io_uring_prep_fsync(q, vs.view->diff_fd(), IORING_FSYNC_DATASYNC); break;
    case 2:
      io_uring_prep_write(q, vs.view->map_fd(), vs.snap.slot.data(), unsigned(vs.snap.slot.size()),
                          vs.snap.offset);
      break;
    case 3: io_uring_prep_fsync(q, vs.view->map_fd(), IORING_FSYNC_DATASYNC); break;
    default:
      io_uring_prep_write(q, vs.view->diff_fd(), vs.snap.trailer.data(),
                          unsigned(vs.snap.trailer.size()), vs.snap.trailer_at);
  }
}

void Loop::on_view_flush(uint32_t slot, unsigned step, int res) {
  ViewState& vs = views_[slot];
  assert(vs.in_flight && step == vs.step);
  if (res == -EAGAIN || res == -EINTR) return submit_view_flush(slot);
  if (step == 4) {
    // Only evidence for a later attach: the map is durable either way.
    if (res != int(vs.snap.trailer.size()))
      spdlog::warn("node '{}': cannot note map {} in its diff's trailer: {}", vs.view->node(),
                   vs.snap.seq, res < 0 ? errno_text(-res) : "short write");
    return view_flush_done(slot, 0);
  }
  if (step == 2 && res >= 0 && size_t(res) != vs.snap.slot.size()) res = -ENOSPC;
  // A map write that did not happen (no space) leaves the durable map as it
  // was, in the other slot: fail this flush, but not the view.
  if (step == 2 && res == -ENOSPC) return view_flush_done(slot, ENOSPC);
  if (res < 0) return view_flush_done(slot, -res);
  if (step == 1 && !vs.has_snap) return view_flush_done(slot, 0);
  if (step == 3) vs.view->persisted(vs.snap);
  vs.step = step + 1;
  submit_view_flush(slot);
}

void Loop::view_flush_done(uint32_t slot, int err) {
  ViewState& vs = views_[slot];
  vs.in_flight = false;
  vs.snap = {};
  // Errors are sticky, as for files: the kernel reports a writeback error
  // once, and the pages it could not write may be gone.
  if (err == ENOSPC) {
    spdlog::warn("node '{}': no space to save its block map; this flush fails", vs.view->node());
  } else if (err) {
    spdlog::error("node '{}': flush failed: {}; the view refuses writes until reset",
                  vs.view->node(), errno_text(err));
    vs.view->set_sticky_error(err);
  }
  if (vs.view->sticky_error()) err = vs.view->sticky_error();
  std::vector<uint32_t> done;
  done.swap(vs.running);
  for (uint32_t op : done)
    finish(op, !err ? nbd::kOk : err == ENOSPC ? nbd::kENOSPC : nbd::kEIO,
           err ? "flush failed: " + errno_text(err) : "");
  if (!vs.waiting.empty()) return start_view_flush(slot);
  if (vs.conns == 0 && vs.log_left == 0 && vs.log_waiting.empty()) {
    // Nobody on this loop uses the view any more: let it go. The
    // destructor has nothing left to write unless a write raced in.
    view_slots_.erase(vs.view.get());
    vs.view.reset();
    vs.counters.reset();
    free_views_.push_back(slot);
  }
}

// ---------------------------------------------------------------- block status

std::vector<nbd::Extent> Loop::view_extents(const storage::NodeView& v, std::string_view context,
                                            uint64_t off, uint64_t len, size_t max) {
  std::vector<nbd::Extent> out;
  auto add = [&](uint64_t n, uint32_t flags) {
    if (!out.empty() && out.back().flags == flags && out.back().length + n <= UINT32_MAX) {
      out.back().length += n;
    } else {
      out.push_back({n, flags});
    }
  };
  if (context == exports::kContextDirty) {
    for (auto [n, changed] : v.overlay().changed_runs(off, len, max)) add(n, changed ? 1 : 0);
    return out;
  }
  if (context != nbd::kContextBaseAllocation) return out;
  // Runs of blocks by source; runs on the full image ask its allocation map.
  const uint64_t bs = v.overlay().block_size();
  const int full = int(v.generation().deltas());
  const uint64_t end = off + len;
  for (uint64_t pos = off; pos < end && out.size() < max;) {
    const int from = v.overlay().source(pos / bs);
    uint64_t next = std::min(end, (pos / bs + 1) * bs);
    while (next < end && v.overlay().source(next / bs) == from) next = std::min(end, next + bs);
    if (from == full) {
      for (const storage::Extent& e : v.generation().full()->allocation(pos, next - pos, max - out.size()))
        add(e.length, allocation_flags(e.state));
    } else {
      add(next - pos, from == storage::kFromZero ? nbd::kStateHole | nbd::kStateZero : 0);
    }
    pos = next;
  }
  if (out.size() > max) out.resize(max);
  return out;
}

}  // namespace server
