#include "node/agent.hpp"

#include <malloc.h>
#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/program_options.hpp>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <nlohmann/json.hpp>
#include <set>
#include <shared_mutex>
#include <thread>
#include <tuple>

#include "node/chunk_cache.hpp"
#include "node/nbd_client.hpp"
#include "node/read_plan.hpp"
#include "node/service.hpp"
#include "node/tracker_client.hpp"
#include "storage/chunk_digests.hpp"
#include "tls/seal.hpp"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

namespace node {
namespace {

namespace po = boost::program_options;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

constexpr uint32_t kBlock = 4096;  // granularity of the agent's changed-block map

struct Options {
  std::vector<Endpoint> servers;
  std::string exp;  // IMAGE/NODE
  std::string image, node_name;
  std::string socket;
  std::string mode;  // persistent|ephemeral for a node this attach creates; empty: the server's
  std::optional<Psk> psk;  // --tls require: the node's key (its identity is node_name)
  std::string peer_listen = "0.0.0.0:10809";
  bool peers = true;
  uint64_t cache = 64ull << 20;
  uint64_t upload_limit = 0;  // bytes/s, 0: unlimited
  size_t upload_connections = 64;
  std::string tracker;        // HOST:PORT of the server's HTTP API
  int peer_timeout_ms = 500;  // a peer's answer after this goes to the server instead
  bool prefetch = true;       // fetch the generation's boot order ahead of the kernel
  bool huge_pages = false;    // the chunk arena in transparent huge pages
  unsigned attach_timeout = 0;  // seconds the first attach is tried; 0: until stopped
  std::string ready_file;
  std::string stats_file;
  std::string log_level = "info";
};

// Size strings: 64M, 1G, 512K, 0, plain bytes.
bool parse_size(const std::string& s, uint64_t* out) {
  if (s.empty()) return false;
  size_t i = 0;
  uint64_t v = 0;
  while (i < s.size() && isdigit(static_cast<unsigned char>(s[i]))) {
    if (v > (UINT64_MAX - 9) / 10) return false;
    v = v * 10 + uint64_t(s[i++] - '0');
  }
  if (i == 0) return false;
  std::string unit = s.substr(i);
  for (auto& ch : unit) ch = char(toupper(static_cast<unsigned char>(ch)));
  unsigned shift = 0;
  if (unit.empty() || unit == "B") shift = 0;
  else if (unit == "K" || unit == "KIB") shift = 10;
  else if (unit == "M" || unit == "MIB") shift = 20;
  else if (unit == "G" || unit == "GIB") shift = 30;
  else return false;
  if (shift && v > (UINT64_MAX >> shift)) return false;
  *out = v << shift;
  return true;
}

// Counters, for the stats file, the log and tests.
struct Stats {
  std::atomic<uint64_t> view_read_bytes{0}, view_write_bytes{0};
  std::atomic<uint64_t> gen_server_bytes{0}, gen_peer_bytes{0}, gen_cache_hits{0};
  std::atomic<uint64_t> peer_failures{0}, peer_bad_chunks{0}, peer_timeouts{0};
  std::atomic<uint64_t> served_bytes{0}, served_chunks{0}, served_refused{0};
  std::atomic<uint64_t> reconnects{0};
  std::atomic<uint64_t> prefetched_chunks{0};
  std::atomic<uint64_t> peer_skipped{0};  // named by the tracker, backed off here: the server
};

// One export on the server list, reconnecting on its own: callers retry
// what a broken connection lost. The node's view reattaches with ?resume.
// With a key (--tls require) every connection is TLS or nothing: a server
// that does not take STARTTLS, or a failed TLS handshake, is logged as an
// error and retried like any failed connection.
//
// One loop, dial(), makes every connection: the first one and reconnects.
// It passes over the server list, backing off between passes, and logs
// each distinct reason once, then how long it has been every 30 s. Only
// the first attach may end on a server's final refusal (final_refusal());
// a reconnect waits for the server to change its mind.
class Link {
 public:
  // `psk` (may be null) must outlive the link.
  Link(const std::vector<Endpoint>& servers, const Psk* psk, std::string name,
       std::vector<std::string> contexts, Stats& stats, std::atomic<bool>& stopping)
      : servers_(servers), psk_(psk), name_(std::move(name)), contexts_(std::move(contexts)),
        stats_(stats), stopping_(stopping) {}

  // The export names of the first connection and of reconnects (defaults:
  // the link's name).
  void set_first_name(std::string n) { first_name_ = std::move(n); }
  void set_resume_name(std::string n) { resume_name_ = std::move(n); }

  // The first connection, tried until a server takes it. False and *err
  // (each server's last reason) when a server refused the export for good
  // (the rest of the list was asked too), when a pass over the servers
  // ends after `give_up` (Clock::now(): one pass), or when the agent is
  // asked to stop.
  bool connect_first(Clock::time_point give_up, std::string* err) {
    std::lock_guard<std::mutex> g(mu_);
    cur_ = dial(first_name_.empty() ? name_ : first_name_, true, give_up, err);
    return cur_ != nullptr;
  }

  // The connection, reconnected first if it broke; null once the agent is
  // stopping.
  std::shared_ptr<NbdClient> client() {
    std::lock_guard<std::mutex> g(mu_);
    if (cur_ && !cur_->broken()) return cur_;
    std::string err;
    cur_ = dial(resume_name_.empty() ? name_ : resume_name_, false, Clock::time_point::max(), &err);
    return cur_;
  }

  // Runs fn on a connection until it gets an answer (kOk, kNbdError or
  // kTimeout); a broken connection is replaced and fn retried.
  template <typename F>
  Result call(F&& fn) {
    for (;;) {
      std::shared_ptr<NbdClient> c = client();
      if (!c) return Result{Result::kBroken, 0, "agent stopping"};
      Result r = fn(*c);
      if (r.kind != Result::kBroken) return r;
      spdlog::warn("upstream: '{}' on {}: {}", name_, at_, r.why);
    }
  }

  uint64_t size() {
    auto c = client();
    return c ? c->size() : 0;
  }

  void close() {
    std::lock_guard<std::mutex> g(mu_);
    if (cur_) cur_->close();
  }

 private:
  // Distinct reasons logged per outage; past them only the 30 s notes.
  static constexpr size_t kMaxReasons = 32;

  // A refusal retrying cannot change: the server says the export does not
  // exist or is not this node's to attach (NBD_REP_ERR_UNKNOWN, _POLICY,
  // _INVALID), or that it requires TLS of an agent without a key. A
  // connection error, a timeout, anything TLS (a failed handshake, a
  // refused STARTTLS) and a server shutting down are worth another try.
  static bool final_refusal(const NbdClient& c) {
    const uint32_t r = c.refused();
    return r == nbd::kRepErrUnknown || r == nbd::kRepErrPolicy || r == nbd::kRepErrInvalid ||
           r == nbd::kRepErrTlsReqd;
  }

  // Sleeps `d`, in slices, while the agent is not asked to stop; false once
  // it is.
  bool pause(Clock::duration d) {
    for (auto end = Clock::now() + d; !stopping_ && Clock::now() < end;)
      std::this_thread::sleep_for(std::min<Clock::duration>(std::chrono::milliseconds(50),
                                                            end - Clock::now()));
    return !stopping_;
  }

  // Connects as `name`: passes over the server list until a server takes
  // it, backing off between passes (the first attach 0.2 s doubling to
  // 5 s, a reconnect 20 ms to 1 s). Null and *err as connect_first(); a
  // reconnect (`first` false) does not end on a final refusal. mu_ held.
  std::shared_ptr<NbdClient> dial(const std::string& name, bool first, Clock::time_point give_up,
                                  std::string* err) {
    using std::chrono::milliseconds;
    const auto t0 = Clock::now();
    const milliseconds max_delay(first ? 5000 : 1000);
    std::set<std::string> seen;
    std::string last;
    auto note_at = t0 + std::chrono::seconds(30);
    for (milliseconds delay(first ? 200 : 20);; delay = std::min(delay * 2, max_delay)) {
      err->clear();
      bool refused = false;  // a server's final refusal (first attach)
      for (const Endpoint& s : servers_) {
        if (stopping_) return *err = "the agent is stopping", nullptr;
        auto c = make_client();
        std::string why;
        if (c->connect(s, name, contexts_, first ? 10000 : 5000, &why)) {
          log_connected(*c, s, name, first, t0);
          at_ = s.text();
          return c;
        }
        *err += (err->empty() ? "" : "; ") + why;  // why names the server
        last = why;
        refused = refused || (first && final_refusal(*c));
        // No log when this pass is the last: the caller reports *err.
        if (!refused && Clock::now() < give_up && seen.size() < kMaxReasons &&
            seen.insert(why).second)
          log_failure(*c, why, first);
      }
      if (refused || Clock::now() >= give_up) return nullptr;
      if (Clock::now() >= note_at) {
        note_at += std::chrono::seconds(30);
        spdlog::warn("upstream: '{}' still {} after {:.0f} s; the last reason: {}", name_,
                     first ? "not attached" : "not reconnected",
                     std::chrono::duration<double>(Clock::now() - t0).count(), last);
      }
      if (!pause(std::min<Clock::duration>(delay, give_up - Clock::now())))
        return *err = "the agent is stopping", nullptr;
    }
  }

  void log_connected(NbdClient& c, const Endpoint& s, const std::string& name, bool first,
                     Clock::time_point t0) {
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    const std::string tls = psk_ ? " over " + c.tls_description() : "";
    if (!first) {
      spdlog::info("upstream: '{}' reconnected to {} as '{}' after {:.2f} s{}", name_, s.text(),
                   name, secs, tls);
      ++stats_.reconnects;
    } else if (psk_) {
      spdlog::info("upstream: '{}' on {}{} as '{}'{}", name_, s.text(), tls, psk_->identity,
                   secs >= 0.1 ? fmt::format(" after {:.2f} s", secs) : "");
    } else if (secs >= 0.1) {
      spdlog::info("upstream: '{}' on {} after {:.2f} s", name_, s.text(), secs);
    }
  }

  // `why` names the server: "HOST:PORT: the server did not accept ...".
  void log_failure(const NbdClient& c, const std::string& why, bool first) {
    if (first && c.starttls_refused())
      spdlog::error("upstream: cannot attach '{}' yet: {}; retrying", name_, why);
    else if (first && c.tls_failed())
      spdlog::error("upstream: cannot attach '{}' yet: {}; retrying (the server may have this "
                    "node's key a moment later)", name_, why);
    else if (first)
      spdlog::warn("upstream: cannot attach '{}' yet: {}; retrying", name_, why);
    else if (c.tls_failed())
      spdlog::error("upstream: '{}' on {}; retrying", name_, why);
    else
      spdlog::warn("upstream: '{}' on {}", name_, why);
  }

  std::shared_ptr<NbdClient> make_client() const {
    auto c = std::make_shared<NbdClient>();
    if (psk_) c->use_tls(*psk_);
    return c;
  }

  const std::vector<Endpoint>& servers_;
  const Psk* psk_;
  std::string name_, first_name_, resume_name_;
  std::vector<std::string> contexts_;
  Stats& stats_;
  std::atomic<bool>& stopping_;
  std::mutex mu_;
  std::shared_ptr<NbdClient> cur_;
  std::string at_;
};

nbd::Error to_nbd(const Result& r, std::string* why) {
  *why = r.why;
  if (r.kind == Result::kNbdError) return nbd::Error(r.nbd_error ? r.nbd_error : nbd::kEIO);
  return nbd::kEIO;
}

class Agent;

// The kernel's export: the node's whole root.
class KernelBackend final : public Backend {
 public:
  explicit KernelBackend(Agent& a) : a_(a) {}
  nbd::Error read(uint8_t* buf, uint64_t len, uint64_t off, std::string* why) override;
  nbd::Error write(const uint8_t* buf, uint64_t len, uint64_t off, bool fua, std::string* why) override;
  nbd::Error flush(std::string* why) override;
  nbd::Error trim(uint64_t len, uint64_t off, bool fua, std::string* why) override;
  nbd::Error zero(uint64_t len, uint64_t off, bool fua, std::string* why) override;

 private:
  Agent& a_;
};

// What other nodes read: chunks of the generation this agent holds.
class PeerBackend final : public Backend {
 public:
  explicit PeerBackend(Agent& a) : a_(a) {}
  nbd::Error read(uint8_t* buf, uint64_t len, uint64_t off, std::string* why) override;
  nbd::Error write(const uint8_t*, uint64_t, uint64_t, bool, std::string* why) override {
    return refuse(why);
  }
  nbd::Error flush(std::string* why) override { return refuse(why); }
  nbd::Error trim(uint64_t, uint64_t, bool, std::string* why) override { return refuse(why); }
  nbd::Error zero(uint64_t, uint64_t, bool, std::string* why) override { return refuse(why); }

 private:
  static nbd::Error refuse(std::string* why) {
    *why = "a peer serves its generation read-only";
    return nbd::kEPERM;
  }
  Agent& a_;
};

// A catalog of fixed exports: `names` all answer with `info`.
class FixedCatalog final : public nbd::ExportCatalog {
 public:
  FixedCatalog(std::shared_ptr<nbd::ExportInfo> info, std::vector<std::string> names, std::string refusal)
      : info_(std::move(info)), names_(std::move(names)), refusal_(std::move(refusal)) {}
  std::shared_ptr<const nbd::ExportInfo> find(std::string_view name) const override {
    for (const auto& n : names_)
      if (n == name) return info_;
    return nullptr;
  }
  std::shared_ptr<const nbd::ExportInfo> lookup(std::string_view name, std::string* why) const override {
    auto e = find(name);
    if (!e && why) *why = refusal_ + " (asked for '" + std::string(name) + "')";
    return e;
  }
  std::vector<std::shared_ptr<const nbd::ExportInfo>> list() const override { return {info_}; }

 private:
  std::shared_ptr<nbd::ExportInfo> info_;
  std::vector<std::string> names_;
  std::string refusal_;
};

class Agent {
 public:
  Agent(Options o)
      : o_(std::move(o)),
        view_(o_.servers, o_.psk ? &*o_.psk : nullptr, o_.exp, {"nbdroot:dirty"}, stats_,
              stopping_),
        dirty_(kBlock),
        cache_(o_.peers ? o_.cache : 0),
        kernel_backend_(*this),
        peer_backend_(*this) {
    // A node created by this attach gets --mode; an existing node of the
    // other mode is refused by the server, with its message.
    const std::string mode = o_.mode.empty() ? "" : "mode=" + o_.mode;
    if (!mode.empty()) view_.set_first_name(o_.exp + "?" + mode);
    view_.set_resume_name(o_.exp + "?resume" + (mode.empty() ? "" : "&" + mode));
    if (const char* f = getenv("NBDROOT_FAULT_PEER")) {
      fault_ = f;
      spdlog::warn("fault injection: this agent's peer service will {}", fault_);
    }
  }

  int run();
  void request_stop() { stopping_.store(true); }
  void stop() {
    stopping_ = true;
    std::lock_guard<std::mutex> g(stop_mu_);
    stop_cv_.notify_all();
  }

  // ---- the kernel's requests
  nbd::Error read(uint8_t* buf, uint64_t len, uint64_t off, std::string* why);
  nbd::Error mutate(uint16_t type, const uint8_t* buf, uint64_t len, uint64_t off, bool fua,
                    std::string* why);
  nbd::Error flush(std::string* why);
  // ---- peers' requests
  nbd::Error serve_peer(uint8_t* buf, uint64_t len, uint64_t off, std::string* why);

 private:
  bool setup_generation(std::string* err);
  bool open_peer_key(const NodeInfo& info, std::string* err);
  tls::KeyLookup peer_keys() const;
  bool load_dirty(std::string* err);
  nbd::Error read_view(uint8_t* buf, uint64_t len, uint64_t off, std::string* why);
  // Fills `out` with chunk c of the generation: the cache, a peer or the server.
  nbd::Error chunk(uint64_t c, ChunkBytes* out, std::string* why);
  bool fetch_chunks(const std::vector<uint64_t>& chunks, std::map<uint64_t, ChunkBytes>* have,
                    std::string* why);
  ChunkBytes fetch_from_peer(uint64_t c, int slot);
  bool fetch_run_from_server(uint64_t first, size_t n, std::vector<ChunkBytes>* out, std::string* why);
  std::vector<int> ask_tracker(const std::vector<uint64_t>& chunks);
  void load_order();
  void prefetch();
  bool all_dirty(uint64_t c);
  void report(bool leaving, int bad_slot);
  void catch_up_after_tracker_restart(bool leaving);
  void housekeeping();
  void write_stats();
  void throttle_upload(uint64_t bytes);
  uint64_t chunk_len(uint64_t c) const {
    return std::min<uint64_t>(chunk_size_, gen_size_ - c * chunk_size_);
  }

  Options o_;
  Stats stats_;
  std::atomic<bool> stopping_{false};
  std::mutex stop_mu_;
  std::condition_variable stop_cv_;
  Link view_;
  std::unique_ptr<Link> gen_;
  uint64_t size_ = 0;

  std::shared_mutex dirty_mu_;
  DirtyBlocks dirty_;

  // The generation side (peers on).
  bool chunked_ = false;  // clean reads go through chunks
  std::string gen_name_;
  uint64_t gen_size_ = 0;
  uint32_t chunk_size_ = storage::kChunkSize;
  std::unique_ptr<storage::ChunkDigests> digests_;
  int digests_fd_ = -1;
  ChunkCache cache_;
  std::unique_ptr<ChunkArena> arena_;  // the chunks' memory, made with the cache
  uint16_t peer_port_ = 0;
  std::unique_ptr<TrackerClient> tracker_;  // set when peers are on

  // Prefetch: the generation's boot order (its first chunks, as many as
  // fit the cache less kPrefetchHeadroom), fetched kPrefetchBatch chunks
  // per tracker question by kPrefetchThreads threads from the kernel's
  // first read on (not before: a node prefetches while it boots, not
  // while it waits to be switched on).
  static constexpr size_t kPrefetchThreads = 3, kPrefetchBatch = 16;
  static constexpr uint64_t kPrefetchHeadroom = 8 << 20;
  std::vector<uint64_t> order_;
  std::mutex prefetch_mu_;
  size_t prefetch_next_ = 0;  // where in order_ the next batch starts
  std::atomic<bool> kernel_reading_{false};
  std::vector<std::thread> prefetchers_;
  std::atomic<bool> resend_held_{false};  // the tracker restarted: report() says what is held
  // Chunks fetched since the tracker last heard: the next question (or
  // report) says so, and the tracker sends peers here without a wait.
  std::mutex have_mu_;
  std::vector<uint64_t> have_;
  void add_have(uint64_t c) {
    std::lock_guard<std::mutex> g(have_mu_);
    have_.push_back(c);
  }
  std::vector<uint64_t> take_have() {
    std::lock_guard<std::mutex> g(have_mu_);
    return std::exchange(have_, {});
  }
  void give_back_have(std::vector<uint64_t> v) {  // after a failed call
    std::lock_guard<std::mutex> g(have_mu_);
    have_.insert(have_.end(), v.begin(), v.end());
  }
  // --tls require: the generation's peer identity and key, which peers
  // serve and read with (TLS both ways, nothing in plaintext).
  std::optional<Psk> peer_psk_;

  std::mutex peers_mu_;
  std::map<int, std::string> peer_addr_;                    // slot -> HOST:PORT
  std::map<int, std::shared_ptr<NbdClient>> peer_conn_;     // open connections
  std::map<int, Clock::time_point> peer_used_;              // their last use
  static constexpr size_t kMaxPeerConnections = 8;
  std::map<int, Clock::time_point> peer_backoff_;           // failed: not before
  std::map<int, unsigned> peer_late_;  // late answers in a row; kLateInARow: skipped briefly
  static constexpr unsigned kLateInARow = 3;

  std::mutex upload_mu_;
  double upload_tokens_ = 0;
  Clock::time_point upload_at_ = Clock::now();

  std::string last_stats_;  // what write_stats() last wrote (housekeeping's thread)

  KernelBackend kernel_backend_;
  PeerBackend peer_backend_;
  // NBDROOT_FAULT_PEER (tests only): corrupt|hang|hangup|lack|othergen,
  // how this agent misbehaves towards peers.
  std::string fault_;
};

// ---------------------------------------------------------------- kernel side

nbd::Error KernelBackend::read(uint8_t* buf, uint64_t len, uint64_t off, std::string* why) {
  return a_.read(buf, len, off, why);
}
nbd::Error KernelBackend::write(const uint8_t* buf, uint64_t len, uint64_t off, bool fua,
                                std::string* why) {
  return a_.mutate(nbd::kCmdWrite, buf, len, off, fua, why);
}
nbd::Error KernelBackend::flush(std::string* why) { return a_.flush(why); }
nbd::Error KernelBackend::trim(uint64_t len, uint64_t off, bool fua, std::string* why) {
  return a_.mutate(nbd::kCmdTrim, nullptr, len, off, fua, why);
}
nbd::Error KernelBackend::zero(uint64_t len, uint64_t off, bool fua, std::string* why) {
  return a_.mutate(nbd::kCmdWriteZeroes, nullptr, len, off, fua, why);
}
nbd::Error PeerBackend::read(uint8_t* buf, uint64_t len, uint64_t off, std::string* why) {
  return a_.serve_peer(buf, len, off, why);
}

nbd::Error Agent::read_view(uint8_t* buf, uint64_t len, uint64_t off, std::string* why) {
  Result r = view_.call([&](NbdClient& c) { return c.pread(buf, uint32_t(len), off, 0); });
  if (!r.ok()) return to_nbd(r, why);
  stats_.view_read_bytes += len;
  return nbd::kOk;
}

nbd::Error Agent::read(uint8_t* buf, uint64_t len, uint64_t off, std::string* why) {
  if (!chunked_) return read_view(buf, len, off, why);
  if (!kernel_reading_.load(std::memory_order_relaxed) && !kernel_reading_.exchange(true)) {
    std::lock_guard<std::mutex> g(stop_mu_);
    stop_cv_.notify_all();  // the prefetchers wait on it
  }
  std::vector<Piece> plan;
  {
    std::shared_lock<std::shared_mutex> g(dirty_mu_);
    plan = dirty_.plan(off, len, chunk_size_);
  }
  // The chunks this read needs: held, claimed here (to fetch), or being
  // fetched by another request (waited for below, one at a time).
  std::map<uint64_t, ChunkBytes> have;
  std::vector<uint64_t> claimed, others;
  for (const Piece& p : plan) {
    if (p.src != Piece::kChunk || have.count(p.chunk)) continue;
    bool mine = false;
    ChunkBytes d = cache_.get_or_claim(p.chunk, 0, &mine);
    if (d) {
      ++stats_.gen_cache_hits;
      have[p.chunk] = std::move(d);
    } else if (mine) {
      claimed.push_back(p.chunk);
      have[p.chunk] = nullptr;
    } else {
      others.push_back(p.chunk);
      have[p.chunk] = nullptr;
    }
  }
  if (!claimed.empty() && !fetch_chunks(claimed, &have, why)) return nbd::kEIO;
  for (uint64_t c : others)
    if (nbd::Error e = chunk(c, &have[c], why); e != nbd::kOk) return e;
  for (const Piece& p : plan) {
    uint8_t* dst = buf + (p.off - off);
    if (p.src == Piece::kView) {
      if (nbd::Error e = read_view(dst, p.len, p.off, why); e != nbd::kOk) return e;
      continue;
    }
    const ChunkBytes& data = have[p.chunk];
    memcpy(dst, data->data() + (p.off - p.chunk * chunk_size_), p.len);
  }
  return nbd::kOk;
}

// Fetches chunks this thread claimed (in order): one tracker question for
// all, each from its peer if it names one, the rest from the server in
// runs of consecutive chunks. Every claim ends (put or abandon).
bool Agent::fetch_chunks(const std::vector<uint64_t>& chunks, std::map<uint64_t, ChunkBytes>* have,
                         std::string* why) {
  std::vector<int> slots = ask_tracker(chunks);
  std::vector<uint64_t> from_server;
  for (size_t i = 0; i < chunks.size(); ++i) {
    ChunkBytes d = slots[i] > 0 ? fetch_from_peer(chunks[i], slots[i]) : nullptr;
    if (d) {
      cache_.put(chunks[i], d);
      add_have(chunks[i]);
      (*have)[chunks[i]] = std::move(d);
    } else {
      from_server.push_back(chunks[i]);
    }
  }
  // Prefetch batches come in boot order: sorted, neighbours make runs.
  std::sort(from_server.begin(), from_server.end());
  bool ok = true;
  for (size_t i = 0; i < from_server.size();) {
    size_t j = i + 1;
    while (j < from_server.size() && from_server[j] == from_server[j - 1] + 1 &&
           (j - i) * chunk_size_ < (4u << 20))
      ++j;
    std::vector<ChunkBytes> got;
    if (ok) ok = fetch_run_from_server(from_server[i], j - i, &got, why);
    for (size_t k = i; k < j; ++k) {
      if (!ok) {
        cache_.abandon(from_server[k]);
        continue;
      }
      cache_.put(from_server[k], got[k - i]);
      add_have(from_server[k]);
      (*have)[from_server[k]] = got[k - i];
    }
    i = j;
  }
  return ok;
}

nbd::Error Agent::chunk(uint64_t c, ChunkBytes* out, std::string* why) {
  for (;;) {
    bool claimed = false;
    ChunkBytes d = cache_.get_or_claim(c, 10000, &claimed);
    if (d) {
      ++stats_.gen_cache_hits;
      *out = std::move(d);
      return nbd::kOk;
    }
    if (!claimed) continue;  // the fetch we waited for failed: try ourselves
    std::map<uint64_t, ChunkBytes> have;
    if (!fetch_chunks({c}, &have, why)) return nbd::kEIO;
    *out = have[c];
    return nbd::kOk;
  }
}

nbd::Error Agent::mutate(uint16_t type, const uint8_t* buf, uint64_t len, uint64_t off, bool fua,
                         std::string* why) {
  // Marked before the server has it: a read racing the write may then read
  // the view (old or new bytes, both allowed), never a chunk that a later
  // read would keep returning after the write was acknowledged.
  {
    std::unique_lock<std::shared_mutex> g(dirty_mu_);
    dirty_.mark(off, len);
  }
  Result r = view_.call([&](NbdClient& c) {
    switch (type) {
      case nbd::kCmdWrite:
        return c.pwrite(buf, uint32_t(len), off, fua, 0);
      case nbd::kCmdTrim:
        return c.trim(uint32_t(len), off, 0);
      default:
        return c.zero(uint32_t(len), off, 0);
    }
  });
  if (!r.ok()) return to_nbd(r, why);
  if (type == nbd::kCmdWrite) stats_.view_write_bytes += len;
  if (fua && type != nbd::kCmdWrite) return flush(why);
  return nbd::kOk;
}

nbd::Error Agent::flush(std::string* why) {
  Result r = view_.call([&](NbdClient& c) { return c.flush(0); });
  return r.ok() ? nbd::kOk : to_nbd(r, why);
}

// ---------------------------------------------------------------- chunks

bool Agent::fetch_run_from_server(uint64_t first, size_t n, std::vector<ChunkBytes>* out,
                                  std::string* why) {
  const uint64_t off = first * chunk_size_;
  const uint64_t len = std::min<uint64_t>(n * chunk_size_, gen_size_ - off);
  std::unique_ptr<uint8_t[]> buf(new uint8_t[len]);
  Result r = gen_->call([&](NbdClient& cl) { return cl.pread(buf.get(), uint32_t(len), off, 0); });
  if (!r.ok()) {
    *why = "chunks " + std::to_string(first) + ".." + std::to_string(first + n - 1) + " of " +
           gen_name_ + " from the server: " + r.why;
    return false;
  }
  stats_.gen_server_bytes += len;
  for (size_t i = 0; i < n; ++i) {
    const uint64_t at = i * chunk_size_;
    const uint64_t l = std::min<uint64_t>(chunk_size_, len - at);
    std::shared_ptr<Chunk> d = arena_->make(l);
    memcpy(d->data(), buf.get() + at, l);
    out->push_back(std::move(d));
  }
  return true;
}

ChunkBytes Agent::fetch_from_peer(uint64_t c, int slot) {
  std::shared_ptr<NbdClient> conn;
  std::string addr;
  {
    std::lock_guard<std::mutex> g(peers_mu_);
    auto b = peer_backoff_.find(slot);
    if (b != peer_backoff_.end() && Clock::now() < b->second) {
      ++stats_.peer_skipped;
      return nullptr;
    }
    auto a = peer_addr_.find(slot);
    if (a == peer_addr_.end()) return nullptr;
    addr = a->second;
    auto it = peer_conn_.find(slot);
    if (it != peer_conn_.end() && !it->second->broken()) conn = it->second;
  }
  // After a failure the chunk comes from the server. The peer is then
  // skipped: not at all after a "not held" answer or a late one (the
  // connection stays usable, and in a storm a late answer is mostly a peer
  // still fetching the chunk itself) unless kLateInARow came in a row;
  // briefly after a broken connection; for long after a lie (also
  // reported to the tracker).
  enum class Skip { kNo, kBrief, kLong };
  bool first_drop = false;
  auto fail = [&](const std::string& what, Skip skip) {
    spdlog::warn("peer {} (slot {}): chunk {}: {}; reading it from the server{}", addr, slot, c, what,
                 skip == Skip::kLong ? ", and dropping that peer" : "");
    ++stats_.peer_failures;
    if (skip == Skip::kNo) return nullptr;
    std::lock_guard<std::mutex> g(peers_mu_);
    const auto until = Clock::now() + (skip == Skip::kLong ? std::chrono::seconds(600)
                                                           : std::chrono::seconds(1));
    // Several threads may catch the same lie at once: one reports it.
    auto& b = peer_backoff_[slot];
    first_drop = skip == Skip::kLong && b < until - std::chrono::seconds(60);
    b = std::max(b, until);
    if (auto it = peer_conn_.find(slot); it != peer_conn_.end()) {
      it->second->close();
      peer_conn_.erase(it);
    }
    return nullptr;
  };
  if (!conn) {
    Endpoint ep;
    std::string err;
    if (!parse_endpoint(addr, &ep, &err)) return fail("bad address: " + err, Skip::kBrief);
    conn = std::make_shared<NbdClient>();
    if (peer_psk_) conn->use_tls(*peer_psk_);
    if (!conn->connect(ep, gen_name_, {}, o_.peer_timeout_ms, &err)) {
      // A peer that does not take STARTTLS is dropped and reported, never
      // read in plaintext. A failed TLS handshake is only a failure: the
      // key that does not match may be ours.
      if (!conn->starttls_refused()) return fail(err, Skip::kBrief);
      fail(err, Skip::kLong);
      if (first_drop) report(false, slot);
      return nullptr;
    }
    if (conn->size() != gen_size_)
      return fail("it serves " + std::to_string(conn->size()) + " bytes, the generation has " +
                      std::to_string(gen_size_),
                  Skip::kLong);
    std::lock_guard<std::mutex> g(peers_mu_);
    peer_conn_[slot] = conn;
    // Few connections kept: in a storm every node meets many peers, and
    // each peer takes only --upload-connections. The least recently used
    // idle one goes; one in use (a copy held outside this map, taken
    // under peers_mu_) is never closed under its request: then there are
    // more for a while.
    peer_used_[slot] = Clock::now();
    while (peer_conn_.size() > kMaxPeerConnections) {
      auto oldest = peer_used_.end();
      for (auto it = peer_used_.begin(); it != peer_used_.end(); ++it) {
        auto pc = peer_conn_.find(it->first);
        if (it->first != slot && pc != peer_conn_.end() && pc->second.use_count() == 1 &&
            (oldest == peer_used_.end() || it->second < oldest->second))
          oldest = it;
      }
      if (oldest == peer_used_.end()) break;
      peer_conn_[oldest->first]->close();
      peer_conn_.erase(oldest->first);
      peer_used_.erase(oldest);
    }
  }
  {
    std::lock_guard<std::mutex> g(peers_mu_);
    peer_used_[slot] = Clock::now();
  }
  std::shared_ptr<Chunk> buf = arena_->make(chunk_len(c));
  Result r = conn->pread(buf->data(), uint32_t(buf->size()), c * chunk_size_, o_.peer_timeout_ms);
  if (!r.ok()) {
    if (r.kind == Result::kTimeout) ++stats_.peer_timeouts;
    // An error answer is a chunk the peer no longer holds: not a lie.
    if (r.kind == Result::kNbdError) return fail("it does not hold it (" + r.why + ")", Skip::kNo);
    if (r.kind != Result::kTimeout) return fail(r.why, Skip::kBrief);
    unsigned row;
    {
      std::lock_guard<std::mutex> g(peers_mu_);
      row = ++peer_late_[slot];
    }
    return fail(r.why, row >= kLateInARow ? Skip::kBrief : Skip::kNo);
  }
  std::string err;
  auto v = digests_->verify(c, buf->data(), buf->size(), &err);
  if (v != storage::ChunkDigests::Verdict::kMatch) {
    ++stats_.peer_bad_chunks;
    const bool lie = v == storage::ChunkDigests::Verdict::kMismatch;
    fail(lie ? "wrong bytes (SHA-256 mismatch)" : "cannot check it: " + err,
         lie ? Skip::kLong : Skip::kBrief);
    if (lie && first_drop) report(false, slot);
    return nullptr;
  }
  {
    std::lock_guard<std::mutex> g(peers_mu_);
    peer_late_.erase(slot);
  }
  stats_.gen_peer_bytes += buf->size();
  return buf;
}

// Where to get each chunk: a peer's slot, or 0 for the server (also when
// the tracker does not answer: the server is always right).
std::vector<int> Agent::ask_tracker(const std::vector<uint64_t>& chunks) {
  std::vector<int> slots(chunks.size(), 0);
  if (!tracker_) return slots;
  std::vector<int> got;
  std::map<int, std::string> peers;
  std::string err;
  std::vector<uint64_t> have = take_have();
  if (!tracker_->sources(gen_name_, o_.node_name, peer_port_, chunks, have, &got, &peers, &err)) {
    spdlog::debug("{}", err);
    give_back_have(std::move(have));
    return slots;
  }
  {
    std::lock_guard<std::mutex> g(peers_mu_);
    for (auto& [slot, addr] : peers) peer_addr_[slot] = addr;
    for (size_t i = 0; i < chunks.size(); ++i)
      slots[i] = got[i] > 0 && peer_addr_.count(got[i]) ? got[i] : 0;
  }
  catch_up_after_tracker_restart(false);
  return slots;
}

// An answer with a new epoch: the server's tracker restarted and knows
// nothing of this node's chunks, so the next report says what is held.
void Agent::catch_up_after_tracker_restart(bool leaving) {
  if (!tracker_->take_new_epoch()) return;
  resend_held_ = true;
  report(leaving, 0);
}

// The recorded boot order, cut to what the cache holds with headroom for
// the kernel's other reads. Without one (the generation's first boot, an
// old server) nothing is prefetched.
void Agent::load_order() {
  if (!o_.prefetch) return;
  const uint64_t budget = cache_.limit() > kPrefetchHeadroom ? cache_.limit() - kPrefetchHeadroom : 0;
  std::string err;
  if (!tracker_->order(gen_name_, budget / chunk_size_, &order_, &err)) {
    spdlog::info("prefetch off: {}", err);
    order_.clear();
    return;
  }
  for (uint64_t c : order_)
    if (c >= digests_->chunks()) {
      spdlog::warn("prefetch off: the boot order names chunk {}, past the generation's end", c);
      order_.clear();
      return;
    }
  if (order_.empty())
    spdlog::info("prefetch: no boot order recorded for {} yet", gen_name_);
  else
    spdlog::info("prefetch: {} chunks of {}'s boot order, from the kernel's first read on",
                 order_.size(), gen_name_);
}

// Whether every block of chunk c is the node's own (read from the view).
bool Agent::all_dirty(uint64_t c) {
  std::shared_lock<std::shared_mutex> g(dirty_mu_);
  for (const Piece& p : dirty_.plan(c * chunk_size_, chunk_len(c), chunk_size_))
    if (p.src != Piece::kView) return false;
  return true;
}

// One prefetch thread: claims the next batch of chunks in boot order that
// nobody holds or fetches, and fetches it like a kernel read would (one
// tracker question, peers, the server). Stops at the order's end or stop().
void Agent::prefetch() {
  {
    std::unique_lock<std::mutex> lk(stop_mu_);
    stop_cv_.wait(lk, [&] { return stopping_.load() || kernel_reading_.load(); });
  }
  while (!stopping_) {
    std::vector<uint64_t> batch;
    {
      std::lock_guard<std::mutex> g(prefetch_mu_);
      while (prefetch_next_ < order_.size() && batch.size() < kPrefetchBatch) {
        const uint64_t c = order_[prefetch_next_++];
        if (all_dirty(c)) continue;
        bool mine = false;
        ChunkBytes held = cache_.get_or_claim(c, 0, &mine);
        if (mine) batch.push_back(c);
      }
    }
    if (batch.empty()) return;
    std::map<uint64_t, ChunkBytes> have;
    std::string why;
    if (!fetch_chunks(batch, &have, &why)) spdlog::debug("prefetch: {}", why);
    for (const auto& [c, d] : have) stats_.prefetched_chunks += d != nullptr;
  }
}

// Tells the tracker what this node dropped, a bad peer, or that it leaves.
// After the tracker restarted (a new epoch in an answer) it also says what
// it holds, which the new tracker does not know.
void Agent::report(bool leaving, int bad_slot) {
  if (!tracker_) return;
  std::string err;
  std::vector<uint64_t> held = take_have();
  if (resend_held_.exchange(false)) {
    held = cache_.held();
    spdlog::info("tracker: the server's tracker restarted; telling it the {} chunks held here",
                 held.size());
  }
  const bool ok = tracker_->report(gen_name_, o_.node_name, peer_port_, cache_.take_dropped(),
                                   leaving ? std::vector<uint64_t>{} : held, bad_slot, leaving, &err);
  if (!ok) {
    give_back_have(std::move(held));
    spdlog::debug("{}", err);
    return;
  }
  catch_up_after_tracker_restart(leaving);
}

// ---------------------------------------------------------------- peer side

void Agent::throttle_upload(uint64_t bytes) {
  if (!o_.upload_limit) return;
  std::unique_lock<std::mutex> g(upload_mu_);
  auto now = Clock::now();
  double rate = double(o_.upload_limit);
  upload_tokens_ = std::min(rate, upload_tokens_ + rate * std::chrono::duration<double>(now - upload_at_).count());
  upload_at_ = now;
  upload_tokens_ -= double(bytes);
  if (upload_tokens_ < 0) {
    auto wait = std::chrono::duration<double>(-upload_tokens_ / rate);
    g.unlock();
    std::this_thread::sleep_for(wait);
  }
}

nbd::Error Agent::serve_peer(uint8_t* buf, uint64_t len, uint64_t off, std::string* why) {
  // Fault injection (tests): a lying or broken peer.
  if (fault_ == "lack") {
    ++stats_.served_refused;
    *why = "fault injection: claims chunks it lacks";
    return nbd::kEIO;
  }
  if (fault_ == "hang") {
    std::unique_lock<std::mutex> lk(stop_mu_);
    stop_cv_.wait_for(lk, std::chrono::seconds(60), [&] { return stopping_.load(); });
    *why = "fault injection: hung";
    return nbd::kEIO;
  }
  if (fault_ == "othergen") off = std::min(off + chunk_size_, gen_size_ - len);
  const uint64_t end = off + len;
  for (uint64_t pos = off; pos < end;) {
    const uint64_t c = pos / chunk_size_;
    const uint64_t next = std::min(end, (c + 1) * chunk_size_);
    // A chunk on its way here is waited for: the tracker sends a node to
    // whoever is fetching what it needs.
    ChunkBytes d = cache_.get(c, 2000);
    if (!d) {
      ++stats_.served_refused;
      *why = "chunk " + std::to_string(c) + " is not held here";
      return nbd::kEIO;
    }
    memcpy(buf + (pos - off), d->data() + (pos - c * chunk_size_), next - pos);
    pos = next;
  }
  if (fault_ == "corrupt") buf[len / 2] ^= 0x5a;
  throttle_upload(len);
  stats_.served_bytes += len;
  ++stats_.served_chunks;
  return nbd::kOk;
}

// ---------------------------------------------------------------- setup

bool Agent::load_dirty(std::string* err) {
  std::shared_ptr<NbdClient> c = view_.client();
  uint32_t ctx = c ? c->context_id("nbdroot:dirty") : 0;
  if (!ctx) {
    *err = "the server did not agree to the nbdroot:dirty context";
    return false;
  }
  for (uint64_t pos = 0; pos < size_;) {
    uint64_t want = std::min<uint64_t>(size_ - pos, 1u << 30);
    std::vector<nbd::Extent> ex;
    Result r = c->block_status(uint32_t(want), pos, ctx, &ex, 30000);
    if (!r.ok() || ex.empty()) {
      *err = "reading the node's changed blocks: " + (r.ok() ? std::string("no extents") : r.why);
      return false;
    }
    for (const nbd::Extent& e : ex) {
      uint64_t n = std::min<uint64_t>(e.length, size_ - pos);
      if (e.flags & 1) dirty_.mark(pos, n);
      pos += n;
      if (pos >= size_) break;
    }
  }
  return true;
}

bool Agent::setup_generation(std::string* err) {
  auto colon = o_.tracker.rfind(':');
  tracker_ = std::make_unique<TrackerClient>(o_.tracker.substr(0, colon),
                                             std::stoi(o_.tracker.substr(colon + 1)));
  if (o_.psk) tracker_->set_key(o_.psk->key);  // the tls tier: tracker calls are signed
  NodeInfo info;
  if (!tracker_->node_info(o_.exp, &info, err)) return false;
  if (o_.psk && !open_peer_key(info, err)) return false;
  gen_name_ = info.generation;
  gen_size_ = info.size;
  chunk_size_ = info.chunk_size;
  if (gen_size_ != size_) {
    *err = "the server's API says " + gen_name_ + " has " + std::to_string(gen_size_) +
           " bytes, the node's view " + std::to_string(size_);
    return false;
  }
  auto at = gen_name_.find('@');
  if (at == std::string::npos) {
    *err = "bad generation name '" + gen_name_ + "'";
    return false;
  }
  // The digests, kept in memory (a memfd): 32 bytes per chunk.
  std::string body;
  if (!tracker_->digests(gen_name_, &body, err)) return false;
  digests_fd_ = memfd_create("nbdroot-chunks", MFD_CLOEXEC);
  if (digests_fd_ < 0 || ::write(digests_fd_, body.data(), body.size()) != ssize_t(body.size())) {
    *err = std::string("keeping the chunk digests: ") + strerror(errno);
    return false;
  }
  storage::ChunkDigestsId id{gen_size_,
                             storage::generation_tag(gen_name_.substr(0, at), gen_name_.substr(at + 1))};
  digests_ = storage::ChunkDigests::open("/proc/self/fd/" + std::to_string(digests_fd_), id, err);
  if (!digests_) return false;
  if (digests_->chunk_size() != chunk_size_) {
    *err = "the digests' chunk size differs from the tracker's";
    return false;
  }
  arena_ = std::make_unique<ChunkArena>(cache_.limit(), chunk_size_, o_.huge_pages);
  gen_ = std::make_unique<Link>(o_.servers, o_.psk ? &*o_.psk : nullptr, gen_name_,
                                std::vector<std::string>{}, stats_, stopping_);
  if (!gen_->connect_first(Clock::now(), err)) return false;  // one pass: peers are optional
  if (gen_->size() != gen_size_) {
    *err = "the server's " + gen_name_ + " has another size than the node's view";
    return false;
  }
  chunked_ = true;
  return true;
}

// Under --tls require peers need the generation's peer key, which the
// server's answer carries sealed with this node's key.
bool Agent::open_peer_key(const NodeInfo& info, std::string* err) {
  if (info.peer_identity.empty() || info.peer_key_sealed.empty()) {
    *err = "the server's answer for " + o_.exp + " carries no peer key for " + info.generation +
           ", and under --tls require peers are served and read over TLS only (is the server "
           "under --tls require, with a key for node '" + o_.node_name + "'?)";
    return false;
  }
  std::string why;
  std::optional<tls::Key> k =
      tls::unseal(o_.psk->key, tls::peer_key_context(o_.node_name, info.generation),
                  info.peer_key_sealed, &why);
  if (!k) {
    *err = "the server's answer for " + o_.exp + " carries a peer key for " + info.generation +
           " that this node cannot open: " + why;
    return false;
  }
  peer_psk_ = Psk{info.peer_identity, std::move(*k)};  // *k is wiped
  return true;
}

// The peer listener's keys: the generation's peer identity, nothing else
// (not a node's own identity, not another generation's).
tls::KeyLookup Agent::peer_keys() const {
  return [id = peer_psk_->identity, key = peer_psk_->key](
             std::string_view who, std::string* why) -> std::optional<tls::Key> {
    if (who == id) return key;
    *why = "identity " + nbd::quoted(who) + " is not '" + id + "', the peer identity here";
    return std::nullopt;
  };
}

void Agent::write_stats() {
  if (o_.stats_file.empty()) return;
  json j = {{"view_read_bytes", stats_.view_read_bytes.load()},
            {"view_write_bytes", stats_.view_write_bytes.load()},
            {"gen_server_bytes", stats_.gen_server_bytes.load()},
            {"gen_peer_bytes", stats_.gen_peer_bytes.load()},
            {"gen_cache_hits", stats_.gen_cache_hits.load()},
            {"peer_failures", stats_.peer_failures.load()},
            {"peer_bad_chunks", stats_.peer_bad_chunks.load()},
            {"peer_timeouts", stats_.peer_timeouts.load()},
            {"served_bytes", stats_.served_bytes.load()},
            {"served_chunks", stats_.served_chunks.load()},
            {"served_refused", stats_.served_refused.load()},
            {"reconnects", stats_.reconnects.load()},
            {"prefetched_chunks", stats_.prefetched_chunks.load()},
            {"peer_skipped", stats_.peer_skipped.load()},
            {"cache_bytes", cache_.bytes()},
            {"cache_wakeups", cache_.wakeups()},
            {"cache_limit", cache_.limit()},
            {"generation", gen_name_}};
  // An idle agent's counters do not change: no rewrite then (a file, a
  // rename and a directory update every 250 ms, for nothing).
  std::string text = j.dump() + "\n";
  if (text == last_stats_) return;
  std::string tmp = o_.stats_file + ".tmp";
  {
    std::ofstream f(tmp);
    f << text;
  }
  ::rename(tmp.c_str(), o_.stats_file.c_str());
  last_stats_ = std::move(text);
}

void Agent::housekeeping() {
  auto last_report = Clock::now();
  std::unique_lock<std::mutex> lk(stop_mu_);
  while (!stopping_) {
    stop_cv_.wait_for(lk, std::chrono::milliseconds(250));
    lk.unlock();
    write_stats();
    if (chunked_ && Clock::now() - last_report > std::chrono::seconds(5)) {
      report(false, 0);
      last_report = Clock::now();
    }
    lk.lock();
  }
}

int Agent::run() {
  std::string err;
  const Clock::time_point give_up = o_.attach_timeout > 0
                                        ? Clock::now() + std::chrono::seconds(o_.attach_timeout)
                                        : Clock::time_point::max();
  if (!view_.connect_first(give_up, &err)) {
    if (stopping_) {
      spdlog::info("stopping: '{}' was never attached", o_.exp);
      return 0;
    }
    spdlog::error("cannot attach '{}': {}{}", o_.exp, err,
                  Clock::now() >= give_up
                      ? fmt::format(" (given up after --attach-timeout {} s)", o_.attach_timeout)
                      : "");
    return 1;
  }
  size_ = view_.size();
  if (!load_dirty(&err)) {
    spdlog::error("'{}': {}", o_.exp, err);
    return 1;
  }
  spdlog::info("node view '{}': {} bytes, {} blocks changed", o_.exp, size_, dirty_.count());

  auto kinfo = std::make_shared<nbd::ExportInfo>();
  kinfo->name = o_.exp;
  kinfo->description = "node agent for " + o_.exp;
  kinfo->size = size_;
  kinfo->flags = nbd::kFlagSendFlush | nbd::kFlagSendFua | nbd::kFlagSendTrim |
                 nbd::kFlagSendWriteZeroes | nbd::kFlagCanMultiConn;
  kinfo->max_block = 32 << 20;
  FixedCatalog kcat(kinfo, {"", o_.exp}, "this agent serves only the node's root");
  ServiceOptions kopts;
  kopts.what = "kernel";
  kopts.workers = 32;
  Service kernel(kcat, [&](const nbd::ExportInfo&) -> Backend* { return &kernel_backend_; }, kopts);

  std::unique_ptr<Service> peers;
  std::unique_ptr<FixedCatalog> pcat;
  if (o_.peers && o_.cache && !o_.tracker.empty()) {
    if (!setup_generation(&err)) {
      spdlog::warn("peers off: {}", err);
    } else {
      auto pinfo = std::make_shared<nbd::ExportInfo>();
      pinfo->name = gen_name_;
      pinfo->description = "chunks of " + gen_name_ + " held by node " + o_.node_name;
      pinfo->size = gen_size_;
      pinfo->flags = nbd::kFlagReadOnly;
      pinfo->max_block = chunk_size_ * 16;
      pcat = std::make_unique<FixedCatalog>(
          pinfo, std::vector<std::string>{gen_name_},
          "this node serves only its generation " + gen_name_);
      ServiceOptions popts;
      popts.what = "peers";
      popts.max_connections = o_.upload_connections;
      // A request for a chunk still on its way here holds its worker while
      // it waits (up to 2 s): in a storm, a node's children in the
      // tracker's trees wait on it for several chunks at once.
      popts.workers = 32;
      popts.idle_timeout = 30;
      popts.fault_hangup_mid_reply = fault_ == "hangup";
      if (peer_psk_) popts.tls_keys = peer_keys();
      peers = std::make_unique<Service>(
          *pcat, [&](const nbd::ExportInfo&) -> Backend* { return &peer_backend_; }, popts);
      if (!peers->listen_tcp(o_.peer_listen, &err)) {
        spdlog::error("{}", err);
        return 1;
      }
      peer_port_ = uint16_t(std::stoi(peers->address().substr(peers->address().rfind(':') + 1)));
      load_order();
      spdlog::info("peers: serving chunks of {} on {}{} (cache {} MiB, {} chunks of {} KiB)",
                   gen_name_, peers->address(),
                   peer_psk_ ? " over TLS only, as '" + peer_psk_->identity + "'" : "",
                   o_.cache >> 20, digests_->chunks(), chunk_size_ >> 10);
    }
  } else if (o_.peers && o_.tracker.empty()) {
    spdlog::info("peers off: no --tracker");
  }

  if (!kernel.listen_unix(o_.socket, &err)) {
    spdlog::error("{}", err);
    return 1;
  }
  kernel.start();
  if (peers) peers->start();
  if (peers && !order_.empty())
    for (size_t i = 0; i < kPrefetchThreads; ++i) prefetchers_.emplace_back([this] { prefetch(); });
  write_stats();  // there from the start, for whoever waits on the ready file
  if (!o_.ready_file.empty()) {
    std::ofstream f(o_.ready_file + ".tmp");
    f << "unix " << kernel.address() << "\n";
    if (peers) f << "peer " << peers->address() << "\n";
    f.close();
    ::rename((o_.ready_file + ".tmp").c_str(), o_.ready_file.c_str());
  }
  spdlog::info("serving '{}' to the kernel on {}", o_.exp, kernel.address());
  housekeeping();  // until stop()
  spdlog::info("stopping");
  stop();  // wakes whatever waits on stop_cv_
  for (std::thread& t : prefetchers_) t.join();
  if (peers) peers->stop();
  if (chunked_) report(true, 0);
  kernel.stop();
  view_.close();
  if (gen_) gen_->close();
  write_stats();
  return 0;
}

Agent* g_agent = nullptr;

void on_signal(int) {
  if (g_agent) g_agent->request_stop();  // an atomic store: signal-safe
}

}  // namespace

int run_agent(int argc, char** argv) {
  Options o;
  std::string servers, cache = "64M", upload = "0", peers = "on", prefetch = "on", huge = "off", tls = "off",
              key_file;
  po::options_description desc(
      "nbdserver node: the node agent. Serves the node's root to its kernel on a Unix socket\n"
      "(nbd-client -unix PATH), keeps the node's view on the server, reads clean blocks from\n"
      "peers or the server, and serves the chunks it holds to peers.\n\n"
      "Usage: nbdserver node --server HOST:PORT[,HOST:PORT...] --export IMAGE/NODE --socket PATH [options]\n\nOptions");
  desc.add_options()("help,h", "this help")(
      "server", po::value(&servers)->required(), "NBD server(s), HOST:PORT or unix:PATH, comma-separated")(
      "export", po::value(&o.exp)->required(), "the node's view, IMAGE/NODE")(
      "mode", po::value(&o.mode), "persistent|ephemeral: the mode of a node this attach creates")(
      "tls", po::value(&tls)->default_value(tls),
      "off|require: every connection to the server over TLS (STARTTLS, the node's key)")(
      "tls-key-file", po::value(&key_file), "the node's key: one line NODE:HEX (psktool), mode 0600")(
      "attach-timeout", po::value(&o.attach_timeout)->default_value(o.attach_timeout),
      "seconds to keep trying the first attach; 0: until stopped. Connection errors, TLS\n"
      "failures (the server may have the node's key a moment later) and a server shutting\n"
      "down are retried, 0.2 s doubling to 5 s between passes over the servers; a refusal\n"
      "(no such export, not this node's) ends it at once. 0 because the initrd's key comes\n"
      "once per arming: an agent that gave up would lose it, and the boot with it")(
      "socket", po::value(&o.socket)->required(), "Unix socket for the kernel's nbd-client")(
      "tracker", po::value(&o.tracker), "the server's HTTP API (HOST:PORT); peers need it")(
      "peer-listen", po::value(&o.peer_listen)->default_value(o.peer_listen), "where peers connect")(
      "peers", po::value(&peers)->default_value(peers), "on|off: read from and serve to peers")(
      "cache", po::value(&cache)->default_value(cache), "chunk cache size (0: no peer serving)")(
      "upload-limit", po::value(&upload)->default_value(upload), "bytes/s served to peers (0: no limit)")(
      "upload-connections", po::value(&o.upload_connections)->default_value(o.upload_connections),
      "peer connections at once")(
      "peer-timeout-ms", po::value(&o.peer_timeout_ms)->default_value(o.peer_timeout_ms),
      "a peer slower than this is skipped for the server")(
      "prefetch", po::value(&prefetch)->default_value(prefetch),
      "on|off: fetch the generation's recorded boot order ahead of the kernel (peers on)")(
      "huge-pages", po::value(&huge)->default_value(huge),
      "on|off: the chunk cache's memory in transparent huge pages (one fault per 2 MiB "
      "instead of 512); off by default: a fresh huge page is dear where the host takes freed "
      "memory back (VMs), and 4 KiB pages cost little elsewhere")(
      "ready-file", po::value(&o.ready_file), "written once serving: 'unix PATH' and 'peer HOST:PORT'")(
      "stats-file", po::value(&o.stats_file), "counters as JSON, rewritten every 250 ms when they changed")(
      "log-level", po::value(&o.log_level)->default_value(o.log_level), "trace|debug|info|warn|error");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, desc), vm);
    if (vm.count("help")) {
      std::cout << desc << "\n";
      return 0;
    }
    po::notify(vm);
  } catch (const std::exception& e) {
    std::cerr << "nbdserver node: " << e.what() << "\n" << desc << "\n";
    return 2;
  }
  auto bad = [](const std::string& m) {
    std::cerr << "nbdserver node: " << m << "\n";
    return 2;
  };
  for (size_t pos = 0; pos <= servers.size();) {
    size_t comma = servers.find(',', pos);
    if (comma == std::string::npos) comma = servers.size();
    Endpoint ep;
    std::string err;
    if (!parse_endpoint(servers.substr(pos, comma - pos), &ep, &err)) return bad("--server: " + err);
    o.servers.push_back(ep);
    pos = comma + 1;
  }
  auto slash = o.exp.find('/');
  if (slash == std::string::npos || slash == 0 || slash + 1 == o.exp.size() ||
      o.exp.find_first_of("?@", 0) != std::string::npos)
    return bad("--export must be IMAGE/NODE, got '" + o.exp + "'");
  o.image = o.exp.substr(0, slash);
  o.node_name = o.exp.substr(slash + 1);
  if (!o.mode.empty() && o.mode != "persistent" && o.mode != "ephemeral")
    return bad("--mode must be persistent or ephemeral, got '" + o.mode + "'");
  if (tls != "off" && tls != "require") return bad("--tls must be off or require, got '" + tls + "'");
  if (tls == "off" && !key_file.empty()) return bad("--tls-key-file is for --tls require");
  if (tls == "require") {
    if (key_file.empty())
      return bad("--tls require needs --tls-key-file FILE (the node's key: NODE:HEX, mode 0600)");
    std::string err;
    o.psk = read_psk_file(key_file, &err);
    if (!o.psk) return bad("--tls-key-file " + key_file + ": " + err);
    if (o.psk->identity != o.node_name)
      return bad("--tls-key-file " + key_file + ": the key is for node '" + o.psk->identity +
                 "', and --export names node '" + o.node_name + "'");
  }
  // Boost reads "-1" into an unsigned option as its largest value: the
  // bounds below catch that too.
  if (o.attach_timeout > 366u * 86400)
    return bad("--attach-timeout must be at most 31622400 seconds (0: keep trying)");
  if (o.upload_connections < 1 || o.upload_connections > 65536)
    return bad("--upload-connections must be 1 to 65536");
  if (o.peer_timeout_ms < 1 || o.peer_timeout_ms > 600000)
    return bad("--peer-timeout-ms must be 1 to 600000");
  for (auto [flag, text, out] : {std::tuple{"peers", &peers, &o.peers},
                                 std::tuple{"prefetch", &prefetch, &o.prefetch},
                                 std::tuple{"huge-pages", &huge, &o.huge_pages}}) {
    if (*text != "on" && *text != "off")
      return bad(std::string("--") + flag + " must be on or off, got '" + *text + "'");
    *out = *text == "on";
  }
  if (!parse_size(cache, &o.cache)) return bad("--cache: not a size: '" + cache + "'");
  if (!parse_size(upload, &o.upload_limit)) return bad("--upload-limit: not a size: '" + upload + "'");
  if (!o.tracker.empty()) {
    Endpoint ep;
    std::string err;
    if (!parse_endpoint(o.tracker, &ep, &err) || !ep.unix_path.empty() || ep.port == 0)
      return bad("--tracker must be HOST:PORT, got '" + o.tracker + "'" +
                 (err.empty() ? "" : ": " + err));
  }

  auto logger = spdlog::stderr_color_mt("nbdserver-node");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");
  spdlog::set_level(spdlog::level::from_str(o.log_level));

  // In the root device's I/O path: never wait on that device's writeback
  // for memory, and never have our own pages paged out to it.
  if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0)
    spdlog::warn("PR_SET_IO_FLUSHER: {} (needs CAP_SYS_RESOURCE)", strerror(errno));
  // Request buffers (up to a few MiB) come from the heap and are reused,
  // not mapped and unmapped (and faulted in, locked) for every request.
  mallopt(M_MMAP_THRESHOLD, 8 << 20);
  mallopt(M_TRIM_THRESHOLD, 32 << 20);
  if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0)
    spdlog::warn("mlockall: {}", strerror(errno));

  signal(SIGPIPE, SIG_IGN);
  Agent agent(std::move(o));
  g_agent = &agent;
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  int rc = agent.run();
  g_agent = nullptr;
  return rc;
}

}  // namespace node
