// Little-endian fixed-offset fields, CRC-32 and the tags' hash, for the
// on-disk formats of storage/ (layer files, the map log).
#pragma once

#include <boost/crc.hpp>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace storage::le {

template <typename T>
void put(std::string& s, size_t off, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) s[off + i] = char((uint64_t(v) >> (8 * i)) & 0xff);
}
template <typename T>
T get(const uint8_t* p, size_t off) {
  uint64_t v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= uint64_t(p[off + i]) << (8 * i);
  return T(v);
}

// CRC-32 (as zlib's) of a, then b.
inline uint32_t crc32(const void* a, size_t na, const void* b = nullptr, size_t nb = 0) {
  boost::crc_32_type c;
  c.process_bytes(a, na);
  if (nb) c.process_bytes(b, nb);
  return c.checksum();
}

// FNV-1a over `s`, with the offset basis our formats have always used
// (generation tags are stored in layer files, so it stays as it is).
inline uint64_t fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

}  // namespace storage::le
