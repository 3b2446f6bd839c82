// What the server and its nodes are doing, for people and for Prometheus
// (issue 12), read-only:
//   GET /metrics   Prometheus text exposition (format 0.0.4), every name nbdroot_
//   GET /status    the same as JSON: the server and every node
//   GET /          a page for people that polls /status (http/status_page.cpp)
//
// A node's line joins three sources: the store (node.json, the size of its
// diff on disk), its lifecycle record and latest verification report
// (lifecycle/), and the NBD side's counters (exports/stats.hpp), which
// start at zero with each server start. Every call reads the store afresh
// (node records are cached by the store while unchanged), so a node an
// admin moves shows at the next poll. Nothing here writes anything.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "exports/stats.hpp"
#include "exports/store.hpp"
#include "http/server.hpp"
#include "lifecycle/lifecycle.hpp"

namespace http {

// One node as /status and /metrics show it.
struct NodeStatus {
  std::string node, state, reason, since;
  std::string image, generation, mode;
  int64_t dirty_bytes = 0;
  std::string dirty_source;  // "map" (attached: its block map), "disk" (the diff's blocks), "none"
  int64_t last_seen = 0;     // unix seconds; 0: never seen
  int64_t connections = 0;
  uint64_t boots = 0, read_bytes = 0, written_bytes = 0, errors = 0;
  uint64_t boot_scripts = 0;  // boot scripts served (lifecycle record)
  // The latest verification report, when the node has one.
  bool verified = false;
  std::string run, status, summary, finished;
};

struct StatusSnapshot {
  int64_t now = 0;
  std::vector<NodeStatus> nodes;  // sorted by node id
  std::vector<std::string> problems;  // records that could not be read
  // Stored verification reports by overall status (every run of every node).
  std::vector<std::pair<std::string, uint64_t>> verifications;
};

// Escapes a Prometheus label value: backslash, double quote and newline.
std::string prometheus_label(const std::string& v);
// The exposition of a snapshot. `server` holds the NBD side's totals.
std::string render_metrics(const StatusSnapshot& s, const exports::ServerCounters& server,
                           int64_t started);
nlohmann::json render_status(const StatusSnapshot& s, const exports::ServerCounters& server,
                             int64_t started);
// The page served at GET / (self-contained: inline CSS and script).
const std::string& status_page();

// Adds the endpoints to `svr`. `life` may be null (every node with a
// record is then "ready", as the lifecycle reads a node without state.json).
void add_status_api(httplib::Server& svr, std::shared_ptr<exports::Store> store,
                    std::shared_ptr<const exports::Stats> stats,
                    std::shared_ptr<const lifecycle::Lifecycle> life);

}  // namespace http
