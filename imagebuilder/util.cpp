#include "util.hpp"

#include "storage/json_file.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

extern "C" {
#include <et/com_err.h>
}

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>

namespace ib {

std::string errno_message(const std::string& what, int err) {
  return what + ": " + std::strerror(err);
}

std::string ext2_message(const std::string& what, long code) {
  return what + ": " + error_message(code);
}

bool valid_name(std::string_view s) {
  if (s.empty() || s.size() > 128 || s[0] == '.') return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '-';
  });
}

uint64_t fnv1a(std::string_view data, uint64_t h) {
  for (unsigned char c : data) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string derived_uuid(std::string_view seed) {
  uint64_t a = fnv1a(seed, fnv1a("nbdroot-uuid-a"));
  uint64_t b = fnv1a(seed, fnv1a("nbdroot-uuid-b"));
  a = (a & ~0xf000ull) | 0x4000ull;                           // version 4
  b = (b & 0x3fffffffffffffffull) | 0x8000000000000000ull;  // RFC 4122 variant
  char buf[40];
  snprintf(buf, sizeof buf, "%08x-%04x-%04x-%04x-%012llx", unsigned(a >> 32),
           unsigned((a >> 16) & 0xffff), unsigned(a & 0xffff), unsigned(b >> 48),
           (unsigned long long)(b & 0xffffffffffffull));
  return buf;
}

static std::string format_utc(int64_t t, const char* fmt) {
  time_t tt = time_t(t);
  struct tm tm;
  gmtime_r(&tt, &tm);
  char buf[64];
  strftime(buf, sizeof buf, fmt, &tm);
  return buf;
}

std::string compact_utc(int64_t t) { return format_utc(t, "%Y%m%dT%H%M%SZ"); }
std::string iso8601_utc(int64_t t) { return format_utc(t, "%Y-%m-%dT%H:%M:%SZ"); }

std::string human_bytes(uint64_t n) { return storage::human_bytes(n); }

Result<std::string> read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::fail(errno_message(path, errno));
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      ::close(fd);
      return Status::fail(errno_message(path, e));
    }
    if (n == 0) break;
    out.append(buf, size_t(n));
  }
  ::close(fd);
  return out;
}

Status fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::fail(errno_message(dir, errno));
  int r = fsync(fd);
  int e = errno;
  ::close(fd);
  return r == 0 ? Status() : Status::fail(errno_message("fsync " + dir, e));
}

static std::string parent_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

Status write_file_atomic(const std::string& path, std::string_view data, unsigned mode) {
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return Status::fail(errno_message(tmp, errno));
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return Status::fail(errno_message(tmp, e));
    }
    done += size_t(n);
  }
  if (fsync(fd) != 0) {
    int e = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return Status::fail(errno_message("fsync " + tmp, e));
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    return Status::fail(errno_message("rename " + tmp, e));
  }
  return fsync_dir(parent_of(path));
}

Status remove_tree(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
  if (ec) return Status::fail(path + ": cannot remove: " + ec.message());
  return Status();
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (!d) return out;
  while (struct dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

bool is_dir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

Status make_dirs(const std::string& path, std::vector<std::string>* made) {
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    const std::string cur = path.substr(0, pos);
    if (cur.empty()) continue;
    if (::mkdir(cur.c_str(), 0755) == 0) made->push_back(cur);
    else if (errno != EEXIST) return Status::fail(errno_message("mkdir " + cur, errno));
  }
  return Status();
}

bool exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

uint64_t disk_usage(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0 ? uint64_t(st.st_blocks) * 512 : 0;
}

void pause_point(const char* stage) {
  const char* at = getenv("NBDROOT_IB_PAUSE_AT");
  if (at && strcmp(at, stage) == 0) raise(SIGSTOP);
}

}  // namespace ib
