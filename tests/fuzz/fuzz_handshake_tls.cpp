// libFuzzer target: arbitrary client bytes into an nbd::Handshake that
// requires TLS (TlsMode::kRequire, the spec's FORCEDTLS mode).
//
// Input layout (see make_corpus.py), as for fuzz_handshake:
//   byte 0   segmentation: 0 feeds everything at once, n > 0 feeds n-byte
//            chunks, with bit 7 set the chunk sizes vary pseudo-randomly
//   byte 1   configuration: bit 0 set_shutting_down() before the first byte,
//            bit 1 tiny limits (max_option 64, max_skip 256, max_options 8)
//   rest     the client's byte stream, starting with its 32-bit flags
// When the handshake reports kStartTls, the harness "runs TLS" by calling
// tls_established("node-a") and feeds the rest of the input as if it came out
// of the TLS session.
//
// Invariants checked on every input:
//   - no catalog call at all before tls_established();
//   - never kTransmission without tls_active();
//   - while kStartTls, feed() consumes nothing and wanted() is 0, and out()
//     ends with the ACK to NBD_OPT_STARTTLS;
//   - before TLS the replies are NBD_REP_ERR_TLS_REQD (or ERR_SHUTDOWN), and
//     to STARTTLS and ABORT only what the spec allows; after TLS no reply is
//     ERR_TLS_REQD and a second STARTTLS is never acknowledged;
//   - out() is the greeting, then well-formed option replies, then (only
//     after NBD_OPT_EXPORT_NAME over TLS) the 10- or 134-byte export reply;
//   - every attach() after TLS carries the identity TLS authenticated;
//   - the segmented run agrees with a run that feeds everything at once.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "check.hpp"
#include "protocol/handshake.hpp"

namespace {

using nbd::Handshake;
using St = Handshake::Status;

uint64_t be(const std::string& s, size_t off, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = v << 8 | uint8_t(s[off + i]);
  return v;
}

// Two exports; counts every call so the harness can prove none came before TLS.
class Catalog : public nbd::ExportCatalog {
 public:
  Catalog() {
    add("disk", 1 << 30, nbd::kFlagSendFlush, {"base:allocation", "qemu:dirty-bitmap:x"});
    add("lab/node-a", 4096, 0, {"base:allocation"});
  }
  std::shared_ptr<const nbd::ExportInfo> find(std::string_view name) const override {
    ++calls;
    for (const auto& e : exports_)
      if (e->name == name) return e;
    return nullptr;
  }
  std::shared_ptr<const nbd::ExportInfo> attach(const nbd::Client& client, std::string_view name,
                                                std::string* why) const override {
    ++calls;
    CHECK(client.identity == "node-a");
    return lookup(name, why);
  }
  std::vector<std::shared_ptr<const nbd::ExportInfo>> list() const override {
    ++calls;
    return exports_;
  }
  bool offers(const std::shared_ptr<const nbd::ExportInfo>& e) const {
    return std::find(exports_.begin(), exports_.end(), e) != exports_.end();
  }
  mutable int calls = 0;

 private:
  void add(std::string name, uint64_t size, uint16_t flags, std::vector<std::string> contexts) {
    auto e = std::make_shared<nbd::ExportInfo>();
    e->name = std::move(name);
    e->size = size;
    e->flags = flags;
    e->contexts = std::move(contexts);
    exports_.push_back(std::move(e));
  }
  std::vector<std::shared_ptr<const nbd::ExportInfo>> exports_;
};

struct Run {
  std::string out;
  St status;
  size_t used;
  bool tls;
  size_t tls_at;       // bytes consumed when STARTTLS was acknowledged
  size_t tls_out = 0;  // size of out() then
  nbd::Session session;
};

void check_starttls_pause(Handshake& h, const uint8_t* rest, size_t n) {
  CHECK(!h.tls_active());
  CHECK(h.wanted() == 0);
  static const char ack[] = "\x00\x03\xe8\x89\x04\x55\x65\xa9\0\0\0\x05\0\0\0\x01\0\0\0\0";
  CHECK(h.out().size() >= 20 && std::memcmp(h.out().data() + h.out().size() - 20, ack, 20) == 0);
  if (n > 0) CHECK(h.feed(rest, n) == 0);
  CHECK(h.status() == St::kStartTls);
}

// Feeds `in` in chunks chosen by `seg`, running "TLS" when asked.
Run run(const uint8_t* in, size_t len, uint8_t seg, uint8_t cfg) {
  nbd::HandshakeLimits limits;
  if (cfg & 2) limits = {64, 256, 8};
  Catalog cat;
  Handshake h(cat, limits, nbd::TlsMode::kRequire);
  h.set_client({"10.0.0.9", "spoofed"});
  if (cfg & 1) h.set_shutting_down();
  Run r{};
  Chunker chunks(seg);
  size_t pos = 0;
  while (pos < len) {
    size_t n = chunks.next(len - pos);
    size_t used = h.feed(in + pos, n);
    CHECK(used <= n);
    pos += used;
    if (!h.tls_active()) CHECK(cat.calls == 0);
    if (h.status() == St::kStartTls) {
      check_starttls_pause(h, in + pos, len - pos);
      CHECK(!r.tls);
      r.tls = true;
      r.tls_at = pos;
      r.tls_out = h.out().size();
      h.tls_established("node-a");
      CHECK(h.tls_active() && h.status() == St::kContinue && h.wanted() == 16);
      continue;
    }
    if (h.status() != St::kContinue) break;
    CHECK(used == n);
  }
  CHECK(h.tls_active() == r.tls);
  if (h.status() == St::kTransmission) CHECK(h.tls_active());
  if (h.status() == St::kClosed) CHECK(!h.close_reason().empty());
  h.take_errors();
  r.out = h.out();
  r.status = h.status();
  r.used = pos;
  r.session = h.session();
  if (r.status == St::kTransmission) CHECK(cat.offers(r.session.exp));
  return r;
}

bool error(uint32_t t) { return t & 0x80000000u; }

// What the spec lets a FORCEDTLS server answer before TLS.
void check_before_tls(uint32_t opt, uint32_t type) {
  switch (opt) {
    case nbd::kOptStartTls:
      CHECK(type == nbd::kRepAck || type == nbd::kRepErrInvalid || type == nbd::kRepErrTooBig ||
            type == nbd::kRepErrShutdown);
      break;
    case nbd::kOptAbort: CHECK(type == nbd::kRepAck || type == nbd::kRepErrTooBig); break;
    default: CHECK(type == nbd::kRepErrTlsReqd || type == nbd::kRepErrShutdown); break;
  }
}

void check_output(const Run& r, bool no_zeroes) {
  static const char greeting[] = "NBDMAGICIHAVEOPT\x00\x03";
  CHECK(r.out.size() >= 18 && std::memcmp(r.out.data(), greeting, 18) == 0);
  static const char reply_magic[] = "\x00\x03\xe8\x89\x04\x55\x65\xa9";
  const size_t boundary = r.tls ? r.tls_out : r.out.size();
  size_t p = 18;
  int starttls_acks = 0;
  uint32_t last_opt = 0, last_type = 0;
  while (r.out.size() - p >= 8 && std::memcmp(r.out.data() + p, reply_magic, 8) == 0) {
    CHECK(r.out.size() - p >= 20);
    const uint32_t opt = uint32_t(be(r.out, p + 8, 4));
    const uint32_t type = uint32_t(be(r.out, p + 12, 4));
    const uint32_t dlen = uint32_t(be(r.out, p + 16, 4));
    CHECK(r.out.size() - p - 20 >= dlen);
    const bool before_tls = p < boundary;
    if (before_tls) {
      CHECK(p + 20 + dlen <= boundary);
      check_before_tls(opt, type);
    } else {
      CHECK(type != nbd::kRepErrTlsReqd);
      CHECK(!(opt == nbd::kOptStartTls && type == nbd::kRepAck));
    }
    if (error(type)) CHECK(dlen > 0 && dlen <= 4096);
    if (type == nbd::kRepAck) CHECK(dlen == 0);
    if (type == nbd::kRepInfo || type == nbd::kRepServer || type == nbd::kRepMetaContext)
      CHECK(!before_tls);
    starttls_acks += opt == nbd::kOptStartTls && type == nbd::kRepAck;
    last_opt = opt;
    last_type = type;
    p += 20 + dlen;
  }
  CHECK(starttls_acks == (r.tls ? 1 : 0));
  if (r.tls) CHECK(p >= boundary);
  const size_t tail = r.out.size() - p;
  if (tail != 0) {
    // Only NBD_OPT_EXPORT_NAME answers with something that is not an option reply.
    CHECK(r.status == St::kTransmission);
    CHECK(tail == (no_zeroes ? 10u : 134u));
    CHECK(be(r.out, p, 8) == r.session.exp->size);
    CHECK(be(r.out, p + 8, 2) == r.session.flags);
  } else if (r.status == St::kTransmission) {
    CHECK(last_opt == nbd::kOptGo && last_type == nbd::kRepAck);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const uint8_t seg = data[0], cfg = data[1];
  const uint8_t* in = data + 2;
  const size_t len = size - 2;
  Run whole = run(in, len, 0, cfg);
  Run parts = run(in, len, seg, cfg);
  CHECK(whole.out == parts.out);
  CHECK(whole.status == parts.status);
  CHECK(whole.used == parts.used);
  CHECK(whole.tls == parts.tls);
  CHECK(whole.tls_at == parts.tls_at);
  CHECK((whole.session.exp == nullptr) == (parts.session.exp == nullptr));
  if (whole.session.exp) CHECK(whole.session.exp->name == parts.session.exp->name);
  CHECK(whole.session.structured == parts.session.structured);
  CHECK(whole.session.contexts.size() == parts.session.contexts.size());
  const bool no_zeroes = len >= 4 && (in[3] & nbd::kClientFlagNoZeroes);
  check_output(whole, no_zeroes);
  return 0;
}
