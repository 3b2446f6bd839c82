// How the node agent's NBD bytes cross a socket, as they are or through
// TLS: node::NbdClient's (upstream and to peers) and node::Service's (the
// kernel's socket, and peers reading from this node).
//
// Plaintext (the default) is what both always did: sendmsg() straight from
// the caller's buffers and recv() into the reader's, no copy; on a blocking
// socket without a deadline (the kernel's) recv() waits by itself. After
// NBD_OPT_STARTTLS, start_tls() (the client) or accept_tls() (the server)
// runs a tls::Engine (TLS 1.3, PSK) over the socket, and from then on
// send() encrypts and receive() decrypts.
//
// Threads: one sender at a time (the owner orders whole requests or
// replies) and one receiver (the owner's reader thread) may run at once. An
// Engine has one owner at a time, so tls_mu_ guards it, and it is never
// held across a blocking socket call: a sender encrypts a slice of its
// message under it, then sends that slice's records without it, so the
// reader decrypts while a large message is on the wire. Ciphertext leaves in the order
// the engine made it: only senders take the outbox, and they are ordered.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tls/engine.hpp"

namespace node {

// Deadlines are steady-clock nanoseconds; kNoDeadline waits forever.
inline constexpr int64_t kNoDeadline = -1;
int64_t now_ns();
// now + timeout_ms; kNoDeadline when timeout_ms <= 0.
int64_t deadline_after(int timeout_ms);
// Waits for `events` on fd; false once the deadline passed. An error on the
// fd counts as ready (the next call on it reports the error).
bool wait_fd(int fd, short events, int64_t deadline);

// A node's TLS credential: its id and its 256-bit pre-shared key.
struct Psk {
  std::string identity;
  tls::Key key{};
};

// Reads a psktool key file: one line NODE:HEX (64 hex digits). Refused,
// with *err saying why, unless it is a regular file that only its owner may
// read or write (mode 0600 or 0400, as ssh wants of a private key).
std::optional<Psk> read_psk_file(const std::string& path, std::string* err);

class Transport {
 public:
  // Plaintext over `fd`, which stays the caller's (it shuts it down and
  // closes it). Whether fd is blocking is read once, here.
  explicit Transport(int fd);
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  // Runs a TLS client handshake as psk.identity, `early` being bytes that
  // came after the server's ACK to NBD_OPT_STARTTLS (its first records).
  // False and *err ("TLS handshake failed: ...") on failure or timeout.
  // Call once, before any concurrent send() or receive().
  bool start_tls(const Psk& psk, std::string_view early, int64_t deadline, std::string* err);
  // The server side: runs a TLS handshake whose client must authenticate
  // with a key `lookup` gives, `early` being bytes the client sent after
  // NBD_OPT_STARTTLS. False and *err (the engine's reason, lookup's
  // included: for the log, never for the client) on failure or timeout.
  // Call once, before any concurrent send() or receive().
  bool accept_tls(tls::KeyLookup lookup, std::string_view early, int64_t deadline,
                  std::string* err);
  bool tls() const { return engine_ != nullptr; }
  // The identity the client authenticated as (accept_tls), or ours
  // (start_tls); "" without TLS.
  std::string tls_identity() const;
  // "TLS1.3/AES-128-GCM" once TLS is up, else "".
  std::string tls_description() const;

  // Sends all of iov[0, n) by the deadline; iov is consumed. Returns 0, or
  // -1 with *err ("send timed out" for the deadline). *sent counts the bytes
  // committed: sent as plaintext, or encrypted. With 0 committed the stream
  // is as it was; otherwise it is cut mid-request and must not be reused.
  int send(iovec* iov, int n, int64_t deadline, size_t* sent, std::string* err);
  // Receives up to `cap` bytes (plaintext) once any arrive, by the deadline.
  // Returns the count; 0 when the other side closed the connection; -1 with *err
  // ("timed out", a socket error, or a TLS record error).
  ssize_t receive(uint8_t* buf, size_t cap, int64_t deadline, std::string* err);
  // Over TLS: sends close_notify, best effort. Called under the owner's
  // send order, after its last send().
  void close_notify(int64_t deadline);

 private:
  // Drives engine `e`'s handshake to its end over the socket; on success
  // it becomes engine_. *err on failure, naming `other` ("server").
  bool handshake(std::unique_ptr<tls::Engine> e, const char* other, std::string_view early,
                 int64_t deadline, std::string* err);
  ssize_t receive_raw(uint8_t* buf, size_t cap, int64_t deadline, std::string* err);
  int send_tls(iovec* iov, int n, int64_t deadline, size_t* sent, std::string* err);
  // Sends what the engine has made, in order; tls_mu_ not held.
  int flush_outbox(int64_t deadline, std::string* err);

  const int fd_;
  bool blocking_ = false;  // fd_ has no O_NONBLOCK
  mutable std::mutex tls_mu_;  // guards engine_'s state once TLS is up
  std::unique_ptr<tls::Engine> engine_;
  std::vector<uint8_t> cipher_;  // the receiver's ciphertext buffer
  std::string records_;          // the sender's records on their way out
};

}  // namespace node
