// Reading the admin's directory: a scan that records every entry's
// metadata, and an opener that reads file contents later, path by path.
//
// The scan walks the tree depth first, children in byte order, holding one
// directory fd per level (paths may be longer than PATH_MAX). It stats each
// entry, reads its xattrs and symlink target, checks that regular files can
// be opened, and rejects what ext4 cannot hold. The result is the input of
// both full and incremental builds.
#pragma once

#include "status.hpp"

#include <sys/stat.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace ib {

struct SourceEntry {
  std::string path;  // relative to the root, "" for the root itself
  struct stat st {};
  std::vector<std::pair<std::string, std::string>> xattrs;  // sorted by name
  std::string link_target;                                  // symlinks only
  uint32_t children_name_bytes = 0;                         // directories: for sizing

  std::string name() const { return path.substr(path.rfind('/') + 1); }
  std::string parent() const {
    auto s = path.rfind('/');
    return s == std::string::npos ? "" : path.substr(0, s);
  }
};

struct SourceTree {
  std::string root;
  std::vector<SourceEntry> entries;  // depth first; parents before children
  uint64_t files = 0;                // non-directory entries
  uint64_t bytes = 0;                // sum of regular files' sizes
  uint64_t data_blocks = 0;          // 4 KiB blocks the tree needs in ext4 (estimate)
};

// Scans `root`. Fails, naming the path, on a missing or unreadable source,
// an unreadable file or directory inside it, or an entry ext4 cannot hold.
// `on_entry` (may be empty) is called per entry for progress.
Result<SourceTree> scan_source(const std::string& root);

// Opens files of a scanned tree for reading, by relative path. Consecutive
// calls in depth-first order reuse the open directory fds. Not thread-safe.
class SourceOpener {
 public:
  explicit SourceOpener(std::string root) : root_(std::move(root)) {}
  ~SourceOpener();
  SourceOpener(const SourceOpener&) = delete;
  SourceOpener& operator=(const SourceOpener&) = delete;
  // A read-only fd for a regular file (O_NOATIME where allowed, so building
  // does not change the source's access times). The caller closes it.
  Result<int> open_file(const std::string& path);

 private:
  Status descend(const std::vector<std::string>& dirs);
  std::string root_;
  std::vector<std::pair<std::string, int>> stack_;  // open directories below the root
  int root_fd_ = -1;
};

// 64-bit hash of an entry's xattrs (names and values).
uint64_t xattr_hash(const SourceEntry& e);

// Largest regular file ext4 holds with 4 KiB blocks (2^32 blocks).
inline constexpr uint64_t kMaxFileSize = (uint64_t(1) << 32) * 4096 - 4096;

}  // namespace ib
