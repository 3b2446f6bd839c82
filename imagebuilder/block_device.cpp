#include "block_device.hpp"

#include "store.hpp"
#include "util.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace ib {
namespace {

int pread_full(int fd, void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd, static_cast<char*>(buf) + done, len - done, off_t(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) {  // past the end of a sparse file: zeros
      memset(static_cast<char*>(buf) + done, 0, len - done);
      return 0;
    }
    done += size_t(n);
  }
  return 0;
}

int pwrite_full(int fd, const void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd, static_cast<const char*>(buf) + done, len - done, off_t(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) return EIO;
    done += size_t(n);
  }
  return 0;
}

bool all_zero(const uint8_t* p, size_t n) {
  static const uint8_t zeros[4096] = {};
  while (n >= sizeof zeros) {
    if (memcmp(p, zeros, sizeof zeros) != 0) return false;
    p += sizeof zeros;
    n -= sizeof zeros;
  }
  return memcmp(p, zeros, n) == 0;
}

}  // namespace

int BlockDevice::fail(int err, const std::string& what) {
  if (error_.empty()) error_ = errno_message(what, err);
  return err;
}

// ---------------------------------------------------------------- FileDevice

Result<std::unique_ptr<FileDevice>> FileDevice::open(const std::string& path, bool writable) {
  int fd = ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return Status::fail(errno_message(path, errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    return Status::fail(errno_message(path, e));
  }
  return std::unique_ptr<FileDevice>(new FileDevice(path, fd, uint64_t(st.st_size), writable));
}

FileDevice::~FileDevice() { ::close(fd_); }

int FileDevice::read(uint64_t offset, void* buf, size_t len) {
  int e = pread_full(fd_, buf, len, offset);
  return e ? fail(e, "read " + path_) : 0;
}

int FileDevice::write(uint64_t offset, const void* buf, size_t len) {
  if (!writable_) return fail(EROFS, path_);
  int e = pwrite_full(fd_, buf, len, offset);
  return e ? fail(e, "write " + path_) : 0;
}

int FileDevice::flush() { return fdatasync(fd_) == 0 ? 0 : fail(errno, "fdatasync " + path_); }

// ---------------------------------------------------------------- GenerationChain

Result<std::unique_ptr<GenerationChain>> GenerationChain::open(const Store& store,
                                                               const std::string& image,
                                                               const std::string& gen) {
  std::unique_ptr<GenerationChain> c(new GenerationChain());
  std::string next = gen;
  for (int depth = 0; !next.empty(); ++depth) {
    if (depth > 1000) return Status::fail(image + ": generation chain loops at " + next);
    std::string parent;
    Status s = c->add_level(store, image, next, &parent);
    if (!s) return s;
    next = parent;
  }
  return c;
}

Status GenerationChain::add_level(const Store& store, const std::string& image,
                                  const std::string& gen, std::string* parent) {
  auto m = store.manifest(image, gen);
  if (!m) return m.status();
  if (levels_.empty()) {
    size_ = m->size;
    block_size_ = m->block_size;
  } else if (m->size != size_ || m->block_size != block_size_) {
    return Status::fail(image + "@" + gen + ": geometry differs from its child's");
  }
  Level lv;
  lv.gen = gen;
  std::string dir = store.generation_dir(image, gen);
  if (exists(dir + "/image.ext4")) {
    lv.full = true;
    lv.path = dir + "/image.ext4";
    lv.fd = ::open(lv.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (lv.fd < 0) return Status::fail(errno_message(lv.path, errno));
    levels_.push_back(std::move(lv));
    parent->clear();
    return Status();
  }
  if (!m->parent) return Status::fail(image + "@" + gen + ": full generation without image.ext4");
  lv.path = dir + "/layer.diff";
  lv.id = storage::LayerId{block_size_, size_, storage::generation_tag(image, *m->parent),
                           storage::generation_tag(image, gen)};
  lv.fd = ::open(lv.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (lv.fd < 0) return Status::fail(errno_message(lv.path, errno));
  std::string map_path = dir + "/layer.bitmap";
  int mfd = ::open(map_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (mfd < 0) {
    int e = errno;
    ::close(lv.fd);
    return Status::fail(errno_message(map_path, e));
  }
  std::string err;
  bool ok = storage::load_layer(lv.fd, mfd, lv.id, &lv.map, &err);
  ::close(mfd);
  if (!ok) {
    ::close(lv.fd);
    return Status::fail(image + "@" + gen + ": " + err);
  }
  levels_.push_back(std::move(lv));
  *parent = *m->parent;
  return Status();
}

GenerationChain::~GenerationChain() {
  for (auto& l : levels_) ::close(l.fd);
}

GenerationChain::Where GenerationChain::locate(uint64_t block) const {
  const uint32_t b = uint32_t(block);
  for (size_t i = 0; i < levels_.size(); ++i) {
    const Level& l = levels_[i];
    if (l.full) return Where{int(i), block * block_size_};
    if (l.map.dirty.contains(b)) return Where{int(i), block * block_size_};
    if (l.map.zero.contains(b)) return Where{};
  }
  return Where{};
}

int GenerationChain::read_block(uint64_t block, void* buf) {
  Where w = locate(block);
  if (w.level < 0) {
    memset(buf, 0, block_size_);
    return 0;
  }
  const Level& l = levels_[size_t(w.level)];
  int e = pread_full(l.fd, buf, block_size_, w.offset);
  return e ? fail(e, "read " + l.path) : 0;
}

int GenerationChain::read(uint64_t offset, void* buf, size_t len) {
  auto* out = static_cast<uint8_t*>(buf);
  while (len > 0) {
    uint64_t block = offset / block_size_;
    uint64_t in = offset % block_size_;
    size_t n = std::min<uint64_t>(len, block_size_ - in);
    Where w = locate(block);
    // Extend the run while following blocks live contiguously at the same level.
    while (n < len && w.level >= 0) {
      Where nx = locate(block + (in + n) / block_size_);
      if (nx.level != w.level || nx.offset != w.offset + in + n) break;
      n += std::min<uint64_t>(len - n, block_size_);
    }
    if (w.level < 0) {
      memset(out, 0, n);
    } else {
      const Level& l = levels_[size_t(w.level)];
      int e = pread_full(l.fd, out, n, w.offset + in);
      if (e) return fail(e, "read " + l.path);
    }
    out += n;
    offset += n;
    len -= n;
  }
  return 0;
}

// ---------------------------------------------------------------- LayerWriter

Result<std::unique_ptr<LayerWriter>> LayerWriter::create(const std::string& dir,
                                                         const storage::LayerId& id,
                                                         std::unique_ptr<GenerationChain> below) {
  if (below->size() != id.size || below->block_size() != id.block_size)
    return Status::fail(dir + ": layer geometry differs from its base");
  std::string diff = dir + "/layer.diff", map = dir + "/layer.bitmap", err;
  if (!storage::create_layer(diff, map, id, &err)) return Status::fail(err);
  std::unique_ptr<LayerWriter> w(new LayerWriter());
  w->dir_ = dir;
  w->id_ = id;
  w->below_ = std::move(below);
  w->scratch_.resize(id.block_size);
  w->diff_fd_ = ::open(diff.c_str(), O_RDWR | O_CLOEXEC);
  w->map_fd_ = ::open(map.c_str(), O_RDWR | O_CLOEXEC);
  if (w->diff_fd_ < 0 || w->map_fd_ < 0) return Status::fail(errno_message(dir + "/layer.*", errno));
  if (!storage::load_layer(w->diff_fd_, w->map_fd_, id, &w->map_, &err))
    return Status::fail(dir + ": " + err);
  return w;
}

LayerWriter::~LayerWriter() {
  if (diff_fd_ >= 0) ::close(diff_fd_);
  if (map_fd_ >= 0) ::close(map_fd_);
}

int LayerWriter::read_block(uint64_t block, uint8_t* buf) {
  const uint32_t b = uint32_t(block);
  if (map_.dirty.contains(b)) {
    int e = pread_full(diff_fd_, buf, id_.block_size, block * id_.block_size);
    return e ? fail(e, "read " + dir_ + "/layer.diff") : 0;
  }
  if (map_.zero.contains(b)) {
    memset(buf, 0, id_.block_size);
    return 0;
  }
  int e = below_->read_block(block, buf);
  return e ? fail(e, below_->error()) : 0;
}

int LayerWriter::read(uint64_t offset, void* buf, size_t len) {
  auto* out = static_cast<uint8_t*>(buf);
  const uint32_t bs = id_.block_size;
  while (len > 0) {
    uint64_t block = offset / bs, in = offset % bs;
    size_t n = std::min<uint64_t>(len, bs - in);
    if (in == 0 && n == bs) {
      if (int e = read_block(block, out)) return e;
    } else {
      if (int e = read_block(block, scratch_.data())) return e;
      memcpy(out, scratch_.data() + in, n);
    }
    out += n;
    offset += n;
    len -= n;
  }
  return 0;
}

int LayerWriter::write_block(uint64_t block, const uint8_t* data) {
  const uint32_t b = uint32_t(block);
  const uint32_t bs = id_.block_size;
  bool zero = all_zero(data, bs);
  GenerationChain::Where w = below_->locate(block);
  bool equal_below;
  if (w.level < 0) {
    equal_below = zero;
  } else {
    if (int e = below_->read_block(block, scratch_.data())) return fail(e, below_->error());
    equal_below = memcmp(scratch_.data(), data, bs) == 0;
  }
  bool was_dirty = map_.dirty.contains(b);
  if (equal_below || zero) {
    if (was_dirty) {
      map_.dirty.remove(b);
      fallocate(diff_fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(block * bs), bs);
    }
    if (equal_below) map_.zero.remove(b);
    else map_.zero.add(b);
    return 0;
  }
  int e = pwrite_full(diff_fd_, data, bs, block * bs);
  if (e) return fail(e, "write " + dir_ + "/layer.diff");
  map_.zero.remove(b);
  map_.dirty.add(b);
  return 0;
}

int LayerWriter::write(uint64_t offset, const void* buf, size_t len) {
  const auto* in_data = static_cast<const uint8_t*>(buf);
  const uint32_t bs = id_.block_size;
  std::vector<uint8_t> rmw;
  while (len > 0) {
    uint64_t block = offset / bs, in = offset % bs;
    size_t n = std::min<uint64_t>(len, bs - in);
    if (in == 0 && n == bs) {
      if (int e = write_block(block, in_data)) return e;
    } else {
      rmw.resize(bs);
      if (int e = read_block(block, rmw.data())) return e;
      memcpy(rmw.data() + in, in_data, n);
      if (int e = write_block(block, rmw.data())) return e;
    }
    in_data += n;
    offset += n;
    len -= n;
  }
  return 0;
}

Status LayerWriter::commit() {
  if (!error_.empty()) return Status::fail(error_);
  if (fdatasync(diff_fd_) != 0) return Status::fail(errno_message("fdatasync " + dir_ + "/layer.diff", errno));
  std::string err;
  if (!storage::store_map(map_fd_, id_, &map_, &err)) return Status::fail(dir_ + ": " + err);
  return Status();
}

}  // namespace ib
