// The client side of NBD, sans I/O: a fixed-newstyle handshake state machine,
// the request encoder and a reply reader. The node agent speaks NBD upstream
// (to nbdserver and to peer agents) through these; node/nbd_client.* adds the
// sockets and threads.
//
// Both state machines treat the server as untrusted: every length is checked
// against what was asked for before anything is buffered, and a violation
// fails the whole connection with a reason instead of crashing or allocating.
// Neither is thread-safe; each belongs to one connection and its owner locks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/handshake.hpp"
#include "protocol/transmission.hpp"
#include "protocol/wire.hpp"

namespace nbd {

// Largest option reply the client buffers (the server's are far smaller).
inline constexpr uint32_t kMaxClientOptionReply = 64 * 1024;
// Largest message of an NBD_REPLY_TYPE_ERROR chunk the spec allows.
inline constexpr uint32_t kMaxErrorMessage = 4096;

struct ClientOptions {
  std::string export_name;
  bool structured = true;  // ask for structured replies (needed for contexts)
  // Metadata contexts to select with NBD_OPT_SET_META_CONTEXT, by exact name.
  std::vector<std::string> contexts;
  // Send NBD_OPT_STARTTLS first, and go on only over TLS: any answer to it
  // but NBD_REP_ACK fails the handshake, so a man in the middle that strips
  // STARTTLS never gets a plaintext session.
  bool starttls = false;
};

// What the handshake agreed on; valid once status() is kReady.
struct ClientSession {
  uint64_t size = 0;
  uint16_t flags = 0;  // transmission flags as the server sent them
  bool structured = false;
  uint32_t min_block = 1;
  uint32_t preferred_block = 4096;
  uint32_t max_block = 32 * 1024 * 1024;
  std::vector<MetaContext> contexts;  // the asked-for contexts the server knows

  // The server's id for context `name`; 0 when it was not negotiated.
  uint32_t context_id(std::string_view name) const;
};

// States: kGreeting (waiting for the 18-byte server greeting)
//      -> kStartTls, with ClientOptions::starttls (NBD_OPT_STARTTLS sent and
//         acknowledged; nothing is read until tls_established())
//      -> kOptionReply (one option sent at a time: STRUCTURED_REPLY, then
//         SET_META_CONTEXT when structured and contexts were asked for, then
//         GO; each reply header and its data is read and checked)
//      -> kReady or kFailed.
class ClientHandshake {
 public:
  // kStartTls: the server acknowledged NBD_OPT_STARTTLS. The caller runs TLS
  // over the connection, then calls tls_established().
  enum class Status { kContinue, kStartTls, kReady, kFailed };

  explicit ClientHandshake(ClientOptions opts);

  // Consumes a prefix of data[0, len) and returns how much it used. Bytes
  // after the handshake ends are left unconsumed: they belong to transmission.
  // So are bytes after the ACK to NBD_OPT_STARTTLS: they belong to TLS.
  size_t feed(const uint8_t* data, size_t len);
  // Call once TLS is up after status() == kStartTls: the usual options follow
  // in out(), to be sent over TLS. In any other state it fails the handshake.
  void tls_established();
  // Bytes to send to the server; the caller sends and clears them.
  std::string& out() { return out_; }
  Status status() const { return status_; }
  // Why the handshake failed, with the server's message when it sent one.
  const std::string& error() const { return error_; }
  // The NBD_REP_ERR_* the server answered an option with when that failed
  // the handshake (NBD_OPT_STARTTLS's included); 0 when it failed otherwise.
  uint32_t refusal() const { return refusal_; }
  const ClientSession& session() const { return session_; }

 private:
  enum class State { kGreeting, kReplyHeader, kReplyData, kStartTls, kDone };

  void on_greeting(const uint8_t* p);
  void on_reply_header(const uint8_t* p);
  void on_reply(std::string_view data);
  void on_starttls_reply(std::string_view data);
  void on_structured_reply(std::string_view data);
  void on_meta_context_reply(std::string_view data);
  void on_go_reply(std::string_view data);
  void on_info(std::string_view data);
  void send_option(uint32_t opt, const std::string& data);
  void send_first_option();
  void send_next_option();
  void fail(std::string why);
  void fail_refused(std::string_view what, std::string_view data);
  size_t wanted() const;

  ClientOptions opts_;
  State state_ = State::kGreeting;
  Status status_ = Status::kContinue;
  std::string in_;
  std::string out_;
  std::string error_;
  uint32_t cur_opt_ = 0;   // option awaiting replies
  uint32_t cur_type_ = 0;  // type of the reply being read
  uint32_t cur_len_ = 0;
  uint32_t refusal_ = 0;
  bool have_export_ = false;
  ClientSession session_;
};

// Encodes a compact (28-byte) request header into out[0, kRequestSize).
// Write payloads follow it on the wire and are not copied here.
size_t encode_request(uint8_t* out, const Request& req);

// What a ReplyReader reports, per cookie, in wire order. Called from inside
// ReplyReader::feed(); the pointers are valid only during the call.
class ReplySink {
 public:
  virtual ~ReplySink() = default;
  // Bytes of read data at `offset` (absolute). One data chunk or simple reply
  // may arrive as several calls; each range is inside the request and never
  // overlaps another one of the same request.
  virtual void on_data(uint64_t cookie, uint64_t offset, const uint8_t* p, size_t n) = 0;
  // A hole of a read: the caller fills [offset, offset + length) with zeroes.
  virtual void on_hole(uint64_t cookie, uint64_t offset, uint64_t length) = 0;
  // Extents of one context of a block status request, possibly in several
  // batches of one chunk.
  virtual void on_extents(uint64_t cookie, uint32_t context_id, std::span<const Extent> ext) = 0;
  // An error reply or error chunk (there may be several before on_done).
  virtual void on_error(uint64_t cookie, uint32_t error, std::string_view message) = 0;
  // The request is complete. `error` is the first error reported, or 0.
  virtual void on_done(uint64_t cookie, uint32_t error) = 0;
};

// Matches replies to the requests registered with expect(), checking each
// chunk against its request. Memory is bounded by the requests in flight: no
// payload is buffered beyond a fixed small size (data is handed on in pieces,
// extents in batches), and bookkeeping for a read is at most length/8 bytes.
class ReplyReader {
 public:
  // `structured`: whether structured replies were negotiated; `contexts`:
  // the ids block status chunks may name.
  ReplyReader(bool structured, std::vector<uint32_t> contexts);

  // Registers a request about to be sent. False when its cookie is already in
  // flight (then nothing changes). Requests without replies (NBD_CMD_DISC)
  // must not be registered.
  bool expect(const Request& req);
  // Consumes data[0, len), reporting to `sink`. After a violation broken() is
  // true, why() says what the server did, and nothing more is consumed.
  size_t feed(const uint8_t* data, size_t len, ReplySink& sink);
  bool broken() const { return !why_.empty(); }
  const std::string& why() const { return why_; }
  size_t in_flight() const { return pending_.size(); }

 private:
  enum class State { kHeader, kSimpleData, kChunkFixed, kChunkData, kChunkExtents };

  struct Pending {
    Request req;
    bool started = false;       // a structured chunk arrived
    uint32_t error = 0;         // first error seen
    uint64_t covered = 0;       // read bytes delivered as data or holes
    uint64_t contiguous = 0;    // bytes covered in order from req.offset
    std::vector<uint8_t> bits;  // covered bitmap, once chunks arrive out of order
    std::vector<uint32_t> contexts_seen;
  };

  size_t on_header(const uint8_t* p, size_t len, ReplySink& sink);
  void on_simple_header(ReplySink& sink);
  void on_chunk_header(ReplySink& sink);
  void on_chunk_fixed(ReplySink& sink);
  void on_error_chunk(ReplySink& sink);
  size_t on_chunk_data(const uint8_t* p, size_t len, ReplySink& sink);
  size_t on_chunk_extents(const uint8_t* p, size_t len, ReplySink& sink);
  bool cover(Pending& pd, uint64_t offset, uint64_t length);
  void end_chunk(ReplySink& sink);
  void complete(ReplySink& sink);
  void violate(std::string why);

  bool structured_;
  std::vector<uint32_t> contexts_;
  std::map<uint64_t, Pending> pending_;
  std::string why_;

  State state_ = State::kHeader;
  uint8_t hdr_[kStructuredReplySize + 8];
  size_t have_ = 0;            // bytes collected in hdr_ / fixed_
  std::string fixed_;          // a small chunk payload being collected
  size_t want_ = 0;            // its size
  uint64_t cookie_ = 0;        // current reply's cookie
  Pending* cur_ = nullptr;     // its request
  uint16_t chunk_flags_ = 0;
  uint16_t chunk_type_ = 0;
  uint64_t left_ = 0;          // payload bytes left in the current reply
  uint64_t data_off_ = 0;      // absolute offset of the next data byte
  uint32_t ctx_ = 0;           // context of the extents being read
  uint64_t ext_sum_ = 0;       // bytes described so far by this chunk
  uint64_t ext_count_ = 0;
  std::vector<Extent> batch_;
};

}  // namespace nbd
