// `nbdserver admin`: node records in a store, safe while a server runs.
//
// Commands that change a node take its flock, which a running server holds
// while the node is attached, so they refuse instead of pulling a disk from
// under a node. Each change that succeeded is recorded in <store>/audit.log
// (exports/audit.hpp); a command whose change succeeded but whose audit
// line could not be written says so and exits 1. Read-only commands (list, extents) read the persisted map:
// what was true at the node's last flush.
#include "server/admin.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <boost/program_options.hpp>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <ctime>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "exports/audit.hpp"
#include "exports/store.hpp"
#include "lifecycle/lifecycle.hpp"
#include "lifecycle/report.hpp"
#include "protocol/wire.hpp"
#include "storage/json_file.hpp"
#include "storage/layer_file.hpp"
#include "storage/names.hpp"
#include "storage/node_keys.hpp"

namespace po = boost::program_options;

namespace server {
namespace {

constexpr const char* kAdminUsage =
    "Usage: nbdserver admin --store DIR COMMAND [ARGS]\n"
    "Commands:\n"
    "  list [--json]                       nodes: state, image, generation, mode, dirty bytes,\n"
    "                                      connections, last seen\n"
    "  create NODE... --image IMAGE [--generation GEN] [--mode persistent|ephemeral]\n"
    "         [--block-size N]             register nodes (pinned to GEN, default: current)\n"
    "  reset NODE [--generation GEN|current]   drop the node's changes; optionally move it\n"
    "  delete NODE                         remove the node and its changes\n"
    "  pin NODE ADDRESS                    attach the node from ADDRESS only (an IPv4 or\n"
    "                                      IPv6 address, or unix for Unix-socket clients)\n"
    "  unpin NODE                          remove the node's pin\n"
    "  extents NODE [--json]               the node's changed blocks (at its last flush)\n"
    "  state NODE new|verify|ready|failed|retired [--reason TEXT]\n"
    "                                      set the node's state (only ready nodes attach)\n"
    "  report NODE [--json]                the node's latest verification report\n"
    "  key NODE [--expires DURATION]       create or rotate the node's TLS key; prints\n"
    "                                      NODE:HEX (psktool format) on stdout; DURATION:\n"
    "                                      30d, 12h, 90m, 3600s, or 0 for never (default)\n"
    "  key NODE --arm                      let the node's next boot script carry its key,\n"
    "                                      once (creates and prints a key if it has none)\n"
    "  key NODE --show | --remove          print the key without rotating it | delete it\n";

struct MapInfo {
  bool ok = false;
  std::string error;
  storage::BlockMap map;
};

// Generations opened once per command: `list` reads thousands of nodes
// pinned to a handful of them.
using GenerationCache = std::map<std::string, std::shared_ptr<storage::Generation>>;

// The node's persisted map, read without the lock (it is never torn: A/B slots).
MapInfo read_map(const exports::Store& st, const exports::NodeRecord& r, GenerationCache* gens) {
  MapInfo mi;
  std::string err;
  auto& gen = (*gens)[r.image + "@" + r.generation];
  if (!gen) gen = storage::Generation::open(st.root(), r.image, r.generation, &err);
  if (!gen) {
    mi.error = err;
    return mi;
  }
  const std::string path = st.layer_prefix(r) + ".bitmap";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    mi.error = "no changes yet";
    mi.ok = true;
    return mi;
  }
  storage::LayerId id{r.block_size, gen->size(), gen->tag(), 0};
  storage::LayerId found;
  mi.ok = storage::load_map(fd, id, &mi.map, &found, &err);
  if (!mi.ok) mi.error = path + ": " + err;
  ::close(fd);
  return mi;
}

// Whether a server holds the node's lock. Opens the lock file without
// creating it: no lock file, no server has attached the node.
bool attached(const exports::Store& st, const std::string& node) {
  int fd = ::open((st.node_dir(node) + "/lock").c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool held = flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);
  return held;
}

int cmd_list(exports::Store& st, bool json) {
  nlohmann::json all = nlohmann::json::array();
  if (!json)
    printf("%-20s %-8s %-12s %-22s %-10s %10s %10s %5s %-8s %s\n", "NODE", "STATE", "IMAGE",
           "GENERATION", "MODE", "DIRTY", "ZEROED", "CONNS", "ATTACHED", "LAST SEEN");
  GenerationCache gens;
  const lifecycle::Lifecycle life(st.root(), lifecycle::NewNodes::kReady, {});
  for (const std::string& n : st.nodes()) {
    exports::NodeRecord r;
    std::string err;
    // The state ("?" when state.json is corrupt, said on stderr).
    auto l = life.get(n, &err);
    if (!err.empty()) fprintf(stderr, "nbdserver admin: %s\n", err.c_str());
    const std::string state = l ? lifecycle::to_string(l->state) : err.empty() ? "-" : "?";
    const std::string reason = l ? l->reason : err;
    err.clear();
    if (access((st.node_dir(n) + "/node.json").c_str(), F_OK) != 0) {
      // Known from its boot-script fetches only: it has not attached yet.
      if (!l) continue;
      if (json) {
        all.push_back({{"node", n}, {"state", state}, {"reason", reason}, {"image", ""},
                       {"generation", ""}, {"attached", false}, {"connections", 0},
                       {"last_seen", ""}, {"error", ""}});
      } else {
        printf("%-20s %-8s %-12s %-22s %-10s %10s %10s %5u %-8s %s\n", n.c_str(), state.c_str(),
               "-", "-", "-", "-", "-", 0u, "no", "");
      }
      continue;
    }
    if (!st.read_node(n, &r, &err)) {
      fprintf(stderr, "nbdserver admin: %s\n", err.c_str());
      continue;
    }
    MapInfo mi = read_map(st, r, &gens);
    const bool att = attached(st, n);
    const uint64_t dirty = mi.map.dirty.cardinality() * r.block_size;
    const uint64_t zero = mi.map.zero.cardinality() * r.block_size;
    if (json) {
      all.push_back({{"node", n}, {"state", state}, {"reason", reason},
                     {"image", r.image}, {"generation", r.generation},
                     {"mode", storage::mode_name(r.mode)}, {"block_size", r.block_size},
                     {"dirty_bytes", dirty}, {"zeroed_bytes", zero},
                     {"connections", att ? r.connections : 0}, {"attached", att},
                     {"created", r.created}, {"last_seen", r.last_seen},
                     {"error", mi.ok ? "" : mi.error}});
    } else {
      printf("%-20s %-8s %-12s %-22s %-10s %10s %10s %5u %-8s %s%s\n", n.c_str(), state.c_str(),
             r.image.c_str(), r.generation.c_str(), storage::mode_name(r.mode),
             mi.ok ? storage::human_bytes(dirty).c_str() : "?", mi.ok ? storage::human_bytes(zero).c_str() : "?",
             att ? r.connections : 0, att ? "yes" : "no", r.last_seen.c_str(),
             mi.ok ? "" : ("  (" + mi.error + ")").c_str());
    }
  }
  if (json) std::cout << all.dump(2) << "\n";
  return 0;
}

int cmd_extents(exports::Store& st, const std::string& node, bool json) {
  exports::NodeRecord r;
  std::string err;
  if (!st.read_node(node, &r, &err)) {
    fprintf(stderr, "nbdserver admin: %s\n", err.c_str());
    return 1;
  }
  GenerationCache gens;
  MapInfo mi = read_map(st, r, &gens);
  if (!mi.ok) {
    fprintf(stderr, "nbdserver admin: %s\n", mi.error.c_str());
    return 1;
  }
  // Runs of consecutive blocks, in block order, with their state.
  nlohmann::json all = nlohmann::json::array();
  auto emit = [&](uint64_t first, uint64_t n, const char* state) {
    const uint64_t bs = r.block_size;
    if (json) {
      all.push_back({{"offset", first * bs}, {"length", n * bs}, {"state", state}});
    } else {
      printf("%14llu %14llu %s\n", (unsigned long long)(first * bs),
             (unsigned long long)(n * bs), state);
    }
  };
  Roaring changed = mi.map.dirty | mi.map.zero;
  uint64_t run_first = 0, run_len = 0;
  bool run_zero = false;
  for (uint32_t b : changed) {
    const bool z = mi.map.zero.contains(b);
    if (run_len && b == run_first + run_len && z == run_zero) {
      ++run_len;
      continue;
    }
    if (run_len) emit(run_first, run_len, run_zero ? "zero" : "data");
    run_first = b;
    run_len = 1;
    run_zero = z;
  }
  if (run_len) emit(run_first, run_len, run_zero ? "zero" : "data");
  if (json) std::cout << all.dump(2) << "\n";
  return 0;
}

int cmd_state(exports::Store& st, const std::string& node, const std::string& state,
              const std::string& reason) {
  lifecycle::State s;
  if (!lifecycle::parse_state(state, &s)) {
    fprintf(stderr, "nbdserver admin state: unknown state '%s' (expected new, verify, ready, "
            "failed or retired)\n%s", state.c_str(), kAdminUsage);
    return 2;
  }
  lifecycle::Lifecycle life(st.root(), lifecycle::NewNodes::kReady, {});
  std::string err;
  auto before = life.get(node, &err);
  if (!err.empty() ||
      !life.set_state(node, s, "admin (uid " + std::to_string(getuid()) + ")",
                      reason.empty() ? "set by an admin" : reason, int64_t(time(nullptr)),
                      &err)) {
    fprintf(stderr, "nbdserver admin state: %s\n", err.c_str());
    return 1;
  }
  const char* from = before ? lifecycle::to_string(before->state) : "(no record)";
  printf("node %s: %s -> %s\n", node.c_str(), from, lifecycle::to_string(s));
  if (!exports::audit(st.root(), "state",
                      node + " " + from + " -> " + lifecycle::to_string(s) +
                          (reason.empty() ? "" : ": " + reason),
                      &err)) {
    fprintf(stderr, "nbdserver admin state: done, but not recorded in the audit log: %s\n",
            err.c_str());
    return 1;
  }
  return 0;
}

// "  memtester   passed   exit 0   61.2 s   bytes_tested=432013312 ram_share=0.83 loops=1"
void print_step(const nlohmann::json& s) {
  auto str = [&](const char* k) {
    return s.contains(k) && s[k].is_string() ? s[k].get<std::string>() : std::string("?");
  };
  std::string exit = s.contains("exit_code") && s["exit_code"].is_number_integer()
                         ? "exit " + std::to_string(s["exit_code"].get<int64_t>())
                         : "";
  char dur[32] = "";
  if (s.contains("duration_s") && s["duration_s"].is_number())
    snprintf(dur, sizeof dur, "%.1f s", s["duration_s"].get<double>());
  std::string results;
  if (s.contains("results") && s["results"].is_object())
    for (const auto& [k, v] : s["results"].items())
      results += (results.empty() ? "" : " ") + k + "=" +
                 (v.is_string() ? v.get<std::string>() : v.dump());
  printf("  %-16s %-9s %-8s %9s  %s\n", str("name").c_str(), str("status").c_str(),
         exit.c_str(), dur, results.c_str());
}

int cmd_report(exports::Store& st, const std::string& node, bool json) {
  std::string err;
  if (!storage::valid_store_name(node) || access(st.node_dir(node).c_str(), F_OK) != 0) {
    fprintf(stderr, "nbdserver admin report: node '%s' does not exist\n", node.c_str());
    return 1;
  }
  auto doc = lifecycle::latest_report(st.root(), node, &err);
  if (!doc) {
    if (err.empty()) err = "node '" + node + "' has no verification report yet";
    fprintf(stderr, "nbdserver admin report: %s\n", err.c_str());
    return 1;
  }
  if (json) {
    std::cout << doc->dump(2) << "\n";
    return 0;
  }
  auto str = [&](const char* k) {
    return doc->contains(k) && (*doc)[k].is_string() ? (*doc)[k].get<std::string>()
                                                     : std::string("?");
  };
  printf("node %s, run %s: %s\n", node.c_str(), str("run").c_str(), str("status").c_str());
  printf("  %s\n", lifecycle::report_summary(*doc).c_str());
  printf("  started %s, finished %s\n", str("started").c_str(), str("finished").c_str());
  if (doc->contains("steps") && (*doc)["steps"].is_array())
    for (const auto& s : (*doc)["steps"])
      if (s.is_object()) print_step(s);
  if (doc->contains("log_files") && (*doc)["log_files"].is_array() &&
      !(*doc)["log_files"].empty()) {
    printf("  logs in %s/reports/%s/:", st.node_dir(node).c_str(), str("run").c_str());
    for (const auto& f : (*doc)["log_files"])
      if (f.is_string()) printf(" %s", f.get<std::string>().c_str());
    printf("\n");
  }
  return 0;
}

// What `admin key` was asked to do.
struct KeyFlags {
  bool arm = false, show = false, remove = false;
  std::string expires;  // "" when not given
};

// The node's key, printed for psktool, nbdinfo's tls-psk-file and the node
// agent: the only thing `admin key` writes on stdout.
void print_key(const storage::NodeKey& k) {
  std::string line = storage::psk_line(k);
  printf("%s\n", line.c_str());
  tls::wipe(line);
}

std::string key_summary(const storage::NodeKey& k) {
  return "generation " + std::to_string(k.generation) + ", expires " +
         (k.expires ? storage::utc_time(k.expires) : "never");
}

// Creates or rotates the key, prints it and records it. Exit status.
int key_create(const std::string& store, const std::string& node, int64_t lifetime) {
  storage::NodeKey k;
  bool rotated = false;
  std::string err;
  const int64_t now = int64_t(time(nullptr));
  storage::KeyStatus before;
  storage::load(store, node, now, &err, &before);
  if (!storage::create_or_rotate(store, node, lifetime, now, &k, &rotated, &err)) {
    fprintf(stderr, "nbdserver admin key: %s\n", err.c_str());
    return 1;
  }
  print_key(k);
  const char* what = rotated ? "rotated" : "created";
  fprintf(stderr, "%s the key of %s (%s)%s\n", what, node.c_str(), key_summary(k).c_str(),
          rotated ? ": its old key no longer works"
          : before == storage::KeyStatus::kCorrupt ? ", replacing a corrupt key file" : "");
  if (!exports::audit(store, "key", node + " " + what + " (" + key_summary(k) + ")", &err)) {
    fprintf(stderr, "nbdserver admin key: done, but not recorded in the audit log: %s\n",
            err.c_str());
    return 1;
  }
  return 0;
}

// `key NODE --arm`: arms the node's key, made first if it has none.
int key_arm(const std::string& store, const std::string& node, const KeyFlags& f,
            int64_t lifetime) {
  std::string err;
  storage::KeyStatus st;
  const int64_t now = int64_t(time(nullptr));
  storage::load(store, node, now, &err, &st);
  if (st == storage::KeyStatus::kMissing) {
    const int rc = key_create(store, node, lifetime);
    if (rc != 0) return rc;
  } else if (st == storage::KeyStatus::kExpired) {
    fprintf(stderr, "nbdserver admin key: node %s: %s: rotate it (nbdserver admin key %s), "
            "then arm it\n", node.c_str(), err.c_str(), node.c_str());
    return 1;
  } else if (st != storage::KeyStatus::kOk) {
    fprintf(stderr, "nbdserver admin key: node %s: %s\n", node.c_str(), err.c_str());
    return 1;
  } else if (!f.expires.empty()) {
    fprintf(stderr, "nbdserver admin key: node %s has a key: --expires applies to a new key "
            "(rotate it with `nbdserver admin key %s --expires %s`, then arm it)\n",
            node.c_str(), node.c_str(), f.expires.c_str());
    return 1;
  }
  storage::NodeKey k;
  if (!storage::arm(store, node, now, &k, &err)) {
    fprintf(stderr, "nbdserver admin key: node %s: %s\n", node.c_str(), err.c_str());
    return 1;
  }
  fprintf(stderr, "armed the key of %s (%s): its next boot script under --tls require carries "
          "it, once\n", node.c_str(), key_summary(k).c_str());
  if (!exports::audit(store, "key", node + " armed (" + key_summary(k) + ")", &err)) {
    fprintf(stderr, "nbdserver admin key: done, but not recorded in the audit log: %s\n",
            err.c_str());
    return 1;
  }
  return 0;
}

int key_show(const std::string& store, const std::string& node) {
  std::string why;
  const std::optional<storage::NodeKey> k =
      storage::load(store, node, int64_t(time(nullptr)), &why);
  if (!k) {
    fprintf(stderr, "nbdserver admin key: node %s: %s\n", node.c_str(), why.c_str());
    return 1;
  }
  print_key(*k);
  fprintf(stderr, "%s: %s, created %s, %s, last delivered %s\n", node.c_str(),
          key_summary(*k).c_str(), storage::utc_time(k->created).c_str(),
          k->armed ? "armed" : "not armed",
          k->delivered_at ? storage::utc_time(k->delivered_at).c_str() : "never");
  return 0;
}

int key_remove(const std::string& store, const std::string& node) {
  bool existed = false;
  std::string err;
  if (!storage::remove(store, node, &existed, &err)) {
    fprintf(stderr, "nbdserver admin key: %s\n", err.c_str());
    return 1;
  }
  fprintf(stderr, existed ? "removed the key of %s\n" : "%s had no key\n", node.c_str());
  if (existed && !exports::audit(store, "key", node + " removed", &err)) {
    fprintf(stderr, "nbdserver admin key: done, but not recorded in the audit log: %s\n",
            err.c_str());
    return 1;
  }
  return 0;
}

// The name of another node that differs from `node` only in case, or "".
std::string case_variant(const exports::Store& st, const std::string& node) {
  auto fold = [](std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
    return s;
  };
  for (const std::string& n : st.nodes())
    if (n != node && fold(n) == fold(node)) return n;
  return "";
}

// `admin key NODE [--arm] [--expires D] [--show | --remove]`. Usage errors
// (exit 2) are found before anything is read or written.
int cmd_key(const exports::Store& st, const std::string& node, const KeyFlags& f) {
  auto usage = [](const std::string& msg) {
    fprintf(stderr, "nbdserver admin key: %s\n%s", msg.c_str(), kAdminUsage);
    return 2;
  };
  if (!storage::valid_store_name(node))
    return usage("bad node name " + nbd::quoted(node) + " (allowed: [A-Za-z0-9._-], not "
                 "starting with '.', at most " + std::to_string(storage::kMaxStoreName) +
                 " bytes)");
  if (f.show + f.remove + f.arm > 1) return usage("--show, --remove and --arm exclude each other");
  if ((f.show || f.remove) && !f.expires.empty())
    return usage(std::string("--expires makes no sense with ") + (f.show ? "--show" : "--remove"));
  int64_t lifetime = 0;
  if (!f.expires.empty() && !storage::parse_key_lifetime(f.expires, &lifetime))
    return usage("--expires " + nbd::quoted(f.expires) + ": expected a number with a unit "
                 "(30d, 12h, 90m, 3600s), or 0 for never");
  const std::string other = case_variant(st, node);
  if (!other.empty())
    return usage("node '" + node + "' differs from the node '" + other + "' only in case "
                 "(names are case-sensitive)");
  if (f.show) return key_show(st.root(), node);
  if (f.remove) return key_remove(st.root(), node);
  if (f.arm) return key_arm(st.root(), node, f, lifetime);
  return key_create(st.root(), node, lifetime);
}

}  // namespace

int run_admin(int argc, const char* const* argv) {
  std::string store, command, image, gen, mode = "persistent", reason;
  std::vector<std::string> nodes;
  uint32_t block_size = 4096;
  bool json = false;
  KeyFlags key;
  po::options_description d("Admin options");
  d.add_options()("help,h", "show this help")("store", po::value(&store), "the store directory")(
      "image", po::value(&image), "image of a new node")("generation", po::value(&gen),
                                                        "generation to pin or move to")(
      "mode", po::value(&mode), "persistent or ephemeral")(
      "block-size", po::value(&block_size), "copy-on-write block size of a new node")(
      "json", po::bool_switch(&json), "machine-readable output")(
      "reason", po::value(&reason), "why (admin state)")(
      "arm", po::bool_switch(&key.arm), "admin key: arm the key's delivery")(
      "expires", po::value(&key.expires), "admin key: lifetime of a new key")(
      "show", po::bool_switch(&key.show), "admin key: print the key")(
      "remove", po::bool_switch(&key.remove), "admin key: delete the key")(
      "command", po::value(&command), "")("node", po::value(&nodes), "");
  po::positional_options_description pos;
  pos.add("command", 1).add("node", -1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(d).positional(pos).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    fprintf(stderr, "nbdserver admin: %s\n%s", e.what(), kAdminUsage);
    return 2;
  }
  if (vm.count("help")) {
    printf("%s", kAdminUsage);
    return 0;
  }
  auto usage_error = [](const std::string& msg) {
    fprintf(stderr, "nbdserver admin: %s\n%s", msg.c_str(), kAdminUsage);
    return 2;
  };
  if (store.empty()) return usage_error("--store DIR is required");
  if (command.empty()) return usage_error("no command given");
  if (command != "key" && (key.arm || key.show || key.remove || vm.count("expires")))
    return usage_error("--arm, --expires, --show and --remove are options of `key`");
  exports::Store st(store, {});
  std::string err;
  if (!st.check(&err)) {
    fprintf(stderr, "nbdserver admin: %s\n", err.c_str());
    return 1;
  }
  const bool needs_node = command != "list";
  if (needs_node && nodes.empty()) return usage_error(command + ": which node?");
  if (!needs_node && !nodes.empty()) return usage_error(command + ": takes no node");
  if (command == "state") {
    if (nodes.size() != 2) return usage_error("state: expected NODE STATE");
    return cmd_state(st, nodes[0], nodes[1], reason);
  }
  if (command == "key") {
    if (nodes.size() != 1) return usage_error("key: expected one NODE");
    if (vm.count("expires") && key.expires.empty()) return usage_error("--expires: empty");
    return cmd_key(st, nodes[0], key);
  }
  if (command == "pin" && nodes.size() != 2) return usage_error("pin: expected NODE ADDRESS");
  if (command != "create" && command != "pin" && nodes.size() > 1)
    return usage_error(command + ": one node at a time");
  const std::string node = nodes.empty() ? std::string() : nodes[0];
  bool ok = true;
  // Records a change made; false (with a message) when the log is unwritable.
  auto record = [&](const std::string& action, const std::string& detail) {
    std::string why;
    if (exports::audit(store, action, detail, &why)) return true;
    fprintf(stderr, "nbdserver admin %s: done, but not recorded in the audit log: %s\n",
            command.c_str(), why.c_str());
    return false;
  };
  if (command == "list") return cmd_list(st, json);
  if (command == "extents") return cmd_extents(st, node, json);
  if (command == "report") return cmd_report(st, node, json);
  if (command == "create") {
    storage::NodeMode m;
    if (image.empty()) return usage_error("create: --image IMAGE is required");
    if (!storage::parse_mode(mode, &m)) return usage_error("--mode: persistent or ephemeral");
    if (block_size < 512 || block_size > (1u << 20) || (block_size & (block_size - 1)))
      return usage_error("--block-size must be a power of two from 512 to 1048576");
    size_t created = 0;
    ok = st.create_nodes(nodes, image, gen, m, block_size, &created, &err);
    bool recorded = true;
    for (size_t i = 0; i < created; ++i) {
      printf("created %s\n", nodes[i].c_str());
      exports::NodeRecord r;
      std::string ignored;
      const std::string pinned_gen = st.read_node(nodes[i], &r, &ignored) ? r.generation : gen;
      recorded &= record("create", nodes[i] + " image=" + image + " generation=" + pinned_gen +
                                       " mode=" + mode + " block_size=" +
                                       std::to_string(block_size));
    }
    if (ok) return recorded ? 0 : 1;
  } else if (command == "reset") {
    ok = st.reset_node(node, gen, &err);
    if (ok && !record("reset", node + (gen.empty() ? "" : " generation=" + gen))) return 1;
  } else if (command == "delete") {
    ok = st.delete_node(node, &err);
    if (ok && !record("delete", node)) return 1;
  } else if (command == "pin") {
    std::string address;
    if (!st.pin_node(node, nodes[1], &address, &err)) {
      fprintf(stderr, "nbdserver admin pin: %s\n", err.c_str());
      return 1;
    }
    printf("pinned %s to %s\n", node.c_str(), address.c_str());
    return record("pin", node + " " + address) ? 0 : 1;
  } else if (command == "unpin") {
    bool was = false;
    if (!st.unpin_node(node, &was, &err)) {
      fprintf(stderr, "nbdserver admin unpin: %s\n", err.c_str());
      return 1;
    }
    printf(was ? "unpinned %s\n" : "%s was not pinned\n", node.c_str());
    return !was || record("unpin", node) ? 0 : 1;
  } else {
    return usage_error("unknown command '" + command + "'");
  }
  if (!ok) {
    fprintf(stderr, "nbdserver admin %s: %s\n", command.c_str(), err.c_str());
    return 1;
  }
  printf("%s %s\n", command == "create" ? "created" : command == "reset" ? "reset" : "deleted",
         node.c_str());
  return 0;
}

}  // namespace server
