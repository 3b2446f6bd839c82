#include "node/transport.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

namespace node {
namespace {

// Plaintext encrypted per lock of the engine: big enough for full records
// and few syscalls, small enough that a 32 MiB write does not become one
// 32 MiB string, nor hold the engine from the reader for long.
constexpr size_t kSlice = 256 * 1024;
constexpr size_t kCipherBuffer = 256 * 1024;
// A key file holds one short line.
constexpr off_t kMaxKeyFile = 4096;

int poll_ms(int64_t deadline) {
  if (deadline == kNoDeadline) return -1;
  int64_t left = deadline - now_ns();
  return left <= 0 ? 0 : int((left + 999999) / 1000000);
}

std::string errno_text(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// Sends all of iov[0, n) as it is; see Transport::send.
int send_plain(int fd, iovec* iov, int n, int64_t deadline, size_t* sent, std::string* err) {
  *sent = 0;
  while (n > 0) {
    if (iov->iov_len == 0) {
      ++iov;
      --n;
      continue;
    }
    msghdr m{};
    m.msg_iov = iov;
    m.msg_iovlen = size_t(n);
    ssize_t w = ::sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) return *err = errno_text("send"), -1;
      if (!wait_fd(fd, POLLOUT, deadline)) return *err = "send timed out", -1;
      continue;
    }
    *sent += size_t(w);
    size_t left = size_t(w);
    while (left > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --n;
    }
    if (left > 0) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return 0;
}

int send_string(int fd, const std::string& s, int64_t deadline, std::string* err) {
  iovec iov{const_cast<char*>(s.data()), s.size()};
  size_t sent = 0;
  return send_plain(fd, &iov, 1, deadline, &sent, err);
}

}  // namespace

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t deadline_after(int timeout_ms) {
  return timeout_ms <= 0 ? kNoDeadline : now_ns() + int64_t(timeout_ms) * 1000000;
}

bool wait_fd(int fd, short events, int64_t deadline) {
  pollfd p{fd, events, 0};
  for (;;) {
    int r = ::poll(&p, 1, poll_ms(deadline));
    if (r > 0) return true;
    if (r == 0) return false;
    if (errno != EINTR) return true;  // let the next call report the error
  }
}

// ---------------------------------------------------------------- key files

std::optional<Psk> read_psk_file(const std::string& path, std::string* err) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return *err = std::strerror(errno), std::nullopt;
  struct stat st{};
  std::string why, text;
  if (::fstat(fd, &st) != 0) {
    why = errno_text("stat");
  } else if (!S_ISREG(st.st_mode)) {
    why = "not a regular file";
  } else if (st.st_mode & 077) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", unsigned(st.st_mode & 07777));
    why = std::string("permissions ") + mode +
          " are too open: the key must be readable by its owner only (chmod 600)";
  } else if (st.st_size > kMaxKeyFile) {
    why = "too large for a key file (one line NODE:HEX)";
  } else {
    text.resize(size_t(st.st_size));
    ssize_t n = ::read(fd, text.data(), text.size());
    if (n < 0) why = errno_text("read");
    text.resize(n < 0 ? 0 : size_t(n));
  }
  ::close(fd);
  std::optional<tls::PskLine> p;
  std::string_view line(text);
  while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.remove_suffix(1);
  if (why.empty() && line.empty()) {
    why = "empty: expected one line NODE:HEX (psktool format)";
  } else if (why.empty() && line.find('\n') != std::string_view::npos) {
    why = "expected one line NODE:HEX (psktool format), found several";
  } else if (why.empty()) {
    p = tls::parse_psk_line(line, &why);
  }
  tls::wipe(text);  // no copy of the key left behind
  if (!p) return *err = why, std::nullopt;
  return Psk{std::move(p->identity), std::move(p->key)};  // p's key is wiped
}

// ---------------------------------------------------------------- TLS

Transport::Transport(int fd) : fd_(fd) {
  int fl = ::fcntl(fd, F_GETFL);
  blocking_ = fl >= 0 && !(fl & O_NONBLOCK);
}

bool Transport::start_tls(const Psk& psk, std::string_view early, int64_t deadline,
                          std::string* err) {
  std::string why;
  std::unique_ptr<tls::Engine> e = tls::Engine::client(psk.identity, psk.key, &why);
  if (!e) return *err = why, false;
  e->start();
  return handshake(std::move(e), "server", early, deadline, err);
}

bool Transport::accept_tls(tls::KeyLookup lookup, std::string_view early, int64_t deadline,
                           std::string* err) {
  std::string why;
  std::unique_ptr<tls::Engine> e = tls::Engine::server(std::move(lookup), &why);
  if (!e) return *err = why, false;
  return handshake(std::move(e), "client", early, deadline, err);
}

bool Transport::handshake(std::unique_ptr<tls::Engine> e, const char* other,
                          std::string_view early, int64_t deadline, std::string* err) {
  std::string why;
  if (!early.empty()) e->feed(reinterpret_cast<const uint8_t*>(early.data()), early.size());
  cipher_.resize(kCipherBuffer);
  for (;;) {
    // Our flight (Hello, Finished), or the alert of a failure.
    if (!e->outbox().empty()) {
      if (send_string(fd_, e->outbox(), deadline, &why) != 0)
        return *err = "TLS handshake failed: " + why, false;
      e->outbox().clear();
    }
    if (e->status() != tls::Engine::Status::kHandshaking) break;
    ssize_t n = receive_raw(cipher_.data(), cipher_.size(), deadline, &why);
    if (n < 0) return *err = "TLS handshake failed: " + why, false;
    if (n == 0)
      return *err = std::string("TLS handshake failed: the ") + other + " closed the connection",
             false;
    e->feed(cipher_.data(), size_t(n));
  }
  if (e->status() != tls::Engine::Status::kOpen) return *err = e->error(), false;
  engine_ = std::move(e);
  return true;
}

std::string Transport::tls_identity() const {
  std::lock_guard lock(tls_mu_);
  return engine_ ? engine_->identity() : "";
}

std::string Transport::tls_description() const {
  std::lock_guard lock(tls_mu_);
  return engine_ ? engine_->description() : "";
}

int Transport::send(iovec* iov, int n, int64_t deadline, size_t* sent, std::string* err) {
  if (!engine_) return send_plain(fd_, iov, n, deadline, sent, err);
  return send_tls(iov, n, deadline, sent, err);
}

int Transport::send_tls(iovec* iov, int n, int64_t deadline, size_t* sent, std::string* err) {
  *sent = 0;
  // Nothing is encrypted before the socket takes bytes: a request that
  // times out here was never started, and the stream is intact.
  if (!wait_fd(fd_, POLLOUT, deadline)) return *err = "send timed out", -1;
  while (n > 0) {
    {
      std::lock_guard lock(tls_mu_);
      engine_->cork();  // a request's header and data share records
      bool ok = true;
      for (size_t room = kSlice; ok && n > 0 && room > 0;) {
        size_t k = std::min(room, iov->iov_len);
        ok = k == 0 || engine_->write(static_cast<const uint8_t*>(iov->iov_base), k);
        *sent += k;
        room -= k;
        iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + k;
        iov->iov_len -= k;
        if (iov->iov_len == 0) {
          ++iov;
          --n;
        }
      }
      if (!engine_->uncork() || !ok) return *err = engine_->error(), -1;
    }
    if (flush_outbox(deadline, err) != 0) return -1;
  }
  return 0;
}

int Transport::flush_outbox(int64_t deadline, std::string* err) {
  {
    std::lock_guard lock(tls_mu_);
    records_.append(engine_->outbox());
    engine_->outbox().clear();
  }
  int rc = send_string(fd_, records_, deadline, err);
  records_.clear();
  return rc;
}

ssize_t Transport::receive(uint8_t* buf, size_t cap, int64_t deadline, std::string* err) {
  if (!engine_) return receive_raw(buf, cap, deadline, err);
  for (;;) {
    {
      std::lock_guard lock(tls_mu_);
      size_t got = engine_->read(buf, cap);
      if (got > 0) return ssize_t(got);
      if (engine_->status() == tls::Engine::Status::kClosed) return 0;
      if (engine_->status() == tls::Engine::Status::kFailed) return *err = engine_->error(), -1;
    }
    ssize_t n = receive_raw(cipher_.data(), cipher_.size(), deadline, err);
    if (n <= 0) return n;
    std::lock_guard lock(tls_mu_);
    engine_->feed(cipher_.data(), size_t(n));
  }
}

ssize_t Transport::receive_raw(uint8_t* buf, size_t cap, int64_t deadline, std::string* err) {
  // A blocking socket without a deadline waits in recv() itself: one call.
  const bool wait_in_recv = blocking_ && deadline == kNoDeadline;
  for (;;) {
    if (!wait_in_recv && !wait_fd(fd_, POLLIN, deadline)) return *err = "timed out", -1;
    ssize_t n = ::recv(fd_, buf, cap, wait_in_recv ? 0 : MSG_DONTWAIT);
    if (n >= 0) return n;
    if (errno == EAGAIN || errno == EINTR) continue;
    return *err = errno_text("recv"), -1;
  }
}

void Transport::close_notify(int64_t deadline) {
  if (!engine_) return;
  {
    std::lock_guard lock(tls_mu_);
    engine_->close();
  }
  std::string err;
  flush_outbox(deadline, &err);
}

}  // namespace node
