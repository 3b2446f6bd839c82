#include "node/chunk_arena.hpp"

#include <spdlog/spdlog.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>

namespace node {

namespace {
constexpr uint64_t kHuge = 2 << 20;
constexpr uint32_t kSpareSlots = 64;  // chunks evicted while a reader still sends them
}  // namespace

// The mapping and its free slots; unmapped when the last Chunk and the
// arena are gone.
struct Chunk::Slots {
  uint8_t* base = nullptr;
  size_t map_len = 0;
  uint32_t chunk_size = 0;
  uint32_t count = 0;
  mutable std::mutex mu;
  std::vector<uint32_t> free;  // back: the next handed out

  ~Slots() {
    if (base) munmap(base, map_len);
  }
};

Chunk::~Chunk() {
  if (!slots_) {
    delete[] data_;
    return;
  }
  std::lock_guard<std::mutex> g(slots_->mu);
  slots_->free.push_back(slot_);
}

ChunkArena::ChunkArena(uint64_t bytes, uint32_t chunk_size, bool huge) : slots_(std::make_shared<Chunk::Slots>()) {
  slots_->chunk_size = chunk_size;
  if (bytes == 0 || chunk_size == 0) return;
  const uint64_t count = (bytes + chunk_size - 1) / chunk_size + kSpareSlots;
  const uint64_t len = (count * chunk_size + kHuge - 1) / kHuge * kHuge;
  // Reserved one huge page more, to start the slots on a 2 MiB boundary.
  void* p = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    spdlog::warn("chunk memory: mmap of {} MiB: {}; chunks come from the heap", len >> 20,
                 strerror(errno));
    return;
  }
  uint8_t* base = static_cast<uint8_t*>(p);
  uint8_t* aligned = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(base) + kHuge - 1) &
                                                ~uintptr_t(kHuge - 1));
  if (aligned > base) munmap(base, size_t(aligned - base));
  uint8_t* end = base + len + kHuge;
  if (end > aligned + len) munmap(aligned + len, size_t(end - (aligned + len)));
  if (madvise(aligned, len, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0)
    spdlog::debug("chunk memory: madvise({}): {}", huge ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE",
                  strerror(errno));
  slots_->base = aligned;
  slots_->map_len = len;
  slots_->count = uint32_t(len / chunk_size);
  slots_->free.reserve(slots_->count);
  for (uint32_t i = slots_->count; i > 0; --i) slots_->free.push_back(i - 1);
}

std::shared_ptr<Chunk> ChunkArena::make(size_t size) {
  if (size <= slots_->chunk_size && slots_->base) {
    std::lock_guard<std::mutex> g(slots_->mu);
    if (!slots_->free.empty()) {
      const uint32_t slot = slots_->free.back();
      slots_->free.pop_back();
      uint8_t* at = slots_->base + uint64_t(slot) * slots_->chunk_size;
      return std::shared_ptr<Chunk>(new Chunk(at, size, slots_, slot));
    }
  }
  return std::shared_ptr<Chunk>(new Chunk(new uint8_t[size], size, nullptr, 0));
}

size_t ChunkArena::slots() const { return slots_->count; }

size_t ChunkArena::slots_in_use() const {
  std::lock_guard<std::mutex> g(slots_->mu);
  return slots_->count - slots_->free.size();
}

bool ChunkArena::mapped() const { return slots_->base != nullptr; }

}  // namespace node
