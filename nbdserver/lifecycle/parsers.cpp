#include "lifecycle/parsers.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>

namespace lifecycle {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool ends_with(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}

// The unsigned decimal number at the start of `s` (after blanks); `s` moves past it.
std::optional<uint64_t> take_number(std::string_view* s) {
  *s = trim(*s);
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(s->data(), s->data() + s->size(), v);
  if (ec != std::errc() || end == s->data()) return std::nullopt;
  s->remove_prefix(size_t(end - s->data()));
  return v;
}

// The number after `key` in `line`, if `key` is there and a number follows.
std::optional<uint64_t> number_after(std::string_view line, std::string_view key) {
  size_t at = line.find(key);
  if (at == std::string_view::npos) return std::nullopt;
  std::string_view rest = line.substr(at + key.size());
  return take_number(&rest);
}

// "(4194304 bytes)" in a want/got line.
std::optional<uint64_t> bytes_in_parens(std::string_view line) {
  size_t open = line.find('(');
  if (open == std::string_view::npos) return std::nullopt;
  std::string_view rest = line.substr(open + 1);
  auto v = take_number(&rest);
  if (!v || !starts_with(trim(rest), "bytes)")) return std::nullopt;
  return v;
}

// memtester writes FAILURE lines to stderr with one unbuffered fprintf each,
// so each is whole; they are taken out here, leaving stdout as it was
// written.
std::string split_failures(std::string_view log, MemtesterResult* r) {
  constexpr std::string_view kFailure = "FAILURE: ";
  constexpr size_t kSamples = 8;
  std::string out;
  out.reserve(log.size());
  while (!log.empty()) {
    size_t at = log.find(kFailure);
    out.append(log.substr(0, at));
    if (at == std::string_view::npos) break;
    log.remove_prefix(at);
    size_t nl = log.find('\n');
    std::string_view msg = log.substr(0, nl);
    ++r->failure_lines;
    if (r->failure_samples.size() < kSamples) r->failure_samples.emplace_back(trim(msg));
    log.remove_prefix(nl == std::string_view::npos ? log.size() : nl + 1);
  }
  return out;
}

// A test's line: two blanks, its name padded to 20 columns, ": ".
bool test_header(std::string_view line, std::string* name, std::string_view* rest) {
  if (line.size() < 23 || !starts_with(line, "  ") || line[22] != ':' || line[2] == ' ') return false;
  *name = std::string(trim(line.substr(2, 20)));
  *rest = trim(line.substr(23));
  return true;
}

class MemtesterReader {
 public:
  explicit MemtesterReader(MemtesterResult* r) : r_(r) {}

  void line(std::string_view raw) {
    std::string_view l = trim(raw);
    std::string name;
    std::string_view rest;
    if (starts_with(l, "memtester version ")) {
      r_->started = true;
      std::string_view v = l.substr(18);
      r_->version = std::string(v.substr(0, v.find(' ')));
    } else if (starts_with(l, "using testmask ")) {
      std::string_view hex = l.substr(15);
      if (starts_with(hex, "0x")) hex.remove_prefix(2);
      uint32_t m = 0;
      auto [end, ec] = std::from_chars(hex.data(), hex.data() + hex.size(), m, 16);
      if (ec == std::errc() && end != hex.data()) r_->testmask = m;
    } else if (starts_with(l, "want ")) {
      if (auto b = bytes_in_parens(l)) r_->bytes_wanted = *b;
    } else if (starts_with(l, "got ")) {
      if (auto b = bytes_in_parens(l)) r_->bytes = *b;
      r_->locked = ends_with(l, "locked.");
    } else if (starts_with(l, "Loop ")) {
      close(MemtesterTest::kFailed);
      std::string_view s = l.substr(5);
      if (auto n = take_number(&s)) r_->loops_started = int(*n);
      if (starts_with(s, "/")) {
        s.remove_prefix(1);
        if (auto m = take_number(&s)) r_->loops_planned = int(*m);
      }
    } else if (l == "Done.") {
      close(MemtesterTest::kFailed);
      r_->completed = true;
    } else if (test_header(raw, &name, &rest)) {
      close(MemtesterTest::kFailed);
      pending_ = name;
      outcome(rest);
    } else if (pending_) {
      // The rest of a test's line, after a FAILURE line broke it.
      outcome(l);
    }
  }

  void finish() { close(r_->completed ? MemtesterTest::kFailed : MemtesterTest::kInterrupted); }

 private:
  void outcome(std::string_view rest) {
    if (ends_with(rest, "ok")) close(MemtesterTest::kPassed);
    else if (rest.find("Skipping to next test") != std::string_view::npos) close(MemtesterTest::kFailed);
  }

  // Ends the pending test (if any) with `o`.
  void close(MemtesterTest::Outcome o) {
    if (!pending_) return;
    r_->tests.push_back({*pending_, r_->loops_started, o});
    if (o == MemtesterTest::kPassed) ++r_->passed;
    if (o == MemtesterTest::kFailed) {
      ++r_->failed;
      auto& f = r_->failed_names;
      if (std::find(f.begin(), f.end(), *pending_) == f.end()) f.push_back(*pending_);
    }
    pending_.reset();
  }

  MemtesterResult* r_;
  std::optional<std::string> pending_;
};

// A 25x80 screen that follows the VT100 subset memtest86+ paints with:
// CSI row;col H, CSI 2J, CSI K, attributes (ignored), CR and LF.
class Screen {
 public:
  static constexpr int kRows = 25, kCols = 80;
  Screen() : rows_(kRows, std::string(kCols, ' ')) {}

  void feed(std::string_view s) {
    for (size_t i = 0; i < s.size(); ++i) {
      char c = s[i];
      if (c == '\x1b') {
        i = escape(s, i);
      } else if (c == '\r') {
        col_ = 0;
      } else if (c == '\n') {
        row_ = std::min(row_ + 1, kRows - 1);
        col_ = 0;
      } else if (c == '\b') {
        col_ = std::max(col_ - 1, 0);
      } else if (static_cast<unsigned char>(c) >= 0x20) {
        if (col_ < kCols) rows_[size_t(row_)][size_t(col_)] = c;
        ++col_;
      }
    }
  }

  std::vector<std::string> lines() const {
    std::vector<std::string> out;
    for (auto& r : rows_) out.emplace_back(std::string(trim(r)));
    return out;
  }

 private:
  // The escape sequence at s[i]; returns the index of its last byte.
  size_t escape(std::string_view s, size_t i) {
    if (i + 1 >= s.size()) return i;
    if (s[i + 1] != '[') return i + 1;  // a two-byte escape: nothing to draw
    size_t j = i + 2;
    while (j < s.size() && !(s[j] >= 0x40 && s[j] <= 0x7e)) ++j;
    if (j >= s.size()) return s.size() - 1;  // cut off at the end of the log
    std::string_view params = s.substr(i + 2, j - i - 2);
    std::vector<int> p;
    while (!params.empty()) {
      int v = 0;
      auto [end, ec] = std::from_chars(params.data(), params.data() + params.size(), v);
      p.push_back(ec == std::errc() ? v : 0);
      size_t semi = params.find(';');
      if (semi == std::string_view::npos) break;
      params.remove_prefix(semi + 1);
      (void)end;
    }
    auto arg = [&](size_t k, int def) { return k < p.size() && p[k] > 0 ? p[k] : def; };
    switch (s[j]) {
      case 'H':
      case 'f':
        row_ = std::clamp(arg(0, 1) - 1, 0, kRows - 1);
        col_ = std::clamp(arg(1, 1) - 1, 0, kCols);
        break;
      case 'J':
        if (arg(0, 0) == 2)
          for (auto& r : rows_) r.assign(kCols, ' ');
        break;
      case 'K':
        if (col_ < kCols) rows_[size_t(row_)].replace(size_t(col_), size_t(kCols - col_), size_t(kCols - col_), ' ');
        break;
      case 'A': row_ = std::max(row_ - arg(0, 1), 0); break;
      case 'B': row_ = std::min(row_ + arg(0, 1), kRows - 1); break;
      case 'C': col_ = std::min(col_ + arg(0, 1), kCols); break;
      case 'D': col_ = std::max(col_ - arg(0, 1), 0); break;
      default: break;  // m (attributes), l/h (modes): nothing to draw
    }
    return j;
  }

  std::vector<std::string> rows_;
  int row_ = 0, col_ = 0;
};

// The word after `key` on a screen line ("Status: Testing  -" -> "Testing").
std::string word_after(std::string_view line, std::string_view key) {
  size_t at = line.find(key);
  if (at == std::string_view::npos) return "";
  std::string_view rest = trim(line.substr(at + key.size()));
  return std::string(rest.substr(0, rest.find(' ')));
}

}  // namespace

std::vector<std::string> render_backspaces(std::string_view text) {
  std::vector<std::string> out;
  std::string cur;
  size_t col = 0;
  auto flush = [&] {
    while (!cur.empty() && cur.back() == ' ') cur.pop_back();
    out.push_back(std::move(cur));
    cur.clear();
    col = 0;
  };
  for (char c : text) {
    if (c == '\n') {
      flush();
    } else if (c == '\r') {
      col = 0;
    } else if (c == '\b') {
      if (col > 0) --col;
    } else {
      if (col < cur.size()) cur[col] = c;
      else cur.push_back(c);
      ++col;
    }
  }
  if (!cur.empty()) flush();
  return out;
}

MemtesterResult parse_memtester(std::string_view log) {
  MemtesterResult r;
  std::string out = split_failures(log, &r);
  MemtesterReader reader(&r);
  for (auto& l : render_backspaces(out)) reader.line(l);
  reader.finish();
  r.loops_done = r.completed ? r.loops_started : std::max(r.loops_started - 1, 0);
  r.ended_early = r.started && !r.completed;
  return r;
}

Memtest86Result parse_memtest86(std::string_view serial_log) {
  Memtest86Result r;
  Screen screen;
  screen.feed(serial_log);
  r.screen = screen.lines();
  for (auto& l : r.screen) {
    std::string_view line = l;
    if (size_t at = line.find("Memtest86+ v"); at != std::string_view::npos) {
      r.started = true;
      r.version = word_after(line, "Memtest86+ v");
    }
    if (line.find("Pass:") != std::string_view::npos) r.passes = number_after(line, "Pass:");
    if (line.find("Errors:") != std::string_view::npos) r.errors = number_after(line, "Errors:");
    if (line.find("Status:") != std::string_view::npos) r.status = word_after(line, "Status:");
    if (size_t at = line.find("Test #"); at != std::string_view::npos)
      r.test = "#" + std::string(trim(line.substr(at + 6)));
    if (starts_with(line, "Memory  :")) r.memory_mb = number_after(line, "Memory  :").value_or(0);
  }
  return r;
}

std::string Memtest86Result::verdict() const {
  if (!started) return "not run";
  if (errors && *errors > 0) return "failed";
  if (passes && *passes > 0 && errors) return "passed";
  return "unknown";
}

}  // namespace lifecycle

namespace lifecycle {

bool memtest86_log_verdict(const std::string& serial_log, bool* passed, std::string* summary) {
  const Memtest86Result r = parse_memtest86(serial_log);
  const std::string v = r.verdict();
  if (v != "passed" && v != "failed") return false;
  *passed = v == "passed";
  const uint64_t passes = r.passes.value_or(0), errors = r.errors.value_or(0);
  *summary = std::to_string(passes) + (passes == 1 ? " pass, " : " passes, ") +
             std::to_string(errors) + (errors == 1 ? " error" : " errors");
  if (!*passed && !r.test.empty()) *summary += ", in test " + r.test;
  *summary += " (memtest86+ " + r.version;
  if (r.memory_mb) *summary += ", " + std::to_string(r.memory_mb) + " MiB";
  *summary += ")";
  return true;
}

}  // namespace lifecycle
