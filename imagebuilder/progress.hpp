// Build progress on stderr: on a terminal one line rewritten in place
// (files, bytes, rate, ETA), on a pipe or file a plain line every ~10% or
// 5 s, so logs stay readable. stdout is left to the command's result.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace ib {

class Progress {
 public:
  // `quiet` prints nothing at all.
  explicit Progress(bool quiet);
  // Starts a phase with totals (0 = unknown).
  void begin(const std::string& phase, uint64_t total_files, uint64_t total_bytes);
  void add_bytes(uint64_t n);
  void add_file();
  // Ends the phase with a summary line.
  void end();
  // A plain message line (keeps the progress line intact on a terminal).
  void note(const std::string& line);

 private:
  void show(bool force);
  std::string status_line() const;
  bool tty_;
  bool quiet_;
  std::string phase_;
  uint64_t files_ = 0, bytes_ = 0, total_files_ = 0, total_bytes_ = 0;
  int last_decile_ = -1;
  std::chrono::steady_clock::time_point start_, last_;
  bool drawn_ = false;
};

}  // namespace ib
