#include "storage/extent_map.hpp"

#include <algorithm>

namespace storage {

void ExtentMap::split_at(uint64_t block) {
  auto it = map_.upper_bound(block);
  if (it == map_.begin()) return;
  --it;
  if (it->first < block && it->second.last > block) {
    Range tail = it->second;
    it->second.last = block;
    map_.emplace(block, tail);
  }
}

void ExtentMap::set(uint64_t first, uint64_t last, BlockState state) {
  if (first >= last) return;
  split_at(first);
  split_at(last);
  map_.erase(map_.lower_bound(first), map_.lower_bound(last));
  if (state == BlockState::kHole) return;
  auto it = map_.emplace(first, Range{last, state}).first;
  // Merge with the following range, then with the preceding one.
  auto next = std::next(it);
  if (next != map_.end() && next->first == last && next->second.state == state) {
    it->second.last = next->second.last;
    map_.erase(next);
  }
  if (it != map_.begin()) {
    auto prev = std::prev(it);
    if (prev->second.last == first && prev->second.state == state) {
      prev->second.last = it->second.last;
      map_.erase(it);
    }
  }
}

BlockState ExtentMap::get(uint64_t block) const {
  auto it = map_.upper_bound(block);
  if (it == map_.begin()) return BlockState::kHole;
  --it;
  return block < it->second.last ? it->second.state : BlockState::kHole;
}

std::vector<Extent> ExtentMap::extents(uint64_t first, uint64_t last, size_t max_extents) const {
  std::vector<Extent> out;
  auto push = [&](uint64_t len, BlockState s) {
    if (!out.empty() && out.back().state == s) {
      out.back().length += len;
    } else {
      out.push_back({len, s});
    }
  };
  auto it = map_.upper_bound(first);
  if (it != map_.begin() && std::prev(it)->second.last > first) --it;
  uint64_t pos = first;
  while (pos < last && out.size() <= max_extents) {
    if (it == map_.end() || it->first >= last) {
      push(last - pos, BlockState::kHole);
      pos = last;
      break;
    }
    if (it->first > pos) {
      push(it->first - pos, BlockState::kHole);
      pos = it->first;
    }
    uint64_t end = std::min(it->second.last, last);
    push(end - pos, it->second.state);
    pos = end;
    ++it;
  }
  if (out.size() > max_extents) out.resize(max_extents);
  return out;
}

}  // namespace storage
