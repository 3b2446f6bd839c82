#include "node/read_plan.hpp"

#include <algorithm>

namespace node {

void DirtyBlocks::mark(uint64_t off, uint64_t len) {
  if (!len) return;
  const uint64_t first = off / bs_;
  const uint64_t last = (off + len - 1) / bs_;
  map_.addRange(first, last + 1);
}

bool DirtyBlocks::any(uint64_t off, uint64_t len) const {
  if (!len) return false;
  const uint64_t first = off / bs_;
  const uint64_t last = (off + len - 1) / bs_;
  // rank(x) counts members <= x.
  const uint64_t before = first ? map_.rank(uint32_t(first - 1)) : 0;
  return map_.rank(uint32_t(last)) > before;
}

std::vector<Piece> DirtyBlocks::plan(uint64_t off, uint64_t len, uint32_t chunk_size) const {
  std::vector<Piece> out;
  const uint64_t end = off + len;
  uint64_t pos = off;
  while (pos < end) {
    const uint64_t block = pos / bs_;
    const bool dirty = map_.contains(uint32_t(block));
    uint64_t next = std::min(end, (block + 1) * bs_);
    if (dirty) {
      while (next < end && map_.contains(uint32_t(next / bs_))) next = std::min(end, next + bs_);
      if (!out.empty() && out.back().src == Piece::kView && out.back().off + out.back().len == pos) {
        out.back().len += next - pos;
      } else {
        out.push_back({Piece::kView, pos, next - pos, 0});
      }
    } else {
      const uint64_t chunk = pos / chunk_size;
      const uint64_t chunk_end = std::min(end, (chunk + 1) * chunk_size);
      while (next < chunk_end && !map_.contains(uint32_t(next / bs_)))
        next = std::min(chunk_end, next + bs_);
      next = std::min(next, chunk_end);
      out.push_back({Piece::kChunk, pos, next - pos, chunk});
    }
    pos = next;
  }
  return out;
}

}  // namespace node
