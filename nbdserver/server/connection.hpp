// Per-connection and per-request state, owned by one loop thread.
//
// A Connection holds the socket, the receive buffer, the handshake (until the
// transmission phase starts) and the queue of replies waiting to be sent. An
// Op is one request between validation and its reply being queued; it owns
// the request's data buffer until the reply takes it over.
//
// Rules for who touches what:
// - At most one recv and one sendmsg are in flight per connection. The
//   kernel owns rbuf's free tail (or an Op's buffer, for a direct payload
//   recv) while recv_pending, and the front of outq while send_pending.
// - A connection is freed only when nothing of it is in flight: no recv,
//   no send and no Op (inflight == 0).
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "exports/registry.hpp"
#include "io/buffer_pool.hpp"
#include "protocol/handshake.hpp"
#include "protocol/transmission.hpp"
#include "tls/engine.hpp"

namespace server {

using Clock = std::chrono::steady_clock;
inline constexpr uint32_t kNone = ~0u;

// One reply (or handshake output) waiting to be sent.
struct OutMsg {
  uint8_t head[nbd::kMaxReplyHeader];
  uint16_t hlen = 0;
  std::string extra;  // bytes after head: handshake output, errors, extents
  io::Buffer data;    // read payload, sent after extra ...
  const uint8_t* mapped = nullptr;  // ... or this, in the export's file mapping
  std::vector<iovec> parts;         // ... or these: pieces of mappings and zero pages
  size_t dlen = 0;
  const uint8_t* payload() const { return mapped ? mapped : data.data(); }
  // The payload points into file mappings (the pages must stay resident).
  bool from_mappings() const { return mapped || !parts.empty(); }
  size_t size() const { return hlen + extra.size() + dlen; }
};

// Reply bytes queued on a connection, sent with as few sendmsg calls as
// possible. Pure bookkeeping; the loop does the I/O.
class SendQueue {
 public:
  void push(OutMsg&& m) {
    bytes_ += m.size();
    if (m.from_mappings()) mapped_bytes_ += m.dlen;
    q_.push_back(std::move(m));
  }
  bool empty() const { return q_.empty(); }
  size_t bytes() const { return bytes_; }
  // Bytes of queued replies that point into an export's file mapping.
  size_t mapped_bytes() const { return mapped_bytes_; }
  // Fills `msg` with iovecs for up to kMaxIov pieces from the front.
  void prepare(msghdr* msg);
  // Drops `n` sent bytes from the front, freeing finished messages.
  void consume(size_t n);

  static constexpr size_t kMaxIov = 1024;  // UIO_MAXIOV
  // The most payload parts one message may have (so that it always fits):
  // a 1 MiB read of 4 KiB blocks that alternate between sources.
  static constexpr size_t kMaxParts = 256;
  static_assert(kMaxParts + 2 <= kMaxIov);

 private:
  std::deque<OutMsg> q_;
  size_t front_sent_ = 0;  // bytes of q_.front() already sent
  size_t bytes_ = 0;       // unsent bytes in all of q_
  size_t mapped_bytes_ = 0;
  std::vector<iovec> iov_;  // grown to what the queue needs, up to kMaxIov
};

struct Connection {
  enum class Phase { kHandshake, kTransmission, kClosing };

  uint64_t id = 0;  // for logs
  std::string peer;
  int fd = -1;
  uint32_t slot = 0;
  uint32_t gen = 0;
  Phase phase = Phase::kHandshake;

  std::unique_ptr<nbd::Handshake> hs;
  nbd::Session session;
  const exports::ServedExport* exp = nullptr;
  int handoff_to = -1;   // after the handshake: the loop that owns exp's view
  std::string handoff_reply;  // the handshake's last reply, for that loop to send
  bool view_attached = false;  // counted in the owner loop's ViewState
  bool attaching = false;      // the handshake waits for an AttachPool job

  // Receive buffer: bytes [rpos, rlen) are received and not yet parsed.
  std::vector<uint8_t> rbuf;
  size_t rpos = 0;
  size_t rlen = 0;
  bool recv_pending = false;
  bool direct_recv = false;  // the pending recv targets payload_op's buffer

  // A WRITE whose payload is still arriving.
  uint32_t payload_op = kNone;
  uint64_t payload_got = 0;
  // A rejected request whose payload is being discarded.
  uint64_t drain_left = 0;
  nbd::Request drain_req;
  nbd::Verdict drain_verdict;

  SendQueue out;
  msghdr msg{};
  // TLS, once STARTTLS was answered and every plaintext reply before it
  // sent: the engine, ciphertext received, and the bytes on their way to
  // the socket (records sealed from `out`, and the engine's handshake
  // messages). wire_out is not touched while a send is pending.
  std::unique_ptr<tls::Engine> tls;
  std::vector<uint8_t> cipher_in;
  std::string wire_out;
  size_t wire_sent = 0;
  bool send_pending = false;
  bool close_after_send = false;  // handshake ended (abort or refusal)

  unsigned inflight = 0;     // Ops not yet replied to
  bool disconnect = false;   // NBD_CMD_DISC seen, or fatal error
  bool send_queued = false;  // on the loop's list of connections to flush

  // --handshake-timeout after the accept or the last finished option.
  Clock::time_point handshake_deadline;
  // Stall detection. A request header is tiny, so one must arrive whole
  // within the request timeout of its first byte; a payload only has to
  // keep making progress.
  Clock::time_point last_recv;     // last time bytes arrived
  Clock::time_point header_since;  // first byte of the half-received header
  bool partial_header = false;
  bool partial = false;  // a header or payload is half-received
  Clock::time_point send_since;  // when the pending send, or its last progress, began
  uint64_t read_bytes = 0;  // buffers held by READs in flight (not yet queued)

  size_t unparsed() const { return rlen - rpos; }
  const uint8_t* unparsed_data() const { return rbuf.data() + rpos; }
};

struct Op {
  uint32_t gen = 0;
  bool used = false;
  uint32_t conn = kNone;
  nbd::Request req;
  io::Buffer buf;
  const uint8_t* mapped = nullptr;  // READ served from the file mapping
  std::vector<iovec> parts;         // READ served from several mappings and zero pages
  uint64_t done = 0;  // bytes completed so far (short reads and writes)
  int stage = 0;      // steps of TRIM/WRITE_ZEROES; 2 = waiting for an fdatasync
  // Node-view requests: sub-operations in flight, the first error, the
  // mutation's plan and the buffers it writes from.
  unsigned pending = 0;
  int err = 0;
  std::unique_ptr<storage::MutationPlan> plan;
  io::Buffer wbuf, wbuf2;
};

// A connection moving to the loop that owns its node view, after the
// handshake: the socket, the session and any request bytes already read.
struct Handoff {
  int fd = -1;
  uint64_t id = 0;
  std::string peer;
  nbd::Session session;
  std::string leftover;
  std::string reply;  // the handshake's last reply, sent once attached
  std::unique_ptr<tls::Engine> tls;  // the connection's TLS session, if any
};

}  // namespace server
