// Tests for protocol/wire.hpp: byte order, log names, errno mapping.
#include "protocol/wire.hpp"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace nbd {
namespace {

TEST(WireByteOrder, StoreWritesBigEndian) {
  uint8_t b[8] = {};
  store16(b, 0x1234);
  EXPECT_EQ(b[0], 0x12);
  EXPECT_EQ(b[1], 0x34);
  store32(b, 0xdeadbeef);
  const uint8_t want32[] = {0xde, 0xad, 0xbe, 0xef};
  EXPECT_EQ(0, std::memcmp(b, want32, 4));
  store64(b, 0x0102030405060708ULL);
  const uint8_t want64[] = {1, 2, 3, 4, 5, 6, 7, 8};
  EXPECT_EQ(0, std::memcmp(b, want64, 8));
}

TEST(WireByteOrder, LoadReadsBigEndian) {
  const uint8_t b[] = {0xff, 0xfe, 0x80, 0x01, 0x7f, 0x00, 0x10, 0x99};
  EXPECT_EQ(load16(b), 0xfffeu);
  EXPECT_EQ(load32(b), 0xfffe8001u);
  EXPECT_EQ(load64(b), 0xfffe80017f001099ULL);
}

TEST(WireByteOrder, RoundTripsExtremes) {
  uint8_t b[8];
  for (uint16_t v : {uint16_t(0), uint16_t(1), uint16_t(0x8000), uint16_t(0xffff)}) {
    store16(b, v);
    EXPECT_EQ(load16(b), v);
  }
  for (uint32_t v : {0u, 1u, 0x80000000u, 0xffffffffu, 0x01020304u}) {
    store32(b, v);
    EXPECT_EQ(load32(b), v);
  }
  for (uint64_t v : {0ULL, 1ULL, 0x8000000000000000ULL, ~0ULL, 0x0102030405060708ULL}) {
    store64(b, v);
    EXPECT_EQ(load64(b), v);
  }
}

TEST(WireByteOrder, PutAppends) {
  std::string s = "x";
  put16(s, 0x0102);
  put32(s, 0x03040506);
  put64(s, 0x0708090a0b0c0d0eULL);
  EXPECT_EQ(s, std::string("x\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e", 15));
}

TEST(WireConstants, MagicsSpellTheirAscii) {
  uint8_t b[8];
  store64(b, kNbdMagic);
  EXPECT_EQ(std::string(reinterpret_cast<char*>(b), 8), "NBDMAGIC");
  store64(b, kOptMagic);
  EXPECT_EQ(std::string(reinterpret_cast<char*>(b), 8), "IHAVEOPT");
  EXPECT_EQ(kOptReplyMagic, 0x3e889045565a9ULL);
  EXPECT_EQ(kRequestMagic, 0x25609513u);
  EXPECT_EQ(kExtendedRequestMagic, 0x21e41c71u);
  EXPECT_EQ(kSimpleReplyMagic, 0x67446698u);
  EXPECT_EQ(kStructuredReplyMagic, 0x668e33efu);
  EXPECT_EQ(kExtendedReplyMagic, 0x6e8a278cu);
}

TEST(WireNames, EveryOption) {
  EXPECT_STREQ(opt_name(kOptExportName), "NBD_OPT_EXPORT_NAME");
  EXPECT_STREQ(opt_name(kOptAbort), "NBD_OPT_ABORT");
  EXPECT_STREQ(opt_name(kOptList), "NBD_OPT_LIST");
  EXPECT_STREQ(opt_name(kOptPeekExport), "NBD_OPT_PEEK_EXPORT");
  EXPECT_STREQ(opt_name(kOptStartTls), "NBD_OPT_STARTTLS");
  EXPECT_STREQ(opt_name(kOptInfo), "NBD_OPT_INFO");
  EXPECT_STREQ(opt_name(kOptGo), "NBD_OPT_GO");
  EXPECT_STREQ(opt_name(kOptStructuredReply), "NBD_OPT_STRUCTURED_REPLY");
  EXPECT_STREQ(opt_name(kOptListMetaContext), "NBD_OPT_LIST_META_CONTEXT");
  EXPECT_STREQ(opt_name(kOptSetMetaContext), "NBD_OPT_SET_META_CONTEXT");
  EXPECT_STREQ(opt_name(kOptExtendedHeaders), "NBD_OPT_EXTENDED_HEADERS");
  EXPECT_STREQ(opt_name(0), "NBD_OPT_(unknown)");
  EXPECT_STREQ(opt_name(12), "NBD_OPT_(unknown)");
  EXPECT_STREQ(opt_name(0xffffffffu), "NBD_OPT_(unknown)");
}

TEST(WireNames, EveryReply) {
  EXPECT_STREQ(rep_name(kRepAck), "NBD_REP_ACK");
  EXPECT_STREQ(rep_name(kRepServer), "NBD_REP_SERVER");
  EXPECT_STREQ(rep_name(kRepInfo), "NBD_REP_INFO");
  EXPECT_STREQ(rep_name(kRepMetaContext), "NBD_REP_META_CONTEXT");
  EXPECT_STREQ(rep_name(kRepErrUnsup), "NBD_REP_ERR_UNSUP");
  EXPECT_STREQ(rep_name(kRepErrPolicy), "NBD_REP_ERR_POLICY");
  EXPECT_STREQ(rep_name(kRepErrInvalid), "NBD_REP_ERR_INVALID");
  EXPECT_STREQ(rep_name(kRepErrPlatform), "NBD_REP_ERR_PLATFORM");
  EXPECT_STREQ(rep_name(kRepErrTlsReqd), "NBD_REP_ERR_TLS_REQD");
  EXPECT_STREQ(rep_name(kRepErrUnknown), "NBD_REP_ERR_UNKNOWN");
  EXPECT_STREQ(rep_name(kRepErrShutdown), "NBD_REP_ERR_SHUTDOWN");
  EXPECT_STREQ(rep_name(kRepErrBlockSizeReqd), "NBD_REP_ERR_BLOCK_SIZE_REQD");
  EXPECT_STREQ(rep_name(kRepErrTooBig), "NBD_REP_ERR_TOO_BIG");
  EXPECT_STREQ(rep_name(kRepErrExtHeaderReqd), "NBD_REP_ERR_EXT_HEADER_REQD");
  EXPECT_STREQ(rep_name(0), "NBD_REP_(unknown)");
  EXPECT_STREQ(rep_name(kRepErrBit), "NBD_REP_(unknown)");
  // The error bit matters: 1 is ACK, 2^31|1 is ERR_UNSUP.
  EXPECT_EQ(kRepErrUnsup, 0x80000001u);
  EXPECT_EQ(kRepErrExtHeaderReqd, 0x8000000au);
}

TEST(WireNames, EveryCommand) {
  EXPECT_STREQ(cmd_name(kCmdRead), "NBD_CMD_READ");
  EXPECT_STREQ(cmd_name(kCmdWrite), "NBD_CMD_WRITE");
  EXPECT_STREQ(cmd_name(kCmdDisc), "NBD_CMD_DISC");
  EXPECT_STREQ(cmd_name(kCmdFlush), "NBD_CMD_FLUSH");
  EXPECT_STREQ(cmd_name(kCmdTrim), "NBD_CMD_TRIM");
  EXPECT_STREQ(cmd_name(kCmdCache), "NBD_CMD_CACHE");
  EXPECT_STREQ(cmd_name(kCmdWriteZeroes), "NBD_CMD_WRITE_ZEROES");
  EXPECT_STREQ(cmd_name(kCmdBlockStatus), "NBD_CMD_BLOCK_STATUS");
  EXPECT_STREQ(cmd_name(kCmdResize), "NBD_CMD_RESIZE");
  EXPECT_STREQ(cmd_name(9), "NBD_CMD_(unknown)");
  EXPECT_STREQ(cmd_name(0xffff), "NBD_CMD_(unknown)");
}

TEST(WireNames, EveryError) {
  EXPECT_STREQ(error_name(kOk), "success");
  EXPECT_STREQ(error_name(kEPERM), "NBD_EPERM");
  EXPECT_STREQ(error_name(kEIO), "NBD_EIO");
  EXPECT_STREQ(error_name(kENOMEM), "NBD_ENOMEM");
  EXPECT_STREQ(error_name(kEINVAL), "NBD_EINVAL");
  EXPECT_STREQ(error_name(kENOSPC), "NBD_ENOSPC");
  EXPECT_STREQ(error_name(kEOVERFLOW), "NBD_EOVERFLOW");
  EXPECT_STREQ(error_name(kENOTSUP), "NBD_ENOTSUP");
  EXPECT_STREQ(error_name(kESHUTDOWN), "NBD_ESHUTDOWN");
  EXPECT_STREQ(error_name(2), "NBD_E(unknown)");
  // The NBD values are fixed by the protocol, whatever the host's errno is.
  EXPECT_EQ(uint32_t(kEPERM), 1u);
  EXPECT_EQ(uint32_t(kEIO), 5u);
  EXPECT_EQ(uint32_t(kENOMEM), 12u);
  EXPECT_EQ(uint32_t(kEINVAL), 22u);
  EXPECT_EQ(uint32_t(kENOSPC), 28u);
  EXPECT_EQ(uint32_t(kEOVERFLOW), 75u);
  EXPECT_EQ(uint32_t(kENOTSUP), 95u);
  EXPECT_EQ(uint32_t(kESHUTDOWN), 108u);
}

TEST(WireNames, EveryInfo) {
  EXPECT_STREQ(info_name(kInfoExport), "NBD_INFO_EXPORT");
  EXPECT_STREQ(info_name(kInfoName), "NBD_INFO_NAME");
  EXPECT_STREQ(info_name(kInfoDescription), "NBD_INFO_DESCRIPTION");
  EXPECT_STREQ(info_name(kInfoBlockSize), "NBD_INFO_BLOCK_SIZE");
  EXPECT_STREQ(info_name(4), "NBD_INFO_(unknown)");
}

TEST(WireErrno, MapsEachClass) {
  EXPECT_EQ(error_from_errno(0), kOk);
  EXPECT_EQ(error_from_errno(EPERM), kEPERM);
  EXPECT_EQ(error_from_errno(EROFS), kEPERM);
  EXPECT_EQ(error_from_errno(ENOMEM), kENOMEM);
  EXPECT_EQ(error_from_errno(ENOSPC), kENOSPC);
  EXPECT_EQ(error_from_errno(EDQUOT), kENOSPC);
  EXPECT_EQ(error_from_errno(EFBIG), kENOSPC);
  EXPECT_EQ(error_from_errno(EOVERFLOW), kEOVERFLOW);
  EXPECT_EQ(error_from_errno(ESHUTDOWN), kESHUTDOWN);
  EXPECT_EQ(error_from_errno(EINVAL), kEINVAL);
}

TEST(WireErrno, NotSupportedOnlyForFastZero) {
  EXPECT_EQ(error_from_errno(EOPNOTSUPP), kEINVAL);
  EXPECT_EQ(error_from_errno(EOPNOTSUPP, /*fast_zero=*/true), kENOTSUP);
  EXPECT_EQ(error_from_errno(ENOTSUP, true), kENOTSUP);
  // fast_zero changes nothing else.
  EXPECT_EQ(error_from_errno(ENOSPC, true), kENOSPC);
  EXPECT_EQ(error_from_errno(EIO, true), kEIO);
}

TEST(WireErrno, EverythingElseIsEio) {
  for (int e : {EIO, EBADF, EAGAIN, EACCES, ENOENT, EFAULT, ENXIO, ETIMEDOUT, -1, 100000})
    EXPECT_EQ(error_from_errno(e), kEIO) << "errno " << e;
}

}  // namespace
}  // namespace nbd
