// NBD wire format: every constant, byte-order helper and log name in one place.
// The spec is doc/proto.md in the NetworkBlockDevice/nbd repository; the names
// below follow it. Nothing here does I/O.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace nbd {

// ---- Handshake ----
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943ULL;   // "NBDMAGIC"
inline constexpr uint64_t kOptMagic = 0x49484156454F5054ULL;   // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x3e889045565a9ULL;

// Handshake flags (server) and client flags.
inline constexpr uint16_t kFlagFixedNewstyle = 1 << 0;
inline constexpr uint16_t kFlagNoZeroes = 1 << 1;
inline constexpr uint32_t kClientFlagFixedNewstyle = 1 << 0;
inline constexpr uint32_t kClientFlagNoZeroes = 1 << 1;
inline constexpr uint32_t kKnownClientFlags = kClientFlagFixedNewstyle | kClientFlagNoZeroes;

enum Opt : uint32_t {
  kOptExportName = 1,
  kOptAbort = 2,
  kOptList = 3,
  kOptPeekExport = 4,
  kOptStartTls = 5,
  kOptInfo = 6,
  kOptGo = 7,
  kOptStructuredReply = 8,
  kOptListMetaContext = 9,
  kOptSetMetaContext = 10,
  kOptExtendedHeaders = 11,
};

inline constexpr uint32_t kRepErrBit = 1u << 31;
enum Rep : uint32_t {
  kRepAck = 1,
  kRepServer = 2,
  kRepInfo = 3,
  kRepMetaContext = 4,
  kRepErrUnsup = kRepErrBit | 1,
  kRepErrPolicy = kRepErrBit | 2,
  kRepErrInvalid = kRepErrBit | 3,
  kRepErrPlatform = kRepErrBit | 4,
  kRepErrTlsReqd = kRepErrBit | 5,
  kRepErrUnknown = kRepErrBit | 6,
  kRepErrShutdown = kRepErrBit | 7,
  kRepErrBlockSizeReqd = kRepErrBit | 8,
  kRepErrTooBig = kRepErrBit | 9,
  kRepErrExtHeaderReqd = kRepErrBit | 10,
};

enum Info : uint16_t {
  kInfoExport = 0,
  kInfoName = 1,
  kInfoDescription = 2,
  kInfoBlockSize = 3,
};

// ---- Transmission flags (16 bits, sent with the export) ----
enum TransmissionFlag : uint16_t {
  kFlagHasFlags = 1 << 0,
  kFlagReadOnly = 1 << 1,
  kFlagSendFlush = 1 << 2,
  kFlagSendFua = 1 << 3,
  kFlagRotational = 1 << 4,
  kFlagSendTrim = 1 << 5,
  kFlagSendWriteZeroes = 1 << 6,
  kFlagSendDf = 1 << 7,
  kFlagCanMultiConn = 1 << 8,
  kFlagSendResize = 1 << 9,
  kFlagSendCache = 1 << 10,
  kFlagSendFastZero = 1 << 11,
  kFlagBlockStatusPayload = 1 << 12,
};

// ---- Requests and replies ----
inline constexpr uint32_t kRequestMagic = 0x25609513;
inline constexpr uint32_t kExtendedRequestMagic = 0x21e41c71;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;
inline constexpr uint32_t kExtendedReplyMagic = 0x6e8a278c;

inline constexpr size_t kRequestSize = 28;
inline constexpr size_t kExtendedRequestSize = 32;
inline constexpr size_t kSimpleReplySize = 16;
inline constexpr size_t kStructuredReplySize = 20;
inline constexpr size_t kExtendedReplySize = 32;

enum Cmd : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
  kCmdResize = 8,
};

enum CmdFlag : uint16_t {
  kCmdFlagFua = 1 << 0,
  kCmdFlagNoHole = 1 << 1,
  kCmdFlagDf = 1 << 2,
  kCmdFlagReqOne = 1 << 3,
  kCmdFlagFastZero = 1 << 4,
  kCmdFlagPayloadLen = 1 << 5,
};

enum ReplyFlag : uint16_t { kReplyFlagDone = 1 << 0 };

enum ReplyType : uint16_t {
  kReplyNone = 0,
  kReplyOffsetData = 1,
  kReplyOffsetHole = 2,
  kReplyBlockStatus = 5,
  kReplyBlockStatusExt = 6,
  kReplyError = (1 << 15) + 1,
  kReplyErrorOffset = (1 << 15) + 2,
};

// NBD error values (not errno: these are fixed by the protocol).
enum Error : uint32_t {
  kOk = 0,
  kEPERM = 1,
  kEIO = 5,
  kENOMEM = 12,
  kEINVAL = 22,
  kENOSPC = 28,
  kEOVERFLOW = 75,
  kENOTSUP = 95,
  kESHUTDOWN = 108,
};

// base:allocation status bits.
enum StateFlag : uint32_t { kStateHole = 1 << 0, kStateZero = 1 << 1 };

inline constexpr std::string_view kContextBaseAllocation = "base:allocation";

// Maps a system errno to the NBD error the spec allows for it. `fast_zero`
// selects ENOTSUP (only legal for NBD_CMD_FLAG_FAST_ZERO requests).
Error error_from_errno(int err, bool fast_zero = false);

// Names for logs.
// A client's string (an export name) for a reply or a log line: in single
// quotes, at most `max` bytes of it, bytes outside printable ASCII and the
// quote and backslash as \xNN, then "... (N bytes)" when it was cut.
std::string quoted(std::string_view s, size_t max = 64);

const char* opt_name(uint32_t opt);
const char* rep_name(uint32_t rep);
const char* cmd_name(uint16_t cmd);
const char* error_name(uint32_t err);
const char* info_name(uint16_t info);

// ---- Byte order ----
inline uint16_t load16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }
inline uint32_t load32(const uint8_t* p) {
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3];
}
inline uint64_t load64(const uint8_t* p) { return uint64_t(load32(p)) << 32 | load32(p + 4); }
inline void store16(uint8_t* p, uint16_t v) {
  p[0] = uint8_t(v >> 8);
  p[1] = uint8_t(v);
}
inline void store32(uint8_t* p, uint32_t v) {
  store16(p, uint16_t(v >> 16));
  store16(p + 2, uint16_t(v));
}
inline void store64(uint8_t* p, uint64_t v) {
  store32(p, uint32_t(v >> 32));
  store32(p + 4, uint32_t(v));
}

// Appends big-endian fields to a byte string (handshake replies, tests).
inline void put16(std::string& s, uint16_t v) {
  uint8_t b[2];
  store16(b, v);
  s.append(reinterpret_cast<char*>(b), 2);
}
inline void put32(std::string& s, uint32_t v) {
  uint8_t b[4];
  store32(b, v);
  s.append(reinterpret_cast<char*>(b), 4);
}
inline void put64(std::string& s, uint64_t v) {
  uint8_t b[8];
  store64(b, v);
  s.append(reinterpret_cast<char*>(b), 8);
}

}  // namespace nbd
