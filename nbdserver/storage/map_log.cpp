#include "storage/map_log.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "storage/le_bytes.hpp"

namespace storage {
namespace {

constexpr uint32_t kLogMagic = 0x4e524d4c;  // "NRML"
// Offsets in a record.
constexpr size_t kOffMagic = 0, kOffState = 4, kOffSeq = 8, kOffBoot = 16, kOffLayer = 24,
                 kOffFirst = 32, kOffEnd = 40, kOffCrc = 48;

using le::get;
using le::put;
uint32_t crc_of(const uint8_t* p) { return le::crc32(p, kOffCrc); }

}  // namespace

uint64_t host_boot_id() {
  static const uint64_t id = [] {
    std::ifstream f("/proc/sys/kernel/random/boot_id");
    std::string s;
    std::getline(f, s);
    return s.empty() ? 0 : le::fnv1a(s);
  }();
  return id;
}

std::string encode_log_record(const MapChange& c, uint64_t seq, uint64_t layer_tag,
                              uint64_t boot) {
  std::string r(kLogRecordSize, '\0');
  put<uint32_t>(r, kOffMagic, kLogMagic);
  put<uint32_t>(r, kOffState, c.state);
  put<uint64_t>(r, kOffSeq, seq);
  put<uint64_t>(r, kOffBoot, boot);
  put<uint64_t>(r, kOffLayer, layer_tag);
  put<uint64_t>(r, kOffFirst, c.first);
  put<uint64_t>(r, kOffEnd, c.end);
  put<uint32_t>(r, kOffCrc, crc_of(reinterpret_cast<const uint8_t*>(r.data())));
  return r;
}

bool decode_log_record(const uint8_t* p, MapChange* c, uint64_t* seq, uint64_t* layer_tag,
                       uint64_t* boot) {
  if (get<uint32_t>(p, kOffMagic) != kLogMagic || get<uint32_t>(p, kOffCrc) != crc_of(p))
    return false;
  const uint32_t state = get<uint32_t>(p, kOffState);
  if (state < MapChange::kDirty || state > MapChange::kClear) return false;
  c->state = MapChange::State(state);
  c->first = get<uint64_t>(p, kOffFirst);
  c->end = get<uint64_t>(p, kOffEnd);
  if (c->state != MapChange::kClear && c->first >= c->end) return false;
  *seq = get<uint64_t>(p, kOffSeq);
  *boot = get<uint64_t>(p, kOffBoot);
  *layer_tag = get<uint64_t>(p, kOffLayer);
  return true;
}

int open_map_log(const std::string& path, std::string* err) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    *err = path + ": cannot open: " + strerror(errno);
    return -1;
  }
  return fd;
}

bool reset_map_log(int fd, const std::string& path, std::string* err) {
  if (ftruncate(fd, 0) != 0) {
    *err = path + ": cannot truncate: " + strerror(errno);
    return false;
  }
  // Allocated up front, so that appends never allocate blocks (and never
  // meet a full disk in the middle of a write).
  int r = posix_fallocate(fd, 0, off_t(2 * kLogRegionSize));
  if (r != 0 && r != EOPNOTSUPP && r != EINVAL) {
    *err = path + ": cannot allocate " + std::to_string(2 * kLogRegionSize) + " bytes: " +
           strerror(r);
    return false;
  }
  return true;
}

bool apply_change(BlockMap* map, const MapChange& c, uint64_t blocks) {
  switch (c.state) {
    case MapChange::kClear:
      map->dirty = Roaring();
      map->zero = Roaring();
      return true;
    case MapChange::kDirty:
    case MapChange::kZero: {
      if (c.first >= c.end || c.end > blocks) return false;
      Roaring& set = c.state == MapChange::kDirty ? map->dirty : map->zero;
      Roaring& unset = c.state == MapChange::kDirty ? map->zero : map->dirty;
      set.addRange(c.first, c.end);
      roaring_bitmap_remove_range(&unset.roaring, c.first, c.end);
      return true;
    }
  }
  return false;
}

uint64_t newest_log_seq(int fd, uint64_t layer_tag) {
  std::vector<uint8_t> region(kLogRegionSize);
  uint64_t newest = 0;
  for (uint64_t k : {0, 1}) {
    const ssize_t n = pread(fd, region.data(), region.size(), off_t(k * kLogRegionSize));
    for (size_t off = 0; n > 0 && off + kLogRecordSize <= size_t(n); off += kLogRecordSize) {
      MapChange c;
      uint64_t rs, rl, rb;
      if (decode_log_record(region.data() + off, &c, &rs, &rl, &rb) && rl == layer_tag &&
          rs > newest)
        newest = rs;
    }
  }
  return newest;
}

std::vector<MapChange> read_map_log(int fd, uint64_t seq, uint64_t layer_tag, uint64_t boot) {
  std::vector<MapChange> out;
  std::vector<uint8_t> region(kLogRegionSize);
  for (uint64_t s : {seq, seq + 1}) {
    const ssize_t n = pread(fd, region.data(), region.size(), off_t((s % 2) * kLogRegionSize));
    if (n <= 0) break;
    for (size_t off = 0; off + kLogRecordSize <= size_t(n); off += kLogRecordSize) {
      MapChange c;
      uint64_t rs, rl, rb;
      if (!decode_log_record(region.data() + off, &c, &rs, &rl, &rb) || rs != s ||
          rl != layer_tag || rb != boot)
        break;
      out.push_back(c);
    }
  }
  return out;
}

}  // namespace storage
