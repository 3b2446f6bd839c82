#include "storage/durable_file.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <functional>
#include <thread>

namespace storage {

namespace {
std::string dir_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

bool write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += size_t(n);
  }
  return true;
}
}  // namespace

bool sync_dir(const std::string& dir, std::string* err) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  bool ok = fd >= 0 && fsync(fd) == 0;
  if (!ok) *err = dir + ": cannot sync: " + strerror(errno);
  if (fd >= 0) ::close(fd);
  return ok;
}

bool write_file_durable(const std::string& path, const std::string& text, std::string* err,
                        mode_t mode) {
  const std::string tmp = path + ".tmp." + std::to_string(getpid()) + "." +
                          std::to_string(std::hash<std::thread::id>()(std::this_thread::get_id()));
  // A leftover of a crashed writer with this pid may have another mode (or
  // be open elsewhere): never write into it.
  unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  bool ok = fd >= 0 && write_all(fd, text) && fsync(fd) == 0;
  int e = errno;
  if (fd >= 0 && ::close(fd) != 0 && ok) {
    ok = false;
    e = errno;
  }
  if (ok && rename(tmp.c_str(), path.c_str()) != 0) {
    ok = false;
    e = errno;
  }
  if (!ok) {
    unlink(tmp.c_str());
    *err = path + ": cannot write: " + strerror(e);
    return false;
  }
  return sync_dir(dir_of(path), err);
}

bool read_small_file(const std::string& path, size_t max, std::string* out, std::string* err,
                     int* err_no) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (err_no) *err_no = errno;
    *err = path + ": cannot open: " + strerror(errno);
    return false;
  }
  out->clear();
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      if (err_no) *err_no = errno;
      *err = path + ": cannot read: " + strerror(errno);
      ::close(fd);
      return false;
    }
    if (n == 0) break;
    if (out->size() + size_t(n) > max) {
      if (err_no) *err_no = EFBIG;
      *err = path + ": larger than " + std::to_string(max) + " bytes";
      ::close(fd);
      return false;
    }
    out->append(buf, size_t(n));
  }
  ::close(fd);
  return true;
}

FileLock::FileLock(const std::string& path, mode_t mode, std::string* err, int* err_no) {
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, mode);
  if (fd_ < 0) {
    if (err_no) *err_no = errno;
    *err = path + ": " + strerror(errno);
    return;
  }
  int rc;
  while ((rc = flock(fd_, LOCK_EX)) != 0 && errno == EINTR) {
  }
  if (rc != 0) {
    if (err_no) *err_no = errno;
    *err = path + ": cannot lock: " + strerror(errno);
    ::close(fd_);
    fd_ = -1;
  }
}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);
}

}  // namespace storage
