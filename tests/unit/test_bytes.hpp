// Big-endian helpers for tests, written independently of protocol/wire.hpp
// so that a wrong helper there makes the tests fail instead of agreeing.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace nbd::testing {

inline std::string be(uint64_t v, int bytes) {
  std::string s;
  for (int i = bytes - 1; i >= 0; --i) s.push_back(char((v >> (8 * i)) & 0xff));
  return s;
}
inline std::string be16(uint16_t v) { return be(v, 2); }
inline std::string be32(uint32_t v) { return be(v, 4); }

inline uint64_t rd(std::string_view s, size_t off, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = v << 8 | uint8_t(s.at(off + i));
  return v;
}

}  // namespace nbd::testing
