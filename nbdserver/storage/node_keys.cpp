// Node keys (node_keys.hpp). Every change is a read-modify-write of
// nodes/<node>/tls-key.json under nodes/<node>/tls-key.lock (flock); the
// file is replaced durably with mode 0600. Reads open the file with
// O_NOFOLLOW and check it with fstat() before reading a byte of it.
#include "storage/node_keys.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <ctime>
#include <nlohmann/json.hpp>

#include "storage/durable_file.hpp"
#include "tls/engine.hpp"
#include "storage/names.hpp"

namespace storage {
namespace {

constexpr size_t kKeyFileMax = 4096;
constexpr const char* kLockFile = "tls-key.lock";
constexpr int64_t kLifetimeMax = int64_t(100) * 366 * 86400;

std::string node_dir(const std::string& store, const std::string& node) {
  return store + "/nodes/" + node;
}
std::string key_path(const std::string& store, const std::string& node) {
  return node_dir(store, node) + "/" + kNodeKeyFile;
}

// Sets *why and *status; returns false, for one-line refusals.
bool refuse(KeyStatus s, std::string text, KeyStatus* status, std::string* why) {
  if (status) *status = s;
  *why = std::move(text);
  return false;
}

bool check_name(const std::string& node, KeyStatus* status, std::string* why) {
  if (valid_store_name(node)) return true;
  return refuse(KeyStatus::kCorrupt,
                "bad node name (allowed: [A-Za-z0-9._-], not starting with '.', at most " +
                    std::to_string(kMaxStoreName) + " bytes)",
                status, why);
}

std::string to_hex(const tls::Key& key) { return tls::key_hex(key); }

bool from_hex(const std::string& s, tls::Key* key) { return tls::key_from_hex(s, key); }

bool random_bytes(tls::Key* key, std::string* err) {
  if (tls::random_key(key)) return true;
  *err = std::string("getrandom: ") + strerror(errno);
  return false;
}

nlohmann::json to_json(const NodeKey& k) {
  return {{"node", k.node},         {"key", to_hex(k.key)},   {"created", k.created},
          {"expires", k.expires},   {"generation", k.generation}, {"armed", k.armed},
          {"armed_at", k.armed_at}, {"delivered_at", k.delivered_at}};
}

// A non-negative integer member; false and *why naming it otherwise.
bool time_field(const nlohmann::json& j, const char* name, int64_t* out, std::string* why) {
  if (!j.contains(name) || !j[name].is_number_integer() || j[name].get<int64_t>() < 0) {
    *why = std::string(name) + ": expected a non-negative integer";
    return false;
  }
  *out = j[name].get<int64_t>();
  return true;
}

bool from_json(const nlohmann::json& j, const std::string& node, NodeKey* k, std::string* why) {
  if (!j.is_object()) {
    *why = "not a JSON object";
    return false;
  }
  if (!j.contains("node") || !j["node"].is_string() || j["node"] != node) {
    *why = "node: expected \"" + node + "\" (a key file belongs to its node's directory)";
    return false;
  }
  if (!j.contains("key") || !j["key"].is_string() || !from_hex(j["key"], &k->key)) {
    *why = "key: expected 64 hex digits (256 bits)";
    return false;
  }
  int64_t generation = 0;
  if (!time_field(j, "created", &k->created, why) || !time_field(j, "expires", &k->expires, why) ||
      !time_field(j, "generation", &generation, why) ||
      !time_field(j, "armed_at", &k->armed_at, why) ||
      !time_field(j, "delivered_at", &k->delivered_at, why))
    return false;
  if (!j.contains("armed") || !j["armed"].is_boolean()) {
    *why = "armed: expected true or false";
    return false;
  }
  k->node = node;
  k->generation = uint64_t(generation);
  k->armed = j["armed"].get<bool>();
  return true;
}

// The file behind `fd` may hold a secret of ours: a regular file, owned by
// this user, that nobody else may read or write.
bool private_file(int fd, std::string* why) {
  struct stat st;
  if (fstat(fd, &st) != 0) {
    *why = std::string("cannot stat: ") + strerror(errno);
    return false;
  }
  char mode[8];
  snprintf(mode, sizeof mode, "%04o", unsigned(st.st_mode & 07777));
  if (!S_ISREG(st.st_mode)) *why = "not a regular file";
  else if (st.st_uid != geteuid())
    *why = "owned by uid " + std::to_string(st.st_uid) + ", not by this user (uid " +
           std::to_string(geteuid()) + ")";
  else if (st.st_mode & 077)
    *why = std::string("mode ") + mode + ": others than its owner may use it (it must be 0600)";
  return why->empty();
}

bool read_fd(int fd, std::string* out, std::string* why) {
  char buf[1024];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      *why = std::string("cannot read: ") + strerror(errno);
      return false;
    }
    if (n == 0) return true;
    if (out->size() + size_t(n) > kKeyFileMax) {
      *why = "larger than " + std::to_string(kKeyFileMax) + " bytes";
      return false;
    }
    out->append(buf, size_t(n));
  }
}

// The node's record as it is on disk, expired or not.
bool read_record(const std::string& store, const std::string& node, NodeKey* k,
                 KeyStatus* status, std::string* why) {
  const std::string path = key_path(store, node);
  // O_NONBLOCK: a FIFO in its place must not hang the reader.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0 && (errno == ENOENT || errno == ENOTDIR))
    return refuse(KeyStatus::kMissing, "no key", status, why);
  if (fd < 0 && errno == ELOOP)
    return refuse(KeyStatus::kCorrupt, "corrupt key file: " + path + ": a symbolic link",
                  status, why);
  if (fd < 0)
    return refuse(KeyStatus::kIoError, path + ": cannot open: " + strerror(errno), status, why);
  std::string text, problem;
  const bool read = private_file(fd, &problem) && read_fd(fd, &text, &problem);
  ::close(fd);
  if (read) {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded()) problem = "not valid JSON";
    else from_json(j, node, k, &problem);
    if (j.is_object() && j.contains("key") && j["key"].is_string())
      tls::wipe(j["key"].get_ref<std::string&>());
  }
  tls::wipe(text);
  if (!problem.empty())
    return refuse(KeyStatus::kCorrupt, "corrupt key file: " + path + ": " + problem, status, why);
  if (status) *status = KeyStatus::kOk;
  return true;
}

bool expired(const NodeKey& k, int64_t now, KeyStatus* status, std::string* why) {
  if (k.expires == 0 || now < k.expires) return false;
  refuse(KeyStatus::kExpired, "key expired at " + utc_time(k.expires), status, why);
  return true;
}

bool write_record(const std::string& store, const NodeKey& k, std::string* err) {
  nlohmann::json j = to_json(k);
  std::string text = j.dump(2) + "\n";
  tls::wipe(j["key"].get_ref<std::string&>());
  const bool ok = write_file_durable(key_path(store, k.node), text, err, 0600);
  tls::wipe(text);
  return ok;
}

// The node's key lock, held; `missing` when the node has no directory.
class KeyLock {
 public:
  KeyLock(const std::string& dir, bool* missing, std::string* err)
      : lock_(dir + "/" + kLockFile, 0600, err, &err_no_) {
    *missing = !lock_.ok() && err_no_ == ENOENT;
  }
  bool ok() const { return lock_.ok(); }

 private:
  int err_no_ = 0;
  FileLock lock_;
};

// Under the node's lock: reads its valid key, lets `change` modify it, and
// writes it back. False, *why and *status as load() (a node directory that
// is missing is "no key"), or when the write fails (kIoError).
template <typename Change>
bool update(const std::string& store, const std::string& node, int64_t now, NodeKey* out,
            std::string* why, KeyStatus* status, Change change) {
  // Nodes without a key (most boot-script fetches in a mixed fleet) take
  // no lock and leave no lock file behind.
  if (!load(store, node, now, why, status)) return false;
  bool missing = false;
  KeyLock lock(node_dir(store, node), &missing, why);
  if (missing) return refuse(KeyStatus::kMissing, "no key", status, why);
  if (!lock.ok()) return refuse(KeyStatus::kIoError, *why, status, why);
  NodeKey k;
  if (!read_record(store, node, &k, status, why) || expired(k, now, status, why)) return false;
  if (!change(&k)) return false;
  if (!write_record(store, k, why)) return refuse(KeyStatus::kIoError, *why, status, why);
  *out = k;
  if (status) *status = KeyStatus::kOk;
  return true;
}

bool make_dir(const std::string& path, std::string* err) {
  if (mkdir(path.c_str(), 0750) == 0 || errno == EEXIST) return true;
  *err = path + ": cannot create: " + strerror(errno);
  return false;
}

}  // namespace

bool create_or_rotate(const std::string& store_dir, const std::string& node,
                      int64_t expires_in_s, int64_t now, NodeKey* out, bool* rotated,
                      std::string* err) {
  if (!check_name(node, nullptr, err)) return false;
  const std::string dir = node_dir(store_dir, node);
  if (!make_dir(store_dir + "/nodes", err) || !make_dir(dir, err)) return false;
  bool missing = false;
  KeyLock lock(dir, &missing, err);
  if (!lock.ok()) return false;
  NodeKey old;
  KeyStatus st;
  std::string why;
  *rotated = read_record(store_dir, node, &old, &st, &why);
  if (st == KeyStatus::kIoError) {
    *err = why;
    return false;
  }
  NodeKey k;
  k.node = node;
  k.created = now;
  k.expires = expires_in_s > 0 ? now + expires_in_s : 0;
  k.generation = *rotated ? old.generation + 1 : 0;
  if (!random_bytes(&k.key, err) || !write_record(store_dir, k, err)) return false;
  *out = k;
  return true;
}

std::optional<NodeKey> load(const std::string& store_dir, const std::string& node, int64_t now,
                            std::string* why, KeyStatus* status) {
  NodeKey k;
  if (!check_name(node, status, why) || !read_record(store_dir, node, &k, status, why) ||
      expired(k, now, status, why))
    return std::nullopt;
  return k;
}

bool remove(const std::string& store_dir, const std::string& node, bool* existed,
            std::string* err) {
  *existed = false;
  if (!check_name(node, nullptr, err)) return false;
  const std::string dir = node_dir(store_dir, node);
  bool missing = false;
  KeyLock lock(dir, &missing, err);
  if (missing) {
    err->clear();
    return true;
  }
  if (!lock.ok()) return false;
  const std::string path = key_path(store_dir, node);
  if (unlink(path.c_str()) != 0) {
    if (errno == ENOENT) return true;
    *err = path + ": cannot remove: " + strerror(errno);
    return false;
  }
  *existed = true;
  return sync_dir(dir, err);
}

bool arm(const std::string& store_dir, const std::string& node, int64_t now, NodeKey* out,
         std::string* err, KeyStatus* status) {
  return update(store_dir, node, now, out, err, status, [now](NodeKey* k) {
    k->armed = true;
    k->armed_at = now;
    return true;
  });
}

std::optional<NodeKey> take_armed(const std::string& store_dir, const std::string& node,
                                  int64_t now, std::string* why, KeyStatus* status) {
  NodeKey out;
  const bool taken = update(store_dir, node, now, &out, why, status, [&](NodeKey* k) {
    if (!k->armed && k->delivered_at)
      return refuse(KeyStatus::kAlreadyDelivered,
                    "already delivered at " + utc_time(k->delivered_at) + " (second fetch)",
                    status, why);
    if (!k->armed) return refuse(KeyStatus::kNotArmed, "not armed", status, why);
    k->armed = false;
    k->delivered_at = now;
    return true;
  });
  if (!taken) return std::nullopt;
  return out;
}

std::string psk_line(const NodeKey& k) { return k.node + ":" + to_hex(k.key); }

bool parse_key_lifetime(const std::string& s, int64_t* seconds) {
  if (s == "0") {
    *seconds = 0;
    return true;
  }
  if (s.size() < 2 || s.size() > 12 || s[0] == '0') return false;
  const std::string digits = s.substr(0, s.size() - 1);
  if (digits.find_first_not_of("0123456789") != std::string::npos) return false;
  int64_t unit = 0;
  switch (s.back()) {
    case 's': unit = 1; break;
    case 'm': unit = 60; break;
    case 'h': unit = 3600; break;
    case 'd': unit = 86400; break;
    default: return false;
  }
  const int64_t n = std::stoll(digits);
  if (n > kLifetimeMax / unit) return false;
  *seconds = n * unit;
  return true;
}

std::string utc_time(int64_t unix_seconds) {
  const time_t t = time_t(unix_seconds);
  struct tm tm;
  char buf[32];
  if (!gmtime_r(&t, &tm) || !strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm))
    return std::to_string(unix_seconds);
  return buf;
}

}  // namespace storage

namespace storage {

bool peer_secret(const std::string& store_dir, tls::Key* out, std::string* err) {
  static std::mutex mu;  // one creator per process (the HTTP service's threads)
  std::lock_guard<std::mutex> g(mu);
  const std::string dir = store_dir + "/keys", path = dir + "/peer-secret";
  for (int attempt = 0; attempt < 2; ++attempt) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0) {
      std::string text, problem;
      const bool read = private_file(fd, &problem) && read_fd(fd, &text, &problem);
      ::close(fd);
      while (!text.empty() && text.back() == '\n') text.pop_back();
      if (read && !from_hex(text, out)) problem = "not 64 hex digits";
      tls::wipe(text);
      if (!problem.empty()) {
        *err = path + ": " + problem;
        return false;
      }
      return true;
    }
    if (errno != ENOENT) {
      *err = path + ": cannot open: " + strerror(errno);
      return false;
    }
    tls::Key secret;
    if (!make_dir(dir, err) || !random_bytes(&secret, err)) return false;
    std::string text = to_hex(secret) + "\n";
    const bool written = write_file_durable(path, text, err, 0600);
    tls::wipe(text);
    if (!written) return false;
  }
  *err = path + ": written but not readable";
  return false;
}

}  // namespace storage
