#include "io/buffer_pool.hpp"

#include <bit>
#include <cstdlib>

namespace io {
namespace {
constexpr size_t kMinBuffer = 4096;
int size_class(size_t cap) { return std::countr_zero(cap); }
}  // namespace

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    release();
    pool_ = o.pool_;
    data_ = o.data_;
    cap_ = o.cap_;
    o.pool_ = nullptr;
    o.data_ = nullptr;
    o.cap_ = 0;
  }
  return *this;
}

void Buffer::release() {
  if (data_) pool_->put(data_, cap_);
  data_ = nullptr;
  cap_ = 0;
  pool_ = nullptr;
}

BufferPool::~BufferPool() {
  for (auto& list : free_)
    for (uint8_t* d : list) std::free(d);
}

Buffer BufferPool::get(size_t size) {
  size_t cap = std::bit_ceil(size < kMinBuffer ? kMinBuffer : size);
  auto& list = free_[size_class(cap)];
  if (!list.empty()) {
    uint8_t* d = list.back();
    list.pop_back();
    return Buffer(this, d, cap);
  }
  void* d = std::aligned_alloc(kMinBuffer, cap);
  if (!d) return Buffer();
  return Buffer(this, static_cast<uint8_t*>(d), cap);
}

void BufferPool::put(uint8_t* d, size_t cap) {
  auto& list = free_[size_class(cap)];
  if ((list.size() + 1) * cap <= keep_bytes_) {
    list.push_back(d);
  } else {
    std::free(d);
  }
}

}  // namespace io
