// One event loop: a thread with its own io_uring, its connections and their
// in-flight requests.
//
// Everything a loop owns is touched only by its thread. Connections never
// move between loops. Completions are decoded in one place (dispatch()) from
// the tag in user_data, and every request is completed in one place
// (finish()), which queues its reply.
//
// The loop never blocks except in io_uring_submit_and_wait: socket receive
// and send, file reads and writes, fsync, fallocate and fadvise all go
// through the ring. Replies are batched: completions only mark a connection
// as having output, and each pass of the loop sends what accumulated.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "exports/registry.hpp"
#include "io/buffer_pool.hpp"
#include "io/ring.hpp"
#include "server/config.hpp"
#include "server/connection.hpp"
#include "server/listen.hpp"
#include "server/tls_keys.hpp"

namespace server {

class Loop;
class AttachPool;
inline constexpr size_t kMaxMappedQueued = 8 << 20;  // mapped reply bytes waiting to be sent
inline constexpr size_t kMaxExtents = 16384;

// base:allocation flags of a storage block state.
inline uint32_t allocation_flags(storage::BlockState s) {
  switch (s) {
    case storage::BlockState::kHole: return nbd::kStateHole | nbd::kStateZero;
    case storage::BlockState::kZero: return nbd::kStateZero;
    case storage::BlockState::kData: return 0;
  }
  return 0;
}

// State shared by every loop. Immutable while loops run, except the atomics.
struct Shared {
  const ServerOptions& opts;
  const exports::Registry& registry;
  const std::vector<Listener>& listeners;
  exports::Stats& stats;  // counters for /metrics (relaxed atomics)
  std::atomic<unsigned> connections{0};
  std::atomic<uint64_t> next_conn_id{1};
  std::atomic<bool> stopping{false};
  std::atomic<bool> failed{false};  // a loop died; the server exits non-zero
  std::vector<Loop*> loops;         // set before any loop runs
  AttachPool* attach_pool = nullptr;  // node attaches off the loops; set before any loop runs
  const TlsKeys* tls_keys = nullptr;  // with --tls require
};

class Loop {
 public:
  Loop(Shared& shared, unsigned index);
  ~Loop();
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  // Sets up the ring and wake-up eventfd. Call before run().
  bool init(std::string* err);
  // Runs until shutdown was requested and every connection is closed.
  void run();
  // Asks the loop to notice Shared::stopping. Any thread.
  void wake();
  // Takes over a connection handed off by another loop. Any thread.
  void adopt(Handoff&& h);
  // The result of an attach run for connection (slot, gen) on the
  // AttachPool. Any thread.
  struct Attached {
    uint32_t slot = 0, gen = 0;
    std::shared_ptr<const nbd::ExportInfo> exp;
    std::string why;
  };
  void attached(Attached&& a);

 private:
  void fail(const std::string& why);
  bool poll_for_completions();
  // An SQE for a file operation, tagged and counted in file_ops_.
  io_uring_sqe* file_sqe(uint64_t tag);
  io_uring_sqe* op_sqe(uint32_t op);  // the same for request `op`
  void release_op(uint32_t op);       // frees a request's slot and buffer
  void dispatch(const io_uring_cqe* cqe);
  // Accepting.
  void post_accept(uint32_t listener);
  void on_accept(uint32_t listener, int res);
  void post_timer();
  void post_wake_read();
  void on_timer();
  void on_wake();
  void begin_shutdown();
  // Connections.
  Connection* conn_at(uint32_t slot, uint32_t gen);
  void start_connection(int fd);
  Connection& new_connection(int fd);  // a slot for a new socket
  void hand_off(Connection& c);
  void start_adopted(Handoff&& h);
  bool mailbox_empty();
  void post_recv(Connection& c);
  void on_recv(Connection& c, int res);
  void on_handshake_input(Connection& c);
  // What the handshake's status asks for once it moved on: answers,
  // transmission, a hand-off, a deferred attach or the end.
  void after_handshake_step(Connection& c);
  void start_attach(Connection& c);
  void on_attached(Attached&& a);
  void process_requests(Connection& c);
  bool read_payload(Connection& c);
  void handle_request(Connection& c, const nbd::Request& req);
  void refuse(Connection& c, const nbd::Request& req, uint64_t payload, const nbd::Verdict& v);
  void reject(Connection& c, const nbd::Request& req, const nbd::Verdict& v);
  void queue(Connection& c, OutMsg&& m);
  void post_send(Connection& c);
  // TLS (after STARTTLS): the engine's side of receiving and sending.
  void start_tls(Connection& c);  // STARTTLS answered and sent: TLS from here
  void on_tls_input(Connection& c, size_t n);
  void tls_opened(Connection& c);
  size_t open_records(Connection& c);  // decrypts into rbuf; bytes added
  bool tls_broken(Connection& c);      // closes on a TLS failure; true if so
  void post_tls_recv(Connection& c);
  void seal_replies(Connection& c);    // encrypts queued replies into records
  void post_tls_send(Connection& c);
  // Bytes wait to go out: replies, or TLS records and handshake messages.
  bool has_output(const Connection& c) const;
  // Compacts rbuf when its free tail is small; false when it is full.
  bool make_room(Connection& c);
  void on_send(Connection& c, int res);
  void flush_sends();
  void close_connection(Connection& c, const std::string& why, bool error);
  void maybe_free(Connection& c);
  bool quiescent(const Connection& c) const;
  void after_progress(Connection& c);
  // Requests.
  uint32_t new_op(Connection& c, const nbd::Request& req);
  void execute(uint32_t op);
  void submit_file_io(uint32_t op);
  void on_file(uint32_t op, int res);
  void finish(uint32_t op, nbd::Error err, const std::string& why);
  void count_reply(const Connection& c, const nbd::Request& req, nbd::Error err);
  void reply_block_status(uint32_t op);
  bool try_mapped_read(Connection& c, const nbd::Request& req);
  bool view_mapped_read(Connection& c, const nbd::Request& req);

  // Node views (view_ops.cpp). A writable view is served by one loop, its
  // owner: every connection of the node is handed off to it after the
  // handshake, so the view's map, locks and flushes need no locking.
  struct Sub {  // one file operation of a view request
    uint32_t op = 0, gen = 0;
    bool used = false;
    uint8_t kind = 0;
    int fd = -1;
    uint8_t* buf = nullptr;
    uint64_t off = 0, len = 0, done = 0;
  };
  struct ViewState {  // a writable view attached on this loop
    std::shared_ptr<storage::NodeView> view;
    std::shared_ptr<exports::NodeCounters> counters;  // the node's, for /metrics
    unsigned conns = 0;
    bool in_flight = false;  // a flush is running
    unsigned step = 0;
    std::vector<uint32_t> running, waiting;  // FLUSH/FUA requests, as in Flusher
    bool has_snap = false;
    storage::NodeView::Snapshot snap;
    // The map log: records of committed mutations and the requests that
    // wait for them (pending), and the batch being written (running).
    std::vector<storage::NodeView::LogRecord> log_recs;
    std::vector<uint32_t> log_waiting, log_running;
    std::vector<storage::NodeView::LogWrite> log_writes;
    unsigned log_left = 0;
    int log_err = 0;
  };
  void attach_view(Connection& c);
  void detach_view(Connection& c);
  void publish_dirty(const ViewState& vs);  // the view's dirty bytes, for /metrics
  uint32_t view_slot(storage::NodeView* v);
  void execute_view(uint32_t op);
  void view_read(uint32_t op);
  void view_mutate(uint32_t op);
  void view_locked(uint32_t op);
  void view_write(uint32_t op);
  void view_committed(uint32_t op);
  void view_step(uint32_t op);
  bool fill(uint32_t op, const std::vector<storage::Piece>& pieces, uint64_t start, uint8_t* buf);
  void add_sub(uint32_t op, uint8_t kind, int fd, uint8_t* buf, uint64_t off, uint64_t len);
  void submit_sub(uint32_t s);
  void on_sub(uint32_t s, int res);
  void view_logged(uint32_t op);
  void start_view_log(uint32_t slot);
  void submit_view_log(uint32_t slot);
  void on_view_log(uint32_t slot, uint32_t index, int res);
  void log_batch_done(uint32_t slot, bool logged);
  void view_flush(uint32_t slot, uint32_t op);
  void start_view_flush(uint32_t slot);
  void submit_view_flush(uint32_t slot);
  void on_view_flush(uint32_t slot, unsigned step, int res);
  void view_flush_done(uint32_t slot, int err);
  std::vector<nbd::Extent> view_extents(const storage::NodeView& v, std::string_view context,
                                        uint64_t off, uint64_t len, size_t max);
  bool backpressured(const Connection& c) const;
  // FLUSH and the fdatasync after FUA writes, trims and zeroes: a loop runs
  // up to ImageFile::syncers() fdatasyncs per export at once, each on its own
  // descriptor (see ImageFile::sync_fd). A request starts one if a descriptor
  // is idle; otherwise it waits, and the waiting requests share the next one.
  void request_flush(uint32_t op);
  void start_flush(unsigned exp);
  void submit_flush(unsigned exp, unsigned k);
  void on_flush(unsigned exp, unsigned k, int res);

  struct Flusher {
    storage::ImageFile* file = nullptr;
    // By descriptor: the requests its fdatasync in flight answers (empty:
    // idle). Every one of them was written before that fdatasync started.
    std::vector<std::vector<uint32_t>> running;
    std::vector<uint32_t> waiting;  // no descriptor was idle when they came
  };

  Shared& shared_;
  unsigned index_;
  io::BufferPool pool_;
  int wake_fd_ = -1;
  uint64_t wake_buf_ = 0;
  __kernel_timespec tick_{};
  // Fault injection for tests (NBDROOT_FAULT_MAP_LOG_DELAY_MS): every map
  // log batch waits this long before its writes start. Zero normally.
  __kernel_timespec log_delay_{};
  // Fault injection (NBDROOT_FAULT_HANDOFF_DELAY_MS): a connection handed to
  // the loop that owns its view leaves this loop that late (this loop waits).
  long handoff_delay_ms_ = 0;
  static constexpr uint32_t kLogDelayed = 0xffffff;  // tag gen of the delay's timeout
  bool accepting_ = true;
  std::vector<bool> accept_pending_;
  bool accept_backoff_ = false;  // EMFILE: retry accepting on the next tick
  bool shutdown_started_ = false;
  Clock::time_point shutdown_deadline_;

  std::vector<std::unique_ptr<Connection>> conns_;
  std::vector<uint32_t> free_conns_;
  size_t live_conns_ = 0;
  std::vector<Op> ops_;
  std::vector<uint32_t> free_ops_;
  std::vector<uint32_t> to_send_;  // connections with replies to flush
  std::vector<unsigned char> residency_;  // scratch for ImageFile::resident
  std::vector<unsigned char> residency2_;  // a second one, for view reads
  std::vector<Flusher> flushers_;         // by export index
  unsigned file_ops_ = 0;                 // file operations in flight
  std::vector<storage::Piece> pieces_;    // scratch for read plans
  std::vector<Sub> subs_;
  std::vector<uint32_t> free_subs_;
  std::vector<ViewState> views_;
  std::vector<uint32_t> free_views_;
  std::unordered_map<storage::NodeView*, uint32_t> view_slots_;
  std::mutex mailbox_mu_;
  std::vector<Handoff> mailbox_;  // guarded by mailbox_mu_
  std::vector<Attached> attached_;  // guarded by mailbox_mu_
  unsigned attaching_ = 0;          // attaches posted and not yet handled here
  // Declared last so that it is destroyed first: the kernel must be done
  // with every buffer above before they are freed.
  io::Ring ring_;
};

}  // namespace server
