#include "exports/audit.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "exports/store.hpp"

namespace exports {

bool audit(const std::string& store_root, const std::string& action, const std::string& detail,
           std::string* err) {
  const std::string path = store_root + "/audit.log";
  // Details come from command lines: replace bytes that are not UTF-8
  // rather than fail the dump.
  const std::string line =
      nlohmann::json{{"time", now_iso8601()}, {"uid", getuid()}, {"pid", getpid()},
                     {"action", action}, {"detail", detail}}
          .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
      "\n";
  int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
  if (fd < 0) {
    *err = path + ": " + strerror(errno);
    return false;
  }
  const ssize_t n = ::write(fd, line.data(), line.size());
  const int write_errno = errno;
  const bool ok = n == ssize_t(line.size()) && fsync(fd) == 0;
  if (!ok) {
    *err = path + ": cannot append: " +
           (n < 0 ? strerror(write_errno) : n != ssize_t(line.size()) ? "short write" : strerror(errno));
  }
  ::close(fd);
  return ok;
}

}  // namespace exports
