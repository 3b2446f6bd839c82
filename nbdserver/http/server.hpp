// The HTTP server (--http): cpp-httplib on its own thread pool,
// beside the io_uring loops and off the NBD data path. Modules add their
// endpoints to routes() before start() (http/store_api.hpp,
// http/tracker_api.hpp; boot files later). Every error reply is JSON
// {"error": "..."} with a proper status, including the library's own
// (404 for no route, 413 for a body over the limit, 400 for a bad request).
#pragma once

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <ctime>
#include <memory>
#include <string>
#include <thread>

namespace http {

struct HttpOptions {
  std::string listen;               // HOST:PORT; port 0 picks a free one
  size_t payload_max = 1 << 20;     // request bodies over this get 413
  time_t io_timeout = 10;           // seconds a read or write may stall
  size_t keep_alive_max = 100;      // requests per connection
  time_t keep_alive_timeout = 5;    // seconds an idle connection is kept
  // The pool serving connections. cpp-httplib holds a thread per
  // connection until it closes or idles out (keep_alive_timeout), and
  // queues the others unanswered: a node that boots the kernel it fetched
  // leaves its connection open, so the pool is sized for a boot storm of
  // a few hundred nodes (an idle thread costs a stack's few touched pages).
  unsigned threads = 256;
};

class Server {
 public:
  explicit Server(HttpOptions opts);
  ~Server();  // stops
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Where modules add endpoints; only before start().
  httplib::Server& routes() { return svr_; }
  // Binds, then serves on a thread of its own. Sets *address to the bound
  // "HOST:PORT", or *err and returns false.
  bool start(std::string* address, std::string* err);
  // Stops accepting, lets the pool finish, joins. Safe to call twice.
  void stop();

 private:
  HttpOptions opts_;
  httplib::Server svr_;
  std::thread thread_;
  std::atomic<bool> done_{true};
};

// Error and JSON replies.
void reply_error(httplib::Response& res, int status, const std::string& message);
void reply_json(httplib::Response& res, const nlohmann::json& j, int status = 200);

}  // namespace http
