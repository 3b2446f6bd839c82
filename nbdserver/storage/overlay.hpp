// Copy-on-write over an immutable generation: where each block of a view
// lives, and how reads and mutations are planned. No I/O here: the loop
// submits what the plans say, and tests drive the same code against a
// reference model.
//
// Layers, top down:
//   the view's own layer (a node's diff), if the view is writable
//   the generation's delta layers (newest first), if it was built incrementally
//   the generation's full image
// Each layer has a BlockMap (layer_file.hpp): `dirty` blocks live in that
// layer's diff, `zero` blocks read as zeros, anything else falls through to
// the layer below. The full image at the bottom holds every block.
//
// Mutations of the view's layer, and how they keep readers correct:
// - A write covering whole blocks goes straight to the diff, and its blocks
//   are marked dirty when the write completes (data before map).
// - A write covering part of a block that is not dirty first fills the rest
//   of that block from below (copy-up, or zeros for a zero block), then
//   writes the whole block. A partial write into a dirty block writes just
//   its bytes.
// - Trim and write-zeroes mark whole blocks zero (and punch them out of the
//   diff); write-zeroes writes zeros into partial edge blocks like a write.
// - Every mutation holds a lock on its block range from planning until its
//   map update, so two requests touching one block run one after the other
//   (two unaligned writes into one clean block never lose either). Reads
//   take no lock: a read racing a write to the same bytes may see either.
//
// Ownership: an Overlay belongs to one loop thread; nothing here is locked.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "storage/layer_file.hpp"
#include "storage/map_log.hpp"

namespace storage {

// Where a piece of a read comes from.
inline constexpr int kFromZero = -1;  // zeros, no I/O
inline constexpr int kFromDiff = -2;  // the view's own diff
// kFromZero, kFromDiff, or k >= 0: the generation's layer k, where
// k == number of delta layers means the full image.

struct Piece {
  int from = kFromZero;
  uint64_t off = 0;  // in the view (and in the source file: offsets match)
  uint64_t len = 0;
};

// The generation's layers as far as block placement is concerned.
class LayerStack {
 public:
  // `deltas` newest first; may be empty (a full generation).
  explicit LayerStack(std::vector<BlockMap> deltas) : deltas_(std::move(deltas)) {}
  size_t deltas() const { return deltas_.size(); }
  // kFromZero, or the index of the layer that holds `block`.
  int source(uint64_t block) const;
  const BlockMap& delta(size_t k) const { return deltas_[k]; }

 private:
  std::vector<BlockMap> deltas_;
};

// A mutation's plan: what to write into the diff, what to mark zero.
struct MutationPlan {
  uint64_t first = 0, last = 0;  // blocks locked, inclusive
  // Bytes [start, end) go to the diff (start == end: no write). The bytes
  // of the request are [req_off, req_off + req_len) inside it; the rest
  // must be filled first from `fill` (copy-up reads or zeros).
  uint64_t start = 0, end = 0;
  std::vector<Piece> fill;
  // A second write for write-zeroes, whose two partial edges are not
  // contiguous: [start2, end2) with its own fill.
  uint64_t start2 = 0, end2 = 0;
  std::vector<Piece> fill2;
  // Whole blocks [zero_first, zero_end) become zero.
  uint64_t zero_first = 0, zero_end = 0;
  bool punch = false;  // some of them are dirty: punch them out of the diff
};

class Overlay {
 public:
  // `writable` false: a read-only view of the generation (no own layer).
  Overlay(LayerId id, BlockMap own, std::shared_ptr<const LayerStack> below, bool writable);

  const LayerId& id() const { return id_; }
  uint32_t block_size() const { return id_.block_size; }
  bool writable() const { return writable_; }
  const BlockMap& map() const { return own_; }
  // Bumped by every change to map(); used to skip persisting an unchanged map.
  uint64_t version() const { return version_; }

  // Splits [off, off + len) into pieces by source, merging neighbours.
  void plan_read(uint64_t off, uint64_t len, std::vector<Piece>* out) const;
  // Plans for WRITE, WRITE_ZEROES and TRIM of [off, off + len); len > 0.
  // Valid only while the plan's blocks are locked (BlockLocks).
  MutationPlan plan_write(uint64_t off, uint64_t len) const;
  MutationPlan plan_zero(uint64_t off, uint64_t len, bool trim) const;
  // Applies a completed plan to the map; returns the changes, for the map
  // log, in order; ranges already in that state are left out.
  MapChanges commit(const MutationPlan& p);

  // Dirty-context extents: runs of blocks changed by this view (written or
  // zeroed) vs. unchanged, starting at `off`, at most `max` runs, covering a
  // prefix of [off, off + len). Each run: {length, changed}.
  std::vector<std::pair<uint64_t, bool>> changed_runs(uint64_t off, uint64_t len,
                                                      size_t max) const;
  // The block's placement for base:allocation: kFromDiff, kFromZero or a layer.
  int source(uint64_t block) const;
  // Forgets every change (ephemeral reattach, admin reset).
  void clear();

 private:
  void fill_from_below(uint64_t off, uint64_t len, std::vector<Piece>* out) const;
  uint64_t edge_start(uint64_t off) const;  // where a write at off must begin in the diff
  uint64_t edge_end(uint64_t end) const;

  LayerId id_;
  BlockMap own_;
  std::shared_ptr<const LayerStack> below_;
  bool writable_;
  uint64_t version_ = 0;
};

// Block-range locks for the mutations of one view, first come first served.
// Owners are opaque 64-bit values (the loop uses request tags).
class BlockLocks {
 public:
  // Takes [first, last] for `owner`, or queues it and returns false when the
  // range overlaps a held range or an earlier waiter.
  bool lock(uint64_t first, uint64_t last, uint64_t owner);
  // Releases `owner`'s range and returns the waiters that now hold theirs,
  // in order.
  std::vector<uint64_t> unlock(uint64_t owner);
  // Drops a waiter that will never run (its connection died).
  void forget(uint64_t owner);
  size_t held() const { return held_.size(); }
  size_t waiting() const { return waiting_.size(); }

 private:
  struct Range {
    uint64_t first, last, owner;
  };
  static bool overlaps(const Range& a, uint64_t first, uint64_t last) {
    return a.first <= last && first <= a.last;
  }
  bool free(uint64_t first, uint64_t last, size_t waiters_before) const;
  std::vector<Range> held_;
  std::deque<Range> waiting_;
};

}  // namespace storage
