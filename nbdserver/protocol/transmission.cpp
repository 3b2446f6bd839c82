#include "protocol/transmission.hpp"

#include <cstring>

namespace nbd {
namespace {

constexpr uint16_t kKnownCmdFlags = kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagReqOne |
                                    kCmdFlagFastZero | kCmdFlagPayloadLen;

bool is_write(uint16_t type) {
  return type == kCmdWrite || type == kCmdTrim || type == kCmdWriteZeroes;
}

Verdict fail(Error e, std::string why) { return {e, std::move(why)}; }

Verdict check_flags(const Request& r, const Session& s) {
  const uint16_t f = r.flags;
  if (f & ~kKnownCmdFlags) return fail(kEINVAL, "unknown command flags");
  if ((f & kCmdFlagFua) && !(s.flags & kFlagSendFua)) return fail(kEINVAL, "FUA not negotiated");
  if ((f & kCmdFlagNoHole) && r.type != kCmdWriteZeroes)
    return fail(kEINVAL, "NO_HOLE is only valid on WRITE_ZEROES");
  if ((f & kCmdFlagFastZero) && (r.type != kCmdWriteZeroes || !(s.flags & kFlagSendFastZero)))
    return fail(kEINVAL, "FAST_ZERO is only valid on WRITE_ZEROES");
  if ((f & kCmdFlagDf) && (r.type != kCmdRead || !s.structured))
    return fail(kEINVAL, "DF is only valid on READ with structured replies");
  if ((f & kCmdFlagReqOne) && r.type != kCmdBlockStatus)
    return fail(kEINVAL, "REQ_ONE is only valid on BLOCK_STATUS");
  if ((f & kCmdFlagPayloadLen) && (!s.extended || r.type != kCmdWrite))
    return fail(kEINVAL, "PAYLOAD_LEN is not supported here");
  return {};
}

Verdict check_range(const Request& r, const Session& s) {
  const uint64_t size = s.exp->size;
  if (r.offset > size || r.length > size - r.offset) {
    bool grows = r.type == kCmdWrite || r.type == kCmdWriteZeroes;
    return fail(grows ? kENOSPC : kEINVAL, "request beyond the end of the export");
  }
  return {};
}

}  // namespace

Parse parse_request(const uint8_t* p, size_t n, bool extended, Request* req, size_t* used) {
  const size_t need = extended ? kExtendedRequestSize : kRequestSize;
  if (n < 4) return Parse::kNeedMore;
  if (load32(p) != (extended ? kExtendedRequestMagic : kRequestMagic)) return Parse::kBadMagic;
  if (n < need) return Parse::kNeedMore;
  req->flags = load16(p + 4);
  req->type = load16(p + 6);
  req->cookie = load64(p + 8);
  req->offset = load64(p + 16);
  req->length = extended ? load64(p + 24) : load32(p + 24);
  *used = need;
  return Parse::kOk;
}

uint64_t payload_length(const Request& req, bool extended) {
  if (req.type == kCmdWrite) return req.length;
  if (extended && (req.flags & kCmdFlagPayloadLen)) return req.length;
  return 0;
}

Verdict validate(const Request& r, const Session& s) {
  const ExportInfo& e = *s.exp;
  switch (r.type) {
    case kCmdRead:
    case kCmdWrite:
    case kCmdTrim:
    case kCmdWriteZeroes:
    case kCmdCache:
    case kCmdBlockStatus:
    case kCmdFlush:
    case kCmdDisc:
      break;
    default:
      return fail(kEINVAL, "unknown command " + std::to_string(r.type));
  }
  if (Verdict v = check_flags(r, s); !v.ok()) return v;
  if (is_write(r.type) && (s.flags & kFlagReadOnly))
    return fail(kEPERM, "write to a read-only export");
  if ((r.type == kCmdRead || r.type == kCmdWrite) && r.length > e.max_block)
    return fail(kEINVAL, "request of " + std::to_string(r.length) +
                             " bytes exceeds the maximum block size " +
                             std::to_string(e.max_block));
  switch (r.type) {
    case kCmdFlush:
      if (!(s.flags & kFlagSendFlush)) return fail(kEINVAL, "flush not supported");
      if (r.offset != 0 || r.length != 0) return fail(kEINVAL, "flush with offset or length");
      return {};
    case kCmdDisc:
      return {};
    case kCmdTrim:
      if (!(s.flags & kFlagSendTrim)) return fail(kEINVAL, "trim not supported");
      break;
    case kCmdWriteZeroes:
      if (!(s.flags & kFlagSendWriteZeroes)) return fail(kEINVAL, "write zeroes not supported");
      break;
    case kCmdCache:
      if (!(s.flags & kFlagSendCache)) return fail(kEINVAL, "cache not supported");
      break;
    case kCmdBlockStatus:
      if (!s.structured) return fail(kEINVAL, "block status needs structured replies");
      if (s.contexts.empty()) return fail(kEINVAL, "no metadata context was negotiated");
      if (r.length == 0) return fail(kEINVAL, "block status of zero length");
      break;
    default:
      break;
  }
  return check_range(r, s);
}

size_t encode_simple_reply(uint8_t* out, uint64_t cookie, uint32_t error) {
  store32(out, kSimpleReplyMagic);
  store32(out + 4, error);
  store64(out + 8, cookie);
  return kSimpleReplySize;
}

size_t encode_chunk_header(uint8_t* out, bool extended, uint16_t flags, uint16_t type,
                           uint64_t cookie, uint64_t offset, uint64_t payload_len) {
  store16(out + 4, flags);
  store16(out + 6, type);
  store64(out + 8, cookie);
  if (!extended) {
    store32(out, kStructuredReplyMagic);
    store32(out + 16, uint32_t(payload_len));
    return kStructuredReplySize;
  }
  store32(out, kExtendedReplyMagic);
  store64(out + 16, offset);
  store64(out + 24, payload_len);
  return kExtendedReplySize;
}

size_t encode_read_header(uint8_t* out, const Session& s, const Request& req, uint64_t len) {
  if (!s.structured) return encode_simple_reply(out, req.cookie, kOk);
  if (len == 0)
    return encode_chunk_header(out, s.extended, kReplyFlagDone, kReplyNone, req.cookie,
                               req.offset, 0);
  size_t n = encode_chunk_header(out, s.extended, kReplyFlagDone, kReplyOffsetData, req.cookie,
                                 req.offset, 8 + len);
  store64(out + n, req.offset);
  return n + 8;
}

size_t encode_ok(uint8_t* out, const Session& s, const Request& req) {
  if (!s.extended && (!s.structured || req.type != kCmdRead))
    return encode_simple_reply(out, req.cookie, kOk);
  return encode_chunk_header(out, s.extended, kReplyFlagDone, kReplyNone, req.cookie, req.offset,
                             0);
}

std::string encode_done(const Session& s, const Request& req, Error error, std::string_view why) {
  uint8_t hdr[kMaxReplyHeader];
  std::string out;
  if (error == kOk) {
    size_t n = encode_ok(hdr, s, req);
    return std::string(reinterpret_cast<char*>(hdr), n);
  }
  if (!s.structured) {
    size_t n = encode_simple_reply(hdr, req.cookie, error);
    return std::string(reinterpret_cast<char*>(hdr), n);
  }
  std::string_view msg = why.substr(0, 4096);
  size_t n = encode_chunk_header(hdr, s.extended, kReplyFlagDone, kReplyError, req.cookie,
                                 req.offset, 6 + msg.size());
  out.assign(reinterpret_cast<char*>(hdr), n);
  put32(out, error);
  put16(out, uint16_t(msg.size()));
  out.append(msg);
  return out;
}

std::string encode_block_status(const Session& s, const Request& req, uint32_t context_id,
                                std::span<const Extent> extents, bool last) {
  uint8_t hdr[kMaxReplyHeader];
  std::string body;
  put32(body, context_id);
  if (s.extended) {
    put32(body, uint32_t(extents.size()));
    for (const Extent& x : extents) {
      put64(body, x.length);
      put64(body, x.flags);
    }
  } else {
    for (const Extent& x : extents) {
      put32(body, uint32_t(x.length));
      put32(body, x.flags);
    }
  }
  uint16_t type = s.extended ? kReplyBlockStatusExt : kReplyBlockStatus;
  size_t n = encode_chunk_header(hdr, s.extended, last ? kReplyFlagDone : 0, type, req.cookie,
                                 req.offset, body.size());
  return std::string(reinterpret_cast<char*>(hdr), n) + body;
}

}  // namespace nbd
