#include "digests.hpp"

#include "util.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace ib {
namespace {

using storage::ChunkDigests;
using storage::kChunkSize;

std::string digests_path(const std::string& dir) { return dir + "/" + storage::kChunkDigestsFile; }

// Chunks holding at least one block of the layer's map.
Roaring changed_chunks(const storage::BlockMap& map, uint32_t block_size) {
  const uint32_t per_chunk = kChunkSize / block_size;
  Roaring out;
  for (const Roaring* r : {&map.dirty, &map.zero})
    for (uint32_t b : *r) out.add(b / per_chunk);
  return out;
}

// The parent's digests when they can stand in for unchanged chunks.
std::unique_ptr<ChunkDigests> usable_parent(const Store& store, const std::string& image,
                                            const std::string& parent, uint64_t size,
                                            Progress* progress) {
  bool missing = false;
  auto d = open_chunk_digests(store, image, parent, size, &missing);
  if (!d) {
    progress->note(missing ? "parent " + parent + " has no chunk digests: hashing every chunk"
                           : d.status().message() + ": hashing every chunk");
    return nullptr;
  }
  if ((*d)->chunk_size() != kChunkSize) {
    progress->note("parent " + parent + "'s digests use other chunks: hashing every chunk");
    return nullptr;
  }
  return std::move(*d);
}

bool all_zero(const uint8_t* p, size_t n) {
  return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

}  // namespace

Result<std::unique_ptr<ChunkDigests>> open_chunk_digests(const Store& store,
                                                         const std::string& image,
                                                         const std::string& gen, uint64_t size,
                                                         bool* missing) {
  std::string err;
  auto d = ChunkDigests::open(digests_path(store.generation_dir(image, gen)),
                              storage::ChunkDigestsId{size, storage::generation_tag(image, gen)},
                              &err, missing);
  if (!d) return Status::fail(err);
  return d;
}

Status write_chunk_digests(const Store& store, const std::string& image, const std::string& gen,
                           const std::string& dir, BlockDevice& dev,
                           const std::optional<std::string>& parent, const storage::BlockMap* layer,
                           uint32_t block_size, Progress* progress, DigestStats* stats) {
  const auto t0 = std::chrono::steady_clock::now();
  const uint64_t size = dev.size();
  std::unique_ptr<ChunkDigests> below;
  Roaring changed;
  if (parent && layer) {
    below = usable_parent(store, image, *parent, size, progress);
    if (below) changed = changed_chunks(*layer, block_size);
  }
  std::string err;
  const std::string path = digests_path(dir);
  auto w = storage::ChunkDigestsWriter::create(
      path, storage::ChunkDigestsId{size, storage::generation_tag(image, gen)}, &err);
  if (!w) return Status::fail(err);
  std::vector<uint8_t> buf(kChunkSize);
  storage::ChunkDigest d;
  const std::vector<uint8_t> zeros(kChunkSize);
  const storage::ChunkDigest zero_chunk = storage::sha256(zeros.data(), zeros.size());
  progress->begin("digests", 0, size);
  for (uint64_t c = 0; c < w->chunks(); ++c) {
    const uint64_t off = c * kChunkSize;
    const size_t len = size_t(std::min<uint64_t>(kChunkSize, size - off));
    if (below && !changed.contains(uint32_t(c))) {
      if (!below->digest(c, &d, &err)) return Status::fail(err);
      ++stats->reused;
    } else {
      if (int e = dev.read(off, buf.data(), len))
        return Status::fail(dev.error().empty() ? errno_message("read chunk", e) : dev.error());
      // Free space reads as zeros: a compare is much cheaper than SHA-256.
      const bool zero = len == kChunkSize && all_zero(buf.data(), len);
      d = zero ? zero_chunk : storage::sha256(buf.data(), len);
      ++stats->hashed;
    }
    if (!w->add(d, &err)) return Status::fail(err);
    progress->add_bytes(len);
  }
  if (!w->finish(&err)) return Status::fail(err);
  progress->end();
  stats->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return Status();
}

Result<VerifyReport> verify(const Store& store, const std::string& image,
                            std::optional<std::string> gen, Progress* progress) {
  if (!valid_name(image)) return Status::fail("invalid image name \"" + image + "\"");
  if (Status s = store.check(); !s) return s;
  if (!is_dir(store.generations_dir(image)))
    return Status::fail("no image " + image + " in store " + store.root());
  if (!gen) gen = store.current(image);
  if (!gen) {
    auto gens = store.generations(image);
    if (gens.empty()) return Status::fail("image " + image + " has no generations");
    gen = gens.back();
  }
  if (!store.has_generation(image, *gen))
    return Status::fail("image " + image + " has no generation " + *gen);
  auto chain = GenerationChain::open(store, image, *gen);
  if (!chain) return chain.status();
  bool missing = false;
  auto digests = open_chunk_digests(store, image, *gen, (*chain)->size(), &missing);
  if (!digests) {
    if (missing)
      return Status::fail(image + "@" + *gen + " has no chunk digests (" +
                          digests_path(store.generation_dir(image, *gen)) +
                          "): it was built before imagebuilder wrote them; nothing to verify");
    return digests.status();
  }
  ChunkDigests& dg = **digests;
  VerifyReport r;
  r.gen = *gen;
  r.chunk_size = dg.chunk_size();
  std::vector<uint8_t> buf(dg.chunk_size());
  std::string err;
  progress->begin("verify", 0, dg.size());
  for (uint64_t c = 0; c < dg.chunks(); ++c) {
    const uint64_t len = dg.chunk_length(c);
    if (int e = (*chain)->read(c * dg.chunk_size(), buf.data(), len))
      return Status::fail((*chain)->error().empty() ? errno_message("read", e) : (*chain)->error());
    auto v = dg.verify(c, buf.data(), len, &err);
    if (v == ChunkDigests::Verdict::kError) return Status::fail(err);
    if (v == ChunkDigests::Verdict::kMismatch) r.bad.push_back(c);
    ++r.checked;
    progress->add_bytes(len);
  }
  progress->end();
  return r;
}

}  // namespace ib
