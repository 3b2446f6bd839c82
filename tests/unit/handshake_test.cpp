// Tests for protocol/handshake.{hpp,cpp}: the fixed-newstyle handshake driven
// with plain byte strings.
//
// Every scenario goes through drive(), which feeds the same client bytes three
// ways (all at once, one byte at a time, in 7-byte chunks) and checks that the
// output, status, consumed count and session agree. Replies are decoded with
// the small big-endian reader below, not with the code under test.
#include "protocol/handshake.hpp"

#include <gtest/gtest.h>

#include "test_bytes.hpp"

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace nbd {
namespace {

using testing::be;
using testing::be16;
using testing::be32;
using testing::rd;

// Literal constants from the spec, spelled out so a wrong constant in wire.hpp
// would make these tests fail.
const std::string kServerGreeting = std::string("NBDMAGIC") + "IHAVEOPT" + std::string("\x00\x03", 2);
const std::string kIHaveOpt = "IHAVEOPT";
const std::string kReplyMagic("\x00\x03\xe8\x89\x04\x55\x65\xa9", 8);
constexpr uint32_t ACK = 1, SERVER = 2, INFO = 3, META = 4;
constexpr uint32_t ERR_UNSUP = 0x80000001, ERR_INVALID = 0x80000003, ERR_TLS_REQD = 0x80000005,
                   ERR_UNKNOWN = 0x80000006, ERR_SHUTDOWN = 0x80000007, ERR_TOO_BIG = 0x80000009,
                   ERR_EXT_HEADER_REQD = 0x8000000a;
constexpr uint32_t OPT_EXPORT_NAME = 1, OPT_ABORT = 2, OPT_LIST = 3, OPT_PEEK = 4,
                   OPT_STARTTLS = 5, OPT_INFO = 6, OPT_GO = 7, OPT_STRUCTURED = 8,
                   OPT_LIST_META = 9, OPT_SET_META = 10, OPT_EXTENDED = 11;
constexpr uint16_t HAS_FLAGS = 1, READ_ONLY = 2, SEND_FLUSH = 4, SEND_DF = 0x80;

// ---- Client message builders ----

std::string client_flags(uint32_t f = 1) { return be32(f); }
std::string opt(uint32_t o, const std::string& data = {}) {
  return kIHaveOpt + be32(o) + be32(uint32_t(data.size())) + data;
}
std::string info_data(const std::string& name, std::vector<uint16_t> reqs = {}) {
  std::string d = be32(uint32_t(name.size())) + name + be16(uint16_t(reqs.size()));
  for (uint16_t r : reqs) d += be16(r);
  return d;
}
std::string meta_data(const std::string& name, const std::vector<std::string>& queries) {
  std::string d = be32(uint32_t(name.size())) + name + be32(uint32_t(queries.size()));
  for (const auto& q : queries) d += be32(uint32_t(q.size())) + q;
  return d;
}

// ---- Test double of the catalog ----

class FakeCatalog : public ExportCatalog {
 public:
  void add(ExportInfo e) { exports_.push_back(std::make_shared<const ExportInfo>(std::move(e))); }
  std::shared_ptr<const ExportInfo> find(std::string_view name) const override {
    for (const auto& e : exports_)
      if (e->name == name) return e;
    return nullptr;
  }
  std::vector<std::shared_ptr<const ExportInfo>> list() const override { return exports_; }

 private:
  std::vector<std::shared_ptr<const ExportInfo>> exports_;
};

FakeCatalog& catalog() {
  static FakeCatalog* cat = [] {
    auto* c = new FakeCatalog;
    ExportInfo disk;
    disk.name = "disk";
    disk.description = "the main disk";
    disk.size = 0x0000000140000000ULL;  // 5 GiB
    disk.flags = SEND_FLUSH;
    disk.min_block = 512;
    disk.preferred_block = 4096;
    disk.max_block = 1 << 20;
    disk.contexts = {"base:allocation", "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"};
    c->add(disk);
    ExportInfo ro;
    ro.name = "ro";
    ro.size = 1024;
    ro.flags = READ_ONLY;
    ro.contexts = {"base:allocation"};
    c->add(ro);
    ExportInfo def;  // the default export, empty name, no description
    def.name = "";
    def.size = 7;
    c->add(def);
    return c;
  }();
  return *cat;
}

// The same exports, but every attach may block: a handshake with deferred
// attaches leaves each GO and EXPORT_NAME to its caller. Counts attaches.
class DeferringCatalog : public ExportCatalog {
 public:
  std::shared_ptr<const ExportInfo> find(std::string_view name) const override {
    return catalog().find(name);
  }
  std::shared_ptr<const ExportInfo> attach(const Client& client, std::string_view name,
                                           std::string* why) const override {
    ++attaches;
    return catalog().attach(client, name, why);
  }
  std::shared_ptr<const ExportInfo> describe(const Client& client, std::string_view name,
                                             std::string* why) const override {
    ++attaches;
    return catalog().describe(client, name, why);
  }
  bool attach_may_block(const Client&, std::string_view) const override { return true; }
  std::vector<std::shared_ptr<const ExportInfo>> list() const override { return catalog().list(); }
  mutable int attaches = 0;
};

DeferringCatalog& deferring() {
  static DeferringCatalog* cat = new DeferringCatalog;
  return *cat;
}

// ---- Driver ----

struct Reply {
  uint32_t opt;
  uint32_t type;
  std::string data;
};

struct Outcome {
  std::string out;  // everything after the greeting
  Handshake::Status status;
  size_t used;
  bool aborted;
  Session session;
  std::vector<std::string> errors;
  std::string close_reason;
  std::vector<size_t> starttls_at;  // bytes consumed when each STARTTLS was acknowledged
  bool tls_active;
};

struct Options {
  HandshakeLimits limits{};
  bool shutting_down = false;
  TlsMode tls = TlsMode::kOff;
  // Deferred attaches: each GO and EXPORT_NAME stops the handshake until
  // the driver attaches (as a server's worker thread would) and reports it.
  bool defer = false;
};

// Feeds `in` `chunk` bytes at a time (0: all at once). When the handshake
// asks for TLS, it is "established" at once and the rest goes on in the clear,
// as if it had come out of the TLS session.
Outcome run_chunked(const std::string& in, size_t chunk, const Options& o) {
  const ExportCatalog& cat = o.defer ? static_cast<const ExportCatalog&>(deferring()) : catalog();
  Handshake h(cat, o.limits, o.tls);
  h.set_defer_attach(o.defer);
  if (o.shutting_down) h.set_shutting_down();
  Outcome r{};
  size_t pos = 0;
  while (pos < in.size()) {
    size_t n = chunk ? std::min(chunk, in.size() - pos) : in.size() - pos;
    size_t used = h.feed(reinterpret_cast<const uint8_t*>(in.data() + pos), n);
    EXPECT_LE(used, n);
    pos += used;
    if (h.status() == Handshake::Status::kAttaching) {
      // Nothing more is taken until the attach is done.
      if (pos < in.size()) {
        EXPECT_EQ(0u, h.feed(reinterpret_cast<const uint8_t*>(in.data() + pos), in.size() - pos));
      }
      std::string why;
      auto e = h.deferred_call().run(cat, &why);
      h.attach_done(std::move(e), why);
      if (h.status() == Handshake::Status::kContinue) continue;
    }
    if (h.status() == Handshake::Status::kStartTls) {
      EXPECT_EQ(h.wanted(), 0u);
      r.starttls_at.push_back(pos);
      h.tls_established("node-a");
      continue;
    }
    if (h.status() != Handshake::Status::kContinue && h.status() != Handshake::Status::kAttaching) {
      // Once done, the handshake takes nothing more.
      if (pos < in.size()) {
        EXPECT_EQ(0u, h.feed(reinterpret_cast<const uint8_t*>(in.data() + pos), in.size() - pos));
      }
      break;
    }
    EXPECT_EQ(used, n) << "a handshake still in progress must take everything";
    if (used != n) break;
  }
  EXPECT_EQ(h.out().substr(0, kServerGreeting.size()), kServerGreeting);
  r.out = h.out().substr(kServerGreeting.size());
  r.status = h.status();
  r.used = pos;
  r.aborted = h.aborted();
  r.session = h.session();
  r.errors = h.take_errors();
  r.close_reason = h.close_reason();
  r.tls_active = h.tls_active();
  if (r.status == Handshake::Status::kClosed) {
    EXPECT_FALSE(h.close_reason().empty());
  } else {
    EXPECT_TRUE(h.close_reason().empty());
  }
  return r;
}

void expect_same(const Outcome& a, const Outcome& b, const char* how) {
  EXPECT_EQ(a.out, b.out) << how;
  EXPECT_EQ(a.status, b.status) << how;
  EXPECT_EQ(a.used, b.used) << how;
  EXPECT_EQ(a.aborted, b.aborted) << how;
  EXPECT_EQ(a.session.exp, b.session.exp) << how;
  EXPECT_EQ(a.session.flags, b.session.flags) << how;
  EXPECT_EQ(a.session.structured, b.session.structured) << how;
  EXPECT_EQ(a.session.extended, b.session.extended) << how;
  ASSERT_EQ(a.session.contexts.size(), b.session.contexts.size()) << how;
  for (size_t i = 0; i < a.session.contexts.size(); ++i) {
    EXPECT_EQ(a.session.contexts[i].id, b.session.contexts[i].id) << how;
    EXPECT_EQ(a.session.contexts[i].name, b.session.contexts[i].name) << how;
  }
  EXPECT_EQ(a.errors, b.errors) << how;
  EXPECT_EQ(a.starttls_at, b.starttls_at) << how;
  EXPECT_EQ(a.tls_active, b.tls_active) << how;
}

// Runs `in` (client flags included) all at once, byte by byte and in 7-byte
// chunks, and checks the three agree.
// Every run is also made with deferred attaches, which must answer alike.
Outcome drive(const std::string& in, const Options& o = {}) {
  Outcome whole = run_chunked(in, 0, o);
  expect_same(whole, run_chunked(in, 1, o), "byte-at-a-time differs from all-at-once");
  expect_same(whole, run_chunked(in, 7, o), "7-byte chunks differ from all-at-once");
  if (!o.defer) {
    Options d = o;
    d.defer = true;
    expect_same(whole, run_chunked(in, 0, d), "deferred attaches differ from synchronous ones");
    expect_same(whole, run_chunked(in, 1, d), "deferred attaches, byte-at-a-time, differ");
  }
  return whole;
}

// Splits option replies; `tail` receives bytes that are not a whole reply.
std::vector<Reply> parse_replies(const std::string& out, std::string* tail = nullptr) {
  std::vector<Reply> v;
  size_t p = 0;
  while (out.size() - p >= 20 && out.compare(p, 8, kReplyMagic) == 0) {
    uint32_t len = uint32_t(rd(out, p + 16, 4));
    if (out.size() - p - 20 < len) break;
    v.push_back({uint32_t(rd(out, p + 8, 4)), uint32_t(rd(out, p + 12, 4)), out.substr(p + 20, len)});
    p += 20 + len;
  }
  if (tail) {
    *tail = out.substr(p);
  } else {
    EXPECT_EQ(p, out.size()) << "trailing bytes that are not an option reply";
  }
  return v;
}

void expect_reply(const Reply& r, uint32_t o, uint32_t type) {
  EXPECT_EQ(r.opt, o);
  EXPECT_EQ(r.type, type) << "reply type 0x" << std::hex << r.type;
  if (type & 0x80000000u) {
    EXPECT_FALSE(r.data.empty()) << "errors carry a message";
  }
  if (type == ACK) {
    EXPECT_TRUE(r.data.empty());
  }
}

// INFO_EXPORT payload: type, size, flags.
void expect_info_export(const Reply& r, uint32_t o, uint64_t size, uint16_t flags) {
  expect_reply(r, o, INFO);
  ASSERT_EQ(r.data.size(), 12u);
  EXPECT_EQ(rd(r.data, 0, 2), 0u);
  EXPECT_EQ(rd(r.data, 2, 8), size);
  EXPECT_EQ(rd(r.data, 10, 2), flags);
}

void expect_info_block_size(const Reply& r, uint32_t o, uint32_t mn, uint32_t pref, uint32_t mx) {
  expect_reply(r, o, INFO);
  ASSERT_EQ(r.data.size(), 14u);
  EXPECT_EQ(rd(r.data, 0, 2), 3u);
  EXPECT_EQ(rd(r.data, 2, 4), mn);
  EXPECT_EQ(rd(r.data, 6, 4), pref);
  EXPECT_EQ(rd(r.data, 10, 4), mx);
}

// The checks a reply to LIST must pass, used to prove "the next option works".
void expect_list_ok(const Reply* r, size_t n) {
  ASSERT_EQ(n, 4u);
  expect_reply(r[0], OPT_LIST, SERVER);
  expect_reply(r[1], OPT_LIST, SERVER);
  expect_reply(r[2], OPT_LIST, SERVER);
  expect_reply(r[3], OPT_LIST, ACK);
}

using St = Handshake::Status;

// ---- Greeting and client flags ----

TEST(HandshakeGreeting, ExactBytesAndWaitsForClientFlags) {
  Handshake h(catalog());
  EXPECT_EQ(h.out(), kServerGreeting);
  EXPECT_EQ(h.out().size(), 18u);
  EXPECT_EQ(h.status(), St::kContinue);
  EXPECT_EQ(h.wanted(), 4u);
  EXPECT_EQ(h.feed(nullptr, 0), 0u);
  EXPECT_EQ(h.status(), St::kContinue);
}

TEST(HandshakeGreeting, KnownClientFlagsAccepted) {
  for (uint32_t f : {0u, 1u, 2u, 3u}) {
    Outcome r = drive(client_flags(f));
    EXPECT_EQ(r.status, St::kContinue) << f;
    EXPECT_EQ(r.out, "") << f;
    EXPECT_EQ(r.used, 4u);
  }
  Handshake h(catalog());
  std::string f = client_flags(3);
  h.feed(reinterpret_cast<const uint8_t*>(f.data()), 4);
  EXPECT_EQ(h.wanted(), 16u);  // an option header
}

TEST(HandshakeGreeting, UnknownClientFlagsClose) {
  for (uint32_t f : {4u, 5u, 0x80000000u, 0xffffffffu}) {
    Outcome r = drive(client_flags(f) + opt(OPT_LIST));
    EXPECT_EQ(r.status, St::kClosed) << f;
    EXPECT_EQ(r.out, "") << f;
    EXPECT_EQ(r.used, 4u) << "the option after the flags is not consumed";
  }
}

TEST(HandshakeOptions, BadOptionMagicCloses) {
  std::string bad = "IHAVEOPX" + be32(OPT_LIST) + be32(0);
  Outcome r = drive(client_flags() + bad + opt(OPT_LIST));
  EXPECT_EQ(r.status, St::kClosed);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(r.used, 4u + 16u);
}

// ---- NBD_OPT_EXPORT_NAME ----

TEST(HandshakeExportName, KnownSendsSizeFlagsAndZeroes) {
  Outcome r = drive(client_flags(1) + opt(OPT_EXPORT_NAME, "disk"));
  ASSERT_EQ(r.status, St::kTransmission);
  ASSERT_EQ(r.out.size(), 8u + 2u + 124u);
  EXPECT_EQ(rd(r.out, 0, 8), 0x140000000ULL);
  EXPECT_EQ(rd(r.out, 8, 2), HAS_FLAGS | SEND_FLUSH);
  EXPECT_EQ(r.out.substr(10), std::string(124, '\0'));
  ASSERT_TRUE(r.session.exp);
  EXPECT_EQ(r.session.exp->name, "disk");
  EXPECT_EQ(r.session.flags, HAS_FLAGS | SEND_FLUSH);
  EXPECT_FALSE(r.session.structured);
  EXPECT_FALSE(r.session.extended);
  EXPECT_FALSE(r.aborted);
}

TEST(HandshakeExportName, NoZeroesOmitsPadding) {
  Outcome r = drive(client_flags(3) + opt(OPT_EXPORT_NAME, "ro"));
  ASSERT_EQ(r.status, St::kTransmission);
  ASSERT_EQ(r.out.size(), 10u);
  EXPECT_EQ(rd(r.out, 0, 8), 1024u);
  EXPECT_EQ(rd(r.out, 8, 2), HAS_FLAGS | READ_ONLY);
}

TEST(HandshakeExportName, EmptyNameIsTheDefaultExport) {
  Outcome r = drive(client_flags(3) + opt(OPT_EXPORT_NAME));
  ASSERT_EQ(r.status, St::kTransmission);
  EXPECT_EQ(r.session.exp->name, "");
  EXPECT_EQ(rd(r.out, 0, 8), 7u);
}

TEST(HandshakeExportName, UnknownCloses) {
  for (std::string name : {std::string("nope"), std::string("disk\0", 5), std::string(5000, 'a')}) {
    Outcome r = drive(client_flags() + opt(OPT_EXPORT_NAME, name));
    EXPECT_EQ(r.status, St::kClosed);
    EXPECT_EQ(r.out, "") << "EXPORT_NAME can not be answered with an error";
    EXPECT_FALSE(r.session.exp);
  }
}

TEST(HandshakeExportName, AfterStructuredCarriesDf) {
  Outcome r = drive(client_flags(3) + opt(OPT_STRUCTURED) + opt(OPT_EXPORT_NAME, "disk"));
  ASSERT_EQ(r.status, St::kTransmission);
  std::string tail;
  auto reps = parse_replies(r.out, &tail);
  ASSERT_EQ(reps.size(), 1u);
  expect_reply(reps[0], OPT_STRUCTURED, ACK);
  ASSERT_EQ(tail.size(), 10u);
  EXPECT_EQ(rd(tail, 8, 2), HAS_FLAGS | SEND_FLUSH | SEND_DF);
  EXPECT_EQ(r.session.flags, HAS_FLAGS | SEND_FLUSH | SEND_DF);
  EXPECT_TRUE(r.session.structured);
}

// The spec: "If the chosen export does not exist ... the server MUST terminate
// the session." EXPORT_NAME has no error reply, so an over-long name (data
// beyond max_option) must close rather than get NBD_REP_ERR_TOO_BIG, which the
// client would read as the start of its export size.
TEST(HandshakeExportName, OverlongNameClosesInsteadOfTooBig) {
  Options o;
  o.limits.max_option = 64;
  Outcome r = drive(client_flags() + opt(OPT_EXPORT_NAME, std::string(100, 'x')) + opt(OPT_LIST), o);
  EXPECT_EQ(r.status, St::kClosed);
  EXPECT_EQ(r.out, "") << "no option reply may answer NBD_OPT_EXPORT_NAME";
}

// ---- NBD_OPT_ABORT ----

TEST(HandshakeAbort, AcksThenCloses) {
  Outcome r = drive(client_flags() + opt(OPT_ABORT) + opt(OPT_LIST));
  EXPECT_EQ(r.status, St::kClosed);
  EXPECT_TRUE(r.aborted);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 1u);
  expect_reply(reps[0], OPT_ABORT, ACK);
  EXPECT_EQ(r.used, 4u + 16u) << "bytes after ABORT are not consumed";
}

TEST(HandshakeAbort, DataIsIgnored) {
  Outcome r = drive(client_flags() + opt(OPT_ABORT, "junk"));
  EXPECT_EQ(r.status, St::kClosed);
  EXPECT_TRUE(r.aborted);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 1u);
  expect_reply(reps[0], OPT_ABORT, ACK);
}

TEST(HandshakeAbort, OtherCloseIsNotAbort) {
  Outcome r = drive(client_flags() + opt(OPT_EXPORT_NAME, "nope"));
  EXPECT_EQ(r.status, St::kClosed);
  EXPECT_FALSE(r.aborted);
}

// ---- NBD_OPT_LIST ----

TEST(HandshakeList, OneServerReplyPerExportThenAck) {
  Outcome r = drive(client_flags() + opt(OPT_LIST));
  EXPECT_EQ(r.status, St::kContinue);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 4u);
  expect_reply(reps[0], OPT_LIST, SERVER);
  EXPECT_EQ(reps[0].data, be32(4) + "disk" + "the main disk");
  expect_reply(reps[1], OPT_LIST, SERVER);
  EXPECT_EQ(reps[1].data, be32(2) + "ro");
  expect_reply(reps[2], OPT_LIST, SERVER);
  EXPECT_EQ(reps[2].data, be32(0));
  expect_reply(reps[3], OPT_LIST, ACK);
}

TEST(HandshakeList, WithDataIsInvalidAndNextOptionWorks) {
  Outcome r = drive(client_flags() + opt(OPT_LIST, "x") + opt(OPT_LIST));
  EXPECT_EQ(r.status, St::kContinue);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 5u);
  expect_reply(reps[0], OPT_LIST, ERR_INVALID);
  expect_list_ok(&reps[1], 4);
  ASSERT_EQ(r.errors.size(), 1u);
  EXPECT_NE(r.errors[0].find("NBD_REP_ERR_INVALID"), std::string::npos);
}

// ---- NBD_OPT_INFO and NBD_OPT_GO ----

TEST(HandshakeInfo, MinimalReplyThenStaysInOptions) {
  Outcome r = drive(client_flags() + opt(OPT_INFO, info_data("disk")));
  EXPECT_EQ(r.status, St::kContinue);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 3u);
  expect_info_export(reps[0], OPT_INFO, 0x140000000ULL, HAS_FLAGS | SEND_FLUSH);
  expect_info_block_size(reps[1], OPT_INFO, 512, 4096, 1 << 20);
  expect_reply(reps[2], OPT_INFO, ACK);
  EXPECT_FALSE(r.session.exp);
}

TEST(HandshakeInfo, NameAndDescriptionOnlyWhenRequested) {
  Outcome r = drive(client_flags() + opt(OPT_INFO, info_data("disk", {2, 1, 3, 77})));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 5u);
  expect_info_export(reps[0], OPT_INFO, 0x140000000ULL, HAS_FLAGS | SEND_FLUSH);
  expect_reply(reps[1], OPT_INFO, INFO);
  EXPECT_EQ(reps[1].data, be16(1) + "disk");
  expect_reply(reps[2], OPT_INFO, INFO);
  EXPECT_EQ(reps[2].data, be16(2) + "the main disk");
  expect_info_block_size(reps[3], OPT_INFO, 512, 4096, 1 << 20);
  expect_reply(reps[4], OPT_INFO, ACK);

  // Only NAME.
  r = drive(client_flags() + opt(OPT_INFO, info_data("disk", {1})));
  reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 4u);
  EXPECT_EQ(reps[1].data, be16(1) + "disk");
  expect_info_block_size(reps[2], OPT_INFO, 512, 4096, 1 << 20);
}

TEST(HandshakeInfo, EmptyDescriptionIsNotSent) {
  Outcome r = drive(client_flags() + opt(OPT_INFO, info_data("ro", {2})));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 3u);
  expect_info_export(reps[0], OPT_INFO, 1024, HAS_FLAGS | READ_ONLY);
  expect_info_block_size(reps[1], OPT_INFO, 1, 4096, 32 * 1024 * 1024);
  expect_reply(reps[2], OPT_INFO, ACK);
}

TEST(HandshakeGo, EntersTransmission) {
  Outcome r = drive(client_flags() + opt(OPT_INFO, info_data("ro")) + opt(OPT_GO, info_data("disk", {1})));
  ASSERT_EQ(r.status, St::kTransmission);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 3u + 4u);
  expect_reply(reps[2], OPT_INFO, ACK);
  expect_info_export(reps[3], OPT_GO, 0x140000000ULL, HAS_FLAGS | SEND_FLUSH);
  EXPECT_EQ(reps[4].data, be16(1) + "disk");
  expect_info_block_size(reps[5], OPT_GO, 512, 4096, 1 << 20);
  expect_reply(reps[6], OPT_GO, ACK);
  ASSERT_TRUE(r.session.exp);
  EXPECT_EQ(r.session.exp->name, "disk");
  EXPECT_EQ(r.session.flags, HAS_FLAGS | SEND_FLUSH);
  EXPECT_TRUE(r.session.contexts.empty());
}

TEST(HandshakeGo, NoZeroPaddingEvenWithoutNoZeroes) {
  Outcome r = drive(client_flags(1) + opt(OPT_GO, info_data("ro")));
  ASSERT_EQ(r.status, St::kTransmission);
  auto reps = parse_replies(r.out);  // fails on any trailing zeroes
  EXPECT_EQ(reps.back().type, ACK);
}

TEST(HandshakeGo, BytesAfterGoAreLeftUnconsumed) {
  std::string hs = client_flags() + opt(OPT_STRUCTURED) + opt(OPT_GO, info_data("disk"));
  std::string request = be32(0x25609513) + std::string(24, '\x01');
  Outcome r = drive(hs + request);
  ASSERT_EQ(r.status, St::kTransmission);
  EXPECT_EQ(r.used, hs.size());
}

TEST(HandshakeExportName, BytesAfterExportNameAreLeftUnconsumed) {
  std::string hs = client_flags(3) + opt(OPT_EXPORT_NAME, "disk");
  Outcome r = drive(hs + "TRAILING");
  ASSERT_EQ(r.status, St::kTransmission);
  EXPECT_EQ(r.used, hs.size());
}

TEST(HandshakeInfo, UnknownExportThenNextOptionWorks) {
  for (uint32_t o : {OPT_INFO, OPT_GO}) {
    Outcome r = drive(client_flags() + opt(o, info_data("nope", {1, 2})) + opt(OPT_LIST));
    EXPECT_EQ(r.status, St::kContinue);
    auto reps = parse_replies(r.out);
    ASSERT_EQ(reps.size(), 5u);
    expect_reply(reps[0], o, ERR_UNKNOWN);
    expect_list_ok(&reps[1], 4);
  }
}

TEST(HandshakeInfo, MalformedIsInvalidAndNextOptionWorks) {
  const std::vector<std::pair<const char*, std::string>> cases = {
      {"empty", ""},
      {"short name length", std::string("\0\0", 2)},
      {"name length past end", be32(10) + "disk" + be16(0)},
      {"name length huge", be32(0xffffffff) + "disk" + be16(0)},
      {"no request count", be32(4) + "disk"},
      {"count 2, one request", be32(4) + "disk" + be16(2) + be16(1)},
      {"count 0, trailing request", be32(4) + "disk" + be16(0) + be16(1)},
      {"odd trailing byte", be32(4) + "disk" + be16(1) + be16(1) + "z"},
      {"name with NUL", be32(5) + std::string("disk\0", 5) + be16(0)},
      {"name over 4096", be32(4097) + std::string(4097, 'n') + be16(0)},
  };
  for (uint32_t o : {OPT_INFO, OPT_GO}) {
    for (const auto& [what, data] : cases) {
      SCOPED_TRACE(what);
      Outcome r = drive(client_flags() + opt(o, data) + opt(OPT_LIST));
      EXPECT_EQ(r.status, St::kContinue);
      auto reps = parse_replies(r.out);
      ASSERT_EQ(reps.size(), 5u);
      expect_reply(reps[0], o, ERR_INVALID);
      expect_list_ok(&reps[1], 4);
    }
  }
}

TEST(HandshakeInfo, NameOf4096IsAllowed) {
  // Valid length, unknown export: ERR_UNKNOWN, not ERR_INVALID.
  Outcome r = drive(client_flags() + opt(OPT_INFO, info_data(std::string(4096, 'n'))));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 1u);
  expect_reply(reps[0], OPT_INFO, ERR_UNKNOWN);
}

// ---- Structured replies and extended headers ----

TEST(HandshakeStructured, AckThenDfInFlags) {
  Outcome r = drive(client_flags() + opt(OPT_STRUCTURED) + opt(OPT_GO, info_data("disk")));
  ASSERT_EQ(r.status, St::kTransmission);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 4u);
  expect_reply(reps[0], OPT_STRUCTURED, ACK);
  expect_info_export(reps[1], OPT_GO, 0x140000000ULL, HAS_FLAGS | SEND_FLUSH | SEND_DF);
  EXPECT_TRUE(r.session.structured);
  EXPECT_FALSE(r.session.extended);
  EXPECT_EQ(r.session.flags, HAS_FLAGS | SEND_FLUSH | SEND_DF);
}

TEST(HandshakeStructured, DfOnlyWhenNegotiated) {
  Outcome r = drive(client_flags() + opt(OPT_INFO, info_data("ro")) + opt(OPT_STRUCTURED) +
                    opt(OPT_INFO, info_data("ro")) + opt(OPT_GO, info_data("ro")));
  ASSERT_EQ(r.status, St::kTransmission);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 3u + 1u + 3u + 3u);
  expect_info_export(reps[0], OPT_INFO, 1024, HAS_FLAGS | READ_ONLY);
  expect_info_export(reps[4], OPT_INFO, 1024, HAS_FLAGS | READ_ONLY | SEND_DF);
  expect_info_export(reps[7], OPT_GO, 1024, HAS_FLAGS | READ_ONLY | SEND_DF);

  r = drive(client_flags() + opt(OPT_GO, info_data("ro")));
  EXPECT_EQ(r.session.flags & SEND_DF, 0);
  EXPECT_FALSE(r.session.structured);
}

TEST(HandshakeStructured, TwiceIsInvalid) {
  Outcome r = drive(client_flags() + opt(OPT_STRUCTURED) + opt(OPT_STRUCTURED) + opt(OPT_LIST));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 6u);
  expect_reply(reps[0], OPT_STRUCTURED, ACK);
  expect_reply(reps[1], OPT_STRUCTURED, ERR_INVALID);
  expect_list_ok(&reps[2], 4);
}

TEST(HandshakeStructured, WithDataIsInvalid) {
  Outcome r = drive(client_flags() + opt(OPT_STRUCTURED, "x") + opt(OPT_GO, info_data("ro")));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 4u);
  expect_reply(reps[0], OPT_STRUCTURED, ERR_INVALID);
  expect_info_export(reps[1], OPT_GO, 1024, HAS_FLAGS | READ_ONLY);  // no DF: not negotiated
  EXPECT_FALSE(r.session.structured);
}

TEST(HandshakeStructured, AfterExtendedHeadersIsExtHeaderReqd) {
  Outcome r = drive(client_flags() + opt(OPT_EXTENDED) + opt(OPT_STRUCTURED) + opt(OPT_GO, info_data("ro")));
  ASSERT_EQ(r.status, St::kTransmission);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 5u);
  expect_reply(reps[0], OPT_EXTENDED, ACK);
  expect_reply(reps[1], OPT_STRUCTURED, ERR_EXT_HEADER_REQD);
  EXPECT_TRUE(r.session.structured);
  EXPECT_TRUE(r.session.extended);
}

TEST(HandshakeExtended, AckSetsStructuredToo) {
  Outcome r = drive(client_flags() + opt(OPT_EXTENDED) + opt(OPT_GO, info_data("disk")));
  ASSERT_EQ(r.status, St::kTransmission);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 4u);
  expect_reply(reps[0], OPT_EXTENDED, ACK);
  expect_info_export(reps[1], OPT_GO, 0x140000000ULL, HAS_FLAGS | SEND_FLUSH | SEND_DF);
  EXPECT_TRUE(r.session.extended);
  EXPECT_TRUE(r.session.structured);
}

TEST(HandshakeExtended, AfterStructuredIsAccepted) {
  Outcome r = drive(client_flags() + opt(OPT_STRUCTURED) + opt(OPT_EXTENDED));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 2u);
  expect_reply(reps[0], OPT_STRUCTURED, ACK);
  expect_reply(reps[1], OPT_EXTENDED, ACK);
}

TEST(HandshakeExtended, TwiceOrWithDataIsInvalid) {
  Outcome r = drive(client_flags() + opt(OPT_EXTENDED, "x") + opt(OPT_EXTENDED) + opt(OPT_EXTENDED) + opt(OPT_LIST));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 7u);
  expect_reply(reps[0], OPT_EXTENDED, ERR_INVALID);
  expect_reply(reps[1], OPT_EXTENDED, ACK);
  expect_reply(reps[2], OPT_EXTENDED, ERR_INVALID);
  expect_list_ok(&reps[3], 4);
}

// ---- Metadata contexts ----

std::vector<std::pair<uint32_t, std::string>> meta_replies(const std::vector<Reply>& reps, uint32_t o) {
  std::vector<std::pair<uint32_t, std::string>> v;
  for (const auto& r : reps) {
    if (r.type != META) continue;
    EXPECT_EQ(r.opt, o);
    EXPECT_GE(r.data.size(), 4u);
    v.emplace_back(uint32_t(rd(r.data, 0, 4)), r.data.substr(4));
  }
  return v;
}

using Ctx = std::vector<std::pair<uint32_t, std::string>>;

TEST(HandshakeMeta, ListWithoutQueriesListsAll) {
  // Listing does not need structured replies.
  Outcome r = drive(client_flags() + opt(OPT_LIST_META, meta_data("disk", {})));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 4u);
  EXPECT_EQ(meta_replies(reps, OPT_LIST_META),
            (Ctx{{0, "base:allocation"}, {0, "qemu:dirty-bitmap:a"}, {0, "qemu:dirty-bitmap:b"}}));
  expect_reply(reps.back(), OPT_LIST_META, ACK);
}

TEST(HandshakeMeta, ListNamespaceQuery) {
  Outcome r = drive(client_flags() + opt(OPT_LIST_META, meta_data("disk", {"qemu:"})) +
                    opt(OPT_LIST_META, meta_data("disk", {"base:"})) +
                    opt(OPT_LIST_META, meta_data("disk", {"qemu:dirty-bitmap:b", "nope:x"})));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 3u + 2u + 2u);
  EXPECT_EQ(meta_replies({reps.begin(), reps.begin() + 3}, OPT_LIST_META),
            (Ctx{{0, "qemu:dirty-bitmap:a"}, {0, "qemu:dirty-bitmap:b"}}));
  expect_reply(reps[2], OPT_LIST_META, ACK);
  EXPECT_EQ(meta_replies({reps.begin() + 3, reps.begin() + 5}, OPT_LIST_META), (Ctx{{0, "base:allocation"}}));
  expect_reply(reps[4], OPT_LIST_META, ACK);
  EXPECT_EQ(meta_replies({reps.begin() + 5, reps.end()}, OPT_LIST_META), (Ctx{{0, "qemu:dirty-bitmap:b"}}));
}

TEST(HandshakeMeta, SetRequiresStructuredFirst) {
  Outcome r = drive(client_flags() + opt(OPT_SET_META, meta_data("disk", {"base:allocation"})) +
                    opt(OPT_GO, info_data("disk")));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 4u);
  expect_reply(reps[0], OPT_SET_META, ERR_INVALID);
  EXPECT_TRUE(r.session.contexts.empty());
}

TEST(HandshakeMeta, SetSelectsExactNamesWithIdsUsedLater) {
  Outcome r = drive(client_flags() + opt(OPT_STRUCTURED) +
                    opt(OPT_SET_META, meta_data("disk", {"qemu:dirty-bitmap:b", "base:allocation", "qemu:"})) +
                    opt(OPT_GO, info_data("disk")));
  ASSERT_EQ(r.status, St::kTransmission);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 1u + 3u + 3u);
  Ctx got = meta_replies({reps.begin() + 1, reps.begin() + 4}, OPT_SET_META);
  ASSERT_EQ(got.size(), 2u) << "\"qemu:\" selects nothing in SET";
  EXPECT_NE(got[0].first, 0u);
  EXPECT_NE(got[1].first, 0u);
  EXPECT_NE(got[0].first, got[1].first);
  expect_reply(reps[3], OPT_SET_META, ACK);
  ASSERT_EQ(r.session.contexts.size(), 2u);
  std::map<std::string, uint32_t> sent, kept;
  for (auto& [id, name] : got) sent[name] = id;
  for (auto& c : r.session.contexts) kept[c.name] = c.id;
  EXPECT_EQ(sent, kept);
  EXPECT_EQ(sent.count("base:allocation"), 1u);
  EXPECT_EQ(sent.count("qemu:dirty-bitmap:b"), 1u);
}

TEST(HandshakeMeta, SetUnknownContextJustAcks) {
  Outcome r = drive(client_flags() + opt(OPT_STRUCTURED) +
                    opt(OPT_SET_META, meta_data("disk", {"nope:thing", "base:"})) + opt(OPT_GO, info_data("disk")));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 2u + 3u);
  expect_reply(reps[1], OPT_SET_META, ACK);
  EXPECT_TRUE(r.session.contexts.empty());
}

TEST(HandshakeMeta, LastSetWins) {
  Outcome r = drive(client_flags() + opt(OPT_STRUCTURED) +
                    opt(OPT_SET_META, meta_data("disk", {"base:allocation"})) +
                    opt(OPT_SET_META, meta_data("disk", {})) + opt(OPT_GO, info_data("disk")));
  ASSERT_EQ(r.status, St::kTransmission);
  EXPECT_TRUE(r.session.contexts.empty()) << "zero queries select no contexts";
}

TEST(HandshakeMeta, ClearedWhenGoNamesAnotherExport) {
  Outcome r = drive(client_flags() + opt(OPT_STRUCTURED) +
                    opt(OPT_SET_META, meta_data("disk", {"base:allocation"})) + opt(OPT_GO, info_data("ro")));
  ASSERT_EQ(r.status, St::kTransmission);
  EXPECT_EQ(r.session.exp->name, "ro");
  EXPECT_TRUE(r.session.contexts.empty());

  r = drive(client_flags(3) + opt(OPT_STRUCTURED) + opt(OPT_SET_META, meta_data("disk", {"base:allocation"})) +
            opt(OPT_EXPORT_NAME, "ro"));
  ASSERT_EQ(r.status, St::kTransmission);
  EXPECT_TRUE(r.session.contexts.empty());

  r = drive(client_flags(3) + opt(OPT_STRUCTURED) + opt(OPT_SET_META, meta_data("disk", {"base:allocation"})) +
            opt(OPT_EXPORT_NAME, "disk"));
  ASSERT_EQ(r.status, St::kTransmission);
  EXPECT_EQ(r.session.contexts.size(), 1u);
}

TEST(HandshakeMeta, UnknownExport) {
  for (uint32_t o : {OPT_LIST_META, OPT_SET_META}) {
    Outcome r = drive(client_flags() + opt(OPT_STRUCTURED) + opt(o, meta_data("nope", {})) + opt(OPT_LIST));
    auto reps = parse_replies(r.out);
    ASSERT_EQ(reps.size(), 6u);
    expect_reply(reps[1], o, ERR_UNKNOWN);
    expect_list_ok(&reps[2], 4);
  }
}

TEST(HandshakeMeta, MalformedIsInvalidAndNextOptionWorks) {
  const std::vector<std::pair<const char*, std::string>> cases = {
      {"empty", ""},
      {"name length past end", be32(9) + "disk" + be32(0)},
      {"no query count", be32(4) + "disk"},
      {"query count past end", be32(4) + "disk" + be32(2) + be32(15) + "base:allocation"},
      {"query length past end", be32(4) + "disk" + be32(1) + be32(16) + "base:allocation"},
      {"query length huge", be32(4) + "disk" + be32(1) + be32(0xffffffff) + "base:allocation"},
      {"trailing bytes", meta_data("disk", {"base:allocation"}) + "zz"},
      {"query with NUL", meta_data("disk", {std::string("base:\0", 6)})},
      {"query over 4096", meta_data("disk", {"base:" + std::string(4092, 'q')})},
      {"name with NUL", meta_data(std::string("disk\0", 5), {})},
      {"name over 4096", meta_data(std::string(4097, 'n'), {})},
  };
  for (uint32_t o : {OPT_LIST_META, OPT_SET_META}) {
    for (const auto& [what, data] : cases) {
      SCOPED_TRACE(what);
      Outcome r = drive(client_flags() + opt(OPT_STRUCTURED) + opt(o, data) + opt(OPT_LIST));
      EXPECT_EQ(r.status, St::kContinue);
      auto reps = parse_replies(r.out);
      ASSERT_EQ(reps.size(), 6u);
      expect_reply(reps[1], o, ERR_INVALID);
      expect_list_ok(&reps[2], 4);
    }
  }
}

// The spec on NBD_OPT_SET_META_CONTEXT: "Issuing this command replaces all
// previously-set metadata contexts (including when this command fails)".
TEST(HandshakeMeta, FailedSetClearsEarlierSelection) {
  const std::vector<std::pair<const char*, std::string>> failing = {
      {"unknown export", meta_data("nope", {"base:allocation"})},
      {"malformed", be32(99) + "disk"},
  };
  for (const auto& [what, data] : failing) {
    SCOPED_TRACE(what);
    Outcome r = drive(client_flags() + opt(OPT_STRUCTURED) +
                      opt(OPT_SET_META, meta_data("disk", {"base:allocation"})) + opt(OPT_SET_META, data) +
                      opt(OPT_GO, info_data("disk")));
    ASSERT_EQ(r.status, St::kTransmission);
    auto reps = parse_replies(r.out);
    ASSERT_GE(reps.size(), 4u);
    EXPECT_TRUE(reps[3].type & 0x80000000u);
    EXPECT_TRUE(r.session.contexts.empty());
  }
}

// ---- Other options ----

TEST(HandshakeOptions, StartTlsIsUnsupported) {
  Outcome r = drive(client_flags() + opt(OPT_STARTTLS) + opt(OPT_LIST));
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 5u);
  expect_reply(reps[0], OPT_STARTTLS, ERR_UNSUP);
  expect_list_ok(&reps[1], 4);
}

TEST(HandshakeOptions, UnknownOptionDataIsSkipped) {
  // The unknown option's data looks like an option header: it must be skipped.
  Outcome r = drive(client_flags() + opt(99, opt(OPT_ABORT)) + opt(OPT_PEEK, "xyz") + opt(0xffffffff) +
                    opt(OPT_LIST));
  EXPECT_EQ(r.status, St::kContinue);
  EXPECT_FALSE(r.aborted);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 7u);
  expect_reply(reps[0], 99, ERR_UNSUP);
  expect_reply(reps[1], OPT_PEEK, ERR_UNSUP);
  expect_reply(reps[2], 0xffffffff, ERR_UNSUP);
  expect_list_ok(&reps[3], 4);
  EXPECT_EQ(r.errors.size(), 3u);
}

TEST(HandshakeLimits, TooBigDataIsSkippedAndAnswered) {
  Options o;
  o.limits.max_option = 64;
  // 65 bytes of data that would parse as an ABORT if it were not skipped.
  std::string big = opt(OPT_ABORT) + std::string(65 - 16, 'z');
  Outcome r = drive(client_flags() + opt(OPT_INFO, big) + opt(OPT_INFO, info_data("ro")), o);
  EXPECT_EQ(r.status, St::kContinue);
  EXPECT_FALSE(r.aborted);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 4u);
  expect_reply(reps[0], OPT_INFO, ERR_TOO_BIG);
  expect_info_export(reps[1], OPT_INFO, 1024, HAS_FLAGS | READ_ONLY);
  expect_reply(reps[3], OPT_INFO, ACK);

  // Exactly max_option is still parsed.
  r = drive(client_flags() + opt(OPT_LIST, std::string(64, 'a')), o);
  reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 1u);
  expect_reply(reps[0], OPT_LIST, ERR_INVALID);
}

TEST(HandshakeLimits, WantedTracksSkipping) {
  HandshakeLimits l;
  l.max_option = 8;
  Handshake h(catalog(), l);
  std::string in = client_flags() + kIHaveOpt + be32(OPT_LIST) + be32(20) + "abc";
  EXPECT_EQ(h.feed(reinterpret_cast<const uint8_t*>(in.data()), in.size()), in.size());
  EXPECT_EQ(h.wanted(), 17u);
  EXPECT_EQ(h.out(), kServerGreeting) << "no reply until the data is skipped";
}

TEST(HandshakeLimits, LengthBeyondMaxSkipCloses) {
  Options o;
  o.limits.max_option = 16;
  o.limits.max_skip = 100;
  Outcome r = drive(client_flags() + kIHaveOpt + be32(OPT_LIST) + be32(101) + std::string(101, 'a'), o);
  EXPECT_EQ(r.status, St::kClosed);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(r.used, 4u + 16u);

  r = drive(client_flags() + kIHaveOpt + be32(OPT_LIST) + be32(100) + std::string(100, 'a') + opt(OPT_ABORT), o);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 2u);
  expect_reply(reps[0], OPT_LIST, ERR_TOO_BIG);
  expect_reply(reps[1], OPT_ABORT, ACK);

  // Default limits: a 4 GiB - 1 length is abusive.
  r = drive(client_flags() + kIHaveOpt + be32(OPT_LIST) + be32(0xffffffff));
  EXPECT_EQ(r.status, St::kClosed);
}

TEST(HandshakeLimits, TooManyOptionsCloses) {
  Options o;
  o.limits.max_options = 3;
  Outcome r = drive(client_flags() + opt(OPT_STARTTLS) + opt(OPT_STARTTLS) + opt(OPT_STARTTLS) + opt(OPT_LIST), o);
  EXPECT_EQ(r.status, St::kClosed);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 3u);
  for (const auto& rep : reps) expect_reply(rep, OPT_STARTTLS, ERR_UNSUP);

  r = drive(client_flags() + opt(OPT_STARTTLS) + opt(OPT_STARTTLS) + opt(OPT_GO, info_data("ro")), o);
  EXPECT_EQ(r.status, St::kTransmission) << "the third option is still allowed";
}

TEST(HandshakeLimits, ListingRaisesTheOptionLimitPerExport) {
  // nbdinfo --list asks about each listed export with two options; a store
  // of thousands of nodes must not look abusive.
  Options o;
  o.limits.max_options = 3;
  o.limits.options_per_listed = 2;  // 3 exports listed: 3 + 2 * 3 = 9 options
  std::string in = client_flags() + opt(OPT_LIST);
  for (int i = 0; i < 7; ++i) in += opt(OPT_INFO, info_data("ro"));
  Outcome r = drive(in + opt(OPT_GO, info_data("ro")), o);
  EXPECT_EQ(r.status, St::kTransmission) << "the ninth option is still allowed";

  r = drive(in + opt(OPT_INFO, info_data("ro")) + opt(OPT_GO, info_data("ro")), o);
  EXPECT_EQ(r.status, St::kClosed) << "the tenth is one too many";

  // A second, equal listing does not add to the allowance.
  r = drive(client_flags() + opt(OPT_LIST) + opt(OPT_LIST) + opt(OPT_STARTTLS) + opt(OPT_STARTTLS) +
                opt(OPT_STARTTLS) + opt(OPT_STARTTLS) + opt(OPT_STARTTLS) + opt(OPT_STARTTLS) +
                opt(OPT_STARTTLS) + opt(OPT_STARTTLS),
            o);
  EXPECT_EQ(r.status, St::kClosed);
}

TEST(HandshakeProgress, CountsFinishedMessagesNotBytes) {
  Handshake h(catalog());
  auto feed = [&](const std::string& b) {
    EXPECT_EQ(h.feed(reinterpret_cast<const uint8_t*>(b.data()), b.size()), b.size());
  };
  EXPECT_EQ(h.progress(), 0u);
  const std::string flags = client_flags();
  feed(flags.substr(0, 3));
  EXPECT_EQ(h.progress(), 0u) << "part of the client flags";
  feed(flags.substr(3));
  EXPECT_EQ(h.progress(), 1u);
  // An option trickled in byte by byte counts once, when it is whole.
  const std::string info = opt(OPT_INFO, info_data("ro"));
  for (size_t i = 0; i + 1 < info.size(); ++i) {
    feed(info.substr(i, 1));
    EXPECT_EQ(h.progress(), 1u) << "after byte " << i;
  }
  feed(info.substr(info.size() - 1));
  EXPECT_EQ(h.progress(), 2u);
  // Refused and zero-length options count too.
  feed(opt(OPT_STARTTLS) + opt(99, "x"));
  EXPECT_EQ(h.progress(), 4u);
  // A skipped oversized option counts once its data is all read.
  HandshakeLimits small;
  small.max_option = 8;
  Handshake s(catalog(), small);
  const std::string big = client_flags() + opt(OPT_INFO, std::string(100, 'x'));
  EXPECT_EQ(s.feed(reinterpret_cast<const uint8_t*>(big.data()), big.size() - 1), big.size() - 1);
  EXPECT_EQ(s.progress(), 1u);
  EXPECT_EQ(s.feed(reinterpret_cast<const uint8_t*>(big.data() + big.size() - 1), 1), 1u);
  EXPECT_EQ(s.progress(), 2u);
  EXPECT_EQ(s.status(), Handshake::Status::kContinue);
}

TEST(HandshakeShutdown, OptionsGetShutdownButAbortWorks) {
  Options o;
  o.shutting_down = true;
  Outcome r = drive(client_flags() + opt(OPT_LIST) + opt(OPT_GO, info_data("disk")) + opt(OPT_STRUCTURED) +
                    opt(99, "x") + opt(OPT_ABORT), o);
  EXPECT_EQ(r.status, St::kClosed);
  EXPECT_TRUE(r.aborted);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 5u);
  expect_reply(reps[0], OPT_LIST, ERR_SHUTDOWN);
  expect_reply(reps[1], OPT_GO, ERR_SHUTDOWN);
  expect_reply(reps[2], OPT_STRUCTURED, ERR_SHUTDOWN);
  expect_reply(reps[3], 99, ERR_SHUTDOWN);
  expect_reply(reps[4], OPT_ABORT, ACK);
  EXPECT_FALSE(r.session.structured);
}

TEST(HandshakeShutdown, ExportNameCloses) {
  Options o;
  o.shutting_down = true;
  Outcome r = drive(client_flags() + opt(OPT_EXPORT_NAME, "disk"), o);
  EXPECT_EQ(r.status, St::kClosed);
  EXPECT_EQ(r.out, "");
  EXPECT_FALSE(r.aborted);
}

TEST(HandshakeShutdown, MidHandshake) {
  Handshake h(catalog());
  std::string a = client_flags() + opt(OPT_LIST);
  h.feed(reinterpret_cast<const uint8_t*>(a.data()), a.size());
  h.out().clear();
  h.set_shutting_down();
  std::string b = opt(OPT_GO, info_data("disk"));
  EXPECT_EQ(h.feed(reinterpret_cast<const uint8_t*>(b.data()), b.size()), b.size());
  auto reps = parse_replies(h.out());
  ASSERT_EQ(reps.size(), 1u);
  expect_reply(reps[0], OPT_GO, ERR_SHUTDOWN);
  EXPECT_EQ(h.status(), St::kContinue);
}

TEST(HandshakeErrors, TakeErrorsDrains) {
  Handshake h(catalog());
  std::string in = client_flags() + opt(OPT_STARTTLS) + opt(OPT_INFO, info_data("nope"));
  h.feed(reinterpret_cast<const uint8_t*>(in.data()), in.size());
  auto errs = h.take_errors();
  ASSERT_EQ(errs.size(), 2u);
  EXPECT_NE(errs[0].find("NBD_OPT_STARTTLS"), std::string::npos);
  EXPECT_NE(errs[1].find("NBD_REP_ERR_UNKNOWN"), std::string::npos);
  EXPECT_TRUE(h.take_errors().empty());
}

TEST(HandshakeStatus, StaysClosedOrInTransmission) {
  for (const std::string& in : {client_flags(8), client_flags() + opt(OPT_ABORT),
                                client_flags() + opt(OPT_GO, info_data("ro"))}) {
    Handshake h(catalog());
    h.feed(reinterpret_cast<const uint8_t*>(in.data()), in.size());
    auto st = h.status();
    ASSERT_NE(st, St::kContinue);
    std::string out = h.out();
    std::string more = opt(OPT_LIST) + opt(OPT_GO, info_data("disk"));
    EXPECT_EQ(h.feed(reinterpret_cast<const uint8_t*>(more.data()), more.size()), 0u);
    EXPECT_EQ(h.status(), st);
    EXPECT_EQ(h.out(), out);
    EXPECT_EQ(h.wanted(), 0u);
  }
}

// ---- TLS required (the spec's FORCEDTLS mode) ----

// Counts every call into the catalog, and remembers who attached.
class CountingCatalog : public ExportCatalog {
 public:
  std::shared_ptr<const ExportInfo> find(std::string_view name) const override {
    ++calls;
    return catalog().find(name);
  }
  std::shared_ptr<const ExportInfo> lookup(std::string_view name, std::string* why) const override {
    ++calls;
    return catalog().lookup(name, why);
  }
  std::shared_ptr<const ExportInfo> attach(const Client& client, std::string_view name,
                                           std::string* why) const override {
    ++calls;
    clients.push_back(client);
    return catalog().attach(client, name, why);
  }
  std::shared_ptr<const ExportInfo> describe(const Client& client, std::string_view name,
                                             std::string* why) const override {
    ++calls;
    return catalog().describe(client, name, why);
  }
  std::vector<std::shared_ptr<const ExportInfo>> list() const override {
    ++calls;
    return catalog().list();
  }
  mutable int calls = 0;
  mutable std::vector<Client> clients;
};

size_t feed(Handshake& h, const std::string& b) {
  return h.feed(reinterpret_cast<const uint8_t*>(b.data()), b.size());
}

Options require_tls() {
  Options o;
  o.tls = TlsMode::kRequire;
  return o;
}

// Every option a client may send before STARTTLS, with and without data.
std::vector<std::string> every_option_but_starttls() {
  return {opt(OPT_LIST),
          opt(OPT_LIST, "x"),
          opt(OPT_INFO, info_data("disk", {1, 2})),
          opt(OPT_GO, info_data("disk")),
          opt(OPT_STRUCTURED),
          opt(OPT_EXTENDED),
          opt(OPT_LIST_META, meta_data("disk", {})),
          opt(OPT_SET_META, meta_data("disk", {"base:allocation"})),
          opt(OPT_PEEK, "xyz"),
          opt(99, opt(OPT_ABORT)),  // data that would parse as ABORT if it were not read
          opt(0xffffffff)};
}

// The spec: a FORCEDTLS server answers any option but STARTTLS and ABORT with
// NBD_REP_ERR_TLS_REQD. Its data is still read, the oversized-skip path
// included (nbdkit's 2022 fix), so the next option header is found.
TEST(HandshakeTls, EveryOptionBeforeTlsIsRefusedAndDrained) {
  Options o = require_tls();
  o.limits.max_option = 64;
  const std::vector<std::string> options = every_option_but_starttls();
  std::string in = client_flags(3);
  for (const std::string& x : options) in += x;
  // Oversized: skipped, not parsed; the data again looks like ABORT.
  in += opt(OPT_INFO, opt(OPT_ABORT) + std::string(100, 'z'));
  const std::string before_tls = in + opt(OPT_STARTTLS);
  Outcome r = drive(before_tls + opt(OPT_GO, info_data("disk")), o);
  ASSERT_EQ(r.status, St::kTransmission);
  EXPECT_FALSE(r.aborted);
  EXPECT_TRUE(r.tls_active);
  EXPECT_EQ(r.starttls_at, std::vector<size_t>{before_tls.size()});
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), options.size() + 1 + 1 + 3);
  const uint32_t refused[] = {OPT_LIST,      OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED, OPT_EXTENDED,
                              OPT_LIST_META, OPT_SET_META, OPT_PEEK, 99, 0xffffffff, OPT_INFO};
  for (size_t i = 0; i < std::size(refused); ++i) {
    SCOPED_TRACE(i);
    expect_reply(reps[i], refused[i], ERR_TLS_REQD);
  }
  expect_reply(reps[12], OPT_STARTTLS, ACK);
  // Nothing asked for in the clear counts: no DF, no contexts.
  expect_info_export(reps[13], OPT_GO, 0x140000000ULL, HAS_FLAGS | SEND_FLUSH);
  expect_reply(reps[15], OPT_GO, ACK);
  EXPECT_FALSE(r.session.structured);
  EXPECT_FALSE(r.session.extended);
  EXPECT_TRUE(r.session.contexts.empty());
  EXPECT_EQ(r.errors.size(), 12u);
}

TEST(HandshakeTls, NoTlsReqdOnceTlsIsUp) {
  Outcome r = drive(client_flags() + opt(OPT_STARTTLS) + opt(OPT_STRUCTURED) +
                        opt(OPT_SET_META, meta_data("disk", {"base:allocation"})) + opt(OPT_LIST) +
                        opt(99) + opt(OPT_GO, info_data("disk")),
                    require_tls());
  ASSERT_EQ(r.status, St::kTransmission);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 1u + 1u + 2u + 4u + 1u + 3u);
  expect_reply(reps[0], OPT_STARTTLS, ACK);
  expect_reply(reps[1], OPT_STRUCTURED, ACK);
  expect_reply(reps[3], OPT_SET_META, ACK);
  expect_list_ok(&reps[4], 4);
  expect_reply(reps[8], 99, ERR_UNSUP);
  EXPECT_TRUE(r.session.structured);
  ASSERT_EQ(r.session.contexts.size(), 1u);
  EXPECT_EQ(r.session.flags, HAS_FLAGS | SEND_FLUSH | SEND_DF);
}

// EXPORT_NAME has no error reply: before TLS it ends the session, whatever
// its length, and the name is never looked up.
TEST(HandshakeTls, ExportNameBeforeTlsCloses) {
  Options o = require_tls();
  o.limits.max_option = 64;
  for (const std::string& name : {std::string("disk"), std::string(), std::string(100, 'n')}) {
    Outcome r = drive(client_flags(3) + opt(OPT_LIST) + opt(OPT_EXPORT_NAME, name), o);
    EXPECT_EQ(r.status, St::kClosed);
    auto reps = parse_replies(r.out);
    ASSERT_EQ(reps.size(), 1u) << "nothing answers EXPORT_NAME";
    expect_reply(reps[0], OPT_LIST, ERR_TLS_REQD);
    EXPECT_NE(r.close_reason.find("TLS is required"), std::string::npos) << r.close_reason;
    EXPECT_FALSE(r.session.exp);
  }
  // After TLS it works.
  Outcome r = drive(client_flags(3) + opt(OPT_STARTTLS) + opt(OPT_EXPORT_NAME, "ro"), o);
  ASSERT_EQ(r.status, St::kTransmission);
  EXPECT_EQ(r.session.exp->name, "ro");
}

TEST(HandshakeTls, StartTlsWithDataIsInvalidAndDrained) {
  Options o = require_tls();
  o.limits.max_option = 64;
  // The data looks like an option; it must be read, not parsed.
  Outcome r = drive(client_flags() + opt(OPT_STARTTLS, opt(OPT_ABORT)) +
                        opt(OPT_STARTTLS, std::string(100, 's')) + opt(OPT_LIST),
                    o);
  EXPECT_EQ(r.status, St::kContinue);
  EXPECT_FALSE(r.tls_active);
  EXPECT_TRUE(r.starttls_at.empty());
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 3u);
  expect_reply(reps[0], OPT_STARTTLS, ERR_INVALID);
  expect_reply(reps[1], OPT_STARTTLS, ERR_TOO_BIG);
  expect_reply(reps[2], OPT_LIST, ERR_TLS_REQD);  // still no TLS
}

TEST(HandshakeTls, StartTlsTwiceIsInvalid) {
  Outcome r = drive(client_flags() + opt(OPT_STARTTLS) + opt(OPT_STARTTLS) + opt(OPT_LIST), require_tls());
  EXPECT_EQ(r.status, St::kContinue);
  EXPECT_EQ(r.starttls_at.size(), 1u);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 6u);
  expect_reply(reps[0], OPT_STARTTLS, ACK);
  expect_reply(reps[1], OPT_STARTTLS, ERR_INVALID);
  expect_list_ok(&reps[2], 4);
}

// The bytes after STARTTLS are the client's TLS handshake: never NBD.
TEST(HandshakeTls, BytesAfterStartTlsAreLeftUnconsumed) {
  Handshake h(catalog(), {}, TlsMode::kRequire);
  const std::string hs = client_flags() + opt(OPT_STARTTLS);
  const std::string tls_hello = std::string("\x16\x03\x01\x02\x00", 5) + opt(OPT_ABORT) + opt(OPT_LIST);
  EXPECT_EQ(feed(h, hs + tls_hello), hs.size());
  EXPECT_EQ(h.status(), St::kStartTls);
  EXPECT_EQ(h.wanted(), 0u);
  EXPECT_FALSE(h.tls_active());
  EXPECT_FALSE(h.aborted());
  auto reps = parse_replies(h.out().substr(kServerGreeting.size()));
  ASSERT_EQ(reps.size(), 1u);
  expect_reply(reps[0], OPT_STARTTLS, ACK);
  // Until tls_established(), nothing at all is taken.
  EXPECT_EQ(feed(h, tls_hello), 0u);
  EXPECT_EQ(feed(h, opt(OPT_LIST)), 0u);
  EXPECT_EQ(h.status(), St::kStartTls);
  h.out().clear();
  h.tls_established("node-a");
  EXPECT_TRUE(h.tls_active());
  EXPECT_EQ(h.status(), St::kContinue);
  EXPECT_EQ(h.wanted(), 16u) << "an option header, read from the TLS session";
  EXPECT_EQ(h.out(), "") << "tls_established() sends nothing";
}

// An option half-sent in the clear behind STARTTLS must not be completed
// by bytes from the TLS session (the STARTTLS buffering bugs of SMTP/IMAP).
TEST(HandshakeTls, HalfAnOptionBeforeStartTlsDoesNotSurvive) {
  const std::string go = opt(OPT_GO, info_data("disk"));
  for (bool one_call : {true, false}) {
    SCOPED_TRACE(one_call);
    Handshake h(catalog(), {}, TlsMode::kRequire);
    const std::string hs = client_flags() + opt(OPT_STARTTLS);
    const std::string half = opt(OPT_INFO, info_data("ro")).substr(0, 10);
    if (one_call) {
      EXPECT_EQ(feed(h, hs + half), hs.size());
    } else {
      EXPECT_EQ(feed(h, hs), hs.size());
      EXPECT_EQ(feed(h, half), 0u);
    }
    h.tls_established("node-a");
    h.out().clear();
    EXPECT_EQ(feed(h, go), go.size());
    ASSERT_EQ(h.status(), St::kTransmission) << h.close_reason();
    EXPECT_EQ(h.session().exp->name, "disk");
  }
}

TEST(HandshakeTls, NoCatalogCallBeforeTls) {
  Options o = require_tls();
  o.limits.max_option = 64;
  std::string in = client_flags();
  for (const std::string& x : every_option_but_starttls()) in += x;
  in += opt(OPT_GO, std::string(100, 'g'));
  // The same options do reach the catalog without TLS, so a zero is no accident.
  CountingCatalog plain;
  Handshake p(plain, o.limits);
  feed(p, in);  // up to its NBD_OPT_GO, which succeeds
  EXPECT_EQ(plain.calls, 3);  // LIST, INFO, GO

  CountingCatalog cat;
  Handshake h(cat, o.limits, TlsMode::kRequire);
  h.set_client({"10.0.0.5", "spoofed"});
  EXPECT_EQ(feed(h, in + opt(OPT_STARTTLS)), in.size() + 16);
  ASSERT_EQ(h.status(), St::kStartTls);
  EXPECT_EQ(cat.calls, 0);
  h.tls_established("node-a");
  EXPECT_EQ(cat.calls, 0);
  const std::string go = opt(OPT_GO, info_data("disk"));
  EXPECT_EQ(feed(h, go), go.size());
  ASSERT_EQ(h.status(), St::kTransmission);
  ASSERT_EQ(cat.clients.size(), 1u);
  EXPECT_EQ(cat.clients[0].address, "10.0.0.5");
  EXPECT_EQ(cat.clients[0].identity, "node-a") << "the authenticated identity, not the caller's";
}

TEST(HandshakeTls, IdentityComesOnlyFromTls) {
  for (const std::string& x : {opt(OPT_GO, info_data("disk")), opt(OPT_EXPORT_NAME, "disk")}) {
    CountingCatalog cat;
    Handshake h(cat);
    h.set_client({"10.0.0.5", "node-b"});
    feed(h, client_flags(3) + x);
    ASSERT_EQ(h.status(), St::kTransmission);
    ASSERT_EQ(cat.clients.size(), 1u);
    EXPECT_EQ(cat.clients[0].address, "10.0.0.5");
    EXPECT_EQ(cat.clients[0].identity, "") << "no TLS, no identity";
  }
}

TEST(HandshakeTls, ExportNameBeforeTlsNeverReachesTheCatalog) {
  CountingCatalog cat;
  Handshake h(cat, {}, TlsMode::kRequire);
  feed(h, client_flags(3) + opt(OPT_EXPORT_NAME, "disk"));
  EXPECT_EQ(h.status(), St::kClosed);
  EXPECT_EQ(cat.calls, 0);
}

TEST(HandshakeTls, AbortBeforeTlsWorks) {
  Outcome r = drive(client_flags() + opt(OPT_LIST) + opt(OPT_ABORT) + opt(OPT_LIST), require_tls());
  EXPECT_EQ(r.status, St::kClosed);
  EXPECT_TRUE(r.aborted);
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 2u);
  expect_reply(reps[0], OPT_LIST, ERR_TLS_REQD);
  expect_reply(reps[1], OPT_ABORT, ACK);
}

// The spec allows TLS only after fixed newstyle on both sides; a server
// that requires it has nothing to offer a client without.
TEST(HandshakeTls, ClientWithoutFixedNewstyleCloses) {
  for (uint32_t f : {0u, 2u}) {
    Outcome r = drive(client_flags(f) + opt(OPT_STARTTLS), require_tls());
    EXPECT_EQ(r.status, St::kClosed) << f;
    EXPECT_EQ(r.out, "");
    EXPECT_NE(r.close_reason.find("fixed newstyle"), std::string::npos) << r.close_reason;
  }
}

TEST(HandshakeTls, ShuttingDownRefusesStartTls) {
  Options o = require_tls();
  o.shutting_down = true;
  Outcome r = drive(client_flags() + opt(OPT_STARTTLS) + opt(OPT_ABORT), o);
  EXPECT_EQ(r.status, St::kClosed);
  EXPECT_TRUE(r.starttls_at.empty());
  auto reps = parse_replies(r.out);
  ASSERT_EQ(reps.size(), 2u);
  expect_reply(reps[0], OPT_STARTTLS, ERR_SHUTDOWN);
  expect_reply(reps[1], OPT_ABORT, ACK);
}

TEST(HandshakeTls, TlsEstablishedWithoutStartTlsCloses) {
  for (TlsMode m : {TlsMode::kOff, TlsMode::kRequire}) {
    Handshake h(catalog(), {}, m);
    feed(h, client_flags() + opt(OPT_LIST));
    h.tls_established("node-a");
    EXPECT_EQ(h.status(), St::kClosed);
    EXPECT_FALSE(h.tls_active());
    EXPECT_EQ(feed(h, opt(OPT_GO, info_data("disk"))), 0u);
  }
}

TEST(HandshakeTls, OffStaysNoTls) {
  // NOTLS: STARTTLS is unsupported and no option ever gets ERR_TLS_REQD.
  Outcome r = drive(client_flags() + opt(OPT_STARTTLS) + opt(OPT_GO, info_data("disk")));
  ASSERT_EQ(r.status, St::kTransmission);
  EXPECT_FALSE(r.tls_active);
  auto reps = parse_replies(r.out);
  expect_reply(reps[0], OPT_STARTTLS, ERR_UNSUP);
  for (const Reply& x : reps) EXPECT_NE(x.type, ERR_TLS_REQD);
}


// ---- Deferred attaches (a server attaching node views on worker threads) ----

TEST(HandshakeDeferredAttach, GoWaitsForTheCallerAndKeepsLaterBytes) {
  Handshake h(deferring());
  h.set_defer_attach(true);
  const int before = deferring().attaches;
  const std::string hs = client_flags() + opt(OPT_STRUCTURED) + opt(OPT_GO, info_data("disk", {1}));
  const std::string request = be32(0x25609513) + std::string(24, '\x01');
  EXPECT_EQ(feed(h, hs + request), hs.size());
  ASSERT_EQ(h.status(), St::kAttaching);
  EXPECT_EQ(h.deferred_call().name, "disk");
  EXPECT_FALSE(h.deferred_call().describe);
  EXPECT_EQ(deferring().attaches, before) << "the handshake itself must not attach";
  // Only the structured-reply ACK so far; nothing of GO's answer.
  auto early = parse_replies(h.out().substr(kServerGreeting.size()));
  ASSERT_EQ(early.size(), 1u);
  expect_reply(early[0], OPT_STRUCTURED, ACK);
  EXPECT_EQ(feed(h, request), 0u) << "nothing is parsed while the attach runs";
  h.out().clear();
  std::string why;
  h.attach_done(h.deferred_call().run(catalog(), &why), why);
  ASSERT_EQ(h.status(), St::kTransmission);
  auto reps = parse_replies(h.out());
  ASSERT_EQ(reps.size(), 4u);
  expect_info_export(reps[0], OPT_GO, 0x140000000ULL, HAS_FLAGS | SEND_FLUSH | SEND_DF);
  EXPECT_EQ(reps[1].data, be16(1) + "disk");
  expect_reply(reps[3], OPT_GO, ACK);
  ASSERT_TRUE(h.session().exp);
  EXPECT_EQ(h.session().exp->name, "disk");
}

TEST(HandshakeDeferredAttach, RefusedGoIsAnErrorAndOptionsGoOn) {
  for (bool defer : {false, true}) {
    Handshake h(deferring());
    h.set_defer_attach(defer);
    feed(h, client_flags() + opt(OPT_GO, info_data("nosuch")));
    if (defer) {
      ASSERT_EQ(h.status(), St::kAttaching);
      h.attach_done(nullptr, "node 'nosuch' is retired");
    }
    ASSERT_EQ(h.status(), St::kContinue);
    feed(h, opt(OPT_LIST));
    auto reps = parse_replies(h.out().substr(kServerGreeting.size()));
    ASSERT_EQ(reps.size(), 5u);
    expect_reply(reps[0], OPT_GO, ERR_UNKNOWN);
    if (defer) {
      EXPECT_NE(reps[0].data.find("is retired"), std::string::npos) << reps[0].data;
    }
    expect_list_ok(&reps[1], 4);
  }
}

TEST(HandshakeDeferredAttach, RefusedExportNameCloses) {
  Handshake h(deferring());
  h.set_defer_attach(true);
  feed(h, client_flags(3) + opt(OPT_EXPORT_NAME, "nosuch"));
  ASSERT_EQ(h.status(), St::kAttaching);
  h.attach_done(nullptr, "node 'nosuch' is pinned elsewhere");
  EXPECT_EQ(h.status(), St::kClosed);
  EXPECT_NE(h.close_reason().find("pinned elsewhere"), std::string::npos) << h.close_reason();
  EXPECT_EQ(h.out().size(), kServerGreeting.size()) << "EXPORT_NAME has no error reply";
}

TEST(HandshakeDeferredAttach, InfoWaitsForADescriptionAndStaysInOptions) {
  Handshake h(deferring());
  h.set_defer_attach(true);
  feed(h, client_flags() + opt(OPT_INFO, info_data("disk", {1})));
  ASSERT_EQ(h.status(), St::kAttaching);
  EXPECT_TRUE(h.deferred_call().describe);
  std::string why;
  h.attach_done(h.deferred_call().run(catalog(), &why), why);
  EXPECT_EQ(h.status(), St::kContinue);
  auto reps = parse_replies(h.out().substr(kServerGreeting.size()));
  ASSERT_EQ(reps.size(), 4u);
  expect_info_export(reps[0], OPT_INFO, 0x140000000ULL, HAS_FLAGS | SEND_FLUSH);
  expect_reply(reps[3], OPT_INFO, ACK);
  EXPECT_FALSE(h.session().exp);
}

TEST(HandshakeDeferredAttach, SetMetaContextWaitsAndKeepsItsQueries) {
  Handshake h(deferring());
  h.set_defer_attach(true);
  feed(h, client_flags() + opt(OPT_STRUCTURED) +
              opt(OPT_SET_META, meta_data("disk", {"qemu:dirty-bitmap:b", "base:allocation"})));
  ASSERT_EQ(h.status(), St::kAttaching);
  EXPECT_TRUE(h.deferred_call().describe);
  std::string why;
  h.attach_done(h.deferred_call().run(catalog(), &why), why);
  EXPECT_EQ(h.status(), St::kContinue);
  feed(h, opt(OPT_GO, info_data("disk")));
  ASSERT_EQ(h.status(), St::kAttaching);
  h.attach_done(h.deferred_call().run(catalog(), &why), why);
  ASSERT_EQ(h.status(), St::kTransmission);
  ASSERT_EQ(h.session().contexts.size(), 2u);
  EXPECT_EQ(h.session().contexts[0].name, "base:allocation");
  EXPECT_EQ(h.session().contexts[1].name, "qemu:dirty-bitmap:b");
}

TEST(HandshakeDeferredAttach, AttachDoneWithoutAWaitingAttachCloses) {
  Handshake h(deferring());
  h.set_defer_attach(true);
  feed(h, client_flags());
  h.attach_done(catalog().find("disk"), "");
  EXPECT_EQ(h.status(), St::kClosed);
  EXPECT_FALSE(h.session().exp);
}

}  // namespace
}  // namespace nbd
