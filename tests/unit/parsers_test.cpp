// lifecycle/parsers against real captured output (tests/data/, see
// tests/data/README.md for how each file was made).
#include "lifecycle/parsers.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

namespace {

std::string fixture(const std::string& name) {
  std::ifstream f(std::string(NBDROOT_TEST_DATA) + "/" + name, std::ios::binary);
  EXPECT_TRUE(f) << name;
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

using lifecycle::MemtesterTest;

TEST(RenderBackspaces, OverwritesLikeATerminal) {
  auto l = lifecycle::render_backspaces("ab\b\bxy\nq\b\b\bz\r1\n  t:  \b\\\b|\b \bok");
  ASSERT_EQ(l.size(), 3u);
  EXPECT_EQ(l[0], "xy");
  EXPECT_EQ(l[1], "1");
  EXPECT_EQ(l[2], "  t: ok");
}

TEST(MemtesterParser, FullRunThatPassed) {
  auto r = lifecycle::parse_memtester(fixture("memtester-4.6-pass-4M.txt"));
  EXPECT_TRUE(r.started);
  EXPECT_EQ(r.version, "4.6.0");
  EXPECT_FALSE(r.testmask);
  EXPECT_EQ(r.bytes_wanted, 4194304u);
  EXPECT_EQ(r.bytes, 4194304u);
  EXPECT_TRUE(r.locked);
  EXPECT_EQ(r.loops_planned, 1);
  EXPECT_EQ(r.loops_done, 1);
  EXPECT_EQ(r.passed, 18);  // Stuck Address and the 17 tests of 4.6
  EXPECT_EQ(r.failed, 0);
  EXPECT_EQ(r.failure_lines, 0u);
  ASSERT_EQ(r.tests.size(), 18u);
  EXPECT_EQ(r.tests.front().name, "Stuck Address");
  EXPECT_EQ(r.tests[8].name, "Sequential Increment");
  EXPECT_EQ(r.tests.back().name, "16-bit Writes");
  EXPECT_TRUE(r.completed);
  EXPECT_FALSE(r.ended_early);
  EXPECT_EQ(r.bytes_tested(), 4194304u);
  EXPECT_TRUE(r.ok());
}

// memtester 4.6 with MEMTESTER_TEST_MASK=0x2 (Compare XOR alone): the
// compare test runs on buffers the stuck-address test left unequal and
// fails; its FAILURE lines (stderr) land inside the stuck-address line.
TEST(MemtesterParser, FailuresInterleavedWithProgress) {
  auto r = lifecycle::parse_memtester(fixture("memtester-4.6-mask2-failures.txt"));
  ASSERT_TRUE(r.testmask);
  EXPECT_EQ(*r.testmask, 0x2u);
  EXPECT_EQ(r.failure_lines, 8u);  // the first one inside the stuck-address line
  ASSERT_FALSE(r.failure_samples.empty());
  EXPECT_EQ(r.failure_samples[0],
            "FAILURE: 0x9430c550ac2be796 != 0x9430c550ac3b1786 at offset 0x0000000000000000.");
  ASSERT_EQ(r.tests.size(), 2u);
  EXPECT_EQ(r.tests[0].name, "Stuck Address");
  EXPECT_EQ(r.tests[0].outcome, MemtesterTest::kPassed);
  EXPECT_EQ(r.tests[1].name, "Compare XOR");
  EXPECT_EQ(r.tests[1].outcome, MemtesterTest::kFailed);
  EXPECT_EQ(r.failed, 1);
  EXPECT_EQ(r.failed_names, std::vector<std::string>{"Compare XOR"});
  EXPECT_TRUE(r.completed);
  EXPECT_FALSE(r.ok());
}

// Killed (SIGKILL) two seconds into a 64 MiB run: no "Done.".
TEST(MemtesterParser, KilledInTheMiddle) {
  auto r = lifecycle::parse_memtester(fixture("memtester-4.6-killed.txt"));
  EXPECT_TRUE(r.started);
  EXPECT_EQ(r.bytes, 64u << 20);
  EXPECT_TRUE(r.ended_early);
  EXPECT_FALSE(r.completed);
  EXPECT_EQ(r.loops_done, 0);
  ASSERT_EQ(r.tests.size(), 1u);
  EXPECT_EQ(r.tests[0].outcome, MemtesterTest::kInterrupted);
  EXPECT_EQ(r.failed, 0);
  EXPECT_EQ(r.bytes_tested(), 0u);
  EXPECT_FALSE(r.ok());
}

// RLIMIT_MEMLOCK of 1 MiB: memtester shrinks its buffer page by page until
// mlock succeeds; what it tested is the last "got" line (its "MB" figure is
// rounded down, the bytes are exact).
TEST(MemtesterParser, MlockReducedBuffer) {
  auto r = lifecycle::parse_memtester(fixture("memtester-4.6-mlock-reduced.txt"));
  EXPECT_EQ(r.bytes_wanted, 2097152u);
  EXPECT_EQ(r.bytes, 1048576u);
  EXPECT_TRUE(r.locked);
  ASSERT_TRUE(r.testmask);
  EXPECT_EQ(*r.testmask, 0x1u);
  EXPECT_EQ(r.passed, 2);
  EXPECT_TRUE(r.ok());
}

// From the verification initrd in a qemu TCG VM (-m 512 -smp 2), as its
// report carried it (nbdroot.memtester_mask=0x1).
TEST(MemtesterParser, VerificationInitrdRun) {
  auto r = lifecycle::parse_memtester(fixture("memtester-4.6-vm-388M-mask1.txt"));
  EXPECT_EQ(r.bytes, 388u << 20);
  EXPECT_TRUE(r.locked);
  ASSERT_TRUE(r.testmask);
  EXPECT_EQ(*r.testmask, 0x1u);
  ASSERT_EQ(r.tests.size(), 2u);
  EXPECT_EQ(r.tests[1].name, "Random Value");
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.bytes_tested(), 406847488u);
}

TEST(MemtesterParser, NotMemtesterOutput) {
  for (std::string_view s : {std::string_view(""), std::string_view("sh: memtester: not found\n"),
                             std::string_view("\b\b\b\x1b[2J  :  \n\n")}) {
    auto r = lifecycle::parse_memtester(s);
    EXPECT_FALSE(r.started);
    EXPECT_FALSE(r.ended_early);
    EXPECT_FALSE(r.ok());
    EXPECT_EQ(r.bytes_tested(), 0u);
  }
}

// Every prefix of a real log parses (a log cut anywhere, as when a node
// dies), and never claims more than the whole log does.
TEST(MemtesterParser, EveryPrefixOfARealLog) {
  std::string log = fixture("memtester-4.6-mask2-failures.txt");
  for (size_t n = 0; n <= log.size(); n += 7) {
    auto r = lifecycle::parse_memtester(std::string_view(log).substr(0, n));
    EXPECT_LE(r.failure_lines, 8u);
    EXPECT_LE(r.tests.size(), 2u);
    if (n < log.size() - 6) {
      EXPECT_FALSE(r.completed) << n;
    }
  }
}

// Debian 12's memtest86+ 6.10 under qemu (SeaBIOS, -m 256), console=ttyS0:
// the start of its first pass.
TEST(Memtest86Parser, FirstPassRunning) {
  auto r = lifecycle::parse_memtest86(fixture("memtest86+-6.10-serial-start.txt"));
  EXPECT_TRUE(r.started);
  EXPECT_EQ(r.version, "6.10");
  ASSERT_TRUE(r.passes);
  EXPECT_EQ(*r.passes, 0u);
  ASSERT_TRUE(r.errors);
  EXPECT_EQ(*r.errors, 0u);
  EXPECT_EQ(r.status, "Testing");
  EXPECT_EQ(r.memory_mb, 255u);
  EXPECT_EQ(r.test, "#6  [Moving inversions, 64 bit pattern]");
  EXPECT_EQ(r.verdict(), "unknown");
  ASSERT_EQ(r.screen.size(), 25u);
}

// The same at -m 40, where the first pass ends after about 3 minutes of TCG:
// the screen's first paint, then the updates around the end of pass 1
// (two verbatim slices of one capture).
TEST(Memtest86Parser, FirstPassComplete) {
  auto r = lifecycle::parse_memtest86(fixture("memtest86+-6.10-serial-pass1.txt"));
  EXPECT_TRUE(r.started);
  ASSERT_TRUE(r.passes);
  EXPECT_EQ(*r.passes, 1u);
  ASSERT_TRUE(r.errors);
  EXPECT_EQ(*r.errors, 0u);
  EXPECT_EQ(r.status, "Pass");
  EXPECT_EQ(r.memory_mb, 39u);
  EXPECT_EQ(r.verdict(), "passed");
}

TEST(Memtest86Parser, NoScreen) {
  for (std::string_view s : {std::string_view(""), std::string_view("SeaBIOS (version 1.16)\r\n"),
                             std::string_view("\x1b[99;999H\x1b[\x1b[2")}) {
    auto r = lifecycle::parse_memtest86(s);
    EXPECT_FALSE(r.started);
    EXPECT_EQ(r.verdict(), "not run");
  }
}

TEST(Memtest86Parser, EveryPrefixOfARealLog) {
  std::string log = fixture("memtest86+-6.10-serial-start.txt");
  for (size_t n = 0; n <= log.size(); n += 5) {
    auto r = lifecycle::parse_memtest86(std::string_view(log).substr(0, n));
    EXPECT_NE(r.verdict(), "failed");
    EXPECT_NE(r.verdict(), "passed");
  }
}

}  // namespace
