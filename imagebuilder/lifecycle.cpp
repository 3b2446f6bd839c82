#include "lifecycle.hpp"

#include "block_device.hpp"
#include "digests.hpp"
#include "file_index.hpp"
#include "fs_diff.hpp"
#include "util.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>

namespace ib {
namespace {

Status check_image(const Store& store, const std::string& image) {
  if (!valid_name(image)) return Status::fail("invalid image name \"" + image + "\"");
  if (Status s = store.check(); !s) return s;
  if (!is_dir(store.generations_dir(image)))
    return Status::fail("no image " + image + " in store " + store.root());
  return Status();
}

Status check_generation(const Store& store, const std::string& image, const std::string& gen) {
  if (!store.has_generation(image, gen))
    return Status::fail("image " + image + " has no generation " + gen);
  return Status();
}

Result<FileLock> publish_lock(const Store& store, const std::string& image) {
  return FileLock::acquire(store.image_dir(image) + "/.publish.lock", true, "");
}

Result<FileLock> build_lock(const Store& store, const std::string& image) {
  return FileLock::acquire(store.image_dir(image) + "/.lock", false,
                           "a build, gc or flatten of image " + image + " is in progress (" +
                               store.image_dir(image) + "/.lock is locked)");
}

bool all_zero(const char* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (p[i]) return false;
  return true;
}

// Copies every non-zero block of `chain` into `fd` (sparse). With
// `digests`, every chunk copied is checked against them first, so damage
// in the layers is reported instead of made permanent.
Status write_flat(GenerationChain& chain, int fd, const std::string& path,
                  const storage::ChunkDigests* digests) {
  const uint32_t bs = chain.block_size();
  const uint64_t chunk = digests ? digests->chunk_size() : bs;
  std::vector<char> buf(std::max<uint64_t>(1 << 20, chunk));  // powers of two: whole chunks
  std::string err;
  for (uint64_t off = 0; off < chain.size(); off += buf.size()) {
    size_t n = size_t(std::min<uint64_t>(buf.size(), chain.size() - off));
    if (int e = chain.read(off, buf.data(), n)) return Status::fail(chain.error().empty() ? errno_message("read", e) : chain.error());
    for (size_t c = 0; digests && c < n; c += chunk) {
      auto v = digests->verify((off + c) / chunk, buf.data() + c, std::min<uint64_t>(chunk, n - c), &err);
      if (v == storage::ChunkDigests::Verdict::kError) return Status::fail(err);
      if (v == storage::ChunkDigests::Verdict::kMismatch)
        return Status::fail("chunk " + std::to_string((off + c) / chunk) + " (offset " +
                            std::to_string(off + c) + ") does not match " + digests->path() +
                            ": the generation is damaged (imagebuilder verify); not flattened");
    }
    for (size_t b = 0; b < n; b += bs) {
      if (all_zero(buf.data() + b, bs)) continue;
      size_t run = bs;
      while (b + run < n && !all_zero(buf.data() + b + run, bs)) run += bs;
      if (pwrite(fd, buf.data() + b, run, off_t(off + b)) != ssize_t(run))
        return Status::fail(errno_message("write " + path, errno ? errno : EIO));
      b += run - bs;
    }
  }
  return Status();
}

}  // namespace

Status publish(const Store& store, const std::string& image, std::optional<std::string> gen,
               std::string* published) {
  Status s = check_image(store, image);
  if (!s) return s;
  auto lock = publish_lock(store, image);
  if (!lock) return lock.status();
  if (!gen) {
    auto gens = store.generations(image);
    if (gens.empty()) return Status::fail("image " + image + " has no generations");
    gen = gens.back();
  }
  s = check_generation(store, image, *gen);
  if (!s) return s;
  *published = *gen;
  return store.set_current(image, *gen);
}

Status rollback(const Store& store, const std::string& image, std::string* published) {
  Status s = check_image(store, image);
  if (!s) return s;
  auto lock = publish_lock(store, image);
  if (!lock) return lock.status();
  auto cur = store.current(image);
  if (!cur) return Status::fail("image " + image + " has no current generation to roll back from");
  auto gens = store.generations(image);
  auto it = std::lower_bound(gens.begin(), gens.end(), *cur);
  if (it == gens.begin()) return Status::fail("no generation older than " + *cur + " to roll back to");
  *published = *std::prev(it);
  return store.set_current(image, *published);
}

Result<std::vector<std::string>> list_generations(const Store& store, const std::string& image) {
  Status s = check_image(store, image);
  if (!s) return s;
  auto cur = store.current(image);
  auto users = store.node_users(image);
  std::vector<std::string> out;
  char line[512];
  snprintf(line, sizeof line, "  %-22s %-6s %10s %-22s %6s %10s  %s", "GENERATION", "FORMAT",
           "SIZE", "PARENT", "SHARED", "STORED", "NODES");
  out.push_back(line);
  for (auto& g : store.generations(image)) {
    auto m = store.manifest(image, g);
    if (!m) {
      out.push_back("  " + g + "  (unreadable manifest: " + m.status().message() + ")");
      continue;
    }
    std::string dir = store.generation_dir(image, g);
    uint64_t stored = disk_usage(dir + "/image.ext4") + disk_usage(dir + "/layer.diff") +
                      disk_usage(dir + "/layer.bitmap");
    std::string shared = "-";
    if (m->is_delta() && m->blocks()) {
      char b[16];
      snprintf(b, sizeof b, "%.2f%%", 100.0 * double(m->blocks_shared) / double(m->blocks()));
      shared = b;
    }
    std::string nodes;
    for (auto& n : users[g]) nodes += (nodes.empty() ? "" : ",") + n;
    snprintf(line, sizeof line, "%c %-22s %-6s %10s %-22s %6s %10s  %s",
             cur && *cur == g ? '*' : ' ', g.c_str(), m->format.c_str(),
             human_bytes(m->size).c_str(), m->parent ? m->parent->c_str() : "-", shared.c_str(),
             human_bytes(stored).c_str(), nodes.empty() ? "-" : nodes.c_str());
    out.push_back(line);
  }
  return out;
}

namespace {

// nbdserver's tracker keeps each generation's recorded boot order in
// tracker/IMAGE@GEN.order (and writes it through IMAGE@GEN.order.tmp.*): a
// hint for nodes of that generation, useless once it is gone.
Status remove_boot_orders(const Store& store, const std::string& image,
                          const std::vector<std::string>& gens) {
  const std::string dir = store.root() + "/tracker";
  DIR* d = ::opendir(dir.c_str());
  if (!d) return errno == ENOENT ? Status() : Status::fail(errno_message(dir, errno));
  std::vector<std::string> doomed;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    for (const std::string& g : gens) {
      const std::string order = image + "@" + g + ".order";
      if (name == order || name.rfind(order + ".tmp.", 0) == 0) doomed.push_back(name);
    }
  }
  ::closedir(d);
  for (const std::string& name : doomed)
    if (::unlink((dir + "/" + name).c_str()) != 0 && errno != ENOENT)
      return Status::fail(errno_message("unlink " + dir + "/" + name, errno));
  return doomed.empty() ? Status() : fsync_dir(dir);
}

}  // namespace

Result<std::vector<std::string>> gc(const Store& store, const std::string& image) {
  Status s = check_image(store, image);
  if (!s) return s;
  auto lock = build_lock(store, image);
  if (!lock) return lock.status();
  auto plock = publish_lock(store, image);
  if (!plock) return plock.status();
  store.clean_temporaries(image);
  auto gens = store.generations(image);
  std::set<std::string> keep;
  if (auto cur = store.current(image)) keep.insert(*cur);
  if (!gens.empty()) keep.insert(gens.back());
  for (auto& [g, nodes] : store.node_users(image)) keep.insert(g);
  // Parents of kept deltas, transitively (a generation whose image.ext4
  // exists needs no parent).
  std::vector<std::string> todo(keep.begin(), keep.end());
  while (!todo.empty()) {
    std::string g = todo.back();
    todo.pop_back();
    if (exists(store.generation_dir(image, g) + "/image.ext4")) continue;
    auto m = store.manifest(image, g);
    if (!m) continue;
    if (m->parent && keep.insert(*m->parent).second) todo.push_back(*m->parent);
  }
  std::vector<std::string> removed;
  for (auto& g : gens) {
    if (keep.count(g)) continue;
    // Rename first so the generation disappears at once, then delete.
    std::string doomed = store.image_dir(image) + "/.tmp-gc-" + g;
    if (::rename(store.generation_dir(image, g).c_str(), doomed.c_str()) != 0)
      return Status::fail(errno_message("rename " + store.generation_dir(image, g), errno));
    s = remove_tree(doomed);
    if (!s) return s;
    removed.push_back(g);
  }
  s = fsync_dir(store.generations_dir(image));
  if (!s) return s;
  s = remove_boot_orders(store, image, removed);
  if (!s) return s;
  return removed;
}

Status flatten(const Store& store, const std::string& image, const std::string& gen, bool wait,
               Progress* progress) {
  Status s = check_image(store, image);
  if (s) s = check_generation(store, image, gen);
  if (!s) return s;
  auto lock = wait ? FileLock::acquire(store.image_dir(image) + "/.lock", true, "")
                   : build_lock(store, image);
  if (!lock) return lock.status();
  return flatten_locked(store, image, gen, progress);
}

Status flatten_locked(const Store& store, const std::string& image, const std::string& gen,
                      Progress* progress) {
  auto m = store.manifest(image, gen);
  if (!m) return m.status();
  const std::string dir = store.generation_dir(image, gen);
  if (!m->is_delta() && exists(dir + "/image.ext4")) return Status();  // already full
  auto chain = GenerationChain::open(store, image, gen);
  if (!chain) return chain.status();
  // The content does not change, so chunks.sha256 stays as it is; it is
  // checked on the way. A generation built before digests has none.
  bool missing = false;
  auto digests = open_chunk_digests(store, image, gen, (*chain)->size(), &missing);
  if (!digests && !missing) return digests.status().context("cannot check the chunks to flatten");
  const std::string tmp = dir + "/.image.ext4.tmp";
  const std::string final_path = dir + "/image.ext4";
  ::chmod(dir.c_str(), 0755);
  int fd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0444);
  if (fd < 0) return Status::fail(errno_message(tmp, errno));
  progress->begin("flatten", 0, m->size);
  Status s = ftruncate(fd, off_t(m->size)) == 0 ? Status() : Status::fail(errno_message(tmp, errno));
  if (s) s = write_flat(**chain, fd, tmp, digests ? digests->get() : nullptr);
  if (s && fsync(fd) != 0) s = Status::fail(errno_message("fsync " + tmp, errno));
  ::close(fd);
  if (s && ::rename(tmp.c_str(), final_path.c_str()) != 0)
    s = Status::fail(errno_message("rename " + tmp, errno));
  if (s) s = fsync_dir(dir);
  if (!s) {
    ::unlink(tmp.c_str());
    return s;
  }
  progress->add_bytes(m->size);
  progress->end();
  Manifest flat = *m;
  flat.flattened_from = m->parent;
  flat.parent.reset();
  flat.format = "full";
  flat.depth = 0;
  flat.blocks_stored = disk_usage(final_path) / flat.block_size;
  s = store.write_manifest(dir, flat);
  if (!s) return s;
  ::unlink((dir + "/layer.diff").c_str());
  ::unlink((dir + "/layer.bitmap").c_str());
  return fsync_dir(dir);
}

Result<std::vector<std::string>> diff(const Store& store, const std::string& image,
                                      const std::string& a, const std::string& b, bool from_index) {
  Status s = check_image(store, image);
  if (s) s = check_generation(store, image, a);
  if (s) s = check_generation(store, image, b);
  if (!s) return s;
  if (!from_index) return diff_generations(store, image, a, b);
  std::vector<IndexRecord> idx[2];
  const std::string* gens[2] = {&a, &b};
  for (int i = 0; i < 2; ++i) {
    std::string path = store.generation_dir(image, *gens[i]) + "/files.idx";
    auto text = read_file(path);
    if (!text) return text.status();
    auto d = decode_index(*text, path);
    if (!d) return d.status();
    idx[i] = std::move(*d);
  }
  return diff_indices(idx[0], idx[1]);
}

}  // namespace ib
