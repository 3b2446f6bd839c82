// A small blocking NBD server for the node agent: the kernel's /dev/nbd0 on
// a Unix socket, and other nodes (peers) over TCP.
//
// The wire is the protocol layer's (nbd::Handshake, parse_request,
// validate, the reply encoders); this file only moves bytes, through a
// node::Transport per connection. With ServiceOptions::tls_keys the
// listener is in the spec's FORCEDTLS mode: the handshake takes nothing but
// NBD_OPT_STARTTLS (and ABORT) until a TLS handshake with one of those keys
// succeeded, and every byte after STARTTLS goes through the connection's
// TLS engine; the kernel's socket has no keys and stays plaintext. One thread per
// connection reads requests and hands them to a shared pool of workers, so
// a connection has many requests in flight (the kernel pipelines, and each
// request may wait on the server or a peer); replies go out whole, under
// the connection's send lock, in the order they finish.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "protocol/handshake.hpp"
#include "protocol/transmission.hpp"
#include "protocol/wire.hpp"
#include "tls/engine.hpp"

namespace node {

// What a served export does with requests. Called from worker threads, many
// at once. Each returns nbd::kOk or the NBD error to send, with *why for the
// log (and the client, with structured replies).
class Backend {
 public:
  virtual ~Backend() = default;
  virtual nbd::Error read(uint8_t* buf, uint64_t len, uint64_t off, std::string* why) = 0;
  virtual nbd::Error write(const uint8_t* buf, uint64_t len, uint64_t off, bool fua,
                           std::string* why) = 0;
  virtual nbd::Error flush(std::string* why) = 0;
  virtual nbd::Error trim(uint64_t len, uint64_t off, bool fua, std::string* why) = 0;
  virtual nbd::Error zero(uint64_t len, uint64_t off, bool fua, std::string* why) = 0;
};

struct ServiceOptions {
  std::string what = "nbd";          // for the log: "kernel", "peers"
  size_t max_connections = 64;       // more are closed at once, with a log line
  size_t workers = 16;               // requests executed at once, all connections
  double handshake_timeout = 10;     // seconds without a finished option
  double idle_timeout = 0;           // seconds without a request (0: none)
  // Set: clients must run STARTTLS and authenticate with a key this gives
  // (called on connection threads, many at once). Empty: plaintext.
  tls::KeyLookup tls_keys;
  // Fault injection (tests: a peer that hangs up in the middle of a reply):
  // every read reply stops after its header and half its data, and the
  // connection is shut down.
  bool fault_hangup_mid_reply = false;
};

class Service {
 public:
  // `catalog` answers the handshake; `backend` gives the Backend of an
  // export the handshake chose. Both must outlive the service.
  Service(const nbd::ExportCatalog& catalog,
          std::function<Backend*(const nbd::ExportInfo&)> backend, ServiceOptions opts);
  ~Service();
  Service(const Service&) = delete;
  Service& operator=(const Service&) = delete;

  // Binds (a Unix socket path, replacing a stale socket file; or
  // HOST:PORT). False and *err on failure.
  bool listen_unix(const std::string& path, std::string* err);
  bool listen_tcp(const std::string& host_port, std::string* err);
  // "HOST:PORT" or the socket path, as bound (port 0 resolved).
  const std::string& address() const { return address_; }

  void start();
  // Stops accepting, shuts every connection down, waits for the threads.
  void stop();

  uint64_t connections_total() const { return accepted_; }

 private:
  struct Conn;
  struct Job {
    std::shared_ptr<Conn> conn;
    nbd::Request req;
    std::vector<uint8_t> payload;
  };

  void accept_loop();
  void serve(std::shared_ptr<Conn> c);
  bool handshake(Conn& c);
  bool start_tls(Conn& c, nbd::Handshake& hs, std::string_view early);
  void worker_loop();
  void execute(Job& j);
  void reply(Conn& c, const nbd::Request& req, nbd::Error err, const std::string& why,
             const uint8_t* data, size_t len);

  const nbd::ExportCatalog& catalog_;
  std::function<Backend*(const nbd::ExportInfo&)> backend_;
  ServiceOptions opts_;
  int listen_fd_ = -1;
  std::string address_;
  std::string unix_path_;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> accepted_{0};
  std::thread acceptor_;
  std::vector<std::thread> workers_;

  std::mutex mu_;  // guards conns_, jobs_
  std::condition_variable jobs_cv_;
  std::deque<Job> jobs_;
  std::vector<std::weak_ptr<Conn>> conns_;
  bool workers_stop_ = false;  // set once every connection thread ended
  size_t live_readers_ = 0;  // connection threads (detached) still running
  std::condition_variable readers_cv_;
};

}  // namespace node
