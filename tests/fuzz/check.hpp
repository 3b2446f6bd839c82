// CHECK for fuzz targets: an invariant that fails aborts, so libFuzzer
// records the input as a crash. Unlike assert(), it stays on in any build.
#pragma once

#include <cstdio>
#include <cstdlib>

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)

#include <algorithm>
#include <cstddef>
#include <cstdint>

// How many of `left` input bytes the next feed() gets, as the input's
// segmentation byte says: 0 = all at once, 1..127 = that many at a time,
// 128.. = pseudo-random pieces of 1 to 40 bytes (state in *rng, seeded
// from seg).
class Chunker {
 public:
  explicit Chunker(uint8_t seg) : seg_(seg), rng_(seg * 2654435761u + 1) {}
  size_t next(size_t left) {
    if (seg_ & 0x80) {
      rng_ = rng_ * 1103515245u + 12345u;
      return std::min<size_t>(left, 1 + (rng_ >> 16) % 40);
    }
    return seg_ ? std::min<size_t>(left, seg_) : left;
  }

 private:
  uint8_t seg_;
  uint32_t rng_;
};
