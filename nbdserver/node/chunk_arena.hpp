// Memory for the node agent's chunks: one mapping reserved at start for the
// chunk cache's limit, in transparent huge pages, carved into fixed slots.
//
// Why: the cache fills with chunks nobody touched before, and a fresh 4 KiB
// page costs a fault (16 per 64 KiB chunk; on a paravirtualised VM about
// 15 us each, more than fetching and checking the chunk). Huge pages fault
// once per 2 MiB, and a freed slot is reused while still mapped.
//
// Slots are handed out lowest first and reused most recently freed first,
// so the memory touched stays compact: RSS grows with what the cache holds
// (in 2 MiB steps), never past the mapping. When every slot is taken
// (chunks evicted from the cache but still being sent), a chunk comes from
// the heap instead. Thread-safe; a Chunk keeps its arena alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace node {

// The bytes of one chunk; not zeroed when made.
class Chunk {
 public:
  Chunk(const Chunk&) = delete;
  Chunk& operator=(const Chunk&) = delete;
  ~Chunk();
  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  friend class ChunkArena;
  struct Slots;
  Chunk(uint8_t* data, size_t size, std::shared_ptr<Slots> slots, uint32_t slot)
      : data_(data), size_(size), slots_(std::move(slots)), slot_(slot) {}
  uint8_t* data_;
  size_t size_;
  std::shared_ptr<Slots> slots_;  // null: data_ is from the heap
  uint32_t slot_;
};

class ChunkArena {
 public:
  // Room for about `bytes` of chunks of `chunk_size` (plus a few slots for
  // chunks in flight). bytes 0: every chunk comes from the heap.
  ChunkArena(uint64_t bytes, uint32_t chunk_size);

  // A chunk of `size` bytes (<= chunk_size for a slot, any size from the
  // heap), its bytes undefined.
  std::shared_ptr<Chunk> make(size_t size);

  // Slots in the mapping, and those handed out now (tests, stats).
  size_t slots() const;
  size_t slots_in_use() const;
  // Whether the mapping exists (false when mmap failed: then the heap).
  bool mapped() const;

 private:
  std::shared_ptr<Chunk::Slots> slots_;
};

}  // namespace node
