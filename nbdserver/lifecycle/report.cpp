// Verification reports (report.hpp; schema in docs/verification.md). The
// validator walks the document once, naming the path of the first problem
// ("steps[1].status: ..."); nothing is stored unless all of it is right.
#include "lifecycle/report.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <set>

#include "lifecycle/parsers.hpp"
#include "storage/durable_file.hpp"
#include "storage/names.hpp"

namespace lifecycle {
namespace {

using nlohmann::json;

constexpr const char* kSchema = "nbdroot.report/1";
constexpr const char* kStatuses[] = {"skipped", "passed", "degraded", "timedout", "failed"};
constexpr size_t kMaxSteps = 64;
constexpr size_t kMaxLogs = 32;

int severity(const std::string& s) {
  for (int i = 0; i < 5; ++i)
    if (s == kStatuses[i]) return i;
  return -1;
}

// One check after another; the first failure is kept with its path.
class Check {
 public:
  explicit Check(std::string* err) : err_(err) {}
  bool ok() const { return ok_; }
  bool fail(const std::string& path, const std::string& what) {
    if (ok_) *err_ = path + ": " + what;
    ok_ = false;
    return false;
  }
  // Member `key` of object `o` at `path`: present (when required) and of
  // the kind `want` says. Returns the member, or nullptr.
  const json* member(const json& o, const std::string& path, const char* key, const char* want,
                     bool required) {
    if (!ok_) return nullptr;
    const std::string p = path.empty() ? key : path + "." + key;
    auto it = o.find(key);
    if (it == o.end()) {
      if (required) fail(p, "missing (expected " + std::string(want) + ")");
      return nullptr;
    }
    if (!is(*it, want)) {
      fail(p, "expected " + std::string(want) + ", got " + kind(*it));
      return nullptr;
    }
    return &*it;
  }

  static bool is(const json& v, const std::string& want) {
    if (want == "a string") return v.is_string();
    if (want == "an object") return v.is_object();
    if (want == "an array") return v.is_array();
    if (want == "a boolean") return v.is_boolean();
    if (want == "a non-negative integer") return v.is_number_unsigned();
    if (want == "an integer") return v.is_number_integer();
    if (want == "an integer or null") return v.is_number_integer() || v.is_null();
    if (want == "a non-negative number")
      return v.is_number() && std::isfinite(v.get<double>()) && v.get<double>() >= 0;
    return false;
  }
  static std::string kind(const json& v) {
    if (v.is_number_integer() && !v.is_number_unsigned()) return "a negative integer";
    if (v.is_number_float()) return "a number with a fraction";
    return std::string(v.type_name());
  }

 private:
  std::string* err_;
  bool ok_ = true;
};

// "memtester.log": a plain file name, so it cannot leave reports/<run>/.
bool valid_log_name(const std::string& n) {
  if (n.size() < 5 || n.size() > 64 || n.compare(n.size() - 4, 4, ".log") != 0) return false;
  return storage::valid_store_name(n);
}

void check_inventory(Check& c, const json& inv) {
  const std::string p = "inventory";
  if (const json* cpu = c.member(inv, p, "cpu", "an object", false)) {
    c.member(*cpu, p + ".cpu", "model_name", "a string", false);
    c.member(*cpu, p + ".cpu", "count", "a non-negative integer", false);
    c.member(*cpu, p + ".cpu", "architecture", "a string", false);
  }
  if (const json* mem = c.member(inv, p, "memory", "an object", false)) {
    c.member(*mem, p + ".memory", "total", "a non-negative integer", false);
    c.member(*mem, p + ".memory", "physical_mb", "a non-negative integer", false);
    if (const json* dimms = c.member(*mem, p + ".memory", "dimms", "an array", false))
      for (size_t i = 0; i < dimms->size(); ++i)
        if (!(*dimms)[i].is_object())
          c.fail(p + ".memory.dimms[" + std::to_string(i) + "]",
                 "expected an object, got " + Check::kind((*dimms)[i]));
  }
  if (const json* disks = c.member(inv, p, "disks", "an array", false)) {
    for (size_t i = 0; i < disks->size() && c.ok(); ++i) {
      const std::string dp = p + ".disks[" + std::to_string(i) + "]";
      const json& d = (*disks)[i];
      if (!d.is_object()) {
        c.fail(dp, "expected an object, got " + Check::kind(d));
        break;
      }
      c.member(d, dp, "name", "a string", true);
      c.member(d, dp, "size", "a non-negative integer", false);
      c.member(d, dp, "model", "a string", false);
      c.member(d, dp, "serial", "a string", false);
      c.member(d, dp, "rotational", "a boolean", false);
    }
  }
  if (const json* nics = c.member(inv, p, "interfaces", "an array", false)) {
    for (size_t i = 0; i < nics->size() && c.ok(); ++i) {
      const std::string np = p + ".interfaces[" + std::to_string(i) + "]";
      const json& n = (*nics)[i];
      if (!n.is_object()) {
        c.fail(np, "expected an object, got " + Check::kind(n));
        break;
      }
      c.member(n, np, "name", "a string", true);
      c.member(n, np, "mac_address", "a string", false);
    }
  }
  if (const json* sv = c.member(inv, p, "system_vendor", "an object", false))
    for (const char* k : {"manufacturer", "product_name", "serial_number"})
      c.member(*sv, p + ".system_vendor", k, "a string", false);
  if (const json* boot = c.member(inv, p, "boot", "an object", false))
    c.member(*boot, p + ".boot", "current_boot_mode", "a string", false);
}

void check_step(Check& c, const json& s, size_t i, std::set<std::string>* names) {
  const std::string p = "steps[" + std::to_string(i) + "]";
  if (!s.is_object()) {
    c.fail(p, "expected an object, got " + Check::kind(s));
    return;
  }
  const json* name = c.member(s, p, "name", "a string", true);
  if (name && !storage::valid_store_name(name->get<std::string>()))
    c.fail(p + ".name", "expected a step name ([A-Za-z0-9._-]+)");
  if (name && c.ok() && !names->insert(name->get<std::string>()).second)
    c.fail(p + ".name", "step \"" + name->get<std::string>() + "\" named twice");
  const json* st = c.member(s, p, "status", "a string", true);
  if (st && severity(st->get<std::string>()) < 0)
    c.fail(p + ".status", "\"" + st->get<std::string>().substr(0, 64) +
                              "\": expected one of passed, failed, degraded, timedout, skipped");
  c.member(s, p, "exit_code", "an integer or null", false);
  c.member(s, p, "duration_s", "a non-negative number", false);
  const json* results = c.member(s, p, "results", "an object", false);
  if (results && name && name->get<std::string>() == "memtester") {
    const std::string rp = p + ".results";
    c.member(*results, rp, "bytes_tested", "a non-negative integer", false);
    c.member(*results, rp, "loops", "a non-negative integer", false);
    const json* share = c.member(*results, rp, "ram_share", "a non-negative number", false);
    if (share && share->get<double>() > 1)
      c.fail(rp + ".ram_share", "expected a fraction of RAM from 0 to 1");
  }
}

// Why a memtester log does not back a step status of `claimed` ("" when
// it does). Failures in the log outrank any status but failed; a run that
// ended early, or none at all, only contradicts a pass.
std::string memtester_contradiction(const MemtesterResult& m, const std::string& claimed) {
  if (claimed == "failed") return "";
  if (m.failure_lines > 0 || m.failed > 0) {
    std::string t = "memtester.log shows " + std::to_string(m.failure_lines) + " FAILURE lines";
    if (!m.failed_names.empty()) {
      t += " (failed:";
      for (size_t i = 0; i < m.failed_names.size(); ++i)
        t += (i ? ", " : " ") + m.failed_names[i];
      t += ")";
    }
    return t;
  }
  if (claimed != "passed") return "";
  if (!m.started) return "memtester.log shows no memtester run";
  if (m.ended_early) {
    std::string t = "memtester.log ends before \"Done.\" (killed or timed out";
    for (const MemtesterTest& test : m.tests)
      if (test.outcome == MemtesterTest::kInterrupted)
        t += ", in " + test.name + " of loop " + std::to_string(test.loop);
    return t + ")";
  }
  if (!m.ok()) return "memtester.log shows no finished test";
  return "";
}

// Results the log tells and the node did not send; the node's own values
// are kept. Returns the names filled.
json fill_memtester_results(const MemtesterResult& m, json* results) {
  json passed = json::array(), failed = json::array();
  for (const std::string& n : m.failed_names) failed.push_back(n);
  for (const MemtesterTest& t : m.tests)
    if (t.outcome == MemtesterTest::kPassed &&
        std::find(m.failed_names.begin(), m.failed_names.end(), t.name) == m.failed_names.end() &&
        std::find(passed.begin(), passed.end(), t.name) == passed.end())
      passed.push_back(t.name);
  char mask[16] = "all";
  if (m.testmask) snprintf(mask, sizeof mask, "0x%x", unsigned(*m.testmask));
  const std::pair<const char*, json> from_log[] = {
      {"bytes_tested", m.completed ? m.bytes_tested() : 0},
      {"loops", m.loops_done},
      {"tests_passed", passed},
      {"tests_failed", failed},
      {"failure_lines", m.failure_lines},
      {"testmask", mask},
  };
  json filled = json::array();
  for (const auto& [key, value] : from_log)
    if (!results->contains(key)) {
      (*results)[key] = value;
      filled.push_back(key);
    }
  return filled;
}

// The memtester step checked against the raw log (when both are there):
// a status the log contradicts becomes "failed", with the node's claim
// and the reason kept in the step; missing results are filled.
void check_memtester_log(json* steps, const json& logs) {
  auto log = logs.find("memtester.log");
  if (log == logs.end()) return;
  for (json& step : *steps) {
    if (step["name"] != "memtester") continue;
    const MemtesterResult m = parse_memtester(log->get<std::string>());
    const std::string claimed = step["status"].get<std::string>();
    if (const std::string why = memtester_contradiction(m, claimed); !why.empty()) {
      step["status"] = "failed";
      step["claimed_status"] = claimed;
      step["server_check"] = "the node reported " + claimed + ", but " + why;
    }
    if (!m.started) return;
    if (!step.contains("results")) step["results"] = json::object();
    json filled = fill_memtester_results(m, &step["results"]);
    if (!filled.empty()) step["results"]["filled_from_log"] = std::move(filled);
    return;
  }
}

// The worst status of (checked) steps; *name is the first step with it.
std::string worst_status(const json& steps, std::string* name) {
  int worst = -1;
  for (const json& s : steps)
    if (const int sev = severity(s["status"].get<std::string>()); sev > worst) {
      worst = sev;
      *name = s["name"].get<std::string>();
    }
  return kStatuses[worst];
}

std::string human_mib(uint64_t bytes) {
  return std::to_string(bytes >> 20) + " MiB";
}

}  // namespace

std::string report_summary(const json& doc) {
  std::vector<std::string> bad, facts;
  const std::string overall = doc.value("status", std::string());
  if (doc.contains("steps") && doc["steps"].is_array()) {
    // Steps that did not pass, worst first (stable among equals).
    std::vector<const json*> steps;
    for (const json& s : doc["steps"])
      if (s.is_object()) steps.push_back(&s);
    for (int sev = 4; sev >= 2; --sev)
      for (const json* s : steps)
        if (severity(s->value("status", "")) == sev) {
          std::string t = s->value("name", "?") + " " + s->value("status", "");
          if (s->contains("exit_code") && (*s)["exit_code"].is_number_integer() &&
              (*s)["exit_code"].get<int64_t>() != 0)
            t += " (exit " + std::to_string((*s)["exit_code"].get<int64_t>()) + ")";
          if (s->contains("server_check") && (*s)["server_check"].is_string())
            t += ": " + (*s)["server_check"].get<std::string>();
          bad.push_back(t);
        }
    for (const json* s : steps) {
      if (s->value("name", "") != "memtester" || !s->contains("results")) continue;
      const json& r = (*s)["results"];
      if (!r.is_object() || !r.contains("bytes_tested") || !r["bytes_tested"].is_number_unsigned())
        continue;
      std::string t = "memtester " + human_mib(r["bytes_tested"].get<uint64_t>());
      if (r.contains("ram_share") && r["ram_share"].is_number())
        t += " (" + std::to_string(int(std::lround(r["ram_share"].get<double>() * 100))) +
             " % of RAM)";
      facts.push_back(t);
    }
  }
  if (doc.contains("inventory") && doc["inventory"].is_object()) {
    const json& inv = doc["inventory"];
    if (inv.contains("cpu") && inv["cpu"].is_object() && inv["cpu"].contains("count") &&
        inv["cpu"]["count"].is_number_unsigned())
      facts.push_back(std::to_string(inv["cpu"]["count"].get<uint64_t>()) + " CPUs");
    if (inv.contains("memory") && inv["memory"].is_object() &&
        inv["memory"].contains("physical_mb") && inv["memory"]["physical_mb"].is_number_unsigned())
      facts.push_back(std::to_string(inv["memory"]["physical_mb"].get<uint64_t>()) + " MiB RAM");
  }
  std::string out;
  auto join = [&out](const std::vector<std::string>& v) {
    for (const std::string& s : v) out += (out.empty() ? "" : ", ") + s;
  };
  if (overall == "skipped") out = "every step skipped: nothing was tested";
  else if (overall == "passed") out = "passed:";
  join(bad);
  if (overall == "passed" && !facts.empty()) {
    out += " " + facts[0];
    facts.erase(facts.begin());
  }
  join(facts);
  return out;
}

bool validate_report(const std::string& body, const std::string& node, Report* out,
                     std::string* err) {
  if (body.size() > kReportMaxBytes) {
    *err = "report is " + std::to_string(body.size()) + " bytes, over the limit of " +
           std::to_string(kReportMaxBytes);
    return false;
  }
  json doc;
  try {
    doc = json::parse(body);
  } catch (const json::parse_error& e) {
    std::string what = e.what();
    if (size_t colon = what.find("] "); colon != std::string::npos) what = what.substr(colon + 2);
    *err = "not valid JSON: " + what;
    return false;
  }
  Check c(err);
  if (!doc.is_object()) return c.fail("(report)", "expected an object, got " + Check::kind(doc));
  const json* schema = c.member(doc, "", "schema", "a string", true);
  if (schema && *schema != kSchema)
    return c.fail("schema", "\"" + schema->get<std::string>().substr(0, 64) + "\": expected \"" +
                                kSchema + "\"");
  const json* jnode = c.member(doc, "", "node", "a string", true);
  if (jnode && *jnode != node)
    return c.fail("node", "\"" + jnode->get<std::string>().substr(0, 200) +
                              "\" is not the node of the URL, '" + node + "'");
  const json* run = c.member(doc, "", "run", "a string", true);
  if (run && !storage::valid_store_name(run->get<std::string>()))
    return c.fail("run", "expected a run id ([A-Za-z0-9._-]+, as the boot script gave it)");
  c.member(doc, "", "started", "a string", true);
  c.member(doc, "", "finished", "a string", true);
  if (const json* inv = c.member(doc, "", "inventory", "an object", true))
    check_inventory(c, *inv);
  const json* steps = c.member(doc, "", "steps", "an array", true);
  if (steps && steps->empty()) return c.fail("steps", "empty: a report has at least one step");
  if (steps && steps->size() > kMaxSteps)
    return c.fail("steps", "more than " + std::to_string(kMaxSteps) + " steps");
  std::set<std::string> names;
  for (size_t i = 0; steps && c.ok() && i < steps->size(); ++i) check_step(c, (*steps)[i], i, &names);
  if (!c.ok()) return false;
  std::string worst_step;
  const std::string claimed_overall = worst_status(*steps, &worst_step);
  if (const json* claimed = c.member(doc, "", "status", "a string", false)) {
    if (*claimed != claimed_overall)
      return c.fail("status", "\"" + claimed->get<std::string>().substr(0, 64) +
                                  "\", but the worst step is " + worst_step + ": \"" +
                                  claimed_overall + "\" (the overall status is the worst step's)");
  }
  json logs = json::object();
  if (const json* l = c.member(doc, "", "logs", "an object", false)) {
    if (l->size() > kMaxLogs)
      return c.fail("logs", "more than " + std::to_string(kMaxLogs) + " logs");
    for (const auto& [name, text] : l->items()) {
      const std::string p = "logs[\"" + name.substr(0, 64) + "\"]";
      if (!valid_log_name(name))
        return c.fail(p, "bad log name: expected NAME.log, NAME of letters, digits, '.', '_' "
                         "and '-', not starting with '.', at most 64 characters");
      if (!text.is_string()) return c.fail(p, "expected a string, got " + Check::kind(text));
    }
    logs = *l;
  }
  if (!c.ok()) return false;
  // The node's word checked against its raw log (docs/verification.md).
  check_memtester_log(&doc["steps"], logs);
  const std::string overall = worst_status(doc["steps"], &worst_step);
  doc.erase("logs");
  doc["status"] = overall;
  json files = json::array();
  for (const auto& [name, text] : logs.items()) files.push_back(name);
  doc["log_files"] = files;
  out->node = node;
  out->run = (*run).get<std::string>();
  out->status = overall;
  out->summary = report_summary(doc);
  out->doc = std::move(doc);
  out->logs = std::move(logs);
  return true;
}

bool store_report(const std::string& store_root, const Report& r, std::string* err) {
  const std::string node_dir = store_root + "/nodes/" + r.node;
  if (!storage::valid_store_name(r.node) || !storage::valid_store_name(r.run)) {
    *err = "bad node or run name";
    return false;
  }
  if (access(node_dir.c_str(), F_OK) != 0) {
    *err = "node '" + r.node + "' does not exist";
    return false;
  }
  const std::string dir = node_dir + "/reports";
  auto make = [err](const std::string& d) {
    if (mkdir(d.c_str(), 0750) == 0 || errno == EEXIST) return true;
    *err = d + ": cannot create: " + strerror(errno);
    return false;
  };
  if (!make(dir)) return false;
  const std::string path = dir + "/" + r.run + ".json";
  if (access(path.c_str(), F_OK) == 0) {
    *err = "the report of run '" + r.run + "' is already stored (" + path + ")";
    return false;
  }
  // Logs first, then the report, then `latest`: a crash leaves at worst
  // logs or a report that `latest` does not name yet.
  if (!r.logs.empty()) {
    const std::string logs = dir + "/" + r.run;
    if (!make(logs)) return false;
    for (const auto& [name, text] : r.logs.items())
      if (!valid_log_name(name) ||
          !storage::write_file_durable(logs + "/" + name, text.get<std::string>(), err)) {
        if (!valid_log_name(name)) *err = "bad log name";
        return false;
      }
    if (!storage::sync_dir(dir, err)) return false;
  }
  return storage::write_file_durable(path, r.doc.dump(2) + "\n", err) &&
         storage::write_file_durable(dir + "/latest", r.run + "\n", err);
}

std::optional<json> latest_report(const std::string& store_root, const std::string& node,
                                  std::string* err) {
  err->clear();
  if (!storage::valid_store_name(node)) {
    *err = "bad node name '" + node.substr(0, 200) + "'";
    return std::nullopt;
  }
  const std::string dir = store_root + "/nodes/" + node + "/reports";
  std::string run;
  int err_no = 0;
  if (!storage::read_small_file(dir + "/latest", 4096, &run, err, &err_no)) {
    if (err_no == ENOENT) err->clear();
    return std::nullopt;
  }
  while (!run.empty() && (run.back() == '\n' || run.back() == ' ')) run.pop_back();
  if (!storage::valid_store_name(run)) {
    *err = dir + "/latest: does not name a run";
    return std::nullopt;
  }
  std::string text;
  if (!storage::read_small_file(dir + "/" + run + ".json", kReportMaxBytes, &text, err))
    return std::nullopt;
  json doc = json::parse(text, nullptr, false);
  if (!doc.is_object()) {
    *err = dir + "/" + run + ".json: not a JSON object";
    return std::nullopt;
  }
  return doc;
}

}  // namespace lifecycle
