#include "storage/overlay.hpp"

#include <algorithm>
#include <cassert>

namespace storage {
namespace {

void push_piece(std::vector<Piece>* out, int from, uint64_t off, uint64_t len) {
  if (len == 0) return;
  if (!out->empty() && out->back().from == from && out->back().off + out->back().len == off) {
    out->back().len += len;
    return;
  }
  out->push_back({from, off, len});
}

}  // namespace

int LayerStack::source(uint64_t block) const {
  const auto b = uint32_t(block);
  for (size_t k = 0; k < deltas_.size(); ++k) {
    if (deltas_[k].dirty.contains(b)) return int(k);
    if (deltas_[k].zero.contains(b)) return kFromZero;
  }
  return int(deltas_.size());
}

Overlay::Overlay(LayerId id, BlockMap own, std::shared_ptr<const LayerStack> below, bool writable)
    : id_(id), own_(std::move(own)), below_(std::move(below)), writable_(writable) {}

int Overlay::source(uint64_t block) const {
  const auto b = uint32_t(block);
  if (own_.dirty.contains(b)) return kFromDiff;
  if (own_.zero.contains(b)) return kFromZero;
  return below_->source(block);
}

void Overlay::plan_read(uint64_t off, uint64_t len, std::vector<Piece>* out) const {
  out->clear();
  const uint64_t bs = id_.block_size;
  // Fast path: nothing above the full image.
  if (own_.dirty.isEmpty() && own_.zero.isEmpty() && below_->deltas() == 0) {
    push_piece(out, 0, off, len);
    return;
  }
  const uint64_t end = off + len;
  for (uint64_t pos = off; pos < end;) {
    const uint64_t block = pos / bs;
    const uint64_t next = std::min(end, (block + 1) * bs);
    push_piece(out, source(block), pos, next - pos);
    pos = next;
  }
}

// Pieces for bytes of clean or zero blocks, read from below the view.
void Overlay::fill_from_below(uint64_t off, uint64_t len, std::vector<Piece>* out) const {
  const uint64_t bs = id_.block_size;
  for (uint64_t pos = off; pos < off + len;) {
    const uint64_t block = pos / bs;
    const uint64_t next = std::min(off + len, (block + 1) * bs);
    int from = own_.zero.contains(uint32_t(block)) ? kFromZero : below_->source(block);
    push_piece(out, from, pos, next - pos);
    pos = next;
  }
}

uint64_t Overlay::edge_start(uint64_t off) const {
  const uint64_t bs = id_.block_size;
  if (off % bs == 0 || own_.dirty.contains(uint32_t(off / bs))) return off;
  return off / bs * bs;
}

uint64_t Overlay::edge_end(uint64_t end) const {
  const uint64_t bs = id_.block_size;
  if (end % bs == 0 || own_.dirty.contains(uint32_t(end / bs))) return end;
  return std::min(id_.size, (end / bs + 1) * bs);
}

MutationPlan Overlay::plan_write(uint64_t off, uint64_t len) const {
  assert(writable_ && len > 0 && off + len <= id_.size);
  const uint64_t bs = id_.block_size;
  MutationPlan p;
  p.first = off / bs;
  p.last = (off + len - 1) / bs;
  p.start = edge_start(off);
  p.end = edge_end(off + len);
  fill_from_below(p.start, off - p.start, &p.fill);
  fill_from_below(off + len, p.end - off - len, &p.fill);
  return p;
}

MutationPlan Overlay::plan_zero(uint64_t off, uint64_t len, bool trim) const {
  assert(writable_ && len > 0 && off + len <= id_.size);
  const uint64_t bs = id_.block_size;
  const uint64_t end = off + len;
  MutationPlan p;
  p.first = off / bs;
  p.last = (end - 1) / bs;
  // Whole blocks inside the range (the view's last block may be short).
  uint64_t zf = (off + bs - 1) / bs;
  uint64_t ze = end == id_.size ? (end + bs - 1) / bs : end / bs;
  if (ze > zf) {
    p.zero_first = zf;
    p.zero_end = ze;
    p.punch = roaring_bitmap_range_cardinality(&own_.dirty.roaring, zf, ze) > 0;
  }
  if (trim) return p;  // partial blocks of a trim are left alone
  // Partial edges: zeros written like a write, unless the block is zero already.
  auto edge = [&](uint64_t a, uint64_t b, uint64_t* s, uint64_t* e, std::vector<Piece>* fill) {
    if (a >= b || own_.zero.contains(uint32_t(a / bs))) return;
    *s = edge_start(a);
    *e = edge_end(b);
    fill_from_below(*s, a - *s, fill);
    fill_from_below(b, *e - b, fill);
  };
  if (ze <= zf) {  // no whole block: one partial range within one or two blocks
    uint64_t split = std::min(end, (off / bs + 1) * bs);
    edge(off, split, &p.start, &p.end, &p.fill);
    edge(split, end, &p.start2, &p.end2, &p.fill2);
  } else {
    edge(off, std::min(end, zf * bs), &p.start, &p.end, &p.fill);
    edge(std::max(off, ze * bs), end, &p.start2, &p.end2, &p.fill2);
  }
  return p;
}

MapChanges Overlay::commit(const MutationPlan& p) {
  const uint64_t bs = id_.block_size;
  MapChanges changes;
  // Only what changes the map goes in: rewriting dirty blocks is free.
  auto add = [&](MapChange::State state, uint64_t first, uint64_t end) {
    const Roaring& set = state == MapChange::kDirty ? own_.dirty : own_.zero;
    if (end > first && !set.containsRange(first, end)) changes.items[changes.n++] = {state, first, end};
  };
  auto mark_written = [&](uint64_t s, uint64_t e) {
    if (s >= e) return;
    // Whole blocks in [s, e): the plan widened partial clean edges, so the
    // only partial blocks left are already dirty.
    uint64_t bf = (s + bs - 1) / bs;
    uint64_t be = e == id_.size ? (e + bs - 1) / bs : e / bs;
    add(MapChange::kDirty, bf, be);
  };
  mark_written(p.start, p.end);
  mark_written(p.start2, p.end2);
  add(MapChange::kZero, p.zero_first, p.zero_end);
  for (const MapChange& c : changes) apply_change(&own_, c, id_.blocks());
  ++version_;
  return changes;
}

std::vector<std::pair<uint64_t, bool>> Overlay::changed_runs(uint64_t off, uint64_t len,
                                                             size_t max) const {
  std::vector<std::pair<uint64_t, bool>> runs;
  const uint64_t bs = id_.block_size;
  const uint64_t end = off + len;
  for (uint64_t pos = off; pos < end && runs.size() <= max;) {
    const uint64_t block = pos / bs;
    const uint64_t next = std::min(end, (block + 1) * bs);
    const bool changed =
        own_.dirty.contains(uint32_t(block)) || own_.zero.contains(uint32_t(block));
    if (!runs.empty() && runs.back().second == changed) {
      runs.back().first += next - pos;
    } else {
      runs.push_back({next - pos, changed});
    }
    pos = next;
  }
  if (runs.size() > max) runs.resize(max);
  return runs;
}

void Overlay::clear() {
  own_.dirty = Roaring();
  own_.zero = Roaring();
  ++version_;
}

bool BlockLocks::free(uint64_t first, uint64_t last, size_t waiters_before) const {
  for (const Range& r : held_)
    if (overlaps(r, first, last)) return false;
  for (size_t i = 0; i < waiters_before; ++i)
    if (overlaps(waiting_[i], first, last)) return false;
  return true;
}

bool BlockLocks::lock(uint64_t first, uint64_t last, uint64_t owner) {
  if (free(first, last, waiting_.size())) {
    held_.push_back({first, last, owner});
    return true;
  }
  waiting_.push_back({first, last, owner});
  return false;
}

std::vector<uint64_t> BlockLocks::unlock(uint64_t owner) {
  auto it = std::find_if(held_.begin(), held_.end(), [&](const Range& r) { return r.owner == owner; });
  assert(it != held_.end());
  *it = held_.back();
  held_.pop_back();
  std::vector<uint64_t> granted;
  for (size_t i = 0; i < waiting_.size();) {
    const Range w = waiting_[i];
    if (free(w.first, w.last, i)) {
      held_.push_back(w);
      granted.push_back(w.owner);
      waiting_.erase(waiting_.begin() + long(i));
    } else {
      ++i;
    }
  }
  return granted;
}

void BlockLocks::forget(uint64_t owner) {
  auto it = std::find_if(waiting_.begin(), waiting_.end(),
                         [&](const Range& r) { return r.owner == owner; });
  if (it != waiting_.end()) waiting_.erase(it);
}

}  // namespace storage
