// libFuzzer target: a stream of transmission-phase requests against a fixed
// session, through parse_request(), payload_length(), validate() and the reply
// encoders.
//
// Input layout (see make_corpus.py):
//   byte 0   session: bits 0-1 mode (0 simple, 1 structured, 2-3 extended),
//            bit 2 read-only, bit 3 no metadata contexts, bit 4 an export of
//            2^64 - 1 bytes instead of 1 MiB, bit 5 only HAS_FLAGS advertised
//   rest     requests, each followed by its payload, as a client sends them
//
// Invariants: a request validate() accepts is within the export, within
// max_block when it carries data, uses only flags valid for its command and
// session; payload_length() agrees with the spec's rule; every encoded reply
// decodes back to the right magic, cookie, type and length.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "protocol/transmission.hpp"
#include "check.hpp"

namespace {


constexpr uint32_t kMaxBlock = 1 << 16;

uint64_t be(const std::string& s, size_t off, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = v << 8 | uint8_t(s[off + i]);
  return v;
}

nbd::Session make_session(uint8_t sel) {
  auto e = std::make_shared<nbd::ExportInfo>();
  e->name = "disk";
  e->size = (sel & 16) ? ~uint64_t(0) : uint64_t(1) << 20;
  e->max_block = kMaxBlock;
  e->contexts = {"base:allocation", "qemu:dirty-bitmap:x"};
  nbd::Session s;
  s.structured = (sel & 3) != 0;
  s.extended = (sel & 3) >= 2;
  s.flags = nbd::kFlagHasFlags;
  if (!(sel & 32))
    s.flags |= nbd::kFlagSendFlush | nbd::kFlagSendFua | nbd::kFlagSendTrim | nbd::kFlagSendWriteZeroes |
               nbd::kFlagSendCache | nbd::kFlagSendFastZero;
  if (sel & 4) s.flags |= nbd::kFlagReadOnly;
  if (s.structured) s.flags |= nbd::kFlagSendDf;
  if (!(sel & 8) && s.structured) s.contexts = {{1, "base:allocation"}, {2, "qemu:dirty-bitmap:x"}};
  e->flags = s.flags & ~(nbd::kFlagHasFlags | nbd::kFlagSendDf);
  s.exp = e;
  return s;
}

void check_verdict(const nbd::Request& r, const nbd::Session& s, const nbd::Verdict& v) {
  if (!v.ok()) {
    CHECK(!v.why.empty());
    CHECK(v.error == nbd::kEINVAL || v.error == nbd::kEPERM || v.error == nbd::kENOSPC);
    if (v.error == nbd::kENOSPC) CHECK(r.type == nbd::kCmdWrite || r.type == nbd::kCmdWriteZeroes);
    if (v.error == nbd::kEPERM) CHECK(s.flags & nbd::kFlagReadOnly);
    return;
  }
  const uint64_t size = s.exp->size;
  const uint16_t f = r.flags;
  CHECK(r.type <= nbd::kCmdBlockStatus);
  CHECK((f & ~0x3f) == 0);
  if (f & nbd::kCmdFlagFua) CHECK(s.flags & nbd::kFlagSendFua);
  if (f & nbd::kCmdFlagNoHole) CHECK(r.type == nbd::kCmdWriteZeroes);
  if (f & nbd::kCmdFlagFastZero) CHECK(r.type == nbd::kCmdWriteZeroes && (s.flags & nbd::kFlagSendFastZero));
  if (f & nbd::kCmdFlagDf) CHECK(r.type == nbd::kCmdRead && s.structured && (s.flags & nbd::kFlagSendDf));
  if (f & nbd::kCmdFlagReqOne) CHECK(r.type == nbd::kCmdBlockStatus);
  if (f & nbd::kCmdFlagPayloadLen) CHECK(s.extended && r.type == nbd::kCmdWrite);
  switch (r.type) {
    case nbd::kCmdDisc: return;
    case nbd::kCmdFlush:
      CHECK(s.flags & nbd::kFlagSendFlush);
      CHECK(r.offset == 0 && r.length == 0);
      return;
    case nbd::kCmdRead:
    case nbd::kCmdWrite: CHECK(r.length <= s.exp->max_block); break;
    case nbd::kCmdTrim: CHECK(s.flags & nbd::kFlagSendTrim); break;
    case nbd::kCmdWriteZeroes: CHECK(s.flags & nbd::kFlagSendWriteZeroes); break;
    case nbd::kCmdCache: CHECK(s.flags & nbd::kFlagSendCache); break;
    case nbd::kCmdBlockStatus: CHECK(s.structured && !s.contexts.empty() && r.length > 0); break;
    default: CHECK(false);
  }
  if (r.type == nbd::kCmdWrite || r.type == nbd::kCmdTrim || r.type == nbd::kCmdWriteZeroes)
    CHECK(!(s.flags & nbd::kFlagReadOnly));
  // In range, computed without wrapping.
  CHECK(r.offset <= size);
  CHECK(r.length <= size - r.offset);
  CHECK(r.offset + r.length >= r.offset);  // no wrap (unsigned arithmetic is modular)
  CHECK(r.offset + r.length <= size);
}

// Decodes a chunk header from `out` and checks it against the session.
size_t check_chunk(const std::string& out, const nbd::Session& s, const nbd::Request& r, uint16_t type,
                   uint16_t flags) {
  CHECK(s.structured);
  if (s.extended) {
    CHECK(out.size() >= 32);
    CHECK(be(out, 0, 4) == nbd::kExtendedReplyMagic);
    CHECK(be(out, 16, 8) == r.offset);
    CHECK(be(out, 24, 8) == out.size() - 32);
  } else {
    CHECK(out.size() >= 20);
    CHECK(be(out, 0, 4) == nbd::kStructuredReplyMagic);
    CHECK(be(out, 16, 4) == out.size() - 20);
  }
  CHECK(be(out, 4, 2) == flags);
  CHECK(be(out, 6, 2) == type);
  CHECK(be(out, 8, 8) == r.cookie);
  return s.extended ? 32 : 20;
}

void check_done(const nbd::Session& s, const nbd::Request& r, const nbd::Verdict& v) {
  std::string out = nbd::encode_done(s, r, v.error, v.why);
  const bool simple = !s.extended && (!s.structured || (v.ok() && r.type != nbd::kCmdRead));
  if (simple) {
    CHECK(out.size() == 16);
    CHECK(be(out, 0, 4) == nbd::kSimpleReplyMagic);
    CHECK(be(out, 4, 4) == v.error);
    CHECK(be(out, 8, 8) == r.cookie);
    return;
  }
  CHECK(!(r.type == nbd::kCmdRead && s.structured && be(out, 0, 4) == nbd::kSimpleReplyMagic));
  if (v.ok()) {
    check_chunk(out, s, r, nbd::kReplyNone, nbd::kReplyFlagDone);
    CHECK(out.size() == (s.extended ? 32u : 20u));
    return;
  }
  size_t h = check_chunk(out, s, r, nbd::kReplyError, nbd::kReplyFlagDone);
  CHECK(out.size() >= h + 6);
  CHECK(be(out, h, 4) == v.error);
  size_t mlen = be(out, h + 4, 2);
  CHECK(mlen <= 4096 && out.size() == h + 6 + mlen);
  CHECK(out.compare(h + 6, mlen, v.why.substr(0, 4096)) == 0);
}

void check_read_header(const nbd::Session& s, const nbd::Request& r) {
  uint8_t hdr[nbd::kMaxReplyHeader];
  const uint64_t len = r.length;
  size_t n = nbd::encode_read_header(hdr, s, r, len);
  CHECK(n <= nbd::kMaxReplyHeader);
  std::string out(reinterpret_cast<char*>(hdr), n);
  if (!s.structured) {
    CHECK(n == 16 && be(out, 0, 4) == nbd::kSimpleReplyMagic && be(out, 4, 4) == 0 && be(out, 8, 8) == r.cookie);
    return;
  }
  if (len == 0) {
    CHECK(n == (s.extended ? 32u : 20u));
    check_chunk(out, s, r, nbd::kReplyNone, nbd::kReplyFlagDone);
    return;
  }
  // The header announces the 8-byte offset plus `len` data bytes.
  const size_t h = s.extended ? 32 : 20;
  CHECK(n == h + 8);
  CHECK(be(out, 0, 4) == (s.extended ? nbd::kExtendedReplyMagic : nbd::kStructuredReplyMagic));
  CHECK(be(out, 6, 2) == nbd::kReplyOffsetData);
  CHECK(be(out, h - (s.extended ? 8 : 4), s.extended ? 8 : 4) == 8 + len);
  CHECK(be(out, h, 8) == r.offset);
}

void check_block_status(const nbd::Session& s, const nbd::Request& r) {
  std::vector<nbd::Extent> ext;
  uint64_t left = r.length;
  for (int i = 0; i < 4 && left > 0; ++i) {
    uint64_t n = std::min<uint64_t>(left, s.extended ? left : 0xffffffffu);
    n = std::max<uint64_t>(1, n / (4 - i));
    ext.push_back({n, uint32_t(i & 3)});
    left -= std::min(left, n);
  }
  if (r.flags & nbd::kCmdFlagReqOne) ext.resize(1);
  for (const auto& c : s.contexts) {
    bool last = &c == &s.contexts.back();
    std::string out = nbd::encode_block_status(s, r, c.id, ext, last);
    size_t h = check_chunk(out, s, r, s.extended ? nbd::kReplyBlockStatusExt : nbd::kReplyBlockStatus,
                           last ? nbd::kReplyFlagDone : 0);
    CHECK(be(out, h, 4) == c.id);
    if (s.extended) {
      CHECK(be(out, h + 4, 4) == ext.size());
      CHECK(out.size() == h + 8 + 16 * ext.size());
      for (size_t i = 0; i < ext.size(); ++i) {
        CHECK(be(out, h + 8 + 16 * i, 8) == ext[i].length);
        CHECK(be(out, h + 16 + 16 * i, 8) == ext[i].flags);
      }
    } else {
      CHECK(out.size() == h + 4 + 8 * ext.size());
      for (size_t i = 0; i < ext.size(); ++i) {
        CHECK(be(out, h + 4 + 8 * i, 4) == ext[i].length);
        CHECK(be(out, h + 8 + 8 * i, 4) == ext[i].flags);
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const nbd::Session s = make_session(data[0]);
  const uint8_t* p = data + 1;
  size_t left = size - 1;
  const size_t header = s.extended ? nbd::kExtendedRequestSize : nbd::kRequestSize;
  while (left > 0) {
    nbd::Request r;
    size_t used = 0;
    nbd::Parse res = nbd::parse_request(p, left, s.extended, &r, &used);
    if (res == nbd::Parse::kNeedMore) {
      CHECK(left < header);
      break;
    }
    if (res == nbd::Parse::kBadMagic) break;  // the connection would close here
    CHECK(used == header);
    CHECK(nbd::load32(p) == (s.extended ? nbd::kExtendedRequestMagic : nbd::kRequestMagic));
    CHECK(r.flags == nbd::load16(p + 4) && r.type == nbd::load16(p + 6));
    if (!s.extended) CHECK(r.length <= 0xffffffffu);
    // One byte short of a header is never enough.
    nbd::Request dummy;
    size_t dummy_used = 0;
    CHECK(nbd::parse_request(p, used - 1, s.extended, &dummy, &dummy_used) == nbd::Parse::kNeedMore);
    p += used;
    left -= used;

    const uint64_t payload = nbd::payload_length(r, s.extended);
    if (r.type == nbd::kCmdWrite) {
      CHECK(payload == r.length);
    } else if (s.extended && (r.flags & nbd::kCmdFlagPayloadLen)) {
      CHECK(payload == r.length);
    } else {
      CHECK(payload == 0);
    }
    const nbd::Verdict v = nbd::validate(r, s);
    check_verdict(r, s, v);
    if (v.ok() && r.type != nbd::kCmdWrite) CHECK(payload == 0);
    if (v.ok() && r.type == nbd::kCmdWrite) CHECK(payload <= kMaxBlock);

    check_done(s, r, v);
    if (v.ok() && r.type == nbd::kCmdRead) check_read_header(s, r);
    if (v.ok() && r.type == nbd::kCmdBlockStatus) check_block_status(s, r);

    // Drain the payload, as the server does even for a rejected request.
    if (payload > nbd::kMaxDrain) break;
    if (payload >= left) break;
    p += payload;
    left -= payload;
  }
  return 0;
}
