// One exported file (or block device), shared by every loop thread.
//
// Loops submit their own io_uring reads and writes against fd(); this class
// only owns the descriptor, the export's size and what is known about its
// allocation. The allocation map is seeded with SEEK_DATA/SEEK_HOLE when the
// file is opened (before any loop runs) and is then kept up to date by the
// loops as their writes, trims and zero requests complete; nothing else
// writes the file while it is exported. The map is guarded by a mutex held
// only for in-memory updates and queries, never across I/O.
//
// Reads of pages already in the page cache are served from a shared
// read-only mapping of the file: the reply is sent straight from the page
// cache, with no read operation and no copy into a buffer. resident() says
// whether a range can take that path without the loop blocking on a page
// fault; pages not resident go through an io_uring read instead.
//
// Durability: writes go to the page cache; FLUSH is fdatasync(), and a FUA
// request is answered after an fdatasync that began after it was written
// (the loops batch concurrent ones). A failed fdatasync is sticky (sticky_error()):
// after it the export refuses writes and flushes with EIO, because the kernel
// may already have dropped the dirty pages it failed to write.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "storage/extent_map.hpp"

namespace storage {

// True when every page of [off, off + len) of the mapping at `map` is in
// the page cache now. `scratch` is caller-owned space for mincore().
bool pages_resident(const uint8_t* map, uint64_t off, uint64_t len,
                    std::vector<unsigned char>* scratch);

// fdatasyncs of a writable file that one loop may run at the same time.
inline constexpr unsigned kSyncersPerLoop = 4;

class ImageFile {
 public:
  // Opens `path` read-only or read-write. On failure returns nullptr and sets
  // *err to a message that names the file and the cause.
  static std::unique_ptr<ImageFile> open(const std::string& path, bool read_only,
                                         std::string* err);
  ~ImageFile();
  ImageFile(const ImageFile&) = delete;
  ImageFile& operator=(const ImageFile&) = delete;

  int fd() const { return fd_; }
  // The descriptor loop `loop` uses. Each loop has its own open file, so
  // that a writeback error reaches every loop's next fdatasync: the kernel
  // reports such an error once per open file.
  int fd_for(unsigned loop) const { return sync_fd(loop, 0); }
  // Descriptor `k` (< syncers()) of loop `loop`, each its own open file, for
  // fdatasyncs that run at the same time. Two fdatasyncs in flight on one
  // open file could see a writeback error only once between them, and the
  // one that misses it could answer requests whose data was lost; so a loop
  // runs at most one fdatasync per descriptor. Descriptor 0 is fd_for().
  int sync_fd(unsigned loop, unsigned k) const {
    const size_t i = size_t(loop) * syncers_ + k;
    return i < loop_fds_.size() ? loop_fds_[i] : fd_;
  }
  unsigned syncers() const { return syncers_; }
  // Opens one descriptor per loop, and for a writable file `syncers` per
  // loop. Call once, before the loops start.
  bool open_per_loop(unsigned loops, unsigned syncers, std::string* err);
  uint64_t size() const { return size_; }
  bool read_only() const { return read_only_; }
  bool is_block_device() const { return block_device_; }
  const std::string& path() const { return path_; }

  // Bookkeeping after a completed operation on [off, off + len). Thread-safe.
  void note_write(uint64_t off, uint64_t len);
  void note_punch(uint64_t off, uint64_t len);
  void note_zero(uint64_t off, uint64_t len);

  // Allocation extents for [off, off + len) in bytes; they cover a prefix
  // of the range (all of it unless capped by max_extents).
  std::vector<Extent> allocation(uint64_t off, uint64_t len, size_t max_extents) const;

  // The whole file mapped read-only, or nullptr when it could not be mapped.
  const uint8_t* mapping() const { return mapping_; }
  // True when every page of [off, off + len) is in the page cache now.
  // `scratch` is caller-owned space for the residency vector.
  bool resident(uint64_t off, uint64_t len, std::vector<unsigned char>* scratch) const;

  // 0, or the errno of the first failed fdatasync.
  int sticky_error() const { return sticky_.load(std::memory_order_relaxed); }
  void set_sticky_error(int err);

 private:
  ImageFile() = default;
  bool scan_allocation(std::string* err);
  void map_file();

  std::string path_;
  int fd_ = -1;
  std::vector<int> loop_fds_;  // syncers_ per loop
  unsigned syncers_ = 1;
  uint64_t size_ = 0;
  bool read_only_ = false;
  bool block_device_ = false;
  uint8_t* mapping_ = nullptr;
  static constexpr uint64_t kGrain = 4096;
  mutable std::mutex mu_;
  ExtentMap map_;  // guarded by mu_
  std::atomic<int> sticky_{0};
};

}  // namespace storage
