// The store's layout for one image (shared with nbdserver):
//
//   images/<image>/generations/<gen>/manifest.json  files.idx
//                                   image.ext4                 full generation, or
//                                   layer.diff + layer.bitmap  delta over "parent"
//   images/<image>/current -> generations/<gen>     relative symlink
//   images/<image>/.tmp-<gen>                       a build in progress
//   images/<image>/.lock                            held (flock) by build, gc, flatten
//   images/<image>/.publish.lock                    held by publish, rollback, gc
//   nodes/<node>/node.json                          written by nbdserver
//
// A generation exists once its directory is in generations/ (it is renamed
// there complete, with its manifest). Generation directories never change
// afterwards, except that flattening adds image.ext4 and then removes the
// layer files, and rewrites the manifest atomically.
#pragma once

#include "manifest.hpp"
#include "status.hpp"

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ib {

class Store {
 public:
  explicit Store(std::string root) : root_(std::move(root)) {}
  const std::string& root() const { return root_; }

  // Succeeds when root() is a directory; otherwise the error says why and,
  // when there is nothing there, how to create a store.
  Status check() const;
  // Makes root() (mkdir -p), images/ and nodes/ where missing: what
  // `nbdserver --store` serves. Appends the directories it made, outermost
  // first, to `made` (so a failed build can remove them).
  Status create(std::vector<std::string>* made) const;

  std::string image_dir(const std::string& image) const;
  std::string generations_dir(const std::string& image) const;
  std::string generation_dir(const std::string& image, const std::string& gen) const;
  std::string current_link(const std::string& image) const;

  // Published generations of `image`, oldest first (ids sort by time).
  std::vector<std::string> generations(const std::string& image) const;
  bool has_generation(const std::string& image, const std::string& gen) const;
  Result<Manifest> manifest(const std::string& image, const std::string& gen) const;
  Status write_manifest(const std::string& dir, const Manifest& m) const;
  // The generation `current` points at, if any.
  std::optional<std::string> current(const std::string& image) const;
  // Points `current` at `gen`: a new symlink under a temporary name renamed
  // over the old one, then the directory is fsynced.
  Status set_current(const std::string& image, const std::string& gen) const;
  // generation -> node ids whose node.json names this image and generation.
  std::map<std::string, std::vector<std::string>> node_users(const std::string& image) const;
  // A fresh id: UTC time of `now` plus a counter, above every existing id.
  std::string new_generation_id(const std::string& image, int64_t now) const;
  // Removes images/<image>/.tmp-* left by interrupted builds. Caller holds
  // the image lock.
  void clean_temporaries(const std::string& image) const;

 private:
  std::string root_;
};

// An exclusive flock on a file, released by the destructor. The file is
// created if missing; after locking, the path is checked to still name the
// locked file, so a lock file removed meanwhile cannot split two holders.
class FileLock {
 public:
  // `wait` false: fail at once, with `busy_message`, if another holds it.
  static Result<FileLock> acquire(const std::string& path, bool wait,
                                  const std::string& busy_message);
  FileLock(FileLock&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  FileLock& operator=(FileLock&&) = delete;
  ~FileLock();

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

}  // namespace ib
