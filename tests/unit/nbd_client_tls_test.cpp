// Tests for node::NbdClient over TLS (node/transport.*) and node's key
// files, against a small fake server on a Unix socket: it speaks the NBD
// handshake up to NBD_OPT_STARTTLS by hand, then runs a real tls::Engine
// (GnuTLS) and serves an in-memory disk with simple replies, one request at
// a time. The client's side is the real NbdClient, pipelined from threads.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "node/nbd_client.hpp"
#include "node/transport.hpp"
#include "protocol/wire.hpp"

namespace node {
namespace {

tls::Key key_of(uint8_t seed) {
  tls::Key k;
  for (size_t i = 0; i < k.size(); ++i) k[i] = uint8_t(seed * 31 + i);
  return k;
}

class FakeTlsServer {
 public:
  enum class Mode { kAccept, kRefuse };
  static constexpr uint64_t kSize = 8 << 20;

  FakeTlsServer(Mode mode, const std::string& identity, const tls::Key& key)
      : mode_(mode), identity_(identity), key_(key), disk_(kSize) {
    char dir[] = "/tmp/nbdtlsXXXXXX";
    EXPECT_NE(::mkdtemp(dir), nullptr);
    dir_ = dir;
    path_ = dir_ + "/s";
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path_.c_str(), sizeof sa.sun_path - 1);
    EXPECT_EQ(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
    EXPECT_EQ(::listen(listen_fd_, 4), 0);
    for (size_t i = 0; i < disk_.size(); ++i) disk_[i] = uint8_t(i * 7 + i / 4096);
    thread_ = std::thread([this] { run(); });
  }
  ~FakeTlsServer() {
    ::shutdown(listen_fd_, SHUT_RDWR);
    if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
    thread_.join();
    ::close(listen_fd_);
    if (fd_ >= 0) ::close(fd_);
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
  }

  Endpoint endpoint() const {
    Endpoint e;
    e.unix_path = path_;
    return e;
  }
  // Once the connection ended (join via the destructor, or wait_done()).
  const std::string& after_refusal() const { return after_refusal_; }
  const std::string& tls_error() const { return tls_error_; }
  const std::vector<uint8_t>& disk() const { return disk_; }
  void wait_done() {
    for (int i = 0; i < 500 && !done_; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }

 private:
  void run() {
    fd_ = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd_ >= 0) serve();
    if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
    done_ = true;
  }

  bool raw_read(void* p, size_t n) {
    auto* b = static_cast<uint8_t*>(p);
    while (n) {
      ssize_t r = ::recv(fd_, b, n, 0);
      if (r <= 0) return false;
      b += r;
      n -= size_t(r);
    }
    return true;
  }
  bool raw_write(const std::string& s) {
    return ::send(fd_, s.data(), s.size(), MSG_NOSIGNAL) == ssize_t(s.size());
  }
  std::string option_reply(uint32_t opt, uint32_t type, const std::string& data = "") {
    std::string r;
    nbd::put64(r, nbd::kOptReplyMagic);
    nbd::put32(r, opt);
    nbd::put32(r, type);
    nbd::put32(r, uint32_t(data.size()));
    return r + data;
  }

  void serve() {
    std::string greeting;
    nbd::put64(greeting, nbd::kNbdMagic);
    nbd::put64(greeting, nbd::kOptMagic);
    nbd::put16(greeting, nbd::kFlagFixedNewstyle | nbd::kFlagNoZeroes);
    uint8_t flags[4], opt[16];
    if (!raw_write(greeting) || !raw_read(flags, 4) || !raw_read(opt, 16)) return;
    if (nbd::load32(opt + 8) != nbd::kOptStartTls) return;
    if (mode_ == Mode::kRefuse) {
      raw_write(option_reply(nbd::kOptStartTls, nbd::kRepErrUnsup));
      char b[4096];
      for (ssize_t r; (r = ::recv(fd_, b, sizeof b, 0)) > 0;) after_refusal_.append(b, size_t(r));
      return;
    }
    raw_write(option_reply(nbd::kOptStartTls, nbd::kRepAck));
    if (!tls_handshake()) return;
    if (!options()) return;
    transmission();
  }

  bool tls_handshake() {
    std::string why;
    engine_ = tls::Engine::server(
        [this](std::string_view id, std::string* reason) -> std::optional<tls::Key> {
          if (id == identity_) return key_;
          *reason = "unknown identity";
          return std::nullopt;
        },
        &why);
    while (engine_->status() == tls::Engine::Status::kHandshaking) {
      uint8_t b[16384];
      ssize_t r = ::recv(fd_, b, sizeof b, 0);
      if (r <= 0) return false;
      engine_->feed(b, size_t(r));
      raw_write(std::exchange(engine_->outbox(), {}));
    }
    tls_error_ = engine_->error();
    return engine_->status() == tls::Engine::Status::kOpen;
  }

  bool read_tls(void* p, size_t n) {
    auto* b = static_cast<uint8_t*>(p);
    while (n) {
      size_t got = engine_->read(b, n);
      if (got) {
        b += got;
        n -= got;
        continue;
      }
      if (engine_->status() != tls::Engine::Status::kOpen) return false;
      uint8_t c[16384];
      ssize_t r = ::recv(fd_, c, sizeof c, 0);
      if (r <= 0) return false;
      engine_->feed(c, size_t(r));
    }
    return true;
  }
  bool write_tls(const std::string& s) {
    return engine_->write(reinterpret_cast<const uint8_t*>(s.data()), s.size()) &&
           raw_write(std::exchange(engine_->outbox(), {}));
  }

  bool options() {
    for (;;) {
      uint8_t h[16];
      if (!read_tls(h, 16)) return false;
      const uint32_t opt = nbd::load32(h + 8), len = nbd::load32(h + 12);
      std::string data(len, '\0');
      if (len && !read_tls(data.data(), len)) return false;
      if (opt != nbd::kOptGo) {
        write_tls(option_reply(opt, nbd::kRepErrUnsup));  // simple replies only
        continue;
      }
      std::string info;
      nbd::put16(info, nbd::kInfoExport);
      nbd::put64(info, kSize);
      nbd::put16(info, nbd::kFlagHasFlags | nbd::kFlagSendFlush);
      return write_tls(option_reply(opt, nbd::kRepInfo, info) + option_reply(opt, nbd::kRepAck));
    }
  }

  void transmission() {
    for (;;) {
      uint8_t h[nbd::kRequestSize];
      if (!read_tls(h, sizeof h)) return;
      const uint16_t type = nbd::load16(h + 6);
      const uint64_t off = nbd::load64(h + 16);
      const uint32_t len = nbd::load32(h + 24);
      if (type == nbd::kCmdDisc) return;
      if (type == nbd::kCmdWrite && !read_tls(disk_.data() + off, len)) return;
      std::string r;
      nbd::put32(r, nbd::kSimpleReplyMagic);
      nbd::put32(r, 0);
      r.append(reinterpret_cast<const char*>(h + 8), 8);  // the cookie
      if (type == nbd::kCmdRead) r.append(reinterpret_cast<const char*>(disk_.data() + off), len);
      if (!write_tls(r)) return;
    }
  }

  Mode mode_;
  std::string identity_;
  tls::Key key_;
  std::vector<uint8_t> disk_;
  std::string dir_, path_;
  int listen_fd_ = -1;
  int fd_ = -1;
  std::unique_ptr<tls::Engine> engine_;
  std::string after_refusal_, tls_error_;
  std::atomic<bool> done_{false};
  std::thread thread_;
};

TEST(NbdClientTls, ReadsAndWritesGoThroughTls) {
  FakeTlsServer srv(FakeTlsServer::Mode::kAccept, "n1", key_of(1));
  NbdClient c;
  c.use_tls({"n1", key_of(1)});
  std::string err;
  ASSERT_TRUE(c.connect(srv.endpoint(), "lab/n1", {}, 5000, &err)) << err;
  EXPECT_EQ(c.size(), FakeTlsServer::kSize);
  EXPECT_NE(c.tls_description().find("TLS1.3"), std::string::npos) << c.tls_description();

  // A write of several slices of records, and one read of it back.
  std::vector<uint8_t> big(3 << 20);
  for (size_t i = 0; i < big.size(); ++i) big[i] = uint8_t(i * 13 + 5);
  ASSERT_TRUE(c.pwrite(big.data(), uint32_t(big.size()), 1 << 20, false, 5000).ok());
  std::vector<uint8_t> back(big.size());
  ASSERT_TRUE(c.pread(back.data(), uint32_t(back.size()), 1 << 20, 5000).ok());
  EXPECT_EQ(back, big);

  // Pipelined from threads: each owns its blocks, and checks what it wrote.
  std::atomic<int> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 8; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<uint8_t> w(16384), r(16384);
      for (int i = 0; i < 60; ++i) {
        const uint64_t off = uint64_t((rng() % 64) * 8 + t) * 16384;
        for (auto& b : w) b = uint8_t(rng());
        if (!c.pwrite(w.data(), uint32_t(w.size()), off, false, 5000).ok()) ++bad;
        if (!c.pread(r.data(), uint32_t(r.size()), off, 5000).ok() || r != w) ++bad;
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(bad, 0);
  EXPECT_TRUE(c.flush(5000).ok());
  c.close();
}

TEST(NbdClientTls, AServerThatRefusesStartTlsGetsNothingMore) {
  FakeTlsServer srv(FakeTlsServer::Mode::kRefuse, "n1", key_of(1));
  NbdClient c;
  c.use_tls({"n1", key_of(1)});
  std::string err;
  EXPECT_FALSE(c.connect(srv.endpoint(), "lab/n1", {}, 5000, &err));
  EXPECT_TRUE(c.tls_failed());
  EXPECT_TRUE(c.starttls_refused());
  EXPECT_NE(err.find("did not accept NBD_OPT_STARTTLS"), std::string::npos) << err;
  EXPECT_NE(err.find("refusing to continue"), std::string::npos) << err;
  EXPECT_NE(err.find("unix:"), std::string::npos) << err;  // names the server
  srv.wait_done();
  EXPECT_EQ(srv.after_refusal(), "") << "bytes sent in plaintext after a refused STARTTLS";
}

TEST(NbdClientTls, AWrongKeyFailsTheHandshake) {
  FakeTlsServer srv(FakeTlsServer::Mode::kAccept, "n1", key_of(1));
  NbdClient c;
  c.use_tls({"n1", key_of(2)});
  std::string err;
  EXPECT_FALSE(c.connect(srv.endpoint(), "lab/n1", {}, 5000, &err));
  EXPECT_TRUE(c.tls_failed());
  EXPECT_FALSE(c.starttls_refused());  // it took STARTTLS: our key may be the wrong one
  EXPECT_NE(err.find("TLS handshake failed"), std::string::npos) << err;
  EXPECT_NE(err.find("key for 'n1'"), std::string::npos) << err;
  srv.wait_done();
  EXPECT_NE(srv.tls_error(), "");
}

// ---------------------------------------------------------------- key files

class KeyFile : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir[] = "/tmp/nbdkeyXXXXXX";
    ASSERT_NE(::mkdtemp(dir), nullptr);
    dir_ = dir;
  }
  void TearDown() override { std::system(("rm -rf " + dir_).c_str()); }
  std::string write(const std::string& text, mode_t mode) {
    std::string p = dir_ + "/key" + std::to_string(n_++);
    std::ofstream(p) << text;
    ::chmod(p.c_str(), mode);
    return p;
  }
  std::string dir_;
  int n_ = 0;
};

const std::string kHex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

TEST_F(KeyFile, ReadsAPsktoolLine) {
  std::string err;
  for (const std::string& text : {"n1:" + kHex + "\n", "n1:" + kHex}) {
    auto psk = read_psk_file(write(text, 0600), &err);
    ASSERT_TRUE(psk) << err;
    EXPECT_EQ(psk->identity, "n1");
    EXPECT_EQ(psk->key[1], 0x11);
    EXPECT_EQ(psk->key[31], 0xff);
  }
  EXPECT_TRUE(read_psk_file(write("n1:" + kHex + "\n", 0400), &err)) << err;
}

TEST_F(KeyFile, RefusesFilesOthersMayRead) {
  for (mode_t m : {0644, 0640, 0604, 0620, 0602, 0660}) {
    std::string err;
    EXPECT_FALSE(read_psk_file(write("n1:" + kHex + "\n", m), &err)) << std::oct << m;
    EXPECT_NE(err.find("too open"), std::string::npos) << err;
    EXPECT_NE(err.find("chmod 600"), std::string::npos) << err;
  }
}

TEST_F(KeyFile, RefusesMalformedContents) {
  const std::pair<std::string, const char*> bad[] = {
      {"", "empty"},
      {"\n", "empty"},
      {"n1:" + kHex + "\nn2:" + kHex + "\n", "one line"},
      {kHex, "psktool"},
      {":" + kHex, "psktool"},
      {"n1:" + kHex.substr(2), "64 hex digits"},
      {"n1:" + kHex + "00", "64 hex digits"},
      {"n1:" + kHex.substr(0, 62) + "zz", "64 hex digits"},
  };
  for (const auto& [text, why] : bad) {
    std::string err;
    EXPECT_FALSE(read_psk_file(write(text, 0600), &err)) << text;
    EXPECT_NE(err.find(why), std::string::npos) << text << ": " << err;
  }
  std::string err;
  EXPECT_FALSE(read_psk_file(dir_ + "/none", &err));
  EXPECT_NE(err.find("No such file"), std::string::npos) << err;
  EXPECT_FALSE(read_psk_file(dir_, &err));
  EXPECT_NE(err.find("not a regular file"), std::string::npos) << err;
}

}  // namespace
}  // namespace node
