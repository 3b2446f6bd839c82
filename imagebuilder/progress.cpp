#include "progress.hpp"

#include "util.hpp"

#include <unistd.h>

#include <cstdio>

namespace ib {

using Clock = std::chrono::steady_clock;

Progress::Progress(bool quiet) : tty_(isatty(STDERR_FILENO)), quiet_(quiet) {}

void Progress::begin(const std::string& phase, uint64_t total_files, uint64_t total_bytes) {
  phase_ = phase;
  files_ = bytes_ = 0;
  total_files_ = total_files;
  total_bytes_ = total_bytes;
  last_decile_ = -1;
  start_ = last_ = Clock::now();
}

void Progress::add_bytes(uint64_t n) {
  bytes_ += n;
  show(false);
}

void Progress::add_file() {
  files_++;
  show(false);
}

std::string Progress::status_line() const {
  double secs = std::chrono::duration<double>(Clock::now() - start_).count();
  double rate = secs > 0 ? double(bytes_) / secs : 0;
  char buf[256];
  int n = snprintf(buf, sizeof buf, "%s: %llu/%llu files, %s/%s, %s/s", phase_.c_str(),
                   (unsigned long long)files_, (unsigned long long)total_files_,
                   human_bytes(bytes_).c_str(), human_bytes(total_bytes_).c_str(),
                   human_bytes(uint64_t(rate)).c_str());
  if (rate > 0 && total_bytes_ > bytes_ && n > 0)
    snprintf(buf + n, sizeof buf - size_t(n), ", ETA %.0f s", double(total_bytes_ - bytes_) / rate);
  return buf;
}

void Progress::show(bool force) {
  if (quiet_) return;
  auto now = Clock::now();
  if (tty_) {
    if (!force && now - last_ < std::chrono::milliseconds(100)) return;
    fprintf(stderr, "\r\033[K%s", status_line().c_str());
    drawn_ = true;
  } else {
    int decile = total_bytes_ ? int(bytes_ * 10 / total_bytes_) : 0;
    bool due = decile > last_decile_ || now - last_ > std::chrono::seconds(5);
    if (!force && !due) return;
    last_decile_ = decile;
    fprintf(stderr, "%s\n", status_line().c_str());
  }
  last_ = now;
}

void Progress::end() {
  if (quiet_) return;
  double secs = std::chrono::duration<double>(Clock::now() - start_).count();
  if (tty_ && drawn_) fprintf(stderr, "\r\033[K");
  drawn_ = false;
  fprintf(stderr, "%s: %llu files, %s in %.2f s\n", phase_.c_str(), (unsigned long long)files_,
          human_bytes(bytes_).c_str(), secs);
}

void Progress::note(const std::string& line) {
  if (quiet_) return;
  if (tty_ && drawn_) fprintf(stderr, "\r\033[K");
  fprintf(stderr, "%s\n", line.c_str());
  if (tty_ && drawn_) show(true);
}

}  // namespace ib
