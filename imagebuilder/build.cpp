#include "build.hpp"

#include "block_device.hpp"
#include "device_io.hpp"
#include "digests.hpp"
#include "file_index.hpp"
#include "fs_writer.hpp"
#include "lifecycle.hpp"
#include "source_tree.hpp"
#include "util.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ext2fs/ext2fs.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

extern char** environ;

namespace ib {

void spawn_flatten(const Store& store, const std::string& image, const std::string& gen);
namespace {

constexpr uint32_t kBlock = 4096;
constexpr uint32_t kInodeSize = 256;
constexpr uint64_t kMiB = 1 << 20;

// mke2fs's default journal size (blocks) for a filesystem of `blocks`.
uint64_t journal_blocks(uint64_t blocks) {
  if (blocks < 32768) return 1024;
  if (blocks < 256 * 1024) return 4096;
  if (blocks < 512 * 1024) return 8192;
  if (blocks < 4096 * 1024) return 16384;
  if (blocks < 8192 * 1024) return 32768;
  if (blocks < 16384 * 1024) return 65536;
  if (blocks < 32768 * 1024) return 131072;
  return 262144;
}

struct Geometry {
  uint64_t size = 0;    // bytes, a multiple of 1 MiB
  uint64_t inodes = 0;
};

uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// Bytes of filesystem overhead for `size` bytes holding `inodes` inodes:
// inode tables, journal, bitmaps and descriptors, 1% reserved, slack.
uint64_t overhead(uint64_t size, uint64_t inodes) {
  uint64_t blocks = size / kBlock;
  return inodes * kInodeSize + journal_blocks(blocks) * kBlock + blocks / 8192 * 2 * kBlock +
         size / 100 + 4 * kMiB;
}

Geometry choose_geometry(const SourceTree& t, unsigned headroom_pct, std::optional<uint64_t> fixed) {
  const uint64_t entries = t.entries.size();
  const uint64_t data = t.data_blocks * kBlock;
  Geometry g;
  g.size = fixed ? *fixed / kBlock * kBlock
                 : round_up(data + data * headroom_pct / 100 + 16 * kMiB, kMiB);
  for (int i = 0; i < 4 && !fixed; ++i) {
    uint64_t inodes = std::max<uint64_t>(g.size / 16384, entries * (100 + headroom_pct) / 100 + 1024);
    g.size = round_up(data + data * headroom_pct / 100 + overhead(g.size, inodes) + 8 * kMiB, kMiB);
  }
  g.inodes = std::max<uint64_t>(g.size / 16384, entries * (100 + headroom_pct) / 100 + 1024);
  if (fixed) g.inodes = std::max<uint64_t>(g.size / 16384, entries + 64);
  g.inodes = round_up(g.inodes, 8);
  return g;
}

// The least size the tree could fit in (no headroom), for --size checks.
uint64_t minimum_size(const SourceTree& t) {
  uint64_t data = t.data_blocks * kBlock;
  uint64_t inodes = t.entries.size() + 64;
  uint64_t s = data + 8 * kMiB;
  for (int i = 0; i < 3; ++i) s = data + overhead(s, inodes) - 4 * kMiB;
  return round_up(s, kBlock);
}

// Runs argv with extra environment; returns its combined output on failure.
Status run_command(const std::vector<std::string>& argv, const std::vector<std::string>& env_extra) {
  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC) != 0) return Status::fail(errno_message("pipe", errno));
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, pipefd[1], 1);
  posix_spawn_file_actions_adddup2(&fa, pipefd[1], 2);
  std::vector<char*> args, env;
  for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  for (char** e = environ; *e; ++e) env.push_back(*e);
  for (auto& e : env_extra) env.push_back(const_cast<char*>(e.c_str()));
  env.push_back(nullptr);
  pid_t pid;
  int r = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), env.data());
  // mke2fs lives in sbin, which a normal user's PATH on Debian lacks.
  for (const char* dir : {"/usr/sbin/", "/sbin/"}) {
    if (r != ENOENT || argv[0].find('/') != std::string::npos) break;
    r = posix_spawn(&pid, (dir + argv[0]).c_str(), &fa, nullptr, args.data(), env.data());
  }
  posix_spawn_file_actions_destroy(&fa);
  ::close(pipefd[1]);
  if (r != 0) {
    ::close(pipefd[0]);
    return Status::fail(errno_message("cannot run " + argv[0], r));
  }
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = ::read(pipefd[0], buf, sizeof buf)) != 0;) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    out.append(buf, size_t(n));
  }
  ::close(pipefd[0]);
  int st = 0;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(st) && WEXITSTATUS(st) == 0) return Status();
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return Status::fail(argv[0] + " failed: " + out);
}

Status make_empty_fs(const std::string& path, const Geometry& g, const std::string& image,
                     int64_t epoch) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return Status::fail(errno_message(path, errno));
  int r = ftruncate(fd, off_t(g.size));
  int e = errno;
  ::close(fd);
  if (r != 0) return Status::fail(errno_message(path, e));
  const std::string uuid = derived_uuid("fs:" + image);
  const std::string seed = derived_uuid("hash:" + image);
  return run_command(
      {"mke2fs", "-q", "-F", "-t", "ext4", "-b", std::to_string(kBlock), "-I",
       std::to_string(kInodeSize), "-N", std::to_string(g.inodes), "-m", "1", "-o", "Linux", "-L",
       image.substr(0, 16), "-U", uuid, "-E",
       "hash_seed=" + seed + ",lazy_itable_init=0,lazy_journal_init=0,nodiscard,root_owner=0:0",
       path},
      {"E2FSPROGS_FAKE_TIME=" + std::to_string(epoch), "MKE2FS_SYNC=0"});
}

// Opens an ext2 filesystem read-write through `manager`.
Result<ext2_filsys> open_fs(const std::string& name, io_manager manager, int64_t epoch) {
  ext2_filsys fs = nullptr;
  errcode_t r = ext2fs_open2(name.c_str(), nullptr, EXT2_FLAG_RW | EXT2_FLAG_64BITS, 0, 0,
                             manager, &fs);
  if (r) return Status::fail(ext2_message("open filesystem", r));
  fs->now = time_t(epoch);
  r = ext2fs_read_bitmaps(fs);
  if (r) {
    ext2fs_free(fs);
    return Status::fail(ext2_message("read bitmaps", r));
  }
  return fs;
}

Status close_fs(ext2_filsys fs, bool write) {
  if (!write) {
    ext2fs_free(fs);
    return Status();
  }
  errcode_t r = ext2fs_close_free(&fs);
  return r ? Status::fail(ext2_message("write filesystem metadata", r)) : Status();
}

Status fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::fail(errno_message(path, errno));
  int r = fsync(fd);
  int e = errno;
  ::close(fd);
  return r == 0 ? Status() : Status::fail(errno_message("fsync " + path, e));
}

Status write_synced(const std::string& path, const std::string& data) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0444);
  if (fd < 0) return Status::fail(errno_message(path, errno));
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    done += size_t(n);
  }
  int e = done == data.size() ? (fdatasync(fd) == 0 ? 0 : errno) : errno;
  ::close(fd);
  return e ? Status::fail(errno_message("write " + path, e)) : Status();
}

// Turns a raw failure into the admin-facing message.
Status explain(const Status& s, const Store& store, bool fs_full, uint64_t size) {
  if (s.ok()) return s;
  const std::string& m = s.message();
  if (m.find(strerror(ENOSPC)) != std::string::npos || m.find("Could not allocate") != std::string::npos) {
    struct statvfs v;
    if (statvfs(store.root().c_str(), &v) == 0 && uint64_t(v.f_bavail) * v.f_frsize < 64 * kMiB)
      return Status::fail("the store " + store.root() + " is full (" +
                          human_bytes(uint64_t(v.f_bavail) * v.f_frsize) + " free): " + m);
  }
  if (fs_full)
    return Status::fail("the tree does not fit in " + human_bytes(size) + " (" +
                        std::to_string(size) + " bytes): " + m);
  return s;
}

struct Built {
  uint64_t blocks_stored = 0;
  bool fs_full = false;
  std::unique_ptr<LayerWriter> layer;  // a delta's committed layer, read for its digests
};

Status populate_full(const std::string& path, const SourceTree& tree, int64_t epoch,
                     Progress* progress, Built* out) {
  auto fs = open_fs(path, unix_io_manager, epoch);
  if (!fs) return fs.status();
  SourceOpener opener(tree.root);
  FsWriter w(*fs, &opener, [progress](uint64_t n) { progress->add_bytes(n); });
  progress->begin("copy", tree.files, tree.bytes);
  Status s;
  for (const auto& e : tree.entries) {
    if (&e == &tree.entries[tree.entries.size() / 2]) pause_point("copy");
    s = w.create(e);
    if (!s) break;
    if (!S_ISDIR(e.st.st_mode)) progress->add_file();
  }
  out->fs_full = w.fs_full();
  Status c = close_fs(*fs, s.ok());
  if (s) s = c;
  if (s) progress->end();
  if (s) s = fsync_path(path);
  return s;
}

Status apply_delta(const Store& store, const std::string& image, const std::string& parent,
                   const std::string& gen, const std::string& dir, const SourceTree& tree,
                   const ChangeSet& cs, int64_t epoch, Progress* progress, Built* out) {
  auto chain = GenerationChain::open(store, image, parent);
  if (!chain) return chain.status();
  storage::LayerId id{(*chain)->block_size(), (*chain)->size(),
                      storage::generation_tag(image, parent), storage::generation_tag(image, gen)};
  auto writer = LayerWriter::create(dir, id, std::move(*chain));
  if (!writer) return writer.status();
  LayerWriter* dev = writer->get();
  auto fs = open_fs(device_name(dev), device_io_manager(), epoch);
  if (!fs) return Status::fail(dev->error().empty() ? fs.status().message() : dev->error());
  SourceOpener opener(tree.root);
  FsWriter w(*fs, &opener, [progress](uint64_t n) { progress->add_bytes(n); });
  progress->begin("apply", cs.updated.size() + cs.removed.size(), cs.changed_bytes);
  Status s;
  for (const auto& p : cs.removed) {
    s = w.remove(p);
    if (!s) break;
    progress->add_file();
  }
  for (size_t k = 0; s && k < cs.updated.size(); ++k) {
    if (k == cs.updated.size() / 2) pause_point("copy");
    const auto& [i, kind] = cs.updated[k];
    const SourceEntry& e = tree.entries[i];
    if (kind == Change::kAdded || kind == Change::kReplaced) s = w.create(e);
    else if (kind == Change::kContent) s = w.rewrite(e);
    else s = w.update_metadata(e);
    progress->add_file();
  }
  out->fs_full = w.fs_full();
  Status c = close_fs(*fs, s.ok());
  if (s) s = c;
  if (!s && !dev->error().empty()) s = Status::fail(dev->error() + " (" + s.message() + ")");
  if (s) s = dev->commit();
  if (s) progress->end();
  out->blocks_stored = dev->blocks_stored();
  if (s) out->layer = std::move(*writer);
  return s;
}

// Writes the new generation's chunks.sha256 into `tmp` (digests.hpp).
Status write_digests(const Store& store, const std::string& image, const std::string& gen,
                     const std::string& tmp, const std::optional<std::string>& parent,
                     Built* built, Progress* progress) {
  DigestStats ds;
  Status s;
  if (built->layer) {
    LayerWriter& layer = *built->layer;
    s = write_chunk_digests(store, image, gen, tmp, layer, parent, &layer.map(),
                            layer.below().block_size(), progress, &ds);
    built->layer.reset();
  } else {
    auto dev = FileDevice::open(tmp + "/image.ext4", false);
    if (!dev) return dev.status();
    s = write_chunk_digests(store, image, gen, tmp, **dev, std::nullopt, nullptr, kBlock, progress,
                            &ds);
  }
  if (!s) return s;
  char line[160];
  snprintf(line, sizeof line, "digests: %llu chunks hashed, %llu from the parent, %.2f s",
           (unsigned long long)ds.hashed, (unsigned long long)ds.reused, ds.seconds);
  progress->note(line);
  return s;
}

// Removes the temporary generation, and the directories this build made
// (the store, images/, nodes/, the image's), unless released.
class Cleanup {
 public:
  Cleanup(std::string tmp, std::vector<std::string> made)
      : tmp_(std::move(tmp)), made_(std::move(made)) {}
  ~Cleanup() {
    if (released_) return;
    (void)remove_tree(tmp_);
    for (const auto& d : made_) (void)remove_tree(d);
  }
  void release() { released_ = true; }

 private:
  std::string tmp_;
  std::vector<std::string> made_;
  bool released_ = false;
};

struct Plan {
  std::optional<std::string> parent;  // set: incremental
  Manifest parent_manifest;
  std::vector<IndexRecord> parent_index;
};

// Chooses the parent for an incremental build, or none (full build).
Plan plan_build(const Store& store, const BuildOptions& opt, const SourceTree& tree,
                Progress* progress) {
  Plan p;
  if (opt.full) return p;
  auto gens = store.generations(opt.image);
  std::optional<std::string> parent = opt.parent;
  if (!parent && !gens.empty()) parent = gens.back();
  if (!parent) return p;
  auto m = store.manifest(opt.image, *parent);
  auto idx_text = read_file(store.generation_dir(opt.image, *parent) + "/files.idx");
  if (!m || !idx_text) {
    progress->note("parent " + *parent + " has no usable manifest or index: full build");
    return p;
  }
  auto idx = decode_index(*idx_text, *parent + "/files.idx");
  if (!idx) {
    progress->note(idx.status().message() + ": full build");
    return p;
  }
  if (opt.size && *opt.size / kBlock * kBlock != m->size) {
    progress->note("--size differs from the parent's size: full build");
    return p;
  }
  if (minimum_size(tree) > m->size * 95 / 100) {
    progress->note("the tree no longer fits " + *parent + "'s " + human_bytes(m->size) +
                   ": full build with a new size");
    return p;
  }
  p.parent = parent;
  p.parent_manifest = *m;
  p.parent_index = std::move(*idx);
  return p;
}

std::string absolute(const std::string& path) {
  char buf[PATH_MAX];
  if (realpath(path.c_str(), buf)) return buf;
  return path;
}

}  // namespace

int64_t filesystem_epoch() {
  const char* s = getenv("SOURCE_DATE_EPOCH");
  if (s && *s) {
    char* end;
    long long v = strtoll(s, &end, 10);
    if (*end == '\0' && v > 0) return v;
  }
  return 1700000000;  // 2023-11-14T22:13:20Z
}

Result<std::string> build(const Store& store, const BuildOptions& opt, Progress* progress) {
  const auto t0 = std::chrono::steady_clock::now();
  if (!valid_name(opt.image))
    return Status::fail("invalid image name \"" + opt.image + "\" (use [A-Za-z0-9._-], not starting with '.')");
  if (exists(store.root()) && !is_dir(store.root()))
    return Status::fail("store " + store.root() + " exists but is not a directory");
  struct stat sst;
  if (::stat(opt.source.c_str(), &sst) != 0)
    return Status::fail(errno_message("source " + opt.source, errno));
  if (!S_ISDIR(sst.st_mode)) return Status::fail("source " + opt.source + " is not a directory");
  const std::string source = absolute(opt.source);

  progress->begin("scan", 0, 0);
  auto scanned = scan_source(source);
  if (!scanned) return scanned.status().context("source " + source);
  SourceTree& tree = *scanned;
  progress->note("scan: " + std::to_string(tree.files) + " files, " +
                 std::to_string(tree.entries.size() - tree.files) + " directories, " +
                 human_bytes(tree.bytes));
  if (opt.size && minimum_size(tree) > *opt.size)
    return Status::fail("the tree needs at least " + human_bytes(minimum_size(tree)) + " (" +
                        std::to_string(minimum_size(tree)) + " bytes); --size " +
                        std::to_string(*opt.size) + " is too small");
  if (opt.size && *opt.size % kBlock != 0)
    return Status::fail("--size must be a multiple of " + std::to_string(kBlock));

  const std::string image_dir = store.image_dir(opt.image);
  // The first build into a store makes it; a failed build removes what it made.
  std::vector<std::string> made;
  Status s = store.create(&made);
  if (s) s = make_dirs(store.generations_dir(opt.image), &made);
  if (!s) {
    for (const auto& d : made) (void)remove_tree(d);
    return s;
  }
  auto lock = FileLock::acquire(image_dir + "/.lock", false,
                                "another build (or gc/flatten) of image " + opt.image +
                                    " is in progress: " + image_dir + "/.lock is locked");
  if (!lock) {
    for (const auto& d : made) (void)remove_tree(d);
    return lock.status();
  }
  store.clean_temporaries(opt.image);

  const int64_t epoch = filesystem_epoch();
  const std::string gen = store.new_generation_id(opt.image, time(nullptr));
  const std::string tmp = image_dir + "/.tmp-" + gen;
  Cleanup cleanup(tmp, made);
  if (::mkdir(tmp.c_str(), 0755) != 0) return Status::fail(errno_message("mkdir " + tmp, errno));
  pause_point("tmp");

  Plan plan = plan_build(store, opt, tree, progress);
  Manifest m;
  m.image = opt.image;
  m.generation = gen;
  m.source = source;
  m.built = iso8601_utc(time(nullptr));
  m.files = tree.files;
  m.bytes = tree.bytes;
  m.uuid = derived_uuid("fs:" + opt.image);
  Built built;
  if (plan.parent) {
    ChangeSet cs = compare(plan.parent_index, tree);
    progress->note("incremental over " + *plan.parent + ": " + std::to_string(cs.removed.size()) +
                   " removed, " + std::to_string(cs.updated.size()) + " added or changed, " +
                   human_bytes(cs.changed_bytes) + " to write");
    s = apply_delta(store, opt.image, *plan.parent, gen, tmp, tree, cs, epoch, progress, &built);
    if (s) {
      m.format = "delta";
      m.parent = plan.parent;
      m.derived_from = plan.parent;
      m.size = plan.parent_manifest.size;
      m.depth = plan.parent_manifest.depth + 1;
      m.blocks_stored = built.blocks_stored;
      m.blocks_shared = m.blocks() - built.blocks_stored;
    } else if (built.fs_full) {
      progress->note("the changes do not fit " + human_bytes(plan.parent_manifest.size) +
                     ": full build with a new size");
      (void)remove_tree(tmp);
      if (::mkdir(tmp.c_str(), 0755) != 0) return Status::fail(errno_message("mkdir " + tmp, errno));
      plan.parent.reset();
      built = Built();
    } else {
      return explain(s, store, false, plan.parent_manifest.size);
    }
  }
  if (!plan.parent) {
    Geometry g = choose_geometry(tree, opt.headroom_pct, opt.size);
    const std::string path = tmp + "/image.ext4";
    s = make_empty_fs(path, g, opt.image, epoch);
    if (s) s = populate_full(path, tree, epoch, progress, &built);
    if (!s) return explain(s, store, built.fs_full, g.size);
    m.format = "full";
    m.size = g.size;
    m.blocks_stored = disk_usage(path) / kBlock;
    if (opt.parent || !store.generations(opt.image).empty())
      m.derived_from = opt.parent ? *opt.parent : store.generations(opt.image).back();
  }

  pause_point("image");
  s = write_digests(store, opt.image, gen, tmp, plan.parent, &built, progress);
  if (!s) return explain(s, store, false, m.size);
  pause_point("digests");

  std::vector<IndexRecord> records;
  records.reserve(tree.entries.size());
  for (auto& e : tree.entries) records.push_back(record_of(e));
  m.build_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Inside the temporary no rename dance is needed: the directory becomes
  // visible whole, after every file in it and the directory are synced.
  s = write_synced(tmp + "/files.idx", encode_index(records));
  if (s) s = write_synced(tmp + "/manifest.json", manifest_to_json(m));
  if (s) s = fsync_dir(tmp);
  if (s) pause_point("manifest");
  const std::string final_dir = store.generation_dir(opt.image, gen);
  if (s && ::rename(tmp.c_str(), final_dir.c_str()) != 0)
    s = Status::fail(errno_message("rename " + tmp + " -> " + final_dir, errno));
  if (s) s = fsync_dir(store.generations_dir(opt.image));
  if (!s) return explain(s, store, false, m.size);
  cleanup.release();
  pause_point("renamed");
  for (const char* f : {"/image.ext4", "/layer.diff", "/layer.bitmap"})
    ::chmod((final_dir + f).c_str(), 0444);
  if (m.depth > opt.max_depth) {
    progress->note("chain of " + std::to_string(m.depth) + " deltas: flattening " + gen +
                   " in the background (log: " + store.image_dir(opt.image) + "/.flatten.log)");
    spawn_flatten(store, opt.image, gen);
  }
  return gen;
}

// Runs `imagebuilder flatten --wait IMAGE GEN` detached from this process
// (double fork, new session), so the build returns at once; the child
// waits for the image lock this build still holds and flattens after it.
// A failure there leaves the delta as it is, and the next build that finds
// the chain too long tries again.
void spawn_flatten(const Store& store, const std::string& image, const std::string& gen) {
  const std::string log = store.image_dir(image) + "/.flatten.log";
  pid_t pid = fork();
  if (pid < 0) return;
  if (pid == 0) {
    setsid();
    if (fork() != 0) _exit(0);
    int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (null >= 0) dup2(null, 0);
    if (out >= 0) {
      dup2(out, 1);
      dup2(out, 2);
    }
    execl("/proc/self/exe", "imagebuilder", "--store", store.root().c_str(), "--quiet", "flatten",
          "--wait", image.c_str(), gen.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  waitpid(pid, nullptr, 0);
}

}  // namespace ib
