// How the node agent answers a read: which bytes come from the node's view
// on the server (blocks the node changed) and which from chunks of its
// immutable generation (the chunk cache, a peer or the server). Pure.
#pragma once

#include <cstdint>
#include <vector>

#include <roaring/roaring.hh>

namespace node {

struct Piece {
  enum Source { kView, kChunk };
  Source src;
  uint64_t off;    // in the export
  uint64_t len;
  uint64_t chunk;  // kChunk: the chunk holding [off, off + len)
};

// Blocks (of `block_size` bytes) a node changed: written, trimmed or zeroed,
// by itself or before the agent started (the server's nbdroot:dirty).
// Not thread-safe; the agent guards it.
class DirtyBlocks {
 public:
  explicit DirtyBlocks(uint32_t block_size) : bs_(block_size) {}
  uint32_t block_size() const { return bs_; }
  // Marks every block that [off, off + len) touches.
  void mark(uint64_t off, uint64_t len);
  bool any(uint64_t off, uint64_t len) const;
  uint64_t count() const { return map_.cardinality(); }

  // Splits [off, off + len) into runs: changed blocks to kView, the rest
  // cut at chunk boundaries to kChunk. Adjacent view runs merge.
  std::vector<Piece> plan(uint64_t off, uint64_t len, uint32_t chunk_size) const;

 private:
  uint32_t bs_;
  Roaring map_;
};

}  // namespace node
