// Parsers for the raw logs a verification run sends with its report
// (issue 12; docs/verification.md). Pure functions over text: no I/O, so
// tests feed them captured output (tests/data/).
//
//   memtester 4.x   stdout and stderr as one stream. Progress is drawn with
//                   backspaces ("setting  12\b\b..." and a "\|/-" spinner),
//                   and its FAILURE lines go to unbuffered stderr, so they
//                   can land in the middle of a stdout line or ahead of it.
//   memtest86+ 6.x  what console=ttyS0 writes: a VT100 screen painted with
//                   cursor moves, not lines. Debian 12's 6.10 never stops on
//                   its own and prints no summary line (no "Pass complete"
//                   text reaches the serial port); the counters on the
//                   screen ("Pass: N  Errors: N", "Status: Pass") are all
//                   there is.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lifecycle {

// Renders text the way a terminal shows it: '\b' moves back one column and
// later characters overwrite, '\r' returns to column 0. Returns the lines,
// trailing spaces removed.
std::vector<std::string> render_backspaces(std::string_view text);

struct MemtesterTest {
  std::string name;  // "Stuck Address", "Random Value", ...
  int loop = 0;      // 1-based
  enum Outcome { kPassed, kFailed, kInterrupted } outcome = kPassed;
};

struct MemtesterResult {
  bool started = false;          // its version banner is there
  std::string version;           // "4.6.0"
  std::optional<uint32_t> testmask;  // "using testmask 0x2"
  uint64_t bytes_wanted = 0;     // "want 4MB (4194304 bytes)"
  uint64_t bytes = 0;            // the last "got  NMB (N bytes)": the buffer under test
  bool locked = false;           // that buffer was mlock()ed ("...locked.")
  int loops_planned = 0;         // "Loop N/M": M; 0 when memtester loops forever
  int loops_started = 0;
  int loops_done = 0;            // loops whose every test finished
  std::vector<MemtesterTest> tests;
  int passed = 0, failed = 0;    // tests, over all loops
  std::vector<std::string> failed_names;  // each name once, in order of first failure
  uint64_t failure_lines = 0;    // "FAILURE: ..." lines (stderr)
  std::vector<std::string> failure_samples;  // the first few of them
  bool completed = false;        // "Done." was printed
  bool ended_early = false;      // started, but no "Done.": killed or timed out

  // Bytes that went through at least one finished test (0 if none did).
  uint64_t bytes_tested() const { return passed + failed > 0 ? bytes : 0; }
  // Ran to the end and found nothing.
  bool ok() const { return completed && failed == 0 && failure_lines == 0 && passed > 0; }
};

MemtesterResult parse_memtester(std::string_view log);

struct Memtest86Result {
  bool started = false;            // the "Memtest86+ vX" banner is on the screen
  std::string version;             // "6.10"
  std::optional<uint64_t> passes;  // "Pass: N" (passes completed)
  std::optional<uint64_t> errors;  // "Errors: N"
  std::string status;              // "Testing", "Pass" (after a clean pass), ... as shown
  std::string test;                // the test running last: "#0  [Address test, ...]"
  uint64_t memory_mb = 0;          // "Memory  :  255MB"
  std::vector<std::string> screen;       // the last screen, 25 rows

  // What the run says: "passed" (a pass completed, no errors), "failed"
  // (errors > 0), "unknown" (it ran but finished no pass), or "not run"
  // (no memtest86+ screen in the log).
  std::string verdict() const;
};

Memtest86Result parse_memtest86(std::string_view serial_log);

// The serial log's verdict, shaped for Lifecycle::set_memtest_log_reader:
// true with *passed and *summary ("1 pass, 0 errors (memtest86+ 6.10, 39 MiB)")
// when the log says passed or failed; false when it holds no verdict (no
// memtest86+ screen, or no pass finished and no error yet).
bool memtest86_log_verdict(const std::string& serial_log, bool* passed, std::string* summary);

}  // namespace lifecycle
