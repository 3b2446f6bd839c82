#include "storage/image_file.hpp"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>

namespace storage {

std::unique_ptr<ImageFile> ImageFile::open(const std::string& path, bool read_only,
                                           std::string* err) {
  std::unique_ptr<ImageFile> f(new ImageFile());
  f->path_ = path;
  f->read_only_ = read_only;
  f->fd_ = ::open(path.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (f->fd_ < 0) {
    *err = "cannot open " + path + ": " + strerror(errno);
    return nullptr;
  }
  struct stat st;
  if (fstat(f->fd_, &st) != 0) {
    *err = "cannot stat " + path + ": " + strerror(errno);
    return nullptr;
  }
  if (S_ISBLK(st.st_mode)) {
    f->block_device_ = true;
    if (ioctl(f->fd_, BLKGETSIZE64, &f->size_) != 0) {
      *err = "cannot get the size of " + path + ": " + strerror(errno);
      return nullptr;
    }
  } else if (S_ISREG(st.st_mode)) {
    f->size_ = uint64_t(st.st_size);
  } else {
    *err = path + " is neither a regular file nor a block device";
    return nullptr;
  }
  if (!f->scan_allocation(err)) return nullptr;
  f->map_file();
  return f;
}

bool ImageFile::open_per_loop(unsigned loops, unsigned syncers, std::string* err) {
  const std::string self = "/proc/self/fd/" + std::to_string(fd_);
  syncers_ = read_only_ ? 1 : std::max(syncers, 1u);
  for (unsigned i = 0; i < loops * syncers_; ++i) {
    int fd = ::open(self.c_str(), (read_only_ ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0) {
      *err = "cannot reopen " + path_ + ": " + strerror(errno);
      return false;
    }
    loop_fds_.push_back(fd);
  }
  return true;
}

ImageFile::~ImageFile() {
  for (int fd : loop_fds_) ::close(fd);
  if (mapping_) munmap(mapping_, size_);
  if (fd_ >= 0) ::close(fd_);
}

void ImageFile::map_file() {
  if (size_ == 0) return;
  void* p = mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) return;  // reads then always go through io_uring
  mapping_ = static_cast<uint8_t*>(p);
}

bool ImageFile::resident(uint64_t off, uint64_t len, std::vector<unsigned char>* scratch) const {
  return pages_resident(mapping_, off, len, scratch);
}

bool pages_resident(const uint8_t* map, uint64_t off, uint64_t len,
                    std::vector<unsigned char>* scratch) {
  static const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  if (!map || len == 0) return false;
  const uint64_t start = off & ~(page - 1);
  const uint64_t pages = (off + len - start + page - 1) / page;
  scratch->resize(pages);
  if (mincore(const_cast<uint8_t*>(map) + start, off + len - start, scratch->data()) != 0)
    return false;
  for (unsigned char v : *scratch)
    if (!(v & 1)) return false;
  return true;
}

bool ImageFile::scan_allocation(std::string* err) {
  const uint64_t blocks = (size_ + kGrain - 1) / kGrain;
  if (block_device_) {
    map_.set(0, blocks, BlockState::kData);
    return true;
  }
  off_t pos = 0;
  while (uint64_t(pos) < size_) {
    off_t data = lseek(fd_, pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // only a hole remains
      if (errno == EINVAL) {      // no SEEK_DATA here: call it all data
        map_.set(0, blocks, BlockState::kData);
        return true;
      }
      *err = "cannot scan " + path_ + " for holes: " + strerror(errno);
      return false;
    }
    off_t hole = lseek(fd_, data, SEEK_HOLE);
    if (hole < 0) hole = off_t(size_);
    map_.set(uint64_t(data) / kGrain, (uint64_t(hole) + kGrain - 1) / kGrain, BlockState::kData);
    pos = hole;
  }
  return true;
}

void ImageFile::note_write(uint64_t off, uint64_t len) {
  if (len == 0) return;
  std::lock_guard lock(mu_);
  map_.set(off / kGrain, (off + len + kGrain - 1) / kGrain, BlockState::kData);
}

void ImageFile::note_punch(uint64_t off, uint64_t len) {
  std::lock_guard lock(mu_);
  map_.set((off + kGrain - 1) / kGrain, (off + len) / kGrain, BlockState::kHole);
}

void ImageFile::note_zero(uint64_t off, uint64_t len) {
  std::lock_guard lock(mu_);
  map_.set((off + kGrain - 1) / kGrain, (off + len) / kGrain, BlockState::kZero);
}

std::vector<Extent> ImageFile::allocation(uint64_t off, uint64_t len, size_t max_extents) const {
  std::vector<Extent> blocks;
  const uint64_t first = off / kGrain;
  {
    std::lock_guard lock(mu_);
    blocks = map_.extents(first, (off + len + kGrain - 1) / kGrain, max_extents);
  }
  // Convert block units to bytes, trimming the ends to [off, off + len).
  uint64_t pos = first * kGrain;
  const uint64_t end = off + len;
  std::vector<Extent> out;
  out.reserve(blocks.size());
  for (const Extent& b : blocks) {
    uint64_t s = std::max(pos, off);
    uint64_t e = std::min(pos + b.length * kGrain, end);
    pos += b.length * kGrain;
    if (e > s) out.push_back({e - s, b.state});
  }
  return out;
}

void ImageFile::set_sticky_error(int err) {
  int expected = 0;
  sticky_.compare_exchange_strong(expected, err);
}

}  // namespace storage
