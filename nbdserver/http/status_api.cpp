#include "http/status_api.hpp"

#include <dirent.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <ctime>
#include <map>
#include <mutex>
#include <set>

#include "lifecycle/report.hpp"
#include "storage/json_file.hpp"
#include "storage/layer_file.hpp"

#ifndef NBDROOT_VERSION
#define NBDROOT_VERSION "unknown"
#endif

namespace http {
namespace {

constexpr std::array<const char*, 5> kStates = {"new", "verify", "ready", "failed", "retired"};
constexpr std::array<const char*, 5> kReportStatuses = {"passed", "failed", "degraded",
                                                        "timedout", "skipped"};

// "2026-12-04T20:14:36Z" -> unix seconds; 0 when it is not that form.
int64_t parse_iso8601(const std::string& s) {
  std::tm tm{};
  const char* end = strptime(s.c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm);
  if (!end || *end) return 0;
  return int64_t(timegm(&tm));
}

// Bytes the node's diff holds on disk, from its allocated blocks (cheap:
// one stat), less the trailer. Sparse: trimmed and never-written blocks
// take no space; a filesystem may allocate a little more than was written.
bool disk_dirty_bytes(const exports::Store& store, const exports::NodeRecord& r, int64_t* out) {
  struct stat st;
  if (stat((store.layer_prefix(r) + ".diff").c_str(), &st) != 0) return false;
  *out = std::max<int64_t>(0, int64_t(st.st_blocks) * 512 - storage::kDiffTrailerSize);
  return true;
}

std::string str_field(const nlohmann::json& j, const char* k) {
  return j.is_object() && j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : "";
}

// Stored reports by overall status. Reports never change once stored
// (nodes/<node>/reports/<run>.json), so each is read once and remembered.
class ReportCounts {
 public:
  std::vector<std::pair<std::string, uint64_t>> count(const exports::Store& store,
                                                      const std::vector<std::string>& nodes) {
    std::map<std::string, uint64_t> by_status;
    for (const char* s : kReportStatuses) by_status[s] = 0;
    std::lock_guard<std::mutex> g(mu_);
    for (const std::string& node : nodes) {
      const std::string dir = store.node_dir(node) + "/reports";
      DIR* d = opendir(dir.c_str());
      if (!d) continue;
      while (dirent* e = readdir(d)) {
        const std::string name = e->d_name;
        if (name.size() <= 5 || name.compare(name.size() - 5, 5, ".json") != 0) continue;
        const std::string path = dir + "/" + name;
        auto it = seen_.find(path);
        if (it == seen_.end()) {
          nlohmann::json j;
          std::string err;
          if (!storage::read_json_object(path, &j, &err)) continue;  // being written, or bad
          it = seen_.emplace(path, str_field(j, "status")).first;
        }
        if (by_status.count(it->second)) ++by_status[it->second];
      }
      closedir(d);
    }
    return {by_status.begin(), by_status.end()};
  }

 private:
  std::mutex mu_;
  std::map<std::string, std::string> seen_;  // report path -> its status
};

struct Context {
  std::shared_ptr<exports::Store> store;
  std::shared_ptr<const exports::Stats> stats;
  std::shared_ptr<const lifecycle::Lifecycle> life;
  int64_t started = 0;
  ReportCounts reports;
};

void add_counters(NodeStatus* n, const exports::NodeCounters& c, int64_t now) {
  auto get = [](const auto& a) { return a.load(std::memory_order_relaxed); };
  n->boots = get(c.boots);
  n->read_bytes = get(c.read_bytes);
  n->written_bytes = get(c.written_bytes);
  n->errors = get(c.errors);
  n->connections = std::max<int64_t>(0, get(c.connections));
  n->last_seen = std::max(n->last_seen, get(c.last_attach));
  if (n->connections > 0) n->last_seen = now;  // attached: seen now
  const int64_t dirty = get(c.dirty_bytes);
  if (dirty >= 0 && n->connections > 0) {
    n->dirty_bytes = dirty;
    n->dirty_source = "map";
  }
}

void add_verification(NodeStatus* n, const std::string& root, std::vector<std::string>* problems) {
  std::string err;
  std::optional<nlohmann::json> doc = lifecycle::latest_report(root, n->node, &err);
  if (!doc) {
    if (!err.empty()) problems->push_back(n->node + ": latest report: " + err);
    return;
  }
  n->verified = true;
  n->run = str_field(*doc, "run");
  n->status = str_field(*doc, "status");
  n->summary = lifecycle::report_summary(*doc);  // the server's words, not the node's
  n->finished = str_field(*doc, "finished");
}

StatusSnapshot snapshot(Context& ctx) {
  StatusSnapshot s;
  s.now = int64_t(time(nullptr));
  const exports::Store& store = *ctx.store;
  std::map<std::string, lifecycle::NodeLife> lives;
  if (ctx.life) {
    for (lifecycle::NodeLife& l : ctx.life->list(&s.problems)) lives[l.node] = std::move(l);
  }
  std::map<std::string, std::shared_ptr<const exports::NodeCounters>> counters;
  if (ctx.stats)
    for (auto& [id, c] : ctx.stats->nodes()) counters[id] = c;
  std::set<std::string> ids;
  for (const std::string& n : store.nodes()) ids.insert(n);
  for (const auto& [id, l] : lives) ids.insert(id);
  std::vector<std::string> with_dirs(ids.begin(), ids.end());
  for (const std::string& id : ids) {
    NodeStatus n;
    n.node = id;
    n.state = "ready";
    auto l = lives.find(id);
    if (l != lives.end()) {
      n.state = lifecycle::to_string(l->second.state);
      n.reason = l->second.reason;
      n.since = l->second.since;
      n.last_seen = l->second.last_seen;
      n.boot_scripts = l->second.boots;
    }
    exports::NodeRecord rec;
    n.dirty_source = "none";
    if (store.read_node_cached(id, &rec)) {
      n.image = rec.image;
      n.generation = rec.generation;
      n.mode = storage::mode_name(rec.mode);
      n.last_seen = std::max(n.last_seen, parse_iso8601(rec.last_seen));
      if (disk_dirty_bytes(store, rec, &n.dirty_bytes)) n.dirty_source = "disk";
    }
    auto c = counters.find(id);
    if (c != counters.end()) add_counters(&n, *c->second, s.now);
    add_verification(&n, store.root(), &s.problems);
    s.nodes.push_back(std::move(n));
  }
  s.verifications = ctx.reports.count(store, with_dirs);
  return s;
}

// Writes one metric family: HELP and TYPE, then its samples.
class Exposition {
 public:
  void family(const char* name, const char* type, const char* help) {
    name_ = name;
    out_ += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
  }
  // labels: {name, value} pairs, values escaped here.
  void sample(std::initializer_list<std::pair<const char*, std::string>> labels, double v) {
    out_ += name_;
    if (labels.size()) {
      out_ += '{';
      bool first = true;
      for (const auto& [k, val] : labels) {
        if (!first) out_ += ',';
        first = false;
        out_ += std::string(k) + "=\"" + prometheus_label(val) + "\"";
      }
      out_ += '}';
    }
    out_ += ' ' + fmt_value(v) + '\n';
  }
  std::string take() { return std::move(out_); }

 private:
  static std::string fmt_value(double v) {
    char buf[64];
    if (v == double(int64_t(v)) && v < 9.0e15 && v > -9.0e15) {
      snprintf(buf, sizeof buf, "%lld", static_cast<long long>(v));
    } else {
      snprintf(buf, sizeof buf, "%.17g", v);
    }
    return buf;
  }
  std::string name_, out_;
};

}  // namespace

std::string prometheus_label(const std::string& v) {
  std::string out;
  out.reserve(v.size());
  for (char ch : v) {
    if (ch == '\\') {
      out += "\\\\";
    } else if (ch == '"') {
      out += "\\\"";
    } else if (ch == '\n') {
      out += "\\n";
    } else {
      out += ch;
    }
  }
  return out;
}

std::string render_metrics(const StatusSnapshot& s, const exports::ServerCounters& server,
                           int64_t started) {
  auto get = [](const auto& a) { return double(a.load(std::memory_order_relaxed)); };
  Exposition e;
  e.family("nbdroot_build_info", "gauge", "nbdserver's version; always 1.");
  e.sample({{"version", NBDROOT_VERSION}}, 1);
  e.family("nbdroot_start_time_seconds", "gauge", "When this server started, unix seconds.");
  e.sample({}, double(started));

  std::map<std::string, int> by_state;
  for (const char* st : kStates) by_state[st] = 0;
  for (const NodeStatus& n : s.nodes) ++by_state[n.state];
  e.family("nbdroot_nodes", "gauge", "Nodes in the store, by lifecycle state.");
  for (const auto& [st, count] : by_state) e.sample({{"state", st}}, count);
  e.family("nbdroot_node_state", "gauge", "1 for the node's current lifecycle state.");
  for (const NodeStatus& n : s.nodes) e.sample({{"node", n.node}, {"state", n.state}}, 1);
  e.family("nbdroot_node_last_seen_timestamp_seconds", "gauge",
           "When the node was last seen (attach, detach, boot script, heartbeat or report; now "
           "while attached), unix seconds.");
  for (const NodeStatus& n : s.nodes)
    if (n.last_seen > 0) e.sample({{"node", n.node}}, double(n.last_seen));
  e.family("nbdroot_node_boots_total", "counter",
           "NBD attaches of the node's view without ?resume that found no other connection of "
           "it (since the server started).");
  for (const NodeStatus& n : s.nodes) e.sample({{"node", n.node}}, double(n.boots));
  e.family("nbdroot_node_boot_scripts_total", "counter",
           "Boot scripts served to the node (its lifecycle record).");
  for (const NodeStatus& n : s.nodes) e.sample({{"node", n.node}}, double(n.boot_scripts));
  e.family("nbdroot_node_read_bytes_total", "counter",
           "Bytes read by the node from its view (since the server started).");
  for (const NodeStatus& n : s.nodes) e.sample({{"node", n.node}}, double(n.read_bytes));
  e.family("nbdroot_node_written_bytes_total", "counter",
           "Bytes the node wrote to its view (WRITE payloads, since the server started).");
  for (const NodeStatus& n : s.nodes) e.sample({{"node", n.node}}, double(n.written_bytes));
  e.family("nbdroot_node_errors_total", "counter",
           "Error replies to the node's requests (since the server started).");
  for (const NodeStatus& n : s.nodes) e.sample({{"node", n.node}}, double(n.errors));
  e.family("nbdroot_node_connections", "gauge", "NBD connections attached to the node's view.");
  for (const NodeStatus& n : s.nodes) e.sample({{"node", n.node}}, double(n.connections));
  e.family("nbdroot_node_dirty_bytes", "gauge",
           "Bytes in the node's own layer: its block map's dirty blocks while attached, the "
           "diff's allocated blocks on disk otherwise.");
  for (const NodeStatus& n : s.nodes) e.sample({{"node", n.node}}, double(n.dirty_bytes));

  e.family("nbdroot_connections", "gauge", "Open NBD connections.");
  e.sample({}, get(server.connections_open));
  e.family("nbdroot_connections_accepted_total", "counter", "NBD connections accepted.");
  e.sample({}, get(server.connections_total));
  e.family("nbdroot_errors_total", "counter",
           "Errors on the NBD side: error replies to requests (reply), option error replies "
           "in handshakes such as an unknown export or a refused attach (option), handshakes "
           "the server closed or timed out (handshake), connections closed on an error "
           "(connection), connections over --max-connections (refused).");
  e.sample({{"kind", "connection"}}, get(server.connection_errors));
  e.sample({{"kind", "handshake"}}, get(server.handshake_failures));
  e.sample({{"kind", "option"}}, get(server.option_errors));
  e.sample({{"kind", "refused"}}, get(server.refused));
  e.sample({{"kind", "reply"}}, get(server.error_replies));

  e.family("nbdroot_verification_last_status", "gauge",
           "1 for the overall status of the node's latest verification report, 0 for the "
           "others; nodes without a report have no sample.");
  for (const NodeStatus& n : s.nodes) {
    if (!n.verified) continue;
    for (const char* st : kReportStatuses)
      e.sample({{"node", n.node}, {"status", st}}, n.status == st ? 1 : 0);
  }
  e.family("nbdroot_verifications_total", "counter",
           "Verification reports stored, by overall status.");
  for (const auto& [st, count] : s.verifications) e.sample({{"status", st}}, double(count));
  e.family("nbdroot_status_problems", "gauge",
           "Node records or reports that could not be read in this scrape (see /status).");
  e.sample({}, double(s.problems.size()));
  return e.take();
}

nlohmann::json render_status(const StatusSnapshot& s, const exports::ServerCounters& server,
                             int64_t started) {
  auto get = [](const auto& a) { return a.load(std::memory_order_relaxed); };
  nlohmann::json by_state = nlohmann::json::object();
  for (const char* st : kStates) by_state[st] = 0;
  nlohmann::json nodes = nlohmann::json::array();
  for (const NodeStatus& n : s.nodes) {
    by_state[n.state] = by_state.value(n.state, 0) + 1;
    nlohmann::json v = nullptr;
    if (n.verified)
      v = {{"run", n.run}, {"status", n.status}, {"summary", n.summary}, {"finished", n.finished}};
    nodes.push_back({{"node", n.node},
                     {"state", n.state},
                     {"reason", n.reason},
                     {"since", n.since},
                     {"image", n.image},
                     {"generation", n.generation},
                     {"mode", n.mode},
                     {"dirty_bytes", n.dirty_bytes},
                     {"dirty_source", n.dirty_source},
                     {"last_seen", n.last_seen > 0 ? nlohmann::json(n.last_seen) : nullptr},
                     {"connections", n.connections},
                     {"boots", n.boots},
                     {"boot_scripts", n.boot_scripts},
                     {"read_bytes", n.read_bytes},
                     {"written_bytes", n.written_bytes},
                     {"errors", n.errors},
                     {"last_verification", v}});
  }
  return {{"server",
           {{"version", NBDROOT_VERSION},
            {"now", s.now},
            {"started", started},
            {"nodes_by_state", by_state},
            {"connections", {{"open", get(server.connections_open)},
                             {"accepted", get(server.connections_total)}}},
            {"errors", {{"reply", get(server.error_replies)},
                        {"handshake", get(server.handshake_failures)},
                        {"option", get(server.option_errors)},
                        {"connection", get(server.connection_errors)},
                        {"refused", get(server.refused)}}},
            {"problems", s.problems}}},
          {"nodes", nodes}};
}

void add_status_api(httplib::Server& svr, std::shared_ptr<exports::Store> store,
                    std::shared_ptr<const exports::Stats> stats,
                    std::shared_ptr<const lifecycle::Lifecycle> life) {
  auto ctx = std::make_shared<Context>();
  ctx->store = std::move(store);
  ctx->stats = std::move(stats);
  ctx->life = std::move(life);
  ctx->started = int64_t(time(nullptr));
  static const exports::ServerCounters kNoCounters;
  auto server_counters = [ctx]() -> const exports::ServerCounters& {
    return ctx->stats ? ctx->stats->server() : kNoCounters;
  };
  svr.Get("/metrics", [ctx, server_counters](const httplib::Request&, httplib::Response& res) {
    const StatusSnapshot s = snapshot(*ctx);
    res.set_header("Cache-Control", "no-store");
    res.set_content(render_metrics(s, server_counters(), ctx->started),
                    "text/plain; version=0.0.4; charset=utf-8");
  });
  svr.Get("/status", [ctx, server_counters](const httplib::Request&, httplib::Response& res) {
    const StatusSnapshot s = snapshot(*ctx);
    res.set_header("Cache-Control", "no-store");
    reply_json(res, render_status(s, server_counters(), ctx->started));
  });
  svr.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_header("Cache-Control", "no-store");
    // The page loads nothing from elsewhere and runs only its own script.
    res.set_header("Content-Security-Policy",
                   "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                   "connect-src 'self'");
    res.set_header("X-Content-Type-Options", "nosniff");
    res.set_content(status_page(), "text/html; charset=utf-8");
  });
}

}  // namespace http
