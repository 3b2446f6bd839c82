// Page-aligned I/O buffers in power-of-two size classes, recycled per loop.
// Not thread-safe: each loop thread owns one pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace io {

class BufferPool;

// Move-only owner of one pooled buffer; returns it to the pool on destruction.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept;
  ~Buffer() { release(); }
  uint8_t* data() const { return data_; }
  size_t capacity() const { return cap_; }
  explicit operator bool() const { return data_ != nullptr; }
  void release();

 private:
  friend class BufferPool;
  Buffer(BufferPool* p, uint8_t* d, size_t c) : pool_(p), data_(d), cap_(c) {}
  BufferPool* pool_ = nullptr;
  uint8_t* data_ = nullptr;
  size_t cap_ = 0;
};

class BufferPool {
 public:
  // Keeps at most `keep_bytes` of idle buffers per size class.
  explicit BufferPool(size_t keep_bytes = 8 << 20) : keep_bytes_(keep_bytes) {}
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // A buffer of at least `size` bytes (at least 4 KiB), or an empty Buffer
  // when memory is exhausted.
  Buffer get(size_t size);

 private:
  friend class Buffer;
  void put(uint8_t* d, size_t cap);
  static constexpr int kClasses = 40;
  std::vector<uint8_t*> free_[kClasses];
  size_t keep_bytes_;
};

}  // namespace io
