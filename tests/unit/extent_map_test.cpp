// ExtentMap against a trivial reference: one BlockState per block in a vector.
#include "storage/extent_map.hpp"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace storage {
namespace {

constexpr uint64_t kBlocks = 512;

std::vector<Extent> reference_extents(const std::vector<BlockState>& ref, uint64_t first,
                                      uint64_t last) {
  std::vector<Extent> out;
  for (uint64_t b = first; b < last; ++b) {
    if (!out.empty() && out.back().state == ref[b]) {
      out.back().length++;
    } else {
      out.push_back({1, ref[b]});
    }
  }
  return out;
}

void expect_same(const std::vector<Extent>& a, const std::vector<Extent>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].length, b[i].length) << "extent " << i;
    EXPECT_EQ(a[i].state, b[i].state) << "extent " << i;
  }
}

TEST(ExtentMap, EmptyMapIsOneHole) {
  ExtentMap m;
  auto e = m.extents(10, 20, 100);
  ASSERT_EQ(e.size(), 1u);
  EXPECT_EQ(e[0].length, 10u);
  EXPECT_EQ(e[0].state, BlockState::kHole);
}

TEST(ExtentMap, NeighboursOfOneStateMerge) {
  ExtentMap m;
  m.set(0, 10, BlockState::kData);
  m.set(10, 20, BlockState::kData);
  m.set(30, 40, BlockState::kData);
  m.set(20, 30, BlockState::kData);
  EXPECT_EQ(m.ranges(), 1u);
  m.set(5, 6, BlockState::kHole);
  EXPECT_EQ(m.ranges(), 2u);
  EXPECT_EQ(m.get(5), BlockState::kHole);
  EXPECT_EQ(m.get(6), BlockState::kData);
}

TEST(ExtentMap, ExtentsAreCappedToAPrefix) {
  ExtentMap m;
  for (uint64_t b = 0; b < 100; b += 2) m.set(b, b + 1, BlockState::kData);
  auto e = m.extents(0, 100, 3);
  ASSERT_EQ(e.size(), 3u);
  EXPECT_EQ(e[0].state, BlockState::kData);
  EXPECT_EQ(e[1].state, BlockState::kHole);
}

TEST(ExtentMap, MatchesReferenceOverRandomOperations) {
  for (unsigned seed = 1; seed <= 300; ++seed) {
    std::mt19937_64 rng(seed);
    ExtentMap m;
    std::vector<BlockState> ref(kBlocks, BlockState::kHole);
    for (int step = 0; step < 200; ++step) {
      uint64_t a = rng() % kBlocks, b = rng() % (kBlocks + 1);
      if (a > b) std::swap(a, b);
      auto s = BlockState(rng() % 3);
      m.set(a, b, s);
      for (uint64_t i = a; i < b; ++i) ref[i] = s;
      uint64_t q0 = rng() % kBlocks, q1 = rng() % (kBlocks + 1);
      if (q0 > q1) std::swap(q0, q1);
      if (q0 == q1) continue;
      SCOPED_TRACE("seed " + std::to_string(seed) + " step " + std::to_string(step));
      expect_same(m.extents(q0, q1, kBlocks), reference_extents(ref, q0, q1));
      EXPECT_EQ(m.get(q0), ref[q0]);
      if (HasFailure()) return;
    }
  }
}

}  // namespace
}  // namespace storage
