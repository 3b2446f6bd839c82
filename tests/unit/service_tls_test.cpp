// node::Service with ServiceOptions::tls_keys, as the agent's peer listener
// runs it under --tls require, against the real node::NbdClient over TCP on
// loopback: reads pipelined from threads (the service's workers encrypt
// replies while its connection thread decrypts requests); a client without
// TLS, with a wrong key, or with the key under another identity gets no
// export; a service without keys stays plaintext and refuses STARTTLS.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "node/nbd_client.hpp"
#include "node/service.hpp"

namespace node {
namespace {

constexpr uint64_t kSize = 8 << 20;
const char* const kIdentity = "peer/lab@g1";

tls::Key key_of(uint8_t seed) {
  tls::Key k;
  for (size_t i = 0; i < k.size(); ++i) k[i] = uint8_t(seed * 29 + i);
  return k;
}

// A read-only in-memory disk; counts the reads it served.
class MemBackend final : public Backend {
 public:
  MemBackend() : disk_(kSize) {
    for (size_t i = 0; i < disk_.size(); ++i) disk_[i] = uint8_t(i * 13 + i / 65536);
  }
  nbd::Error read(uint8_t* buf, uint64_t len, uint64_t off, std::string*) override {
    std::memcpy(buf, disk_.data() + off, len);
    ++reads;
    return nbd::kOk;
  }
  nbd::Error write(const uint8_t*, uint64_t, uint64_t, bool, std::string* why) override {
    return refuse(why);
  }
  nbd::Error flush(std::string* why) override { return refuse(why); }
  nbd::Error trim(uint64_t, uint64_t, bool, std::string* why) override { return refuse(why); }
  nbd::Error zero(uint64_t, uint64_t, bool, std::string* why) override { return refuse(why); }
  const std::vector<uint8_t>& disk() const { return disk_; }
  std::atomic<int> reads{0};

 private:
  static nbd::Error refuse(std::string* why) {
    *why = "read-only";
    return nbd::kEPERM;
  }
  std::vector<uint8_t> disk_;
};

class OneExport final : public nbd::ExportCatalog {
 public:
  OneExport() : info_(std::make_shared<nbd::ExportInfo>()) {
    info_->name = "lab@g1";
    info_->size = kSize;
    info_->flags = nbd::kFlagReadOnly;
  }
  std::shared_ptr<const nbd::ExportInfo> find(std::string_view name) const override {
    return name == info_->name ? info_ : nullptr;
  }
  std::vector<std::shared_ptr<const nbd::ExportInfo>> list() const override { return {info_}; }

 private:
  std::shared_ptr<nbd::ExportInfo> info_;
};

class ServiceTls : public ::testing::Test {
 protected:
  // A service on 127.0.0.1, with the peer key unless `plaintext`.
  void start(bool plaintext = false) {
    ServiceOptions o;
    o.what = "peers";
    o.handshake_timeout = 5;
    if (!plaintext) {
      o.tls_keys = [](std::string_view id, std::string* why) -> std::optional<tls::Key> {
        if (id == kIdentity) return key_of(1);
        *why = "not the peer identity";
        return std::nullopt;
      };
    }
    svc_ = std::make_unique<Service>(catalog_, [this](const nbd::ExportInfo&) { return &backend_; },
                                     o);
    std::string err;
    ASSERT_TRUE(svc_->listen_tcp("127.0.0.1:0", &err)) << err;
    ASSERT_TRUE(parse_endpoint(svc_->address(), &ep_, &err)) << err;
    svc_->start();
  }
  void TearDown() override {
    if (svc_) svc_->stop();
  }
  // Connects as `identity` with `key` (no TLS when identity is empty).
  bool connect(NbdClient& c, const std::string& identity, const tls::Key& key, std::string* err) {
    if (!identity.empty()) c.use_tls({identity, key});
    return c.connect(ep_, "lab@g1", {}, 5000, err);
  }

  OneExport catalog_;
  MemBackend backend_;
  std::unique_ptr<Service> svc_;
  Endpoint ep_;
};

TEST_F(ServiceTls, ServesThePeerKeyPipelinedFromThreads) {
  start();
  NbdClient c;
  std::string err;
  ASSERT_TRUE(connect(c, kIdentity, key_of(1), &err)) << err;
  EXPECT_EQ(c.tls_description().rfind("TLS1.3/AES-", 0), 0u) << c.tls_description();
  EXPECT_TRUE(c.read_only());
  std::atomic<int> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 6; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937_64 rnd(t);
      std::vector<uint8_t> buf(1 << 20);
      for (int i = 0; i < 40; ++i) {
        uint32_t len = uint32_t(1 + rnd() % buf.size());
        uint64_t off = rnd() % (kSize - len);
        Result r = c.pread(buf.data(), len, off, 10000);
        if (!r.ok() || std::memcmp(buf.data(), backend_.disk().data() + off, len) != 0) ++bad;
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(bad, 0);
  std::vector<uint8_t> buf(4096);
  Result r = c.pwrite(buf.data(), 4096, 0, false, 5000);
  EXPECT_EQ(r.kind, Result::kNbdError);  // the server's answer, over TLS
  c.close();
}

TEST_F(ServiceTls, AClientWithoutTlsGetsNoExport) {
  start();
  NbdClient c;
  std::string err;
  EXPECT_FALSE(connect(c, "", {}, &err));
  EXPECT_NE(err.find("TLS"), std::string::npos) << err;
  EXPECT_EQ(backend_.reads, 0);
}

TEST_F(ServiceTls, AWrongKeyOrIdentityFailsTheTlsHandshake) {
  start();
  const std::pair<std::string, tls::Key> bad[] = {
      {kIdentity, key_of(2)},  // a wrong key
      {"n1", key_of(1)},       // the right key under another identity
  };
  for (const auto& [identity, key] : bad) {
    NbdClient c;
    std::string err;
    EXPECT_FALSE(connect(c, identity, key, &err)) << identity;
    EXPECT_TRUE(c.tls_failed()) << err;
    EXPECT_FALSE(c.starttls_refused()) << err;
    EXPECT_NE(err.find("TLS handshake failed"), std::string::npos) << err;
  }
  EXPECT_EQ(backend_.reads, 0);
  // The service still serves the right key after them.
  NbdClient c;
  std::string err;
  ASSERT_TRUE(connect(c, kIdentity, key_of(1), &err)) << err;
  std::vector<uint8_t> buf(65536);
  ASSERT_TRUE(c.pread(buf.data(), uint32_t(buf.size()), 65536, 5000).ok());
  EXPECT_EQ(std::memcmp(buf.data(), backend_.disk().data() + 65536, buf.size()), 0);
}

TEST_F(ServiceTls, WithoutKeysTheServiceIsPlaintextAndRefusesStartTls) {
  start(/*plaintext=*/true);
  NbdClient tls_client;
  std::string err;
  EXPECT_FALSE(connect(tls_client, kIdentity, key_of(1), &err));
  EXPECT_TRUE(tls_client.starttls_refused()) << err;
  NbdClient c;
  ASSERT_TRUE(connect(c, "", {}, &err)) << err;
  EXPECT_EQ(c.tls_description(), "");
  std::vector<uint8_t> buf(65536);
  ASSERT_TRUE(c.pread(buf.data(), uint32_t(buf.size()), 0, 5000).ok());
  EXPECT_EQ(std::memcmp(buf.data(), backend_.disk().data(), buf.size()), 0);
}

}  // namespace
}  // namespace node
