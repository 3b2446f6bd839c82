// A node's life around its boot (issue 12; DESIGN.md "Node lifecycle and
// HTTP"): which state it is in, what it boots next, and the deadlines of
// its verification. Kept per node in the store:
//
//   nodes/<node>/state.json        this record (replaced by rename, fsynced)
//   nodes/<node>/state.lock        flock()ed around read-modify-write of state.json,
//                                  by the server and by `nbdserver admin`
//   nodes/<node>/reports/<run>.json  verification reports (lifecycle/report.hpp)
//
// States: new (seen, not verified), verify (its next boot runs the
// verification), ready (boots its root), failed (the last verification failed
// or timed out; it boots nothing), retired. Only a ready node attaches its
// copy-on-write view. A node with a node.json but no state.json (made before
// lifecycles, or created by an NBD attach) is ready.
//
// Threads: every method may be called from any thread; a mutex orders this
// process's changes and state.lock orders them against other processes.
// Time comes in as an argument (unix seconds), so tests drive the clock.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace lifecycle {

enum class State { kNew, kVerify, kReady, kFailed, kRetired };
const char* to_string(State s);
bool parse_state(const std::string& s, State* out);

// What a first boot-script fetch from an unknown node makes of it
// (--new-nodes). kReady keeps plain NBD use working as it did before.
enum class NewNodes { kReady, kVerify, kRefuse };
bool parse_new_nodes(const std::string& s, NewNodes* out);

struct Deadlines {
  int64_t verify_s = 3600;    // a whole verification run, from its first script fetch
  int64_t heartbeat_s = 300;  // silence allowed between heartbeats within a run
  int64_t memtest_s = 0;      // memtest86+ step's time box; 0: the step is off
};

struct Change {
  std::string at;  // ISO 8601 UTC
  State from = State::kNew, to = State::kNew;
  std::string reason;  // "passed verification", "timed out in memtester", ...
  std::string by;      // "http", "report", "deadline", "admin (uid N)", "attach"
};

// What the node said when it fetched its script (query parameters), kept.
struct Hints {
  std::string uuid, serial, platform, mac;
};

struct NodeLife {
  std::string node;
  State state = State::kReady;
  std::string reason;     // why it is in this state
  std::string since;      // ISO 8601 UTC of the last change
  int64_t deadline = 0;   // unix seconds the current step must end by; 0: none
  std::string run;        // verification run in progress ("" when none)
  std::string step;       // "" | "memtest86" | "linux": where the run is
  int64_t run_started = 0;
  std::string task;       // the Linux step's task, from its heartbeats ("memtester")
  std::string memtest86;  // the run's memtest86+ outcome ("ran, result unknown", ...)
  // Hex SHA-256 of the run's report token (the tls tier: handed to the node in
  // the boot script of its Linux step; reports and heartbeats must carry it).
  // "" when the run has none.
  std::string report_token;
  uint64_t boots = 0;     // boot scripts served
  int64_t last_seen = 0;  // unix seconds of the last script fetch, heartbeat or report
  Hints hints;
  std::vector<Change> history;  // oldest first, the newest 32 kept
};
nlohmann::json to_json(const NodeLife& l);
// The inverse, for state.json: false and *err naming the field when a
// member is missing or of the wrong type.
bool from_json(const nlohmann::json& j, NodeLife* out, std::string* err);

// Reads a memtest86+ serial log (nodes/<node>/memtest86.log): true with
// *passed and *summary when the log holds a verdict, false when it does
// not (the step is then "ran, result unknown"). Wired to lifecycle/parsers.
using MemtestLogReader =
    std::function<bool(const std::string& log, bool* passed, std::string* summary)>;

// What a boot-script fetch leads to: the record after it (its state picks
// the template) and, while verifying, which step the script must run.
struct BootDecision {
  NodeLife life;
  bool created = false;  // the node was unknown and was made now
};

class Lifecycle {
 public:
  Lifecycle(std::string store_root, NewNodes policy, Deadlines d);

  // The node's record. A node with node.json but no state.json is ready.
  // Returns nullopt when the node is unknown (no directory); sets *err when
  // the record is there but unreadable or corrupt.
  std::optional<NodeLife> get(const std::string& node, std::string* err) const;
  // Every node in the store, sorted by name (corrupt ones are skipped and
  // named in *errs).
  std::vector<NodeLife> list(std::vector<std::string>* errs) const;

  // GET /boot/<node>.ipxe. Unknown nodes are made under the policy (refuse:
  // false, *err says so, nothing is written). In verify: starts a run (new
  // run id, deadline) at the first fetch; a fetch while a run's Linux step
  // is under way means the node rebooted during it: failed. memtest86 step
  // (memtest_s > 0): the first fetch of a run answers with memtest86+, the
  // next one records it as "ran, result unknown" (or as the serial log
  // nodes/<node>/memtest86.log says) and goes on to the Linux step.
  bool on_boot_script(const std::string& node, const Hints& h, int64_t now, BootDecision* out,
                      std::string* err);
  // POST /nodes/<node>/heartbeat: the run is alive; pushes its deadline to
  // now + heartbeat_s (never past run_started + verify_s). False when the
  // node is not verifying or the run id is not the current one.
  bool on_heartbeat(const std::string& node, const std::string& run, const std::string& step,
                    int64_t now, std::string* err);
  // A stored, valid report for the current run: passed -> ready, anything
  // else -> failed with the worst step named in the reason.
  bool on_report(const std::string& node, const std::string& run, const std::string& overall,
                 const std::string& summary, int64_t now, std::string* err);
  // `nbdserver admin state NODE STATE` (and retire). Creates the record
  // when the node has none (the node directory must exist).
  // Records the hex SHA-256 of run `run`'s report token (replacing any).
  // False and *err unless the node is in that run.
  bool set_report_token(const std::string& node, const std::string& run,
                        const std::string& sha256_hex, int64_t now, std::string* err);
  bool set_state(const std::string& node, State s, const std::string& by,
                 const std::string& reason, int64_t now, std::string* err);
  // Moves every node whose deadline passed to failed ("timed out in STEP").
  // Returns the nodes changed.
  std::vector<std::string> sweep(int64_t now);

  // For the NBD side: may this node attach its view? False with *why
  // ("node X is in state verify: ...") when not.
  bool may_attach(const std::string& node, std::string* why) const;

  const Deadlines& deadlines() const { return d_; }
  NewNodes policy() const { return policy_; }
  // How memtest86.log is read; without one, the log is kept but the step
  // is "ran, result unknown". Set before any thread uses this object.
  void set_memtest_log_reader(MemtestLogReader r) { memtest_reader_ = std::move(r); }

  std::string state_path(const std::string& node) const;

 private:
  // A heartbeat's or report's common part: under the locks, loads the node
  // and checks that it is verifying in `run` and within its deadline (else
  // false, *err naming `what`; a passed deadline fails the node), then
  // applies `update` and saves.
  bool in_current_run(const std::string& node, const std::string& run, const char* what,
                      int64_t now, const std::function<void(NodeLife*)>& update,
                      std::string* err);
  class Locked;  // a node's state.lock, held; defined in lifecycle.cpp
  // state.json, or the implied record (node.json only: ready); *exists is
  // false when the node has neither. False and *err when unreadable.
  bool load(const std::string& node, NodeLife* out, bool* exists, std::string* err) const;
  bool save(const NodeLife& l, std::string* err);
  void change(NodeLife* l, State to, const std::string& by, const std::string& reason,
              int64_t now) const;
  // Fails the run when its deadline passed; true when it did.
  bool expire(NodeLife* l, int64_t now) const;
  void start_run(NodeLife* l, int64_t now) const;
  void end_memtest86(NodeLife* l, int64_t now) const;
  int64_t capped(const NodeLife& l, int64_t t) const;
  void scan_deadlines();

  std::string root_;
  NewNodes policy_;
  Deadlines d_;
  MemtestLogReader memtest_reader_;
  mutable std::mutex mu_;
  // Nodes with a deadline, as this process last wrote or read them, so that
  // sweep() reads only those; filled from the store at the first sweep.
  std::map<std::string, int64_t> deadlines_;
  bool scanned_ = false;
};

}  // namespace lifecycle
