// Allocation state of a file, kept in memory as sorted block ranges.
//
// Three states per block: hole (unallocated, reads as zeros), zero (allocated
// and known to read as zeros) and data. Holes are the ranges absent from the
// map; neighbouring ranges of one state are merged. Not thread-safe: the
// owner serialises access.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

namespace storage {

enum class BlockState : uint8_t { kHole, kZero, kData };

// A run of one state (in whatever unit the producer says).
struct Extent {
  uint64_t length;
  BlockState state;
};

class ExtentMap {
 public:
  // Sets blocks [first, last) to `state`.
  void set(uint64_t first, uint64_t last, BlockState state);
  BlockState get(uint64_t block) const;
  // Extents covering blocks [first, last), in block units, neighbours of
  // one state merged, at most `max_extents` of them (covering a prefix).
  std::vector<Extent> extents(uint64_t first, uint64_t last, size_t max_extents) const;
  size_t ranges() const { return map_.size(); }

 private:
  struct Range {
    uint64_t last;
    BlockState state;
  };
  void split_at(uint64_t block);
  std::map<uint64_t, Range> map_;  // first block -> range
};

}  // namespace storage
