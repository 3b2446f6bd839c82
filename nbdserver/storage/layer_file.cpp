#include "storage/layer_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>
#include <vector>

#include "storage/le_bytes.hpp"

namespace storage {
namespace {

constexpr char kMapMagic[8] = {'N', 'B', 'D', 'R', 'M', 'A', 'P', '1'};
constexpr char kDiffMagic[8] = {'N', 'B', 'D', 'R', 'D', 'I', 'F', 'F'};
constexpr uint32_t kVersion = 1;

// Little-endian fields at fixed offsets of the 64-byte header.
enum : size_t {
  kOffMagic = 0, kOffVersion = 8, kOffBlockSize = 12, kOffSize = 16, kOffBase = 24,
  kOffLayer = 32, kOffSeq = 40, kOffDirtyLen = 48, kOffZeroLen = 52, kOffCrc = 56,
};

using le::crc32;
using le::get;
using le::put;

std::string errno_text(int err) { return std::strerror(err); }

// Header shared by map slots and the diff trailer (the trailer has no seq,
// lengths or payload).
std::string encode_header(const char* magic, const LayerId& id) {
  std::string h(kMapHeaderSize, '\0');
  memcpy(h.data(), magic, 8);
  put<uint32_t>(h, kOffVersion, kVersion);
  put<uint32_t>(h, kOffBlockSize, id.block_size);
  put<uint64_t>(h, kOffSize, id.size);
  put<uint64_t>(h, kOffBase, id.base_tag);
  put<uint64_t>(h, kOffLayer, id.layer_tag);
  return h;
}

// Checks magic, version and identity. A zero layer_tag in `expect` accepts
// any layer.
bool check_header(const uint8_t* p, const char* magic, const LayerId& expect, const char* what,
                  std::string* why) {
  if (std::all_of(p, p + kMapHeaderSize, [](uint8_t b) { return b == 0; })) {
    *why = std::string(what) + " was never written";
    return false;
  }
  if (memcmp(p, magic, 8) != 0) {
    *why = std::string(what) + " has a bad magic number";
    return false;
  }
  uint32_t version = get<uint32_t>(p, kOffVersion);
  if (version != kVersion) {
    *why = std::string(what) + " has format version " + std::to_string(version) +
           ", this server reads " + std::to_string(kVersion);
    return false;
  }
  uint32_t bs = get<uint32_t>(p, kOffBlockSize);
  uint64_t size = get<uint64_t>(p, kOffSize);
  if (bs != expect.block_size || size != expect.size) {
    *why = std::string(what) + " is for " + std::to_string(size) + " bytes in " +
           std::to_string(bs) + "-byte blocks, expected " + std::to_string(expect.size) +
           " bytes in " + std::to_string(expect.block_size) + "-byte blocks";
    return false;
  }
  if (get<uint64_t>(p, kOffBase) != expect.base_tag) {
    *why = std::string(what) + " was made over a different base image";
    return false;
  }
  if (expect.layer_tag && get<uint64_t>(p, kOffLayer) != expect.layer_tag) {
    *why = std::string(what) + " belongs to a different layer (the diff and bitmap do not match)";
    return false;
  }
  return true;
}

bool read_all(int fd, void* buf, size_t n, uint64_t off, size_t* got) {
  size_t done = 0;
  while (done < n) {
    ssize_t r = pread(fd, static_cast<char*>(buf) + done, n - done, off_t(off + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return false;
    if (r == 0) break;
    done += size_t(r);
  }
  *got = done;
  return true;
}

bool write_all(int fd, const std::string& s, uint64_t off) {
  size_t done = 0;
  while (done < s.size()) {
    ssize_t r = pwrite(fd, s.data() + done, s.size() - done, off_t(off + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return false;
    done += size_t(r);
  }
  return true;
}

bool fsync_dir_of(const std::string& path, std::string* err) {
  std::string dir = path.substr(0, path.rfind('/') == std::string::npos ? 0 : path.rfind('/'));
  if (dir.empty()) dir = ".";
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0 || fsync(fd) != 0) {
    *err = dir + ": cannot sync directory: " + errno_text(errno);
    if (fd >= 0) ::close(fd);
    return false;
  }
  ::close(fd);
  return true;
}

bool valid_blocks(const Roaring& r, uint64_t blocks) {
  return r.isEmpty() || uint64_t(r.maximum()) < blocks;
}

}  // namespace

uint64_t new_layer_tag() {
  std::random_device rd;
  uint64_t t = 0;
  while (t == 0) t = (uint64_t(rd()) << 32) ^ rd();
  return t;
}

uint64_t slot_stride(uint64_t blocks) {
  // A portable bitmap needs at most 8 bytes of cookie and count, a bit per
  // container saying whether it holds runs, then per 65536-value container
  // 4 bytes of key and cardinality, 4 of offset and at most 8 KiB of bitset
  // (arrays and runs are only chosen when smaller).
  uint64_t containers = (blocks + 65535) / 65536;
  uint64_t one = 8 + (containers + 7) / 8 + containers * (4 + 4 + 8192);
  uint64_t need = kMapHeaderSize + 2 * one;
  return (need + 4095) / 4096 * 4096;
}

std::string encode_map_slot(const LayerId& id, uint64_t seq, const Roaring& dirty,
                            const Roaring& zero) {
  std::string h = encode_header(kMapMagic, id);
  std::string payload(dirty.getSizeInBytes(true) + zero.getSizeInBytes(true), '\0');
  size_t nd = dirty.write(payload.data(), true);
  size_t nz = zero.write(payload.data() + nd, true);
  payload.resize(nd + nz);
  put<uint64_t>(h, kOffSeq, seq);
  put<uint32_t>(h, kOffDirtyLen, uint32_t(nd));
  put<uint32_t>(h, kOffZeroLen, uint32_t(nz));
  put<uint32_t>(h, kOffCrc, crc32(h.data(), h.size(), payload.data(), payload.size()));
  return h + payload;
}

bool decode_map_slot(const uint8_t* p, size_t n, const LayerId& expect, BlockMap* out,
                     std::string* why) {
  if (n < kMapHeaderSize) {
    *why = "bitmap slot is truncated";
    return false;
  }
  if (!check_header(p, kMapMagic, expect, "bitmap slot", why)) return false;
  uint64_t nd = get<uint32_t>(p, kOffDirtyLen);
  uint64_t nz = get<uint32_t>(p, kOffZeroLen);
  if (kMapHeaderSize + nd + nz > n) {
    *why = "bitmap slot is truncated";
    return false;
  }
  std::string h(reinterpret_cast<const char*>(p), kMapHeaderSize);
  put<uint32_t>(h, kOffCrc, 0);
  uint32_t want = get<uint32_t>(p, kOffCrc);
  if (crc32(h.data(), h.size(), p + kMapHeaderSize, nd + nz) != want) {
    *why = "bitmap slot fails its checksum (torn or corrupt)";
    return false;
  }
  const char* body = reinterpret_cast<const char*>(p + kMapHeaderSize);
  try {
    Roaring d = Roaring::readSafe(body, nd);
    Roaring z = Roaring::readSafe(body + nd, nz);
    if (d.getSizeInBytes(true) != nd || z.getSizeInBytes(true) != nz) {
      *why = "bitmap slot's bitmaps do not fill their declared lengths";
      return false;
    }
    if (!valid_blocks(d, expect.blocks()) || !valid_blocks(z, expect.blocks())) {
      *why = "bitmap slot names blocks beyond the end of the view";
      return false;
    }
    if (d.and_cardinality(z) != 0) {
      *why = "bitmap slot marks blocks both written and zero";
      return false;
    }
    out->dirty = std::move(d);
    out->zero = std::move(z);
  } catch (const std::exception&) {
    // CRoaring reports any malformed input as "failed alloc while reading".
    *why = "bitmap slot does not hold valid roaring bitmaps";
    return false;
  }
  out->seq = get<uint64_t>(p, kOffSeq);
  return true;
}

std::string trailer_header(const LayerId& id, uint64_t durable_seq) {
  std::string t = encode_header(kDiffMagic, id);
  put<uint64_t>(t, kOffSeq, durable_seq);
  put<uint32_t>(t, kOffCrc, crc32(t.data(), t.size(), nullptr, 0));
  return t;
}

std::string encode_diff_trailer(const LayerId& id, uint64_t durable_seq) {
  std::string t = trailer_header(id, durable_seq);
  t.resize(kDiffTrailerSize, '\0');
  return t;
}

bool note_durable_map(int diff_fd, const LayerId& id, uint64_t seq) {
  // 64 bytes at a block-aligned offset: inside one sector, so never torn.
  return write_all(diff_fd, trailer_header(id, seq), trailer_offset(id));
}

bool decode_diff_trailer(const uint8_t* p, size_t n, const LayerId& expect, std::string* why,
                         uint64_t* durable_seq) {
  if (n < kMapHeaderSize) {
    *why = "diff file is truncated (no trailer)";
    return false;
  }
  if (!check_header(p, kDiffMagic, expect, "diff trailer", why)) return false;
  std::string h(reinterpret_cast<const char*>(p), kMapHeaderSize);
  put<uint32_t>(h, kOffCrc, 0);
  if (crc32(h.data(), h.size(), nullptr, 0) != get<uint32_t>(p, kOffCrc)) {
    *why = "diff trailer fails its checksum";
    return false;
  }
  if (durable_seq) *durable_seq = get<uint64_t>(p, kOffSeq);
  return true;
}

bool create_layer(const std::string& diff_path, const std::string& map_path, const LayerId& id,
                  std::string* err) {
  int dfd = ::open(diff_path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  if (dfd < 0) {
    *err = diff_path + ": cannot create: " + errno_text(errno);
    return false;
  }
  bool ok = ftruncate(dfd, off_t(id.size)) == 0 && write_all(dfd, encode_diff_trailer(id), id.size) &&
            fdatasync(dfd) == 0;
  int e = errno;
  ::close(dfd);
  if (!ok) {
    *err = diff_path + ": cannot write: " + errno_text(e);
    return false;
  }
  int mfd = ::open(map_path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  if (mfd < 0) {
    *err = map_path + ": cannot create: " + errno_text(errno);
    return false;
  }
  // Both slots get their blocks now, so that writing a map later never
  // needs free space: a full disk cannot fail a flush's map write.
  const off_t both = off_t(2 * slot_stride(id.blocks()));
  if (ftruncate(mfd, both) != 0 || (fallocate(mfd, 0, 0, both) != 0 && errno != EOPNOTSUPP)) {
    *err = map_path + ": cannot allocate: " + errno_text(errno);
    ::close(mfd);
    return false;
  }
  BlockMap empty;
  ok = store_map(mfd, id, &empty, err);
  ::close(mfd);
  return ok && fsync_dir_of(map_path, err);
}

bool load_map(int map_fd, const LayerId& expect, BlockMap* out, LayerId* found,
              std::string* err, OtherSlot* other) {
  const uint64_t stride = slot_stride(expect.blocks());
  // The file is created with both slots allocated; a shorter one lost its
  // tail, and with it maybe the newest map: refuse rather than fall back.
  struct stat st;
  if (fstat(map_fd, &st) != 0) {
    *err = "cannot stat the bitmap: " + errno_text(errno);
    return false;
  }
  if (uint64_t(st.st_size) < 2 * stride) {
    *err = "bitmap file is truncated (" + std::to_string(st.st_size) + " bytes, expected " +
           std::to_string(2 * stride) + ")";
    return false;
  }
  std::vector<uint8_t> buf(stride);
  std::string why[2];
  bool written[2] = {false, false}, valid[2] = {false, false};
  bool have = false;
  int served = 0;
  for (int slot = 0; slot < 2; ++slot) {
    size_t got = 0;
    if (!read_all(map_fd, buf.data(), buf.size(), uint64_t(slot) * stride, &got)) {
      *err = "cannot read the bitmap: " + errno_text(errno);
      return false;
    }
    written[slot] = std::any_of(buf.begin(), buf.begin() + std::min<size_t>(got, kMapHeaderSize),
                                [](uint8_t b) { return b != 0; });
    BlockMap m;
    if (!decode_map_slot(buf.data(), got, expect, &m, &why[slot])) continue;
    valid[slot] = true;
    if (!have || m.seq > out->seq) {
      served = slot;
      *out = std::move(m);
      if (found) {
        *found = expect;
        found->layer_tag = get<uint64_t>(buf.data(), kOffLayer);
      }
      have = true;
    }
  }
  if (!have) *err = "no valid bitmap: slot A: " + why[0] + "; slot B: " + why[1];
  if (have && other) {
    const int o = 1 - served;
    *other = {char('A' + served), char('A' + o), written[o], valid[o], valid[o] ? "" : why[o]};
  }
  return have;
}

bool load_layer(int diff_fd, int map_fd, const LayerId& expect, BlockMap* out, std::string* err,
                uint64_t* durable_seq) {
  struct stat st;
  if (fstat(diff_fd, &st) != 0) {
    *err = "cannot stat the diff: " + errno_text(errno);
    return false;
  }
  if (uint64_t(st.st_size) != expect.size + kDiffTrailerSize) {
    *err = "diff file is " + std::to_string(st.st_size) + " bytes, expected " +
           std::to_string(expect.size + kDiffTrailerSize) + " (truncated or foreign)";
    return false;
  }
  std::string t(kDiffTrailerSize, '\0');
  size_t got = 0;
  if (!read_all(diff_fd, t.data(), t.size(), expect.size, &got)) {
    *err = "cannot read the diff trailer: " + errno_text(errno);
    return false;
  }
  std::string why;
  if (!decode_diff_trailer(reinterpret_cast<const uint8_t*>(t.data()), got, expect, &why,
                           durable_seq)) {
    *err = why;
    return false;
  }
  return load_map(map_fd, expect, out, nullptr, err);
}

bool store_map(int map_fd, const LayerId& id, BlockMap* map, std::string* err) {
  const uint64_t seq = map->seq + 1;
  std::string slot = encode_map_slot(id, seq, map->dirty, map->zero);
  if (!write_all(map_fd, slot, (seq % 2) * slot_stride(id.blocks())) || fdatasync(map_fd) != 0) {
    *err = "cannot write the bitmap: " + errno_text(errno);
    return false;
  }
  map->seq = seq;
  return true;
}

}  // namespace storage
