#include "http/files_api.hpp"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <mutex>
#include <unordered_map>

#include "storage/generation.hpp"

namespace http {
namespace {

// A file name: the store's rules (valid_store_name), with '+' allowed too,
// as in memtest86+x64.bin. Neither '/' nor a leading '.' can pass.
bool valid_file_name(std::string name) {
  for (char& c : name)
    if (c == '+') c = '_';
  return storage::valid_store_name(name);
}

using storage::valid_store_name;

// The most handed to one send(): a write stalls at most io_timeout per call.
constexpr size_t kSendMax = 4 << 20;

// One version of one file, mapped read-only. Immutable once made; unmapped
// when the cache and the last request using it let go.
struct Mapping {
  dev_t dev = 0;
  ino_t ino = 0;
  size_t size = 0;
  struct timespec mtime = {};
  const char* addr = nullptr;  // nullptr for an empty file
  std::string etag;
  std::string last_modified;

  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (addr) munmap(const_cast<char*>(addr), size);
  }

  bool same_file(const struct stat& st) const {
    return dev == st.st_dev && ino == st.st_ino && size == static_cast<size_t>(st.st_size) &&
           mtime.tv_sec == st.st_mtim.tv_sec && mtime.tv_nsec == st.st_mtim.tv_nsec;
  }
};

std::string http_date(time_t t) {
  struct tm tm;
  gmtime_r(&t, &tm);
  char buf[64];
  strftime(buf, sizeof buf, "%a, %d %b %Y %H:%M:%S GMT", &tm);
  return buf;
}

// Maps the open regular file `fd` (described by `st`); nullptr and *err on
// failure.
std::shared_ptr<const Mapping> map_file(int fd, const struct stat& st, std::string* err) {
  auto m = std::make_shared<Mapping>();
  m->dev = st.st_dev;
  m->ino = st.st_ino;
  m->size = static_cast<size_t>(st.st_size);
  m->mtime = st.st_mtim;
  if (m->size > 0) {
    void* p = mmap(nullptr, m->size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      *err = std::string("mmap: ") + strerror(errno);
      return nullptr;
    }
    m->addr = static_cast<const char*>(p);
  }
  char etag[96];
  snprintf(etag, sizeof etag, "\"%llx-%llx-%llx.%lx\"", static_cast<unsigned long long>(m->ino),
           static_cast<unsigned long long>(m->size),
           static_cast<unsigned long long>(m->mtime.tv_sec), m->mtime.tv_nsec);
  m->etag = etag;
  m->last_modified = http_date(m->mtime.tv_sec);
  return m;
}

// The current mapping of each file served, by path. Entries are few (the
// store's boot files); one goes when its file is found missing.
class MappingCache {
 public:
  // The mapping of the file `fd` open at `path`: the cached one while the
  // file is the same (device, inode, size, mtime), else a new one.
  std::shared_ptr<const Mapping> get(const std::string& path, int fd, const struct stat& st,
                                     std::string* err) {
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = map_.find(path);
      if (it != map_.end() && it->second->same_file(st)) return it->second;
    }
    auto m = map_file(fd, st, err);  // outside the lock: mmap may take a while
    if (!m) return nullptr;
    std::lock_guard<std::mutex> g(mu_);
    map_[path] = m;
    return m;
  }
  void forget(const std::string& path) {
    std::lock_guard<std::mutex> g(mu_);
    map_.erase(path);
  }

 private:
  std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<const Mapping>> map_;
};

// cpp-httplib parses Range into req.ranges before routing and applies them
// to whatever body the handler sets, without bounds checks. The handler is
// given a const Request, but the object is the library's own non-const
// local, so it may be changed: clamp a range to the file, or drop ranges
// (error replies, several ranges).
httplib::Ranges& ranges_of(const httplib::Request& req) {
  return const_cast<httplib::Request&>(req).ranges;
}

void fail(const httplib::Request& req, httplib::Response& res, int status,
          const std::string& message) {
  ranges_of(req).clear();
  reply_error(res, status, message);
}

// Resolves a single range against `size` in place: false if it is not
// satisfiable. Forms from the library: (A,B), (A,-1) for "A-", (-1,N) for
// "-N"; (-1,-1) is "bytes=-", which asks for nothing.
bool resolve_range(httplib::Range* r, size_t size) {
  const auto n = static_cast<ssize_t>(size);
  if (r->first < 0) {
    if (r->second <= 0 || n == 0) return false;
    r->first = r->second >= n ? 0 : n - r->second;
    r->second = n - 1;
    return true;
  }
  if (r->first >= n) return false;
  if (r->second < 0 || r->second >= n) r->second = n - 1;
  return true;
}

bool etag_matches(const std::string& header, const std::string& etag) {
  if (header.empty()) return false;
  size_t i = 0;
  while (i < header.size()) {
    size_t j = header.find(',', i);
    if (j == std::string::npos) j = header.size();
    std::string t = header.substr(i, j - i);
    const size_t a = t.find_first_not_of(" \t"), b = t.find_last_not_of(" \t");
    t = a == std::string::npos ? "" : t.substr(a, b - a + 1);
    if (t.rfind("W/", 0) == 0) t = t.substr(2);
    if (t == "*" || t == etag) return true;
    i = j + 1;
  }
  return false;
}

// Opens `name` under `dir` without following a symlink in `name`, and
// checks it is a regular file. Returns the fd, or -1 with *status and *err.
int open_under(const std::string& dir, const std::string& name, struct stat* st, int* status,
               std::string* err) {
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) {
    *status = (errno == ENOENT || errno == ENOTDIR) ? 404 : 500;
    *err = *status == 404 ? "no such file" : "cannot open the directory";
    if (*status == 500) spdlog::error("http: {}: {}", dir, strerror(errno));
    return -1;
  }
  // O_NONBLOCK: a FIFO put there must not hang the open.
  const int fd = ::openat(dfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  const int e = errno;
  ::close(dfd);
  if (fd < 0) {
    *status = (e == ENOENT || e == ELOOP || e == ENOTDIR) ? 404 : e == EACCES ? 403 : 500;
    *err = *status == 404   ? (e == ELOOP ? "not a regular file (a symlink)" : "no such file")
           : *status == 403 ? "permission denied"
                            : "cannot open the file";
    if (*status == 500) spdlog::error("http: {}/{}: {}", dir, name, strerror(e));
    return -1;
  }
  if (fstat(fd, st) != 0 || !S_ISREG(st->st_mode)) {
    ::close(fd);
    *status = 404;
    *err = "not a regular file";
    return -1;
  }
  return fd;
}

void serve(MappingCache& cache, const std::string& dir, const std::string& name,
           const httplib::Request& req, httplib::Response& res) {
  struct stat st;
  int status = 0;
  std::string err;
  const std::string path = dir + "/" + name;
  const int fd = open_under(dir, name, &st, &status, &err);
  if (fd < 0) {
    if (status == 404) cache.forget(path);
    return fail(req, res, status, name + ": " + err);
  }
  auto m = cache.get(path, fd, st, &err);
  ::close(fd);  // the mapping keeps the file
  if (!m) {
    spdlog::error("http: {}: {}", path, err);
    return fail(req, res, 500, name + ": cannot map the file");
  }
  res.set_header("ETag", m->etag);
  res.set_header("Last-Modified", m->last_modified);
  res.set_header("Accept-Ranges", "bytes");
  if (etag_matches(req.get_header_value("If-None-Match"), m->etag)) {
    ranges_of(req).clear();
    res.status = 304;
    return;
  }
  httplib::Ranges& ranges = ranges_of(req);
  if (req.has_header("If-Range")) {
    const std::string v = req.get_header_value("If-Range");
    if (v != m->etag && v != m->last_modified) ranges.clear();
  }
  if (ranges.size() > 1) ranges.clear();  // several ranges: the whole file
  if (ranges.size() == 1 && !resolve_range(&ranges[0], m->size)) {
    ranges.clear();
    res.set_header("Content-Range", "bytes */" + std::to_string(m->size));
    return reply_error(res, 416, "range not satisfiable (the file has " +
                                     std::to_string(m->size) + " bytes)");
  }
  res.status = ranges.empty() ? 200 : 206;
  if (m->size == 0) {
    res.set_header("Content-Length", "0");
    res.set_header("Content-Type", "application/octet-stream");
    return;
  }
  // The library calls this with offset and length already cut to the range;
  // the mapping goes to send() as it is.
  res.set_content_provider(m->size, "application/octet-stream",
                           [m](size_t offset, size_t length, httplib::DataSink& sink) {
                             if (offset >= m->size) return false;
                             length = std::min({length, m->size - offset, kSendMax});
                             return sink.write(m->addr + offset, length);
                           });
}

const char* const kBadName =
    "bad name (allowed: [A-Za-z0-9._-], and '+' in a file name; not starting with '.')";

}  // namespace

void add_files_api(httplib::Server& svr, std::shared_ptr<exports::Store> store) {
  auto cache = std::make_shared<MappingCache>();
  svr.Get(R"(/files/boot/([^/]+))",
          [store, cache](const httplib::Request& req, httplib::Response& res) {
            const std::string name = req.matches[1];
            if (!valid_file_name(name)) return fail(req, res, 400, kBadName);
            serve(*cache, store->root() + "/boot", name, req, res);
          });
  svr.Get(R"(/files/([^/]+)/([^/]+)/([^/]+))",
          [store, cache](const httplib::Request& req, httplib::Response& res) {
            const std::string image = req.matches[1], gen = req.matches[2],
                              name = req.matches[3];
            if (!valid_store_name(image) || !valid_store_name(gen) || !valid_file_name(name))
              return fail(req, res, 400, kBadName);
            serve(*cache, store->root() + "/images/" + image + "/generations/" + gen + "/boot",
                  name, req, res);
          });
}

}  // namespace http
