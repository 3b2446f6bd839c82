// Chunk digests of generations (storage/chunk_digests.hpp): `build` writes
// chunks.sha256 into the temporary generation, `verify` re-reads a
// generation through its chain and checks every chunk, `flatten` checks
// the chunks it copies.
//
// A full generation hashes every chunk of image.ext4. A delta takes the
// parent's digest for each chunk none of whose blocks the layer changed
// (dirty or zero in its map) and hashes only the others, read through the
// new layer; without usable parent digests it hashes every chunk. One pass,
// in chunk order, one chunk buffer: memory does not grow with the image.
#pragma once

#include "block_device.hpp"
#include "progress.hpp"
#include "status.hpp"
#include "store.hpp"

#include "storage/chunk_digests.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ib {

struct DigestStats {
  uint64_t hashed = 0;   // chunks read and hashed
  uint64_t reused = 0;   // chunks whose digest came from the parent
  double seconds = 0;
};

// Writes <dir>/chunks.sha256 for generation `gen` of `image`, whose whole
// content `dev` reads. `parent` (a delta's parent generation) and
// `layer` (the new layer's map, of `block_size` blocks) let unchanged
// chunks reuse the parent's digests; pass nullopt/nullptr for a full
// generation.
Status write_chunk_digests(const Store& store, const std::string& image, const std::string& gen,
                           const std::string& dir, BlockDevice& dev,
                           const std::optional<std::string>& parent, const storage::BlockMap* layer,
                           uint32_t block_size, Progress* progress, DigestStats* stats);

// Opens the digests of a published generation, checked against its
// manifest's size and its tag. `*missing` tells a generation built before
// digests existed from a damaged file.
Result<std::unique_ptr<storage::ChunkDigests>> open_chunk_digests(const Store& store,
                                                                 const std::string& image,
                                                                 const std::string& gen,
                                                                 uint64_t size, bool* missing);

struct VerifyReport {
  std::string gen;
  uint64_t checked = 0;
  uint64_t chunk_size = 0;
  std::vector<uint64_t> bad;  // chunk numbers whose content does not match
};

// Reads `gen` (default: current, else the newest) through its chain and
// checks every chunk. Fails (no report) when the generation or its digest
// file cannot be opened, or has none.
Result<VerifyReport> verify(const Store& store, const std::string& image,
                            std::optional<std::string> gen, Progress* progress);

}  // namespace ib
