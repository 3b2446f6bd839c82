#include "fs_writer.hpp"

#include "util.hpp"

#include <fcntl.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

namespace ib {
namespace {

constexpr size_t kCopyChunk = 1 << 20;

int file_type(unsigned mode) {
  switch (mode & S_IFMT) {
    case S_IFREG: return EXT2_FT_REG_FILE;
    case S_IFDIR: return EXT2_FT_DIR;
    case S_IFLNK: return EXT2_FT_SYMLINK;
    case S_IFCHR: return EXT2_FT_CHRDEV;
    case S_IFBLK: return EXT2_FT_BLKDEV;
    case S_IFIFO: return EXT2_FT_FIFO;
    case S_IFSOCK: return EXT2_FT_SOCK;
  }
  return EXT2_FT_UNKNOWN;
}

// ext4's split seconds: low 32 bits, and in the extra field two epoch bits
// and the nanoseconds.
void encode_time(const struct timespec& t, __u32* lo, __u32* extra) {
  int64_t sec = t.tv_sec;
  *lo = __u32(uint64_t(sec) & 0xffffffff);
  *extra = __u32(((sec - int64_t(int32_t(*lo))) >> 32) & 3) | (__u32(t.tv_nsec) << 2);
}

// An inode buffer of the filesystem's inode size, zeroed.
struct InodeBuf {
  explicit InodeBuf(ext2_filsys fs) : size(EXT2_INODE_SIZE(fs->super)), bytes(size, 0) {}
  ext2_inode_large* large() { return reinterpret_cast<ext2_inode_large*>(bytes.data()); }
  ext2_inode* small() { return reinterpret_cast<ext2_inode*>(bytes.data()); }
  int size;
  std::vector<char> bytes;
};

void fill_metadata(ext2_filsys fs, const SourceEntry& e, ext2_inode_large* in) {
  in->i_mode = __u16(e.st.st_mode);
  in->i_uid = __u16(e.st.st_uid & 0xffff);
  ext2fs_set_i_uid_high(*in, e.st.st_uid >> 16);
  in->i_gid = __u16(e.st.st_gid & 0xffff);
  ext2fs_set_i_gid_high(*in, e.st.st_gid >> 16);
  // A symlink's atime moves whenever it is read (readlink cannot avoid
  // that), so images carry its mtime there, to stay deterministic.
  encode_time(S_ISLNK(e.st.st_mode) ? e.st.st_mtim : e.st.st_atim, &in->i_atime,
              &in->i_atime_extra);
  encode_time(e.st.st_mtim, &in->i_mtime, &in->i_mtime_extra);
  encode_time(e.st.st_ctim, &in->i_ctime, &in->i_ctime_extra);
  if (in->i_extra_isize == 0) in->i_extra_isize = sizeof(ext2_inode_large) - EXT2_GOOD_OLD_INODE_SIZE;
  struct timespec now = {fs->now, 0};
  encode_time(now, &in->i_crtime, &in->i_crtime_extra);
}

void split_path(const std::string& path, std::string* parent, std::string* name) {
  auto s = path.rfind('/');
  *parent = s == std::string::npos ? "" : path.substr(0, s);
  *name = path.substr(s == std::string::npos ? 0 : s + 1);
}

// Data ranges of an open file, from SEEK_DATA/SEEK_HOLE.
std::vector<std::pair<uint64_t, uint64_t>> data_ranges(int fd, uint64_t size) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  uint64_t pos = 0;
  while (pos < size) {
    off_t d = lseek(fd, off_t(pos), SEEK_DATA);
    if (d < 0) {
      if (errno == ENXIO) break;                        // only a hole remains
      out.emplace_back(pos, size);                      // no SEEK_DATA: all data
      break;
    }
    off_t h = lseek(fd, d, SEEK_HOLE);
    uint64_t end = h < 0 ? size : std::min<uint64_t>(uint64_t(h), size);
    if (uint64_t(d) >= size) break;
    out.emplace_back(uint64_t(d), end);
    pos = end;
  }
  return out;
}

}  // namespace

bool is_fs_full(errcode_t code) {
  return code == EXT2_ET_BLOCK_ALLOC_FAIL || code == EXT2_ET_INODE_ALLOC_FAIL ||
         code == EXT2_ET_DIR_NO_SPACE || code == EXT2_ET_RES_GDT_BLOCKS ||
         code == EXT2_ET_EXTENT_NO_SPACE;
}

FsWriter::FsWriter(ext2_filsys fs, SourceOpener* src, std::function<void(uint64_t)> on_bytes)
    : fs_(fs), src_(src), on_bytes_(std::move(on_bytes)), buf_(kCopyChunk) {
  dirs_[""] = EXT2_ROOT_INO;
}

Status FsWriter::err(const std::string& path, const std::string& what, errcode_t code) const {
  if (is_fs_full(code)) fs_full_ = true;
  return Status::fail(ext2_message("/" + path + ": " + what, code));
}

Result<ext2_ino_t> FsWriter::lookup(const std::string& path) {
  if (auto it = dirs_.find(path); it != dirs_.end()) return it->second;
  std::string parent, name;
  split_path(path, &parent, &name);
  auto dir = lookup(parent);
  if (!dir) return dir;
  ext2_ino_t ino = 0;
  errcode_t r = ext2fs_lookup(fs_, *dir, name.c_str(), int(name.size()), nullptr, &ino);
  if (r) return err(path, "lookup in the image", r);
  return ino;
}

void FsWriter::forget(const std::string& path) {
  for (auto it = dirs_.begin(); it != dirs_.end();) {
    const std::string& p = it->first;
    bool under = p == path || (p.size() > path.size() && p.compare(0, path.size(), path) == 0 &&
                               p[path.size()] == '/');
    it = under && !path.empty() ? dirs_.erase(it) : std::next(it);
  }
}

Status FsWriter::link(ext2_ino_t dir, const std::string& name, ext2_ino_t ino, unsigned mode,
                      const std::string& where) {
  errcode_t r = ext2fs_link(fs_, dir, name.c_str(), ino, file_type(mode));
  if (r == EXT2_ET_DIR_NO_SPACE) {
    r = ext2fs_expand_dir(fs_, dir);
    if (r) return err(where, "expand parent directory", r);
    r = ext2fs_link(fs_, dir, name.c_str(), ino, file_type(mode));
  }
  return r ? err(where, "link", r) : Status();
}

Status FsWriter::create(const SourceEntry& e) {
  if (e.path.empty()) return update_metadata(e);
  std::string parent_path, name;
  split_path(e.path, &parent_path, &name);
  auto dir = lookup(parent_path);
  if (!dir) return dir.status();
  if (e.path == "lost+found" && !S_ISDIR(e.st.st_mode)) {
    // mke2fs made a directory of that name; the source's entry replaces it
    ext2_ino_t old = 0;
    if (ext2fs_lookup(fs_, *dir, name.c_str(), int(name.size()), nullptr, &old) == 0) {
      Status s = remove(e.path);
      if (!s) return s;
    }
  }
  const bool linked = !S_ISDIR(e.st.st_mode) && e.st.st_nlink > 1;
  if (linked) {
    if (auto it = links_.find(e.st.st_ino); it != links_.end())
      return add_hard_link(*dir, e, it->second);
  }
  switch (e.st.st_mode & S_IFMT) {
    case S_IFREG: return create_regular(*dir, e);
    case S_IFDIR: return create_directory(*dir, e);
    case S_IFLNK: return create_symlink(*dir, e);
    default: return create_special(*dir, e);
  }
}

Status FsWriter::new_inode(ext2_ino_t dir, const SourceEntry& e, bool extents, ext2_ino_t* ino) {
  errcode_t r = ext2fs_new_inode(fs_, dir, int(e.st.st_mode), nullptr, ino);
  if (r) return err(e.path, "allocate inode", r);
  Status s = link(dir, e.name(), *ino, e.st.st_mode, e.path);
  if (!s) return s;
  ext2fs_inode_alloc_stats2(fs_, *ino, +1, 0);
  InodeBuf in(fs_);
  fill_metadata(fs_, e, in.large());
  in.large()->i_links_count = 1;
  if (extents && ext2fs_has_feature_extents(fs_->super)) {
    ext2_extent_handle_t handle;
    r = ext2fs_extent_open2(fs_, *ino, in.small(), &handle);
    if (r) return err(e.path, "initialise extents", r);
    ext2fs_extent_free(handle);
  }
  r = ext2fs_write_inode_full(fs_, *ino, in.small(), in.size);
  if (r) return err(e.path, "write inode", r);
  if (!S_ISDIR(e.st.st_mode) && e.st.st_nlink > 1) links_[e.st.st_ino] = *ino;
  return Status();
}

Status FsWriter::create_regular(ext2_ino_t dir, const SourceEntry& e) {
  ext2_ino_t ino;
  Status s = new_inode(dir, e, true, &ino);
  if (s) s = copy_contents(ino, e, false);
  if (s) s = set_attributes(ino, e);
  return s;
}

Status FsWriter::create_special(ext2_ino_t dir, const SourceEntry& e) {
  ext2_ino_t ino;
  Status s = new_inode(dir, e, false, &ino);
  if (!s) return s;
  if (S_ISCHR(e.st.st_mode) || S_ISBLK(e.st.st_mode)) {
    InodeBuf in(fs_);
    errcode_t r = ext2fs_read_inode_full(fs_, ino, in.small(), in.size);
    if (r) return err(e.path, "read inode", r);
    unsigned major = ::major(e.st.st_rdev), minor = ::minor(e.st.st_rdev);
    if (major < 256 && minor < 256) {
      in.large()->i_block[0] = major * 256 + minor;
      in.large()->i_block[1] = 0;
    } else {
      in.large()->i_block[0] = 0;
      in.large()->i_block[1] = (minor & 0xff) | (major << 8) | ((minor & ~0xffu) << 12);
    }
    r = ext2fs_write_inode_full(fs_, ino, in.small(), in.size);
    if (r) return err(e.path, "write inode", r);
  }
  return set_attributes(ino, e);
}

Status FsWriter::create_directory(ext2_ino_t dir, const SourceEntry& e) {
  const std::string name = e.name();
  ext2_ino_t ino = 0;
  errcode_t r = ext2fs_lookup(fs_, dir, name.c_str(), int(name.size()), nullptr, &ino);
  if (r == 0) {  // already there (lost+found made by mke2fs)
    dirs_[e.path] = ino;
    return update_metadata(e);
  }
  r = ext2fs_mkdir(fs_, dir, 0, name.c_str());
  if (r == EXT2_ET_DIR_NO_SPACE) {
    r = ext2fs_expand_dir(fs_, dir);
    if (r) return err(e.path, "expand parent directory", r);
    r = ext2fs_mkdir(fs_, dir, 0, name.c_str());
  }
  if (r) return err(e.path, "mkdir", r);
  r = ext2fs_lookup(fs_, dir, name.c_str(), int(name.size()), nullptr, &ino);
  if (r) return err(e.path, "lookup new directory", r);
  dirs_[e.path] = ino;
  return set_attributes(ino, e);
}

Status FsWriter::create_symlink(ext2_ino_t dir, const SourceEntry& e) {
  const std::string name = e.name();
  errcode_t r = ext2fs_symlink(fs_, dir, 0, name.c_str(), e.link_target.c_str());
  if (r == EXT2_ET_DIR_NO_SPACE) {
    r = ext2fs_expand_dir(fs_, dir);
    if (r) return err(e.path, "expand parent directory", r);
    r = ext2fs_symlink(fs_, dir, 0, name.c_str(), e.link_target.c_str());
  }
  if (r) return err(e.path, "symlink", r);
  ext2_ino_t ino = 0;
  r = ext2fs_lookup(fs_, dir, name.c_str(), int(name.size()), nullptr, &ino);
  if (r) return err(e.path, "lookup new symlink", r);
  if (e.st.st_nlink > 1) links_[e.st.st_ino] = ino;
  return set_attributes(ino, e);
}

Status FsWriter::add_hard_link(ext2_ino_t dir, const SourceEntry& e, ext2_ino_t target) {
  Status s = link(dir, e.name(), target, e.st.st_mode, e.path);
  if (!s) return s;
  InodeBuf in(fs_);
  errcode_t r = ext2fs_read_inode_full(fs_, target, in.small(), in.size);
  if (r) return err(e.path, "read inode", r);
  in.large()->i_links_count++;
  r = ext2fs_write_inode_full(fs_, target, in.small(), in.size);
  return r ? err(e.path, "write inode", r) : Status();
}

Status FsWriter::copy_contents(ext2_ino_t ino, const SourceEntry& e, bool existing) {
  auto fd = src_->open_file(e.path);
  if (!fd) return fd.status();
  std::unique_ptr<int, void (*)(int*)> closer(&*fd, [](int* p) { ::close(*p); });
  const uint64_t size = uint64_t(e.st.st_size);
  auto ranges = data_ranges(*fd, size);
  ext2_file_t file;
  Status s;
  if (existing) {
    std::vector<std::pair<uint64_t, uint64_t>> holes;
    uint64_t pos = 0;
    for (auto& [a, b] : ranges) {
      if (a > pos) holes.emplace_back(pos, a);
      pos = b;
    }
    if (pos < size) holes.emplace_back(pos, size);
    InodeBuf in(fs_);
    errcode_t r = ext2fs_read_inode_full(fs_, ino, in.small(), in.size);
    if (r) return err(e.path, "read inode", r);
    s = punch_holes(ino, holes, EXT2_I_SIZE(in.small()), e.path);
    if (!s) return s;
  }
  errcode_t r = ext2fs_file_open(fs_, ino, EXT2_FILE_WRITE, &file);
  if (r) return err(e.path, "open in the image", r);
  for (auto& [a, b] : ranges) {
    for (uint64_t off = a; off < b && s;) {
      size_t want = size_t(std::min<uint64_t>(buf_.size(), b - off));
      ssize_t n = ::pread(*fd, buf_.data(), want, off_t(off));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        s = n < 0 ? Status::fail(errno_message("source file /" + e.path + ": cannot read", errno))
                  : Status::fail("/" + e.path + ": file shrank while it was copied");
        break;
      }
      r = ext2fs_file_llseek(file, off, EXT2_SEEK_SET, nullptr);
      unsigned int written = 0;
      if (!r) r = ext2fs_file_write(file, buf_.data(), unsigned(n), &written);
      if (r) s = err(e.path, "write contents", r);
      off += uint64_t(n);
      if (on_bytes_) on_bytes_(uint64_t(n));
    }
    if (!s) break;
  }
  if (s && on_bytes_) {  // holes count as done, so rate and ETA follow the tree's size
    uint64_t data = 0;
    for (auto& [a, b] : ranges) data += b - a;
    if (size > data) on_bytes_(size - data);
  }
  if (s) {
    r = ext2fs_file_set_size2(file, size);
    if (r) s = err(e.path, "set size", r);
  }
  r = ext2fs_file_close(file);
  if (s && r) s = err(e.path, "close in the image", r);
  return s;
}

Status FsWriter::punch_holes(ext2_ino_t ino, const std::vector<std::pair<uint64_t, uint64_t>>& holes,
                             uint64_t old_size, const std::string& where) {
  const uint64_t bs = fs_->blocksize;
  for (auto [a, b] : holes) {
    b = std::min(b, old_size);
    if (a >= b) continue;
    uint64_t first = (a + bs - 1) / bs, last = b / bs;  // whole blocks [first, last)
    if (first < last) {
      InodeBuf in(fs_);
      errcode_t r = ext2fs_read_inode_full(fs_, ino, in.small(), in.size);
      if (!r) r = ext2fs_punch(fs_, ino, in.small(), nullptr, first, last - 1);
      if (r) return err(where, "punch hole", r);
    }
    // Partial blocks at the edges: write zeros.
    std::vector<std::pair<uint64_t, uint64_t>> edges;
    if (first < last) {
      edges.emplace_back(a, first * bs);
      edges.emplace_back(last * bs, b);
    } else {
      edges.emplace_back(a, b);
    }
    for (auto [x, y] : edges) {
      if (x >= y) continue;
      ext2_file_t file;
      errcode_t r = ext2fs_file_open(fs_, ino, EXT2_FILE_WRITE, &file);
      std::vector<char> zeros(size_t(y - x), 0);
      unsigned int written = 0;
      if (!r) r = ext2fs_file_llseek(file, x, EXT2_SEEK_SET, nullptr);
      if (!r) r = ext2fs_file_write(file, zeros.data(), unsigned(zeros.size()), &written);
      errcode_t c = ext2fs_file_close(file);
      if (r || c) return err(where, "zero hole edge", r ? r : c);
    }
  }
  return Status();
}

Status FsWriter::rewrite(const SourceEntry& e) {
  auto ino = lookup(e.path);
  if (!ino) return ino.status();
  Status s = copy_contents(*ino, e, true);
  return s ? set_attributes(*ino, e) : s;
}

Status FsWriter::update_metadata(const SourceEntry& e) {
  auto ino = lookup(e.path);
  if (!ino) return ino.status();
  return set_attributes(*ino, e);
}

Status FsWriter::set_attributes(ext2_ino_t ino, const SourceEntry& e) {
  InodeBuf in(fs_);
  errcode_t r = ext2fs_read_inode_full(fs_, ino, in.small(), in.size);
  if (r) return err(e.path, "read inode", r);
  fill_metadata(fs_, e, in.large());
  r = ext2fs_write_inode_full(fs_, ino, in.small(), in.size);
  if (r) return err(e.path, "write inode", r);
  return set_xattrs(ino, e);
}

Status FsWriter::set_xattrs(ext2_ino_t ino, const SourceEntry& e) {
  struct ext2_xattr_handle* h = nullptr;
  errcode_t r = ext2fs_xattrs_open(fs_, ino, &h);
  if (r) return err(e.path, "open xattrs", r);
  r = ext2fs_xattrs_read(h);
  size_t count = 0;
  if (!r) r = ext2fs_xattrs_count(h, &count);
  if (!r && count > 0) {  // replace whatever the image held
    std::vector<std::string> old;
    ext2fs_xattrs_iterate(
        h,
        [](char* name, char*, size_t, void* data) -> int {
          static_cast<std::vector<std::string>*>(data)->push_back(name);
          return 0;
        },
        &old);
    for (auto& n : old)
      if (!r) r = ext2fs_xattr_remove(h, n.c_str());
  }
  for (auto& [name, value] : e.xattrs)
    if (!r) r = ext2fs_xattr_set(h, name.c_str(), value.data(), value.size());
  errcode_t c = ext2fs_xattrs_close(&h);
  if (r || c) return err(e.path, "write xattrs", r ? r : c);
  return Status();
}

Status FsWriter::remove(const std::string& path) {
  std::string parent_path, name;
  split_path(path, &parent_path, &name);
  auto dir = lookup(parent_path);
  if (!dir) return dir.status();
  auto ino = lookup(path);
  if (!ino) return ino.status();
  InodeBuf in(fs_);
  errcode_t r = ext2fs_read_inode_full(fs_, *ino, in.small(), in.size);
  if (r) return err(path, "read inode", r);
  r = ext2fs_unlink(fs_, *dir, name.c_str(), *ino, 0);
  if (r) return err(path, "unlink", r);
  forget(path);
  const bool is_dir = LINUX_S_ISDIR(in.large()->i_mode);
  auto* inode = in.large();
  if (is_dir) {
    inode->i_links_count = 0;
    InodeBuf pin(fs_);
    r = ext2fs_read_inode_full(fs_, *dir, pin.small(), pin.size);
    if (!r && pin.large()->i_links_count > 2) pin.large()->i_links_count--;
    if (!r) r = ext2fs_write_inode_full(fs_, *dir, pin.small(), pin.size);
    if (r) return err(path, "update parent link count", r);
  } else if (inode->i_links_count > 0) {
    inode->i_links_count--;
  }
  if (inode->i_links_count == 0) {
    if (ext2fs_inode_has_valid_blocks2(fs_, in.small())) {
      r = ext2fs_punch(fs_, *ino, in.small(), nullptr, 0, ~0ULL);
      if (r) return err(path, "free blocks", r);
    }
    r = ext2fs_free_ext_attr(fs_, *ino, inode);
    if (r) return err(path, "free xattrs", r);
    inode->i_dtime = __u32(fs_->now);
    ext2fs_inode_alloc_stats2(fs_, *ino, -1, is_dir ? 1 : 0);
  }
  r = ext2fs_write_inode_full(fs_, *ino, in.small(), in.size);
  return r ? err(path, "write inode", r) : Status();
}

}  // namespace ib
