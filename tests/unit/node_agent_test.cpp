// The node agent's pure parts: the read planner against a model, and the
// chunk cache's claims, waiters and bound.
#include <gtest/gtest.h>

#include <sys/mman.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <chrono>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "node/chunk_arena.hpp"
#include "node/chunk_cache.hpp"
#include "node/read_plan.hpp"

namespace {

using node::ChunkBytes;
using node::ChunkCache;
using node::DirtyBlocks;
using node::Piece;

ChunkBytes bytes(size_t n, uint8_t v) {
  static node::ChunkArena heap(0, 0);
  std::shared_ptr<node::Chunk> c = heap.make(n);
  memset(c->data(), v, n);
  return c;
}

// Every byte of a read comes from the view exactly when its block is
// changed; chunk pieces never cross a chunk; pieces tile the range in order.
TEST(ReadPlan, MatchesAModelOfChangedBlocks) {
  std::mt19937_64 rng(20261204);
  for (uint32_t bs : {512u, 4096u}) {
    const uint32_t cs = 65536;
    const uint64_t size = 4 << 20;
    for (int round = 0; round < 300; ++round) {
      DirtyBlocks d(bs);
      std::vector<bool> model(size / bs);
      int marks = int(rng() % 20);
      for (int i = 0; i < marks; ++i) {
        uint64_t off = rng() % size;
        uint64_t len = 1 + rng() % std::min<uint64_t>(size - off, 300000);
        d.mark(off, len);
        for (uint64_t b = off / bs; b <= (off + len - 1) / bs; ++b) model[b] = true;
      }
      for (int q = 0; q < 20; ++q) {
        uint64_t off = rng() % size;
        uint64_t len = 1 + rng() % std::min<uint64_t>(size - off, 1 << 20);
        auto plan = d.plan(off, len, cs);
        uint64_t pos = off;
        bool any = false;
        for (const Piece& p : plan) {
          ASSERT_EQ(p.off, pos);
          ASSERT_GT(p.len, 0u);
          if (p.src == Piece::kChunk) {
            ASSERT_EQ(p.chunk, p.off / cs);
            ASSERT_LE(p.off + p.len, (p.chunk + 1) * cs) << "a chunk piece crosses its chunk";
          }
          for (uint64_t b = p.off / bs; b <= (p.off + p.len - 1) / bs; ++b) {
            ASSERT_EQ(model[b], p.src == Piece::kView) << "block " << b;
            any |= model[b];
          }
          pos += p.len;
        }
        ASSERT_EQ(pos, off + len);
        ASSERT_EQ(d.any(off, len), any);
      }
    }
  }
}

TEST(ReadPlan, AdjacentChangedRunsMergeAcrossChunks) {
  DirtyBlocks d(4096);
  d.mark(60 * 1024, 8192);  // blocks 15 and 16: the end of chunk 0, the start of chunk 1
  auto plan = d.plan(0, 131072, 65536);
  ASSERT_EQ(plan.size(), 3u);
  EXPECT_EQ(plan[0].src, Piece::kChunk);
  EXPECT_EQ(plan[0].len, 60u * 1024);
  EXPECT_EQ(plan[1].src, Piece::kView);
  EXPECT_EQ(plan[1].off, 60u * 1024);
  EXPECT_EQ(plan[1].len, 8192u);
  EXPECT_EQ(plan[2].src, Piece::kChunk);
  EXPECT_EQ(plan[2].chunk, 1u);
}

TEST(ChunkCache, FirstReaderClaimsLaterOnesWaitForIt) {
  ChunkCache cache(1 << 20);
  bool claimed = false;
  EXPECT_EQ(cache.get_or_claim(7, 1000, &claimed), nullptr);
  EXPECT_TRUE(claimed);
  std::atomic<int> got{0};
  std::vector<std::thread> waiters;
  for (int i = 0; i < 4; ++i)
    waiters.emplace_back([&] {
      bool c2 = true;
      ChunkBytes b = cache.get_or_claim(7, 10000, &c2);
      if (b && !c2 && b->data()[0] == 0xab) ++got;
    });
  std::thread peer([&] {
    ChunkBytes b = cache.get(7, 10000);  // a peer's request waits too
    if (b && b->data()[0] == 0xab) ++got;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  cache.put(7, bytes(65536, 0xab));
  for (auto& t : waiters) t.join();
  peer.join();
  EXPECT_EQ(got, 5);
}

TEST(ChunkCache, AChunkThatArrivesWakesOnlyItsOwnWaiters) {
  // In a storm a node's readers, prefetchers and peers wait for many chunks
  // on their way at once; each arrival used to wake them all.
  ChunkCache cache(64 << 20);
  bool claimed = false;
  cache.get_or_claim(1, 1000, &claimed);
  ASSERT_TRUE(claimed);
  std::vector<std::thread> waiters;
  std::atomic<int> got{0};
  for (int i = 0; i < 4; ++i)
    waiters.emplace_back([&] {
      if (ChunkBytes b = cache.get(1, 20000); b && b->data()[0] == 0x11) ++got;
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  for (uint64_t c = 2; c < 202; ++c) {
    cache.get_or_claim(c, 1000, &claimed);
    ASSERT_TRUE(claimed);
    if (c % 2)
      cache.put(c, bytes(65536, 0x22));
    else
      cache.abandon(c);
  }
  cache.put(1, bytes(65536, 0x11));
  for (auto& t : waiters) t.join();
  EXPECT_EQ(got, 4);
  // One wake each for chunk 1 (and a spurious one at most, now and then).
  EXPECT_LE(cache.wakeups(), 8u);
}

TEST(ChunkCache, AnAbandonedFetchLetsAWaiterClaim) {
  ChunkCache cache(1 << 20);
  bool claimed = false;
  cache.get_or_claim(3, 1000, &claimed);
  ASSERT_TRUE(claimed);
  std::thread t([&] { cache.abandon(3); });
  bool c2 = false;
  ChunkBytes b;
  for (int i = 0; i < 100 && !c2; ++i) b = cache.get_or_claim(3, 5000, &c2);
  t.join();
  EXPECT_TRUE(c2);
  EXPECT_EQ(b, nullptr);
  EXPECT_EQ(cache.get(3, 0), nullptr);  // a peer is never told a chunk it lacks
}

TEST(ChunkCache, StaysWithinItsLimitAndReportsWhatItDropped) {
  ChunkCache cache(4 * 65536);
  for (uint64_t c = 0; c < 10; ++c) {
    bool claimed = false;
    cache.get_or_claim(c, 0, &claimed);
    ASSERT_TRUE(claimed);
    cache.put(c, bytes(65536, uint8_t(c)));
    bool again = false;
    if (c == 5) cache.get_or_claim(2, 0, &again);  // 2 was dropped already
    if (c >= 1 && c <= 3) cache.get(0, 0);        // keeps 0 recent
    EXPECT_LE(cache.bytes(), 4u * 65536);
  }
  auto held = cache.held();
  EXPECT_EQ(held.size(), 4u);
  auto dropped = cache.take_dropped();
  EXPECT_EQ(dropped.size() + held.size(), 10u);
  EXPECT_TRUE(cache.take_dropped().empty());
}

TEST(ChunkCache, ZeroLimitKeepsNothing) {
  ChunkCache cache(0);
  bool claimed = false;
  cache.get_or_claim(1, 0, &claimed);
  cache.put(1, bytes(100, 1));
  EXPECT_EQ(cache.bytes(), 0u);
  EXPECT_EQ(cache.get(1, 0), nullptr);
}

}  // namespace

namespace {

// Slots go lowest first and come back when the last holder lets go; past
// the mapping, chunks come from the heap; every chunk's bytes are its own.
TEST(ChunkArena, SlotsAreReusedAndTheHeapTakesTheOverflow) {
  const uint32_t cs = 65536;
  node::ChunkArena arena(4 * cs, cs);
  ASSERT_TRUE(arena.mapped());
  const size_t n = arena.slots();
  ASSERT_GE(n, 4u);
  std::vector<std::shared_ptr<node::Chunk>> held;
  for (size_t i = 0; i < n + 3; ++i) {
    held.push_back(arena.make(i % 2 ? cs : 100));
    memset(held.back()->data(), int(i), held.back()->size());
  }
  EXPECT_EQ(arena.slots_in_use(), n);
  for (size_t i = 1; i < n; ++i) EXPECT_EQ(held[i]->data(), held[0]->data() + i * cs) << i;
  for (size_t i = 0; i < held.size(); ++i)
    for (size_t k = 0; k < held[i]->size(); k += 997) ASSERT_EQ(held[i]->data()[k], uint8_t(i));
  const uint8_t* third = held[2]->data();
  held[2].reset();
  EXPECT_EQ(arena.slots_in_use(), n - 1);
  EXPECT_EQ(arena.make(cs)->data(), third);  // the freed slot, while still mapped
  EXPECT_EQ(arena.slots_in_use(), n - 1);    // ...and back again
  auto big = arena.make(cs + 1);             // larger than a slot: the heap
  memset(big->data(), 7, big->size());
  EXPECT_EQ(arena.slots_in_use(), n - 1);
  held.clear();
  EXPECT_EQ(arena.slots_in_use(), 0u);
}

// A chunk outlives the arena that made it (a reader still sending it).
TEST(ChunkArena, AChunkKeepsItsMemoryAfterTheArenaIsGone) {
  std::shared_ptr<node::Chunk> c;
  {
    node::ChunkArena arena(1 << 20, 65536);
    c = arena.make(65536);
  }
  memset(c->data(), 0x5a, c->size());
  EXPECT_EQ(c->data()[65535], 0x5a);
}

// The VmFlags line of the mapping holding `p`, from /proc/self/smaps.
std::string vm_flags_of(const void* p) {
  std::ifstream in("/proc/self/smaps");
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::string line;
  bool inside = false;
  while (std::getline(in, line)) {
    uintptr_t lo = 0, hi = 0;
    if (sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find(':') > line.find(' ')) {
      inside = lo <= a && a < hi;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line;
    }
  }
  return "";
}

// The cache's memory is one mapping that asks for huge pages when told to
// (touching it then does not fault page by page), and for none when not
// (--huge-pages off, the default: see chunk_arena.hpp).
TEST(ChunkArena, TheMappingAsksForHugePagesOnlyWhenTold) {
  node::ChunkArena huge(8 << 20, 65536, true);
  ASSERT_TRUE(huge.mapped());
  auto c = huge.make(65536);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(c->data()) % (2 << 20), 0u) << "slots start on a 2 MiB boundary";
  const std::string hf = vm_flags_of(c->data());
  EXPECT_NE(hf.find(" hg"), std::string::npos) << hf;
  node::ChunkArena small(8 << 20, 65536, false);
  ASSERT_TRUE(small.mapped());
  auto d = small.make(65536);
  const std::string sf = vm_flags_of(d->data());
  EXPECT_NE(sf.find(" nh"), std::string::npos) << sf;
  EXPECT_EQ(sf.find(" hg"), std::string::npos) << sf;
}

}  // namespace
