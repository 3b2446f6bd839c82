#include "server/loop.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <spdlog/spdlog.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "server/attach_pool.hpp"

namespace server {
namespace {

constexpr size_t kHandshakeBuffer = 4096;
constexpr size_t kTransmissionBuffer = 128 * 1024;
constexpr size_t kDirectRecvMin = 16 * 1024;  // payloads this large skip rbuf
constexpr size_t kTlsRecvBuffer = 64 * 1024;   // ciphertext per recv
constexpr size_t kTlsSealBatch = 512 * 1024;   // reply bytes encrypted per send
constexpr size_t kMaxQueuedBytes = 64 << 20;  // pause reading past this much output
constexpr size_t kZeroChunk = 1 << 20;
constexpr unsigned kRingEntries = 1024;

std::string peer_name(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
  char host[INET6_ADDRSTRLEN] = "";
  if (ss.ss_family == AF_INET) {
    auto* in = reinterpret_cast<sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    return std::string(host) + ":" + std::to_string(ntohs(in->sin_port));
  }
  if (ss.ss_family == AF_INET6) {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(in6->sin6_port));
  }
  return "unix";
}

// The peer's address without its port, as nbd::Client wants it: an IPv4
// address (also when it came mapped into IPv6), an IPv6 address, or "unix".
std::string peer_address(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
  char host[INET6_ADDRSTRLEN] = "";
  if (ss.ss_family == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&ss)->sin_addr, host, sizeof host);
  } else if (ss.ss_family == AF_INET6) {
    const in6_addr& a = reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr;
    if (IN6_IS_ADDR_V4MAPPED(&a)) {
      inet_ntop(AF_INET, a.s6_addr + 12, host, sizeof host);
    } else {
      inet_ntop(AF_INET6, &a, host, sizeof host);
    }
  } else {
    return "unix";
  }
  return host;
}

std::string errno_text(int err) { return strerror(err); }

bool retryable(int res) { return res == -EAGAIN || res == -EINTR; }

Clock::duration seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

}  // namespace

Loop::Loop(Shared& shared, unsigned index) : shared_(shared), index_(index) {
  if (const char* d = getenv("NBDROOT_FAULT_MAP_LOG_DELAY_MS")) {
    const long ms = strtol(d, nullptr, 10);
    if (ms > 0) {
      log_delay_.tv_sec = ms / 1000;
      log_delay_.tv_nsec = (ms % 1000) * 1000000;
      if (index == 0) spdlog::warn("fault injection: map log writes start {} ms late", ms);
    }
  }
  if (const char* d = getenv("NBDROOT_FAULT_HANDOFF_DELAY_MS")) {
    handoff_delay_ms_ = std::max(0L, strtol(d, nullptr, 10));
    if (handoff_delay_ms_ && index == 0)
      spdlog::warn("fault injection: hand-offs to another loop start {} ms late", handoff_delay_ms_);
  }
}

Loop::~Loop() {
  for (auto& c : conns_)
    if (c && c->fd >= 0) ::close(c->fd);
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

bool Loop::init(std::string* err) {
  std::string log;
  int ret = ring_.init(kRingEntries, &log);
  if (!log.empty()) spdlog::info("loop {}: {}", index_, log);
  if (ret < 0) {
    *err = "io_uring setup failed: " + errno_text(-ret) +
           " (is io_uring disabled by kernel.io_uring_disabled?)";
    return false;
  }
  if (!ring_.features().fallocate)
    spdlog::warn("loop {}: kernel lacks IORING_OP_FALLOCATE; TRIM is ignored and WRITE_ZEROES "
                 "writes zeroes", index_);
  if (!ring_.features().fadvise)
    spdlog::warn("loop {}: kernel lacks IORING_OP_FADVISE; CACHE is a no-op", index_);
  wake_fd_ = eventfd(0, EFD_CLOEXEC);
  if (wake_fd_ < 0) {
    *err = "eventfd: " + errno_text(errno);
    return false;
  }
  accept_pending_.assign(shared_.listeners.size(), false);
  flushers_.resize(shared_.registry.size());
  tick_.tv_sec = 0;
  tick_.tv_nsec = 500 * 1000 * 1000;
  return true;
}

void Loop::wake() {
  uint64_t one = 1;
  ssize_t r = ::write(wake_fd_, &one, sizeof one);
  (void)r;
}

// ---------------------------------------------------------------- the loop

void Loop::run() {
  if (int ret = ring_.enable(); ret < 0) {
    fail("cannot enable the io_uring: " + errno_text(-ret));
    return;
  }
  for (uint32_t l = 0; l < shared_.listeners.size(); ++l) post_accept(l);
  post_timer();
  post_wake_read();
  if (shared_.stopping) begin_shutdown();

  bool busy = false;  // the last pass handled completions
  for (;;) {
    flush_sends();
    bool accepts = std::find(accept_pending_.begin(), accept_pending_.end(), true) !=
                   accept_pending_.end();
    if (shutdown_started_ && live_conns_ == 0 && !accepts && file_ops_ == 0 && attaching_ == 0 &&
        mailbox_empty())
      break;
    if (busy && poll_for_completions()) busy = false;
    int ret = ring_.submit_and_wait(1);
    if (ret < 0 && ret != -EBUSY && ret != -ETIME) {
      fail("io_uring_submit_and_wait: " + errno_text(-ret));
      return;
    }
    unsigned head, n = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(ring_.raw(), head, cqe) {
      dispatch(cqe);
      ++n;
    }
    io_uring_cq_advance(ring_.raw(), n);
    busy = n > 0;
  }
  spdlog::debug("loop {}: stopped", index_);
}

// After a busy pass, polls the ring for up to --poll-us before the loop
// sleeps. A client waiting on its reply usually sends its next request
// within a few microseconds; catching it here avoids a sleep and a wakeup,
// which on a VM costs tens of microseconds when it crosses CPUs. Returns
// true when completions arrived.
//
// Only while the loop waits on sockets alone: file operations may run in
// io_uring's worker threads, and on a small machine polling would take the
// CPU they need.
bool Loop::poll_for_completions() {
  if (shared_.opts.poll_us == 0 || file_ops_ > 0) return false;
  const auto until = Clock::now() + std::chrono::microseconds(shared_.opts.poll_us);
  do {
    io_uring_submit_and_get_events(ring_.raw());
    if (io_uring_cq_ready(ring_.raw())) return true;
  } while (Clock::now() < until);
  return false;
}

// A loop that cannot go on takes the whole server down rather than leave
// its connections hanging behind a server that looks healthy.
void Loop::fail(const std::string& why) {
  spdlog::critical("loop {}: {}; shutting the server down", index_, why);
  shared_.failed = true;
  kill(getpid(), SIGTERM);
}

void Loop::dispatch(const io_uring_cqe* cqe) {
  const uint64_t tag = cqe->user_data;
  const uint32_t slot = io::tag_slot(tag), gen = io::tag_gen(tag);
  switch (io::tag_kind(tag)) {
    case io::Kind::kAccept:
      on_accept(slot, cqe->res);
      break;
    case io::Kind::kRecv:
      if (Connection* c = conn_at(slot, gen)) on_recv(*c, cqe->res);
      break;
    case io::Kind::kSend:
      if (Connection* c = conn_at(slot, gen)) on_send(*c, cqe->res);
      break;
    case io::Kind::kFile:
      --file_ops_;
      if (slot < ops_.size() && ops_[slot].used && (ops_[slot].gen & 0xffffff) == gen)
        on_file(slot, cqe->res);
      else
        spdlog::error("loop {}: stale file completion for op {}", index_, slot);
      break;
    case io::Kind::kTimer:
      on_timer();
      break;
    case io::Kind::kWake:
      on_wake();
      break;
    case io::Kind::kFlush:
      --file_ops_;
      on_flush(slot, gen, cqe->res);
      break;
    case io::Kind::kSub:
      --file_ops_;
      if (slot < subs_.size() && subs_[slot].used && (subs_[slot].gen & 0xffffff) == gen)
        on_sub(slot, cqe->res);
      else
        spdlog::error("loop {}: stale completion for sub-operation {}", index_, slot);
      break;
    case io::Kind::kViewFlush:
      --file_ops_;
      on_view_flush(slot, gen, cqe->res);
      break;
    case io::Kind::kViewLog:
      --file_ops_;
      on_view_log(slot, gen, cqe->res);
      break;
    case io::Kind::kCancel:
      break;
  }
}

Connection* Loop::conn_at(uint32_t slot, uint32_t gen) {
  if (slot >= conns_.size() || !conns_[slot] || conns_[slot]->fd < 0 ||
      (conns_[slot]->gen & 0xffffff) != gen) {
    spdlog::error("loop {}: stale socket completion for connection slot {}", index_, slot);
    return nullptr;
  }
  return conns_[slot].get();
}

// ---------------------------------------------------------------- accepting

void Loop::post_accept(uint32_t l) {
  if (!accepting_ || accept_pending_[l]) return;
  io_uring_sqe* s = ring_.sqe();
  io_uring_prep_accept(s, shared_.listeners[l].fd, nullptr, nullptr, SOCK_CLOEXEC);
  s->user_data = io::make_tag(io::Kind::kAccept, l, 0);
  accept_pending_[l] = true;
}

void Loop::on_accept(uint32_t l, int res) {
  accept_pending_[l] = false;
  if (res >= 0 && (!accepting_ || shared_.stopping)) {
    ::close(res);  // accepted just as shutdown began
  } else if (res >= 0) {
    start_connection(res);
  } else if (res == -EMFILE || res == -ENFILE || res == -ENOMEM || res == -ENOBUFS) {
    spdlog::error("loop {}: accept on {}: {}; pausing accepts for a moment", index_,
                  shared_.listeners[l].address, errno_text(-res));
    accept_backoff_ = true;
    return;
  } else if (res != -ECANCELED && !retryable(res) && res != -ECONNABORTED) {
    spdlog::warn("loop {}: accept on {}: {}", index_, shared_.listeners[l].address,
                 errno_text(-res));
  }
  post_accept(l);
}

void Loop::post_timer() {
  io_uring_sqe* s = ring_.sqe();
  io_uring_prep_timeout(s, &tick_, 0, 0);
  s->user_data = io::make_tag(io::Kind::kTimer, 0, 0);
}

void Loop::post_wake_read() {
  io_uring_sqe* s = ring_.sqe();
  io_uring_prep_read(s, wake_fd_, &wake_buf_, sizeof wake_buf_, 0);
  s->user_data = io::make_tag(io::Kind::kWake, 0, 0);
}

void Loop::on_timer() {
  const auto now = Clock::now();
  if (accept_backoff_) {
    accept_backoff_ = false;
    for (uint32_t l = 0; l < accept_pending_.size(); ++l) post_accept(l);
  }
  const auto request_limit = seconds(shared_.opts.request_timeout);
  for (auto& cp : conns_) {
    if (!cp || cp->fd < 0 || cp->phase == Connection::Phase::kClosing) continue;
    Connection& c = *cp;
    if (c.phase == Connection::Phase::kHandshake && !c.attaching && now > c.handshake_deadline) {
      exports::bump(shared_.stats.server().handshake_failures);
      close_connection(c, fmt::format("handshake: no option finished in {} s (--handshake-timeout)",
                                      shared_.opts.handshake_timeout), true);
    } else if ((c.partial_header && now - c.header_since > request_limit) ||
               (c.partial && !c.partial_header && now - c.last_recv > request_limit)) {
      close_connection(c, "a request stalled half-received", true);
    } else if (c.send_pending && now - c.send_since > request_limit) {
      close_connection(c, "the client stopped reading replies", true);
    } else if (shutdown_started_ && now > shutdown_deadline_) {
      close_connection(c, "shutdown timeout reached with requests still in flight", true);
    }
  }
  for (const ViewState& vs : views_)
    if (vs.view && vs.conns) publish_dirty(vs);
  post_timer();
}

void Loop::on_wake() {
  std::vector<Handoff> arrived;
  std::vector<Attached> done;
  {
    std::lock_guard<std::mutex> g(mailbox_mu_);
    arrived.swap(mailbox_);
    done.swap(attached_);
  }
  for (Handoff& h : arrived) start_adopted(std::move(h));
  for (Attached& a : done) on_attached(std::move(a));
  if (shared_.stopping) begin_shutdown();
  post_wake_read();
}

void Loop::adopt(Handoff&& h) {
  {
    std::lock_guard<std::mutex> g(mailbox_mu_);
    mailbox_.push_back(std::move(h));
  }
  wake();
}

void Loop::attached(Attached&& a) {
  {
    std::lock_guard<std::mutex> g(mailbox_mu_);
    attached_.push_back(std::move(a));
  }
  wake();
}

bool Loop::mailbox_empty() {
  std::lock_guard<std::mutex> g(mailbox_mu_);
  return mailbox_.empty() && attached_.empty();
}

void Loop::begin_shutdown() {
  if (shutdown_started_) return;
  shutdown_started_ = true;
  accepting_ = false;
  shutdown_deadline_ =
      Clock::now() + seconds(shared_.opts.shutdown_timeout);
  for (uint32_t l = 0; l < accept_pending_.size(); ++l) {
    if (!accept_pending_[l]) continue;
    io_uring_sqe* s = ring_.sqe();
    io_uring_prep_cancel64(s, io::make_tag(io::Kind::kAccept, l, 0), 0);
    s->user_data = io::make_tag(io::Kind::kCancel, 0, 0);
  }
  for (auto& c : conns_) {
    if (!c || c->fd < 0) continue;
    if (c->phase == Connection::Phase::kHandshake) {
      close_connection(*c, "server shutting down", false);
    } else {
      to_send_.push_back(c->slot);
      c->send_queued = true;
    }
  }
}

// ---------------------------------------------------------------- connections

void Loop::start_connection(int fd) {
  if (shared_.connections.fetch_add(1) >= shared_.opts.max_connections) {
    shared_.connections--;
    exports::bump(shared_.stats.server().refused);
    spdlog::warn("refusing a connection from {}: --max-connections {} reached", peer_name(fd),
                 shared_.opts.max_connections);
    ::close(fd);
    return;
  }
  // TCP only; these fail harmlessly on Unix sockets. Keepalive finds nodes
  // that lost power while idle, so their slots and buffers are freed.
  int one = 1, idle = 30, interval = 10, probes = 6;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
  setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof probes);

  exports::bump(shared_.stats.server().connections_total);
  exports::bump(shared_.stats.server().connections_open);
  Connection& c = new_connection(fd);
  c.id = shared_.next_conn_id++;
  c.peer = peer_name(fd);
  c.rbuf.resize(kHandshakeBuffer);
  nbd::HandshakeLimits limits;
  c.hs = std::make_unique<nbd::Handshake>(
      shared_.registry, limits,
      shared_.opts.tls_required ? nbd::TlsMode::kRequire : nbd::TlsMode::kOff);
  c.hs->set_client(nbd::Client{peer_address(fd)});
  c.hs->set_defer_attach(shared_.attach_pool != nullptr);
  c.handshake_deadline =
      Clock::now() + seconds(shared_.opts.handshake_timeout);
  spdlog::debug("conn {}: accepted from {} on loop {}", c.id, c.peer, index_);
  OutMsg m;
  m.extra = std::move(c.hs->out());
  c.hs->out().clear();
  queue(c, std::move(m));
}

Connection& Loop::new_connection(int fd) {
  uint32_t slot;
  if (!free_conns_.empty()) {
    slot = free_conns_.back();
    free_conns_.pop_back();
  } else {
    slot = uint32_t(conns_.size());
    conns_.emplace_back();
  }
  uint32_t gen = conns_[slot] ? conns_[slot]->gen + 1 : 1;
  conns_[slot] = std::make_unique<Connection>();
  Connection& c = *conns_[slot];
  c.fd = fd;
  c.slot = slot;
  c.gen = gen;
  c.last_recv = Clock::now();
  ++live_conns_;
  return c;
}

// Moves a connection whose handshake just ended to the loop that owns its
// node view. Nothing of it is in flight here: no recv, send or request.
void Loop::hand_off(Connection& c) {
  if (shared_.stopping) return close_connection(c, "server shutting down", false);
  Handoff h;
  h.fd = c.fd;
  h.id = c.id;
  h.peer = c.peer;
  h.session = std::move(c.session);
  h.leftover.assign(reinterpret_cast<const char*>(c.unparsed_data()), c.unparsed());
  h.reply = std::move(c.handoff_reply);
  h.tls = std::move(c.tls);
  Loop* to = shared_.loops[size_t(c.handoff_to)];
  spdlog::debug("conn {}: handing off to loop {}", c.id, c.handoff_to);
  if (handoff_delay_ms_) std::this_thread::sleep_for(std::chrono::milliseconds(handoff_delay_ms_));
  c.fd = -1;
  c.exp = nullptr;
  c.phase = Connection::Phase::kClosing;
  free_conns_.push_back(c.slot);
  --live_conns_;
  to->adopt(std::move(h));
}

void Loop::start_adopted(Handoff&& h) {
  Connection& c = new_connection(h.fd);
  c.id = h.id;
  c.peer = std::move(h.peer);
  c.session = std::move(h.session);
  c.exp = &exports::Registry::served(*c.session.exp);
  c.phase = Connection::Phase::kTransmission;
  c.rbuf.resize(std::max(kTransmissionBuffer, h.leftover.size()));
  memcpy(c.rbuf.data(), h.leftover.data(), h.leftover.size());
  c.rlen = h.leftover.size();
  c.tls = std::move(h.tls);
  attach_view(c);
  OutMsg m;
  m.extra = std::move(h.reply);
  queue(c, std::move(m));
}
bool Loop::quiescent(const Connection& c) const {
  return c.inflight == 0 && !has_output(c) && !c.send_pending;
}

bool Loop::has_output(const Connection& c) const {
  return !c.out.empty() ||
         (c.tls && (c.wire_sent < c.wire_out.size() || !c.tls->outbox().empty()));
}

bool Loop::make_room(Connection& c) {
  if (c.rpos == c.rlen) {
    c.rpos = c.rlen = 0;
  } else if (c.rpos > 0 && c.rbuf.size() - c.rlen < kDirectRecvMin) {
    memmove(c.rbuf.data(), c.rbuf.data() + c.rpos, c.unparsed());
    c.rlen -= c.rpos;
    c.rpos = 0;
  }
  return c.rlen < c.rbuf.size();
}

void Loop::post_recv(Connection& c) {
  if (c.tls) return post_tls_recv(c);
  void* target = nullptr;
  size_t len = 0;
  if (c.payload_op != kNone && c.unparsed() == 0) {
    const Op& o = ops_[c.payload_op];
    uint64_t left = o.req.length - c.payload_got;
    if (left >= kDirectRecvMin) {
      target = o.buf.data() + c.payload_got;
      len = std::min<uint64_t>(left, INT_MAX);
      c.direct_recv = true;
    }
  }
  if (!c.direct_recv) {
    if (!make_room(c)) return;  // full of unparsed requests: wait
    target = c.rbuf.data() + c.rlen;
    len = c.rbuf.size() - c.rlen;
    // Shutting down, only the rest of a payload that is arriving is read,
    // never a request sent after it (which a reconnecting client sends
    // again to the next server). rbuf holds none of the payload here:
    // process_requests() moved it into the WRITE's buffer.
    if (shared_.stopping && c.payload_op != kNone)
      len = std::min<uint64_t>(len, ops_[c.payload_op].req.length - c.payload_got);
  }
  io_uring_sqe* s = ring_.sqe();
  io_uring_prep_recv(s, c.fd, target, len, 0);
  s->user_data = io::make_tag(io::Kind::kRecv, c.slot, c.gen);
  c.recv_pending = true;
}

void Loop::on_recv(Connection& c, int res) {
  c.recv_pending = false;
  const bool direct = c.direct_recv;
  c.direct_recv = false;
  if (c.phase == Connection::Phase::kClosing || retryable(res) || res == -ENOBUFS) {
    queue(c, OutMsg());  // just schedules service
    return;
  }
  if (res <= 0) {
    bool mid = c.partial || c.payload_op != kNone;
    const bool reset = res == -ECONNRESET || res == -EPIPE;
    close_connection(c, res == 0 ? (mid ? "client hung up in the middle of a request"
                                        : "client closed the connection")
                                 : "receive failed: " + errno_text(-res),
                     (res < 0 && !reset) || mid);
    return;
  }
  c.last_recv = Clock::now();
  if (c.tls) {
    on_tls_input(c, size_t(res));
    queue(c, OutMsg());
    return;
  }
  if (direct) {
    c.payload_got += uint64_t(res);
    Op& o = ops_[c.payload_op];
    if (c.payload_got == o.req.length) {
      uint32_t op = c.payload_op;
      c.payload_op = kNone;
      execute(op);
    }
  } else {
    c.rlen += size_t(res);
  }
  if (c.phase == Connection::Phase::kHandshake) on_handshake_input(c);
  queue(c, OutMsg());
}

void Loop::on_handshake_input(Connection& c) {
  // After STARTTLS nothing more is parsed in plaintext: what follows is the
  // client's TLS stream (start_tls()). During an attach, what the client
  // sent after its option waits in rbuf.
  if (c.hs->status() == nbd::Handshake::Status::kStartTls || c.attaching) return;
  const uint64_t progress = c.hs->progress();
  size_t used = c.hs->feed(c.unparsed_data(), c.unparsed());
  c.rpos += used;
  // Each finished option restarts the clock: a listing of thousands of
  // exports takes as long as it takes, a message trickled in never finishes.
  if (c.hs->progress() != progress)
    c.handshake_deadline = Clock::now() + seconds(shared_.opts.handshake_timeout);
  after_handshake_step(c);
}

void Loop::after_handshake_step(Connection& c) {
  for (const std::string& e : c.hs->take_errors()) {
    spdlog::info("conn {}: {}", c.id, e);
    exports::bump(shared_.stats.server().option_errors);
  }
  std::string out = std::move(c.hs->out());
  c.hs->out().clear();
  switch (c.hs->status()) {
    case nbd::Handshake::Status::kContinue:
    case nbd::Handshake::Status::kStartTls:  // start_tls() once the reply is sent
      break;
    case nbd::Handshake::Status::kAttaching:
      start_attach(c);
      break;
    case nbd::Handshake::Status::kTransmission:
      c.session = c.hs->session();
      c.exp = &exports::Registry::served(*c.session.exp);
      c.hs.reset();
      c.phase = Connection::Phase::kTransmission;
      c.rbuf.resize(kTransmissionBuffer);
      spdlog::info("conn {}: {} attached export '{}'{}{}", c.id, c.peer, c.exp->name,
                   c.session.structured ? " with structured replies" : "",
                   c.session.extended ? " and extended headers" : "");
      if (c.exp->view && c.exp->view->overlay().writable()) {
        int owner = -1;
        c.exp->view->owner.compare_exchange_strong(owner, int(index_));
        owner = c.exp->view->owner;
        if (owner == int(index_)) {
          attach_view(c);
        } else {
          // The client learns the handshake ended only once the owner has
          // attached it: a node's next connection then always finds this
          // one attached (a resume after it supersedes it, never the
          // reverse; a boot after it joins the view, never drops it).
          c.handoff_to = owner;
          c.handoff_reply = std::move(out);
          out.clear();
        }
      }
      break;
    case nbd::Handshake::Status::kClosed:
      if (c.hs->aborted()) {
        spdlog::debug("conn {}: {}", c.id, c.hs->close_reason());
      } else {
        spdlog::warn("conn {}: {}: handshake refused: {}", c.id, c.peer, c.hs->close_reason());
        exports::bump(shared_.stats.server().handshake_failures);
      }
      c.close_after_send = true;
      c.rpos = c.rlen;
      break;
  }
  if (!out.empty()) {
    OutMsg m;
    m.extra = std::move(out);
    queue(c, std::move(m));
  }
}

// Opening or creating a node's view (or, for NBD_OPT_INFO and the
// meta-context options, its record) blocks on the disk: it runs on the
// AttachPool while this loop serves its other connections. The job holds no
// reference into the loop's tables, only the connection's slot and
// generation, and its result comes back through attached().
void Loop::start_attach(Connection& c) {
  c.attaching = true;
  ++attaching_;
  spdlog::debug("conn {}: attaching '{}' on the attach threads", c.id,
                c.hs->deferred_call().name);
  shared_.attach_pool->post([this, slot = c.slot, gen = c.gen, call = c.hs->deferred_call()] {
    Attached a{slot, gen, nullptr, {}};
    // Stopping: attaches still queued are refused, not made for nobody.
    if (shared_.stopping) {
      a.why = "server is shutting down";
    } else {
      a.exp = call.run(shared_.registry, &a.why);
    }
    attached(std::move(a));
  });
}

void Loop::on_attached(Attached&& a) {
  --attaching_;
  Connection* cp = a.slot < conns_.size() ? conns_[a.slot].get() : nullptr;
  // The client left (or the server is stopping) meanwhile: the attachment
  // is let go here, on the loop, like any other.
  if (!cp || cp->fd < 0 || cp->gen != a.gen || !cp->attaching ||
      cp->phase != Connection::Phase::kHandshake || !cp->hs)
    return;
  Connection& c = *cp;
  c.attaching = false;
  c.hs->attach_done(std::move(a.exp), std::move(a.why));
  c.handshake_deadline = Clock::now() + seconds(shared_.opts.handshake_timeout);
  after_handshake_step(c);
  // Options the client sent after this one wait in rbuf.
  if (c.phase == Connection::Phase::kHandshake && c.unparsed()) on_handshake_input(c);
  queue(c, OutMsg());
}

// Moves payload bytes from rbuf into the WRITE waiting for them. Returns true
// when the payload is complete and the request went on to execute.
bool Loop::read_payload(Connection& c) {
  Op& o = ops_[c.payload_op];
  size_t n = std::min<uint64_t>(c.unparsed(), o.req.length - c.payload_got);
  memcpy(o.buf.data() + c.payload_got, c.unparsed_data(), n);
  c.rpos += n;
  c.payload_got += n;
  if (c.payload_got < o.req.length) return false;
  uint32_t op = c.payload_op;
  c.payload_op = kNone;
  execute(op);
  return true;
}

void Loop::process_requests(Connection& c) {
  const size_t header = c.session.extended ? nbd::kExtendedRequestSize : nbd::kRequestSize;
  bool paused = false;
  bool parsed = false;  // a header was consumed in this call
  while (c.phase == Connection::Phase::kTransmission) {
    if (c.drain_left) {
      size_t n = std::min<uint64_t>(c.unparsed(), c.drain_left);
      c.rpos += n;
      c.drain_left -= n;
      if (c.drain_left) break;
      reject(c, c.drain_req, c.drain_verdict);
      continue;
    }
    if (c.payload_op != kNone) {
      if (!read_payload(c)) break;
      continue;
    }
    if (c.disconnect) {
      c.rpos = c.rlen;  // nothing after NBD_CMD_DISC is read
      break;
    }
    if (backpressured(c)) {
      paused = true;
      break;
    }
    nbd::Request req;
    size_t used = 0;
    nbd::Parse p = nbd::parse_request(c.unparsed_data(), c.unparsed(), c.session.extended, &req,
                                      &used);
    if (p == nbd::Parse::kNeedMore) break;
    if (p == nbd::Parse::kBadMagic) {
      close_connection(c, "bad request magic", true);
      return;
    }
    c.rpos += used;
    parsed = true;
    handle_request(c, req);
  }
  const bool half_header = c.drain_left == 0 && c.payload_op == kNone && !paused &&
                           c.unparsed() > 0 && c.unparsed() < header;
  if (half_header && (parsed || !c.partial_header)) c.header_since = Clock::now();
  c.partial_header = half_header;
  c.partial = half_header || c.drain_left || c.payload_op != kNone;
}

// Reading pauses while too many requests, or too many bytes of buffers and
// replies, are outstanding on the connection; it resumes as they drain.
bool Loop::backpressured(const Connection& c) const {
  return c.inflight >= shared_.opts.max_inflight ||
         c.out.bytes() + c.read_bytes > kMaxQueuedBytes;
}

void Loop::handle_request(Connection& c, const nbd::Request& req) {
  const uint64_t payload = nbd::payload_length(req, c.session.extended);
  nbd::Verdict v = nbd::validate(req, c.session);
  if (spdlog::should_log(spdlog::level::trace))
    spdlog::trace("conn {}: {} flags {:#x} offset {} length {}", c.id, nbd::cmd_name(req.type),
                  req.flags, req.offset, req.length);
  if (!v.ok()) {
    spdlog::info("conn {}: {} offset {} length {}: {}: {}", c.id, nbd::cmd_name(req.type),
                 req.offset, req.length, nbd::error_name(v.error), v.why);
    return refuse(c, req, payload, v);
  }
  if (req.type == nbd::kCmdDisc) {
    spdlog::debug("conn {}: NBD_CMD_DISC", c.id);
    c.disconnect = true;
    return;
  }
  if (req.type == nbd::kCmdRead && try_mapped_read(c, req)) return;
  io::Buffer buf;
  if ((req.type == nbd::kCmdRead || req.type == nbd::kCmdWrite) && req.length > 0) {
    buf = pool_.get(req.length);
    if (!buf) {
      spdlog::error("conn {}: out of memory for a {} byte buffer", c.id, req.length);
      return refuse(c, req, payload, {nbd::kENOMEM, "out of memory for the request buffer"});
    }
  }
  uint32_t op = new_op(c, req);
  ops_[op].buf = std::move(buf);
  if (req.type == nbd::kCmdRead) c.read_bytes += req.length;
  if (req.type == nbd::kCmdWrite && req.length > 0) {
    c.payload_op = op;
    c.payload_got = 0;
    return;
  }
  execute(op);
}

// Serves a page-cached read from a file mapping, but only a bounded amount
// per connection: the pages must still be resident when the send happens.
bool Loop::try_mapped_read(Connection& c, const nbd::Request& req) {
  if (c.out.mapped_bytes() + req.length > kMaxMappedQueued || req.length == 0) return false;
  if (c.exp->view) return view_mapped_read(c, req);
  const uint8_t* map = c.exp->file->mapping();
  if (!storage::pages_resident(map, req.offset, req.length, &residency_)) return false;
  uint32_t op = new_op(c, req);
  ops_[op].mapped = map + req.offset;
  finish(op, nbd::kOk, {});
  return true;
}

// Answers a request that will not execute, after skipping its payload.
void Loop::refuse(Connection& c, const nbd::Request& req, uint64_t payload,
                  const nbd::Verdict& v) {
  if (payload > nbd::kMaxDrain) {
    close_connection(c, "declared payload of " + std::to_string(payload) +
                            " bytes is too large to skip", true);
  } else if (payload) {
    c.drain_left = payload;
    c.drain_req = req;
    c.drain_verdict = v;
  } else {
    reject(c, req, v);
  }
}

void Loop::reject(Connection& c, const nbd::Request& req, const nbd::Verdict& v) {
  count_reply(c, req, v.error);
  OutMsg m;
  m.extra = nbd::encode_done(c.session, req, v.error, v.why);
  queue(c, std::move(m));
}

void Loop::queue(Connection& c, OutMsg&& m) {
  if (m.size()) c.out.push(std::move(m));
  if (!c.send_queued) {
    c.send_queued = true;
    to_send_.push_back(c.slot);
  }
}

// Services every connection touched since the last pass: parses what
// arrived, sends what is queued, posts the next recv, closes when done.
void Loop::flush_sends() {
  while (!to_send_.empty()) {
    std::vector<uint32_t> batch;
    batch.swap(to_send_);
    for (uint32_t slot : batch) {
      Connection* cp = conns_[slot].get();
      if (!cp || cp->fd < 0) continue;
      Connection& c = *cp;
      c.send_queued = false;
      if (c.phase == Connection::Phase::kClosing) {
        maybe_free(c);
        continue;
      }
      if (c.handoff_to >= 0) {
        if (has_output(c) && !c.send_pending) post_send(c);
        if (!c.send_pending && !c.recv_pending && !has_output(c)) hand_off(c);
        if (c.phase == Connection::Phase::kClosing && c.fd >= 0) maybe_free(c);
        continue;
      }
      if (c.phase == Connection::Phase::kTransmission) process_requests(c);
      if (c.phase == Connection::Phase::kClosing) {
        maybe_free(c);
        continue;
      }
      // TLS starts once the STARTTLS reply is sent and no plaintext recv is
      // in flight (the client's first TLS bytes may be landing in rbuf).
      if (c.phase == Connection::Phase::kHandshake && !c.tls && c.hs &&
          c.hs->status() == nbd::Handshake::Status::kStartTls && c.out.empty() &&
          !c.send_pending && !c.recv_pending)
        start_tls(c);
      if (c.phase == Connection::Phase::kClosing) {
        maybe_free(c);
        continue;
      }
      if (has_output(c) && !c.send_pending) post_send(c);
      bool idle = quiescent(c) && c.payload_op == kNone && c.drain_left == 0;
      if ((c.disconnect || c.close_after_send) && quiescent(c)) {
        close_connection(c, c.disconnect ? "client disconnected" : "handshake ended", false);
      } else if (shared_.stopping && c.phase == Connection::Phase::kTransmission && idle) {
        close_connection(c, "server shutting down", false);
      } else if (!c.recv_pending && !c.disconnect && !c.close_after_send && !c.attaching) {
        // Not while attaching: rbuf grows when transmission starts, which
        // must not happen under a recv in flight into it.
        bool paused = c.payload_op == kNone && c.drain_left == 0 && backpressured(c);
        // Shutting down: no new requests are read, only the rest of one
        // whose payload is arriving. What the client sent after that stays
        // unanswered, never failed, so a reconnecting client (the kernel with
        // nbdroot-keeper) sends it again to the next server.
        if (shared_.stopping && c.payload_op == kNone && c.drain_left == 0) paused = true;
        if (!paused) post_recv(c);
      }
      if (c.phase == Connection::Phase::kClosing) maybe_free(c);
    }
  }
}

void Loop::post_send(Connection& c) {
  if (c.tls) return post_tls_send(c);
  c.out.prepare(&c.msg);
  c.send_since = Clock::now();
  io_uring_sqe* s = ring_.sqe();
  io_uring_prep_sendmsg(s, c.fd, &c.msg, MSG_NOSIGNAL);
  s->user_data = io::make_tag(io::Kind::kSend, c.slot, c.gen);
  c.send_pending = true;
}

void Loop::on_send(Connection& c, int res) {
  c.send_pending = false;
  if (c.phase != Connection::Phase::kClosing) {
    if (res < 0 && !retryable(res)) {
      close_connection(c, "send failed: " + errno_text(-res), res != -EPIPE && res != -ECONNRESET);
      return;
    }
    if (res > 0 && c.tls) {
      c.wire_sent += size_t(res);
    } else if (res > 0) {
      c.out.consume(size_t(res));
    }
  }
  queue(c, OutMsg());
}

// ---------------------------------------------------------------- TLS
//
// After NBD_OPT_STARTTLS is answered (in plaintext, and every reply before
// it), the connection's bytes go through its tls::Engine: what the client
// sends is fed to it and decrypted into rbuf, replies are encrypted from
// `out` into wire_out. Nothing received before STARTTLS is ever parsed
// after it (CVE-2021-3716 in nbdkit): unparsed bytes become the start of
// the TLS stream, and the handshake state is reset when TLS opens.

void Loop::start_tls(Connection& c) {
  std::string why;
  const TlsKeys* keys = shared_.tls_keys;
  c.tls = tls::Engine::server(
      [keys](std::string_view id, std::string* w) { return keys->find(id, w); }, &why);
  if (!c.tls) return close_connection(c, why, true);
  if (c.unparsed()) c.tls->feed(c.unparsed_data(), c.unparsed());
  c.rpos = c.rlen = 0;
  tls_broken(c);
}

void Loop::on_tls_input(Connection& c, size_t n) {
  const bool was_open = c.tls->status() == tls::Engine::Status::kOpen;
  c.tls->feed(c.cipher_in.data(), n);
  if (!was_open && c.tls->status() == tls::Engine::Status::kOpen) tls_opened(c);
  if (c.tls->status() == tls::Engine::Status::kOpen && make_room(c)) open_records(c);
  if (tls_broken(c)) return;
  if (c.phase == Connection::Phase::kHandshake) on_handshake_input(c);
}

void Loop::tls_opened(Connection& c) {
  spdlog::info("conn {}: {}: TLS established ({}) as {}", c.id, c.peer, c.tls->description(),
               nbd::quoted(c.tls->identity()));
  c.hs->tls_established(c.tls->identity());
  c.handshake_deadline = Clock::now() + seconds(shared_.opts.handshake_timeout);
}

size_t Loop::open_records(Connection& c) {
  size_t total = 0;
  while (c.rlen < c.rbuf.size()) {
    size_t n = c.tls->read(c.rbuf.data() + c.rlen, c.rbuf.size() - c.rlen);
    if (n == 0) break;
    c.rlen += n;
    total += n;
  }
  return total;
}

bool Loop::tls_broken(Connection& c) {
  if (c.tls->status() != tls::Engine::Status::kFailed) return false;
  if (c.phase != Connection::Phase::kHandshake) {
    close_connection(c, c.tls->error(), true);
    return true;
  }
  // The reason (an unknown identity, a wrong or expired key) stays in this
  // log; the client sees only TLS's alert, sent before closing.
  spdlog::warn("conn {}: {}: {}", c.id, c.peer, c.tls->error());
  exports::bump(shared_.stats.server().handshake_failures);
  c.out.consume(c.out.bytes());
  c.close_after_send = true;
  c.rpos = c.rlen;
  return true;
}

void Loop::post_tls_recv(Connection& c) {
  using Status = tls::Engine::Status;
  if (c.tls->status() == Status::kClosed) {
    const bool mid = c.partial || c.payload_op != kNone;
    return close_connection(c, mid ? "client closed TLS in the middle of a request"
                                   : "client closed the TLS session", mid);
  }
  if (c.tls->status() == Status::kOpen && make_room(c) && open_records(c) > 0) {
    queue(c, OutMsg());  // parse what was already decrypted first
    return;
  }
  if (tls_broken(c) || !make_room(c)) return;  // full of unparsed requests: wait
  if (c.cipher_in.empty()) c.cipher_in.resize(kTlsRecvBuffer);
  io_uring_sqe* s = ring_.sqe();
  io_uring_prep_recv(s, c.fd, c.cipher_in.data(), c.cipher_in.size(), 0);
  s->user_data = io::make_tag(io::Kind::kRecv, c.slot, c.gen);
  c.recv_pending = true;
}

void Loop::seal_replies(Connection& c) {
  c.out.prepare(&c.msg);
  size_t done = 0;
  c.tls->cork();
  for (size_t i = 0; i < c.msg.msg_iovlen && done < kTlsSealBatch; ++i) {
    const iovec& v = c.msg.msg_iov[i];
    size_t n = std::min(v.iov_len, kTlsSealBatch - done);
    if (!c.tls->write(static_cast<const uint8_t*>(v.iov_base), n)) return;
    done += n;
  }
  if (c.tls->uncork()) c.out.consume(done);
}

void Loop::post_tls_send(Connection& c) {
  if (c.wire_sent == c.wire_out.size()) {
    c.wire_out.clear();
    c.wire_sent = 0;
  }
  if (!c.out.empty() && c.tls->status() == tls::Engine::Status::kOpen &&
      c.wire_out.size() - c.wire_sent < kTlsSealBatch) {
    seal_replies(c);
    if (c.tls->status() == tls::Engine::Status::kFailed)
      return close_connection(c, c.tls->error(), true);
  }
  std::string& box = c.tls->outbox();
  if (c.wire_out.empty()) {
    c.wire_out.swap(box);
  } else {
    c.wire_out += box;
    box.clear();
  }
  if (c.wire_sent == c.wire_out.size()) return;
  c.send_since = Clock::now();
  io_uring_sqe* s = ring_.sqe();
  io_uring_prep_send(s, c.fd, c.wire_out.data() + c.wire_sent, c.wire_out.size() - c.wire_sent,
                     MSG_NOSIGNAL);
  s->user_data = io::make_tag(io::Kind::kSend, c.slot, c.gen);
  c.send_pending = true;
}

void Loop::close_connection(Connection& c, const std::string& why, bool error) {
  if (c.phase == Connection::Phase::kClosing) return;
  if (error) {
    spdlog::warn("conn {}: {}: closing: {}", c.id, c.peer, why);
    exports::bump(shared_.stats.server().connection_errors);
  } else {
    spdlog::debug("conn {}: closing: {}", c.id, why);
  }
  c.phase = Connection::Phase::kClosing;
  c.hs.reset();
  ::shutdown(c.fd, SHUT_RDWR);  // completes the pending recv and send
  if (c.recv_pending) {
    io_uring_sqe* s = ring_.sqe();
    io_uring_prep_cancel64(s, io::make_tag(io::Kind::kRecv, c.slot, c.gen), 0);
    s->user_data = io::make_tag(io::Kind::kCancel, 0, 0);
  }
  queue(c, OutMsg());
}

void Loop::maybe_free(Connection& c) {
  if (c.recv_pending || c.send_pending) return;
  if (c.payload_op != kNone) {
    release_op(c.payload_op);
    c.payload_op = kNone;
  }
  if (c.inflight) return;
  if (c.view_attached) detach_view(c);
  c.session = nbd::Session();
  c.exp = nullptr;
  ::close(c.fd);
  c.fd = -1;
  free_conns_.push_back(c.slot);
  --live_conns_;
  shared_.connections--;
  exports::bump(shared_.stats.server().connections_open, -1);
}

// ---------------------------------------------------------------- requests

uint32_t Loop::new_op(Connection& c, const nbd::Request& req) {
  uint32_t op;
  if (!free_ops_.empty()) {
    op = free_ops_.back();
    free_ops_.pop_back();
  } else {
    op = uint32_t(ops_.size());
    ops_.emplace_back();
  }
  Op& o = ops_[op];
  o.gen++;
  o.used = true;
  o.conn = c.slot;
  o.req = req;
  o.mapped = nullptr;
  o.parts.clear();
  o.done = 0;
  o.stage = 0;
  o.pending = 0;
  o.err = 0;
  ++c.inflight;
  return op;
}

void Loop::release_op(uint32_t op) {
  Op& o = ops_[op];
  o.used = false;
  o.buf.release();
  o.wbuf.release();
  o.wbuf2.release();
  o.plan.reset();
  free_ops_.push_back(op);
  --conns_[o.conn]->inflight;
}

void Loop::execute(uint32_t op) {
  Op& o = ops_[op];
  Connection& c = *conns_[o.conn];
  if (c.exp->view) return execute_view(op);
  storage::ImageFile& f = *c.exp->file;
  const nbd::Request& r = o.req;
  const bool mutates = r.type == nbd::kCmdWrite || r.type == nbd::kCmdTrim ||
                       r.type == nbd::kCmdWriteZeroes || r.type == nbd::kCmdFlush;
  if (mutates && f.sticky_error()) {
    finish(op, nbd::kEIO, "an earlier flush failed (" + errno_text(f.sticky_error()) +
                              "); the export refuses writes until restarted");
    return;
  }
  switch (r.type) {
    case nbd::kCmdRead:
    case nbd::kCmdWrite:
      if (r.length == 0) return finish(op, nbd::kOk, {});
      return submit_file_io(op);
    case nbd::kCmdFlush:
      return request_flush(op);
    case nbd::kCmdTrim:
    case nbd::kCmdWriteZeroes: {
      if (r.length == 0) return finish(op, nbd::kOk, {});
      if (!ring_.features().fallocate) {
        if (r.type == nbd::kCmdTrim) return finish(op, nbd::kOk, {});
        if (r.flags & nbd::kCmdFlagFastZero)
          return finish(op, nbd::kENOTSUP, "zeroing would be slow on this kernel");
        o.stage = 1;  // go straight to writing zeroes
        return on_file(op, -EOPNOTSUPP);
      }
      int mode = FALLOC_FL_KEEP_SIZE;
      mode |= (r.type == nbd::kCmdWriteZeroes && (r.flags & nbd::kCmdFlagNoHole))
                  ? FALLOC_FL_ZERO_RANGE
                  : FALLOC_FL_PUNCH_HOLE;
      io_uring_prep_fallocate(op_sqe(op), f.fd_for(index_), mode, r.offset, r.length);
      return;
    }
    case nbd::kCmdCache: {
      if (r.length == 0 || !ring_.features().fadvise) return finish(op, nbd::kOk, {});
      io_uring_prep_fadvise(op_sqe(op), f.fd_for(index_), r.offset, off_t(r.length),
                            POSIX_FADV_WILLNEED);
      return;
    }
    case nbd::kCmdBlockStatus:
      return finish(op, nbd::kOk, {});
    default:
      assert(false && "validate() let through an unknown command");
      return finish(op, nbd::kEINVAL, "unknown command");
  }
}

// Submits the rest of a read or write (or of the zero-filling fallback).
io_uring_sqe* Loop::file_sqe(uint64_t tag) {
  ++file_ops_;
  io_uring_sqe* s = ring_.sqe();
  s->user_data = tag;
  return s;
}

io_uring_sqe* Loop::op_sqe(uint32_t op) {
  return file_sqe(io::make_tag(io::Kind::kFile, op, ops_[op].gen));
}

void Loop::submit_file_io(uint32_t op) {
  Op& o = ops_[op];
  Connection& c = *conns_[o.conn];
  const int fd = c.exp->file->fd_for(index_);
  const uint64_t left = o.req.length - o.done;
  io_uring_sqe* s = op_sqe(op);
  if (o.req.type == nbd::kCmdRead) {
    io_uring_prep_read(s, fd, o.buf.data() + o.done, unsigned(left), o.req.offset + o.done);
  } else if (o.req.type == nbd::kCmdWrite) {
    io_uring_prep_write(s, fd, o.buf.data() + o.done, unsigned(left), o.req.offset + o.done);
  } else {  // zero-filling: o.buf holds zeroes
    unsigned n = unsigned(std::min<uint64_t>(left, o.buf.capacity()));
    io_uring_prep_write(s, fd, o.buf.data(), n, o.req.offset + o.done);
  }
}

void Loop::on_file(uint32_t op, int res) {
  Op& o = ops_[op];
  Connection& c = *conns_[o.conn];
  storage::ImageFile& f = *c.exp->file;
  const nbd::Request& r = o.req;
  const bool fua = r.flags & nbd::kCmdFlagFua;
  if (retryable(res)) {
    if (r.type == nbd::kCmdRead || r.type == nbd::kCmdWrite || o.stage == 1)
      return submit_file_io(op);
    return execute(op);  // fallocate or fadvise again
  }
  // A mutation that failed may have changed part of its range: from now on
  // the allocation map calls the whole range data, never "reads as zero".
  auto failed = [&](const std::string& what, int err) {
    if (r.type != nbd::kCmdRead) f.note_write(r.offset, r.length);
    finish(op, nbd::error_from_errno(err, r.flags & nbd::kCmdFlagFastZero),
           what + " failed: " + errno_text(err));
  };
  // A mutation is done once written, or for FUA once an fdatasync that
  // started after it completes. FUA requests share those fdatasyncs.
  auto done = [&] {
    if (!fua) return finish(op, nbd::kOk, {});
    o.stage = 2;
    request_flush(op);
  };
  switch (r.type) {
    case nbd::kCmdRead:
    case nbd::kCmdWrite:
      if (res < 0) return failed(r.type == nbd::kCmdRead ? "read" : "write", -res);
      if (res == 0) return failed("I/O at end of file", EIO);
      o.done += uint64_t(res);
      if (o.done < r.length) return submit_file_io(op);
      if (r.type == nbd::kCmdRead) return finish(op, nbd::kOk, {});
      f.note_write(r.offset, r.length);
      return done();
    case nbd::kCmdCache:
      if (res < 0) return failed("fadvise", -res);
      return finish(op, nbd::kOk, {});
    case nbd::kCmdTrim:
    case nbd::kCmdWriteZeroes:
      break;
    default:
      return finish(op, nbd::kEIO, "unexpected completion");
  }
  // TRIM and WRITE_ZEROES: stage 0 fallocate, 1 writing zeroes.
  if (o.stage == 0) {
    if (res == -EOPNOTSUPP || res == -EINVAL) {
      if (r.type == nbd::kCmdTrim) return finish(op, nbd::kOk, {});  // TRIM is advisory
      if (r.flags & nbd::kCmdFlagFastZero)
        return finish(op, nbd::kENOTSUP, "this file cannot zero quickly");
      o.stage = 1;
      res = -EOPNOTSUPP;
    } else if (res < 0) {
      return failed("fallocate", -res);
    } else {
      if (r.type == nbd::kCmdTrim || !(r.flags & nbd::kCmdFlagNoHole)) {
        f.note_punch(r.offset, r.length);
      } else {
        f.note_zero(r.offset, r.length);
      }
      return done();
    }
  }
  assert(o.stage == 1);
  if (res == -EOPNOTSUPP) {  // first entry: set up the zero buffer
    o.buf = pool_.get(std::min<uint64_t>(r.length, kZeroChunk));
    if (!o.buf) return finish(op, nbd::kENOMEM, "out of memory for zeroes");
    memset(o.buf.data(), 0, o.buf.capacity());
    return submit_file_io(op);
  }
  if (res <= 0) return failed("writing zeroes", res == 0 ? EIO : -res);
  o.done += uint64_t(res);
  if (o.done < r.length) return submit_file_io(op);
  f.note_write(r.offset, r.length);
  done();
}

void Loop::request_flush(uint32_t op) {
  const exports::ServedExport& e = *conns_[ops_[op].conn]->exp;
  Flusher& fl = flushers_[e.index];
  if (!fl.file) {
    fl.file = e.file.get();
    fl.running.resize(fl.file->syncers());
  }
  fl.waiting.push_back(op);
  start_flush(e.index);
}

// Starts an fdatasync for the waiting requests if a descriptor is idle.
void Loop::start_flush(unsigned exp) {
  Flusher& fl = flushers_[exp];
  if (fl.waiting.empty()) return;
  for (unsigned k = 0; k < fl.running.size(); ++k) {
    if (!fl.running[k].empty()) continue;
    fl.running[k].swap(fl.waiting);
    return submit_flush(exp, k);
  }
}

void Loop::submit_flush(unsigned exp, unsigned k) {
  Flusher& fl = flushers_[exp];
  io_uring_prep_fsync(file_sqe(io::make_tag(io::Kind::kFlush, exp, k)),
                      fl.file->sync_fd(index_, k), IORING_FSYNC_DATASYNC);
}

void Loop::on_flush(unsigned exp, unsigned k, int res) {
  Flusher& fl = flushers_[exp];
  if (retryable(res)) return submit_flush(exp, k);
  // Every error is sticky: the kernel reports a writeback error only once
  // per open file, and the pages it could not write may already be gone.
  if (res < 0) fl.file->set_sticky_error(-res);
  const int err = fl.file->sticky_error();
  std::vector<uint32_t> done;
  done.swap(fl.running[k]);
  for (uint32_t op : done)
    finish(op, err ? nbd::kEIO : nbd::kOk, err ? "fdatasync failed: " + errno_text(err) : "");
  start_flush(exp);
}

void Loop::reply_block_status(uint32_t op) {
  Op& o = ops_[op];
  Connection& c = *conns_[o.conn];
  const size_t max = (o.req.flags & nbd::kCmdFlagReqOne) ? 1 : kMaxExtents;
  const auto& contexts = c.session.contexts;
  for (size_t i = 0; i < contexts.size(); ++i) {
    std::vector<nbd::Extent> ext;
    if (c.exp->view) {
      ext = view_extents(*c.exp->view, contexts[i].name, o.req.offset, o.req.length, max);
    } else if (contexts[i].name == nbd::kContextBaseAllocation) {
      for (const storage::Extent& e : c.exp->file->allocation(o.req.offset, o.req.length, max))
        ext.push_back({e.length, allocation_flags(e.state)});
    }
    OutMsg m;
    m.extra = nbd::encode_block_status(c.session, o.req, contexts[i].id, ext,
                                       i + 1 == contexts.size());
    queue(c, std::move(m));
  }
}

// Counts a reply for /metrics: the node's bytes, or an error.
void Loop::count_reply(const Connection& c, const nbd::Request& req, nbd::Error err) {
  exports::NodeCounters* n = c.exp ? c.exp->counters.get() : nullptr;
  if (err != nbd::kOk) {
    exports::bump(shared_.stats.server().error_replies);
    if (n) exports::bump(n->errors);
  } else if (n && req.type == nbd::kCmdRead) {
    exports::bump(n->read_bytes, req.length);
  } else if (n && req.type == nbd::kCmdWrite) {
    exports::bump(n->written_bytes, req.length);
  }
}

// The one place a request completes: queue its reply and release it.
void Loop::finish(uint32_t op, nbd::Error err, const std::string& why) {
  Op& o = ops_[op];
  Connection& c = *conns_[o.conn];
  if (o.req.type == nbd::kCmdRead && !o.mapped && o.parts.empty()) c.read_bytes -= o.req.length;
  if (err != nbd::kOk)
    spdlog::warn("conn {}: {} offset {} length {}: {}: {}", c.id, nbd::cmd_name(o.req.type),
                 o.req.offset, o.req.length, nbd::error_name(err), why);
  count_reply(c, o.req, err);
  if (c.phase != Connection::Phase::kClosing) {
    if (err == nbd::kOk && o.req.type == nbd::kCmdBlockStatus) {
      reply_block_status(op);
    } else if (err == nbd::kOk) {
      OutMsg m;
      if (o.req.type == nbd::kCmdRead) {
        m.hlen = uint16_t(nbd::encode_read_header(m.head, c.session, o.req, o.req.length));
        m.data = std::move(o.buf);
        m.mapped = o.mapped;
        m.parts = std::move(o.parts);
        m.dlen = o.req.length;
      } else {
        m.hlen = uint16_t(nbd::encode_ok(m.head, c.session, o.req));
      }
      queue(c, std::move(m));
    } else {
      OutMsg m;
      m.extra = nbd::encode_done(c.session, o.req, err, why);
      queue(c, std::move(m));
    }
  } else {
    queue(c, OutMsg());
  }
  release_op(op);
}

}  // namespace server
