#include "node/service.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "node/transport.hpp"
#include "protocol/transmission.hpp"

namespace node {

struct Service::Conn {
  int fd = -1;
  std::unique_ptr<Transport> io;  // over fd: every byte in and out
  uint64_t id = 0;
  std::string peer;
  nbd::Session session;
  Backend* backend = nullptr;
  std::mutex send_mu;
  bool send_failed = false;
  std::mutex mu;  // guards inflight
  std::condition_variable idle;
  unsigned inflight = 0;
};

namespace {

std::string errno_text(int e) { return std::strerror(e); }

// Reads exactly len bytes; false on EOF, error or stop (shutdown() wakes
// it). Waits at most timeout_s seconds per chunk when > 0.
bool read_full(Transport& io, void* buf, size_t len, double timeout_s = 0) {
  auto* p = static_cast<uint8_t*>(buf);
  while (len) {
    std::string why;
    const int64_t deadline = timeout_s > 0 ? deadline_after(int(timeout_s * 1000)) : kNoDeadline;
    ssize_t n = io.receive(p, len, deadline, &why);
    if (n <= 0) return false;
    p += n;
    len -= size_t(n);
  }
  return true;
}

bool send_all(Transport& io, iovec* iov, int cnt) {
  size_t sent = 0;
  std::string why;
  return io.send(iov, cnt, kNoDeadline, &sent, &why) == 0;
}

}  // namespace

Service::Service(const nbd::ExportCatalog& catalog,
                 std::function<Backend*(const nbd::ExportInfo&)> backend, ServiceOptions opts)
    : catalog_(catalog), backend_(std::move(backend)), opts_(std::move(opts)) {}

Service::~Service() { stop(); }

bool Service::listen_unix(const std::string& path, std::string* err) {
  sockaddr_un sa{};
  if (path.size() >= sizeof(sa.sun_path)) {
    *err = "socket path too long: " + path;
    return false;
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    *err = "socket: " + errno_text(errno);
    return false;
  }
  sa.sun_family = AF_UNIX;
  memcpy(sa.sun_path, path.data(), path.size());
  // A socket file left by an agent that died is replaced; anything else
  // at that path is not touched.
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) < 0 || ::listen(fd, 64) < 0) {
    *err = "cannot listen on " + path + ": " + errno_text(errno);
    ::close(fd);
    return false;
  }
  listen_fd_ = fd;
  address_ = path;
  unix_path_ = path;
  return true;
}

bool Service::listen_tcp(const std::string& host_port, std::string* err) {
  auto colon = host_port.rfind(':');
  if (colon == std::string::npos) {
    *err = "expected HOST:PORT, got '" + host_port + "'";
    return false;
  }
  std::string host = host_port.substr(0, colon);
  std::string port = host_port.substr(colon + 1);
  if (host.size() > 1 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) {
    *err = "cannot resolve '" + host_port + "': " + gai_strerror(rc);
    return false;
  }
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  if (fd >= 0) ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (fd < 0 || ::bind(fd, res->ai_addr, res->ai_addrlen) < 0 || ::listen(fd, 128) < 0) {
    *err = "cannot listen on " + host_port + ": " + errno_text(errno);
    if (fd >= 0) ::close(fd);
    ::freeaddrinfo(res);
    return false;
  }
  ::freeaddrinfo(res);
  sockaddr_storage ss{};
  socklen_t sl = sizeof(ss);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &sl);
  char h[INET6_ADDRSTRLEN] = "";
  uint16_t p = 0;
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    ::inet_ntop(AF_INET, &a->sin_addr, h, sizeof(h));
    p = ntohs(a->sin_port);
    address_ = std::string(h) + ":" + std::to_string(p);
  } else {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    ::inet_ntop(AF_INET6, &a->sin6_addr, h, sizeof(h));
    p = ntohs(a->sin6_port);
    address_ = "[" + std::string(h) + "]:" + std::to_string(p);
  }
  listen_fd_ = fd;
  return true;
}

void Service::start() {
  for (size_t i = 0; i < opts_.workers; ++i) workers_.emplace_back([this] { worker_loop(); });
  acceptor_ = std::thread([this] { accept_loop(); });
}

void Service::stop() {
  if (stopping_.exchange(true)) return;
  if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& w : conns_)
      if (auto c = w.lock()) ::shutdown(c->fd, SHUT_RDWR);
  }
  {
    std::unique_lock<std::mutex> lk(mu_);
    readers_cv_.wait(lk, [&] { return live_readers_ == 0; });
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    workers_stop_ = true;
  }
  jobs_cv_.notify_all();
  for (auto& t : workers_)
    if (t.joinable()) t.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
  if (!unix_path_.empty()) ::unlink(unix_path_.c_str());
}

void Service::accept_loop() {
  uint64_t next_id = 1;
  while (!stopping_) {
    sockaddr_storage ss{};
    socklen_t sl = sizeof(ss);
    int fd = ::accept4(listen_fd_, reinterpret_cast<sockaddr*>(&ss), &sl, SOCK_CLOEXEC);
    if (fd < 0) {
      if (stopping_) break;
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EMFILE || errno == ENFILE) {
        spdlog::warn("{}: accept: {}; retrying in 100 ms", opts_.what, errno_text(errno));
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        continue;
      }
      if (errno == EINVAL) break;  // shut down
      spdlog::warn("{}: accept: {}", opts_.what, errno_text(errno));
      continue;
    }
    auto c = std::make_shared<Conn>();
    c->fd = fd;
    c->io = std::make_unique<Transport>(fd);
    c->id = next_id++;
    char h[INET6_ADDRSTRLEN] = "";
    if (ss.ss_family == AF_INET) {
      auto* a = reinterpret_cast<sockaddr_in*>(&ss);
      ::inet_ntop(AF_INET, &a->sin_addr, h, sizeof(h));
      c->peer = std::string(h) + ":" + std::to_string(ntohs(a->sin_port));
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    } else if (ss.ss_family == AF_INET6) {
      auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
      ::inet_ntop(AF_INET6, &a->sin6_addr, h, sizeof(h));
      c->peer = "[" + std::string(h) + "]:" + std::to_string(ntohs(a->sin6_port));
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    } else {
      c->peer = "local";
    }
    ++accepted_;
    std::lock_guard<std::mutex> g(mu_);
    // Forget connections that are gone; refuse beyond the limit.
    std::erase_if(conns_, [](const std::weak_ptr<Conn>& w) { return w.expired(); });
    if (conns_.size() >= opts_.max_connections) {
      spdlog::warn("{}: {}: refused, {} connections already", opts_.what, c->peer, conns_.size());
      ::close(fd);
      continue;
    }
    conns_.push_back(c);
    ++live_readers_;
    std::thread([this, c] {
      serve(c);
      std::lock_guard<std::mutex> done(mu_);
      if (--live_readers_ == 0) readers_cv_.notify_all();
    }).detach();
  }
}

bool Service::handshake(Conn& c) {
  nbd::Handshake hs(catalog_, {}, opts_.tls_keys ? nbd::TlsMode::kRequire : nbd::TlsMode::kOff);
  std::vector<uint8_t> buf(64 * 1024);
  std::string_view rest;  // bytes read past what the handshake used
  for (;;) {
    if (!hs.out().empty()) {
      iovec iov{hs.out().data(), hs.out().size()};
      if (!send_all(*c.io, &iov, 1)) return false;
      hs.out().clear();
    }
    if (hs.status() == nbd::Handshake::Status::kTransmission) break;
    if (hs.status() == nbd::Handshake::Status::kClosed) {
      if (!hs.aborted()) spdlog::info("{}: {}: handshake refused: {}", opts_.what, c.peer, hs.close_reason());
      return false;
    }
    if (hs.status() == nbd::Handshake::Status::kStartTls) {
      if (!start_tls(c, hs, rest)) return false;
      continue;
    }
    size_t want = std::min(buf.size(), std::max<size_t>(1, hs.wanted()));
    if (!read_full(*c.io, buf.data(), want, opts_.handshake_timeout)) return false;
    size_t used = hs.feed(buf.data(), want);
    // Only after an acknowledged STARTTLS may bytes be left over (the
    // client's first TLS records); a client sends nothing before
    // NBD_OPT_GO's reply.
    rest = std::string_view(reinterpret_cast<const char*>(buf.data()) + used, want - used);
    for (const std::string& e : hs.take_errors()) spdlog::info("{}: {}: {}", opts_.what, c.peer, e);
  }
  c.session = hs.session();
  c.backend = backend_(*c.session.exp);
  return c.backend != nullptr;
}

// NBD_OPT_STARTTLS was acknowledged: the TLS handshake, then options again,
// now through the engine. The reason of a failure (an unknown identity, a
// wrong key) goes to the log only; the client sees TLS's alert.
bool Service::start_tls(Conn& c, nbd::Handshake& hs, std::string_view early) {
  std::string why;
  if (!c.io->accept_tls(opts_.tls_keys, early,
                        deadline_after(int(opts_.handshake_timeout * 1000)), &why)) {
    spdlog::warn("{}: {}: {}", opts_.what, c.peer, why);
    return false;
  }
  spdlog::debug("{}: {}: TLS established ({}) as {}", opts_.what, c.peer,
                c.io->tls_description(), nbd::quoted(c.io->tls_identity()));
  hs.tls_established(c.io->tls_identity());
  return true;
}

void Service::serve(std::shared_ptr<Conn> c) {
  if (handshake(*c)) {
    spdlog::debug("{}: {} attached '{}'", opts_.what, c->peer, c->session.exp->name);
    const bool ext = c->session.extended;
    const size_t hsize = ext ? nbd::kExtendedRequestSize : nbd::kRequestSize;
    uint8_t head[nbd::kExtendedRequestSize];
    while (!stopping_) {
      if (!read_full(*c->io, head, hsize, opts_.idle_timeout)) break;
      nbd::Request req;
      size_t used = 0;
      if (nbd::parse_request(head, hsize, ext, &req, &used) != nbd::Parse::kOk) {
        spdlog::warn("{}: {}: bad request magic; closing", opts_.what, c->peer);
        break;
      }
      if (req.type == nbd::kCmdDisc) break;
      const uint64_t plen = nbd::payload_length(req, ext);
      nbd::Verdict v = nbd::validate(req, c->session);
      Job j;
      j.conn = c;
      j.req = req;
      if (plen) {
        if (!v.ok() && plen > nbd::kMaxDrain) break;
        if (plen > 64ull << 20) {
          spdlog::warn("{}: {}: payload of {} bytes; closing", opts_.what, c->peer, plen);
          break;
        }
        j.payload.resize(plen);
        if (!read_full(*c->io, j.payload.data(), plen, 30)) break;
      }
      if (!v.ok()) {
        reply(*c, req, v.error, v.why, nullptr, 0);
        continue;
      }
      {
        std::lock_guard<std::mutex> g(c->mu);
        ++c->inflight;
      }
      {
        std::lock_guard<std::mutex> g(mu_);
        jobs_.push_back(std::move(j));
      }
      jobs_cv_.notify_one();
    }
  }
  // Let requests in flight finish (their replies may still go out), then close.
  std::unique_lock<std::mutex> lk(c->mu);
  c->idle.wait(lk, [&] { return c->inflight == 0; });
  {
    std::lock_guard<std::mutex> g(c->send_mu);
    if (!c->send_failed) c->io->close_notify(deadline_after(1000));
  }
  ::shutdown(c->fd, SHUT_RDWR);
  ::close(c->fd);
  c->fd = -1;
}

void Service::worker_loop() {
  for (;;) {
    Job j;
    {
      std::unique_lock<std::mutex> lk(mu_);
      jobs_cv_.wait(lk, [&] { return workers_stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      j = std::move(jobs_.front());
      jobs_.pop_front();
    }
    execute(j);
    std::lock_guard<std::mutex> g(j.conn->mu);
    if (--j.conn->inflight == 0) j.conn->idle.notify_all();
  }
}

void Service::execute(Job& j) {
  Conn& c = *j.conn;
  const nbd::Request& r = j.req;
  std::string why;
  nbd::Error e = nbd::kOk;
  const bool fua = r.flags & nbd::kCmdFlagFua;
  switch (r.type) {
    case nbd::kCmdRead: {
      std::unique_ptr<uint8_t[]> buf(new uint8_t[r.length]);  // filled by the backend
      e = c.backend->read(buf.get(), r.length, r.offset, &why);
      return reply(c, r, e, why, e == nbd::kOk ? buf.get() : nullptr, e == nbd::kOk ? r.length : 0);
    }
    case nbd::kCmdWrite:
      e = c.backend->write(j.payload.data(), r.length, r.offset, fua, &why);
      break;
    case nbd::kCmdFlush:
      e = c.backend->flush(&why);
      break;
    case nbd::kCmdTrim:
      e = c.backend->trim(r.length, r.offset, fua, &why);
      break;
    case nbd::kCmdWriteZeroes:
      e = c.backend->zero(r.length, r.offset, fua, &why);
      break;
    case nbd::kCmdCache:
      break;
    default:
      e = nbd::kEINVAL;
      why = "command not supported here";
  }
  reply(c, r, e, why, nullptr, 0);
}

void Service::reply(Conn& c, const nbd::Request& req, nbd::Error err, const std::string& why,
                    const uint8_t* data, size_t len) {
  if (err != nbd::kOk)
    spdlog::debug("{}: {}: {} off={} len={}: {} ({})", opts_.what, c.peer, nbd::cmd_name(req.type),
                  req.offset, req.length, nbd::error_name(err), why);
  std::string head;
  uint8_t h[nbd::kMaxReplyHeader];
  if (err != nbd::kOk) {
    head = nbd::encode_done(c.session, req, err, why);
  } else if (req.type == nbd::kCmdRead) {
    size_t n = nbd::encode_read_header(h, c.session, req, len);
    head.assign(reinterpret_cast<char*>(h), n);
  } else {
    size_t n = nbd::encode_ok(h, c.session, req);
    head.assign(reinterpret_cast<char*>(h), n);
  }
  iovec iov[2] = {{head.data(), head.size()}, {const_cast<uint8_t*>(data), len}};
  std::lock_guard<std::mutex> g(c.send_mu);
  if (opts_.fault_hangup_mid_reply && data && len > 1) {
    iov[1].iov_len = len / 2;
    send_all(*c.io, iov, 2);
    c.send_failed = true;
    ::shutdown(c.fd, SHUT_RDWR);
    return;
  }
  if (c.send_failed || c.fd < 0) return;
  if (!send_all(*c.io, iov, data ? 2 : 1)) {
    c.send_failed = true;
    ::shutdown(c.fd, SHUT_RDWR);
  }
}

}  // namespace node
