// libFuzzer target: arbitrary client bytes into nbd::Handshake.
//
// Input layout (see make_corpus.py):
//   byte 0   segmentation: 0 feeds everything at once, n > 0 feeds n-byte
//            chunks, with bit 7 set the chunk sizes vary pseudo-randomly
//   byte 1   configuration: bit 0 set_shutting_down() before the first byte,
//            bit 1 tiny limits (max_option 64, max_skip 256, max_options 8),
//            bit 2 the segmented run defers every attach and description
//            (set_defer_attach), made by the driver at each kAttaching
//   rest     the client's byte stream, starting with its 32-bit flags
//
// Invariants checked on every input:
//   - feed() never consumes more than it is given, and consumes everything
//     while the handshake continues;
//   - once kClosed or kTransmission, the status, out() and wanted() stay put
//     and feed() consumes nothing;
//   - the segmented run produces exactly the bytes, status and session of a
//     run that feeds everything at once, with or without deferred attaches;
//   - while kAttaching, feed() consumes nothing;
//   - out() is the 18-byte greeting, then well-formed option replies, then
//     (only after NBD_OPT_EXPORT_NAME) the 10- or 134-byte export reply;
//   - a session in transmission is consistent with what was negotiated.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "protocol/handshake.hpp"
#include "check.hpp"

namespace {


using nbd::Handshake;

uint64_t be(const std::string& s, size_t off, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = v << 8 | uint8_t(s[off + i]);
  return v;
}

class Catalog : public nbd::ExportCatalog {
 public:
  Catalog() {
    add("disk", "main disk", 1 << 30, nbd::kFlagSendFlush | nbd::kFlagSendFua | nbd::kFlagSendTrim,
        {"base:allocation", "qemu:dirty-bitmap:x"});
    add("ro", "", 4096, nbd::kFlagReadOnly, {"base:allocation"});
    add("", "default", 512, 0, {});
  }
  std::shared_ptr<const nbd::ExportInfo> find(std::string_view name) const override {
    for (const auto& e : exports_)
      if (e->name == name) return e;
    return nullptr;
  }
  std::vector<std::shared_ptr<const nbd::ExportInfo>> list() const override { return exports_; }

 private:
  void add(std::string name, std::string desc, uint64_t size, uint16_t flags,
           std::vector<std::string> contexts) {
    auto e = std::make_shared<nbd::ExportInfo>();
    e->name = std::move(name);
    e->description = std::move(desc);
    e->size = size;
    e->flags = flags;
    e->contexts = std::move(contexts);
    exports_.push_back(std::move(e));
  }
  std::vector<std::shared_ptr<const nbd::ExportInfo>> exports_;
};

const Catalog& catalog() {
  static const Catalog c;
  return c;
}

// The same exports, every call of which "may block".
class Deferring : public nbd::ExportCatalog {
 public:
  std::shared_ptr<const nbd::ExportInfo> find(std::string_view name) const override {
    return catalog().find(name);
  }
  bool attach_may_block(const nbd::Client&, std::string_view) const override { return true; }
  std::vector<std::shared_ptr<const nbd::ExportInfo>> list() const override {
    return catalog().list();
  }
};

const Deferring& deferring() {
  static const Deferring c;
  return c;
}

struct Run {
  std::string out;
  Handshake::Status status;
  size_t used;
  bool aborted;
  nbd::Session session;
};

// Feeds `in` in chunks chosen by `seg` and checks the per-call invariants.
Run run(const uint8_t* in, size_t len, uint8_t seg, uint8_t cfg, bool defer) {
  nbd::HandshakeLimits limits;
  if (cfg & 2) limits = {64, 256, 8};
  const nbd::ExportCatalog& cat =
      defer ? static_cast<const nbd::ExportCatalog&>(deferring()) : catalog();
  Handshake h(cat, limits);
  h.set_defer_attach(defer);
  if (cfg & 1) h.set_shutting_down();
  Chunker chunks(seg);
  size_t pos = 0;
  while (pos < len) {
    size_t n = chunks.next(len - pos);
    size_t used = h.feed(in + pos, n);
    CHECK(used <= n);
    pos += used;
    if (h.status() == Handshake::Status::kAttaching) {
      CHECK(defer);
      if (pos < len) CHECK(h.feed(in + pos, len - pos) == 0);
      std::string why;
      auto e = h.deferred_call().run(cat, &why);
      h.attach_done(std::move(e), why);
      CHECK(h.status() != Handshake::Status::kAttaching);
      if (h.status() == Handshake::Status::kContinue) continue;
    }
    if (h.status() != Handshake::Status::kContinue) break;
    CHECK(used == n);
    CHECK(h.wanted() > 0 || h.status() != Handshake::Status::kContinue);
  }
  if (h.status() != Handshake::Status::kContinue) {
    // Terminal states are sticky.
    auto st = h.status();
    std::string before = h.out();
    if (pos < len) CHECK(h.feed(in + pos, len - pos) == 0);
    static const uint8_t more[] = "IHAVEOPT\0\0\0\x03\0\0\0\0";
    CHECK(h.feed(more, sizeof more - 1) == 0);
    CHECK(h.status() == st);
    CHECK(h.out() == before);
    CHECK(h.wanted() == 0);
    CHECK(h.close_reason().empty() == (st == Handshake::Status::kTransmission));
  } else {
    CHECK(h.close_reason().empty());
  }
  CHECK(!h.aborted() || h.status() == Handshake::Status::kClosed);
  h.take_errors();
  return {h.out(), h.status(), pos, h.aborted(), h.session()};
}

bool known_reply(uint32_t t) {
  return (t >= 1 && t <= 4) || (t >= (0x80000000u | 1) && t <= (0x80000000u | 10));
}

// Parses everything after the greeting. Returns the option of the last reply.
void check_output(const Run& r, bool no_zeroes) {
  static const char greeting[] = "NBDMAGICIHAVEOPT\x00\x03";
  CHECK(r.out.size() >= 18);
  CHECK(std::memcmp(r.out.data(), greeting, 18) == 0);
  static const char reply_magic[] = "\x00\x03\xe8\x89\x04\x55\x65\xa9";
  size_t p = 18;
  uint32_t last_opt = 0, last_type = 0;
  while (r.out.size() - p >= 8 && std::memcmp(r.out.data() + p, reply_magic, 8) == 0) {
    CHECK(r.out.size() - p >= 20);
    uint32_t opt = uint32_t(be(r.out, p + 8, 4));
    uint32_t type = uint32_t(be(r.out, p + 12, 4));
    uint32_t dlen = uint32_t(be(r.out, p + 16, 4));
    CHECK(r.out.size() - p - 20 >= dlen);
    std::string d = r.out.substr(p + 20, dlen);
    CHECK(known_reply(type));
    if (type & 0x80000000u) CHECK(dlen > 0 && dlen <= 4096);  // an error message
    switch (type) {
      case nbd::kRepAck: CHECK(dlen == 0); break;
      case nbd::kRepServer:
        CHECK(opt == nbd::kOptList);
        CHECK(dlen >= 4 && be(d, 0, 4) <= dlen - 4);
        break;
      case nbd::kRepInfo: {
        CHECK(opt == nbd::kOptInfo || opt == nbd::kOptGo);
        CHECK(dlen >= 2);
        uint16_t info = uint16_t(be(d, 0, 2));
        if (info == nbd::kInfoExport) {
          CHECK(dlen == 12);
          CHECK(be(d, 10, 2) & nbd::kFlagHasFlags);
        }
        if (info == nbd::kInfoBlockSize) CHECK(dlen == 14);
        CHECK(info <= nbd::kInfoBlockSize);
        break;
      }
      case nbd::kRepMetaContext:
        CHECK(opt == nbd::kOptListMetaContext || opt == nbd::kOptSetMetaContext);
        CHECK(dlen > 4);
        if (opt == nbd::kOptListMetaContext) CHECK(be(d, 0, 4) == 0);
        else CHECK(be(d, 0, 4) != 0);
        break;
      default: break;
    }
    last_opt = opt;
    last_type = type;
    p += 20 + dlen;
  }
  const size_t tail = r.out.size() - p;
  if (tail != 0) {
    // Only NBD_OPT_EXPORT_NAME answers with something that is not an option reply.
    CHECK(r.status == Handshake::Status::kTransmission);
    CHECK(tail == (no_zeroes ? 10u : 134u));
    CHECK(be(r.out, p, 8) == r.session.exp->size);
    CHECK(be(r.out, p + 8, 2) == r.session.flags);
    for (size_t i = p + 10; i < r.out.size(); ++i) CHECK(r.out[i] == 0);
  } else if (r.status == Handshake::Status::kTransmission) {
    // Entered through NBD_OPT_GO: its ACK is the last thing sent.
    CHECK(last_opt == nbd::kOptGo && last_type == nbd::kRepAck);
  }
  if (r.aborted) CHECK(last_opt == nbd::kOptAbort && last_type == nbd::kRepAck);
}

void check_session(const Run& r) {
  if (r.status != Handshake::Status::kTransmission) return;
  const nbd::Session& s = r.session;
  CHECK(s.exp != nullptr);
  CHECK(catalog().find(s.exp->name) == s.exp);
  CHECK(s.flags & nbd::kFlagHasFlags);
  CHECK(bool(s.flags & nbd::kFlagSendDf) == s.structured);
  CHECK(!s.extended || s.structured);
  CHECK(s.contexts.empty() || s.structured);
  std::set<uint32_t> ids;
  for (const auto& c : s.contexts) {
    CHECK(c.id != 0);
    CHECK(ids.insert(c.id).second);
    bool offered = false;
    for (const auto& name : s.exp->contexts) offered |= name == c.name;
    CHECK(offered);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const uint8_t seg = data[0], cfg = data[1];
  const uint8_t* in = data + 2;
  const size_t len = size - 2;
  Run whole = run(in, len, 0, cfg, false);
  Run parts = run(in, len, seg, cfg, cfg & 4);
  CHECK(whole.out == parts.out);
  CHECK(whole.status == parts.status);
  CHECK(whole.used == parts.used);
  CHECK(whole.aborted == parts.aborted);
  CHECK(whole.session.exp == parts.session.exp);
  CHECK(whole.session.flags == parts.session.flags);
  CHECK(whole.session.contexts.size() == parts.session.contexts.size());
  const bool no_zeroes = len >= 4 && (in[3] & nbd::kClientFlagNoZeroes);
  check_output(whole, no_zeroes);
  check_session(whole);
  return 0;
}
