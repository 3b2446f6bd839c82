#include "server/server.hpp"

#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <thread>

#include "exports/registry.hpp"
#include "http/files_api.hpp"
#include "http/boot_api.hpp"
#include "http/boot_template.hpp"
#include "http/server.hpp"
#include "http/status_api.hpp"
#include "http/store_api.hpp"
#include "http/tracker_api.hpp"
#include "lifecycle/lifecycle.hpp"
#include "lifecycle/parsers.hpp"
#include "lifecycle/report.hpp"
#include "tracker/tracker.hpp"
#include "server/attach_pool.hpp"
#include "server/listen.hpp"
#include "server/loop.hpp"
#include "server/tls_keys.hpp"

namespace server {
namespace {

// Attach threads: a node's attach runs under the store's lock, so more
// threads would mostly wait for it; two let a node's state check and
// file reads overlap another node's creation.
constexpr unsigned kAttachThreads = 2;

// Lets many connections in: raise the soft descriptor limit to the hard one.
void raise_fd_limit() {
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

// One line per NBD listener ("HOST:PORT" or a socket path), then
// "http://HOST:PORT" for the HTTP API when there is one.
bool write_ready_file(const std::string& path, const std::vector<Listener>& ls,
                      const std::string& http_address) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    for (const Listener& l : ls) out << l.address << "\n";
    if (!http_address.empty()) out << "http://" << http_address << "\n";
    if (!out.flush()) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

// What the tracker did, per generation, for the log at exit.
void log_tracker(tracker::Tracker& t) {
  for (const auto& [gen, st] : t.stats()) {
    uint64_t live = 0;
    for (const tracker::PeerStats& p : st.peers) live += p.live;
    spdlog::info("tracker {}: {} peers ({} live), chunks named from the server {}, from peers {}, "
                 "{} quarantines, {} expired",
                 gen, st.peers.size(), live, st.server_answers, st.peer_answers, st.quarantines,
                 st.expired);
  }
}

// The port of the first TCP listener, for the NBD address in boot scripts;
// "" when there is none.
std::string nbd_port(const std::vector<Listener>& ls) {
  for (const Listener& l : ls)
    if (!l.address.empty() && l.address[0] != '/') return l.address.substr(l.address.rfind(':') + 1);
  return "";
}

}  // namespace

int run_server(const ServerOptions& opts) {
  raise_fd_limit();
  // A ready file left by a killed server must not announce this one early.
  if (!opts.ready_file.empty()) unlink(opts.ready_file.c_str());
  // Say plainly what the tier does and does not do.
  TlsKeys tls_keys;
  if (opts.tls_required) {
    std::string kerr;
    if (!tls_keys.load(opts.store, opts.tls_psk_file, &kerr)) {
      spdlog::error("{}", kerr);
      return 2;
    }
    spdlog::info("security tier 'tls': every client must STARTTLS and prove a pre-shared key "
                 "(TLS 1.3); IMAGE/NODE opens only for the identity NODE, generations for any "
                 "authenticated identity. See docs/security.md");
  } else {
    spdlog::warn("security tier 'lab': no authentication and no encryption. Any host that "
                 "reaches the NBD port can read or write any node's view by naming it. The lab "
                 "tier only guards against accidents (one writer per view, optional address "
                 "pinning, canonical export names); anyone on the LAN can spoof an address. "
                 "See docs/security.md");
  }
  exports::Registry registry;
  registry.set_tls_required(opts.tls_required);
  for (const exports::ExportSpec& spec : opts.exports) {
    std::string err;
    if (!registry.add(spec, opts.max_block, opts.threads, &err)) {
      spdlog::error("{}", err);
      return 1;
    }
    auto info = registry.find(spec.name);
    spdlog::info("export '{}': {} ({} bytes, {})", spec.name, spec.path, info->size,
                 spec.read_only ? "read-only" : "writable");
  }
  registry.set_max_block(opts.max_block);
  auto stats = std::make_shared<exports::Stats>();
  registry.set_stats(stats);
  std::shared_ptr<exports::Store> store;
  // Node states: the NBD side asks it whether a node may attach, the HTTP
  // modules (boot scripts, reports, heartbeats, status) drive it.
  std::shared_ptr<lifecycle::Lifecycle> life;
  if (!opts.store.empty()) {
    store = std::make_shared<exports::Store>(opts.store, opts.store_opts);
    std::string err;
    if (!store->check(&err)) {
      spdlog::error("{}", err);
      return 1;
    }
    life = std::make_shared<lifecycle::Lifecycle>(opts.store, opts.new_nodes, opts.deadlines);
    // nodes/<node>/memtest86.log (a console server's capture) gives the
    // memtest86+ step its verdict; without one it is "ran, result unknown".
    life->set_memtest_log_reader(lifecycle::memtest86_log_verdict);
    store->set_lifecycle(life);
    registry.set_store(store);
    spdlog::info("store {}: exports IMAGE, IMAGE@GEN and IMAGE/NODE (nodes: {}, new nodes {})",
                 opts.store, opts.store_opts.nodes == exports::NodePolicy::kAuto ? "auto" : "registered",
                 storage::mode_name(opts.store_opts.mode));
    const char* policies[] = {"ready", "verify", "refuse"};
    spdlog::info("lifecycle: unknown nodes {}; verification runs {} s, heartbeats every {} s at "
                 "most, memtest86+ step {}",
                 policies[int(opts.new_nodes)], opts.deadlines.verify_s,
                 opts.deadlines.heartbeat_s,
                 opts.deadlines.memtest_s ? std::to_string(opts.deadlines.memtest_s) + " s" : "off");
  }
  if (!opts.default_export.empty()) {
    std::string err;
    if (!registry.set_default(opts.default_export, &err)) {
      spdlog::error("{}", err);
      return 1;
    }
  }

  // Block the signals we handle before any thread starts, so that only the
  // main thread's sigwait sees them.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  std::vector<Listener> listeners;
  std::string err;
  if (!open_listeners(opts, &listeners, &err)) {
    spdlog::error("{}", err);
    close_listeners(&listeners);
    return 1;
  }

  Shared shared{opts, registry, listeners, *stats};
  if (opts.tls_required) shared.tls_keys = &tls_keys;
  std::vector<std::unique_ptr<Loop>> loops;
  for (unsigned i = 0; i < opts.threads; ++i) {
    loops.push_back(std::make_unique<Loop>(shared, i));
    if (!loops.back()->init(&err)) {
      spdlog::error("{}", err);
      close_listeners(&listeners);
      return 1;
    }
  }
  for (auto& l : loops) shared.loops.push_back(l.get());
  // Declared after the loops, so it is joined before they go. The loops
  // wait for every attach they posted before they stop.
  std::unique_ptr<AttachPool> attach_pool;
  if (!opts.store.empty()) {
    attach_pool = std::make_unique<AttachPool>(kAttachThreads);
    shared.attach_pool = attach_pool.get();
  }
  std::vector<std::thread> threads;
  for (auto& l : loops) threads.emplace_back([&l] { l->run(); });
  // A start that fails once the loops run: stops them, and exits 1.
  auto stop_loops_after = [&](const std::string& why) {
    spdlog::error("{}", why);
    shared.stopping = true;
    for (auto& l : loops) l->wake();
    for (auto& t : threads) t.join();
    close_listeners(&listeners);
    return 1;
  };

  // The HTTP API, on its own threads; started after the signals are blocked
  // so that they inherit the mask.
  std::unique_ptr<http::Server> http_server;
  std::shared_ptr<tracker::Tracker> peer_tracker;
  std::string http_address;
  std::unique_ptr<http::DeadlineSweeper> sweeper;
  if (!opts.http_listen.empty()) {
    http::HttpOptions ho;
    ho.listen = opts.http_listen;
    // Verification reports, logs included, are the largest bodies; each
    // endpoint caps its own below this.
    ho.payload_max = lifecycle::kReportMaxBytes;
    http_server = std::make_unique<http::Server>(ho);
    tracker::SwarmLimits limits;
    limits.peer_timeout = opts.peer_timeout;
    peer_tracker = std::make_shared<tracker::Tracker>(limits, opts.store + "/tracker");
    peer_tracker->start_saving(std::chrono::seconds(2));
    http::add_store_api(http_server->routes(), store, opts.tls_required);
    http::add_files_api(http_server->routes(), store);
    http::add_tracker_api(http_server->routes(), store, peer_tracker, opts.tls_required);
    std::vector<std::string> written;
    if (!http::install_default_templates(opts.store, &written, &err)) {
      return stop_loops_after(err);
    }
    for (const std::string& w : written) spdlog::info("wrote the default boot script template {}", w);
    http::BootOptions bo;
    bo.advertise = opts.advertise;
    bo.nbd_port = nbd_port(listeners);
    bo.boot_image = opts.boot_image;
    bo.boot_cmdline = opts.boot_cmdline;
    bo.tls_require = opts.tls_required;
    http::add_boot_api(http_server->routes(), store, life, bo);
    http::add_status_api(http_server->routes(), store, stats, life);
    if (!http_server->start(&http_address, &err)) {
      return stop_loops_after(err);
    }
    spdlog::info("HTTP API on {} (peer tracker: peers expire after {} s)", http_address,
                 opts.peer_timeout);
    sweeper = std::make_unique<http::DeadlineSweeper>(life);
    sweeper->start();
  }

  for (const Listener& l : listeners) spdlog::info("listening on {}", l.address);
  if (!opts.ready_file.empty() && !write_ready_file(opts.ready_file, listeners, http_address))
    spdlog::warn("cannot write the ready file {}", opts.ready_file);
  sd_notify(0, "READY=1");

  for (;;) {
    int sig = 0;
    sigwait(&sigs, &sig);
    if (sig == SIGHUP) {
      spdlog::info("SIGHUP: nothing to reload: --export entries are fixed at start, and the "
                   "store's current generations are read at each attach");
      continue;
    }
    if (!shared.failed)
      spdlog::info("{}: finishing in-flight requests, then exiting", strsignal(sig));
    break;
  }
  sd_notify(0, "STOPPING=1");
  if (http_server) http_server->stop();
  if (sweeper) sweeper->stop();
  if (peer_tracker) {
    peer_tracker->stop_saving();
    log_tracker(*peer_tracker);
  }
  shared.stopping = true;
  for (auto& l : loops) l->wake();
  for (auto& t : threads) t.join();
  close_listeners(&listeners);
  if (!opts.ready_file.empty()) unlink(opts.ready_file.c_str());
  if (shared.failed) {
    spdlog::error("stopped after an event loop failed");
    return 1;
  }
  spdlog::info("stopped");
  return 0;
}

}  // namespace server
