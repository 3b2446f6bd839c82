#include "source_tree.hpp"

#include "util.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace ib {
namespace {

constexpr uint64_t kBlock = 4096;
constexpr size_t kMaxName = 255;
constexpr uint32_t kMaxLinks = 65000;
// One xattr block: 32-byte header, 4-byte end marker; each entry 16 bytes
// plus its padded name, each value padded. Values in the inode's spare
// space are not counted: this is the bound for the worst case.
constexpr size_t kXattrBlockRoom = kBlock - 32 - 4;

std::string join(const std::string& dir, const std::string& name) {
  return dir.empty() ? name : dir + "/" + name;
}

std::string proc_path(int dirfd, const std::string& name) {
  return "/proc/self/fd/" + std::to_string(dirfd) + "/" + name;
}

size_t pad4(size_t n) { return (n + 3) & ~size_t(3); }

size_t xattr_suffix_len(const std::string& name) {
  for (const char* p : {"user.", "trusted.", "security.", "system.posix_acl_access",
                        "system.posix_acl_default"})
    if (name.rfind(p, 0) == 0) return name.size() - strlen(p);
  return name.size();
}

// Reads all xattrs of `path` (not following symlinks) or of `fd` if >= 0.
Status read_xattrs(int fd, const std::string& path, const std::string& shown,
                   SourceEntry* e) {
  std::vector<char> names(4096);
  ssize_t n;
  for (;;) {
    n = fd >= 0 ? flistxattr(fd, names.data(), names.size())
                : llistxattr(path.c_str(), names.data(), names.size());
    if (n >= 0) break;
    if (errno == ENOTSUP) return Status();
    if (errno != ERANGE) return Status::fail(errno_message(shown + ": cannot list xattrs", errno));
    names.resize(names.size() * 4);
  }
  for (ssize_t off = 0; off < n; off += ssize_t(strlen(names.data() + off)) + 1) {
    std::string name = names.data() + off;
    std::string value(256, '\0');
    for (;;) {
      ssize_t v = fd >= 0 ? fgetxattr(fd, name.c_str(), value.data(), value.size())
                          : lgetxattr(path.c_str(), name.c_str(), value.data(), value.size());
      if (v >= 0) {
        value.resize(size_t(v));
        break;
      }
      if (errno != ERANGE)
        return Status::fail(errno_message(shown + ": cannot read xattr " + name, errno));
      value.resize(value.size() * 4);
    }
    e->xattrs.emplace_back(std::move(name), std::move(value));
  }
  std::sort(e->xattrs.begin(), e->xattrs.end());
  return Status();
}

// What ext4 with our geometry cannot hold.
Status check_representable(const SourceEntry& e, const std::string& shown) {
  if (e.name().size() > kMaxName)
    return Status::fail(shown + ": name longer than 255 bytes, which ext4 cannot store");
  if (S_ISREG(e.st.st_mode) && uint64_t(e.st.st_size) > kMaxFileSize)
    return Status::fail(shown + ": file of " + std::to_string(e.st.st_size) +
                        " bytes is larger than ext4's limit (16 TiB with 4 KiB blocks)");
  if (!S_ISDIR(e.st.st_mode) && e.st.st_nlink > kMaxLinks)
    return Status::fail(shown + ": more hard links than ext4 allows (65000)");
  size_t room = 0;
  for (auto& [name, value] : e.xattrs) room += 16 + pad4(xattr_suffix_len(name)) + pad4(value.size());
  if (room > kXattrBlockRoom)
    return Status::fail(shown + ": its xattrs take " + std::to_string(room) +
                        " bytes, more than one ext4 block (4 KiB) can hold");
  if (e.link_target.size() >= kBlock)
    return Status::fail(shown + ": symlink target longer than a block");
  return Status();
}

uint64_t blocks_of(uint64_t bytes) { return (bytes + kBlock - 1) / kBlock; }

// ext4 blocks an entry needs, beyond its inode.
uint64_t estimate_blocks(const SourceEntry& e) {
  uint64_t b = 0;
  if (S_ISREG(e.st.st_mode)) {
    uint64_t logical = blocks_of(uint64_t(e.st.st_size));
    uint64_t allocated = blocks_of(uint64_t(e.st.st_blocks) * 512);
    b = std::min(logical, allocated);
    b += b / 32768;  // extent tree blocks, generously
  } else if (S_ISDIR(e.st.st_mode)) {
    b = blocks_of(e.children_name_bytes + 24 + 12) + 1;
  } else if (S_ISLNK(e.st.st_mode) && e.link_target.size() >= 60) {
    b = 1;
  }
  size_t xb = 0;
  for (auto& [name, value] : e.xattrs) xb += 16 + pad4(name.size()) + pad4(value.size());
  if (xb > 64) b += 1;
  return b;
}

// Opens a directory for listing without touching its atime where allowed,
// so that scanning leaves the source as it was.
int open_dir(int dirfd, const std::string& name) {
  const int flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
  int fd = openat(dirfd, name.c_str(), flags | O_NOATIME);
  if (fd < 0 && errno == EPERM) fd = openat(dirfd, name.c_str(), flags);
  return fd;
}

class Scanner {
 public:
  explicit Scanner(SourceTree* t) : t_(t) {}

  Status scan_root() {
    int fd = open_dir(AT_FDCWD, t_->root);
    if (fd < 0) {
      if (errno == ENOTDIR) return Status::fail(t_->root + ": source is not a directory");
      return Status::fail(errno_message("cannot open source " + t_->root, errno));
    }
    SourceEntry root;
    Status s = fstat(fd, &root.st) == 0 ? read_xattrs(fd, "", t_->root, &root)
                                        : Status::fail(errno_message(t_->root, errno));
    if (s) {
      t_->entries.push_back(std::move(root));
      s = scan_dir(fd, 0);
    }
    ::close(fd);
    return s;
  }

 private:
  std::string shown(const std::string& rel) const { return t_->root + "/" + rel; }

  // Scans the children of entries[index], a directory open as `fd`.
  Status scan_dir(int fd, size_t index) {
    std::vector<std::string> names;
    Status s = read_names(fd, shown(t_->entries[index].path), &names);
    if (!s) return s;
    const std::string dir = t_->entries[index].path;
    uint32_t name_bytes = 0;
    for (auto& n : names) name_bytes += uint32_t(8 + pad4(n.size()));
    t_->entries[index].children_name_bytes = name_bytes;
    for (auto& name : names) {
      s = scan_entry(fd, dir, name);
      if (!s) return s;
    }
    return Status();
  }

  static Status read_names(int fd, const std::string& shown_dir, std::vector<std::string>* out) {
    int dup_fd = dup(fd);
    DIR* d = dup_fd >= 0 ? fdopendir(dup_fd) : nullptr;
    if (!d) {
      int e = errno;
      if (dup_fd >= 0) ::close(dup_fd);
      return Status::fail(errno_message(shown_dir + ": cannot read directory", e));
    }
    errno = 0;
    while (struct dirent* de = readdir(d)) {
      std::string n = de->d_name;
      if (n != "." && n != "..") out->push_back(n);
      errno = 0;
    }
    int e = errno;
    closedir(d);
    if (e) return Status::fail(errno_message(shown_dir + ": cannot read directory", e));
    std::sort(out->begin(), out->end());
    return Status();
  }

  Status scan_entry(int dirfd, const std::string& dir, const std::string& name) {
    SourceEntry e;
    e.path = join(dir, name);
    const std::string where = shown(e.path);
    if (fstatat(dirfd, name.c_str(), &e.st, AT_SYMLINK_NOFOLLOW) != 0)
      return Status::fail(errno_message(where + ": cannot stat", errno));
    Status s = read_xattrs(-1, proc_path(dirfd, name), where, &e);
    if (s && S_ISLNK(e.st.st_mode)) s = read_link(dirfd, name, where, &e);
    if (s && S_ISREG(e.st.st_mode)) s = check_readable(dirfd, name, where);
    if (s) s = check_representable(e, where);
    if (!s) return s;
    if (!S_ISDIR(e.st.st_mode)) {
      t_->files++;
      if (S_ISREG(e.st.st_mode)) t_->bytes += uint64_t(e.st.st_size);
      t_->data_blocks += estimate_blocks(e);
      t_->entries.push_back(std::move(e));
      return Status();
    }
    int fd = open_dir(dirfd, name);
    if (fd < 0) return Status::fail(errno_message(where + ": cannot open directory", errno));
    size_t index = t_->entries.size();
    t_->entries.push_back(std::move(e));
    s = scan_dir(fd, index);
    ::close(fd);
    t_->data_blocks += estimate_blocks(t_->entries[index]);
    return s;
  }

  static Status read_link(int dirfd, const std::string& name, const std::string& where,
                          SourceEntry* e) {
    std::string buf(size_t(e->st.st_size) + 2, '\0');
    ssize_t n = readlinkat(dirfd, name.c_str(), buf.data(), buf.size());
    if (n < 0) return Status::fail(errno_message(where + ": cannot read symlink", errno));
    if (size_t(n) >= buf.size()) return Status::fail(where + ": symlink changed while scanning");
    e->link_target.assign(buf.data(), size_t(n));
    return Status();
  }

  static Status check_readable(int dirfd, const std::string& name, const std::string& where) {
    int fd = openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return Status::fail(errno_message(where + ": cannot read", errno));
    ::close(fd);
    return Status();
  }

  SourceTree* t_;
};

}  // namespace

Result<SourceTree> scan_source(const std::string& root) {
  SourceTree t;
  t.root = root;
  while (t.root.size() > 1 && t.root.back() == '/') t.root.pop_back();
  Scanner sc(&t);
  Status s = sc.scan_root();
  if (!s) return s;
  return t;
}

uint64_t xattr_hash(const SourceEntry& e) {
  uint64_t h = fnv1a("xattrs");
  for (auto& [name, value] : e.xattrs) {
    h = fnv1a(name, h);
    h = fnv1a(std::string_view("\0", 1), h);
    h = fnv1a(std::to_string(value.size()), h);
    h = fnv1a(value, h);
  }
  return h;
}

SourceOpener::~SourceOpener() {
  for (auto& [n, fd] : stack_) ::close(fd);
  if (root_fd_ >= 0) ::close(root_fd_);
}

Status SourceOpener::descend(const std::vector<std::string>& dirs) {
  if (root_fd_ < 0) {
    root_fd_ = ::open(root_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (root_fd_ < 0) return Status::fail(errno_message("cannot open source " + root_, errno));
  }
  size_t common = 0;
  while (common < stack_.size() && common < dirs.size() && stack_[common].first == dirs[common])
    ++common;
  while (stack_.size() > common) {
    ::close(stack_.back().second);
    stack_.pop_back();
  }
  for (size_t i = common; i < dirs.size(); ++i) {
    int parent = stack_.empty() ? root_fd_ : stack_.back().second;
    int fd = openat(parent, dirs[i].c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return Status::fail(errno_message(root_ + ": cannot open directory " + dirs[i], errno));
    stack_.emplace_back(dirs[i], fd);
  }
  return Status();
}

Result<int> SourceOpener::open_file(const std::string& path) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t slash; (slash = path.find('/', start)) != std::string::npos; start = slash + 1)
    parts.push_back(path.substr(start, slash - start));
  std::string name = path.substr(start);
  Status s = descend(parts);
  if (!s) return s;
  int dirfd = stack_.empty() ? root_fd_ : stack_.back().second;
  int fd = openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOATIME);
  if (fd < 0 && errno == EPERM)  // O_NOATIME needs ownership or CAP_FOWNER
    fd = openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return Status::fail(errno_message(root_ + "/" + path + ": cannot read", errno));
  return fd;
}

}  // namespace ib
