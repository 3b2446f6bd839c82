#include "store.hpp"

#include "util.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>

namespace ib {

Status Store::check() const {
  struct stat st;
  if (::stat(root_.c_str(), &st) != 0) {
    if (errno == ENOENT)
      return Status::fail("no store at " + root_ + ": the first `imagebuilder --store " + root_ +
                          " build IMAGE --from SRCDIR` creates it");
    return Status::fail(errno_message("store " + root_, errno));
  }
  if (!S_ISDIR(st.st_mode)) return Status::fail("store " + root_ + " exists but is not a directory");
  return Status();
}

Status Store::create(std::vector<std::string>* made) const {
  Status s = make_dirs(root_, made);
  if (s) s = make_dirs(root_ + "/images", made);
  if (s) s = make_dirs(root_ + "/nodes", made);
  return s;
}

std::string Store::image_dir(const std::string& image) const {
  return root_ + "/images/" + image;
}
std::string Store::generations_dir(const std::string& image) const {
  return image_dir(image) + "/generations";
}
std::string Store::generation_dir(const std::string& image, const std::string& gen) const {
  return generations_dir(image) + "/" + gen;
}
std::string Store::current_link(const std::string& image) const {
  return image_dir(image) + "/current";
}

std::vector<std::string> Store::generations(const std::string& image) const {
  std::vector<std::string> out;
  for (auto& g : list_dir(generations_dir(image)))
    if (valid_name(g) && exists(generation_dir(image, g) + "/manifest.json")) out.push_back(g);
  return out;
}

bool Store::has_generation(const std::string& image, const std::string& gen) const {
  return valid_name(gen) && exists(generation_dir(image, gen) + "/manifest.json");
}

Result<Manifest> Store::manifest(const std::string& image, const std::string& gen) const {
  std::string path = generation_dir(image, gen) + "/manifest.json";
  auto text = read_file(path);
  if (!text) return text.status();
  return manifest_from_json(*text, path);
}

Status Store::write_manifest(const std::string& dir, const Manifest& m) const {
  return write_file_atomic(dir + "/manifest.json", manifest_to_json(m), 0444);
}

std::optional<std::string> Store::current(const std::string& image) const {
  char buf[4096];
  ssize_t n = readlink(current_link(image).c_str(), buf, sizeof buf - 1);
  if (n <= 0) return std::nullopt;
  std::string target(buf, size_t(n));
  const std::string prefix = "generations/";
  if (target.rfind(prefix, 0) != 0) return std::nullopt;
  return target.substr(prefix.size());
}

Status Store::set_current(const std::string& image, const std::string& gen) const {
  std::string link = current_link(image);
  std::string tmp = image_dir(image) + "/.current.tmp";
  ::unlink(tmp.c_str());
  if (symlink(("generations/" + gen).c_str(), tmp.c_str()) != 0)
    return Status::fail(errno_message(tmp, errno));
  if (rename(tmp.c_str(), link.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    return Status::fail(errno_message("rename " + tmp, e));
  }
  return fsync_dir(image_dir(image));
}

std::map<std::string, std::vector<std::string>> Store::node_users(const std::string& image) const {
  std::map<std::string, std::vector<std::string>> out;
  std::string nodes = root_ + "/nodes";
  for (auto& node : list_dir(nodes)) {
    auto text = read_file(nodes + "/" + node + "/node.json");
    if (!text) continue;
    auto j = nlohmann::json::parse(*text, nullptr, false);
    if (!j.is_object() || !j.contains("image") || !j.contains("generation")) continue;
    if (!j["image"].is_string() || !j["generation"].is_string()) continue;
    if (j["image"].get<std::string>() != image) continue;
    out[j["generation"].get<std::string>()].push_back(node);
  }
  return out;
}

std::string Store::new_generation_id(const std::string& image, int64_t now) const {
  std::string stamp = compact_utc(now);
  auto gens = generations(image);
  // Keep ids increasing even if the clock went back.
  if (!gens.empty() && gens.back().substr(0, stamp.size()) > stamp)
    stamp = gens.back().substr(0, stamp.size());
  for (int n = 1; n < 100; ++n) {
    char suffix[8];
    snprintf(suffix, sizeof suffix, "-%02d", n);
    std::string id = stamp + suffix;
    bool taken = exists(generation_dir(image, id)) || exists(image_dir(image) + "/.tmp-" + id);
    if (!taken && (gens.empty() || id > gens.back())) return id;
  }
  return compact_utc(now + 1) + "-01";  // 99 builds in one second: borrow the next one
}

void Store::clean_temporaries(const std::string& image) const {
  for (auto& name : list_dir(image_dir(image)))
    if (name.rfind(".tmp-", 0) == 0) (void)remove_tree(image_dir(image) + "/" + name);
}

Result<FileLock> FileLock::acquire(const std::string& path, bool wait,
                                   const std::string& busy_message) {
  for (;;) {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return Status::fail(errno_message(path, errno));
    if (flock(fd, LOCK_EX | (wait ? 0 : LOCK_NB)) != 0) {
      int e = errno;
      ::close(fd);
      if (e == EWOULDBLOCK) return Status::fail(busy_message);
      return Status::fail(errno_message("flock " + path, e));
    }
    struct stat a, b;
    if (fstat(fd, &a) == 0 && ::stat(path.c_str(), &b) == 0 && a.st_ino == b.st_ino &&
        a.st_dev == b.st_dev)
      return FileLock(fd);
    ::close(fd);  // removed or replaced while we waited: lock the new one
  }
}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);
}

}  // namespace ib
