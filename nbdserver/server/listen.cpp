#include "server/listen.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

namespace server {
namespace {

constexpr int kBacklog = 1024;

std::string describe(const sockaddr* sa) {
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (sa->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    port = ntohs(in->sin_port);
    return std::string(host) + ":" + std::to_string(port);
  }
  if (sa->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    port = ntohs(in6->sin6_port);
    return "[" + std::string(host) + "]:" + std::to_string(port);
  }
  if (sa->sa_family == AF_UNIX) return reinterpret_cast<const sockaddr_un*>(sa)->sun_path;
  return "?";
}

std::string bound_address(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
  return describe(reinterpret_cast<sockaddr*>(&ss));
}

// Binds and listens on one resolved address. Returns the socket, or -1
// with errno set.
int bind_listen(const addrinfo* ai) {
  int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
  if (fd < 0) return -1;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (ai->ai_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, kBacklog) == 0) return fd;
  const int e = errno;
  close(fd);
  errno = e;
  return -1;
}

// Listens on the first address `spec` resolves to that works. An address
// in use is tried again for up to `retry` seconds: SO_REUSEADDR does not
// cover a socket still in LISTEN state, and a server killed with SIGKILL
// keeps its listening socket until the kernel has torn down its io_uring,
// a moment after the process is gone.
bool open_tcp(const std::string& spec, double retry, std::vector<Listener>* out,
              std::string* err) {
  std::string host, port;
  if (!split_host_port(spec, &host, &port)) {
    *err = "--listen '" + spec + "': expected HOST:PORT or [IPV6]:PORT";
    return false;
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) {
    *err = "--listen '" + spec + "': " + gai_strerror(rc);
    return false;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(retry);
  bool waited = false;
  int fd = -1, e = 0;
  for (;;) {
    bool in_use = false;
    for (addrinfo* ai = res; ai && fd < 0; ai = ai->ai_next) {
      fd = bind_listen(ai);
      if (fd < 0) {
        e = errno;
        in_use = in_use || e == EADDRINUSE;
      }
    }
    if (fd >= 0 || !in_use || std::chrono::steady_clock::now() >= deadline) break;
    if (!waited) {
      spdlog::info("{}: address in use; waiting up to {} s for it to be free", spec, retry);
      waited = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  freeaddrinfo(res);
  if (fd < 0) {
    *err = "cannot listen on " + spec + ": " + (e ? strerror(e) : "no usable address");
    if (e == EADDRINUSE)
      *err += fmt::format(" (still in use after {:g} s of --bind-retry: another process "
                          "listens there)", retry);
    return false;
  }
  out->push_back({fd, bound_address(fd), {}});
  return true;
}

bool open_unix(const std::string& path, std::vector<Listener>* out, std::string* err) {
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  if (path.size() >= sizeof sun.sun_path) {
    *err = "--socket '" + path + "': path too long";
    return false;
  }
  memcpy(sun.sun_path, path.c_str(), path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    *err = std::string("socket: ") + strerror(errno);
    return false;
  }
  // A stale socket file from a killed server is replaced; a live one is not.
  struct stat st;
  if (lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    bool live = connect(probe, reinterpret_cast<sockaddr*>(&sun), sizeof sun) == 0;
    close(probe);
    if (live) {
      close(fd);
      *err = "--socket '" + path + "': another server is listening there";
      return false;
    }
    unlink(path.c_str());
  }
  if (bind(fd, reinterpret_cast<sockaddr*>(&sun), sizeof sun) != 0 || listen(fd, kBacklog) != 0) {
    *err = "cannot listen on " + path + ": " + strerror(errno);
    close(fd);
    return false;
  }
  out->push_back({fd, path, path});
  return true;
}

}  // namespace

bool split_host_port(const std::string& s, std::string* host, std::string* port) {
  size_t colon;
  if (!s.empty() && s[0] == '[') {
    size_t close = s.find(']');
    if (close == std::string::npos || close + 1 >= s.size() || s[close + 1] != ':') return false;
    *host = s.substr(1, close - 1);
    colon = close + 1;
  } else {
    colon = s.rfind(':');
    if (colon == std::string::npos) return false;
    *host = s.substr(0, colon);
  }
  *port = s.substr(colon + 1);
  if (port->empty() || port->size() > 5 ||
      port->find_first_not_of("0123456789") != std::string::npos || std::stoi(*port) > 65535)
    return false;
  return true;
}

bool open_listeners(const ServerOptions& o, std::vector<Listener>* out, std::string* err) {
  int n = sd_listen_fds(1);
  if (n > 0) {
    for (int i = 0; i < n; ++i) {
      int fd = SD_LISTEN_FDS_START + i;
      if (sd_is_socket(fd, AF_UNSPEC, SOCK_STREAM, 1) <= 0) {
        *err = "systemd passed fd " + std::to_string(fd) + ", which is not a listening socket";
        return false;
      }
      out->push_back({fd, bound_address(fd) + " (systemd)", {}});
    }
    return true;
  }
  for (const std::string& l : o.listen)
    if (!open_tcp(l, o.bind_retry, out, err)) return false;
  if (!o.socket.empty() && !open_unix(o.socket, out, err)) return false;
  return true;
}

void close_listeners(std::vector<Listener>* ls) {
  for (Listener& l : *ls) {
    if (l.fd >= 0) close(l.fd);
    if (!l.unlink_path.empty()) unlink(l.unlink_path.c_str());
    l.fd = -1;
  }
}

}  // namespace server
