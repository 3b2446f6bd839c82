#include "storage/json_file.hpp"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

namespace storage {

bool read_json_object(const std::string& path, nlohmann::json* out, std::string* err,
                      int* err_no) {
  std::ifstream in(path);
  if (!in) {
    if (err_no) *err_no = errno;
    *err = path + ": cannot open: " + strerror(errno);
    return false;
  }
  std::stringstream ss;
  ss << in.rdbuf();
  *out = nlohmann::json::parse(ss.str(), nullptr, false);
  if (out->is_discarded() || !out->is_object()) {
    if (err_no) *err_no = 0;
    *err = path + ": not valid JSON (or not an object)";
    return false;
  }
  return true;
}

std::string human_bytes(uint64_t n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = double(n);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", v, units[u]);
  return buf;
}

}  // namespace storage
