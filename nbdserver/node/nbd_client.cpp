#include "node/nbd_client.hpp"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <spdlog/spdlog.h>

namespace node {
namespace {

constexpr size_t kReadBuffer = 256 * 1024;

std::chrono::steady_clock::time_point time_point(int64_t deadline) {
  return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(deadline));
}

std::string errno_text(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

bool parse_port(std::string_view s, uint16_t* port) {
  if (s.empty() || s.size() > 5) return false;
  uint32_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + uint32_t(c - '0');
  }
  if (v == 0 || v > 65535) return false;
  *port = uint16_t(v);
  return true;
}

}  // namespace

std::string Endpoint::text() const {
  if (!unix_path.empty()) return "unix:" + unix_path;
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

bool parse_endpoint(std::string_view s, Endpoint* out, std::string* err) {
  Endpoint e;
  const std::string text(s);
  if (s.starts_with("unix:")) {
    e.unix_path = std::string(s.substr(5));
    if (e.unix_path.empty()) return *err = "empty Unix socket path in '" + text + "'", false;
    if (e.unix_path.size() >= sizeof(sockaddr_un::sun_path))
      return *err = "Unix socket path too long in '" + text + "'", false;
    *out = std::move(e);
    return true;
  }
  std::string_view port;
  if (s.starts_with("[")) {
    size_t close = s.find(']');
    if (close == std::string_view::npos || close + 1 >= s.size() || s[close + 1] != ':')
      return *err = "expected [ADDRESS]:PORT, got '" + text + "'", false;
    e.host = std::string(s.substr(1, close - 1));
    port = s.substr(close + 2);
  } else {
    size_t colon = s.rfind(':');
    if (colon == std::string_view::npos)
      return *err = "expected HOST:PORT, [ADDRESS]:PORT or unix:PATH, got '" + text + "'", false;
    e.host = std::string(s.substr(0, colon));
    port = s.substr(colon + 1);
    if (e.host.find(':') != std::string::npos)
      return *err = "IPv6 addresses need brackets: '[ADDRESS]:PORT', got '" + text + "'", false;
  }
  if (e.host.empty()) return *err = "empty host in '" + text + "'", false;
  if (!parse_port(port, &e.port)) return *err = "bad port in '" + text + "'", false;
  *out = std::move(e);
  return true;
}

// ---------------------------------------------------------------- connecting

NbdClient::~NbdClient() { close(); }

bool NbdClient::open_socket(const Endpoint& ep, int64_t deadline, std::string* err) {
  auto try_connect = [&](int family, const sockaddr* sa, socklen_t len) -> int {
    int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return *err = errno_text("socket"), -1;
    if (::connect(fd, sa, len) != 0 && errno != EINPROGRESS) {
      *err = errno_text("connect");
      ::close(fd);
      return -1;
    }
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (!wait_fd(fd, POLLOUT, deadline)) {
      *err = "connect timed out";
      soerr = -1;
    } else if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr != 0) {
      *err = std::string("connect: ") + std::strerror(soerr ? soerr : errno);
      soerr = -1;
    }
    if (soerr != 0) {
      ::close(fd);
      return -1;
    }
    return fd;
  };
  if (!ep.unix_path.empty()) {
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, ep.unix_path.c_str(), sizeof sa.sun_path - 1);
    fd_ = try_connect(AF_UNIX, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
    return fd_ >= 0;
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port = std::to_string(ep.port);
  if (int rc = ::getaddrinfo(ep.host.c_str(), port.c_str(), &hints, &res); rc != 0) {
    *err = std::string("resolve: ") + gai_strerror(rc);
    return false;
  }
  for (addrinfo* a = res; a && fd_ < 0; a = a->ai_next)
    fd_ = try_connect(a->ai_family, a->ai_addr, a->ai_addrlen);
  ::freeaddrinfo(res);
  if (fd_ < 0) return false;
  int one = 1;
  ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return true;
}

bool NbdClient::handshake(const std::string& export_name, const std::vector<std::string>& contexts,
                          int64_t deadline, std::string* err) {
  using Status = nbd::ClientHandshake::Status;
  nbd::ClientHandshake hs(
      {.export_name = export_name, .structured = true, .contexts = contexts, .starttls = bool(psk_)});
  std::string buf(64 * 1024, '\0');
  std::string leftover;
  bool asked_tls = false;  // NBD_OPT_STARTTLS is on its way
  // A failed handshake sends nothing more: after a refused STARTTLS, not
  // one byte goes out in plaintext.
  while (hs.status() != Status::kFailed) {
    if (!hs.out().empty()) {
      iovec iov{hs.out().data(), hs.out().size()};
      size_t sent = 0;
      if (transport_->send(&iov, 1, deadline, &sent, err) != 0) return false;
      hs.out().clear();
      asked_tls = psk_ != nullptr;
    }
    if (hs.status() == Status::kStartTls) {
      if (!start_tls(leftover, deadline, err)) return false;
      leftover.clear();
      hs.tls_established();
      continue;
    }
    if (hs.status() != Status::kContinue) break;
    std::string why;
    ssize_t n = transport_->receive(reinterpret_cast<uint8_t*>(buf.data()), buf.size(), deadline, &why);
    if (n < 0) return *err = why == "timed out" ? "handshake timed out" : why, false;
    if (n == 0) return *err = "the server closed the connection during the handshake", false;
    size_t used = hs.feed(reinterpret_cast<uint8_t*>(buf.data()), size_t(n));
    leftover.assign(buf.data() + used, size_t(n) - used);
  }
  if (hs.status() == Status::kFailed) {
    // Between STARTTLS and TLS, any failure is the server not taking it.
    starttls_refused_ = asked_tls && !transport_->tls();
    if (!starttls_refused_) refused_ = hs.refusal();
    return *err = hs.error(), false;
  }
  session_ = hs.session();
  std::vector<uint32_t> ids;
  for (const nbd::MetaContext& c : session_.contexts) ids.push_back(c.id);
  reader_ = std::make_unique<nbd::ReplyReader>(session_.structured, std::move(ids));
  reader_thread_ = std::thread(&NbdClient::read_loop, this, std::move(leftover));
  return true;
}

// After the server's ACK to NBD_OPT_STARTTLS: the TLS handshake, `early`
// being what followed the ACK.
bool NbdClient::start_tls(std::string_view early, int64_t deadline, std::string* err) {
  if (transport_->start_tls(*psk_, early, deadline, err)) {
    spdlog::debug("nbd client {}: {} as '{}'", peer_, transport_->tls_description(), psk_->identity);
    return true;
  }
  tls_failed_ = true;
  *err += " (is the server's key for '" + psk_->identity + "' the one this node has?)";
  return false;
}

bool NbdClient::connect(const Endpoint& ep, const std::string& export_name,
                        const std::vector<std::string>& contexts, int timeout_ms,
                        std::string* err) {
  std::string why;
  peer_ = ep.text();
  const int64_t deadline = deadline_after(timeout_ms);
  if (fd_ >= 0 || broken()) {
    why = "already connected";
  } else if (open_socket(ep, deadline, &why)) {
    transport_ = std::make_unique<Transport>(fd_);
    if (handshake(export_name, contexts, deadline, &why)) return true;
  }
  *err = peer_ + ": " + why;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  broken_ = true;
  why_ = why;
  return false;
}

// ---------------------------------------------------------------- replies

// Routes the reader's reports to the calls; runs on the reader thread with
// mu_ held.
class NbdClient::Sink : public nbd::ReplySink {
 public:
  explicit Sink(NbdClient& c) : c_(c) {}
  void on_data(uint64_t cookie, uint64_t off, const uint8_t* p, size_t n) override {
    if (Call* call = live(cookie)) std::memcpy(call->buf + (off - call->offset), p, n);
  }
  void on_hole(uint64_t cookie, uint64_t off, uint64_t n) override {
    if (Call* call = live(cookie)) std::memset(call->buf + (off - call->offset), 0, n);
  }
  void on_extents(uint64_t cookie, uint32_t ctx, std::span<const nbd::Extent> ext) override {
    Call* call = live(cookie);
    if (!call || ctx != call->want_ctx) return;
    size_t room = kMaxExtents - std::min(kMaxExtents, call->extents.size());
    call->extents.insert(call->extents.end(), ext.begin(), ext.begin() + std::min(room, ext.size()));
  }
  void on_error(uint64_t cookie, uint32_t, std::string_view message) override {
    if (Call* call = live(cookie); call && call->message.empty()) call->message = message;
  }
  void on_done(uint64_t cookie, uint32_t error) override {
    auto it = c_.calls_.find(cookie);
    if (it == c_.calls_.end()) return;
    const std::shared_ptr<Call> call = std::move(it->second);
    c_.calls_.erase(it);
    call->done = true;
    call->error = error;
    call->cv.notify_one();  // its caller alone
  }

 private:
  Call* live(uint64_t cookie) {
    auto it = c_.calls_.find(cookie);
    return it == c_.calls_.end() || it->second->abandoned ? nullptr : it->second.get();
  }
  NbdClient& c_;
};

void NbdClient::read_loop(std::string leftover) {
  Sink sink(*this);
  std::vector<uint8_t> buf(kReadBuffer);
  if (!leftover.empty()) {
    std::lock_guard lock(mu_);
    reader_->feed(reinterpret_cast<const uint8_t*>(leftover.data()), leftover.size(), sink);
    if (reader_->broken()) return fail("protocol violation: " + reader_->why());
  }
  for (;;) {
    std::string why;
    ssize_t n = transport_->receive(buf.data(), buf.size(), kNoDeadline, &why);
    std::lock_guard lock(mu_);
    if (n <= 0) return fail(n == 0 ? "the server closed the connection" : why);
    reader_->feed(buf.data(), size_t(n), sink);
    if (reader_->broken()) return fail("protocol violation: " + reader_->why());
  }
}

void NbdClient::wake_all_locked() {
  for (auto& [cookie, call] : calls_) call->cv.notify_all();
}

void NbdClient::fail(std::string why) {
  if (broken_) return;
  why_ = std::move(why);
  broken_ = true;
  spdlog::warn("nbd client {}: {}", peer_, why_);
  ::shutdown(fd_, SHUT_RDWR);
  wake_all_locked();
}

std::string NbdClient::why() const {
  std::lock_guard lock(mu_);
  return why_;
}

// ---------------------------------------------------------------- requests

Result NbdClient::local_error(std::string why) const {
  return {Result::kNbdError, nbd::kEINVAL, std::move(why)};
}

Result NbdClient::submit(nbd::Request req, const void* payload, const std::shared_ptr<Call>& call,
                         int timeout_ms) {
  const int64_t deadline = deadline_after(timeout_ms);
  std::unique_lock wlock(write_mu_, std::defer_lock);
  if (deadline == kNoDeadline) {
    wlock.lock();
  } else if (!wlock.try_lock_until(time_point(deadline))) {
    return {Result::kTimeout, 0, "timed out waiting to send"};
  }
  {
    std::lock_guard lock(mu_);
    if (!reader_) return {Result::kBroken, 0, "not connected"};
    if (broken_) return {Result::kBroken, 0, why_};
    req.cookie = next_cookie_++;
    reader_->expect(req);
    calls_[req.cookie] = call;
  }
  uint8_t hdr[nbd::kRequestSize];
  nbd::encode_request(hdr, req);
  iovec iov[2] = {{hdr, sizeof hdr},
                  {const_cast<void*>(payload), req.type == nbd::kCmdWrite ? size_t(req.length) : 0}};
  size_t sent = 0;
  std::string err;
  if (transport_->send(iov, 2, deadline, &sent, &err) != 0) {
    std::lock_guard lock(mu_);
    call->abandoned = true;
    if (sent == 0 && !broken_ && err == "send timed out")
      return {Result::kTimeout, 0, "timed out waiting to send"};
    fail(err + " after " + std::to_string(sent) + " bytes of a request");
    return {Result::kBroken, 0, why_};
  }
  wlock.unlock();

  std::unique_lock lock(mu_);
  auto ready = [&] { return call->done || broken_; };
  if (deadline == kNoDeadline) {
    call->cv.wait(lock, ready);
  } else {
    call->cv.wait_until(lock, time_point(deadline), ready);
  }
  if (call->done && call->error == 0) return {};
  if (call->done) {
    std::string why = std::string(nbd::error_name(call->error));
    if (!call->message.empty()) why += ": " + call->message;
    return {Result::kNbdError, call->error, why};
  }
  call->abandoned = true;
  if (broken_) return {Result::kBroken, 0, why_};
  return {Result::kTimeout, 0, "no reply within " + std::to_string(timeout_ms) + " ms"};
}

Result NbdClient::pread(void* buf, uint32_t len, uint64_t off, int timeout_ms) {
  if (len > session_.max_block) return local_error("read larger than the maximum block size");
  auto call = std::make_shared<Call>();
  call->type = nbd::kCmdRead;
  call->offset = off;
  call->buf = static_cast<uint8_t*>(buf);
  return submit({.type = nbd::kCmdRead, .offset = off, .length = len}, nullptr, call, timeout_ms);
}

Result NbdClient::pwrite(const void* buf, uint32_t len, uint64_t off, bool fua, int timeout_ms) {
  if (len > session_.max_block) return local_error("write larger than the maximum block size");
  if (fua && !(session_.flags & nbd::kFlagSendFua)) return local_error("FUA not offered");
  uint16_t flags = fua ? nbd::kCmdFlagFua : 0;
  return submit({.flags = flags, .type = nbd::kCmdWrite, .offset = off, .length = len}, buf,
                std::make_shared<Call>(), timeout_ms);
}

Result NbdClient::flush(int timeout_ms) {
  return submit({.type = nbd::kCmdFlush}, nullptr, std::make_shared<Call>(), timeout_ms);
}

Result NbdClient::trim(uint32_t len, uint64_t off, int timeout_ms) {
  return submit({.type = nbd::kCmdTrim, .offset = off, .length = len}, nullptr,
                std::make_shared<Call>(), timeout_ms);
}

Result NbdClient::zero(uint32_t len, uint64_t off, int timeout_ms) {
  return submit({.type = nbd::kCmdWriteZeroes, .offset = off, .length = len}, nullptr,
                std::make_shared<Call>(), timeout_ms);
}

Result NbdClient::block_status(uint32_t len, uint64_t off, uint32_t context_id,
                               std::vector<nbd::Extent>* out, int timeout_ms) {
  if (context_id == 0) return local_error("metadata context not negotiated");
  auto call = std::make_shared<Call>();
  call->want_ctx = context_id;
  Result r = submit({.type = nbd::kCmdBlockStatus, .offset = off, .length = len}, nullptr, call,
                    timeout_ms);
  if (r.ok()) {
    std::lock_guard lock(mu_);
    *out = std::move(call->extents);
  }
  return r;
}

// ---------------------------------------------------------------- closing

void NbdClient::close() {
  std::lock_guard close_lock(close_mu_);
  if (fd_ < 0) return;
  bool healthy = false;
  {
    std::lock_guard lock(mu_);
    if (!broken_) {  // from here on the reader's EOF is no failure to report
      healthy = true;
      why_ = "connection closed";
      broken_ = true;
      wake_all_locked();
    }
  }
  if (healthy) {
    std::unique_lock wlock(write_mu_, std::defer_lock);
    if (wlock.try_lock_for(std::chrono::seconds(1))) {
      uint8_t hdr[nbd::kRequestSize];
      nbd::encode_request(hdr, {.type = nbd::kCmdDisc});
      iovec iov{hdr, sizeof hdr};
      size_t sent = 0;
      std::string err;
      transport_->send(&iov, 1, deadline_after(1000), &sent, &err);
      transport_->close_notify(deadline_after(1000));
    }
  }
  ::shutdown(fd_, SHUT_RDWR);
  if (reader_thread_.joinable()) reader_thread_.join();
  std::lock_guard wlock(write_mu_);  // no sender still uses fd_
  ::close(fd_);
  fd_ = -1;
}

}  // namespace node
