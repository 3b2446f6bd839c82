// Node states (lifecycle.hpp). Every change is a read-modify-write of
// nodes/<node>/state.json under this process's mutex and the node's
// state.lock (flock), so the server's threads and `nbdserver admin` never
// interleave; state.json is replaced durably (storage/durable_file.hpp), so
// readers without the lock (may_attach, get) see the old record or the new
// one, whole.
#include "lifecycle/lifecycle.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <random>

#include "storage/durable_file.hpp"
#include "storage/names.hpp"

namespace lifecycle {
namespace {

constexpr size_t kHistoryMax = 32;
constexpr size_t kStateMaxBytes = 1 << 20;
constexpr size_t kMemtestLogMaxBytes = 4 << 20;

const char* const kStates[] = {"new", "verify", "ready", "failed", "retired"};

std::string iso8601(int64_t t) {
  std::time_t tt = std::time_t(t);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// "20261204T201500Z-3fa9c2": sortable by time, unique enough, and a valid
// store name (reports/<run>.json).
std::string new_run_id(int64_t now) {
  std::time_t tt = std::time_t(now);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%SZ", &tm);
  static thread_local std::mt19937 rng{std::random_device{}()};
  char tail[16];
  snprintf(tail, sizeof tail, "-%06x", unsigned(rng() & 0xffffff));
  return std::string(buf) + tail;
}

bool exists(const std::string& p) { return access(p.c_str(), F_OK) == 0; }

bool bad_node(const std::string& node, std::string* err) {
  if (storage::valid_store_name(node)) return false;
  *err = "bad node name '" + node.substr(0, 200) + "' (use letters, digits, '.', '_' and '-')";
  return true;
}

// Typed members of a JSON object, recording the first problem.
struct Reader {
  const nlohmann::json& j;
  std::string* err;
  bool ok = true;
  template <class T>
  void get(const char* key, T* out, bool required = true) {
    if (!ok) return;
    auto it = j.find(key);
    if (it == j.end()) {
      if (required) fail(key, "missing");
      return;
    }
    try {
      if constexpr (std::is_same_v<T, std::string>) {
        if (!it->is_string()) return fail(key, "expected a string");
      } else if constexpr (std::is_same_v<T, uint64_t>) {
        if (!it->is_number_unsigned()) return fail(key, "expected a non-negative integer");
      } else {
        if (!it->is_number_integer()) return fail(key, "expected an integer");
      }
      *out = it->template get<T>();
    } catch (const nlohmann::json::exception&) {
      fail(key, "wrong type");
    }
  }
  void fail(const char* key, const char* what) {
    ok = false;
    *err = std::string(key) + ": " + what;
  }
};

bool state_field(const nlohmann::json& j, const char* key, State* out, std::string* err) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string() || !parse_state(it->get<std::string>(), out)) {
    *err = std::string(key) + ": expected one of new, verify, ready, failed, retired";
    return false;
  }
  return true;
}

}  // namespace

const char* to_string(State s) { return kStates[int(s)]; }

bool parse_state(const std::string& s, State* out) {
  for (int i = 0; i < 5; ++i)
    if (s == kStates[i]) {
      *out = State(i);
      return true;
    }
  return false;
}

bool parse_new_nodes(const std::string& s, NewNodes* out) {
  if (s == "ready") *out = NewNodes::kReady;
  else if (s == "verify") *out = NewNodes::kVerify;
  else if (s == "refuse") *out = NewNodes::kRefuse;
  else return false;
  return true;
}

nlohmann::json to_json(const NodeLife& l) {
  nlohmann::json hist = nlohmann::json::array();
  for (const Change& c : l.history)
    hist.push_back({{"at", c.at}, {"from", to_string(c.from)}, {"to", to_string(c.to)},
                    {"reason", c.reason}, {"by", c.by}});
  return {{"node", l.node},
          {"state", to_string(l.state)},
          {"reason", l.reason},
          {"since", l.since},
          {"deadline", l.deadline},
          {"run", l.run},
          {"step", l.step},
          {"run_started", l.run_started},
          {"task", l.task},
          {"memtest86", l.memtest86},
          {"report_token_sha256", l.report_token},
          {"boots", l.boots},
          {"last_seen", l.last_seen},
          {"hints",
           {{"uuid", l.hints.uuid},
            {"serial", l.hints.serial},
            {"platform", l.hints.platform},
            {"mac", l.hints.mac}}},
          {"history", hist}};
}

bool from_json(const nlohmann::json& j, NodeLife* out, std::string* err) {
  if (!j.is_object()) {
    *err = "not a JSON object";
    return false;
  }
  NodeLife l;
  Reader r{j, err};
  r.get("node", &l.node);
  r.get("reason", &l.reason);
  r.get("since", &l.since);
  r.get("deadline", &l.deadline);
  r.get("run", &l.run);
  r.get("step", &l.step);
  r.get("run_started", &l.run_started);
  r.get("task", &l.task, false);
  r.get("memtest86", &l.memtest86, false);
  r.get("report_token_sha256", &l.report_token, false);
  r.get("boots", &l.boots);
  r.get("last_seen", &l.last_seen);
  if (!r.ok || !state_field(j, "state", &l.state, err)) return false;
  if (l.step != "" && l.step != "memtest86" && l.step != "linux") {
    *err = "step: expected \"\", \"memtest86\" or \"linux\"";
    return false;
  }
  if (auto h = j.find("hints"); h != j.end()) {
    if (!h->is_object()) {
      *err = "hints: expected an object";
      return false;
    }
    Reader hr{*h, err};
    hr.get("uuid", &l.hints.uuid, false);
    hr.get("serial", &l.hints.serial, false);
    hr.get("platform", &l.hints.platform, false);
    hr.get("mac", &l.hints.mac, false);
    if (!hr.ok) {
      *err = "hints." + *err;
      return false;
    }
  }
  auto h = j.find("history");
  if (h == j.end() || !h->is_array()) {
    *err = "history: expected an array";
    return false;
  }
  for (size_t i = 0; i < h->size(); ++i) {
    const nlohmann::json& e = (*h)[i];
    Change c;
    Reader cr{e, err};
    if (e.is_object()) {
      cr.get("at", &c.at);
      cr.get("reason", &c.reason);
      cr.get("by", &c.by);
    }
    if (!e.is_object() || !cr.ok || !state_field(e, "from", &c.from, err) ||
        !state_field(e, "to", &c.to, err)) {
      *err = "history[" + std::to_string(i) + "]" + (e.is_object() ? "." + *err : ": not an object");
      return false;
    }
    l.history.push_back(std::move(c));
  }
  *out = std::move(l);
  return true;
}

// The node's state.lock, flock()ed for the lifetime of this object.
class Lifecycle::Locked {
 public:
  Locked(const std::string& dir, std::string* err) : lock_(dir + "/state.lock", 0640, err) {}
  bool ok() const { return lock_.ok(); }

 private:
  storage::FileLock lock_;
};

Lifecycle::Lifecycle(std::string store_root, NewNodes policy, Deadlines d)
    : root_(std::move(store_root)), policy_(policy), d_(d) {}

std::string Lifecycle::state_path(const std::string& node) const {
  return root_ + "/nodes/" + node + "/state.json";
}

bool Lifecycle::load(const std::string& node, NodeLife* out, bool* found,
                     std::string* err) const {
  const std::string path = state_path(node);
  std::string text;
  int err_no = 0;
  *found = false;
  if (!storage::read_small_file(path, kStateMaxBytes, &text, err, &err_no)) {
    if (err_no != ENOENT) return false;
    err->clear();
    // No state.json: a node made before lifecycles or by an NBD attach is
    // ready; one with no node.json either is unknown.
    if (!exists(root_ + "/nodes/" + node + "/node.json")) return true;
    *found = true;
    *out = NodeLife{};
    out->node = node;
    return true;
  }
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  std::string why;
  if (j.is_discarded()) {
    why = "not valid JSON";
  } else if (from_json(j, out, &why) && out->node != node) {
    why = "node: \"" + out->node + "\", but the file is the record of '" + node + "'";
  }
  if (!why.empty()) {
    *err = path + ": corrupt record (" + why + "); fix it, or remove it and set the node's "
           "state with `nbdserver admin state " + node + " STATE`";
    return false;
  }
  *found = true;
  return true;
}

bool Lifecycle::save(const NodeLife& l, std::string* err) {
  if (!storage::write_file_durable(state_path(l.node), to_json(l).dump(2) + "\n", err))
    return false;
  if (l.deadline) deadlines_[l.node] = l.deadline;
  else deadlines_.erase(l.node);
  return true;
}

void Lifecycle::change(NodeLife* l, State to, const std::string& by, const std::string& reason,
                       int64_t now) const {
  Change c{iso8601(now), l->state, to, reason, by};
  l->history.push_back(c);
  if (l->history.size() > kHistoryMax)
    l->history.erase(l->history.begin(), l->history.end() - kHistoryMax);
  l->state = to;
  l->reason = reason;
  l->since = c.at;
  // A run belongs to one stay in verify: any change ends it.
  l->run.clear();
  l->step.clear();
  l->task.clear();
  l->deadline = 0;
  l->run_started = 0;
}

int64_t Lifecycle::capped(const NodeLife& l, int64_t t) const {
  return std::min(t, l.run_started + d_.verify_s);
}

bool Lifecycle::expire(NodeLife* l, int64_t now) const {
  if (l->state != State::kVerify || !l->deadline || now <= l->deadline) return false;
  const std::string where = !l->task.empty() ? l->task : !l->step.empty() ? l->step : "verify";
  change(l, State::kFailed, "deadline", "timed out in " + where, now);
  return true;
}

void Lifecycle::start_run(NodeLife* l, int64_t now) const {
  l->run = new_run_id(now);
  l->run_started = now;
  l->task.clear();
  l->memtest86.clear();
  l->report_token.clear();
  if (d_.memtest_s > 0) {
    // memtest86+ never stops on its own: it gets its time box, then the
    // node must come back (power cycle) within a heartbeat's silence.
    l->step = "memtest86";
    l->deadline = capped(*l, now + d_.memtest_s + d_.heartbeat_s);
  } else {
    l->step = "linux";
    l->deadline = capped(*l, now + d_.heartbeat_s);
  }
}

void Lifecycle::end_memtest86(NodeLife* l, int64_t now) const {
  l->memtest86 = "ran, result unknown";
  const std::string path = root_ + "/nodes/" + l->node + "/memtest86.log";
  std::string text, err;
  if (exists(path) && storage::read_small_file(path, kMemtestLogMaxBytes, &text, &err)) {
    bool passed = false;
    std::string summary;
    if (memtest_reader_ && memtest_reader_(text, &passed, &summary)) {
      l->memtest86 = (passed ? "passed" : "failed") + (summary.empty() ? "" : ": " + summary);
      if (!passed) {
        change(l, State::kFailed, "http", "memtest86+ failed" +
                                              (summary.empty() ? "" : ": " + summary), now);
        return;
      }
    } else {
      l->memtest86 = "ran, result unknown (serial log kept, no verdict in it)";
    }
  } else if (!err.empty()) {
    spdlog::warn("{}", err);
  }
  l->step = "linux";
  l->deadline = capped(*l, now + d_.heartbeat_s);
}

std::optional<NodeLife> Lifecycle::get(const std::string& node, std::string* err) const {
  if (bad_node(node, err)) return std::nullopt;
  NodeLife l;
  bool found = false;
  if (!load(node, &l, &found, err) || !found) return std::nullopt;
  return l;
}

std::vector<NodeLife> Lifecycle::list(std::vector<std::string>* errs) const {
  std::vector<std::string> names;
  if (DIR* d = opendir((root_ + "/nodes").c_str())) {
    while (dirent* e = readdir(d))
      if (storage::valid_store_name(e->d_name)) names.push_back(e->d_name);
    closedir(d);
  }
  std::sort(names.begin(), names.end());
  std::vector<NodeLife> out;
  for (const std::string& n : names) {
    std::string err;
    if (auto l = get(n, &err)) out.push_back(std::move(*l));
    else if (!err.empty() && errs) errs->push_back(err);
  }
  return out;
}

bool Lifecycle::on_boot_script(const std::string& node, const Hints& h, int64_t now,
                               BootDecision* out, std::string* err) {
  if (bad_node(node, err)) return false;
  const std::string dir = root_ + "/nodes/" + node;
  std::lock_guard<std::mutex> g(mu_);
  NodeLife l;
  bool found = false;
  // Refused before anything is made, lock file included.
  if (policy_ == NewNodes::kRefuse && !exists(dir + "/state.json") &&
      !exists(dir + "/node.json")) {
    *err = "node '" + node + "' is unknown and the server runs with --new-nodes refuse: an "
           "admin must create it (`nbdserver admin create` or `admin state`)";
    return false;
  }
  if (mkdir((root_ + "/nodes").c_str(), 0750) != 0 && errno != EEXIST) {
    *err = root_ + "/nodes: cannot create: " + strerror(errno);
    return false;
  }
  if (mkdir(dir.c_str(), 0750) != 0 && errno != EEXIST) {
    *err = dir + ": cannot create: " + strerror(errno);
    return false;
  }
  Locked lock(dir, err);
  if (!lock.ok() || !load(node, &l, &found, err)) return false;
  out->created = !found;
  if (!found) {
    if (policy_ == NewNodes::kRefuse) {  // made known and then removed meanwhile
      *err = "node '" + node + "' is unknown and the server runs with --new-nodes refuse";
      return false;
    }
    l = NodeLife{};
    l.node = node;
    l.state = State::kNew;
    const bool verify = policy_ == NewNodes::kVerify;
    change(&l, verify ? State::kVerify : State::kReady, "http",
           verify ? "new node, to be verified (--new-nodes verify)"
                  : "new node, ready without verification (--new-nodes ready)",
           now);
  }
  ++l.boots;
  l.last_seen = now;
  if (!h.uuid.empty()) l.hints.uuid = h.uuid;
  if (!h.serial.empty()) l.hints.serial = h.serial;
  if (!h.platform.empty()) l.hints.platform = h.platform;
  if (!h.mac.empty()) l.hints.mac = h.mac;
  if (l.state == State::kVerify && !expire(&l, now)) {
    if (l.run.empty()) {
      start_run(&l, now);
    } else if (l.step == "memtest86") {
      end_memtest86(&l, now);
    } else {
      change(&l, State::kFailed, "http",
             "rebooted during the verification (run " + l.run + ", in " +
                 (l.task.empty() ? l.step : l.task) + ")",
             now);
    }
  }
  if (!save(l, err)) return false;
  out->life = std::move(l);
  return true;
}

bool Lifecycle::in_current_run(const std::string& node, const std::string& run, const char* what,
                               int64_t now, const std::function<void(NodeLife*)>& update,
                               std::string* err) {
  if (bad_node(node, err)) return false;
  const std::string dir = root_ + "/nodes/" + node;
  std::lock_guard<std::mutex> g(mu_);
  if (!exists(dir)) {
    *err = "node '" + node + "' does not exist";
    return false;
  }
  Locked lock(dir, err);
  NodeLife l;
  bool found = false;
  if (!lock.ok() || !load(node, &l, &found, err)) return false;
  if (!found || l.state != State::kVerify || l.run.empty()) {
    *err = "node '" + node + "' is not verifying (state " +
           (found ? to_string(l.state) : "unknown") + ")";
    return false;
  }
  if (run != l.run) {
    *err = std::string(what) + " of run '" + run + "', but node '" + node +
           "''s current run is '" + l.run + "'";
    return false;
  }
  l.last_seen = now;
  if (expire(&l, now)) {
    *err = "node '" + node + "': run " + run + " " + l.reason + " before its " + what + " came";
    std::string save_err;
    if (!save(l, &save_err)) spdlog::warn("{}", save_err);
    return false;
  }
  update(&l);
  return save(l, err);
}

bool Lifecycle::on_heartbeat(const std::string& node, const std::string& run,
                             const std::string& step, int64_t now, std::string* err) {
  return in_current_run(node, run, "heartbeat", now, [&](NodeLife* l) {
    // Heartbeats come from the Linux step only.
    l->step = "linux";
    if (!step.empty()) l->task = step.substr(0, 64);
    l->deadline = capped(*l, now + d_.heartbeat_s);
  }, err);
}

bool Lifecycle::set_report_token(const std::string& node, const std::string& run,
                                 const std::string& sha256_hex, int64_t now, std::string* err) {
  return in_current_run(node, run, "report token", now,
                        [&](NodeLife* l) { l->report_token = sha256_hex; }, err);
}

bool Lifecycle::on_report(const std::string& node, const std::string& run,
                          const std::string& overall, const std::string& summary, int64_t now,
                          std::string* err) {
  return in_current_run(node, run, "report", now, [&](NodeLife* l) {
    if (overall == "passed") {
      change(l, State::kReady, "report", "passed verification (run " + run + ")", now);
    } else {
      // The summary of a report that did not pass names its worst steps first.
      change(l, State::kFailed, "report",
             summary.empty() ? "verification " + overall + " (run " + run + ")" : summary, now);
    }
  }, err);
}

bool Lifecycle::set_state(const std::string& node, State s, const std::string& by,
                          const std::string& reason, int64_t now, std::string* err) {
  if (bad_node(node, err)) return false;
  const std::string dir = root_ + "/nodes/" + node;
  std::lock_guard<std::mutex> g(mu_);
  if (!exists(dir)) {
    *err = "node '" + node + "' does not exist";
    return false;
  }
  Locked lock(dir, err);
  NodeLife l;
  bool found = false;
  if (!lock.ok() || !load(node, &l, &found, err)) return false;
  if (!found) {
    l = NodeLife{};
    l.node = node;
    l.state = State::kNew;
  }
  change(&l, s, by, reason.empty() ? "set by " + by : reason, now);
  return save(l, err);
}

void Lifecycle::scan_deadlines() {
  std::vector<std::string> errs;
  for (const NodeLife& l : list(&errs))
    if (l.state == State::kVerify && l.deadline) deadlines_[l.node] = l.deadline;
  for (const std::string& e : errs) spdlog::warn("{}", e);
  scanned_ = true;
}

std::vector<std::string> Lifecycle::sweep(int64_t now) {
  std::lock_guard<std::mutex> g(mu_);
  if (!scanned_) scan_deadlines();
  std::vector<std::string> due;
  for (const auto& [node, deadline] : deadlines_)
    if (now > deadline) due.push_back(node);
  std::vector<std::string> changed;
  for (const std::string& node : due) {
    std::string err;
    const std::string dir = root_ + "/nodes/" + node;
    NodeLife l;
    bool found = false;
    if (!exists(dir)) {
      deadlines_.erase(node);
      continue;
    }
    Locked lock(dir, &err);
    if (!lock.ok() || !load(node, &l, &found, &err)) {
      spdlog::warn("deadline of node {}: {}", node, err);
      deadlines_.erase(node);
      continue;
    }
    if (!found || !expire(&l, now)) {
      // Changed by someone else (an admin): keep what the record says.
      if (found && l.state == State::kVerify && l.deadline) deadlines_[node] = l.deadline;
      else deadlines_.erase(node);
      continue;
    }
    if (!save(l, &err)) {
      spdlog::warn("deadline of node {}: {}", node, err);
      continue;
    }
    spdlog::info("node {}: {}", node, l.reason);
    changed.push_back(node);
  }
  return changed;
}

bool Lifecycle::may_attach(const std::string& node, std::string* why) const {
  if (bad_node(node, why)) return false;
  NodeLife l;
  bool found = false;
  std::string err;
  if (!load(node, &l, &found, &err)) {
    *why = "node " + node + " may not attach its root: " + err;
    return false;
  }
  if (!found) {
    if (policy_ == NewNodes::kReady) return true;  // created at attach, as before lifecycles
    *why = "node " + node + " is unknown to the store and the server runs with --new-nodes " +
           (policy_ == NewNodes::kVerify ? "verify: it must boot and pass verification first"
                                         : "refuse: an admin must create it first");
    return false;
  }
  if (l.state == State::kReady) return true;
  *why = "node " + node + " is in state " + to_string(l.state) +
         (l.reason.empty() ? "" : " (" + l.reason + ")") + ": it may not attach its root";
  return false;
}

}  // namespace lifecycle
