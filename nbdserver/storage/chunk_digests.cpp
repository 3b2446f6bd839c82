#include "storage/chunk_digests.hpp"

#include "storage/le_bytes.hpp"

#include <fcntl.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace storage {
namespace {

constexpr char kMagic[8] = {'N', 'B', 'D', 'R', 'C', 'H', 'K', 'S'};
constexpr uint32_t kDigestSize = 32;
constexpr uint32_t kCrcOffset = 124;
constexpr size_t kBatch = 4096;  // digests per write: 128 KiB

std::string errno_text(const std::string& what, int e) { return what + ": " + strerror(e); }

// pread until `len` bytes or EOF; returns bytes read, or -1 with errno.
ssize_t pread_full(int fd, void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd, static_cast<char*>(buf) + done, len - done, off_t(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    if (n == 0) break;
    done += size_t(n);
  }
  return ssize_t(done);
}

bool pwrite_full(int fd, const void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd, static_cast<const char*>(buf) + done, len - done, off_t(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      return false;
    }
    done += size_t(n);
  }
  return true;
}

// Streams the table of `n` digests at `fd` through SHA-256.
bool table_digest(int fd, uint64_t n, ChunkDigest* out, std::string* err, const std::string& path) {
  gnutls_hash_hd_t h;
  if (gnutls_hash_init(&h, GNUTLS_DIG_SHA256) < 0) {
    *err = "cannot start SHA-256 (GnuTLS)";
    return false;
  }
  std::vector<uint8_t> buf(kBatch * kDigestSize);
  uint64_t left = n * kDigestSize, off = kChunkHeaderSize;
  while (left > 0) {
    size_t want = size_t(std::min<uint64_t>(left, buf.size()));
    ssize_t got = pread_full(fd, buf.data(), want, off);
    if (got != ssize_t(want)) {
      gnutls_hash_deinit(h, nullptr);
      *err = got < 0 ? errno_text("read " + path, errno) : path + ": truncated digest table";
      return false;
    }
    gnutls_hash(h, buf.data(), want);
    off += want;
    left -= want;
  }
  gnutls_hash_deinit(h, out->data());
  return true;
}

}  // namespace

ChunkDigest sha256(const void* data, size_t len) {
  ChunkDigest d{};
  // Fails only when the algorithm is disabled (FIPS misconfiguration); the
  // all-zero result then matches nothing real.
  (void)gnutls_hash_fast(GNUTLS_DIG_SHA256, data, len, d.data());
  return d;
}

std::string to_hex(const ChunkDigest& d) {
  static const char* x = "0123456789abcdef";
  std::string s;
  for (uint8_t b : d) {
    s += x[b >> 4];
    s += x[b & 15];
  }
  return s;
}

std::string encode_chunk_header(const ChunkDigestsId& id, uint32_t chunk_size,
                                const ChunkDigest& table) {
  std::string h(kChunkHeaderSize, '\0');
  memcpy(h.data(), kMagic, sizeof kMagic);
  le::put<uint32_t>(h, 8, kChunkDigestVersion);
  le::put<uint32_t>(h, 12, kChunkHeaderSize);
  le::put<uint32_t>(h, 16, kDigestSha256);
  le::put<uint32_t>(h, 20, kDigestSize);
  le::put<uint32_t>(h, 24, chunk_size);
  le::put<uint64_t>(h, 32, id.size);
  le::put<uint64_t>(h, 40, chunk_count(id.size, chunk_size));
  le::put<uint64_t>(h, 48, id.generation_tag);
  memcpy(h.data() + 56, table.data(), table.size());
  le::put<uint32_t>(h, kCrcOffset, le::crc32(h.data(), kCrcOffset));
  return h;
}

// ---------------------------------------------------------------- ChunkDigests

std::unique_ptr<ChunkDigests> ChunkDigests::open(const std::string& path,
                                                 const ChunkDigestsId& expect, std::string* err,
                                                 bool* missing) {
  if (missing) *missing = false;
  std::unique_ptr<ChunkDigests> d(new ChunkDigests());
  d->path_ = path;
  d->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (d->fd_ < 0) {
    if (missing) *missing = errno == ENOENT;
    *err = errno_text(path, errno);
    return nullptr;
  }
  struct stat st;
  if (fstat(d->fd_, &st) != 0) {
    *err = errno_text(path, errno);
    return nullptr;
  }
  uint8_t h[kChunkHeaderSize];
  ssize_t n = pread_full(d->fd_, h, sizeof h, 0);
  if (n < 0) {
    *err = errno_text("read " + path, errno);
    return nullptr;
  }
  auto bad = [&](const std::string& why) {
    *err = path + ": " + why;
    return nullptr;
  };
  if (size_t(n) < sizeof h) return bad("truncated header (" + std::to_string(n) + " bytes)");
  if (memcmp(h, kMagic, sizeof kMagic) != 0) return bad("not a chunk digest file (bad magic)");
  const uint32_t version = le::get<uint32_t>(h, 8);
  if (version != kChunkDigestVersion)
    return bad("unsupported version " + std::to_string(version));
  if (le::get<uint32_t>(h, kCrcOffset) != le::crc32(h, kCrcOffset))
    return bad("header checksum mismatch");
  const uint32_t hsize = le::get<uint32_t>(h, 12), algo = le::get<uint32_t>(h, 16);
  const uint32_t dsize = le::get<uint32_t>(h, 20), csize = le::get<uint32_t>(h, 24);
  const uint64_t size = le::get<uint64_t>(h, 32), count = le::get<uint64_t>(h, 40);
  const uint64_t tag = le::get<uint64_t>(h, 48);
  if (hsize != kChunkHeaderSize) return bad("bad header size " + std::to_string(hsize));
  if (algo != kDigestSha256 || dsize != kDigestSize)
    return bad("unsupported digest algorithm " + std::to_string(algo) + " (" +
               std::to_string(dsize) + "-byte digests)");
  if (csize < 4096 || csize > (16u << 20) || (csize & (csize - 1)))
    return bad("bad chunk size " + std::to_string(csize));
  if (le::get<uint32_t>(h, 28) != 0 ||
      std::any_of(h + 88, h + kCrcOffset, [](uint8_t b) { return b != 0; }))
    return bad("reserved header bytes are not zero");
  if (size != expect.size)
    return bad("describes " + std::to_string(size) + " bytes, the generation has " +
               std::to_string(expect.size));
  if (tag != expect.generation_tag) return bad("belongs to another generation (tag mismatch)");
  if (count != chunk_count(size, csize))
    return bad("chunk count " + std::to_string(count) + " does not match size " +
               std::to_string(size));
  const uint64_t want = kChunkHeaderSize + count * kDigestSize;
  if (uint64_t(st.st_size) != want)
    return bad(std::to_string(st.st_size) + " bytes, expected " + std::to_string(want) +
               (uint64_t(st.st_size) < want ? " (truncated)" : " (trailing bytes)"));
  ChunkDigest table;
  if (!table_digest(d->fd_, count, &table, err, path)) return nullptr;
  if (memcmp(table.data(), h + 56, table.size()) != 0)
    return bad("digest table does not match its checksum in the header");
  d->size_ = size;
  d->chunk_size_ = csize;
  d->chunks_ = count;
  return d;
}

ChunkDigests::~ChunkDigests() {
  if (fd_ >= 0) ::close(fd_);
}

uint64_t ChunkDigests::chunk_length(uint64_t chunk) const {
  const uint64_t start = chunk * chunk_size_;
  return std::min<uint64_t>(chunk_size_, size_ - start);
}

bool ChunkDigests::digest(uint64_t chunk, ChunkDigest* out, std::string* err) const {
  if (chunk >= chunks_) {
    *err = path_ + ": chunk " + std::to_string(chunk) + " out of range (" +
           std::to_string(chunks_) + " chunks)";
    return false;
  }
  ssize_t n = pread_full(fd_, out->data(), kDigestSize, kChunkHeaderSize + chunk * kDigestSize);
  if (n != ssize_t(kDigestSize)) {
    *err = n < 0 ? errno_text("read " + path_, errno) : path_ + ": truncated since it was opened";
    return false;
  }
  return true;
}

ChunkDigests::Verdict ChunkDigests::verify(uint64_t chunk, const void* data, size_t len,
                                           std::string* err) const {
  ChunkDigest want;
  if (!digest(chunk, &want, err)) return Verdict::kError;
  if (len != chunk_length(chunk)) return Verdict::kMismatch;
  return sha256(data, len) == want ? Verdict::kMatch : Verdict::kMismatch;
}

// ---------------------------------------------------------------- ChunkDigestsWriter

std::unique_ptr<ChunkDigestsWriter> ChunkDigestsWriter::create(const std::string& path,
                                                               const ChunkDigestsId& id,
                                                               std::string* err) {
  std::unique_ptr<ChunkDigestsWriter> w(new ChunkDigestsWriter());
  w->path_ = path;
  w->id_ = id;
  w->chunks_ = chunk_count(id.size);
  w->fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0444);
  if (w->fd_ < 0) {
    *err = errno_text(path, errno);
    return nullptr;
  }
  gnutls_hash_hd_t h;
  if (gnutls_hash_init(&h, GNUTLS_DIG_SHA256) < 0) {
    *err = "cannot start SHA-256 (GnuTLS)";
    return nullptr;
  }
  w->table_hash_ = h;
  w->batch_.reserve(kBatch * kDigestSize);
  return w;
}

ChunkDigestsWriter::~ChunkDigestsWriter() {
  if (table_hash_) gnutls_hash_deinit(static_cast<gnutls_hash_hd_t>(table_hash_), nullptr);
  if (fd_ >= 0) ::close(fd_);
}

bool ChunkDigestsWriter::add(const ChunkDigest& d, std::string* err) {
  if (added_ >= chunks_) {
    *err = path_ + ": more digests than the " + std::to_string(chunks_) + " chunks";
    return false;
  }
  batch_.insert(batch_.end(), d.begin(), d.end());
  ++added_;
  return batch_.size() < kBatch * kDigestSize || flush_batch(err);
}

bool ChunkDigestsWriter::flush_batch(std::string* err) {
  if (batch_.empty()) return true;
  gnutls_hash(static_cast<gnutls_hash_hd_t>(table_hash_), batch_.data(), batch_.size());
  if (!pwrite_full(fd_, batch_.data(), batch_.size(), kChunkHeaderSize + written_ * kDigestSize)) {
    *err = errno_text("write " + path_, errno);
    return false;
  }
  written_ += batch_.size() / kDigestSize;
  batch_.clear();
  return true;
}

bool ChunkDigestsWriter::finish(std::string* err) {
  if (added_ != chunks_) {
    *err = path_ + ": " + std::to_string(added_) + " of " + std::to_string(chunks_) +
           " digests written";
    return false;
  }
  if (!flush_batch(err)) return false;
  ChunkDigest table;
  gnutls_hash_deinit(static_cast<gnutls_hash_hd_t>(table_hash_), table.data());
  table_hash_ = nullptr;
  const std::string h = encode_chunk_header(id_, kChunkSize, table);
  if (!pwrite_full(fd_, h.data(), h.size(), 0)) {
    *err = errno_text("write " + path_, errno);
    return false;
  }
  if (fdatasync(fd_) != 0) {
    *err = errno_text("fdatasync " + path_, errno);
    return false;
  }
  return true;
}

}  // namespace storage
