#include "protocol/handshake.hpp"

#include <algorithm>

namespace nbd {
namespace {

constexpr size_t kMaxString = 4096;  // the spec's hard limit on names and queries
constexpr size_t kOptionHeaderSize = 16;

// Reads big-endian fields from option data, failing softly at the end.
class Reader {
 public:
  explicit Reader(std::string_view d) : d_(d) {}
  bool u16(uint16_t* v) { return take(2, [&](const uint8_t* p) { *v = load16(p); }); }
  bool u32(uint32_t* v) { return take(4, [&](const uint8_t* p) { *v = load32(p); }); }
  bool str(size_t n, std::string_view* s) {
    if (d_.size() - pos_ < n) return false;
    *s = d_.substr(pos_, n);
    pos_ += n;
    return true;
  }
  size_t left() const { return d_.size() - pos_; }

 private:
  template <typename F>
  bool take(size_t n, F f) {
    if (d_.size() - pos_ < n) return false;
    f(reinterpret_cast<const uint8_t*>(d_.data() + pos_));
    pos_ += n;
    return true;
  }
  std::string_view d_;
  size_t pos_ = 0;
};

// A name is usable when the spec allows it: at most 4096 bytes, no NUL.
bool valid_string(std::string_view s) {
  return s.size() <= kMaxString && s.find('\0') == std::string_view::npos;
}

// Does `query` select `context`? An empty leaf ("base:") selects the whole
// namespace, which the spec allows for listing only.
bool query_matches(std::string_view query, std::string_view context, bool listing) {
  if (query == context) return true;
  return listing && !query.empty() && query.back() == ':' && context.starts_with(query);
}

}  // namespace

Handshake::Handshake(const ExportCatalog& catalog, HandshakeLimits limits, TlsMode tls)
    : catalog_(catalog), limits_(limits), tls_mode_(tls), options_allowed_(limits.max_options) {
  put64(out_, kNbdMagic);
  put64(out_, kOptMagic);
  put16(out_, kFlagFixedNewstyle | kFlagNoZeroes);
}

size_t Handshake::wanted() const {
  switch (state_) {
    case State::kGreeting: return 4;
    case State::kOptionHeader: return kOptionHeaderSize;
    case State::kOptionData: return cur_len_;
    case State::kSkipping: return skip_left_;
    case State::kStartTls:
    case State::kDone: return 0;
  }
  return 0;
}

size_t Handshake::feed(const uint8_t* data, size_t len) {
  size_t used = 0;
  while (used < len && status_ == Status::kContinue) {
    if (state_ == State::kSkipping) {
      size_t n = std::min<uint64_t>(skip_left_, len - used);
      used += n;
      skip_left_ -= n;
      if (skip_left_ == 0) on_skipped();
      continue;
    }
    size_t need = wanted() - in_.size();
    size_t n = std::min(need, len - used);
    in_.append(reinterpret_cast<const char*>(data + used), n);
    used += n;
    if (in_.size() < wanted()) break;
    std::string msg;
    msg.swap(in_);
    const auto* p = reinterpret_cast<const uint8_t*>(msg.data());
    switch (state_) {
      case State::kGreeting: on_client_flags(p); break;
      case State::kOptionHeader: on_option_header(p); break;
      case State::kOptionData:
        state_ = State::kOptionHeader;
        on_option(cur_opt_, msg);
        break;
      default: break;
    }
  }
  // A zero-length option completes without further bytes.
  if (state_ == State::kOptionData && cur_len_ == 0) {
    state_ = State::kOptionHeader;
    on_option(cur_opt_, {});
  }
  return used;
}

void Handshake::on_client_flags(const uint8_t* p) {
  uint32_t flags = load32(p);
  if (flags & ~kKnownClientFlags) {
    close("unknown client flags 0x" + std::to_string(flags));
    return;
  }
  if (tls_mode_ == TlsMode::kRequire && !(flags & kClientFlagFixedNewstyle)) {
    // The spec allows TLS only after fixed newstyle on both sides.
    close("TLS is required, and the client does not speak fixed newstyle");
    return;
  }
  no_zeroes_ = flags & kClientFlagNoZeroes;
  state_ = State::kOptionHeader;
  ++progress_;
}

void Handshake::on_option_header(const uint8_t* p) {
  if (load64(p) != kOptMagic) {
    close("bad option magic");
    return;
  }
  if (++options_seen_ > options_allowed_) {
    close("too many options");
    return;
  }
  cur_opt_ = load32(p + 8);
  cur_len_ = load32(p + 12);
  if (cur_len_ > limits_.max_skip) {
    close(std::string(opt_name(cur_opt_)) + ": option length " + std::to_string(cur_len_) +
          " is abusive");
    return;
  }
  if (cur_opt_ == kOptExportName && needs_tls(cur_opt_)) {
    // It has no error reply; the spec says to end the session.
    close("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS: TLS is required");
    return;
  }
  if (cur_len_ > limits_.max_option && cur_opt_ == kOptExportName) {
    // NBD_OPT_EXPORT_NAME has no error reply; a name this long ends the session.
    close("NBD_OPT_EXPORT_NAME: name too long");
    return;
  }
  if (cur_len_ > limits_.max_option) {
    skip_left_ = cur_len_;
    state_ = State::kSkipping;
    return;
  }
  state_ = State::kOptionData;
  if (cur_len_ == 0) {
    state_ = State::kOptionHeader;
    on_option(cur_opt_, {});
  }
}

void Handshake::on_option(uint32_t opt, std::string_view data) {
  ++progress_;
  if (shutting_down_ && opt != kOptAbort) {
    if (opt == kOptExportName) {
      close("shutting down");
    } else {
      reply_error(opt, kRepErrShutdown, "server is shutting down");
    }
    return;
  }
  if (needs_tls(opt)) {
    // Its data has been read all the same: the next option header follows.
    reply_error(opt, kRepErrTlsReqd, "TLS is required: send NBD_OPT_STARTTLS first");
    return;
  }
  switch (opt) {
    case kOptExportName: opt_export_name(data); break;
    case kOptAbort: opt_abort(); break;
    case kOptList: opt_list(data); break;
    case kOptInfo:
    case kOptGo: opt_info_or_go(opt, data); break;
    case kOptStructuredReply: opt_structured_reply(data); break;
    case kOptExtendedHeaders: opt_extended_headers(data); break;
    case kOptListMetaContext:
    case kOptSetMetaContext: opt_meta_context(opt, data); break;
    case kOptStartTls: opt_starttls(data); break;
    default: reply_error(opt, kRepErrUnsup, "unknown option"); break;
  }
}

// The data of an option too large to buffer has all been read and dropped.
void Handshake::on_skipped() {
  state_ = State::kOptionHeader;
  ++progress_;
  if (needs_tls(cur_opt_)) {
    reply_error(cur_opt_, kRepErrTlsReqd, "TLS is required: send NBD_OPT_STARTTLS first");
  } else {
    reply_error(cur_opt_, kRepErrTooBig, "option data too large");
  }
}

// FORCEDTLS: before TLS only NBD_OPT_STARTTLS and NBD_OPT_ABORT are served.
bool Handshake::needs_tls(uint32_t opt) const {
  return tls_mode_ == TlsMode::kRequire && !tls_active_ && opt != kOptStartTls &&
         opt != kOptAbort;
}

void Handshake::opt_starttls(std::string_view data) {
  if (tls_mode_ == TlsMode::kOff) {
    reply_error(kOptStartTls, kRepErrUnsup, "TLS is not supported by this server");
  } else if (tls_active_) {
    reply_error(kOptStartTls, kRepErrInvalid, "TLS is already active");
  } else if (!data.empty()) {
    reply_error(kOptStartTls, kRepErrInvalid, "NBD_OPT_STARTTLS takes no data");
  } else {
    reply(kOptStartTls, kRepAck);
    state_ = State::kStartTls;
    status_ = Status::kStartTls;
  }
}

void Handshake::tls_established(std::string identity) {
  if (status_ != Status::kStartTls) {
    close("tls_established() without an acknowledged NBD_OPT_STARTTLS");
    return;
  }
  tls_active_ = true;
  client_.identity = std::move(identity);
  // The spec: no negotiation state from before STARTTLS is kept.
  session_ = Session{};
  meta_export_.clear();
  in_.clear();
  cur_opt_ = 0;
  cur_len_ = 0;
  skip_left_ = 0;
  state_ = State::kOptionHeader;
  status_ = Status::kContinue;
}

bool Handshake::defer(uint32_t opt, std::string_view name, bool want_name, bool want_desc,
                      std::vector<std::string>* queries) {
  if (!defer_attach_ || !catalog_.attach_may_block(client_, name)) return false;
  pending_ = PendingAttach{opt, call(opt, name), want_name, want_desc, {}};
  if (queries) pending_.queries = std::move(*queries);
  status_ = Status::kAttaching;
  return true;
}

void Handshake::attach_done(std::shared_ptr<const ExportInfo> e, std::string why) {
  if (status_ != Status::kAttaching) {
    close("attach_done() without an attach waiting for it");
    return;
  }
  status_ = Status::kContinue;
  PendingAttach p = std::move(pending_);
  pending_ = {};
  const std::string& name = p.call.name;
  if (p.opt == kOptExportName) {
    answer_export_name(name, std::move(e), why);
  } else if (p.opt == kOptListMetaContext || p.opt == kOptSetMetaContext) {
    answer_meta_context(p.opt, name, p.queries, std::move(e), why);
  } else {
    answer_info_or_go(p.opt, name, std::move(e), why, p.want_name, p.want_desc);
  }
}

void Handshake::opt_export_name(std::string_view data) {
  if (valid_string(data) && defer(kOptExportName, data, false, false)) return;
  std::string why;
  auto e = valid_string(data) ? call(kOptExportName, data).run(catalog_, &why) : nullptr;
  answer_export_name(data, std::move(e), why);
}

void Handshake::answer_export_name(std::string_view data, std::shared_ptr<const ExportInfo> e,
                                   const std::string& why) {
  if (!e) {
    // NBD_OPT_EXPORT_NAME cannot be answered with an error: hard disconnect.
    close("NBD_OPT_EXPORT_NAME: " +
          (why.empty() ? "unknown export " + quoted(data) : why));
    return;
  }
  if (meta_export_ != e->name) session_.contexts.clear();
  uint16_t flags = transmission_flags(*e);
  put64(out_, e->size);
  put16(out_, flags);
  if (!no_zeroes_) out_.append(124, '\0');
  enter_transmission(std::move(e));
}

void Handshake::opt_abort() {
  reply(kOptAbort, kRepAck);
  aborted_ = true;
  close("client sent NBD_OPT_ABORT");
}

void Handshake::opt_list(std::string_view data) {
  if (!data.empty()) {
    reply_error(kOptList, kRepErrInvalid, "NBD_OPT_LIST takes no data");
    return;
  }
  const auto all = catalog_.list();
  options_allowed_ = std::max<uint64_t>(
      options_allowed_, limits_.max_options + uint64_t(limits_.options_per_listed) * all.size());
  for (const auto& e : all) {
    std::string d;
    put32(d, uint32_t(e->name.size()));
    d += e->name;
    d += e->description;
    reply(kOptList, kRepServer, d);
  }
  reply(kOptList, kRepAck);
}

void Handshake::opt_info_or_go(uint32_t opt, std::string_view data) {
  Reader r(data);
  uint32_t name_len = 0;
  std::string_view name;
  uint16_t nreq = 0;
  if (!r.u32(&name_len) || !r.str(name_len, &name) || !r.u16(&nreq) || r.left() != 2u * nreq) {
    reply_error(opt, kRepErrInvalid, "malformed option data");
    return;
  }
  if (!valid_string(name)) {
    reply_error(opt, kRepErrInvalid, "export name is not a valid string");
    return;
  }
  bool want_name = false, want_desc = false;
  for (uint16_t i = 0; i < nreq; ++i) {
    uint16_t info = 0;
    r.u16(&info);
    want_name |= info == kInfoName;
    want_desc |= info == kInfoDescription;
  }
  if (defer(opt, name, want_name, want_desc)) return;
  std::string why;
  auto e = call(opt, name).run(catalog_, &why);
  answer_info_or_go(opt, name, std::move(e), why, want_name, want_desc);
}

void Handshake::answer_info_or_go(uint32_t opt, std::string_view name,
                                  std::shared_ptr<const ExportInfo> e, const std::string& why,
                                  bool want_name, bool want_desc) {
  if (!e) {
    reply_error(opt, kRepErrUnknown,
                why.empty() ? "unknown export " + quoted(name) : why);
    return;
  }
  std::string d;
  put16(d, kInfoExport);
  put64(d, e->size);
  put16(d, transmission_flags(*e));
  reply(opt, kRepInfo, d);
  if (want_name) {
    d.clear();
    put16(d, kInfoName);
    d += e->name;
    reply(opt, kRepInfo, d);
  }
  if (want_desc && !e->description.empty()) {
    d.clear();
    put16(d, kInfoDescription);
    d += e->description;
    reply(opt, kRepInfo, d);
  }
  d.clear();
  put16(d, kInfoBlockSize);
  put32(d, e->min_block);
  put32(d, e->preferred_block);
  put32(d, e->max_block);
  reply(opt, kRepInfo, d);
  reply(opt, kRepAck);
  if (opt == kOptGo) {
    if (meta_export_ != e->name) session_.contexts.clear();
    enter_transmission(std::move(e));
  }
}

void Handshake::opt_structured_reply(std::string_view data) {
  if (!data.empty()) {
    reply_error(kOptStructuredReply, kRepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data");
  } else if (session_.extended) {
    reply_error(kOptStructuredReply, kRepErrExtHeaderReqd, "extended headers already negotiated");
  } else if (session_.structured) {
    reply_error(kOptStructuredReply, kRepErrInvalid, "structured replies already negotiated");
  } else {
    session_.structured = true;
    reply(kOptStructuredReply, kRepAck);
  }
}

void Handshake::opt_extended_headers(std::string_view data) {
  if (!data.empty()) {
    reply_error(kOptExtendedHeaders, kRepErrInvalid, "NBD_OPT_EXTENDED_HEADERS takes no data");
  } else if (session_.extended) {
    reply_error(kOptExtendedHeaders, kRepErrInvalid, "extended headers already negotiated");
  } else {
    session_.extended = true;
    session_.structured = true;  // extended headers imply structured replies
    reply(kOptExtendedHeaders, kRepAck);
  }
}

void Handshake::opt_meta_context(uint32_t opt, std::string_view data) {
  const bool listing = opt == kOptListMetaContext;
  if (!listing) session_.contexts.clear();  // SET replaces the selection even when it fails
  if (!listing && !session_.structured) {
    reply_error(opt, kRepErrInvalid, "negotiate structured replies first");
    return;
  }
  Reader r(data);
  uint32_t name_len = 0, nqueries = 0;
  std::string_view name;
  if (!r.u32(&name_len) || !r.str(name_len, &name) || !r.u32(&nqueries)) {
    reply_error(opt, kRepErrInvalid, "malformed option data");
    return;
  }
  std::vector<std::string_view> queries;
  for (uint32_t i = 0; i < nqueries; ++i) {
    uint32_t qlen = 0;
    std::string_view q;
    if (!r.u32(&qlen) || !r.str(qlen, &q) || !valid_string(q)) {
      reply_error(opt, kRepErrInvalid, "malformed query");
      return;
    }
    queries.push_back(q);
  }
  if (r.left() != 0 || !valid_string(name)) {
    reply_error(opt, kRepErrInvalid, "malformed option data");
    return;
  }
  std::vector<std::string> owned(queries.begin(), queries.end());
  if (defer(opt, name, false, false, &owned)) return;
  std::string why;
  auto e = call(opt, name).run(catalog_, &why);
  answer_meta_context(opt, name, owned, std::move(e), why);
}

void Handshake::answer_meta_context(uint32_t opt, std::string_view name,
                                    const std::vector<std::string>& queries,
                                    std::shared_ptr<const ExportInfo> e, const std::string& why) {
  const bool listing = opt == kOptListMetaContext;
  if (!e) {
    reply_error(opt, kRepErrUnknown,
                why.empty() ? "unknown export " + quoted(name) : why);
    return;
  }
  std::vector<MetaContext> chosen;
  for (size_t i = 0; i < e->contexts.size(); ++i) {
    const std::string& c = e->contexts[i];
    bool hit = listing && queries.empty();
    for (const std::string& q : queries) hit |= query_matches(q, c, listing);
    if (hit) chosen.push_back({uint32_t(i + 1), c});
  }
  for (const auto& c : chosen) {
    std::string d;
    put32(d, listing ? 0 : c.id);
    d += c.name;
    reply(opt, kRepMetaContext, d);
  }
  if (!listing) {
    session_.contexts = std::move(chosen);
    meta_export_ = e->name;
  }
  reply(opt, kRepAck);
}

uint16_t Handshake::transmission_flags(const ExportInfo& e) const {
  uint16_t f = e.flags | kFlagHasFlags;
  if (session_.structured) f |= kFlagSendDf;
  return f;
}

void Handshake::reply(uint32_t opt, uint32_t type, std::string_view data) {
  put64(out_, kOptReplyMagic);
  put32(out_, opt);
  put32(out_, type);
  put32(out_, uint32_t(data.size()));
  out_.append(data);
}

void Handshake::reply_error(uint32_t opt, uint32_t type, std::string_view message) {
  errors_.push_back(std::string(opt_name(opt)) + ": " + rep_name(type) + ": " + std::string(message));
  reply(opt, type, message);
}

void Handshake::close(std::string reason) {
  close_reason_ = std::move(reason);
  state_ = State::kDone;
  status_ = Status::kClosed;
}

void Handshake::enter_transmission(std::shared_ptr<const ExportInfo> e) {
  session_.flags = transmission_flags(*e);
  session_.exp = std::move(e);
  state_ = State::kDone;
  status_ = Status::kTransmission;
}

}  // namespace nbd
