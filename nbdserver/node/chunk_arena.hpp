// Memory for the node agent's chunks: one mapping reserved at start for the
// chunk cache's limit, carved into fixed slots, so that a freed slot is
// reused while still mapped (no fault, no zeroing again).
//
// Huge pages are optional (`huge`, the agent's --huge-pages, off by
// default). On: MADV_HUGEPAGE, one fault per 2 MiB instead of 16 per 64 KiB
// chunk; that pays where faults are dear (about 15 us each on a
// paravirtualised TCG guest). Off: MADV_NOHUGEPAGE. Off is the default
// because a fresh huge page is dear where the host takes freed guest memory
// back (free page reporting in VMs): a new 2 MiB page is then mostly memory
// the host must fault in again. On the bench host, first-touch zeroing ran
// at 0.17 GB/s in huge pages against 1.9 GB/s in 4 KiB pages (which come
// from memory just freed), and a 50-node netstorm spent 37 % of its CPU in
// that zeroing (bench/README.md).
//
// Slots are handed out lowest first and reused most recently freed first,
// so the memory touched stays compact: RSS grows with what the cache holds
// (in 2 MiB steps with huge pages), never past the mapping. When every slot is taken
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
  // chunks in flight). bytes 0: every chunk comes from the heap. `huge`:
  // ask for transparent huge pages (else ask for none).
  ChunkArena(uint64_t bytes, uint32_t chunk_size, bool huge = false);

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
