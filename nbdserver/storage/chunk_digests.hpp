// Per-chunk digests of one generation: chunks.sha256 in its directory.
//
// Peers that serve a generation's blocks are untrusted, so every chunk a
// node gets from one is checked against a digest the server (trusted)
// handed out. imagebuilder writes the file when it builds the generation;
// the server and the node agent read it with ChunkDigests.
//
// The file: a 128-byte header, then one 32-byte SHA-256 per chunk, in
// chunk order. Chunk i is bytes [i * chunk_size, min((i + 1) * chunk_size,
// size)) of the generation's full logical content (what a node reads, a
// delta seen through its chain): the last chunk may be short, and then
// only its bytes are hashed. Integers are little-endian.
//
//   off len  field
//     0   8  magic "NBDRCHKS"
//     8   4  version (1)
//    12   4  header size (128)
//    16   4  algorithm (1: SHA-256)
//    20   4  digest size (32)
//    24   4  chunk size (65536; a power of two, 4 KiB .. 16 MiB)
//    28   4  reserved, 0
//    32   8  size: bytes of the generation
//    40   8  chunk count: ceil(size / chunk size)
//    48   8  generation tag: generation_tag(image, gen), binds the file
//    56  32  SHA-256 of the digest table (all that follows the header)
//    88  36  reserved, 0
//   124   4  CRC-32 of bytes 0..123
//
// The file is written once, in the generation's temporary directory, and
// never changes. Opening validates everything (the file is untrusted
// input: a bad magic, version, algorithm, geometry, size or tag, a short or
// long file, a header CRC or table digest that does not match is refused
// with a message naming the file and the field). No wire format here.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "storage/le_bytes.hpp"

namespace storage {

using ChunkDigest = std::array<uint8_t, 32>;

// A stable 64-bit tag for "<image>@<gen>" (FNV-1a). Binds a digests file
// here, and a layer to its base (storage/layer_file.hpp), to a generation.
inline uint64_t generation_tag(const std::string& image, const std::string& gen) {
  return le::fnv1a(image + "@" + gen);
}

inline constexpr uint32_t kChunkSize = 64 * 1024;
inline constexpr uint32_t kChunkHeaderSize = 128;
inline constexpr uint32_t kChunkDigestVersion = 1;
inline constexpr uint32_t kDigestSha256 = 1;
inline constexpr const char* kChunkDigestsFile = "chunks.sha256";

// SHA-256 of [data, data + len) (GnuTLS).
ChunkDigest sha256(const void* data, size_t len);
// Lower-case hex, for messages and tests.
std::string to_hex(const ChunkDigest& d);

// Chunks of `size` bytes cut in `chunk_size` pieces (the last may be short).
inline uint64_t chunk_count(uint64_t size, uint32_t chunk_size = kChunkSize) {
  return (size + chunk_size - 1) / chunk_size;
}

// What a digest file must describe to be accepted.
struct ChunkDigestsId {
  uint64_t size = 0;            // bytes of the generation
  uint64_t generation_tag = 0;  // generation_tag(image, gen)
};

class ChunkDigests {
 public:
  // Opens and validates `path` against `expect`, reading it whole once (to
  // check the table digest). Returns nullptr and sets *err on failure; a
  // missing file sets *missing (when given) so callers can tell "no digests"
  // (generations built before digests existed) from "bad digests".
  static std::unique_ptr<ChunkDigests> open(const std::string& path, const ChunkDigestsId& expect,
                                            std::string* err, bool* missing = nullptr);
  ~ChunkDigests();
  ChunkDigests(const ChunkDigests&) = delete;
  ChunkDigests& operator=(const ChunkDigests&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  uint32_t chunk_size() const { return chunk_size_; }
  uint64_t chunks() const { return chunks_; }
  // Bytes in chunk `chunk` (< chunks()): chunk_size(), or less for the last.
  uint64_t chunk_length(uint64_t chunk) const;

  // The stored digest of `chunk` (< chunks()). Reads the file (pread), so it
  // can fail with an I/O error: false and *err. Any thread.
  bool digest(uint64_t chunk, ChunkDigest* out, std::string* err) const;

  enum class Verdict { kMatch, kMismatch, kError };
  // Checks `len` bytes claimed to be chunk `chunk`: kMismatch when the
  // length is not chunk_length(chunk) or the SHA-256 differs (bytes not to
  // be used), kError (with *err) when the digest could not be read.
  Verdict verify(uint64_t chunk, const void* data, size_t len, std::string* err) const;

 private:
  ChunkDigests() = default;
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
  uint32_t chunk_size_ = kChunkSize;
  uint64_t chunks_ = 0;
};

// Writes a digest file: digests appended in chunk order, streamed out in
// batches (bounded memory), then the header. Not thread-safe.
class ChunkDigestsWriter {
 public:
  // Creates `path` (mode 0444; replaces an existing file).
  static std::unique_ptr<ChunkDigestsWriter> create(const std::string& path,
                                                    const ChunkDigestsId& id, std::string* err);
  ~ChunkDigestsWriter();
  uint64_t chunks() const { return chunks_; }
  uint64_t added() const { return added_; }
  // The next chunk's digest.
  bool add(const ChunkDigest& d, std::string* err);
  // Once every chunk is added: writes the header and fdatasyncs.
  bool finish(std::string* err);

 private:
  ChunkDigestsWriter() = default;
  bool flush_batch(std::string* err);
  std::string path_;
  int fd_ = -1;
  ChunkDigestsId id_;
  uint64_t chunks_ = 0;
  uint64_t added_ = 0;
  uint64_t written_ = 0;  // digests already in the file
  std::vector<uint8_t> batch_;
  void* table_hash_ = nullptr;  // gnutls_hash_hd_t over the table
};

// The header for `id` with `chunk_size` and `table` (the table's SHA-256).
// Pure; for the writer and for tests that forge files.
std::string encode_chunk_header(const ChunkDigestsId& id, uint32_t chunk_size,
                                const ChunkDigest& table);

}  // namespace storage
