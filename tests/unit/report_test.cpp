// lifecycle/report: the validator (each kind of bad input, with the path it
// names), the overall status, normalisation, and storage in a real
// directory.
#include "lifecycle/report.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

namespace lifecycle {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kNode = "52-54-00-12-34-56";

// Captured output (tests/data/README.md says how each was made).
std::string fixture(const std::string& name) {
  std::ifstream f(std::string(NBDROOT_TEST_DATA) + "/" + name, std::ios::binary);
  EXPECT_TRUE(f) << name;
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

json good() {
  return {
      {"schema", "nbdroot.report/1"},
      {"node", kNode},
      {"run", "20261204T201500Z-3fa9c2"},
      {"started", "2026-12-04T20:15:00Z"},
      {"finished", "2026-12-04T20:17:00Z"},
      {"inventory",
       {{"cpu", {{"model_name", "QEMU Virtual CPU"}, {"count", 2}, {"architecture", "x86_64"}}},
        {"memory", {{"total", 536870912}, {"physical_mb", 512}, {"dimms", json::array()}}},
        {"disks", json::array()},
        {"interfaces", {{{"name", "eth0"}, {"mac_address", "52:54:00:12:34:56"}}}},
        {"system_vendor",
         {{"manufacturer", "QEMU"}, {"product_name", "Standard PC"}, {"serial_number", ""}}},
        {"boot", {{"current_boot_mode", "bios"}}}}},
      {"steps",
       {{{"name", "kernel_memtest"}, {"status", "passed"}, {"exit_code", 0}, {"duration_s", 1.5},
         {"results", json::object()}},
        {{"name", "memtester"},
         {"status", "passed"},
         {"exit_code", 0},
         {"duration_s", 60},
         {"results", {{"bytes_tested", 432013312}, {"ram_share", 0.83}, {"loops", 1}}}},
        {{"name", "stress_ng"}, {"status", "skipped"}, {"exit_code", nullptr}, {"duration_s", 0}}}},
      {"logs", {{"memtester.log", fixture("memtester-4.6-vm-388M-mask1.txt")}}}};
}

bool validate(const json& j, Report* r, std::string* err) {
  return validate_report(j.dump(), kNode, r, err);
}

// The error for `j`, expecting it to be refused.
std::string refusal(const json& j) {
  Report r;
  std::string err;
  EXPECT_FALSE(validate(j, &r, &err)) << j.dump();
  return err;
}

TEST(ReportValidate, GoodReportIsNormalised) {
  Report r;
  std::string err;
  ASSERT_TRUE(validate(good(), &r, &err)) << err;
  EXPECT_EQ(r.status, "passed");
  EXPECT_EQ(r.node, kNode);
  EXPECT_EQ(r.run, "20261204T201500Z-3fa9c2");
  EXPECT_EQ(r.doc["status"], "passed");
  EXPECT_FALSE(r.doc.contains("logs"));
  EXPECT_EQ(r.doc["log_files"], json::array({"memtester.log"}));
  EXPECT_EQ(r.logs["memtester.log"], good()["logs"]["memtester.log"]);
  EXPECT_EQ(r.summary, "passed: memtester 412 MiB (83 % of RAM), 2 CPUs, 512 MiB RAM");
  // A claimed status that is the worst step's is accepted.
  json j = good();
  j["status"] = "passed";
  EXPECT_TRUE(validate(j, &r, &err)) << err;
  // Unknown members are kept (later schema additions, tools' extras).
  j["extra"] = {{"anything", 1}};
  ASSERT_TRUE(validate(j, &r, &err)) << err;
  EXPECT_EQ(r.doc["extra"]["anything"], 1);
}

TEST(ReportValidate, OverallIsTheWorstStep) {
  struct Case {
    std::vector<std::string> statuses;
    std::string overall;
  } cases[] = {{{"passed", "skipped"}, "passed"},
               {{"skipped", "skipped"}, "skipped"},
               {{"passed", "degraded"}, "degraded"},
               {{"degraded", "timedout", "passed"}, "timedout"},
               {{"timedout", "failed", "degraded"}, "failed"},
               {{"failed", "passed"}, "failed"}};
  for (const Case& c : cases) {
    json j = good();
    j["steps"] = json::array();
    for (size_t i = 0; i < c.statuses.size(); ++i)
      j["steps"].push_back({{"name", "s" + std::to_string(i)}, {"status", c.statuses[i]}});
    Report r;
    std::string err;
    ASSERT_TRUE(validate(j, &r, &err)) << err;
    EXPECT_EQ(r.status, c.overall);
    EXPECT_EQ(r.doc["status"], c.overall);
  }
}

TEST(ReportValidate, FailingSummaryNamesWorstStepsFirst) {
  json j = good();
  j["steps"][1]["status"] = "failed";
  j["steps"][1]["exit_code"] = 2;
  j["steps"][0]["status"] = "degraded";
  Report r;
  std::string err;
  ASSERT_TRUE(validate(j, &r, &err)) << err;
  EXPECT_EQ(r.status, "failed");
  EXPECT_EQ(r.summary.rfind("memtester failed (exit 2), kernel_memtest degraded", 0), 0u)
      << r.summary;
  j = good();
  for (auto& s : j["steps"]) s["status"] = "skipped";
  ASSERT_TRUE(validate(j, &r, &err)) << err;
  EXPECT_EQ(r.status, "skipped");
  EXPECT_EQ(r.summary.rfind("every step skipped", 0), 0u) << r.summary;
}

// The server reads memtester.log itself: a log that shows failures, or a
// run that never got to "Done.", makes the step failed whatever the node
// claimed (the claim is kept beside it), so such a node never becomes ready.
json with_memtester_log(const std::string& fixture_name, const std::string& claimed) {
  json j = good();
  j["logs"]["memtester.log"] = fixture(fixture_name);
  j["steps"][1]["status"] = claimed;
  j["status"] = claimed;
  return j;
}

TEST(ReportMemtesterLog, FailuresInTheLogOverrideAPassedClaim) {
  Report r;
  std::string err;
  ASSERT_TRUE(validate(with_memtester_log("memtester-4.6-mask2-failures.txt", "passed"), &r, &err))
      << err;
  const json& step = r.doc["steps"][1];
  EXPECT_EQ(step["status"], "failed");
  EXPECT_EQ(step["claimed_status"], "passed");
  const std::string check = step["server_check"].get<std::string>();
  EXPECT_NE(check.find("8 FAILURE lines"), std::string::npos) << check;
  EXPECT_NE(check.find("Compare XOR"), std::string::npos) << check;
  EXPECT_EQ(r.status, "failed");
  EXPECT_EQ(r.doc["status"], "failed");
  // The failed node's reason names the contradiction.
  EXPECT_EQ(r.summary.rfind("memtester failed: the node reported passed, but memtester.log", 0),
            0u)
      << r.summary;
  // The raw log is kept as it came.
  EXPECT_EQ(r.logs["memtester.log"], fixture("memtester-4.6-mask2-failures.txt"));
  // degraded, skipped: still less than what the log shows.
  for (const char* claim : {"degraded", "skipped", "timedout"}) {
    json j = with_memtester_log("memtester-4.6-mask2-failures.txt", claim);
    j.erase("status");  // "skipped" is not the worst of the steps as sent
    ASSERT_TRUE(validate(j, &r, &err)) << err;
    EXPECT_EQ(r.status, "failed") << claim;
    EXPECT_EQ(r.doc["steps"][1]["claimed_status"], claim);
  }
}

TEST(ReportMemtesterLog, AnEarlyEndOverridesAPassedClaim) {
  Report r;
  std::string err;
  ASSERT_TRUE(validate(with_memtester_log("memtester-4.6-killed.txt", "passed"), &r, &err)) << err;
  EXPECT_EQ(r.status, "failed");
  const std::string check = r.doc["steps"][1]["server_check"].get<std::string>();
  EXPECT_NE(check.find("ends before \"Done.\""), std::string::npos) << check;
  EXPECT_NE(check.find("Stuck Address"), std::string::npos) << check;
  // A node that says it timed out is right: nothing to correct.
  ASSERT_TRUE(validate(with_memtester_log("memtester-4.6-killed.txt", "timedout"), &r, &err))
      << err;
  EXPECT_EQ(r.status, "timedout");
  EXPECT_FALSE(r.doc["steps"][1].contains("claimed_status"));
}

TEST(ReportMemtesterLog, ALogWithoutAMemtesterRunDoesNotPass) {
  json j = good();
  j["logs"]["memtester.log"] = "memtester: command not found\n";
  Report r;
  std::string err;
  ASSERT_TRUE(validate(j, &r, &err)) << err;
  EXPECT_EQ(r.status, "failed");
  EXPECT_NE(r.doc["steps"][1]["server_check"].get<std::string>().find("no memtester run"),
            std::string::npos);
  // A skipped step with such a log is what the initrd sends without memtester.
  j["steps"][1]["status"] = "skipped";
  ASSERT_TRUE(validate(j, &r, &err)) << err;
  EXPECT_EQ(r.doc["steps"][1]["status"], "skipped");
  EXPECT_FALSE(r.doc["steps"][1].contains("server_check"));
}

TEST(ReportMemtesterLog, ACleanLogKeepsTheClaimAndFillsResults) {
  Report r;
  std::string err;
  json j = with_memtester_log("memtester-4.6-pass-4M.txt", "passed");
  j["steps"][1]["results"] = {{"bytes_tested", 4194304}, {"ram_share", 0.5}};
  ASSERT_TRUE(validate(j, &r, &err)) << err;
  EXPECT_EQ(r.status, "passed");
  const json& res = r.doc["steps"][1]["results"];
  EXPECT_EQ(res["bytes_tested"], 4194304);  // sent: kept
  EXPECT_EQ(res["ram_share"], 0.5);
  EXPECT_EQ(res["loops"], 1);  // filled from the log
  ASSERT_TRUE(res["tests_passed"].is_array());
  EXPECT_EQ(res["tests_passed"].size(), 18u);
  EXPECT_EQ(res["tests_passed"][0], "Stuck Address");
  EXPECT_EQ(res["tests_passed"][17], "16-bit Writes");
  EXPECT_EQ(res["tests_failed"], json::array());
  EXPECT_EQ(res["failure_lines"], 0);
  EXPECT_EQ(res["testmask"], "all");
  EXPECT_EQ(res["filled_from_log"],
            json::array({"loops", "tests_passed", "tests_failed", "failure_lines", "testmask"}));
  EXPECT_FALSE(r.doc["steps"][1].contains("server_check"));
  // What the node sent wins over the log where both say something.
  j["steps"][1]["results"]["loops"] = 1;
  j["steps"][1]["results"]["testmask"] = "0xffff";
  ASSERT_TRUE(validate(j, &r, &err)) << err;
  EXPECT_EQ(r.doc["steps"][1]["results"]["testmask"], "0xffff");
  EXPECT_EQ(r.doc["steps"][1]["results"]["filled_from_log"],
            json::array({"tests_passed", "tests_failed", "failure_lines"}));
  // A step without results gets them from the log.
  j["steps"][1].erase("results");
  j["logs"]["memtester.log"] = fixture("memtester-4.6-vm-388M-mask1.txt");
  ASSERT_TRUE(validate(j, &r, &err)) << err;
  EXPECT_EQ(r.doc["steps"][1]["results"]["bytes_tested"], 406847488);
  EXPECT_EQ(r.doc["steps"][1]["results"]["testmask"], "0x1");
  EXPECT_EQ(r.doc["steps"][1]["results"]["tests_passed"],
            json::array({"Stuck Address", "Random Value"}));
}

TEST(ReportMemtesterLog, AFailedClaimOnACleanLogStaysFailed) {
  // nbdroot.fake_memtester_fail=1, or a failure the log cannot show: the
  // server never turns a step the node failed into a pass.
  Report r;
  std::string err;
  ASSERT_TRUE(validate(with_memtester_log("memtester-4.6-pass-4M.txt", "failed"), &r, &err)) << err;
  EXPECT_EQ(r.status, "failed");
  EXPECT_FALSE(r.doc["steps"][1].contains("claimed_status"));
}

TEST(ReportMemtesterLog, NoLogOrNoStepChangesNothing) {
  json j = good();
  j["logs"].erase("memtester.log");
  Report r;
  std::string err;
  ASSERT_TRUE(validate(j, &r, &err)) << err;
  EXPECT_EQ(r.status, "passed");
  EXPECT_EQ(r.doc["steps"][1]["results"], good()["steps"][1]["results"]);
  j = with_memtester_log("memtester-4.6-mask2-failures.txt", "passed");
  j["steps"].erase(1);  // no memtester step: the log is kept, nothing is checked
  ASSERT_TRUE(validate(j, &r, &err)) << err;
  EXPECT_EQ(r.status, "passed");
}

TEST(ReportValidate, BadJson) {
  Report r;
  std::string err;
  EXPECT_FALSE(validate_report("{\"schema\": ", kNode, &r, &err));
  EXPECT_EQ(err.rfind("not valid JSON: ", 0), 0u) << err;
  EXPECT_NE(err.find("column"), std::string::npos) << err;
  EXPECT_FALSE(validate_report("", kNode, &r, &err));
  EXPECT_EQ(err.rfind("not valid JSON", 0), 0u) << err;
  EXPECT_FALSE(validate_report("[1,2]", kNode, &r, &err));
  EXPECT_EQ(err, "(report): expected an object, got array");
  EXPECT_FALSE(validate_report("{} trailing", kNode, &r, &err));
  EXPECT_EQ(err.rfind("not valid JSON", 0), 0u) << err;
}

TEST(ReportValidate, Oversize) {
  std::string body = good().dump();
  body.append(kReportMaxBytes + 1 - body.size(), ' ');
  Report r;
  std::string err;
  EXPECT_FALSE(validate_report(body, kNode, &r, &err));
  EXPECT_NE(err.find("over the limit of 8388608"), std::string::npos) << err;
  // Just at the limit is fine.
  body.pop_back();
  EXPECT_TRUE(validate_report(body, kNode, &r, &err)) << err;
}

TEST(ReportValidate, MissingAndWrongTypes) {
  json j = good();
  j.erase("run");
  EXPECT_EQ(refusal(j), "run: missing (expected a string)");
  j = good();
  j["node"] = 5;
  EXPECT_EQ(refusal(j), "node: expected a string, got number");
  j = good();
  j["steps"] = json::array({json::array({"name", "x"})});
  EXPECT_EQ(refusal(j), "steps[0]: expected an object, got array");
  j = good();
  j["steps"] = json::array();
  EXPECT_EQ(refusal(j), "steps: empty: a report has at least one step");
  j = good();
  j["steps"] = json::object();
  EXPECT_EQ(refusal(j), "steps: expected an array, got object");
  j = good();
  j["steps"][1]["exit_code"] = "0";
  EXPECT_EQ(refusal(j), "steps[1].exit_code: expected an integer or null, got string");
  j = good();
  j["steps"][1]["duration_s"] = -1;
  EXPECT_EQ(refusal(j), "steps[1].duration_s: expected a non-negative number, got a negative integer");
  j = good();
  j["steps"][1]["results"]["bytes_tested"] = 1.5;
  EXPECT_EQ(refusal(j),
            "steps[1].results.bytes_tested: expected a non-negative integer, got a number with a "
            "fraction");
  j = good();
  j["steps"][1]["results"]["ram_share"] = 83;
  EXPECT_EQ(refusal(j), "steps[1].results.ram_share: expected a fraction of RAM from 0 to 1");
  j = good();
  j["steps"][2]["name"] = "memtester";
  EXPECT_EQ(refusal(j), "steps[2].name: step \"memtester\" named twice");
  j = good();
  j["steps"][0]["name"] = "../x";
  EXPECT_EQ(refusal(j), "steps[0].name: expected a step name ([A-Za-z0-9._-]+)");
  j = good();
  j["inventory"]["cpu"]["count"] = "2";
  EXPECT_EQ(refusal(j), "inventory.cpu.count: expected a non-negative integer, got string");
  j = good();
  j["inventory"]["interfaces"][0].erase("name");
  EXPECT_EQ(refusal(j), "inventory.interfaces[0].name: missing (expected a string)");
  j = good();
  j["inventory"]["disks"] = {{{"name", "vda"}, {"rotational", "yes"}}};
  EXPECT_EQ(refusal(j), "inventory.disks[0].rotational: expected a boolean, got string");
  j = good();
  j["inventory"]["memory"]["dimms"] = {1};
  EXPECT_EQ(refusal(j), "inventory.memory.dimms[0]: expected an object, got number");
  j = good();
  j.erase("inventory");
  EXPECT_EQ(refusal(j), "inventory: missing (expected an object)");
  j = good();
  j["schema"] = "nbdroot.report/2";
  EXPECT_EQ(refusal(j), "schema: \"nbdroot.report/2\": expected \"nbdroot.report/1\"");
  j = good();
  j["run"] = "../../etc";
  EXPECT_EQ(refusal(j).rfind("run: expected a run id", 0), 0u);
}

TEST(ReportValidate, UnknownStatus) {
  json j = good();
  j["steps"][1]["status"] = "ok";
  EXPECT_EQ(refusal(j),
            "steps[1].status: \"ok\": expected one of passed, failed, degraded, timedout, skipped");
  j = good();
  j["steps"][1].erase("status");
  EXPECT_EQ(refusal(j), "steps[1].status: missing (expected a string)");
}

TEST(ReportValidate, NodeMismatch) {
  json j = good();
  j["node"] = "52-54-00-aa-bb-cc";
  EXPECT_EQ(refusal(j),
            std::string("node: \"52-54-00-aa-bb-cc\" is not the node of the URL, '") + kNode + "'");
}

TEST(ReportValidate, ClaimedStatusMustBeTheWorst) {
  json j = good();
  j["steps"][1]["status"] = "failed";
  j["status"] = "passed";
  EXPECT_EQ(refusal(j),
            "status: \"passed\", but the worst step is memtester: \"failed\" (the overall status "
            "is the worst step's)");
  j["status"] = 1;
  EXPECT_EQ(refusal(j), "status: expected a string, got number");
}

TEST(ReportValidate, BadLogNames) {
  for (const char* name : {"../state.json", "../../x.log", ".hidden.log", "memtester",
                           "a/b.log", "log", ".log", "x.log\n", "x y.log"}) {
    json j = good();
    j["logs"] = {{name, "text"}};
    EXPECT_NE(refusal(j).find("bad log name"), std::string::npos) << name;
  }
  json j = good();
  j["logs"] = {{std::string(61, 'a') + ".log", "x"}};
  EXPECT_NE(refusal(j).find("bad log name"), std::string::npos);
  j["logs"] = {{"memtester.log", 5}};
  EXPECT_EQ(refusal(j), "logs[\"memtester.log\"]: expected a string, got number");
  j["logs"] = "text";
  EXPECT_EQ(refusal(j), "logs: expected an object, got string");
}

class ReportStore : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/report_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    fs::create_directories(root_ + "/nodes/" + kNode);
  }
  void TearDown() override { fs::remove_all(root_); }
  std::string reports() const { return root_ + "/nodes/" + kNode + "/reports"; }
  std::string root_;
};

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST_F(ReportStore, StoresReportLogsAndLatest) {
  std::string err;
  EXPECT_FALSE(latest_report(root_, kNode, &err));
  EXPECT_TRUE(err.empty()) << err;
  Report r;
  ASSERT_TRUE(validate(good(), &r, &err)) << err;
  ASSERT_TRUE(store_report(root_, r, &err)) << err;
  EXPECT_EQ(slurp(reports() + "/latest"), r.run + "\n");
  EXPECT_EQ(slurp(reports() + "/" + r.run + "/memtester.log"),
            good()["logs"]["memtester.log"].get<std::string>());
  auto latest = latest_report(root_, kNode, &err);
  ASSERT_TRUE(latest) << err;
  EXPECT_EQ(*latest, r.doc);
  // A second run becomes the latest; the first stays.
  json j = good();
  j["run"] = "20261204T210000Z-000001";
  j.erase("logs");
  j["steps"][1]["status"] = "failed";
  Report r2;
  ASSERT_TRUE(validate(j, &r2, &err)) << err;
  ASSERT_TRUE(store_report(root_, r2, &err)) << err;
  EXPECT_EQ((*latest_report(root_, kNode, &err))["status"], "failed");
  EXPECT_TRUE(fs::exists(reports() + "/" + r.run + ".json"));
  EXPECT_FALSE(fs::exists(reports() + "/" + r2.run));  // no logs, no directory
  for (const auto& e : fs::directory_iterator(reports()))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
}

TEST_F(ReportStore, ARunIsStoredOnce) {
  Report r;
  std::string err;
  ASSERT_TRUE(validate(good(), &r, &err)) << err;
  ASSERT_TRUE(store_report(root_, r, &err)) << err;
  const std::string before = slurp(reports() + "/" + r.run + ".json");
  r.doc["status"] = "failed";
  EXPECT_FALSE(store_report(root_, r, &err));
  EXPECT_NE(err.find("already stored"), std::string::npos) << err;
  EXPECT_EQ(slurp(reports() + "/" + r.run + ".json"), before);
}

TEST_F(ReportStore, UnknownNodeIsRefused) {
  Report r;
  std::string err;
  ASSERT_TRUE(validate_report([] {
    json j = good();
    j["node"] = "other";
    return j.dump();
  }(), "other", &r, &err)) << err;
  EXPECT_FALSE(store_report(root_, r, &err));
  EXPECT_EQ(err, "node 'other' does not exist");
  EXPECT_FALSE(fs::exists(root_ + "/nodes/other"));
}

TEST_F(ReportStore, CorruptLatestIsAnError) {
  fs::create_directories(reports());
  std::ofstream(reports() + "/latest") << "../../../etc/passwd\n";
  std::string err;
  EXPECT_FALSE(latest_report(root_, kNode, &err));
  EXPECT_NE(err.find("does not name a run"), std::string::npos) << err;
  std::ofstream(reports() + "/latest") << "run-1\n";
  std::ofstream(reports() + "/run-1.json") << "{oops";
  EXPECT_FALSE(latest_report(root_, kNode, &err));
  EXPECT_NE(err.find("run-1.json: not a JSON object"), std::string::npos) << err;
  EXPECT_FALSE(latest_report(root_, "../x", &err));
  EXPECT_NE(err.find("bad node name"), std::string::npos) << err;
}

}  // namespace
}  // namespace lifecycle
