#include "protocol/wire.hpp"

#include <cerrno>

namespace nbd {

Error error_from_errno(int err, bool fast_zero) {
  switch (err) {
    case 0:
      return kOk;
    case EPERM:
    case EROFS:
      return kEPERM;
    case ENOMEM:
      return kENOMEM;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return kENOSPC;
    case EOVERFLOW:
      return kEOVERFLOW;
    case ESHUTDOWN:
      return kESHUTDOWN;
    case EINVAL:
      return kEINVAL;
    case EOPNOTSUPP:
      return fast_zero ? kENOTSUP : kEINVAL;
    default:
      return kEIO;
  }
}

std::string quoted(std::string_view s, size_t max) {
  static const char kHex[] = "0123456789abcdef";
  std::string out = "'";
  for (unsigned char ch : s.substr(0, max)) {
    if (ch >= 0x20 && ch < 0x7f && ch != '\'' && ch != '\\') {
      out += char(ch);
    } else {
      out += "\\x";
      out += kHex[ch >> 4];
      out += kHex[ch & 15];
    }
  }
  out += "'";
  if (s.size() > max) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

const char* opt_name(uint32_t opt) {
  switch (opt) {
    case kOptExportName: return "NBD_OPT_EXPORT_NAME";
    case kOptAbort: return "NBD_OPT_ABORT";
    case kOptList: return "NBD_OPT_LIST";
    case kOptPeekExport: return "NBD_OPT_PEEK_EXPORT";
    case kOptStartTls: return "NBD_OPT_STARTTLS";
    case kOptInfo: return "NBD_OPT_INFO";
    case kOptGo: return "NBD_OPT_GO";
    case kOptStructuredReply: return "NBD_OPT_STRUCTURED_REPLY";
    case kOptListMetaContext: return "NBD_OPT_LIST_META_CONTEXT";
    case kOptSetMetaContext: return "NBD_OPT_SET_META_CONTEXT";
    case kOptExtendedHeaders: return "NBD_OPT_EXTENDED_HEADERS";
    default: return "NBD_OPT_(unknown)";
  }
}

const char* rep_name(uint32_t rep) {
  switch (rep) {
    case kRepAck: return "NBD_REP_ACK";
    case kRepServer: return "NBD_REP_SERVER";
    case kRepInfo: return "NBD_REP_INFO";
    case kRepMetaContext: return "NBD_REP_META_CONTEXT";
    case kRepErrUnsup: return "NBD_REP_ERR_UNSUP";
    case kRepErrPolicy: return "NBD_REP_ERR_POLICY";
    case kRepErrInvalid: return "NBD_REP_ERR_INVALID";
    case kRepErrPlatform: return "NBD_REP_ERR_PLATFORM";
    case kRepErrTlsReqd: return "NBD_REP_ERR_TLS_REQD";
    case kRepErrUnknown: return "NBD_REP_ERR_UNKNOWN";
    case kRepErrShutdown: return "NBD_REP_ERR_SHUTDOWN";
    case kRepErrBlockSizeReqd: return "NBD_REP_ERR_BLOCK_SIZE_REQD";
    case kRepErrTooBig: return "NBD_REP_ERR_TOO_BIG";
    case kRepErrExtHeaderReqd: return "NBD_REP_ERR_EXT_HEADER_REQD";
    default: return "NBD_REP_(unknown)";
  }
}

const char* cmd_name(uint16_t cmd) {
  switch (cmd) {
    case kCmdRead: return "NBD_CMD_READ";
    case kCmdWrite: return "NBD_CMD_WRITE";
    case kCmdDisc: return "NBD_CMD_DISC";
    case kCmdFlush: return "NBD_CMD_FLUSH";
    case kCmdTrim: return "NBD_CMD_TRIM";
    case kCmdCache: return "NBD_CMD_CACHE";
    case kCmdWriteZeroes: return "NBD_CMD_WRITE_ZEROES";
    case kCmdBlockStatus: return "NBD_CMD_BLOCK_STATUS";
    case kCmdResize: return "NBD_CMD_RESIZE";
    default: return "NBD_CMD_(unknown)";
  }
}

const char* error_name(uint32_t err) {
  switch (err) {
    case kOk: return "success";
    case kEPERM: return "NBD_EPERM";
    case kEIO: return "NBD_EIO";
    case kENOMEM: return "NBD_ENOMEM";
    case kEINVAL: return "NBD_EINVAL";
    case kENOSPC: return "NBD_ENOSPC";
    case kEOVERFLOW: return "NBD_EOVERFLOW";
    case kENOTSUP: return "NBD_ENOTSUP";
    case kESHUTDOWN: return "NBD_ESHUTDOWN";
    default: return "NBD_E(unknown)";
  }
}

const char* info_name(uint16_t info) {
  switch (info) {
    case kInfoExport: return "NBD_INFO_EXPORT";
    case kInfoName: return "NBD_INFO_NAME";
    case kInfoDescription: return "NBD_INFO_DESCRIPTION";
    case kInfoBlockSize: return "NBD_INFO_BLOCK_SIZE";
    default: return "NBD_INFO_(unknown)";
  }
}

}  // namespace nbd
