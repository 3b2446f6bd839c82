// Tests for protocol/transmission.{hpp,cpp}: request parsing, validation and
// reply encoding. Encoded bytes are checked against literal layouts from the
// spec with a small decoder written here, never with the encoders themselves.
#include "protocol/transmission.hpp"

#include <gtest/gtest.h>

#include "test_bytes.hpp"

#include <memory>
#include <string>
#include <vector>

namespace nbd {
namespace {

using testing::be;
using testing::rd;

const uint8_t* u8(const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); }
std::string bytes(const uint8_t* p, size_t n) { return std::string(reinterpret_cast<const char*>(p), n); }

// Literal values from the spec.
constexpr uint32_t REQ_MAGIC = 0x25609513, EXT_REQ_MAGIC = 0x21e41c71;
constexpr uint32_t SIMPLE_MAGIC = 0x67446698, STRUCT_MAGIC = 0x668e33ef, EXT_MAGIC = 0x6e8a278c;
constexpr uint16_t READ = 0, WRITE = 1, DISC = 2, FLUSH = 3, TRIM = 4, CACHE = 5, WZ = 6, BS = 7;
constexpr uint16_t F_FUA = 1, F_NO_HOLE = 2, F_DF = 4, F_REQ_ONE = 8, F_FAST_ZERO = 16, F_PAYLOAD_LEN = 32;
constexpr uint16_t T_NONE = 0, T_OFFSET_DATA = 1, T_BS = 5, T_BS_EXT = 6, T_ERROR = 0x8001;
constexpr uint16_t DONE = 1;
constexpr uint32_t E_PERM = 1, E_IO = 5, E_INVAL = 22, E_NOSPC = 28;

std::string compact_req(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t off, uint32_t len) {
  return be(REQ_MAGIC, 4) + be(flags, 2) + be(type, 2) + be(cookie, 8) + be(off, 8) + be(len, 4);
}
std::string ext_req(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t off, uint64_t len) {
  return be(EXT_REQ_MAGIC, 4) + be(flags, 2) + be(type, 2) + be(cookie, 8) + be(off, 8) + be(len, 8);
}

// ---- Reply decoder ----

struct Chunk {
  uint32_t magic = 0;
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;  // extended only
  uint64_t length = 0;
  size_t header = 0;
};

Chunk decode_chunk(const std::string& s) {
  Chunk c;
  c.magic = uint32_t(rd(s, 0, 4));
  c.flags = uint16_t(rd(s, 4, 2));
  c.type = uint16_t(rd(s, 6, 2));
  c.cookie = rd(s, 8, 8);
  if (c.magic == EXT_MAGIC) {
    c.offset = rd(s, 16, 8);
    c.length = rd(s, 24, 8);
    c.header = 32;
  } else {
    EXPECT_EQ(c.magic, STRUCT_MAGIC);
    c.length = rd(s, 16, 4);
    c.header = 20;
  }
  return c;
}

// ---- Sessions ----

constexpr uint64_t kSize = 1 << 20;
constexpr uint32_t kMaxBlock = 65536;
constexpr uint16_t kAllFlags = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendTrim |
                               kFlagSendWriteZeroes | kFlagSendCache | kFlagSendFastZero;

enum class Mode { kSimple, kStructured, kExtended };

Session make_session(Mode m, uint16_t flags = kAllFlags, uint64_t size = kSize, bool contexts = true) {
  auto e = std::make_shared<ExportInfo>();
  e->name = "disk";
  e->size = size;
  e->max_block = kMaxBlock;
  e->contexts = {"base:allocation"};
  Session s;
  s.exp = e;
  s.structured = m != Mode::kSimple;
  s.extended = m == Mode::kExtended;
  s.flags = flags | kFlagHasFlags | (s.structured ? kFlagSendDf : 0);
  if (contexts) s.contexts = {{1, "base:allocation"}};
  return s;
}

Request req(uint16_t type, uint64_t off, uint64_t len, uint16_t flags = 0, uint64_t cookie = 0x1122334455667788) {
  Request r;
  r.type = type;
  r.offset = off;
  r.length = len;
  r.flags = flags;
  r.cookie = cookie;
  return r;
}

void expect_verdict(const Request& r, const Session& s, uint32_t err) {
  Verdict v = validate(r, s);
  EXPECT_EQ(uint32_t(v.error), err) << cmd_name(r.type) << " flags=" << r.flags << " off=" << r.offset
                                    << " len=" << r.length << " why=" << v.why;
  EXPECT_EQ(v.ok(), err == 0);
  if (err) {
    EXPECT_FALSE(v.why.empty());
  }
}

// ---- parse_request ----

TEST(ParseRequest, Compact) {
  std::string b = compact_req(0x0102, WRITE, 0xa1a2a3a4a5a6a7a8ULL, 0xb1b2b3b4b5b6b7b8ULL, 0xc1c2c3c4);
  ASSERT_EQ(b.size(), 28u);
  Request r;
  size_t used = 0;
  ASSERT_EQ(parse_request(u8(b), b.size(), false, &r, &used), Parse::kOk);
  EXPECT_EQ(used, 28u);
  EXPECT_EQ(r.flags, 0x0102);
  EXPECT_EQ(r.type, WRITE);
  EXPECT_EQ(r.cookie, 0xa1a2a3a4a5a6a7a8ULL);
  EXPECT_EQ(r.offset, 0xb1b2b3b4b5b6b7b8ULL);
  EXPECT_EQ(r.length, 0xc1c2c3c4u);
}

TEST(ParseRequest, Extended) {
  std::string b = ext_req(0x0203, BS, 42, 0x8000000000000000ULL, 0xd1d2d3d4d5d6d7d8ULL);
  ASSERT_EQ(b.size(), 32u);
  Request r;
  size_t used = 0;
  ASSERT_EQ(parse_request(u8(b), b.size(), true, &r, &used), Parse::kOk);
  EXPECT_EQ(used, 32u);
  EXPECT_EQ(r.flags, 0x0203);
  EXPECT_EQ(r.type, BS);
  EXPECT_EQ(r.cookie, 42u);
  EXPECT_EQ(r.offset, 0x8000000000000000ULL);
  EXPECT_EQ(r.length, 0xd1d2d3d4d5d6d7d8ULL);
}

TEST(ParseRequest, ConsumesOnlyOneHeader) {
  std::string b = compact_req(0, READ, 1, 0, 512) + compact_req(0, READ, 2, 512, 512);
  Request r;
  size_t used = 0;
  ASSERT_EQ(parse_request(u8(b), b.size(), false, &r, &used), Parse::kOk);
  EXPECT_EQ(used, 28u);
  EXPECT_EQ(r.cookie, 1u);
  ASSERT_EQ(parse_request(u8(b) + used, b.size() - used, false, &r, &used), Parse::kOk);
  EXPECT_EQ(r.cookie, 2u);
  EXPECT_EQ(r.offset, 512u);
}

TEST(ParseRequest, NeedMore) {
  for (bool ext : {false, true}) {
    std::string b = ext ? ext_req(0, READ, 1, 2, 3) : compact_req(0, READ, 1, 2, 3);
    for (size_t n = 0; n < b.size(); ++n) {
      Request r;
      size_t used = 99;
      EXPECT_EQ(parse_request(u8(b), n, ext, &r, &used), Parse::kNeedMore) << n;
    }
  }
}

TEST(ParseRequest, BadMagic) {
  Request r;
  size_t used = 0;
  std::string c = compact_req(0, READ, 1, 2, 3);
  std::string e = ext_req(0, READ, 1, 2, 3);
  EXPECT_EQ(parse_request(u8(c), c.size(), true, &r, &used), Parse::kBadMagic) << "compact magic in extended mode";
  EXPECT_EQ(parse_request(u8(e), e.size(), false, &r, &used), Parse::kBadMagic) << "extended magic in compact mode";
  std::string junk = "GET / HTTP/1.1\r\n";
  EXPECT_EQ(parse_request(u8(junk), 4, false, &r, &used), Parse::kBadMagic) << "detected from 4 bytes";
  EXPECT_EQ(parse_request(u8(junk), 3, false, &r, &used), Parse::kNeedMore);
  std::string swapped = be(0x13956025, 4) + c.substr(4);  // little-endian magic
  EXPECT_EQ(parse_request(u8(swapped), swapped.size(), false, &r, &used), Parse::kBadMagic);
}

// ---- payload_length ----

TEST(PayloadLength, WriteCarriesLength) {
  EXPECT_EQ(payload_length(req(WRITE, 0, 4096), false), 4096u);
  EXPECT_EQ(payload_length(req(WRITE, 0, 4096), true), 4096u);
  EXPECT_EQ(payload_length(req(WRITE, 0, 4096, F_PAYLOAD_LEN), true), 4096u);
  EXPECT_EQ(payload_length(req(WRITE, 0, 0), false), 0u);
}

TEST(PayloadLength, OthersCarryNoneUnlessExtendedPayloadLen) {
  for (uint16_t t : {READ, DISC, FLUSH, TRIM, CACHE, WZ, BS, uint16_t(77)}) {
    EXPECT_EQ(payload_length(req(t, 0, 4096), false), 0u) << t;
    EXPECT_EQ(payload_length(req(t, 0, 4096), true), 0u) << t;
    EXPECT_EQ(payload_length(req(t, 0, 4096, F_PAYLOAD_LEN), false), 0u) << t;
    EXPECT_EQ(payload_length(req(t, 0, 4096, F_PAYLOAD_LEN), true), 4096u) << t;
  }
}

// ---- validate ----

TEST(Validate, AcceptsOrdinaryRequests) {
  for (Mode m : {Mode::kSimple, Mode::kStructured, Mode::kExtended}) {
    Session s = make_session(m);
    expect_verdict(req(READ, 0, 4096), s, 0);
    expect_verdict(req(WRITE, 4096, 4096), s, 0);
    expect_verdict(req(TRIM, 0, kSize), s, 0);
    expect_verdict(req(WZ, 0, kSize), s, 0);
    expect_verdict(req(CACHE, 0, kSize), s, 0);
    expect_verdict(req(FLUSH, 0, 0), s, 0);
    expect_verdict(req(DISC, 0, 0), s, 0);
  }
  expect_verdict(req(BS, 0, kSize), make_session(Mode::kStructured), 0);
  expect_verdict(req(BS, 0, kSize), make_session(Mode::kExtended), 0);
}

TEST(Validate, UnknownCommand) {
  Session s = make_session(Mode::kExtended);
  for (uint16_t t : {uint16_t(kCmdResize), uint16_t(9), uint16_t(0x7fff), uint16_t(0xffff)})
    expect_verdict(req(t, 0, 512), s, E_INVAL);
}

TEST(Validate, UnknownFlags) {
  Session s = make_session(Mode::kExtended);
  for (uint16_t f : {uint16_t(1 << 6), uint16_t(1 << 15), uint16_t(0xffc0)})
    expect_verdict(req(READ, 0, 512, f), s, E_INVAL);
}

TEST(Validate, FuaNeedsSendFua) {
  Session with = make_session(Mode::kSimple);
  Session without = make_session(Mode::kSimple, kAllFlags & ~kFlagSendFua);
  expect_verdict(req(WRITE, 0, 512, F_FUA), with, 0);
  expect_verdict(req(WZ, 0, 512, F_FUA), with, 0);
  expect_verdict(req(TRIM, 0, 512, F_FUA), with, 0);
  expect_verdict(req(READ, 0, 512, F_FUA), with, 0);  // FUA is valid on every command
  expect_verdict(req(WRITE, 0, 512, F_FUA), without, E_INVAL);
  expect_verdict(req(READ, 0, 512, F_FUA), without, E_INVAL);
}

TEST(Validate, NoHoleOnlyOnWriteZeroes) {
  Session s = make_session(Mode::kStructured);
  expect_verdict(req(WZ, 0, 512, F_NO_HOLE), s, 0);
  expect_verdict(req(WRITE, 0, 512, F_NO_HOLE), s, E_INVAL);
  expect_verdict(req(TRIM, 0, 512, F_NO_HOLE), s, E_INVAL);
  expect_verdict(req(READ, 0, 512, F_NO_HOLE), s, E_INVAL);
}

TEST(Validate, FastZeroOnlyOnWriteZeroesWhenAdvertised) {
  Session s = make_session(Mode::kSimple);
  Session no_fz = make_session(Mode::kSimple, kAllFlags & ~kFlagSendFastZero);
  expect_verdict(req(WZ, 0, 512, F_FAST_ZERO), s, 0);
  expect_verdict(req(WZ, 0, 512, F_FAST_ZERO | F_NO_HOLE), s, 0);
  expect_verdict(req(WZ, 0, 512, F_FAST_ZERO), no_fz, E_INVAL);
  expect_verdict(req(WRITE, 0, 512, F_FAST_ZERO), s, E_INVAL);
  expect_verdict(req(TRIM, 0, 512, F_FAST_ZERO), s, E_INVAL);
}

TEST(Validate, DfOnlyOnReadWithStructuredReplies) {
  expect_verdict(req(READ, 0, 512, F_DF), make_session(Mode::kStructured), 0);
  expect_verdict(req(READ, 0, 512, F_DF), make_session(Mode::kExtended), 0);
  expect_verdict(req(READ, 0, 512, F_DF), make_session(Mode::kSimple), E_INVAL);
  expect_verdict(req(WRITE, 0, 512, F_DF), make_session(Mode::kStructured), E_INVAL);
  expect_verdict(req(BS, 0, 512, F_DF), make_session(Mode::kStructured), E_INVAL);
}

TEST(Validate, ReqOneOnlyOnBlockStatus) {
  Session s = make_session(Mode::kStructured);
  expect_verdict(req(BS, 0, 512, F_REQ_ONE), s, 0);
  expect_verdict(req(READ, 0, 512, F_REQ_ONE), s, E_INVAL);
  expect_verdict(req(WRITE, 0, 512, F_REQ_ONE), s, E_INVAL);
}

TEST(Validate, PayloadLenOnlyOnExtendedWrite) {
  expect_verdict(req(WRITE, 0, 512, F_PAYLOAD_LEN), make_session(Mode::kExtended), 0);
  expect_verdict(req(WRITE, 0, 512, F_PAYLOAD_LEN), make_session(Mode::kStructured), E_INVAL);
  expect_verdict(req(WRITE, 0, 512, F_PAYLOAD_LEN), make_session(Mode::kSimple), E_INVAL);
  expect_verdict(req(READ, 0, 512, F_PAYLOAD_LEN), make_session(Mode::kExtended), E_INVAL);
  expect_verdict(req(BS, 0, 512, F_PAYLOAD_LEN), make_session(Mode::kExtended), E_INVAL);
}

TEST(Validate, ReadOnlyRejectsWritesWithEperm) {
  Session s = make_session(Mode::kStructured, kAllFlags | kFlagReadOnly);
  expect_verdict(req(WRITE, 0, 512), s, E_PERM);
  expect_verdict(req(TRIM, 0, 512), s, E_PERM);
  expect_verdict(req(WZ, 0, 512), s, E_PERM);
  expect_verdict(req(READ, 0, 512), s, 0);
  expect_verdict(req(CACHE, 0, 512), s, 0);
  expect_verdict(req(FLUSH, 0, 0), s, 0);
  expect_verdict(req(BS, 0, 512), s, 0);
}

TEST(Validate, RangeEndIsInclusiveOfSize) {
  Session s = make_session(Mode::kStructured);
  for (uint16_t t : {READ, WRITE, TRIM, WZ, CACHE, BS}) {
    expect_verdict(req(t, kSize - 512, 512), s, 0);
    expect_verdict(req(t, kSize - kMaxBlock, kMaxBlock), s, 0);
  }
  for (uint16_t t : {TRIM, WZ, CACHE, BS}) expect_verdict(req(t, 0, kSize), s, 0);
  expect_verdict(req(WRITE, kSize, 0), s, 0);
}

TEST(Validate, BeyondEndIsEnospcForWritesElseEinval) {
  Session s = make_session(Mode::kStructured);
  expect_verdict(req(READ, kSize - 512, 513), s, E_INVAL);
  expect_verdict(req(TRIM, kSize - 512, 513), s, E_INVAL);
  expect_verdict(req(CACHE, kSize - 512, 513), s, E_INVAL);
  expect_verdict(req(BS, kSize - 512, 513), s, E_INVAL);
  expect_verdict(req(WRITE, kSize - 512, 513), s, E_NOSPC);
  expect_verdict(req(WZ, kSize - 512, 513), s, E_NOSPC);
  expect_verdict(req(READ, kSize + 1, 0), s, E_INVAL);
  expect_verdict(req(WRITE, kSize + 1, 0), s, E_NOSPC);
}

TEST(Validate, OffsetWrapAroundIsRejected) {
  const uint64_t off = 0 - uint64_t(512);  // 2^64 - 512
  Session s = make_session(Mode::kStructured);
  expect_verdict(req(READ, off, 1024), s, E_INVAL);
  expect_verdict(req(WRITE, off, 1024), s, E_NOSPC);
  expect_verdict(req(TRIM, off, 1024), s, E_INVAL);
  // Even on an export of maximal size, off + len wrapping to 512 must not pass.
  Session huge = make_session(Mode::kExtended, kAllFlags, ~uint64_t(0));
  expect_verdict(req(READ, off, 1024), huge, E_INVAL);
  expect_verdict(req(WZ, off, 1024), huge, E_NOSPC);
  expect_verdict(req(TRIM, 1, ~uint64_t(0)), huge, E_INVAL);
  expect_verdict(req(TRIM, off, 511), huge, 0);  // ends exactly at size = 2^64 - 1
  expect_verdict(req(TRIM, off, 512), huge, E_INVAL);
}

TEST(Validate, LengthOverMaxBlock) {
  Session s = make_session(Mode::kExtended, kAllFlags, uint64_t(1) << 40);
  expect_verdict(req(READ, 0, kMaxBlock), s, 0);
  expect_verdict(req(WRITE, 0, kMaxBlock), s, 0);
  expect_verdict(req(READ, 0, kMaxBlock + 1), s, E_INVAL);
  expect_verdict(req(WRITE, 0, kMaxBlock + 1), s, E_INVAL);
  expect_verdict(req(READ, 0, uint64_t(1) << 33), s, E_INVAL);
  // Commands without a payload are not bound by it.
  expect_verdict(req(TRIM, 0, kMaxBlock + 1), s, 0);
  expect_verdict(req(WZ, 0, kMaxBlock + 1), s, 0);
  expect_verdict(req(BS, 0, kMaxBlock + 1), s, 0);
  expect_verdict(req(CACHE, 0, kMaxBlock + 1), s, 0);
}

TEST(Validate, Flush) {
  Session s = make_session(Mode::kSimple);
  expect_verdict(req(FLUSH, 0, 0), s, 0);
  expect_verdict(req(FLUSH, 512, 0), s, E_INVAL);
  expect_verdict(req(FLUSH, 0, 512), s, E_INVAL);
  expect_verdict(req(FLUSH, 0, 0), make_session(Mode::kSimple, kAllFlags & ~kFlagSendFlush), E_INVAL);
}

TEST(Validate, UnadvertisedCommands) {
  expect_verdict(req(TRIM, 0, 512), make_session(Mode::kSimple, kAllFlags & ~kFlagSendTrim), E_INVAL);
  expect_verdict(req(WZ, 0, 512), make_session(Mode::kSimple, kAllFlags & ~kFlagSendWriteZeroes), E_INVAL);
  expect_verdict(req(CACHE, 0, 512), make_session(Mode::kSimple, kAllFlags & ~kFlagSendCache), E_INVAL);
}

TEST(Validate, DiscIgnoresRange) {
  expect_verdict(req(DISC, kSize * 4, 12345), make_session(Mode::kSimple), 0);
}

TEST(Validate, BlockStatus) {
  expect_verdict(req(BS, 0, 512), make_session(Mode::kSimple), E_INVAL);
  expect_verdict(req(BS, 0, 512), make_session(Mode::kStructured, kAllFlags, kSize, /*contexts=*/false), E_INVAL);
  expect_verdict(req(BS, 0, 512), make_session(Mode::kExtended, kAllFlags, kSize, false), E_INVAL);
  expect_verdict(req(BS, 0, 0), make_session(Mode::kStructured), E_INVAL);
  expect_verdict(req(BS, 0, 512), make_session(Mode::kStructured), 0);
  expect_verdict(req(BS, kSize, 1), make_session(Mode::kStructured), E_INVAL);
}

// ---- Encoders ----

TEST(Encode, SimpleReply) {
  uint8_t b[kMaxReplyHeader];
  ASSERT_EQ(encode_simple_reply(b, 0x0102030405060708ULL, E_NOSPC), 16u);
  EXPECT_EQ(bytes(b, 16), be(SIMPLE_MAGIC, 4) + be(28, 4) + be(0x0102030405060708ULL, 8));
}

TEST(Encode, StructuredChunkHeader) {
  uint8_t b[kMaxReplyHeader];
  ASSERT_EQ(encode_chunk_header(b, false, DONE, T_OFFSET_DATA, 0xaabb, 0x999, 0x12345), 20u);
  EXPECT_EQ(bytes(b, 20), be(STRUCT_MAGIC, 4) + be(DONE, 2) + be(T_OFFSET_DATA, 2) + be(0xaabb, 8) + be(0x12345, 4));
}

TEST(Encode, ExtendedChunkHeader) {
  uint8_t b[kMaxReplyHeader];
  ASSERT_EQ(encode_chunk_header(b, true, 0, T_BS_EXT, 7, 0x1000, 0x100000000ULL), 32u);
  EXPECT_EQ(bytes(b, 32), be(EXT_MAGIC, 4) + be(0, 2) + be(T_BS_EXT, 2) + be(7, 8) + be(0x1000, 8) +
                              be(0x100000000ULL, 8));
}

TEST(Encode, ReadHeaderSimple) {
  uint8_t b[kMaxReplyHeader];
  Request r = req(READ, 4096, 512, 0, 0xc0ffee);
  size_t n = encode_read_header(b, make_session(Mode::kSimple), r, 512);
  ASSERT_EQ(n, 16u);
  EXPECT_EQ(bytes(b, n), be(SIMPLE_MAGIC, 4) + be(0, 4) + be(0xc0ffee, 8));
}

TEST(Encode, ReadHeaderStructuredOffsetData) {
  uint8_t b[kMaxReplyHeader];
  Request r = req(READ, 4096, 512, 0, 0xc0ffee);
  size_t n = encode_read_header(b, make_session(Mode::kStructured), r, 512);
  ASSERT_EQ(n, 28u);
  std::string s = bytes(b, n);
  Chunk c = decode_chunk(s);
  EXPECT_EQ(c.magic, STRUCT_MAGIC);
  EXPECT_EQ(c.flags, DONE);
  EXPECT_EQ(c.type, T_OFFSET_DATA);
  EXPECT_EQ(c.cookie, 0xc0ffeeu);
  EXPECT_EQ(c.length, 8u + 512u) << "payload is the offset plus the data";
  EXPECT_EQ(rd(s, 20, 8), 4096u);
}

TEST(Encode, ReadHeaderExtended) {
  uint8_t b[kMaxReplyHeader];
  Request r = req(READ, 0x123456789aULL, 4096, 0, 9);
  size_t n = encode_read_header(b, make_session(Mode::kExtended), r, 4096);
  ASSERT_EQ(n, 40u);
  std::string s = bytes(b, n);
  Chunk c = decode_chunk(s);
  EXPECT_EQ(c.magic, EXT_MAGIC);
  EXPECT_EQ(c.flags, DONE);
  EXPECT_EQ(c.type, T_OFFSET_DATA);
  EXPECT_EQ(c.cookie, 9u);
  EXPECT_EQ(c.offset, 0x123456789aULL);
  EXPECT_EQ(c.length, 8u + 4096u);
  EXPECT_EQ(rd(s, 32, 8), 0x123456789aULL);
}

TEST(Encode, ReadHeaderZeroLengthIsNoneChunk) {
  uint8_t b[kMaxReplyHeader];
  Request r = req(READ, 0, 0, 0, 3);
  size_t n = encode_read_header(b, make_session(Mode::kStructured), r, 0);
  ASSERT_EQ(n, 20u);
  Chunk c = decode_chunk(bytes(b, n));
  EXPECT_EQ(c.type, T_NONE);
  EXPECT_EQ(c.flags, DONE);
  EXPECT_EQ(c.length, 0u);
}

TEST(EncodeDone, SimpleMode) {
  Session s = make_session(Mode::kSimple);
  for (uint16_t t : {READ, WRITE, FLUSH}) {
    EXPECT_EQ(encode_done(s, req(t, 0, 512, 0, 77), kOk, ""), be(SIMPLE_MAGIC, 4) + be(0, 4) + be(77, 8));
    EXPECT_EQ(encode_done(s, req(t, 0, 512, 0, 77), kEIO, "disk on fire"),
              be(SIMPLE_MAGIC, 4) + be(E_IO, 4) + be(77, 8))
        << "simple replies carry no message";
  }
}

TEST(EncodeDone, StructuredSuccess) {
  Session s = make_session(Mode::kStructured);
  // Non-read: a simple reply is allowed and cheaper.
  EXPECT_EQ(encode_done(s, req(WRITE, 0, 512, 0, 5), kOk, ""), be(SIMPLE_MAGIC, 4) + be(0, 4) + be(5, 8));
  // Read: never a simple reply once structured replies are negotiated.
  std::string out = encode_done(s, req(READ, 512, 512, 0, 5), kOk, "");
  ASSERT_EQ(out.size(), 20u);
  Chunk c = decode_chunk(out);
  EXPECT_EQ(c.magic, STRUCT_MAGIC);
  EXPECT_EQ(c.type, T_NONE);
  EXPECT_EQ(c.flags, DONE);
  EXPECT_EQ(c.cookie, 5u);
  EXPECT_EQ(c.length, 0u);
}

void expect_error_chunk(const std::string& out, uint32_t magic, uint64_t cookie, uint32_t err,
                        const std::string& msg) {
  Chunk c = decode_chunk(out);
  EXPECT_EQ(c.magic, magic);
  EXPECT_EQ(c.type, T_ERROR);
  EXPECT_EQ(c.flags, DONE);
  EXPECT_EQ(c.cookie, cookie);
  ASSERT_EQ(c.length, 6u + msg.size());
  ASSERT_EQ(out.size(), c.header + c.length);
  EXPECT_EQ(rd(out, c.header, 4), err);
  EXPECT_EQ(rd(out, c.header + 4, 2), msg.size());
  EXPECT_EQ(out.substr(c.header + 6), msg);
}

TEST(EncodeDone, StructuredErrorCarriesMessage) {
  Session s = make_session(Mode::kStructured);
  expect_error_chunk(encode_done(s, req(READ, 0, 512, 0, 6), kEIO, "disk on fire"), STRUCT_MAGIC, 6, E_IO,
                     "disk on fire");
  expect_error_chunk(encode_done(s, req(WRITE, 0, 512, 0, 6), kENOSPC, "full"), STRUCT_MAGIC, 6, E_NOSPC, "full");
  expect_error_chunk(encode_done(s, req(FLUSH, 0, 0, 0, 6), kEIO, ""), STRUCT_MAGIC, 6, E_IO, "");
}

TEST(EncodeDone, ExtendedAlwaysChunks) {
  Session s = make_session(Mode::kExtended);
  for (uint16_t t : {READ, WRITE, FLUSH, TRIM}) {
    std::string out = encode_done(s, req(t, 0x4000, 512, 0, 8), kOk, "");
    ASSERT_EQ(out.size(), 32u) << t;
    Chunk c = decode_chunk(out);
    EXPECT_EQ(c.magic, EXT_MAGIC);
    EXPECT_EQ(c.type, T_NONE);
    EXPECT_EQ(c.flags, DONE);
    EXPECT_EQ(c.cookie, 8u);
    EXPECT_EQ(c.offset, 0x4000u);
    EXPECT_EQ(c.length, 0u);
  }
  std::string err = encode_done(s, req(WRITE, 0x4000, 512, 0, 8), kEPERM, "read-only");
  expect_error_chunk(err, EXT_MAGIC, 8, E_PERM, "read-only");
  EXPECT_EQ(decode_chunk(err).offset, 0x4000u);
}

TEST(EncodeDone, MessageCappedAt4096) {
  Session s = make_session(Mode::kStructured);
  std::string longmsg(5000, 'm');
  expect_error_chunk(encode_done(s, req(READ, 0, 512, 0, 1), kEINVAL, longmsg), STRUCT_MAGIC, 1, E_INVAL,
                     std::string(4096, 'm'));
}

TEST(EncodeBlockStatus, Compact) {
  Session s = make_session(Mode::kStructured);
  const Extent ext[] = {{4096, 0}, {65536, kStateHole | kStateZero}, {512, kStateZero}};
  std::string out = encode_block_status(s, req(BS, 0, 70144, 0, 0x55), 1, ext, true);
  Chunk c = decode_chunk(out);
  EXPECT_EQ(c.magic, STRUCT_MAGIC);
  EXPECT_EQ(c.type, T_BS);
  EXPECT_EQ(c.flags, DONE);
  EXPECT_EQ(c.cookie, 0x55u);
  ASSERT_EQ(c.length, 4u + 3 * 8u);
  ASSERT_EQ(out.size(), 20u + c.length);
  EXPECT_EQ(out.substr(20), be(1, 4) + be(4096, 4) + be(0, 4) + be(65536, 4) + be(3, 4) + be(512, 4) + be(2, 4));

  out = encode_block_status(s, req(BS, 0, 4096, 0, 0x55), 9, std::span<const Extent>(ext, 1), false);
  c = decode_chunk(out);
  EXPECT_EQ(c.flags, 0) << "not the last chunk";
  EXPECT_EQ(out.substr(20), be(9, 4) + be(4096, 4) + be(0, 4));
}

TEST(EncodeBlockStatus, Extended) {
  Session s = make_session(Mode::kExtended);
  const Extent ext[] = {{uint64_t(1) << 33, kStateHole}, {512, 0}};
  std::string out = encode_block_status(s, req(BS, 0x200, 1, 0, 0x66), 2, ext, true);
  Chunk c = decode_chunk(out);
  EXPECT_EQ(c.magic, EXT_MAGIC);
  EXPECT_EQ(c.type, T_BS_EXT);
  EXPECT_EQ(c.flags, DONE);
  EXPECT_EQ(c.cookie, 0x66u);
  EXPECT_EQ(c.offset, 0x200u);
  ASSERT_EQ(c.length, 8u + 2 * 16u);
  ASSERT_EQ(out.size(), 32u + c.length);
  EXPECT_EQ(out.substr(32), be(2, 4) + be(2, 4) + be(uint64_t(1) << 33, 8) + be(1, 8) + be(512, 8) + be(0, 8));
}

}  // namespace
}  // namespace nbd
