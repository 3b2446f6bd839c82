// The node lifecycle over HTTP (issue 12; docs/nbdserver.md "Boot scripts,
// reports and heartbeats"):
//   GET  /boot/<node>.ipxe[?uuid=&serial=&platform=&mac=]  the script for the node's state
//   POST /nodes/<node>/report      a verification report (lifecycle/report.hpp); 201
//   POST /nodes/<node>/heartbeat   {"run","step","progress"} while a run is under way; 204
// and the sweeper, a thread that fails nodes whose deadline passed.
//
// A script is nodes/<node>/boot.ipxe when that file exists, served as it
// is; else templates/<state>.ipxe rendered (http/boot_template.hpp). The
// node's state changes through lifecycle::Lifecycle only; reports are
// stored with lifecycle::store_report. Nothing here touches a node's view.
// Under --tls require, a rendered script may carry the node's key once an
// admin armed it, and only once per arming (storage/node_keys.hpp).
//
// Threads: handlers run on the HTTP pool; reports for one node are
// handled one at a time (a mutex per node), so two never interleave.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "exports/store.hpp"
#include "http/server.hpp"
#include "lifecycle/lifecycle.hpp"

namespace http {

struct BootOptions {
  // --advertise HOST[:PORT]: the server's name in scripts; "" = the Host
  // header of each request (checked with parse_host_header).
  std::string advertise;
  // The NBD listener's port (the first --listen); "" when there is no TCP
  // listener (then {{nbd}} and {{cmdline}} have no value).
  std::string nbd_port;
  // --boot-image: what nodes without a node.json boot; "" = the store's
  // only image.
  std::string boot_image;
  // --boot-cmdline, normalised (normalize_cmdline): for every node.
  std::string boot_cmdline;
  // --tls require: {{tls_args}} asks nodes for TLS and carries a node's key
  // once an admin armed it (storage/node_keys.hpp); off: it is empty.
  bool tls_require = false;
};

// Adds the endpoints. `store` and `life` are shared with the NBD side.
void add_boot_api(httplib::Server& svr, std::shared_ptr<exports::Store> store,
                  std::shared_ptr<lifecycle::Lifecycle> life, BootOptions opts);

// Calls Lifecycle::sweep(now) every `interval_ms` on a thread of its own,
// logging every node it fails, from start() until stop() (or destruction).
class DeadlineSweeper {
 public:
  explicit DeadlineSweeper(std::shared_ptr<lifecycle::Lifecycle> life, int interval_ms = 1000);
  ~DeadlineSweeper();
  DeadlineSweeper(const DeadlineSweeper&) = delete;
  DeadlineSweeper& operator=(const DeadlineSweeper&) = delete;
  void start();
  void stop();  // wakes the thread and joins it; safe to call twice

 private:
  void run();
  std::shared_ptr<lifecycle::Lifecycle> life_;
  int interval_ms_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace http
