// The node agent's bounded cache of generation chunks: what the node read
// of its generation, kept to serve peers and re-reads. Never a node's own
// changes (the planner sends those to the view), so anything in here may be
// served to any node on the same generation.
//
// Fetches coalesce: the first reader of a missing chunk claims it and
// fetches; later readers (the kernel's or peers') wait for that fetch.
// Thread-safe.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "node/chunk_arena.hpp"

namespace node {

using ChunkBytes = std::shared_ptr<const Chunk>;

class ChunkCache {
 public:
  explicit ChunkCache(uint64_t limit_bytes) : limit_(limit_bytes) {}

  uint64_t limit() const { return limit_; }
  uint64_t bytes() const;
  size_t chunks() const;

  // The chunk if held. Else, when nobody fetches it, claims the fetch
  // (*claimed = true: the caller must put() or abandon() it); when someone
  // does, waits for that fetch up to timeout_ms and returns its result
  // (nullptr if it failed or took too long: the caller may claim again).
  ChunkBytes get_or_claim(uint64_t chunk, int timeout_ms, bool* claimed);
  // The chunk if held, waiting up to timeout_ms for a fetch in flight;
  // never claims (a peer's request does not make this node fetch).
  ChunkBytes get(uint64_t chunk, int timeout_ms);

  // Ends a claim with the chunk's bytes: kept (evicting the least recently
  // used chunks past the limit) and handed to the waiters.
  void put(uint64_t chunk, ChunkBytes data);
  // Ends a claim without bytes; waiters wake and retry.
  void abandon(uint64_t chunk);
  // Drops everything held (an admin's request, or before memory tests).
  void clear();

  // Times a thread waiting for a chunk on its way was woken (each fetch
  // wakes only its own chunk's waiters).
  uint64_t wakeups() const;

  // Chunks evicted since the last call (for the tracker).
  std::vector<uint64_t> take_dropped();
  // Chunks held now.
  std::vector<uint64_t> held() const;

 private:
  struct Entry {
    ChunkBytes data;
    std::list<uint64_t>::iterator lru;
  };
  // A fetch in flight; its waiters sleep on its own condition, so a chunk
  // that arrives wakes nobody who waits for another one.
  struct Fetch {
    std::condition_variable done;
  };
  void evict_locked();
  // The chunk if held, made the most recent; nullptr if not. mu_ held.
  ChunkBytes touch_locked(uint64_t chunk);
  // Waits until the fetch `f` of `chunk` ends or `deadline`; false on the
  // deadline. mu_ held (by lk).
  bool wait_fetch_locked(std::unique_lock<std::mutex>& lk, uint64_t chunk,
                         const std::shared_ptr<Fetch>& f,
                         std::chrono::steady_clock::time_point deadline);
  // Ends the fetch of `chunk` (mu_ held); the caller wakes its waiters.
  std::shared_ptr<Fetch> end_fetch_locked(uint64_t chunk);

  const uint64_t limit_;
  mutable std::mutex mu_;
  std::unordered_map<uint64_t, Entry> held_;
  std::list<uint64_t> lru_;  // front: most recent
  std::unordered_map<uint64_t, std::shared_ptr<Fetch>> fetching_;
  uint64_t wakeups_ = 0;
  uint64_t bytes_ = 0;
  std::vector<uint64_t> dropped_;
};

}  // namespace node
