#include "protocol/client.hpp"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <utility>

namespace nbd {
namespace {

constexpr size_t kGreetingSize = 18;     // NBDMAGIC, IHAVEOPT, 16-bit flags
constexpr size_t kOptReplyHeader = 20;   // magic, option, type, length
constexpr uint64_t kOldstyleMagic = 0x00420281861253ULL;
constexpr size_t kExtentBatch = 512;

bool tolerated(uint32_t type) { return type == kRepErrUnsup || type == kRepErrPolicy; }

// The server's error text, made safe for a log line.
std::string printable(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 512)) out.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  if (s.size() > 512) out += "...";
  return out;
}

std::string hex(uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof b, "0x%" PRIx64, v);
  return b;
}

bool power_of_two(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

uint32_t ClientSession::context_id(std::string_view name) const {
  for (const MetaContext& c : contexts)
    if (c.name == name) return c.id;
  return 0;
}

// ---------------------------------------------------------------- handshake

ClientHandshake::ClientHandshake(ClientOptions opts) : opts_(std::move(opts)) {}

size_t ClientHandshake::wanted() const {
  switch (state_) {
    case State::kGreeting: return kGreetingSize;
    case State::kReplyHeader: return kOptReplyHeader;
    case State::kReplyData: return cur_len_;
    case State::kStartTls:
    case State::kDone: return 0;
  }
  return 0;
}

size_t ClientHandshake::feed(const uint8_t* data, size_t len) {
  size_t used = 0;
  while (status_ == Status::kContinue && used < len) {
    size_t take = std::min(wanted() - in_.size(), len - used);
    in_.append(reinterpret_cast<const char*>(data + used), take);
    used += take;
    if (in_.size() < wanted()) break;
    std::string msg = std::exchange(in_, {});
    const auto* p = reinterpret_cast<const uint8_t*>(msg.data());
    switch (state_) {
      case State::kGreeting: on_greeting(p); break;
      case State::kReplyHeader: on_reply_header(p); break;
      case State::kReplyData: on_reply(msg); break;
      case State::kStartTls:
      case State::kDone: break;
    }
  }
  return used;
}

void ClientHandshake::on_greeting(const uint8_t* p) {
  if (load64(p) != kNbdMagic) return fail("not an NBD server (bad greeting magic)");
  if (load64(p + 8) == kOldstyleMagic) return fail("oldstyle NBD server; only newstyle is supported");
  if (load64(p + 8) != kOptMagic) return fail("bad newstyle magic in the server greeting");
  const uint16_t flags = load16(p + 16);
  if (!(flags & kFlagFixedNewstyle)) return fail("server does not speak fixed newstyle");
  uint32_t cf = kClientFlagFixedNewstyle;
  if (flags & kFlagNoZeroes) cf |= kClientFlagNoZeroes;
  put32(out_, cf);
  if (opts_.starttls) return send_option(kOptStartTls, {});
  send_first_option();
}

void ClientHandshake::send_first_option() {
  if (opts_.structured) return send_option(kOptStructuredReply, {});
  send_next_option();
}

void ClientHandshake::tls_established() {
  if (status_ != Status::kStartTls)
    return fail("tls_established() without an accepted NBD_OPT_STARTTLS");
  status_ = Status::kContinue;
  send_first_option();
}

void ClientHandshake::send_option(uint32_t opt, const std::string& data) {
  put64(out_, kOptMagic);
  put32(out_, opt);
  put32(out_, uint32_t(data.size()));
  out_ += data;
  cur_opt_ = opt;
  state_ = State::kReplyHeader;
}

// After NBD_OPT_STRUCTURED_REPLY (or instead of it): SET_META_CONTEXT when
// there is something to set, else GO. After SET_META_CONTEXT: GO.
void ClientHandshake::send_next_option() {
  const std::string& name = opts_.export_name;
  std::string d;
  put32(d, uint32_t(name.size()));
  d += name;
  if (cur_opt_ != kOptSetMetaContext && session_.structured && !opts_.contexts.empty()) {
    put32(d, uint32_t(opts_.contexts.size()));
    for (const std::string& c : opts_.contexts) {
      put32(d, uint32_t(c.size()));
      d += c;
    }
    return send_option(kOptSetMetaContext, d);
  }
  put16(d, 1);
  put16(d, kInfoBlockSize);
  send_option(kOptGo, d);
}

void ClientHandshake::on_reply_header(const uint8_t* p) {
  if (load64(p) != kOptReplyMagic) return fail("bad option reply magic");
  const uint32_t opt = load32(p + 8);
  if (opt != cur_opt_)
    return fail(std::string("reply to option ") + opt_name(opt) + " while waiting for " +
                opt_name(cur_opt_));
  cur_type_ = load32(p + 12);
  cur_len_ = load32(p + 16);
  if (cur_len_ > kMaxClientOptionReply)
    return fail(std::string("oversized reply (") + std::to_string(cur_len_) + " bytes) to " +
                opt_name(cur_opt_));
  state_ = State::kReplyData;
  if (cur_len_ == 0) on_reply({});
}

void ClientHandshake::on_reply(std::string_view data) {
  state_ = State::kReplyHeader;
  switch (cur_opt_) {
    case kOptStartTls: return on_starttls_reply(data);
    case kOptStructuredReply: return on_structured_reply(data);
    case kOptSetMetaContext: return on_meta_context_reply(data);
    case kOptGo: return on_go_reply(data);
    default: return fail("internal: reply to an option never sent");
  }
}

void ClientHandshake::on_starttls_reply(std::string_view data) {
  if (cur_type_ != kRepAck) return fail_refused("refused", data);
  if (!data.empty()) return fail("NBD_REP_ACK with data");
  state_ = State::kStartTls;
  status_ = Status::kStartTls;
}

void ClientHandshake::on_structured_reply(std::string_view data) {
  if (cur_type_ == kRepAck) {
    if (!data.empty()) return fail("NBD_REP_ACK with data");
    session_.structured = true;
    return send_next_option();
  }
  if (tolerated(cur_type_)) return send_next_option();  // simple replies only
  fail_refused("structured replies refused", data);
}

void ClientHandshake::on_meta_context_reply(std::string_view data) {
  if (cur_type_ == kRepMetaContext) {
    if (data.size() < 4) return fail("short NBD_REP_META_CONTEXT");
    const uint32_t id = load32(reinterpret_cast<const uint8_t*>(data.data()));
    std::string name(data.substr(4));
    if (std::find(opts_.contexts.begin(), opts_.contexts.end(), name) == opts_.contexts.end())
      return fail("server selected metadata context '" + printable(name) + "' not asked for");
    if (id == 0) return fail("metadata context '" + name + "' with id 0");
    for (const MetaContext& c : session_.contexts)
      if (c.id == id || c.name == name)
        return fail("metadata context '" + name + "' or id " + std::to_string(id) + " twice");
    session_.contexts.push_back({id, std::move(name)});
    return;
  }
  if (cur_type_ == kRepAck) {
    if (!data.empty()) return fail("NBD_REP_ACK with data");
    return send_next_option();
  }
  if (tolerated(cur_type_)) {
    session_.contexts.clear();
    return send_next_option();
  }
  fail_refused("export '" + printable(opts_.export_name) + "' refused", data);
}

void ClientHandshake::on_go_reply(std::string_view data) {
  if (cur_type_ == kRepInfo) return on_info(data);
  if (cur_type_ == kRepAck) {
    if (!data.empty()) return fail("NBD_REP_ACK with data");
    if (!have_export_) return fail("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT");
    state_ = State::kDone;
    status_ = Status::kReady;
    return;
  }
  fail_refused("export '" + printable(opts_.export_name) + "' refused", data);
}

void ClientHandshake::on_info(std::string_view data) {
  const auto* p = reinterpret_cast<const uint8_t*>(data.data());
  if (data.size() < 2) return fail("short NBD_REP_INFO");
  const uint16_t type = load16(p);
  if (type == kInfoExport) {
    if (data.size() != 12) return fail("NBD_INFO_EXPORT of the wrong size");
    session_.size = load64(p + 2);
    session_.flags = load16(p + 10);
    if (!(session_.flags & kFlagHasFlags)) return fail("transmission flags without HAS_FLAGS");
    have_export_ = true;
  } else if (type == kInfoBlockSize) {
    if (data.size() != 14) return fail("NBD_INFO_BLOCK_SIZE of the wrong size");
    const uint32_t min = load32(p + 2), pref = load32(p + 6), max = load32(p + 10);
    if (!power_of_two(min) || min > 64 * 1024 || !power_of_two(pref) || pref < min ||
        max < min)
      return fail("invalid block sizes " + std::to_string(min) + "/" + std::to_string(pref) +
                  "/" + std::to_string(max));
    session_.min_block = min;
    session_.preferred_block = pref;
    session_.max_block = max;
  }
  // NBD_INFO_NAME, _DESCRIPTION and unknown types are not needed.
}

// While NBD_OPT_STARTTLS awaits its answer, every failure means the server
// did not accept TLS, and says so.
void ClientHandshake::fail(std::string why) {
  if (cur_opt_ == kOptStartTls && state_ != State::kStartTls)
    why = "the server did not accept NBD_OPT_STARTTLS (" + why +
          "); refusing to continue without TLS";
  error_ = std::move(why);
  state_ = State::kDone;
  status_ = Status::kFailed;
}

void ClientHandshake::fail_refused(std::string_view what, std::string_view data) {
  if (!(cur_type_ & kRepErrBit))
    return fail(std::string("unexpected reply ") + rep_name(cur_type_) + " to " +
                opt_name(cur_opt_));
  std::string why = std::string(what) + ": " + rep_name(cur_type_);
  if (!data.empty()) why += ": " + printable(data);
  refusal_ = cur_type_;
  fail(std::move(why));
}

// ---------------------------------------------------------------- requests

size_t encode_request(uint8_t* out, const Request& req) {
  store32(out, kRequestMagic);
  store16(out + 4, req.flags);
  store16(out + 6, req.type);
  store64(out + 8, req.cookie);
  store64(out + 16, req.offset);
  store32(out + 24, uint32_t(req.length));
  return kRequestSize;
}

// ---------------------------------------------------------------- replies

ReplyReader::ReplyReader(bool structured, std::vector<uint32_t> contexts)
    : structured_(structured), contexts_(std::move(contexts)) {}

bool ReplyReader::expect(const Request& req) {
  return pending_.try_emplace(req.cookie, Pending{.req = req}).second;
}

void ReplyReader::violate(std::string why) {
  why_ = why.empty() ? "protocol violation" : std::move(why);
}

size_t ReplyReader::feed(const uint8_t* data, size_t len, ReplySink& sink) {
  size_t used = 0;
  while (used < len && !broken()) {
    const uint8_t* p = data + used;
    const size_t n = len - used;
    switch (state_) {
      case State::kHeader: used += on_header(p, n, sink); break;
      case State::kSimpleData:
      case State::kChunkData: used += on_chunk_data(p, n, sink); break;
      case State::kChunkExtents: used += on_chunk_extents(p, n, sink); break;
      case State::kChunkFixed: {
        size_t take = std::min(want_ - fixed_.size(), n);
        fixed_.append(reinterpret_cast<const char*>(p), take);
        used += take;
        if (fixed_.size() == want_) on_chunk_fixed(sink);
        break;
      }
    }
  }
  return used;
}

size_t ReplyReader::on_header(const uint8_t* p, size_t len, ReplySink& sink) {
  size_t used = 0;
  if (have_ < 4) {
    used = std::min<size_t>(4 - have_, len);
    std::memcpy(hdr_ + have_, p, used);
    have_ += used;
    if (have_ < 4) return used;
    const uint32_t magic = load32(hdr_);
    if (magic == kStructuredReplyMagic && !structured_)
      violate("structured reply chunk, but structured replies were not negotiated");
    else if (magic != kSimpleReplyMagic && magic != kStructuredReplyMagic)
      violate("bad reply magic " + hex(magic));
    if (broken()) return used;
  }
  const bool simple = load32(hdr_) == kSimpleReplyMagic;
  const size_t need = simple ? kSimpleReplySize : kStructuredReplySize;
  size_t take = std::min(need - have_, len - used);
  std::memcpy(hdr_ + have_, p + used, take);
  have_ += take;
  used += take;
  if (have_ < need) return used;
  have_ = 0;
  cookie_ = load64(hdr_ + 8);
  auto it = pending_.find(cookie_);
  if (it == pending_.end()) {
    violate("reply to unknown cookie " + hex(cookie_));
    return used;
  }
  cur_ = &it->second;
  if (simple) {
    on_simple_header(sink);
  } else {
    on_chunk_header(sink);
  }
  return used;
}

void ReplyReader::on_simple_header(ReplySink& sink) {
  Pending& pd = *cur_;
  const uint32_t error = load32(hdr_ + 4);
  if (pd.started) return violate("simple reply to cookie " + hex(cookie_) + " after chunks");
  if (error != 0) {
    pd.error = error;
    sink.on_error(cookie_, error, {});
    return complete(sink);
  }
  if (pd.req.type != kCmdRead) return complete(sink);
  if (structured_) return violate("simple reply with data to a read after structured replies");
  cover(pd, pd.req.offset, pd.req.length);
  left_ = pd.req.length;
  data_off_ = pd.req.offset;
  state_ = State::kSimpleData;
  if (left_ == 0) complete(sink);
}

void ReplyReader::on_chunk_header(ReplySink& sink) {
  Pending& pd = *cur_;
  pd.started = true;
  chunk_flags_ = load16(hdr_ + 4);
  chunk_type_ = load16(hdr_ + 6);
  const uint32_t len = load32(hdr_ + 16);
  const std::string what = "chunk of cookie " + hex(cookie_) + ": ";
  fixed_.clear();
  state_ = State::kChunkFixed;
  switch (chunk_type_) {
    case kReplyNone:
      if (len != 0) return violate(what + "NBD_REPLY_TYPE_NONE with a payload");
      if (!(chunk_flags_ & kReplyFlagDone)) return violate(what + "NBD_REPLY_TYPE_NONE not last");
      return complete(sink);
    case kReplyOffsetData:
      if (pd.req.type != kCmdRead) return violate(what + "data for a request that is no read");
      if (len <= 8) return violate(what + "data chunk without data");
      if (len - 8 > pd.req.length) return violate(what + "data chunk longer than the read");
      want_ = 8;
      left_ = len - 8;
      return;
    case kReplyOffsetHole:
      if (pd.req.type != kCmdRead) return violate(what + "hole for a request that is no read");
      if (len != 12) return violate(what + "hole chunk of the wrong size");
      want_ = 12;
      return;
    case kReplyBlockStatus:
      if (pd.req.type != kCmdBlockStatus) return violate(what + "block status for another command");
      if (len < 12 || (len - 4) % 8 != 0) return violate(what + "malformed block status length");
      want_ = 4;
      left_ = len - 4;
      return;
    default:
      break;
  }
  if (!(chunk_type_ & 0x8000))
    return violate(what + "unexpected chunk type " + std::to_string(chunk_type_));
  if (len < 6 || len > 6 + kMaxErrorMessage + 8)
    return violate(what + "error chunk of " + std::to_string(len) + " bytes");
  want_ = len;
}

void ReplyReader::on_chunk_fixed(ReplySink& sink) {
  Pending& pd = *cur_;
  const auto* p = reinterpret_cast<const uint8_t*>(fixed_.data());
  const std::string what = "chunk of cookie " + hex(cookie_) + ": ";
  switch (chunk_type_) {
    case kReplyOffsetData: {
      data_off_ = load64(p);
      if (!cover(pd, data_off_, left_))
        return violate(what + "data outside the read or overlapping other data");
      state_ = State::kChunkData;
      return;
    }
    case kReplyOffsetHole: {
      const uint64_t off = load64(p);
      const uint32_t n = load32(p + 8);
      if (n == 0) return violate(what + "empty hole");
      if (!cover(pd, off, n)) return violate(what + "hole outside the read or overlapping data");
      sink.on_hole(cookie_, off, n);
      return end_chunk(sink);
    }
    case kReplyBlockStatus: {
      ctx_ = load32(p);
      if (std::find(contexts_.begin(), contexts_.end(), ctx_) == contexts_.end())
        return violate(what + "block status for context " + std::to_string(ctx_) +
                       ", which was not negotiated");
      auto& seen = pd.contexts_seen;
      if (std::find(seen.begin(), seen.end(), ctx_) != seen.end())
        return violate(what + "context " + std::to_string(ctx_) + " reported twice");
      seen.push_back(ctx_);
      ext_sum_ = 0;
      ext_count_ = 0;
      fixed_.clear();
      state_ = State::kChunkExtents;
      return;
    }
    default:
      return on_error_chunk(sink);
  }
}

void ReplyReader::on_error_chunk(ReplySink& sink) {
  Pending& pd = *cur_;
  const auto* p = reinterpret_cast<const uint8_t*>(fixed_.data());
  const std::string what = "error chunk of cookie " + hex(cookie_) + ": ";
  const uint32_t error = load32(p);
  const size_t mlen = load16(p + 4);
  if (error == 0) return violate(what + "error 0");
  if (6 + mlen > fixed_.size() || mlen > kMaxErrorMessage)
    return violate(what + "message longer than the chunk");
  if (chunk_type_ == kReplyError && fixed_.size() != 6 + mlen)
    return violate(what + "trailing bytes");
  if (chunk_type_ == kReplyErrorOffset) {
    if (fixed_.size() != 6 + mlen + 8) return violate(what + "malformed offset");
    const uint64_t off = load64(p + 6 + mlen);
    if (off < pd.req.offset || off - pd.req.offset >= pd.req.length)
      return violate(what + "offset outside the request");
  }
  if (pd.error == 0) pd.error = error;
  sink.on_error(cookie_, error, std::string_view(fixed_).substr(6, mlen));
  end_chunk(sink);
}

size_t ReplyReader::on_chunk_data(const uint8_t* p, size_t len, ReplySink& sink) {
  const size_t n = size_t(std::min<uint64_t>(left_, len));
  if (n > 0) sink.on_data(cookie_, data_off_, p, n);
  data_off_ += n;
  left_ -= n;
  if (left_ == 0) {
    if (state_ == State::kSimpleData) {
      complete(sink);
    } else {
      end_chunk(sink);
    }
  }
  return n;
}

size_t ReplyReader::on_chunk_extents(const uint8_t* p, size_t len, ReplySink& sink) {
  const Request& req = cur_->req;
  size_t used = 0;
  while (used < len && left_ > 0 && !broken()) {
    size_t take = std::min<size_t>(8 - fixed_.size(), len - used);
    fixed_.append(reinterpret_cast<const char*>(p + used), take);
    used += take;
    left_ -= take;
    if (fixed_.size() < 8) break;
    const auto* e = reinterpret_cast<const uint8_t*>(fixed_.data());
    const Extent x{load32(e), load32(e + 4)};
    fixed_.clear();
    if (x.length == 0) return violate("zero-length extent"), used;
    if (ext_sum_ >= req.length) return violate("extent beyond the requested range"), used;
    if ((req.flags & kCmdFlagReqOne) && ext_count_ > 0)
      return violate("several extents for a REQ_ONE request"), used;
    ext_sum_ += x.length;
    ++ext_count_;
    batch_.push_back(x);
    if (batch_.size() == kExtentBatch || left_ == 0) {
      sink.on_extents(cookie_, ctx_, batch_);
      batch_.clear();
    }
  }
  if (left_ == 0 && !broken()) end_chunk(sink);
  return used;
}

// Marks [offset, offset + length) of a read delivered; false when it is
// outside the request or overlaps bytes already delivered.
bool ReplyReader::cover(Pending& pd, uint64_t offset, uint64_t length) {
  const Request& r = pd.req;
  if (offset < r.offset || length > r.length || offset - r.offset > r.length - length)
    return false;
  const uint64_t rel = offset - r.offset;
  if (pd.bits.empty()) {
    if (rel == pd.contiguous) {
      pd.contiguous += length;
      pd.covered += length;
      return true;
    }
    if (rel < pd.contiguous) return false;
    pd.bits.assign(size_t((r.length + 7) / 8), 0);
    for (uint64_t i = 0; i < pd.contiguous; ++i) pd.bits[i / 8] |= uint8_t(1 << (i % 8));
  }
  for (uint64_t i = rel; i < rel + length; ++i)
    if (pd.bits[i / 8] & (1 << (i % 8))) return false;
  for (uint64_t i = rel; i < rel + length; ++i) pd.bits[i / 8] |= uint8_t(1 << (i % 8));
  pd.covered += length;
  return true;
}

void ReplyReader::end_chunk(ReplySink& sink) {
  if (chunk_flags_ & kReplyFlagDone) return complete(sink);
  state_ = State::kHeader;
  cur_ = nullptr;
}

void ReplyReader::complete(ReplySink& sink) {
  Pending& pd = *cur_;
  if (pd.req.type == kCmdRead && pd.error == 0 && pd.covered != pd.req.length)
    return violate("read of " + std::to_string(pd.req.length) + " bytes at " +
                   std::to_string(pd.req.offset) + " completed with only " +
                   std::to_string(pd.covered) + " bytes of data and holes");
  const uint32_t error = pd.error;
  pending_.erase(cookie_);
  cur_ = nullptr;
  state_ = State::kHeader;
  sink.on_done(cookie_, error);
}

}  // namespace nbd
