// Applies source entries to an open ext2 filesystem with libext2fs:
// creating, rewriting, updating and removing paths. Full builds create
// every entry of a scan in an empty filesystem; incremental builds remove
// and update only what changed, on a layer over the parent generation.
//
// State: a cache of directory path -> inode (paths it created or looked
// up; removal drops a path and everything under it), and, for this run,
// source inode -> image inode of hard-link groups, so the second and later
// paths of a group become links to the first. Entries must arrive parents
// first. Inode times come from the source (with nanoseconds); crtime and
// dtime are the filesystem's fixed `now`, so the result is deterministic.
#pragma once

#include "source_tree.hpp"
#include "status.hpp"

#include <ext2fs/ext2fs.h>

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

namespace ib {

class FsWriter {
 public:
  // `fs` is open read-write and outlives the writer; `src` reads contents.
  // `on_bytes` (may be empty) is told how many content bytes were copied.
  FsWriter(ext2_filsys fs, SourceOpener* src, std::function<void(uint64_t)> on_bytes);

  // Creates `e` (any type) under its parent, which must exist. An existing
  // directory of that name (lost+found) is updated instead.
  Status create(const SourceEntry& e);
  // Rewrites a regular file's contents in place (same inode): blocks are
  // overwritten where the new contents have data, holes are punched, the
  // size is set; then metadata as update_metadata().
  Status rewrite(const SourceEntry& e);
  // Sets mode, owner, times and xattrs of an existing path ("" = root).
  Status update_metadata(const SourceEntry& e);
  // Unlinks `path`; frees its inode and blocks when it was the last link.
  // A directory must already be empty.
  Status remove(const std::string& path);
  // True once an operation failed because the filesystem ran out of blocks
  // or inodes (the tree does not fit), as opposed to an I/O error.
  bool fs_full() const { return fs_full_; }

 private:
  Result<ext2_ino_t> lookup(const std::string& path);
  Status link(ext2_ino_t dir, const std::string& name, ext2_ino_t ino, unsigned mode,
              const std::string& where);
  Status create_regular(ext2_ino_t dir, const SourceEntry& e);
  Status create_directory(ext2_ino_t dir, const SourceEntry& e);
  Status create_symlink(ext2_ino_t dir, const SourceEntry& e);
  Status create_special(ext2_ino_t dir, const SourceEntry& e);
  Status add_hard_link(ext2_ino_t dir, const SourceEntry& e, ext2_ino_t target);
  Status new_inode(ext2_ino_t dir, const SourceEntry& e, bool extents, ext2_ino_t* ino);
  Status copy_contents(ext2_ino_t ino, const SourceEntry& e, bool existing);
  Status punch_holes(ext2_ino_t ino, const std::vector<std::pair<uint64_t, uint64_t>>& holes,
                     uint64_t old_size, const std::string& where);
  Status set_attributes(ext2_ino_t ino, const SourceEntry& e);
  Status set_xattrs(ext2_ino_t ino, const SourceEntry& e);
  Status err(const std::string& path, const std::string& what, errcode_t code) const;
  void forget(const std::string& path);

  ext2_filsys fs_;
  SourceOpener* src_;
  std::function<void(uint64_t)> on_bytes_;
  std::unordered_map<std::string, ext2_ino_t> dirs_;
  std::unordered_map<uint64_t, ext2_ino_t> links_;  // source st_ino -> image inode
  std::vector<char> buf_;
  mutable bool fs_full_ = false;
};

// True for libext2fs codes that mean the filesystem is full.
bool is_fs_full(errcode_t code);

}  // namespace ib
