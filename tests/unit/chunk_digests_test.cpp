// Chunk digest files (storage/chunk_digests): round trips on real files,
// every corrupt, truncated or foreign file refused with a reason, and
// verify() refusing a chunk with one flipped bit.
#include "storage/chunk_digests.hpp"
#include "storage/layer_file.hpp"

#include <unistd.h>

#include <gtest/gtest.h>

#include <boost/crc.hpp>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace storage {
namespace {

// The header layout, written down independently of chunk_digests.cpp so a
// format change is a deliberate one.
constexpr size_t kOffVersion = 8, kOffHeaderSize = 12, kOffAlgo = 16, kOffDigestSize = 20,
                 kOffChunkSize = 24, kOffReserved = 28, kOffSize = 32, kOffCount = 40,
                 kOffTag = 48, kOffTable = 56, kOffReserved2 = 88, kOffCrc = 124;

template <typename T>
void put_le(std::string& s, size_t off, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) s[off + i] = char((uint64_t(v) >> (8 * i)) & 0xff);
}

void reseal(std::string& file) {
  boost::crc_32_type c;
  c.process_bytes(file.data(), kOffCrc);
  put_le<uint32_t>(file, kOffCrc, c.checksum());
}

class ChunkDigestsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/chunk_digests_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/chunks.sha256";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Random content of `size` bytes and its digest file at path_.
  void make(uint64_t size, uint64_t seed = 1) {
    id_ = ChunkDigestsId{size, generation_tag("lab", "g1")};
    data_.resize(size);
    std::mt19937_64 rng(seed);
    for (auto& b : data_) b = uint8_t(rng());
    std::string err;
    auto w = ChunkDigestsWriter::create(path_, id_, &err);
    ASSERT_TRUE(w) << err;
    for (uint64_t off = 0; off < size; off += kChunkSize)
      ASSERT_TRUE(w->add(sha256(data_.data() + off, std::min<uint64_t>(kChunkSize, size - off)),
                         &err))
          << err;
    ASSERT_TRUE(w->finish(&err)) << err;
  }
  std::string contents() {
    std::ifstream f(path_, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
  }
  void rewrite(const std::string& s) {
    std::filesystem::remove(path_);
    std::ofstream(path_, std::ios::binary | std::ios::trunc) << s;
  }
  // Opening must fail with `needle` in the message.
  void refused(const std::string& needle, ChunkDigestsId expect) {
    std::string err;
    EXPECT_EQ(ChunkDigests::open(path_, expect, &err), nullptr) << needle;
    EXPECT_NE(err.find(needle), std::string::npos) << "'" << needle << "' not in: " << err;
    EXPECT_NE(err.find(path_), std::string::npos) << err;
  }
  void refused(const std::string& needle) { refused(needle, id_); }

  std::string dir_, path_;
  ChunkDigestsId id_;
  std::vector<uint8_t> data_;
};

TEST(Sha256, IsTheRealThing) {
  // FIPS 180-2 test vector.
  EXPECT_EQ(to_hex(sha256("abc", 3)),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_F(ChunkDigestsTest, RoundTripWithAShortLastChunk) {
  make(5 * kChunkSize + 4096);
  std::string err;
  auto d = ChunkDigests::open(path_, id_, &err);
  ASSERT_TRUE(d) << err;
  EXPECT_EQ(d->chunks(), 6u);
  EXPECT_EQ(d->chunk_size(), kChunkSize);
  EXPECT_EQ(d->chunk_length(5), 4096u);
  EXPECT_EQ(contents().size(), kChunkHeaderSize + 6 * 32);
  for (uint64_t c = 0; c < d->chunks(); ++c) {
    ChunkDigest got;
    ASSERT_TRUE(d->digest(c, &got, &err)) << err;
    EXPECT_EQ(got, sha256(data_.data() + c * kChunkSize, d->chunk_length(c)));
    EXPECT_EQ(d->verify(c, data_.data() + c * kChunkSize, d->chunk_length(c), &err),
              ChunkDigests::Verdict::kMatch);
  }
  ChunkDigest x;
  EXPECT_FALSE(d->digest(6, &x, &err));
  EXPECT_NE(err.find("out of range"), std::string::npos) << err;
}

TEST_F(ChunkDigestsTest, ManyBatchesAndAnEmptyGeneration) {
  // More digests than one write batch; stand-in digests (the writer does
  // not look at content), each different.
  const uint64_t n = 10000;
  ChunkDigestsId id{n * kChunkSize - 8192, generation_tag("lab", "big")};
  auto fake = [](uint64_t c) { return sha256(&c, sizeof c); };
  std::string err;
  auto w = ChunkDigestsWriter::create(path_, id, &err);
  ASSERT_TRUE(w) << err;
  for (uint64_t c = 0; c < n; ++c) ASSERT_TRUE(w->add(fake(c), &err)) << err;
  ASSERT_TRUE(w->finish(&err)) << err;
  auto d = ChunkDigests::open(path_, id, &err);
  ASSERT_TRUE(d) << err;
  ASSERT_EQ(d->chunks(), n);
  EXPECT_EQ(d->chunk_length(n - 1), kChunkSize - 8192);
  for (uint64_t c = 0; c < n; ++c) {
    ChunkDigest got;
    ASSERT_TRUE(d->digest(c, &got, &err)) << err;
    ASSERT_EQ(got, fake(c)) << c;
  }
  make(0);
  d = ChunkDigests::open(path_, id_, &err);
  ASSERT_TRUE(d) << err;
  EXPECT_EQ(d->chunks(), 0u);
}

TEST_F(ChunkDigestsTest, VerifyCatchesAFlippedBit) {
  make(3 * kChunkSize);
  std::string err;
  auto d = ChunkDigests::open(path_, id_, &err);
  ASSERT_TRUE(d) << err;
  std::mt19937_64 rng(3);
  for (int i = 0; i < 200; ++i) {
    uint64_t c = rng() % 3, bit = rng() % (kChunkSize * 8);
    std::vector<uint8_t> chunk(data_.begin() + c * kChunkSize, data_.begin() + (c + 1) * kChunkSize);
    chunk[bit / 8] ^= uint8_t(1u << (bit % 8));
    ASSERT_EQ(d->verify(c, chunk.data(), chunk.size(), &err), ChunkDigests::Verdict::kMismatch)
        << "chunk " << c << " bit " << bit;
  }
  // Right bytes for the wrong chunk, or a short chunk: refused too.
  EXPECT_EQ(d->verify(1, data_.data(), kChunkSize, &err), ChunkDigests::Verdict::kMismatch);
  EXPECT_EQ(d->verify(0, data_.data(), kChunkSize - 1, &err), ChunkDigests::Verdict::kMismatch);
  EXPECT_EQ(d->verify(3, data_.data(), kChunkSize, &err), ChunkDigests::Verdict::kError);
}

TEST_F(ChunkDigestsTest, EveryCorruptionIsRefused) {
  make(4 * kChunkSize);
  const std::string good = contents();
  struct Case {
    const char* needle;
    std::function<void(std::string&)> damage;
    bool reseal;
  };
  const std::vector<Case> cases = {
      {"bad magic", [](std::string& s) { s[0] = 'X'; }, true},
      {"unsupported version 2", [](std::string& s) { put_le<uint32_t>(s, kOffVersion, 2); }, true},
      {"header checksum", [](std::string& s) { s[kOffSize] ^= 1; }, false},
      {"header checksum", [](std::string& s) { s[kOffCrc] ^= 1; }, false},
      {"header checksum", [](std::string& s) { s[kOffTable + 3] ^= 0x10; }, false},
      {"bad header size", [](std::string& s) { put_le<uint32_t>(s, kOffHeaderSize, 64); }, true},
      {"unsupported digest algorithm 2", [](std::string& s) { put_le<uint32_t>(s, kOffAlgo, 2); }, true},
      {"unsupported digest algorithm", [](std::string& s) { put_le<uint32_t>(s, kOffDigestSize, 64); }, true},
      {"bad chunk size 65535", [](std::string& s) { put_le<uint32_t>(s, kOffChunkSize, 65535); }, true},
      {"bad chunk size 1024", [](std::string& s) { put_le<uint32_t>(s, kOffChunkSize, 1024); }, true},
      {"reserved", [](std::string& s) { put_le<uint32_t>(s, kOffReserved, 1); }, true},
      {"reserved", [](std::string& s) { s[kOffReserved2 + 5] = 1; }, true},
      {"the generation has", [](std::string& s) { put_le<uint64_t>(s, kOffSize, 3 * kChunkSize); }, true},
      {"tag mismatch", [](std::string& s) { put_le<uint64_t>(s, kOffTag, generation_tag("lab", "g2")); }, true},
      {"chunk count 5", [](std::string& s) { put_le<uint64_t>(s, kOffCount, 5); }, true},
      {"truncated header", [](std::string& s) { s.resize(100); }, false},
      {"truncated header", [](std::string& s) { s.clear(); }, false},
      {"(truncated)", [](std::string& s) { s.resize(s.size() - 1); }, false},
      {"(truncated)", [](std::string& s) { s.resize(kChunkHeaderSize); }, false},
      {"(trailing bytes)", [](std::string& s) { s += '\0'; }, false},
      {"digest table does not match", [](std::string& s) { s[kChunkHeaderSize + 40] ^= 4; }, false},
      {"digest table does not match", [](std::string& s) { s[s.size() - 1] ^= 0x80; }, false},
  };
  for (const auto& c : cases) {
    std::string s = good;
    c.damage(s);
    if (c.reseal && s.size() >= kChunkHeaderSize) reseal(s);
    rewrite(s);
    refused(c.needle);
  }
  // A valid file opened for another generation, or another size.
  rewrite(good);
  refused("tag mismatch", ChunkDigestsId{id_.size, generation_tag("lab", "g0")});
  refused("the generation has", ChunkDigestsId{id_.size + 4096, id_.generation_tag});
  // The untouched file still opens: the cases above failed for their fault.
  std::string err;
  EXPECT_TRUE(ChunkDigests::open(path_, id_, &err)) << err;
}

TEST_F(ChunkDigestsTest, AMissingFileIsToldApart) {
  std::string err;
  bool missing = false;
  EXPECT_EQ(ChunkDigests::open(path_, ChunkDigestsId{4096, 1}, &err, &missing), nullptr);
  EXPECT_TRUE(missing);
  make(kChunkSize);
  rewrite("garbage");
  EXPECT_EQ(ChunkDigests::open(path_, id_, &err, &missing), nullptr);
  EXPECT_FALSE(missing);
}

TEST_F(ChunkDigestsTest, TheWriterCountsItsDigests) {
  std::string err;
  ChunkDigestsId id{3 * kChunkSize, 7};
  auto w = ChunkDigestsWriter::create(path_, id, &err);
  ASSERT_TRUE(w) << err;
  ChunkDigest z{};
  ASSERT_TRUE(w->add(z, &err));
  EXPECT_FALSE(w->finish(&err));
  EXPECT_NE(err.find("1 of 3"), std::string::npos) << err;
  ASSERT_TRUE(w->add(z, &err));
  ASSERT_TRUE(w->add(z, &err));
  EXPECT_FALSE(w->add(z, &err));
  EXPECT_NE(err.find("more digests"), std::string::npos) << err;
}

}  // namespace
}  // namespace storage
