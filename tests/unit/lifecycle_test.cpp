// lifecycle::Lifecycle on a real store directory: every transition, the
// deadlines with a clock the test drives, the NBD side's may_attach, and
// state.json's durability and locking.
#include "lifecycle/lifecycle.hpp"
#include "lifecycle/parsers.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>
#include <thread>

namespace lifecycle {
namespace {

namespace fs = std::filesystem;

constexpr const char* kNode = "52-54-00-12-34-56";
constexpr int64_t kT0 = 1'800'000'000;

class LifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/lifecycle_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    fs::create_directories(root_ + "/nodes");
    d_.verify_s = 1000;
    d_.heartbeat_s = 100;
    d_.memtest_s = 0;
  }
  void TearDown() override { fs::remove_all(root_); }

  std::string dir(const std::string& node = kNode) const { return root_ + "/nodes/" + node; }
  // A node registered the way the store does it (node.json only).
  void registered(const std::string& node = kNode) {
    fs::create_directories(dir(node));
    std::ofstream(dir(node) + "/node.json") << "{}\n";
  }
  void write_state(const std::string& text, const std::string& node = kNode) {
    fs::create_directories(dir(node));
    std::ofstream(dir(node) + "/state.json") << text;
  }
  nlohmann::json read_state(const std::string& node = kNode) const {
    std::ifstream in(dir(node) + "/state.json");
    std::stringstream ss;
    ss << in.rdbuf();
    return nlohmann::json::parse(ss.str());
  }
  // Boots a node under `lc` and returns the record after the fetch.
  NodeLife boot(Lifecycle& lc, int64_t now, const std::string& node = kNode) {
    BootDecision bd;
    std::string err;
    EXPECT_TRUE(lc.on_boot_script(node, {}, now, &bd, &err)) << err;
    return bd.life;
  }

  std::string root_;
  Deadlines d_;
};

TEST(LifecycleNames, StatesAndPoliciesParse) {
  for (State s : {State::kNew, State::kVerify, State::kReady, State::kFailed, State::kRetired}) {
    State back;
    ASSERT_TRUE(parse_state(to_string(s), &back));
    EXPECT_EQ(back, s);
  }
  State s;
  EXPECT_FALSE(parse_state("Ready", &s));
  EXPECT_FALSE(parse_state("", &s));
  NewNodes n;
  EXPECT_TRUE(parse_new_nodes("verify", &n));
  EXPECT_EQ(n, NewNodes::kVerify);
  EXPECT_TRUE(parse_new_nodes("refuse", &n));
  EXPECT_EQ(n, NewNodes::kRefuse);
  EXPECT_TRUE(parse_new_nodes("ready", &n));
  EXPECT_EQ(n, NewNodes::kReady);
  EXPECT_FALSE(parse_new_nodes("auto", &n));
}

TEST_F(LifecycleTest, UnknownNodeUnderReadyIsCreatedReady) {
  Lifecycle lc(root_, NewNodes::kReady, d_);
  BootDecision bd;
  std::string err;
  ASSERT_TRUE(lc.on_boot_script(kNode, {"u-1", "SN1", "efi", "52:54:00:12:34:56"}, kT0, &bd, &err))
      << err;
  EXPECT_TRUE(bd.created);
  EXPECT_EQ(bd.life.state, State::kReady);
  EXPECT_EQ(bd.life.boots, 1u);
  EXPECT_EQ(bd.life.last_seen, kT0);
  EXPECT_EQ(bd.life.hints.serial, "SN1");
  EXPECT_TRUE(bd.life.run.empty());
  ASSERT_EQ(bd.life.history.size(), 1u);
  EXPECT_EQ(bd.life.history[0].from, State::kNew);
  EXPECT_EQ(bd.life.history[0].to, State::kReady);
  EXPECT_EQ(bd.life.history[0].by, "http");
  EXPECT_EQ(read_state()["state"], "ready");
  // The next fetch finds it: not created, one more boot, hints kept.
  ASSERT_TRUE(lc.on_boot_script(kNode, {}, kT0 + 5, &bd, &err)) << err;
  EXPECT_FALSE(bd.created);
  EXPECT_EQ(bd.life.boots, 2u);
  EXPECT_EQ(bd.life.hints.serial, "SN1");
  EXPECT_EQ(bd.life.history.size(), 1u);
  EXPECT_TRUE(lc.may_attach(kNode, &err)) << err;
}

TEST_F(LifecycleTest, UnknownNodeUnderVerifyStartsARun) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife l = boot(lc, kT0);
  EXPECT_EQ(l.state, State::kVerify);
  EXPECT_FALSE(l.run.empty());
  EXPECT_EQ(l.step, "linux");
  EXPECT_EQ(l.run_started, kT0);
  EXPECT_EQ(l.deadline, kT0 + d_.heartbeat_s);
  ASSERT_EQ(l.history.size(), 1u);
  EXPECT_EQ(l.history[0].to, State::kVerify);
  std::string why;
  EXPECT_FALSE(lc.may_attach(kNode, &why));
  EXPECT_NE(why.find("in state verify"), std::string::npos) << why;
  // The record on disk says the same.
  auto j = read_state();
  EXPECT_EQ(j["run"], l.run);
  EXPECT_EQ(j["deadline"], l.deadline);
}

TEST_F(LifecycleTest, UnknownNodeUnderRefuseIsRefusedAndNothingIsWritten) {
  Lifecycle lc(root_, NewNodes::kRefuse, d_);
  BootDecision bd;
  std::string err;
  EXPECT_FALSE(lc.on_boot_script(kNode, {}, kT0, &bd, &err));
  EXPECT_NE(err.find("--new-nodes refuse"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(dir()));
  // A registered node is known: it boots (ready), under refuse too.
  registered();
  err.clear();
  ASSERT_TRUE(lc.on_boot_script(kNode, {}, kT0, &bd, &err)) << err;
  EXPECT_FALSE(bd.created);
  EXPECT_EQ(bd.life.state, State::kReady);
}

TEST_F(LifecycleTest, RegisteredNodeWithoutStateIsReadyUnderEveryPolicy) {
  registered();
  for (NewNodes p : {NewNodes::kReady, NewNodes::kVerify, NewNodes::kRefuse}) {
    Lifecycle lc(root_, p, d_);
    std::string err;
    auto l = lc.get(kNode, &err);
    ASSERT_TRUE(l) << err;
    EXPECT_EQ(l->state, State::kReady);
    EXPECT_TRUE(lc.may_attach(kNode, &err)) << err;
  }
  EXPECT_FALSE(fs::exists(dir() + "/state.json"));  // reading writes nothing
}

TEST_F(LifecycleTest, UnknownNodeMayAttachOnlyUnderReady) {
  std::string why;
  EXPECT_TRUE(Lifecycle(root_, NewNodes::kReady, d_).may_attach(kNode, &why));
  EXPECT_FALSE(Lifecycle(root_, NewNodes::kVerify, d_).may_attach(kNode, &why));
  EXPECT_NE(why.find("unknown"), std::string::npos) << why;
  EXPECT_NE(why.find("--new-nodes verify"), std::string::npos) << why;
  EXPECT_FALSE(Lifecycle(root_, NewNodes::kRefuse, d_).may_attach(kNode, &why));
  EXPECT_NE(why.find("--new-nodes refuse"), std::string::npos) << why;
  EXPECT_FALSE(fs::exists(dir()));
  std::string err;
  EXPECT_FALSE(Lifecycle(root_, NewNodes::kReady, d_).get(kNode, &err));
  EXPECT_TRUE(err.empty()) << err;  // unknown is not an error
}

TEST_F(LifecycleTest, HeartbeatExtendsTheDeadlineButNeverPastTheRun) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife l = boot(lc, kT0);
  std::string err;
  ASSERT_TRUE(lc.on_heartbeat(kNode, l.run, "memtester", kT0 + 50, &err)) << err;
  auto now = lc.get(kNode, &err);
  EXPECT_EQ(now->deadline, kT0 + 50 + d_.heartbeat_s);
  EXPECT_EQ(now->task, "memtester");
  EXPECT_EQ(now->last_seen, kT0 + 50);
  // Heartbeats every 90 s keep it alive, up to run_started + verify_s.
  int64_t t = kT0 + 50;
  while (t + 90 < kT0 + d_.verify_s) {
    t += 90;
    ASSERT_TRUE(lc.on_heartbeat(kNode, l.run, "memtester", t, &err)) << err;
    EXPECT_LE(lc.get(kNode, &err)->deadline, kT0 + d_.verify_s);
  }
  EXPECT_EQ(lc.get(kNode, &err)->deadline, kT0 + d_.verify_s);
  EXPECT_TRUE(lc.sweep(kT0 + d_.verify_s).empty());
  EXPECT_EQ(lc.sweep(kT0 + d_.verify_s + 1), std::vector<std::string>{kNode});
  EXPECT_EQ(lc.get(kNode, &err)->reason, "timed out in memtester");
}

TEST_F(LifecycleTest, HeartbeatOfAnotherRunOrANodeNotVerifyingIsRefused) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife l = boot(lc, kT0);
  std::string err;
  EXPECT_FALSE(lc.on_heartbeat(kNode, "some-other-run", "memtester", kT0 + 1, &err));
  EXPECT_NE(err.find("current run"), std::string::npos) << err;
  EXPECT_EQ(lc.get(kNode, &err)->deadline, l.deadline);
  EXPECT_FALSE(lc.on_heartbeat("no-such-node", l.run, "x", kT0 + 1, &err));
  EXPECT_NE(err.find("does not exist"), std::string::npos) << err;
  EXPECT_FALSE(lc.on_heartbeat("../etc", l.run, "x", kT0 + 1, &err));
  EXPECT_NE(err.find("bad node name"), std::string::npos) << err;
  ASSERT_TRUE(lc.set_state(kNode, State::kReady, "admin", "", kT0 + 2, &err)) << err;
  EXPECT_FALSE(lc.on_heartbeat(kNode, l.run, "memtester", kT0 + 3, &err));
  EXPECT_NE(err.find("not verifying"), std::string::npos) << err;
}

TEST_F(LifecycleTest, HeartbeatAfterTheDeadlineFailsTheRun) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife l = boot(lc, kT0);
  std::string err;
  EXPECT_FALSE(lc.on_heartbeat(kNode, l.run, "memtester", l.deadline + 1, &err));
  EXPECT_NE(err.find("timed out"), std::string::npos) << err;
  auto now = lc.get(kNode, &err);
  EXPECT_EQ(now->state, State::kFailed);
  EXPECT_EQ(now->reason, "timed out in linux");
}

TEST_F(LifecycleTest, PassingReportMakesTheNodeReady) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife l = boot(lc, kT0);
  std::string err;
  ASSERT_TRUE(lc.on_report(kNode, l.run, "passed", "passed: memtester 412 MiB", kT0 + 60, &err))
      << err;
  auto now = lc.get(kNode, &err);
  EXPECT_EQ(now->state, State::kReady);
  EXPECT_NE(now->reason.find("passed"), std::string::npos);
  EXPECT_TRUE(now->run.empty());
  EXPECT_EQ(now->deadline, 0);
  EXPECT_EQ(now->history.back().by, "report");
  EXPECT_TRUE(lc.may_attach(kNode, &err)) << err;
  // The run is over: it cannot report again, and the node boots its root.
  EXPECT_FALSE(lc.on_report(kNode, l.run, "failed", "x", kT0 + 61, &err));
  EXPECT_EQ(boot(lc, kT0 + 70).state, State::kReady);
  EXPECT_TRUE(lc.sweep(kT0 + 100000).empty());
}

TEST_F(LifecycleTest, FailingReportMakesTheNodeFailedNamingTheWorstStep) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife l = boot(lc, kT0);
  std::string err;
  ASSERT_TRUE(lc.on_report(kNode, l.run, "failed", "memtester failed (exit 2)", kT0 + 60, &err))
      << err;
  auto now = lc.get(kNode, &err);
  EXPECT_EQ(now->state, State::kFailed);
  EXPECT_EQ(now->reason, "memtester failed (exit 2)");
  std::string why;
  EXPECT_FALSE(lc.may_attach(kNode, &why));
  EXPECT_EQ(why, std::string("node ") + kNode +
                     " is in state failed (memtester failed (exit 2)): it may not attach its root");
  // A failed node boots nothing new: fetching again changes nothing.
  EXPECT_EQ(boot(lc, kT0 + 70).state, State::kFailed);
}

TEST_F(LifecycleTest, SkippedOrDegradedReportIsNotAPass) {
  for (const char* overall : {"skipped", "degraded", "timedout"}) {
    fs::remove_all(dir());
    Lifecycle lc(root_, NewNodes::kVerify, d_);
    NodeLife l = boot(lc, kT0);
    std::string err;
    ASSERT_TRUE(lc.on_report(kNode, l.run, overall, "", kT0 + 1, &err)) << err;
    auto now = lc.get(kNode, &err);
    EXPECT_EQ(now->state, State::kFailed) << overall;
    EXPECT_NE(now->reason.find(overall), std::string::npos) << now->reason;
  }
}

TEST_F(LifecycleTest, ReportOfAnotherRunChangesNothing) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife l = boot(lc, kT0);
  const std::string before = read_state().dump();
  std::string err;
  EXPECT_FALSE(lc.on_report(kNode, "20260101T000000Z-000000", "passed", "", kT0 + 1, &err));
  EXPECT_NE(err.find(l.run), std::string::npos) << err;
  EXPECT_EQ(read_state().dump(), before);
}

TEST_F(LifecycleTest, LateReportIsATimeout) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife l = boot(lc, kT0);
  std::string err;
  EXPECT_FALSE(lc.on_report(kNode, l.run, "passed", "", l.deadline + 1, &err));
  EXPECT_NE(err.find("timed out"), std::string::npos) << err;
  EXPECT_EQ(lc.get(kNode, &err)->state, State::kFailed);
}

TEST_F(LifecycleTest, RebootDuringTheLinuxStepFails) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife l = boot(lc, kT0);
  std::string err;
  ASSERT_TRUE(lc.on_heartbeat(kNode, l.run, "stress_ng", kT0 + 10, &err)) << err;
  NodeLife again = boot(lc, kT0 + 20);
  EXPECT_EQ(again.state, State::kFailed);
  EXPECT_NE(again.reason.find("rebooted during the verification"), std::string::npos)
      << again.reason;
  EXPECT_NE(again.reason.find("stress_ng"), std::string::npos) << again.reason;
  EXPECT_EQ(again.history.back().from, State::kVerify);
  EXPECT_TRUE(lc.sweep(kT0 + 100000).empty());
}

TEST_F(LifecycleTest, Memtest86StepThenLinux) {
  d_.memtest_s = 600;
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife first = boot(lc, kT0);
  EXPECT_EQ(first.step, "memtest86");
  EXPECT_EQ(first.deadline, kT0 + d_.memtest_s + d_.heartbeat_s);
  // The node comes back after memtest86+'s time box: no serial log.
  NodeLife second = boot(lc, kT0 + 610);
  EXPECT_EQ(second.state, State::kVerify);
  EXPECT_EQ(second.run, first.run);
  EXPECT_EQ(second.step, "linux");
  EXPECT_EQ(second.memtest86, "ran, result unknown");
  EXPECT_EQ(second.deadline, std::min(kT0 + 610 + d_.heartbeat_s, kT0 + d_.verify_s));
  // The third fetch is a reboot during the Linux step.
  EXPECT_EQ(boot(lc, kT0 + 620).state, State::kFailed);
}

TEST_F(LifecycleTest, Memtest86StepDeadlineIsCappedByTheRun) {
  d_.memtest_s = 5000;  // longer than the whole run allows
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  EXPECT_EQ(boot(lc, kT0).deadline, kT0 + d_.verify_s);
  EXPECT_EQ(lc.sweep(kT0 + d_.verify_s + 1), std::vector<std::string>{kNode});
  std::string err;
  EXPECT_EQ(lc.get(kNode, &err)->reason, "timed out in memtest86");
}

TEST_F(LifecycleTest, Memtest86SerialLogVerdict) {
  d_.memtest_s = 60;
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  lc.set_memtest_log_reader([](const std::string& log, bool* passed, std::string* summary) {
    if (log.find("Errors:") == std::string::npos) return false;
    *passed = log.find("Errors: 0") != std::string::npos;
    *summary = *passed ? "no errors" : "errors found";
    return true;
  });
  boot(lc, kT0);
  std::ofstream(dir() + "/memtest86.log") << "pass 1\nErrors: 3\n";
  NodeLife l = boot(lc, kT0 + 70);
  EXPECT_EQ(l.state, State::kFailed);
  EXPECT_EQ(l.reason, "memtest86+ failed: errors found");
  // Passing, and a log with no verdict in it.
  std::string err;
  ASSERT_TRUE(lc.set_state(kNode, State::kVerify, "admin", "", kT0 + 80, &err)) << err;
  boot(lc, kT0 + 90);
  std::ofstream(dir() + "/memtest86.log") << "Errors: 0\n";
  l = boot(lc, kT0 + 160);
  EXPECT_EQ(l.step, "linux");
  EXPECT_EQ(l.memtest86, "passed: no errors");
  ASSERT_TRUE(lc.set_state(kNode, State::kVerify, "admin", "", kT0 + 170, &err)) << err;
  boot(lc, kT0 + 180);
  std::ofstream(dir() + "/memtest86.log") << "garbage\n";
  l = boot(lc, kT0 + 250);
  EXPECT_EQ(l.step, "linux");
  EXPECT_NE(l.memtest86.find("result unknown"), std::string::npos) << l.memtest86;
}

// The reader the server sets (server.cpp): lifecycle::memtest86_log_verdict
// on real serial logs (tests/data/README.md).
std::string data_file(const std::string& name) {
  std::ifstream f(std::string(NBDROOT_TEST_DATA) + "/" + name, std::ios::binary);
  EXPECT_TRUE(f) << name;
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

TEST_F(LifecycleTest, Memtest86SerialLogThroughTheParser) {
  d_.memtest_s = 600;
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  lc.set_memtest_log_reader(memtest86_log_verdict);
  std::string err;
  // Pass 1 done, no errors: the step passed, the run goes on.
  boot(lc, kT0);
  std::ofstream(dir() + "/memtest86.log", std::ios::binary)
      << data_file("memtest86+-6.10-serial-pass1.txt");
  NodeLife l = boot(lc, kT0 + 610);
  EXPECT_EQ(l.state, State::kVerify);
  EXPECT_EQ(l.step, "linux");
  EXPECT_EQ(l.memtest86, "passed: 1 pass, 0 errors (memtest86+ 6.10, 39 MiB)");
  EXPECT_EQ(read_state()["memtest86"], l.memtest86);
  // Cut off in pass 1 (the time box ended first): no verdict.
  ASSERT_TRUE(lc.set_state(kNode, State::kVerify, "admin", "", kT0 + 700, &err)) << err;
  boot(lc, kT0 + 710);
  std::ofstream(dir() + "/memtest86.log", std::ios::binary)
      << data_file("memtest86+-6.10-serial-start.txt");
  l = boot(lc, kT0 + 1320);
  EXPECT_EQ(l.state, State::kVerify);
  EXPECT_EQ(l.memtest86, "ran, result unknown (serial log kept, no verdict in it)");
  // Errors on the screen (the real log, then one repaint of its counters
  // row as memtest86+ draws it, with Errors: 2): failed, counts in the reason.
  ASSERT_TRUE(lc.set_state(kNode, State::kVerify, "admin", "", kT0 + 1400, &err)) << err;
  boot(lc, kT0 + 1410);
  std::ofstream(dir() + "/memtest86.log", std::ios::binary)
      << data_file("memtest86+-6.10-serial-start.txt")
      << "\x1b[9;1HUsing: All Cores                          | Pass:  0        Errors: 2"
         "           ";
  l = boot(lc, kT0 + 2020);
  EXPECT_EQ(l.state, State::kFailed);
  EXPECT_EQ(l.reason,
            "memtest86+ failed: 0 passes, 2 errors, in test #6  [Moving inversions, 64 bit "
            "pattern] (memtest86+ 6.10, 255 MiB)");
  std::string why;
  EXPECT_FALSE(lc.may_attach(kNode, &why));
  EXPECT_NE(why.find("memtest86+ failed: 0 passes, 2 errors"), std::string::npos) << why;
}

TEST_F(LifecycleTest, SweepFailsSilentNodesNamingTheStep) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife a = boot(lc, kT0, "node-a");
  NodeLife b = boot(lc, kT0, "node-b");
  std::string err;
  ASSERT_TRUE(lc.on_heartbeat("node-b", b.run, "memtester", kT0 + 50, &err)) << err;
  EXPECT_TRUE(lc.sweep(kT0 + d_.heartbeat_s).empty());  // deadline is inclusive
  EXPECT_EQ(lc.sweep(kT0 + d_.heartbeat_s + 1), std::vector<std::string>{"node-a"});
  EXPECT_EQ(lc.get("node-a", &err)->reason, "timed out in linux");
  EXPECT_EQ(lc.get("node-a", &err)->history.back().by, "deadline");
  EXPECT_EQ(lc.sweep(kT0 + 50 + d_.heartbeat_s + 1), std::vector<std::string>{"node-b"});
  auto nb = lc.get("node-b", &err);
  EXPECT_EQ(nb->state, State::kFailed);
  EXPECT_EQ(nb->reason, "timed out in memtester");
  EXPECT_TRUE(lc.sweep(kT0 + 100000).empty());
}

TEST_F(LifecycleTest, SweepAfterARestartFindsRunsOnDisk) {
  {
    Lifecycle lc(root_, NewNodes::kVerify, d_);
    boot(lc, kT0);
  }
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  EXPECT_TRUE(lc.sweep(kT0 + 1).empty());
  EXPECT_EQ(lc.sweep(kT0 + d_.heartbeat_s + 1), std::vector<std::string>{kNode});
}

TEST_F(LifecycleTest, SweepRespectsAnAdminsChangeFromAnotherProcess) {
  Lifecycle server(root_, NewNodes::kVerify, d_);
  boot(server, kT0);
  Lifecycle admin(root_, NewNodes::kReady, d_);
  std::string err;
  ASSERT_TRUE(admin.set_state(kNode, State::kReady, "admin", "checked by hand", kT0 + 1, &err));
  EXPECT_TRUE(server.sweep(kT0 + 100000).empty());
  EXPECT_EQ(server.get(kNode, &err)->state, State::kReady);
}

TEST_F(LifecycleTest, AdminSetState) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  std::string err;
  EXPECT_FALSE(lc.set_state(kNode, State::kVerify, "admin", "", kT0, &err));
  EXPECT_NE(err.find("does not exist"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(dir()));
  registered();
  ASSERT_TRUE(lc.set_state(kNode, State::kRetired, "admin", "decommissioned", kT0, &err)) << err;
  auto l = lc.get(kNode, &err);
  EXPECT_EQ(l->state, State::kRetired);
  EXPECT_EQ(l->reason, "decommissioned");
  ASSERT_EQ(l->history.size(), 1u);
  EXPECT_EQ(l->history[0].by, "admin");
  std::string why;
  EXPECT_FALSE(lc.may_attach(kNode, &why));
  EXPECT_NE(why.find("in state retired (decommissioned)"), std::string::npos) << why;
  // verify again: a run in progress ends, the next fetch starts a new one.
  ASSERT_TRUE(lc.set_state(kNode, State::kVerify, "admin", "", kT0 + 1, &err)) << err;
  NodeLife r1 = boot(lc, kT0 + 2);
  ASSERT_TRUE(lc.set_state(kNode, State::kVerify, "admin", "again", kT0 + 3, &err)) << err;
  EXPECT_TRUE(lc.get(kNode, &err)->run.empty());
  EXPECT_EQ(lc.get(kNode, &err)->deadline, 0);
  NodeLife r2 = boot(lc, kT0 + 4);
  EXPECT_EQ(r2.state, State::kVerify);
  EXPECT_NE(r2.run, r1.run);
  EXPECT_FALSE(lc.on_report(kNode, r1.run, "passed", "", kT0 + 5, &err));
  ASSERT_TRUE(lc.set_state(kNode, State::kNew, "admin", "", kT0 + 6, &err)) << err;
  EXPECT_EQ(boot(lc, kT0 + 7).state, State::kNew);  // new waits for an admin
  EXPECT_FALSE(lc.may_attach(kNode, &why));
  EXPECT_FALSE(lc.set_state("bad/name", State::kReady, "admin", "", kT0, &err));
}

TEST_F(LifecycleTest, HistoryKeepsTheNewest32) {
  registered();
  Lifecycle lc(root_, NewNodes::kReady, d_);
  std::string err;
  for (int i = 0; i < 40; ++i)
    ASSERT_TRUE(lc.set_state(kNode, i % 2 ? State::kReady : State::kFailed, "admin",
                             "change " + std::to_string(i), kT0 + i, &err));
  auto l = lc.get(kNode, &err);
  ASSERT_EQ(l->history.size(), 32u);
  EXPECT_EQ(l->history.front().reason, "change 8");
  EXPECT_EQ(l->history.back().reason, "change 39");
}

TEST_F(LifecycleTest, CorruptStateJsonIsAClearErrorEverywhere) {
  Lifecycle lc(root_, NewNodes::kReady, d_);
  for (const char* text : {"{not json", "[]", "{\"node\": 5}",
                           "{\"node\":\"52-54-00-12-34-56\",\"state\":\"bogus\"}"}) {
    write_state(text);
    std::string err;
    EXPECT_FALSE(lc.get(kNode, &err)) << text;
    EXPECT_NE(err.find(dir() + "/state.json: corrupt record"), std::string::npos) << err;
    EXPECT_NE(err.find("admin state"), std::string::npos) << err;
    std::string why;
    EXPECT_FALSE(lc.may_attach(kNode, &why));
    EXPECT_NE(why.find("corrupt record"), std::string::npos) << why;
    BootDecision bd;
    err.clear();
    EXPECT_FALSE(lc.on_boot_script(kNode, {}, kT0, &bd, &err));
    EXPECT_NE(err.find("corrupt"), std::string::npos) << err;
    EXPECT_FALSE(lc.set_state(kNode, State::kReady, "admin", "", kT0, &err));
    EXPECT_NE(err.find("corrupt"), std::string::npos) << err;
    std::vector<std::string> errs;
    EXPECT_TRUE(lc.list(&errs).empty());
    ASSERT_EQ(errs.size(), 1u);
    // Nothing was overwritten.
    std::ifstream in(dir() + "/state.json");
    std::stringstream ss;
    ss << in.rdbuf();
    EXPECT_EQ(ss.str(), text);
  }
  // Field errors name the field.
  NodeLife l;
  l.node = kNode;
  nlohmann::json j = to_json(l);
  j["history"] = {{{"at", "x"}, {"from", "ready"}, {"to", 3}, {"reason", ""}, {"by", "admin"}}};
  write_state(j.dump());
  std::string err;
  EXPECT_FALSE(lc.get(kNode, &err));
  EXPECT_NE(err.find("history[0].to"), std::string::npos) << err;
  j = to_json(l);
  j["deadline"] = "soon";
  write_state(j.dump());
  EXPECT_FALSE(lc.get(kNode, &err));
  EXPECT_NE(err.find("deadline: expected an integer"), std::string::npos) << err;
  j = to_json(l);
  j["node"] = "someone-else";
  write_state(j.dump());
  EXPECT_FALSE(lc.get(kNode, &err));
  EXPECT_NE(err.find("someone-else"), std::string::npos) << err;
}

TEST_F(LifecycleTest, RecordRoundTrips) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife l = boot(lc, kT0);
  std::string err;
  ASSERT_TRUE(lc.on_heartbeat(kNode, l.run, "memtester", kT0 + 3, &err)) << err;
  auto back = lc.get(kNode, &err);
  ASSERT_TRUE(back) << err;
  EXPECT_EQ(to_json(*back), read_state());
  NodeLife parsed;
  ASSERT_TRUE(from_json(read_state(), &parsed, &err)) << err;
  EXPECT_EQ(to_json(parsed), read_state());
}

TEST_F(LifecycleTest, ReportTokenIsKeptPerRunAndANewRunStartsWithout) {
  Lifecycle lc(root_, NewNodes::kVerify, d_);
  NodeLife l = boot(lc, kT0);
  EXPECT_EQ(l.report_token, "");
  std::string err;
  const std::string digest(64, 'a');
  // Only for the node's current run.
  EXPECT_FALSE(lc.set_report_token(kNode, "other-run", digest, kT0 + 1, &err));
  EXPECT_NE(err.find("current run"), std::string::npos) << err;
  ASSERT_TRUE(lc.set_report_token(kNode, l.run, digest, kT0 + 1, &err)) << err;
  EXPECT_EQ(read_state()["report_token_sha256"], digest);
  auto back = lc.get(kNode, &err);
  ASSERT_TRUE(back) << err;
  EXPECT_EQ(back->report_token, digest);
  // A record written before the field existed reads as "no token".
  nlohmann::json old = read_state();
  old.erase("report_token_sha256");
  NodeLife parsed;
  ASSERT_TRUE(from_json(old, &parsed, &err)) << err;
  EXPECT_EQ(parsed.report_token, "");
  // An admin's new run starts without one.
  ASSERT_TRUE(lc.set_state(kNode, State::kVerify, "admin (uid 0)", "again", kT0 + 2, &err)) << err;
  l = boot(lc, kT0 + 3);
  EXPECT_EQ(l.report_token, "");
  EXPECT_EQ(read_state()["report_token_sha256"], "");
  // Not for a node that is not verifying.
  ASSERT_TRUE(lc.on_report(kNode, l.run, "passed", "ok", kT0 + 4, &err)) << err;
  EXPECT_FALSE(lc.set_report_token(kNode, l.run, digest, kT0 + 5, &err));
}

TEST_F(LifecycleTest, ListIsSortedAndSkipsStrangers) {
  Lifecycle lc(root_, NewNodes::kReady, d_);
  boot(lc, kT0, "node-b");
  boot(lc, kT0, "node-a");
  registered("node-c");
  fs::create_directories(dir("empty-dir"));  // neither node.json nor state.json
  std::vector<std::string> errs;
  auto all = lc.list(&errs);
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[0].node, "node-a");
  EXPECT_EQ(all[1].node, "node-b");
  EXPECT_EQ(all[2].node, "node-c");
  EXPECT_TRUE(errs.empty());
}

// state.json is replaced whole: a reader never sees it torn or missing,
// and no temporary file is left beside it.
TEST_F(LifecycleTest, StateJsonIsReplacedAtomically) {
  registered();
  Lifecycle lc(root_, NewNodes::kReady, d_);
  std::string err;
  ASSERT_TRUE(lc.set_state(kNode, State::kReady, "admin", "", kT0, &err)) << err;
  std::atomic<bool> done{false};
  std::atomic<int> bad{0}, reads{0};
  std::thread reader([&] {
    while (!done) {
      std::ifstream in(dir() + "/state.json");
      std::stringstream ss;
      ss << in.rdbuf();
      if (!in || nlohmann::json::parse(ss.str(), nullptr, false).is_discarded()) ++bad;
      ++reads;
    }
  });
  for (int i = 0; i < 120; ++i)
    ASSERT_TRUE(lc.set_state(kNode, i % 2 ? State::kReady : State::kRetired, "admin",
                             std::string(size_t(i) * 50, 'x'), kT0 + i, &err))
        << err;
  done = true;
  reader.join();
  EXPECT_EQ(bad, 0) << "of " << reads << " reads";
  for (const auto& e : fs::directory_iterator(dir())) {
    const std::string name = e.path().filename();
    EXPECT_TRUE(name == "node.json" || name == "state.json" || name == "state.lock") << name;
  }
}

// Another process (`nbdserver admin`) holding state.lock keeps the server
// from changing the record until it lets go.
TEST_F(LifecycleTest, ChangesWaitForStateLock) {
  registered();
  Lifecycle lc(root_, NewNodes::kReady, d_);
  std::string err;
  ASSERT_TRUE(lc.set_state(kNode, State::kReady, "admin", "", kT0, &err)) << err;
  int fd = ::open((dir() + "/state.lock").c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(flock(fd, LOCK_EX), 0);
  auto changed = std::async(std::launch::async, [&] {
    std::string e;
    return lc.set_state(kNode, State::kRetired, "admin", "", kT0 + 1, &e);
  });
  // Not a synchronisation: the change must not happen while the lock is held.
  EXPECT_EQ(changed.wait_for(std::chrono::milliseconds(200)), std::future_status::timeout);
  EXPECT_EQ(read_state()["state"], "ready");
  ::close(fd);
  EXPECT_TRUE(changed.get());
  EXPECT_EQ(read_state()["state"], "retired");
}

}  // namespace
}  // namespace lifecycle
