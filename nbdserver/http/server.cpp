#include "http/server.hpp"

#include <spdlog/spdlog.h>

#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>

namespace http {
namespace {

constexpr int kBacklog = 1024;

// "HOST:PORT" or "[V6]:PORT".
bool split_listen(const std::string& s, std::string* host, int* port) {
  const size_t colon = s.rfind(':');
  if (colon == std::string::npos || colon + 1 == s.size()) return false;
  *host = s.substr(0, colon);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']')
    *host = host->substr(1, host->size() - 2);
  if (host->empty()) return false;
  const std::string p = s.substr(colon + 1);
  if (p.size() > 5 || p.find_first_not_of("0123456789") != std::string::npos) return false;
  *port = std::stoi(p);
  return *port <= 65535;
}

const char* reason(int status) {
  switch (status) {
    case 400: return "bad request";
    case 404: return "not found";
    case 405: return "method not allowed";
    case 413: return "request body too large";
    case 414: return "request URI too long";
    case 416: return "range not satisfiable";
    default: return status >= 500 ? "internal error" : "request failed";
  }
}

}  // namespace

void reply_error(httplib::Response& res, int status, const std::string& message) {
  res.status = status;
  res.set_content(nlohmann::json{{"error", message}}.dump(), "application/json");
}

void reply_json(httplib::Response& res, const nlohmann::json& j, int status) {
  res.status = status;
  res.set_content(j.dump(), "application/json");
}

Server::Server(HttpOptions opts) : opts_(std::move(opts)) {
  const unsigned n = opts_.threads;
  svr_.new_task_queue = [n] { return new httplib::ThreadPool(n); };
  // Headers and body go out in separate writes: without TCP_NODELAY a
  // keep-alive client waits for a delayed ACK (40 ms) on every reply.
  svr_.set_tcp_nodelay(true);
  svr_.set_payload_max_length(opts_.payload_max);
  svr_.set_read_timeout(opts_.io_timeout, 0);
  svr_.set_write_timeout(opts_.io_timeout, 0);
  svr_.set_keep_alive_max_count(opts_.keep_alive_max);
  svr_.set_keep_alive_timeout(opts_.keep_alive_timeout);
  // The library's own errors (no route, body too large, bad request line)
  // come with an empty body: make them JSON too.
  svr_.set_error_handler(httplib::Server::HandlerWithResponse(
      [](const httplib::Request&, httplib::Response& res) {
        if (res.body.empty()) reply_error(res, res.status, reason(res.status));
        return httplib::Server::HandlerResponse::Handled;
      }));
  svr_.set_exception_handler(
      [](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown exception";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        spdlog::error("http: {} {}: {}", req.method, req.path, what);
        reply_error(res, 500, "internal error");
      });
}

Server::~Server() { stop(); }

bool Server::start(std::string* address, std::string* err) {
  std::string host;
  int port = 0;
  if (!split_listen(opts_.listen, &host, &port)) {
    *err = "--http '" + opts_.listen + "': expected HOST:PORT or [V6]:PORT";
    return false;
  }
  // The library's default socket options set SO_REUSEPORT, which lets a
  // second server bind the same port and take half the calls: use
  // SO_REUSEADDR only. And it listens with a backlog of 5, which resets
  // connections when many nodes call at once: note the socket as it is
  // made, and listen again on it (Linux raises the backlog) once bound.
  int sock = -1;
  svr_.set_socket_options([&sock](socket_t fd) {
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sock = fd;
  });
  if (port == 0) {
    port = svr_.bind_to_any_port(host);
    if (port < 0) port = 0;
  } else if (!svr_.bind_to_port(host, port)) {
    port = 0;
  }
  if (port == 0) {
    *err = "--http " + opts_.listen + ": cannot bind (address in use or unknown host?)";
    return false;
  }
  if (sock >= 0 && ::listen(sock, kBacklog) != 0)
    spdlog::warn("--http {}: cannot raise the listen backlog: {}", opts_.listen,
                 strerror(errno));
  *address = (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" +
             std::to_string(port);
  done_ = false;
  thread_ = std::thread([this] {
    svr_.listen_after_bind();
    done_ = true;
  });
  return true;
}

void Server::stop() {
  if (!thread_.joinable()) return;
  // stop() does nothing before the accept loop is running, so repeat it
  // until the serving thread has returned.
  while (!done_) {
    svr_.stop();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  thread_.join();
}

}  // namespace http
