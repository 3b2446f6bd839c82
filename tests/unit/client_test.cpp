// Tests for protocol/client.{hpp,cpp}: the client handshake against the real
// server-side nbd::Handshake (bytes shuttled between the two), the reply
// reader against the server's reply encoders, and lying servers written out
// byte by byte.
#include "protocol/client.hpp"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "protocol/handshake.hpp"
#include "protocol/transmission.hpp"
#include "test_bytes.hpp"

namespace nbd {
namespace {

using testing::be;
using testing::be16;
using testing::be32;

class TestCatalog : public ExportCatalog {
 public:
  TestCatalog() {
    auto e = std::make_shared<ExportInfo>();
    e->name = "disk";
    e->size = 1 << 20;
    e->flags = kFlagSendFlush | kFlagSendFua | kFlagSendTrim;
    e->min_block = 512;
    e->preferred_block = 4096;
    e->max_block = 1 << 16;
    e->contexts = {"base:allocation", "nbdroot:dirty"};
    disk_ = e;
  }
  std::shared_ptr<const ExportInfo> find(std::string_view name) const override {
    return name == "disk" ? disk_ : nullptr;
  }
  std::vector<std::shared_ptr<const ExportInfo>> list() const override { return {disk_}; }

 private:
  std::shared_ptr<const ExportInfo> disk_;
};

// Shuttles bytes between the two state machines, `step` bytes at a time,
// until neither has anything to say.
void shuttle(ClientHandshake& c, Handshake& s, size_t step) {
  for (int round = 0; round < 100000; ++round) {
    std::string to_client = std::exchange(s.out(), {});
    std::string to_server = std::exchange(c.out(), {});
    if (to_client.empty() && to_server.empty()) return;
    for (size_t i = 0; i < to_client.size() && c.status() == ClientHandshake::Status::kContinue;
         i += step) {
      size_t n = std::min(step, to_client.size() - i);
      ASSERT_EQ(c.feed(reinterpret_cast<const uint8_t*>(to_client.data() + i), n), n);
    }
    for (size_t i = 0; i < to_server.size() && s.status() == Handshake::Status::kContinue;
         i += step) {
      size_t n = std::min(step, to_server.size() - i);
      s.feed(reinterpret_cast<const uint8_t*>(to_server.data() + i), n);
    }
  }
  FAIL() << "handshake never settled";
}

TEST(ClientHandshake, AgreesWithTheServerHandshake) {
  TestCatalog cat;
  for (size_t step : {size_t(1), size_t(7), size_t(100000)}) {
    Handshake server(cat);
    ClientHandshake client({"disk", true, {"base:allocation", "nbdroot:dirty", "qemu:nope"}});
    shuttle(client, server, step);
    ASSERT_EQ(client.status(), ClientHandshake::Status::kReady) << client.error();
    ASSERT_EQ(server.status(), Handshake::Status::kTransmission);
    const ClientSession& cs = client.session();
    const Session& ss = server.session();
    EXPECT_EQ(cs.size, 1u << 20);
    EXPECT_EQ(cs.flags, ss.flags);
    EXPECT_TRUE(cs.structured);
    EXPECT_TRUE(ss.structured);
    EXPECT_EQ(cs.min_block, 512u);
    EXPECT_EQ(cs.preferred_block, 4096u);
    EXPECT_EQ(cs.max_block, 1u << 16);
    ASSERT_EQ(ss.contexts.size(), 2u);
    EXPECT_EQ(cs.context_id("base:allocation"), ss.contexts[0].id);
    EXPECT_EQ(cs.context_id("nbdroot:dirty"), ss.contexts[1].id);
    EXPECT_NE(cs.context_id("base:allocation"), 0u);
    EXPECT_EQ(cs.context_id("qemu:nope"), 0u);
  }
}

TEST(ClientHandshake, SimpleRepliesWhenNotAsked) {
  TestCatalog cat;
  Handshake server(cat);
  ClientHandshake client({"disk", false, {"base:allocation"}});
  shuttle(client, server, 3);
  ASSERT_EQ(client.status(), ClientHandshake::Status::kReady) << client.error();
  EXPECT_FALSE(client.session().structured);
  EXPECT_FALSE(server.session().structured);
  EXPECT_TRUE(client.session().contexts.empty());
}

TEST(ClientHandshake, MissingExportCarriesTheServersMessage) {
  TestCatalog cat;
  Handshake server(cat);
  ClientHandshake client({"nosuch", true, {"base:allocation"}});
  shuttle(client, server, 5);
  ASSERT_EQ(client.status(), ClientHandshake::Status::kFailed);
  EXPECT_NE(client.error().find("unknown export 'nosuch'"), std::string::npos) << client.error();
  EXPECT_NE(client.error().find("NBD_REP_ERR_UNKNOWN"), std::string::npos) << client.error();
  EXPECT_EQ(client.refusal(), kRepErrUnknown);
}

// ---- Lying servers, scripted ----

const std::string kGreeting = std::string("NBDMAGIC") + "IHAVEOPT" + be16(3);
std::string rep(uint32_t opt, uint32_t type, const std::string& data = {}) {
  return be(0x3e889045565a9ULL, 8) + be32(opt) + be32(type) + be32(uint32_t(data.size())) + data;
}
std::string info_export(uint64_t size, uint16_t flags) {
  return rep(kOptGo, kRepInfo, be16(kInfoExport) + be(size, 8) + be16(flags));
}

ClientHandshake run_script(const std::string& script, ClientOptions opts = {"disk", true, {}}) {
  ClientHandshake c(std::move(opts));
  c.feed(reinterpret_cast<const uint8_t*>(script.data()), script.size());
  return c;
}

TEST(ClientHandshake, ToleratesUnsupportedStructuredReplies) {
  auto c = run_script(kGreeting + rep(kOptStructuredReply, kRepErrUnsup) + info_export(4096, 1) +
                      rep(kOptGo, kRepAck));
  ASSERT_EQ(c.status(), ClientHandshake::Status::kReady) << c.error();
  EXPECT_FALSE(c.session().structured);
  EXPECT_EQ(c.session().size, 4096u);
}

TEST(ClientHandshake, LeavesTransmissionBytesUnconsumed) {
  std::string script = kGreeting + rep(kOptStructuredReply, kRepAck) + info_export(4096, 1) +
                       rep(kOptGo, kRepAck);
  ClientHandshake c({"disk", true, {}});
  std::string all = script + "XYZ";
  EXPECT_EQ(c.feed(reinterpret_cast<const uint8_t*>(all.data()), all.size()), script.size());
  EXPECT_EQ(c.status(), ClientHandshake::Status::kReady);
}

struct Lie {
  const char* name;
  std::string script;
  const char* error;
};

TEST(ClientHandshake, RejectsLyingServers) {
  const std::string ok_structured = kGreeting + rep(kOptStructuredReply, kRepAck);
  const std::vector<Lie> lies = {
      {"bad greeting", "NBDMAGIX" + kGreeting.substr(8), "bad greeting magic"},
      {"oldstyle", std::string("NBDMAGIC") + be(0x00420281861253ULL, 8) + be16(0), "oldstyle"},
      {"not fixed newstyle", std::string("NBDMAGIC") + "IHAVEOPT" + be16(0), "fixed newstyle"},
      {"bad reply magic", kGreeting + "x" + rep(kOptStructuredReply, kRepAck).substr(1),
       "bad option reply magic"},
      {"oversized reply", kGreeting + be(0x3e889045565a9ULL, 8) + be32(kOptStructuredReply) +
                              be32(kRepAck) + be32(1 << 20),
       "oversized reply"},
      {"wrong option", kGreeting + rep(kOptList, kRepAck), "while waiting for"},
      {"no export info", ok_structured + rep(kOptGo, kRepAck), "without NBD_INFO_EXPORT"},
      {"ack with data", kGreeting + rep(kOptStructuredReply, kRepAck, "x"), "ACK with data"},
      {"short export info", ok_structured + rep(kOptGo, kRepInfo, be16(0) + be(1, 8)),
       "wrong size"},
      {"no HAS_FLAGS", ok_structured + info_export(1, 0), "HAS_FLAGS"},
      {"bad block sizes",
       ok_structured + rep(kOptGo, kRepInfo, be16(kInfoBlockSize) + be32(3) + be32(4096) +
                                                 be32(1 << 20)),
       "invalid block sizes"},
      {"refusal", ok_structured + rep(kOptGo, kRepErrPolicy, "go away\n"),
       "refused: NBD_REP_ERR_POLICY: go away?"},
      {"server reply type", ok_structured + rep(kOptGo, kRepServer), "unexpected reply"},
  };
  for (const Lie& l : lies) {
    auto c = run_script(l.script);
    EXPECT_EQ(c.status(), ClientHandshake::Status::kFailed) << l.name;
    EXPECT_NE(c.error().find(l.error), std::string::npos) << l.name << ": " << c.error();
  }
}

TEST(ClientHandshake, RejectsContextsNotAskedForOrTwice) {
  const std::string start = kGreeting + rep(kOptStructuredReply, kRepAck);
  auto meta = [](uint32_t id, const std::string& n) {
    return rep(kOptSetMetaContext, kRepMetaContext, be32(id) + n);
  };
  ClientOptions o{"disk", true, {"base:allocation"}};
  auto c = run_script(start + meta(1, "other:ctx"), o);
  EXPECT_NE(c.error().find("not asked for"), std::string::npos) << c.error();
  c = run_script(start + meta(1, "base:allocation") + meta(1, "base:allocation"), o);
  EXPECT_NE(c.error().find("twice"), std::string::npos) << c.error();
  c = run_script(start + meta(0, "base:allocation"), o);
  EXPECT_NE(c.error().find("id 0"), std::string::npos) << c.error();
  c = run_script(start + meta(7, "base:allocation") + rep(kOptSetMetaContext, kRepAck) +
                     info_export(1, 1) + rep(kOptGo, kRepAck),
                 o);
  ASSERT_EQ(c.status(), ClientHandshake::Status::kReady) << c.error();
  EXPECT_EQ(c.session().context_id("base:allocation"), 7u);
}

// ---- STARTTLS ----

ClientOptions tls_options() {
  ClientOptions o{"disk", true, {"base:allocation", "nbdroot:dirty"}};
  o.starttls = true;
  return o;
}

const std::string kRefusal = "the server did not accept NBD_OPT_STARTTLS";
const std::string kNoPlaintext = "refusing to continue without TLS";

TEST(ClientHandshake, StartTlsWithTheServerHandshake) {
  TestCatalog cat;
  for (size_t step : {size_t(1), size_t(7), size_t(100000)}) {
    Handshake server(cat, {}, TlsMode::kRequire);
    ClientHandshake client(tls_options());
    shuttle(client, server, step);
    ASSERT_EQ(client.status(), ClientHandshake::Status::kStartTls) << client.error();
    ASSERT_EQ(server.status(), Handshake::Status::kStartTls) << server.close_reason();
    // Both sides run TLS here; the bytes that follow are its plaintext.
    server.tls_established("node-a");
    client.tls_established();
    shuttle(client, server, step);
    ASSERT_EQ(client.status(), ClientHandshake::Status::kReady) << client.error();
    ASSERT_EQ(server.status(), Handshake::Status::kTransmission) << server.close_reason();
    EXPECT_TRUE(server.tls_active());
    EXPECT_TRUE(client.session().structured);
    EXPECT_TRUE(server.session().structured);
    EXPECT_EQ(client.session().flags, server.session().flags);
    ASSERT_EQ(server.session().contexts.size(), 2u);
    EXPECT_EQ(client.session().context_id("nbdroot:dirty"), server.session().contexts[1].id);
    EXPECT_TRUE(server.take_errors().empty()) << "no option was refused";
  }
}

TEST(ClientHandshake, StartTlsIsTheFirstOptionAndEndsTheRead) {
  ClientHandshake c(tls_options());
  const std::string ack = rep(kOptStartTls, kRepAck);
  const std::string tls_bytes = std::string("\x16\x03\x03\x00\x7a", 5) + info_export(1, 1);
  const std::string all = kGreeting + ack + tls_bytes;
  EXPECT_EQ(c.feed(reinterpret_cast<const uint8_t*>(all.data()), all.size()), kGreeting.size() + ack.size());
  ASSERT_EQ(c.status(), ClientHandshake::Status::kStartTls) << c.error();
  EXPECT_EQ(c.out(), be32(3) + "IHAVEOPT" + be32(kOptStartTls) + be32(0)) << "flags, then only STARTTLS";
  EXPECT_EQ(c.feed(reinterpret_cast<const uint8_t*>(tls_bytes.data()), tls_bytes.size()), 0u);
  c.out().clear();
  c.tls_established();
  EXPECT_EQ(c.status(), ClientHandshake::Status::kContinue);
  EXPECT_EQ(c.out(), "IHAVEOPT" + be32(kOptStructuredReply) + be32(0));
}

// A man in the middle, or a server without TLS, must not get a plaintext
// session out of a client that asked for TLS.
TEST(ClientHandshake, StartTlsRefusedFailsInsteadOfGoingOnInPlaintext) {
  const std::vector<Lie> lies = {
      {"unsupported", kGreeting + rep(kOptStartTls, kRepErrUnsup, "no TLS here"), "NBD_REP_ERR_UNSUP"},
      {"policy", kGreeting + rep(kOptStartTls, kRepErrPolicy), "NBD_REP_ERR_POLICY"},
      {"invalid", kGreeting + rep(kOptStartTls, kRepErrInvalid, "x"), "NBD_REP_ERR_INVALID"},
      {"ack with data", kGreeting + rep(kOptStartTls, kRepAck, "x"), "ACK with data"},
      {"other reply type", kGreeting + rep(kOptStartTls, kRepServer), "unexpected reply"},
      {"straight on to GO", kGreeting + info_export(4096, 1) + rep(kOptGo, kRepAck), "while waiting for"},
      {"straight on to structured", kGreeting + rep(kOptStructuredReply, kRepAck), "while waiting for"},
      {"bad magic", kGreeting + "x" + rep(kOptStartTls, kRepAck).substr(1), "magic"},
  };
  for (const Lie& l : lies) {
    auto c = run_script(l.script, tls_options());
    EXPECT_EQ(c.status(), ClientHandshake::Status::kFailed) << l.name;
    EXPECT_NE(c.error().find(kRefusal), std::string::npos) << l.name << ": " << c.error();
    EXPECT_NE(c.error().find(kNoPlaintext), std::string::npos) << l.name << ": " << c.error();
    EXPECT_NE(c.error().find(l.error), std::string::npos) << l.name << ": " << c.error();
    EXPECT_EQ(c.out().find("IHAVEOPT", 4 + 16), std::string::npos)
        << l.name << ": no option after STARTTLS was sent";
  }
}

TEST(ClientHandshake, StartTlsAgainstAServerWithoutTls) {
  TestCatalog cat;
  Handshake server(cat);  // TlsMode::kOff
  ClientHandshake client(tls_options());
  shuttle(client, server, 5);
  ASSERT_EQ(client.status(), ClientHandshake::Status::kFailed);
  EXPECT_NE(client.error().find(kRefusal), std::string::npos) << client.error();
  EXPECT_NE(client.error().find("NBD_REP_ERR_UNSUP"), std::string::npos) << client.error();
  EXPECT_EQ(server.status(), Handshake::Status::kContinue) << "nothing but STARTTLS was asked";
}

// refusal() is the server's answer when that failed the handshake, and 0
// when something else did (the node agent retries those).
TEST(ClientHandshake, RefusalIsTheServersErrorReplyOnly) {
  const std::string ok_structured = kGreeting + rep(kOptStructuredReply, kRepAck);
  EXPECT_EQ(run_script(ok_structured + rep(kOptGo, kRepErrPolicy, "no")).refusal(), kRepErrPolicy);
  EXPECT_EQ(run_script(ok_structured + rep(kOptGo, kRepErrShutdown)).refusal(), kRepErrShutdown);
  EXPECT_EQ(run_script(kGreeting + rep(kOptStartTls, kRepErrUnsup), tls_options()).refusal(),
            kRepErrUnsup);
  EXPECT_EQ(run_script(ok_structured + rep(kOptGo, kRepAck)).refusal(), 0u);  // a lie, no refusal
  EXPECT_EQ(run_script(ok_structured + rep(kOptGo, kRepServer)).refusal(), 0u);
  auto ok = run_script(ok_structured + info_export(4096, 1) + rep(kOptGo, kRepAck));
  EXPECT_EQ(ok.status(), ClientHandshake::Status::kReady);
  EXPECT_EQ(ok.refusal(), 0u);
}

TEST(ClientHandshake, WithoutStartTlsAServerRequiringTlsRefuses) {
  TestCatalog cat;
  Handshake server(cat, {}, TlsMode::kRequire);
  ClientHandshake client({"disk", true, {}});
  shuttle(client, server, 5);
  ASSERT_EQ(client.status(), ClientHandshake::Status::kFailed);
  EXPECT_NE(client.error().find("NBD_REP_ERR_TLS_REQD"), std::string::npos) << client.error();
}

TEST(ClientHandshake, TlsEstablishedWithoutStartTlsFails) {
  ClientHandshake c({"disk", true, {}});
  c.tls_established();
  EXPECT_EQ(c.status(), ClientHandshake::Status::kFailed);
}

// ---------------------------------------------------------------- replies

TEST(EncodeRequest, CompactHeader) {
  Request r{.flags = kCmdFlagFua, .type = kCmdWrite, .cookie = 0x0102030405060708ULL,
            .offset = 0x1000, .length = 512};
  uint8_t b[kRequestSize];
  ASSERT_EQ(encode_request(b, r), 28u);
  std::string s(reinterpret_cast<char*>(b), 28);
  EXPECT_EQ(s, be32(0x25609513) + be16(1) + be16(1) + be(0x0102030405060708ULL, 8) +
                   be(0x1000, 8) + be32(512));
  Request back;
  size_t used = 0;
  ASSERT_EQ(parse_request(b, 28, false, &back, &used), Parse::kOk);
  EXPECT_EQ(back.cookie, r.cookie);
  EXPECT_EQ(back.length, r.length);
}

// Records what the reader reports, and rebuilds read buffers.
struct Recorder : ReplySink {
  std::map<uint64_t, std::string> data;  // cookie -> read buffer ('?' = untouched)
  std::map<uint64_t, uint64_t> base;
  std::map<uint64_t, std::vector<std::pair<uint32_t, Extent>>> extents;
  std::map<uint64_t, std::string> messages;
  std::map<uint64_t, uint32_t> done;

  void read(uint64_t cookie, uint64_t off, uint64_t len) {
    data[cookie] = std::string(len, '?');
    base[cookie] = off;
  }
  void on_data(uint64_t c, uint64_t off, const uint8_t* p, size_t n) override {
    data.at(c).replace(off - base.at(c), n, reinterpret_cast<const char*>(p), n);
  }
  void on_hole(uint64_t c, uint64_t off, uint64_t n) override {
    data.at(c).replace(off - base.at(c), n, std::string(n, '\0'));
  }
  void on_extents(uint64_t c, uint32_t ctx, std::span<const Extent> ext) override {
    for (const Extent& x : ext) extents[c].push_back({ctx, x});
  }
  void on_error(uint64_t c, uint32_t, std::string_view m) override { messages[c] += m; }
  void on_done(uint64_t c, uint32_t err) override { done[c] = err; }
};

// Feeds `wire` in `step`-byte pieces; returns the reader's reason (empty: fine).
std::string feed(ReplyReader& r, Recorder& rec, const std::string& wire, size_t step) {
  for (size_t i = 0; i < wire.size() && !r.broken(); i += step) {
    size_t n = std::min(step, wire.size() - i);
    r.feed(reinterpret_cast<const uint8_t*>(wire.data() + i), n, rec);
  }
  return r.why();
}

Session structured_session() {
  Session s;
  auto e = std::make_shared<ExportInfo>();
  e->size = 1 << 20;
  s.exp = e;
  s.structured = true;
  s.contexts = {{1, "base:allocation"}, {2, "nbdroot:dirty"}};
  return s;
}

std::string bytes(const uint8_t* p, size_t n) { return std::string(reinterpret_cast<const char*>(p), n); }

TEST(ReplyReader, ReadsWhatTheServerEncodes) {
  for (bool structured : {false, true}) {
    for (size_t step : {size_t(1), size_t(5), size_t(1 << 20)}) {
      Session s = structured_session();
      s.structured = structured;
      ReplyReader r(structured, {1, 2});
      Recorder rec;
      Request rd{.type = kCmdRead, .cookie = 1, .offset = 4096, .length = 10};
      Request wr{.type = kCmdWrite, .cookie = 2, .offset = 0, .length = 512};
      Request bad{.type = kCmdRead, .cookie = 3, .offset = 0, .length = 4};
      ASSERT_TRUE(r.expect(rd));
      ASSERT_TRUE(r.expect(wr));
      ASSERT_TRUE(r.expect(bad));
      EXPECT_FALSE(r.expect(rd));
      rec.read(1, 4096, 10);
      rec.read(3, 0, 4);
      uint8_t h[kMaxReplyHeader];
      std::string wire;
      wire += encode_done(s, wr, kOk, {});
      wire += bytes(h, encode_read_header(h, s, rd, 10)) + "0123456789";
      wire += encode_done(s, bad, kEIO, "disk on fire");
      ASSERT_EQ(feed(r, rec, wire, step), "");
      EXPECT_EQ(rec.data[1], "0123456789");
      EXPECT_EQ(rec.done.at(1), 0u);
      EXPECT_EQ(rec.done.at(2), 0u);
      EXPECT_EQ(rec.done.at(3), uint32_t(kEIO));
      EXPECT_EQ(rec.messages[3], structured ? "disk on fire" : "");
      EXPECT_EQ(r.in_flight(), 0u);
    }
  }
}

TEST(ReplyReader, BlockStatusPerContext) {
  Session s = structured_session();
  ReplyReader r(true, {1, 2});
  Recorder rec;
  Request bs{.type = kCmdBlockStatus, .cookie = 9, .offset = 0, .length = 8192};
  ASSERT_TRUE(r.expect(bs));
  std::vector<Extent> a = {{4096, 0}, {4096, 3}}, d = {{8192, 1}};
  std::string wire = encode_block_status(s, bs, 1, a, false) + encode_block_status(s, bs, 2, d, true);
  ASSERT_EQ(feed(r, rec, wire, 3), "");
  ASSERT_EQ(rec.extents[9].size(), 3u);
  EXPECT_EQ(rec.extents[9][1].first, 1u);
  EXPECT_EQ(rec.extents[9][1].second.flags, 3u);
  EXPECT_EQ(rec.extents[9][2].first, 2u);
  EXPECT_EQ(rec.extents[9][2].second.length, 8192u);
  EXPECT_EQ(rec.done.at(9), 0u);
}

// ---- Chunk builders for lying servers ----

std::string chunk(uint16_t flags, uint16_t type, uint64_t cookie, const std::string& payload) {
  return be32(kStructuredReplyMagic) + be16(flags) + be16(type) + be(cookie, 8) +
         be32(uint32_t(payload.size())) + payload;
}
std::string data_chunk(uint64_t cookie, uint64_t off, const std::string& d, bool done) {
  return chunk(done ? 1 : 0, kReplyOffsetData, cookie, be(off, 8) + d);
}
std::string hole_chunk(uint64_t cookie, uint64_t off, uint32_t n, bool done) {
  return chunk(done ? 1 : 0, kReplyOffsetHole, cookie, be(off, 8) + be32(n));
}
std::string none_chunk(uint64_t cookie) { return chunk(1, kReplyNone, cookie, ""); }

TEST(ReplyReader, DataAndHolesOutOfOrder) {
  ReplyReader r(true, {});
  Recorder rec;
  ASSERT_TRUE(r.expect({.type = kCmdRead, .cookie = 5, .offset = 100, .length = 12}));
  rec.read(5, 100, 12);
  std::string wire = data_chunk(5, 108, "wxyz", false) + hole_chunk(5, 104, 4, false) +
                     data_chunk(5, 100, "abcd", false) + none_chunk(5);
  ASSERT_EQ(feed(r, rec, wire, 2), "");
  EXPECT_EQ(rec.data[5], std::string("abcd") + std::string(4, '\0') + "wxyz");
  EXPECT_EQ(rec.done.at(5), 0u);
}

TEST(ReplyReader, ErrorChunksEndAReadWithoutFullCoverage) {
  ReplyReader r(true, {});
  Recorder rec;
  ASSERT_TRUE(r.expect({.type = kCmdRead, .cookie = 5, .offset = 0, .length = 8}));
  rec.read(5, 0, 8);
  std::string err = be32(kEIO) + be16(4) + "oops" + be(4, 8);
  std::string wire = data_chunk(5, 0, "abcd", false) + chunk(1, kReplyErrorOffset, 5, err);
  ASSERT_EQ(feed(r, rec, wire, 1), "");
  EXPECT_EQ(rec.done.at(5), uint32_t(kEIO));
  EXPECT_EQ(rec.messages[5], "oops");
}

struct Violation {
  const char* name;
  bool structured;
  std::string wire;
  const char* why;
};

TEST(ReplyReader, RejectsLyingServers) {
  const Request rd{.type = kCmdRead, .cookie = 1, .offset = 100, .length = 8};
  const Request bs{.type = kCmdBlockStatus, .cookie = 2, .offset = 0, .length = 8192};
  const Request fl{.type = kCmdFlush, .cookie = 3};
  const std::vector<Violation> cases = {
      {"bad magic", true, be32(0x12345678) + std::string(30, 'x'), "bad reply magic"},
      {"extended magic", true, be32(kExtendedReplyMagic) + std::string(30, 'x'), "bad reply magic"},
      {"unknown cookie", true, none_chunk(77), "unknown cookie 0x4d"},
      {"simple unknown cookie", false, be32(kSimpleReplyMagic) + be32(0) + be(77, 8), "unknown cookie"},
      {"chunk without structured", false, none_chunk(1), "not negotiated"},
      {"data before range", true, data_chunk(1, 99, "ab", true), "outside the read"},
      {"data after range", true, data_chunk(1, 107, "ab", true), "outside the read"},
      {"data offset wraps", true, data_chunk(1, ~uint64_t(0), "ab", true), "outside the read"},
      {"data longer than read", true, data_chunk(1, 100, std::string(9, 'x'), true), "longer than the read"},
      {"huge declared data", true,
       be32(kStructuredReplyMagic) + be16(1) + be16(kReplyOffsetData) + be(1, 8) + be32(0xfffffff0u),
       "longer than the read"},
      {"overlap", true, data_chunk(1, 100, "abcd", false) + data_chunk(1, 102, "ab", false), "overlapping"},
      {"overlap out of order", true,
       data_chunk(1, 104, "abcd", false) + hole_chunk(1, 100, 2, false) + data_chunk(1, 101, "ab", false),
       "overlapping"},
      {"hole outside", true, hole_chunk(1, 100, 9, true), "outside the read"},
      {"short read", true, data_chunk(1, 100, "abcd", true), "completed with only 4 bytes"},
      {"none for read", true, none_chunk(1), "completed with only 0 bytes"},
      {"data for flush", true, data_chunk(3, 0, "ab", true), "no read"},
      {"simple data to structured read", true, be32(kSimpleReplyMagic) + be32(0) + be(1, 8), "simple reply with data"},
      {"simple after chunk", true, data_chunk(1, 100, "ab", false) + be32(kSimpleReplyMagic) + be32(0) + be(1, 8),
       "after chunks"},
      {"unnegotiated context", true, chunk(1, kReplyBlockStatus, 2, be32(3) + be32(8192) + be32(0)),
       "context 3, which was not negotiated"},
      {"context twice", true,
       chunk(0, kReplyBlockStatus, 2, be32(1) + be32(8192) + be32(0)) +
           chunk(1, kReplyBlockStatus, 2, be32(1) + be32(8192) + be32(0)),
       "reported twice"},
      {"zero extent", true, chunk(1, kReplyBlockStatus, 2, be32(1) + be32(0) + be32(0)), "zero-length extent"},
      {"extent past range", true,
       chunk(1, kReplyBlockStatus, 2, be32(1) + be32(8192) + be32(0) + be32(1) + be32(0)), "beyond the requested"},
      {"extended block status", true, chunk(1, kReplyBlockStatusExt, 2, be32(1) + be32(1) + be(8192, 8) + be(0, 8)),
       "unexpected chunk type"},
      {"block status for read", true, chunk(1, kReplyBlockStatus, 1, be32(1) + be32(8) + be32(0)),
       "another command"},
      {"none with payload", true, chunk(1, kReplyNone, 3, "x"), "with a payload"},
      {"none not last", true, chunk(0, kReplyNone, 3, ""), "not last"},
      {"unknown type", true, chunk(1, 77, 3, ""), "unexpected chunk type 77"},
      {"huge error", true, chunk(1, kReplyError, 3, be32(5) + be16(5000) + std::string(5000, 'x')), "error chunk of"},
      {"error message too long", true, chunk(1, kReplyError, 3, be32(5) + be16(9) + "abc"), "longer than the chunk"},
      {"error zero", true, chunk(1, kReplyError, 3, be32(0) + be16(0)), "error 0"},
      {"error offset outside", true, chunk(1, kReplyErrorOffset, 1, be32(5) + be16(0) + be(0, 8)),
       "offset outside"},
  };
  for (const Violation& v : cases) {
    for (size_t step : {size_t(1), size_t(1 << 20)}) {
      ReplyReader r(v.structured, {1, 2});
      Recorder rec;
      r.expect(rd);
      r.expect(bs);
      r.expect(fl);
      rec.read(1, 100, 8);
      std::string why = feed(r, rec, v.wire, step);
      EXPECT_NE(why.find(v.why), std::string::npos) << v.name << ": '" << why << "'";
      EXPECT_TRUE(r.broken()) << v.name;
      // Once broken, nothing more is consumed.
      uint8_t more[4] = {};
      EXPECT_EQ(r.feed(more, 4, rec), 0u) << v.name;
    }
  }
}

TEST(ReplyReader, ReqOneAllowsOneExtent) {
  ReplyReader r(true, {1});
  Recorder rec;
  r.expect({.flags = kCmdFlagReqOne, .type = kCmdBlockStatus, .cookie = 2, .offset = 0, .length = 8192});
  std::string wire = chunk(1, kReplyBlockStatus, 2, be32(1) + be32(10) + be32(0) + be32(10) + be32(0));
  EXPECT_NE(feed(r, rec, wire, 1000).find("REQ_ONE"), std::string::npos);
}

}  // namespace
}  // namespace nbd
