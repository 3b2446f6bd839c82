// Transmission phase, sans I/O: request headers in, verdicts and reply bytes out.
//
// A request goes through three steps (STYLE.md): parse_request() decodes the
// header, validate() either accepts it or names the error reply, and the
// encoders below build the reply. The execute step in server/ asserts what
// validate() guaranteed.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "protocol/handshake.hpp"
#include "protocol/wire.hpp"

namespace nbd {

struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint64_t length = 0;  // 32-bit on the wire unless extended headers
};

enum class Parse { kNeedMore, kOk, kBadMagic };

// Decodes one request header from p[0, n). With `extended` the header is the
// 32-byte extended form, else the 28-byte compact one. On kOk, *used is the
// header size.
Parse parse_request(const uint8_t* p, size_t n, bool extended, Request* req, size_t* used);

// Bytes of payload that follow the header on the wire.
uint64_t payload_length(const Request& req, bool extended);

struct Verdict {
  Error error = kOk;
  std::string why;  // for the log and the structured error message
  bool ok() const { return error == kOk; }
};

// Checks a request against the session: command, flags, range, permissions
// and sizes. Pure; never touches storage.
Verdict validate(const Request& req, const Session& s);

// Largest payload the connection drains to keep the stream in step after a
// rejected request; a larger declared payload closes the connection.
inline constexpr uint64_t kMaxDrain = 0xffffffffULL;

// ---- Reply encoders. Each writes into `out` and returns the byte count. ----
// Buffers must hold kMaxReplyHeader bytes.
inline constexpr size_t kMaxReplyHeader = 64;

size_t encode_simple_reply(uint8_t* out, uint64_t cookie, uint32_t error);

// A structured (20-byte) or extended (32-byte) chunk header.
size_t encode_chunk_header(uint8_t* out, bool extended, uint16_t flags, uint16_t type,
                           uint64_t cookie, uint64_t offset, uint64_t payload_len);

// Header of a final NBD_REPLY_TYPE_OFFSET_DATA chunk, including the 8-byte
// offset; the `len` data bytes follow it on the wire.
size_t encode_read_header(uint8_t* out, const Session& s, const Request& req, uint64_t len);

// The reply to a successful request that carries no data: a simple reply
// when the session allows one, else an NBD_REPLY_TYPE_NONE chunk.
size_t encode_ok(uint8_t* out, const Session& s, const Request& req);

// The whole reply for a request with no data: simple reply when the session
// allows one, else an NBD_REPLY_TYPE_NONE chunk. Errors carry `why` in an
// NBD_REPLY_TYPE_ERROR chunk when structured replies are on.
std::string encode_done(const Session& s, const Request& req, Error error, std::string_view why);

// One extent of a metadata context.
struct Extent {
  uint64_t length;
  uint32_t flags;
};

// An NBD_REPLY_TYPE_BLOCK_STATUS (or _EXT) chunk for one context. `last`
// sets NBD_REPLY_FLAG_DONE.
std::string encode_block_status(const Session& s, const Request& req, uint32_t context_id,
                                std::span<const Extent> extents, bool last);

}  // namespace nbd
