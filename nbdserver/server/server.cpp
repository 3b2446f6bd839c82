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
#include "server/listen.hpp"
#include "server/loop.hpp"

namespace server {
namespace {

// Lets many connections in: raise the soft descriptor limit to the hard one.
void raise_fd_limit() {
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

bool write_ready_file(const std::string& path, const std::vector<Listener>& ls) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    for (const Listener& l : ls) out << l.address << "\n";
    if (!out.flush()) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

}  // namespace

int run_server(const ServerOptions& opts) {
  raise_fd_limit();
  // A ready file left by a killed server must not announce this one early.
  if (!opts.ready_file.empty()) unlink(opts.ready_file.c_str());
  exports::Registry registry;
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
  if (!opts.store.empty()) {
    auto store = std::make_shared<exports::Store>(opts.store, opts.store_opts);
    std::string err;
    if (!store->check(&err)) {
      spdlog::error("{}", err);
      return 1;
    }
    registry.set_store(store);
    spdlog::info("store {}: exports IMAGE, IMAGE@GEN and IMAGE/NODE (nodes: {}, new nodes {})",
                 opts.store, opts.store_opts.nodes == exports::NodePolicy::kAuto ? "auto" : "registered",
                 storage::mode_name(opts.store_opts.mode));
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

  Shared shared{opts, registry, listeners};
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
  std::vector<std::thread> threads;
  for (auto& l : loops) threads.emplace_back([&l] { l->run(); });

  for (const Listener& l : listeners) spdlog::info("listening on {}", l.address);
  if (!opts.ready_file.empty() && !write_ready_file(opts.ready_file, listeners))
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
