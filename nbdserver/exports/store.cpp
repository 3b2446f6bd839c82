#include "exports/store.hpp"

#include "protocol/wire.hpp"
#include "storage/json_file.hpp"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <unordered_map>

namespace exports {
namespace {

using storage::valid_store_name;

// Replaces `path` by rename, so readers see the old or the new text. With
// `durable`, the new text is on disk before the rename.
bool write_file_atomic(const std::string& path, const std::string& text, bool durable,
                       std::string* err) {
  const std::string tmp = path + ".tmp." + std::to_string(getpid()) + "." +
                          std::to_string(std::hash<std::thread::id>()(std::this_thread::get_id()));
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  bool ok = fd >= 0 && ::write(fd, text.data(), text.size()) == ssize_t(text.size()) &&
            (!durable || fsync(fd) == 0);
  int e = errno;
  if (fd >= 0) ::close(fd);
  if (ok && rename(tmp.c_str(), path.c_str()) != 0) {
    ok = false;
    e = errno;
  }
  if (!ok) {
    unlink(tmp.c_str());
    *err = path + ": cannot write: " + strerror(e);
  }
  return ok;
}

bool sync_dir(const std::string& path, std::string* err) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  bool ok = fd >= 0 && fsync(fd) == 0;
  if (!ok) *err = path + ": cannot sync: " + strerror(errno);
  if (fd >= 0) ::close(fd);
  return ok;
}

std::string fold_case(std::string s) {
  for (char& c : s) c = char(tolower(static_cast<unsigned char>(c)));
  return s;
}

bool make_dir(const std::string& path, std::string* err) {
  if (mkdir(path.c_str(), 0750) == 0 || errno == EEXIST) return true;
  *err = path + ": cannot create: " + strerror(errno);
  return false;
}

}  // namespace

std::string now_iso8601() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

namespace {
// The options after '?': "resume" and "mode=persistent|ephemeral", joined
// by '&'.
bool parse_attach_options(const std::string& text, AttachOptions* out, std::string* err) {
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find('&', pos);
    if (end == std::string::npos) end = text.size();
    const std::string opt = text.substr(pos, end - pos);
    if ((opt == "resume" && out->resume) || (opt.rfind("mode=", 0) == 0 && out->has_mode)) {
      *err = "attach option '" + opt.substr(0, opt.find('=')) + "' given twice";
      return false;
    }
    if (opt == "resume") {
      out->resume = true;
    } else if (opt.rfind("mode=", 0) == 0 && storage::parse_mode(opt.substr(5), &out->mode)) {
      out->has_mode = true;
    } else {
      *err = "unknown attach option " + nbd::quoted(opt, 32) +
             " (expected resume or mode=persistent|ephemeral)";
      return false;
    }
    pos = end + 1;
  }
  return true;
}
}  // namespace

bool parse_store_name(const std::string& name, StoreName* out, std::string* err) {
  StoreName n;
  std::string rest = name;
  if (size_t q = rest.find('?'); q != std::string::npos) {
    const std::string opts = rest.substr(q + 1);
    rest.resize(q);
    if (rest.find('/') == std::string::npos) {
      *err = "options after '?' are for node views (IMAGE/NODE?...) only";
      return false;
    }
    if (!parse_attach_options(opts, &n.attach, err)) return false;
  }
  if (size_t slash = rest.find('/'); slash != std::string::npos) {
    n.node = rest.substr(slash + 1);
    rest.resize(slash);
    if (!valid_store_name(n.node)) return false;
  }
  if (size_t at = rest.find('@'); at != std::string::npos) {
    n.generation = rest.substr(at + 1);
    rest.resize(at);
    if (!valid_store_name(n.generation) || !n.node.empty()) return false;
  }
  n.image = rest;
  if (!valid_store_name(n.image)) return false;
  *out = n;
  return true;
}

bool Store::check(std::string* err) const {
  struct stat st;
  if (stat(root_.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    *err = "store " + root_ + ": " + (errno ? strerror(errno) : "not a directory");
    return false;
  }
  return make_dir(root_ + "/images", err) && make_dir(root_ + "/nodes", err);
}

std::shared_ptr<storage::Generation> Store::generation(const std::string& image,
                                                       const std::string& gen,
                                                       std::string* err) {
  std::lock_guard<std::mutex> g(mu_);
  return generation_locked(image, gen, err);
}

std::shared_ptr<storage::Generation> Store::generation_locked(const std::string& image,
                                                              const std::string& gen_name,
                                                              std::string* err) {
  std::string gen = gen_name;
  if (gen.empty()) {
    gen = storage::current_generation(root_, image, err);
    if (gen.empty()) return nullptr;
  }
  const std::string key = image + "@" + gen;
  if (auto p = gens_[key].lock()) return p;
  auto p = storage::Generation::open(root_, image, gen, err);
  if (p) gens_[key] = p;
  return p;
}

int Store::lock_node(const std::string& node, bool wait, std::string* err) const {
  const std::string path = node_dir(node) + "/lock";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0640);
  if (fd < 0) {
    *err = path + ": " + strerror(errno);
    return -1;
  }
  // Our own views release the lock in their destructor, which may be
  // running on another thread right now: wait for it briefly.
  for (int i = 0; flock(fd, LOCK_EX | LOCK_NB) != 0; ++i) {
    if (errno != EWOULDBLOCK || !wait || i == 2000) {
      *err = errno == EWOULDBLOCK ? "node '" + node + "' is in use (attached to a server)"
                                  : path + ": " + strerror(errno);
      ::close(fd);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return fd;
}

namespace {
std::string address_text(const std::string& a) { return a.empty() ? "an unknown address" : a; }
}  // namespace

Store::Attachment::~Attachment() {
  std::lock_guard<std::mutex> g(store_->writers_mu_);
  auto it = store_->writers_.find(node_);
  if (it != store_->writers_.end() && --it->second.attachments == 0) store_->writers_.erase(it);
}

std::shared_ptr<storage::NodeView> Store::view(const std::string& image, const std::string& node,
                                               const AttachOptions& how,
                                               const std::string& address,
                                               std::unique_ptr<Attachment>* held,
                                               std::string* err) {
  // Checked at every attach, a node's further connections too: a node an
  // admin failed or retired while it ran gets no new connection.
  if (!may_attach(node, err)) return nullptr;
  std::lock_guard<std::mutex> g(mu_);
  std::string pin;
  if (valid_store_name(node) && !read_pin(node, &pin, err)) return nullptr;
  if (!pin.empty() && pin != address) {
    *err = "node '" + node + "' is pinned to " + pin + "; refusing " +
           (how.resume ? "a resume" : "an attach") + " from " + address_text(address) +
           " (nbdserver admin pin/unpin)";
    return nullptr;
  }
  {
    std::lock_guard<std::mutex> wg(writers_mu_);
    if (auto w = writers_.find(node); w != writers_.end() && w->second.address != address) {
      *err = "node '" + node + "' is attached from " + address_text(w->second.address) +
             "; refusing " + (how.resume ? "a resume" : "an attach") + " from " +
             address_text(address) + " (one writer per view: detach it there first)";
      return nullptr;
    }
  }
  // Meanwhile only detaches change writers_ (every attach holds mu_), and
  // they only let go: the check above still holds after the view opened.
  auto v = open_view(image, node, how, err);
  if (!v) return nullptr;
  {
    std::lock_guard<std::mutex> wg(writers_mu_);
    Writer& w = writers_[node];
    w.address = address;
    ++w.attachments;
  }
  held->reset(new Attachment(this, node));
  if (pin.empty() && opts_.pin_addresses && !address.empty()) pin_first(node, address);
  return v;
}

void Store::pin_first(const std::string& node, const std::string& address) {
  // Created only if absent (link fails on an existing name), so a pin an
  // admin set meanwhile is never replaced.
  const std::string path = node_dir(node) + "/pin";
  const std::string tmp = path + ".first." + std::to_string(getpid());
  std::string err;
  bool ok = write_file_atomic(tmp, address + "\n", true, &err);
  if (ok && link(tmp.c_str(), path.c_str()) != 0) {
    if (errno != EEXIST) err = path + ": " + strerror(errno);
    ok = false;
  }
  ok = ok && sync_dir(node_dir(node), &err);
  unlink(tmp.c_str());
  if (ok) {
    spdlog::info("node '{}': pinned to {} at its first attach (--pin-addresses)", node, address);
  } else if (!err.empty()) {
    spdlog::warn("node '{}': cannot pin it to {}: {}", node, address, err);
  }
}

bool canonical_address(const std::string& text, std::string* out) {
  if (text == "unix") {
    *out = text;
    return true;
  }
  char buf[INET6_ADDRSTRLEN];
  in_addr a4;
  in6_addr a6;
  if (inet_pton(AF_INET, text.c_str(), &a4) == 1) {
    inet_ntop(AF_INET, &a4, buf, sizeof buf);
  } else if (inet_pton(AF_INET6, text.c_str(), &a6) == 1) {
    if (IN6_IS_ADDR_V4MAPPED(&a6)) {
      inet_ntop(AF_INET, a6.s6_addr + 12, buf, sizeof buf);
    } else {
      inet_ntop(AF_INET6, &a6, buf, sizeof buf);
    }
  } else {
    return false;
  }
  *out = buf;
  return true;
}

bool Store::read_pin(const std::string& node, std::string* address, std::string* err) const {
  const std::string path = node_dir(node) + "/pin";
  address->clear();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return true;
    *err = path + ": " + strerror(errno);
    return false;
  }
  char buf[128];
  const ssize_t n = ::read(fd, buf, sizeof buf);
  ::close(fd);
  std::string line(buf, size_t(std::max<ssize_t>(n, 0)));
  line = line.substr(0, line.find('\n'));
  if (!canonical_address(line, address)) {
    *err = path + ": holds no address (expected an IPv4 or IPv6 address, or unix)";
    return false;
  }
  return true;
}

bool Store::pin_node(const std::string& node, const std::string& address, std::string* canonical,
                     std::string* err) {
  NodeRecord r;
  if (!read_node(node, &r, err)) return false;
  if (!canonical_address(address, canonical)) {
    *err = "bad address '" + address.substr(0, 64) +
           "' (expected an IPv4 or IPv6 address, or unix for Unix-socket clients)";
    return false;
  }
  return write_file_atomic(node_dir(node) + "/pin", *canonical + "\n", true, err) &&
         sync_dir(node_dir(node), err);
}

bool Store::unpin_node(const std::string& node, bool* was_pinned, std::string* err) {
  NodeRecord r;
  if (!read_node(node, &r, err)) return false;
  const std::string path = node_dir(node) + "/pin";
  *was_pinned = unlink(path.c_str()) == 0;
  if (!*was_pinned && errno != ENOENT) {
    *err = path + ": " + strerror(errno);
    return false;
  }
  return !*was_pinned || sync_dir(node_dir(node), err);
}

std::shared_ptr<storage::NodeView> Store::open_view(const std::string& image,
                                                    const std::string& node,
                                                    const AttachOptions& how, std::string* err) {
  auto wrong_mode = [&](storage::NodeMode has) {
    *err = "node '" + node + "' is " + storage::mode_name(has) + " but attached with mode=" +
           storage::mode_name(how.mode) + " (nbdroot.mode=); change its mode with `nbdserver " +
           "admin delete` and `create --mode`";
  };
  if (auto v = views_[node].lock()) {
    if (v->generation().image() != image) {
      *err = "node '" + node + "' belongs to image '" + v->generation().image() + "'";
      return nullptr;
    }
    if (how.has_mode && how.mode != v->mode()) {
      wrong_mode(v->mode());
      return nullptr;
    }
    return v;
  }
  NodeRecord rec;
  std::shared_ptr<storage::Generation> created_on;  // held until the view has it
  if (!existing_record(image, node, how, &rec, err, &created_on)) return nullptr;
  int lock = lock_node(node, true, err);
  if (lock < 0) return nullptr;
  auto gen = generation_locked(image, rec.generation, err);
  if (!gen) {
    ::close(lock);
    *err = "node '" + node + "': " + *err;
    return nullptr;
  }
  std::shared_ptr<storage::NodeView> v = storage::NodeView::open(
      node, layer_prefix(rec), gen, rec.block_size, rec.mode, how.resume, lock, err);
  if (!v) return nullptr;
  views_[node] = v;  // attached() records the node as seen
  return v;
}

bool Store::existing_record(const std::string& image, const std::string& node,
                            const AttachOptions& how, NodeRecord* rec, std::string* err,
                            std::shared_ptr<storage::Generation>* created_on) {
  if (access((node_dir(node) + "/node.json").c_str(), F_OK) != 0) {
    if (how.resume) {
      *err = "node '" + node + "' does not exist, so there is nothing to resume (deleted while "
             "the node ran?); the node must reboot";
      return false;
    }
    if (opts_.nodes == NodePolicy::kRegistered) {
      *err = "node '" + node + "' is not registered (the server runs with --nodes registered)";
      return false;
    }
    std::shared_ptr<storage::Generation> gen;
    if (!create_node_locked(node, image, how.has_mode ? how.mode : opts_.mode, opts_.block_size,
                            &gen, err))
      return false;
    if (created_on) *created_on = std::move(gen);
  }
  if (!read_node(node, rec, err)) return false;
  if (rec->image != image) {
    *err = "node '" + node + "' belongs to image '" + rec->image + "', not '" + image + "'";
    return false;
  }
  if (how.has_mode && how.mode != rec->mode) {
    *err = "node '" + node + "' is " + storage::mode_name(rec->mode) + " but attached with mode=" +
           storage::mode_name(how.mode) + " (nbdroot.mode=); change its mode with `nbdserver " +
           "admin delete` and `create --mode`";
    return false;
  }
  return true;
}

bool Store::describe(const std::string& image, const std::string& node, const AttachOptions& how,
                     NodeRecord* rec, uint64_t* size, std::string* err) {
  if (!may_attach(node, err)) return false;
  std::lock_guard<std::mutex> g(mu_);
  if (!existing_record(image, node, how, rec, err)) return false;
  if (generation_size_locked(rec->image, rec->generation, size, err)) return true;
  *err = "node '" + node + "': " + *err;
  return false;
}

bool Store::generation_size_locked(const std::string& image, const std::string& gen,
                                   uint64_t* size, std::string* err) {
  const std::string key = image + "@" + gen;
  auto it = gen_sizes_.find(key);
  if (it == gen_sizes_.end()) {
    auto g = generation_locked(image, gen, err);
    if (!g) return false;
    it = gen_sizes_.emplace(key, g->size()).first;
  }
  *size = it->second;
  return true;
}

bool Store::generation_size(const std::string& image, const std::string& gen, uint64_t* size,
                            std::string* err) {
  // Unknown names are refused before they reach the caches.
  if (!valid_store_name(image) || !valid_store_name(gen) ||
      access((root_ + "/images/" + image + "/generations/" + gen).c_str(), F_OK) != 0) {
    *err = "no generation " + image + "@" + gen;
    return false;
  }
  std::lock_guard<std::mutex> g(mu_);
  return generation_size_locked(image, gen, size, err);
}

bool Store::lookup_node(const std::string& image, const std::string& node, NodeRecord* rec,
                        uint64_t* size, std::string* err) {
  if (!valid_store_name(image) || !valid_store_name(node)) {
    *err = "bad image or node name";
    return false;
  }
  if (!read_node_cached(node, rec)) {
    if (!read_node(node, rec, err)) return false;
  }
  if (rec->image != image) {
    *err = "node '" + node + "' belongs to image '" + rec->image + "', not '" + image + "'";
    return false;
  }
  std::lock_guard<std::mutex> g(mu_);
  if (generation_size_locked(rec->image, rec->generation, size, err)) return true;
  *err = "node '" + node + "': " + *err;
  return false;
}

namespace {
std::vector<std::string> list_dir(const std::string& path) {
  std::vector<std::string> out;
  if (DIR* d = opendir(path.c_str())) {
    while (dirent* e = readdir(d))
      if (valid_store_name(e->d_name)) out.push_back(e->d_name);
    closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace

std::vector<std::pair<std::string, std::string>> Store::list_exports() const {
  std::vector<std::pair<std::string, std::string>> out;
  for (const std::string& image : list_dir(root_ + "/images")) {
    std::string err;
    const std::string cur = storage::current_generation(root_, image, &err);
    if (!cur.empty()) out.push_back({image, image + "@" + cur + " (current)"});
    for (const std::string& gen : list_dir(root_ + "/images/" + image + "/generations"))
      out.push_back({image + "@" + gen, image + "@" + gen});
  }
  for (const std::string& node : nodes()) {
    NodeRecord r;
    if (read_node_cached(node, &r))
      out.push_back({r.image + "/" + node, "node " + node + " on " + r.image + "@" + r.generation +
                                               " (" + storage::mode_name(r.mode) + ")"});
  }
  return out;
}

bool Store::read_node_cached(const std::string& node, NodeRecord* r) const {
  struct stat st;
  if (stat((node_dir(node) + "/node.json").c_str(), &st) != 0) return false;
  const int64_t mtime_ns = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  {
    std::lock_guard<std::mutex> g(records_mu_);
    auto it = records_.find(node);
    if (it != records_.end() && it->second.dev == st.st_dev && it->second.ino == st.st_ino &&
        it->second.size == st.st_size && it->second.mtime_ns == mtime_ns) {
      *r = it->second.rec;
      return true;
    }
  }
  std::string err;
  if (!read_node(node, r, &err)) return false;
  // Keyed by the stat from before the read: if the file was replaced in
  // between, the next listing sees another inode and reads it again.
  std::lock_guard<std::mutex> g(records_mu_);
  records_[node] = CachedRecord{st.st_dev, st.st_ino, st.st_size, mtime_ns, *r};
  return true;
}

void Store::attached(const std::string& node, int delta) {
  NodeRecord rec;
  std::string err;
  // Not mu_: a loop calls this, and mu_ may be held by a node's creation
  // on the attach threads. Only loops write an attached node's record.
  std::lock_guard<std::mutex> g(attached_mu_);
  if (!read_node(node, &rec, &err)) return;
  rec.connections = unsigned(std::max(0, int(rec.connections) + delta));
  rec.last_seen = now_iso8601();
  if (!write_node(rec, false, &err)) spdlog::warn("{}", err);
}

bool Store::read_node(const std::string& node, NodeRecord* r, std::string* err) const {
  const std::string path = node_dir(node) + "/node.json";
  nlohmann::json j;
  int err_no = 0;
  if (!storage::read_json_object(path, &j, err, &err_no)) {
    if (err_no == ENOENT) *err = "node '" + node + "' does not exist";
    return false;
  }
  auto str = [&](const char* k) {
    return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : std::string();
  };
  r->node = node;
  r->image = str("image");
  r->generation = str("generation");
  r->created = str("created");
  r->last_seen = str("last_seen");
  r->block_size = j.value("block_size", 4096u);
  r->connections = j.value("connections", 0u);
  if (!valid_store_name(r->image) || !valid_store_name(r->generation) ||
      !storage::parse_mode(str("mode"), &r->mode) || r->block_size < 512 ||
      (r->block_size & (r->block_size - 1))) {
    *err = path + ": missing or bad image, generation, mode or block_size";
    return false;
  }
  return true;
}

bool Store::write_node(const NodeRecord& r, bool durable, std::string* err) const {
  nlohmann::json j = {{"image", r.image},         {"generation", r.generation},
                      {"mode", storage::mode_name(r.mode)}, {"block_size", r.block_size},
                      {"created", r.created},     {"last_seen", r.last_seen},
                      {"connections", r.connections}};
  return write_file_atomic(node_dir(r.node) + "/node.json", j.dump(2) + "\n", durable, err) &&
         (!durable || sync_dir(node_dir(r.node), err));
}

std::vector<std::string> Store::nodes() const { return list_dir(root_ + "/nodes"); }

bool Store::create_node_locked(const std::string& node, const std::string& image,
                               storage::NodeMode mode, uint32_t block_size,
                               std::shared_ptr<storage::Generation>* gen_out, std::string* err) {
  // A node's first attach: the generation comes from the cache the attach
  // uses next (opening it afresh scans the image's allocation and loads
  // every delta's map), and the name check reads nodes/ once, so a storm of
  // new nodes in a large store stays cheap. It runs on the attach threads
  // (server/attach_pool.hpp), never on an event loop.
  // Fault injection (tests): a creation as slow as a busy disk makes it.
  static const long delay_ms = [] {
    const char* d = getenv("NBDROOT_FAULT_ATTACH_DELAY_MS");
    const long ms = d ? std::max(0L, strtol(d, nullptr, 10)) : 0;
    if (ms) spdlog::warn("fault injection: each node creation takes {} ms more", ms);
    return ms;
  }();
  if (delay_ms) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
  if (!node_names_) node_names_ = std::make_unique<NameIndex>(root_ + "/nodes");
  if (!check_new_names({node}, image, err, node_names_.get())) return false;
  const std::string gen = storage::current_generation(root_, image, err);
  if (gen.empty() || !(*gen_out = generation_locked(image, gen, err))) return false;
  size_t created = 0;
  return write_new_nodes({node}, image, gen, mode, block_size, &created, err);
}

bool Store::create_nodes(const std::vector<std::string>& nodes, const std::string& image,
                         const std::string& gen_name, storage::NodeMode mode,
                         uint32_t block_size, size_t* created, std::string* err) {
  *created = 0;
  if (!check_new_names(nodes, image, err)) return false;
  std::string gen = gen_name;
  if (gen.empty() || gen == "current") {
    gen = storage::current_generation(root_, image, err);
    if (gen.empty()) return false;
  }
  if (!storage::Generation::open(root_, image, gen, err)) return false;
  return write_new_nodes(nodes, image, gen, mode, block_size, created, err);
}

bool Store::check_new_names(const std::vector<std::string>& nodes, const std::string& image,
                            std::string* err, NameIndex* index) const {
  if (!valid_store_name(image)) {
    *err = "bad image name (use letters, digits, '.', '_' and '-')";
    return false;
  }
  std::vector<std::string> sorted = nodes;
  std::sort(sorted.begin(), sorted.end());
  // Names are case-sensitive, and a name that differs from another only in
  // case is a typo (a MAC typed in capitals): refused, not a second node.
  std::unordered_map<std::string, std::string> wanted;  // lower case -> the new name
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (!valid_store_name(sorted[i])) {
      *err = "bad node name " + nbd::quoted(sorted[i]) + " (use at most " +
             std::to_string(storage::kMaxStoreName) + " letters, digits, '.', '_' and '-')";
      return false;
    }
    if (i && sorted[i] == sorted[i - 1]) {
      *err = "node '" + sorted[i] + "' is named twice";
      return false;
    }
    // A node exists once it has a record. A directory without one is a
    // node that only fetched a boot script (lifecycle state.json): it may be
    // registered, or created by its first attach, like an unknown one.
    if (access((node_dir(sorted[i]) + "/node.json").c_str(), F_OK) == 0) {
      *err = "node '" + sorted[i] + "' already exists";
      return false;
    }
    auto [it, fresh] = wanted.emplace(fold_case(sorted[i]), sorted[i]);
    if (!fresh) {
      *err = "node '" + sorted[i] + "' differs from the node '" + it->second +
             "' only in case (names are case-sensitive)";
      return false;
    }
  }
  // The first new name, in sorted order, that an existing name matches but
  // for case. Its own directory (a node that fetched a boot script) is no
  // variant. Without the server's index, one made for this call reads
  // nodes/ once.
  std::unique_ptr<NameIndex> once;
  if (!index) index = (once = std::make_unique<NameIndex>(root_ + "/nodes")).get();
  std::map<std::string, std::string> clash;  // new name -> the existing one
  for (const auto& [folded, name] : wanted)
    for (const std::string& existing : index->matching(folded))
      if (existing != name) clash.emplace(name, existing);
  if (clash.empty()) return true;
  *err = "node '" + clash.begin()->first + "' differs from the node '" + clash.begin()->second +
         "' only in case (names are case-sensitive)";
  return false;
}

NameIndex::~NameIndex() {
  if (fd_ >= 0) ::close(fd_);
}

std::vector<std::string> NameIndex::matching(const std::string& folded) {
  catch_up();
  auto it = by_folded_.find(folded);
  if (it == by_folded_.end()) return {};
  return {it->second.begin(), it->second.end()};
}

void NameIndex::scan() {
  // The watch first, then the scan: an entry made meanwhile is in both,
  // which the sets absorb; none is in neither.
  if (fd_ < 0) fd_ = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  current_ = fd_ >= 0 &&
             inotify_add_watch(fd_, dir_.c_str(),
                               IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO |
                                   IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR) >= 0;
  if (!current_ && fd_ >= 0 && errno != ENOENT && !warned_) {
    warned_ = true;
    spdlog::warn("cannot watch {} for new nodes ({}); reading it at every node's creation",
                 dir_, strerror(errno));
  }
  by_folded_.clear();
  for (const std::string& name : list_dir(dir_)) by_folded_[fold_case(name)].insert(name);
}

void NameIndex::catch_up() {
  if (!current_) return scan();
  alignas(inotify_event) char buf[16384];
  for (;;) {
    const ssize_t n = ::read(fd_, buf, sizeof buf);
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno != EAGAIN) current_ = false;
      break;
    }
    for (ssize_t at = 0; at < n;) {
      const auto* e = reinterpret_cast<const inotify_event*>(buf + at);
      at += ssize_t(sizeof(inotify_event) + e->len);
      if (e->mask & (IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF)) {
        current_ = false;
        continue;
      }
      if (!e->len || !valid_store_name(e->name)) continue;
      const std::string name = e->name;
      if (e->mask & (IN_CREATE | IN_MOVED_TO)) {
        by_folded_[fold_case(name)].insert(name);
      } else if (e->mask & (IN_DELETE | IN_MOVED_FROM)) {
        auto it = by_folded_.find(fold_case(name));
        if (it != by_folded_.end() && it->second.erase(name) && it->second.empty())
          by_folded_.erase(it);
      }
    }
  }
  if (!current_) {
    // A new watch on the next scan; the old one (if any) goes with the fd.
    ::close(fd_);
    fd_ = -1;
    scan();
  }
}

bool Store::write_new_nodes(const std::vector<std::string>& nodes, const std::string& image,
                            const std::string& gen, storage::NodeMode mode, uint32_t block_size,
                            size_t* created, std::string* err) {
  if (!make_dir(root_ + "/nodes", err)) return false;
  for (const std::string& node : nodes) {
    if (mkdir(node_dir(node).c_str(), 0750) != 0 && errno != EEXIST) {
      *err = node_dir(node) + ": " + strerror(errno);
      return false;
    }
    NodeRecord r{node, image, gen, mode, block_size, now_iso8601(), "", 0};
    if (!write_node(r, true, err)) return false;
    ++*created;
  }
  return true;
}

bool Store::reset_node(const std::string& node, const std::string& gen, std::string* err) {
  NodeRecord r;
  if (!read_node(node, &r, err)) return false;
  int lock = lock_node(node, false, err);
  if (lock < 0) return false;
  const std::string old = layer_prefix(r);
  if (!gen.empty()) {
    std::string g = gen == "current" ? storage::current_generation(root_, r.image, err) : gen;
    if (g.empty() || !storage::Generation::open(root_, r.image, g, err)) {
      ::close(lock);
      return false;
    }
    r.generation = g;
  }
  // The node starts afresh at its next attach: the layer files go first,
  // then the record names the (possibly new) generation.
  bool ok = true;
  for (const char* ext : {".log", ".bitmap", ".diff"}) {
    if (unlink((old + ext).c_str()) != 0 && errno != ENOENT) {
      *err = old + ext + ": " + strerror(errno);
      ok = false;
    }
  }
  ok = ok && write_node(r, true, err);
  ::close(lock);
  return ok;
}

bool Store::delete_node(const std::string& node, std::string* err) {
  NodeRecord r;
  if (!read_node(node, &r, err)) return false;
  int lock = lock_node(node, false, err);
  if (lock < 0) return false;
  const std::string dir = node_dir(node);
  DIR* d = opendir(dir.c_str());
  bool ok = d != nullptr;
  while (d && ok) {
    dirent* e = readdir(d);
    if (!e) break;
    std::string n = e->d_name;
    if (n == "." || n == "..") continue;
    if (unlink((dir + "/" + n).c_str()) != 0) ok = false;
  }
  if (d) closedir(d);
  ok = ok && rmdir(dir.c_str()) == 0;
  if (!ok) *err = dir + ": cannot remove: " + strerror(errno);
  ::close(lock);
  return ok;
}

}  // namespace exports
