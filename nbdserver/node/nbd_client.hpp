// A blocking, thread-safe NBD client connection: how the node agent talks
// NBD upstream (to nbdserver) and to peer agents.
//
// One socket per NbdClient. Any thread may issue requests; they are pipelined
// on the socket (a writer holds write_mu_ for the whole header and payload
// of one request) and one reader thread matches replies to callers by cookie
// through nbd::ReplyReader, copying read data straight into the caller's
// buffer. Locking: mu_ guards the calls in flight, the ReplyReader and the
// broken state; the reader thread holds it while it feeds a received block.
// write_mu_ orders whole requests on the socket and is taken before mu_.
//
// Failures: a request that gets no reply within its timeout returns kTimeout
// and is abandoned (its late reply is read and dropped; the connection stays
// usable). A dead socket or a protocol violation makes the connection broken
// for good: every waiting and later call returns kBroken with the reason.
//
// TLS (use_tls()): after the server's greeting the client sends
// NBD_OPT_STARTTLS and nothing else until a TLS handshake with its
// pre-shared key succeeded; any other answer fails connect(), so a man in
// the middle who strips STARTTLS gets no plaintext session. The rest of the
// handshake and every request and reply then go through node::Transport's
// TLS engine. Without TLS the bytes go as they always did: no copies.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "node/transport.hpp"
#include "protocol/client.hpp"

namespace node {

struct Endpoint {
  std::string host;  // name or address, without brackets
  uint16_t port = 0;
  std::string unix_path;  // set instead of host and port for a Unix socket
  // "HOST:PORT", "[V6]:PORT" or "unix:PATH", as parse_endpoint() reads it.
  std::string text() const;
};

// Parses "HOST:PORT", "[v6]:PORT" or "unix:PATH". On failure returns false and
// *err says why.
bool parse_endpoint(std::string_view s, Endpoint* out, std::string* err);

struct Result {
  enum Kind { kOk, kNbdError, kBroken, kTimeout } kind = kOk;
  uint32_t nbd_error = 0;  // with kNbdError: the NBD error (nbd::kEIO, ...)
  std::string why;         // empty with kOk
  bool ok() const { return kind == kOk; }
};

// Most extents block_status() returns for one request; beyond them the answer
// is cut short (as a server may do), so a lying server cannot exhaust memory.
inline constexpr size_t kMaxExtents = 1 << 20;

class NbdClient {
 public:
  NbdClient() = default;
  NbdClient(const NbdClient&) = delete;
  NbdClient& operator=(const NbdClient&) = delete;
  // close()s the connection; no call may be in progress in another thread.
  ~NbdClient();

  // Makes connect() require TLS, authenticating as psk.identity. Call
  // before connect().
  void use_tls(Psk psk) { psk_ = std::make_unique<Psk>(std::move(psk)); }

  // Connects (TCP_NODELAY), handshakes and starts the reader thread; the
  // whole of it within timeout_ms (<= 0: no limit). On failure returns false
  // and *err says why, with the server's message when it refused. Call once.
  bool connect(const Endpoint& ep, const std::string& export_name,
               const std::vector<std::string>& contexts, int timeout_ms, std::string* err);
  // After a failed connect() with use_tls(): whether TLS was the reason (the
  // server did not accept NBD_OPT_STARTTLS, or the TLS handshake failed).
  bool tls_failed() const { return tls_failed_ || starttls_refused_; }
  // The first of those: the server answered NBD_OPT_STARTTLS with anything
  // but its ACK (it speaks no TLS, or a man in the middle stripped it).
  bool starttls_refused() const { return starttls_refused_; }
  // After a failed connect(): the NBD_REP_ERR_* the server answered an
  // option other than NBD_OPT_STARTTLS with (the export's NBD_OPT_GO,
  // mostly), which failed the handshake; 0 when it failed otherwise.
  uint32_t refused() const { return refused_; }
  // "TLS1.3/AES-128-GCM" once connected over TLS, else "".
  std::string tls_description() const { return transport_ ? transport_->tls_description() : ""; }

  // What the handshake agreed on; valid after a successful connect().
  uint64_t size() const { return session_.size; }
  uint16_t flags() const { return session_.flags; }
  bool read_only() const { return session_.flags & nbd::kFlagReadOnly; }
  uint32_t max_block() const { return session_.max_block; }
  // The server's id for context `name`; 0 when it was not negotiated.
  uint32_t context_id(std::string_view name) const { return session_.context_id(name); }

  // Requests. Thread-safe; each waits for its reply up to timeout_ms (<= 0:
  // no limit). Reads and writes longer than max_block() are refused locally
  // with kNbdError/EINVAL, and so is FUA when the server did not offer it.
  // pread fills holes with zeroes; on anything but kOk `buf` holds garbage.
  Result pread(void* buf, uint32_t len, uint64_t off, int timeout_ms);
  Result pwrite(const void* buf, uint32_t len, uint64_t off, bool fua, int timeout_ms);
  Result flush(int timeout_ms);
  Result trim(uint32_t len, uint64_t off, int timeout_ms);
  Result zero(uint32_t len, uint64_t off, int timeout_ms);
  // The extents of context `context_id` only (other contexts' chunks are
  // dropped), at most kMaxExtents. *out is replaced on kOk.
  Result block_status(uint32_t len, uint64_t off, uint32_t context_id,
                      std::vector<nbd::Extent>* out, int timeout_ms);

  // Sends NBD_CMD_DISC if the connection is healthy, then shuts the socket
  // down and joins the reader; every waiting call gets kBroken. Idempotent.
  void close();
  bool broken() const { return broken_.load(); }
  // Why the connection broke; empty while it is healthy.
  std::string why() const;

 private:
  // One request in flight. Touched under mu_ only.
  struct Call {
    uint16_t type = 0;
    uint64_t offset = 0;
    uint8_t* buf = nullptr;  // read destination; null once abandoned
    uint32_t want_ctx = 0;
    std::vector<nbd::Extent> extents;
    bool abandoned = false;
    bool done = false;
    uint32_t error = 0;
    std::string message;
    // Its caller waits here: a reply wakes only the thread that waits for
    // it (with one condition for all, each reply woke every caller).
    std::condition_variable cv;
  };
  class Sink;

  Result submit(nbd::Request req, const void* payload, const std::shared_ptr<Call>& call,
                int timeout_ms);
  Result local_error(std::string why) const;
  bool open_socket(const Endpoint& ep, int64_t deadline_ns, std::string* err);
  bool handshake(const std::string& export_name, const std::vector<std::string>& contexts,
                 int64_t deadline_ns, std::string* err);
  bool start_tls(std::string_view early, int64_t deadline_ns, std::string* err);
  void read_loop(std::string leftover);
  void fail(std::string why);  // mu_ held
  void wake_all_locked();      // every caller waiting on a reply; mu_ held

  std::string peer_;
  nbd::ClientSession session_;
  int fd_ = -1;
  std::unique_ptr<Psk> psk_;              // set: TLS required
  std::unique_ptr<Transport> transport_;  // over fd_, once it is open
  bool tls_failed_ = false;        // the TLS handshake failed
  bool starttls_refused_ = false;  // STARTTLS got no ACK
  uint32_t refused_ = 0;           // the server's NBD_REP_ERR_* otherwise
  std::thread reader_thread_;
  std::mutex close_mu_;

  std::timed_mutex write_mu_;
  mutable std::mutex mu_;
  std::unique_ptr<nbd::ReplyReader> reader_;
  std::map<uint64_t, std::shared_ptr<Call>> calls_;
  uint64_t next_cookie_ = 1;
  std::atomic<bool> broken_{false};
  std::string why_;
};

}  // namespace node
