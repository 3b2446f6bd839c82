#include "node/chunk_cache.hpp"

#include <chrono>
#include <utility>

namespace node {

uint64_t ChunkCache::bytes() const {
  std::lock_guard<std::mutex> g(mu_);
  return bytes_;
}

size_t ChunkCache::chunks() const {
  std::lock_guard<std::mutex> g(mu_);
  return held_.size();
}

ChunkBytes ChunkCache::touch_locked(uint64_t chunk) {
  auto it = held_.find(chunk);
  if (it == held_.end()) return nullptr;
  lru_.splice(lru_.begin(), lru_, it->second.lru);
  return it->second.data;
}

bool ChunkCache::wait_fetch_locked(std::unique_lock<std::mutex>& lk, uint64_t chunk,
                                   const std::shared_ptr<Fetch>& f,
                                   std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    auto it = fetching_.find(chunk);
    if (it == fetching_.end() || it->second != f) return true;
    if (f->done.wait_until(lk, deadline) == std::cv_status::timeout) {
      it = fetching_.find(chunk);
      return it == fetching_.end() || it->second != f;
    }
    ++wakeups_;
  }
}

ChunkBytes ChunkCache::get_or_claim(uint64_t chunk, int timeout_ms, bool* claimed) {
  *claimed = false;
  std::unique_lock<std::mutex> lk(mu_);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (ChunkBytes d = touch_locked(chunk)) return d;
    auto it = fetching_.find(chunk);
    if (it == fetching_.end()) {
      fetching_.emplace(chunk, std::make_shared<Fetch>());
      *claimed = true;
      return nullptr;
    }
    const std::shared_ptr<Fetch> f = it->second;
    if (!wait_fetch_locked(lk, chunk, f, deadline)) return touch_locked(chunk);
  }
}

ChunkBytes ChunkCache::get(uint64_t chunk, int timeout_ms) {
  std::unique_lock<std::mutex> lk(mu_);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    if (ChunkBytes d = touch_locked(chunk)) return d;
    auto it = fetching_.find(chunk);
    if (it == fetching_.end()) return nullptr;
    const std::shared_ptr<Fetch> f = it->second;
    if (!wait_fetch_locked(lk, chunk, f, deadline)) return nullptr;
  }
}

std::shared_ptr<ChunkCache::Fetch> ChunkCache::end_fetch_locked(uint64_t chunk) {
  auto it = fetching_.find(chunk);
  if (it == fetching_.end()) return nullptr;
  std::shared_ptr<Fetch> f = std::move(it->second);
  fetching_.erase(it);
  return f;
}

void ChunkCache::put(uint64_t chunk, ChunkBytes data) {
  std::shared_ptr<Fetch> f;
  {
    std::lock_guard<std::mutex> g(mu_);
    f = end_fetch_locked(chunk);
    if (limit_ && data && data->size() <= limit_ && !held_.count(chunk)) {
      lru_.push_front(chunk);
      bytes_ += data->size();
      held_[chunk] = Entry{std::move(data), lru_.begin()};
      evict_locked();
    }
  }
  if (f) f->done.notify_all();
}

void ChunkCache::abandon(uint64_t chunk) {
  std::shared_ptr<Fetch> f;
  {
    std::lock_guard<std::mutex> g(mu_);
    f = end_fetch_locked(chunk);
  }
  if (f) f->done.notify_all();
}

uint64_t ChunkCache::wakeups() const {
  std::lock_guard<std::mutex> g(mu_);
  return wakeups_;
}

void ChunkCache::clear() {
  std::lock_guard<std::mutex> g(mu_);
  for (auto& [c, e] : held_) dropped_.push_back(c);
  held_.clear();
  lru_.clear();
  bytes_ = 0;
}

void ChunkCache::evict_locked() {
  while (bytes_ > limit_ && !lru_.empty()) {
    uint64_t victim = lru_.back();
    lru_.pop_back();
    auto it = held_.find(victim);
    bytes_ -= it->second.data->size();
    held_.erase(it);
    dropped_.push_back(victim);
  }
}

std::vector<uint64_t> ChunkCache::take_dropped() {
  std::lock_guard<std::mutex> g(mu_);
  return std::exchange(dropped_, {});
}

std::vector<uint64_t> ChunkCache::held() const {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<uint64_t> out;
  out.reserve(held_.size());
  for (auto& [c, e] : held_) out.push_back(c);
  return out;
}

}  // namespace node
