// Layer files: the bitmap slot codec (pure) and the file helpers on real
// files. Every corrupt, torn, truncated or foreign input must be refused
// with a reason; none may decode to a different map.
#include "storage/layer_file.hpp"
#include "storage/map_log.hpp"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <boost/crc.hpp>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace storage {
namespace {

// The slot header layout, written down independently of layer_file.cpp so
// that a format change is a deliberate one.
constexpr size_t kOffVersion = 8, kOffBlockSize = 12, kOffSize = 16, kOffBase = 24,
                 kOffLayer = 32, kOffSeq = 40, kOffDirtyLen = 48, kOffZeroLen = 52,
                 kOffCrc = 56;

template <typename T>
void put_le(std::string& s, size_t off, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) s[off + i] = char((uint64_t(v) >> (8 * i)) & 0xff);
}
template <typename T>
T get_le(const std::string& s, size_t off) {
  uint64_t v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= uint64_t(uint8_t(s[off + i])) << (8 * i);
  return T(v);
}

// Recomputes the CRC of a slot (header with a zero CRC field, then payload)
// so that a test can forge a slot whose only fault is the one it plants.
void reseal(std::string& slot) {
  put_le<uint32_t>(slot, kOffCrc, 0);
  boost::crc_32_type c;
  c.process_bytes(slot.data(), slot.size());
  put_le<uint32_t>(slot, kOffCrc, c.checksum());
}

const uint8_t* u8(const std::string& s) { return reinterpret_cast<const uint8_t*>(s.data()); }

LayerId test_id(uint64_t blocks = 1000, uint32_t bs = 4096) {
  return LayerId{bs, blocks * bs, generation_tag("img", "g1"), 0x1234abcd5678ef00ull};
}

// Random disjoint maps: ranges (run containers), scattered bits (arrays),
// dense stretches (bitsets).
void random_maps(std::mt19937_64& rng, uint64_t blocks, Roaring* dirty, Roaring* zero) {
  *dirty = Roaring();
  *zero = Roaring();
  const int shape = int(rng() % 4);
  for (uint64_t b = 0; b < blocks;) {
    uint64_t run = shape == 0 ? 1 + rng() % 2000 : shape == 1 ? 1 : 1 + rng() % 8;
    run = std::min(run, blocks - b);
    const uint64_t r = rng() % (shape == 3 ? 3 : 10);
    if (r == 0) dirty->addRange(b, b + run);
    else if (r == 1) zero->addRange(b, b + run);
    b += run;
  }
  if (rng() % 2) {
    dirty->runOptimize();
    zero->runOptimize();
  }
}

bool decodes(const std::string& slot, const LayerId& id, BlockMap* out, std::string* why) {
  return decode_map_slot(u8(slot), slot.size(), id, out, why);
}

void expect_refused(const std::string& slot, const LayerId& id, const std::string& reason) {
  BlockMap m;
  std::string why;
  EXPECT_FALSE(decodes(slot, id, &m, &why)) << "expected refusal: " << reason;
  EXPECT_NE(why.find(reason), std::string::npos) << "why: \"" << why << "\", expected \""
                                                 << reason << "\"";
}

// ---------------------------------------------------------------------------
// The slot codec.

TEST(LayerMapSlot, RoundTripsRandomMaps) {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 300; ++i) {
    const uint64_t blocks = 1 + rng() % (i % 10 == 0 ? 600000 : 5000);
    const LayerId id = test_id(blocks, i % 2 ? 512 : 4096);
    Roaring dirty, zero;
    random_maps(rng, blocks, &dirty, &zero);
    const uint64_t seq = rng();
    const std::string slot = encode_map_slot(id, seq, dirty, zero);
    ASSERT_LE(slot.size(), slot_stride(blocks)) << "map " << i << " does not fit its slot";
    BlockMap m;
    std::string why;
    ASSERT_TRUE(decodes(slot, id, &m, &why)) << "map " << i << ": " << why;
    EXPECT_TRUE(m.dirty == dirty) << "map " << i;
    EXPECT_TRUE(m.zero == zero) << "map " << i;
    EXPECT_EQ(m.seq, seq);
    // Bytes after the slot (a longer, older slot's tail) are ignored.
    ASSERT_TRUE(decodes(slot + std::string(100, 'x'), id, &m, &why)) << why;
    EXPECT_TRUE(m.dirty == dirty);
  }
}

TEST(LayerMapSlot, EmptyMapsRoundTrip) {
  const LayerId id = test_id();
  const std::string slot = encode_map_slot(id, 1, Roaring(), Roaring());
  BlockMap m;
  std::string why;
  ASSERT_TRUE(decodes(slot, id, &m, &why)) << why;
  EXPECT_TRUE(m.dirty.isEmpty());
  EXPECT_TRUE(m.zero.isEmpty());
  EXPECT_EQ(m.seq, 1u);
}

TEST(LayerMapSlot, EveryByteFlipIsRefusedOrHarmless) {
  const LayerId id = test_id(300);
  Roaring dirty, zero;
  dirty.addRange(3, 40);
  dirty.add(77);
  dirty.add(299);
  zero.addRange(100, 103);
  zero.add(5000 % 300);
  zero.remove(77);
  const std::string slot = encode_map_slot(id, 9, dirty, zero);
  int refused = 0;
  for (size_t i = 0; i < slot.size(); ++i) {
    for (uint8_t mask : {0x01, 0x10, 0x80, 0xff}) {
      std::string bad = slot;
      bad[i] = char(uint8_t(bad[i]) ^ mask);
      BlockMap m;
      std::string why;
      if (decodes(bad, id, &m, &why)) {
        EXPECT_TRUE(m.dirty == dirty && m.zero == zero && m.seq == 9)
            << "flipping byte " << i << " with " << int(mask) << " yields a different map";
      } else {
        EXPECT_FALSE(why.empty()) << "byte " << i << ": refused without a reason";
        ++refused;
      }
    }
  }
  EXPECT_GT(refused, 0);
}

TEST(LayerMapSlot, TruncatedSlotIsRefused) {
  const LayerId id = test_id(300);
  Roaring dirty, zero;
  dirty.addRange(0, 50);
  zero.add(200);
  const std::string slot = encode_map_slot(id, 3, dirty, zero);
  for (size_t n = 0; n < slot.size(); ++n) {
    BlockMap m;
    std::string why;
    EXPECT_FALSE(decode_map_slot(u8(slot), n, id, &m, &why)) << "accepted " << n << " bytes";
    EXPECT_FALSE(why.empty());
    if (n >= 64) {
      EXPECT_NE(why.find("truncated"), std::string::npos) << n << ": " << why;
    }
  }
}

TEST(LayerMapSlot, UnwrittenSlotIsRefused) {
  expect_refused(std::string(4096, '\0'), test_id(), "never written");
}

TEST(LayerMapSlot, ForeignOrWrongHeaderIsRefused) {
  const LayerId id = test_id(300);
  Roaring dirty, zero;
  dirty.add(1);
  const std::string good = encode_map_slot(id, 5, dirty, zero);

  std::string s = good;
  s[0] = 'X';
  expect_refused(s, id, "magic");
  s = good;
  put_le<uint32_t>(s, kOffVersion, 2);
  reseal(s);
  expect_refused(s, id, "format version 2");

  LayerId other = id;
  other.size += other.block_size;
  expect_refused(encode_map_slot(other, 5, dirty, zero), id, "bytes in");
  other = id;
  other.block_size = 512;
  other.size = 300 * 512;
  expect_refused(encode_map_slot(other, 5, dirty, zero), id, "bytes in");
  s = good;  // block size field alone
  put_le<uint32_t>(s, kOffBlockSize, 8192);
  reseal(s);
  expect_refused(s, id, "8192-byte blocks");
  s = good;  // size field alone
  put_le<uint64_t>(s, kOffSize, 299 * 4096);
  reseal(s);
  expect_refused(s, id, "1224704 bytes");

  other = id;
  other.base_tag = generation_tag("img", "g2");
  expect_refused(encode_map_slot(other, 5, dirty, zero), id, "different base");
  other = id;
  other.layer_tag ^= 1;
  expect_refused(encode_map_slot(other, 5, dirty, zero), id, "different layer");
  // A zero layer tag in `expect` accepts any layer.
  LayerId any = id;
  any.layer_tag = 0;
  BlockMap m;
  std::string why;
  EXPECT_TRUE(decodes(encode_map_slot(other, 5, dirty, zero), any, &m, &why)) << why;
}

TEST(LayerMapSlot, ChecksumCatchesFieldChanges) {
  const LayerId id = test_id(300);
  Roaring dirty;
  dirty.add(1);
  const std::string good = encode_map_slot(id, 5, dirty, Roaring());
  for (size_t off : {kOffSeq, kOffLayer + 0, kOffCrc}) {
    std::string s = good;
    s[off] ^= 0x04;
    BlockMap m;
    std::string why;
    LayerId any = id;
    any.layer_tag = 0;
    EXPECT_FALSE(decodes(s, any, &m, &why)) << "field at " << off;
    EXPECT_NE(why.find("checksum"), std::string::npos) << why;
  }
}

TEST(LayerMapSlot, BitsBeyondTheViewAreRefused) {
  const LayerId id = test_id(300);
  Roaring in, beyond;
  in.add(299);
  beyond.add(300);
  expect_refused(encode_map_slot(id, 1, beyond, Roaring()), id, "beyond the end");
  expect_refused(encode_map_slot(id, 1, Roaring(), beyond), id, "beyond the end");
  Roaring far;
  far.add(0xffffffffu);
  expect_refused(encode_map_slot(id, 1, in, far), id, "beyond the end");
  BlockMap m;
  std::string why;
  EXPECT_TRUE(decodes(encode_map_slot(id, 1, in, Roaring()), id, &m, &why)) << why;
}

TEST(LayerMapSlot, DirtyAndZeroMustBeDisjoint) {
  const LayerId id = test_id(300);
  Roaring dirty, zero;
  dirty.addRange(10, 20);
  zero.addRange(19, 30);
  expect_refused(encode_map_slot(id, 1, dirty, zero), id, "both written and zero");
}

TEST(LayerMapSlot, GarbageBitmapWithGoodChecksumIsRefused) {
  const LayerId id = test_id(300);
  std::mt19937_64 rng(5);
  int refused = 0;
  for (int i = 0; i < 2000; ++i) {
    std::string s = encode_map_slot(id, 1, Roaring(), Roaring());
    s.resize(64);
    const size_t nd = rng() % 40, nz = rng() % 40;
    for (size_t k = 0; k < nd + nz; ++k) s.push_back(char(rng()));
    if (i % 3 == 0 && nd >= 4) put_le<uint32_t>(s, 64, 12346);  // a plausible cookie
    put_le<uint32_t>(s, kOffDirtyLen, uint32_t(nd));
    put_le<uint32_t>(s, kOffZeroLen, uint32_t(nz));
    reseal(s);
    BlockMap m;
    std::string why;
    if (decodes(s, id, &m, &why)) {
      // Whatever passes must be a valid map of this view.
      EXPECT_EQ(m.dirty.and_cardinality(m.zero), 0u);
      EXPECT_TRUE(m.dirty.isEmpty() || m.dirty.maximum() < 300);
      EXPECT_TRUE(m.zero.isEmpty() || m.zero.maximum() < 300);
    } else {
      EXPECT_FALSE(why.empty());
      ++refused;
    }
  }
  EXPECT_GT(refused, 1900);
}

TEST(LayerMapSlot, DeclaredLengthsMustMatchTheBitmaps) {
  const LayerId id = test_id(300);
  Roaring dirty;
  dirty.add(7);
  std::string s = encode_map_slot(id, 1, dirty, Roaring());
  const uint32_t nd = get_le<uint32_t>(s, kOffDirtyLen);
  // Declare one more byte for dirty (stolen from zero's count): the zero
  // bitmap then starts one byte late.
  std::string t = s + std::string(1, '\0');
  put_le<uint32_t>(t, kOffDirtyLen, nd + 1);
  reseal(t);
  BlockMap m;
  std::string why;
  EXPECT_FALSE(decodes(t, id, &m, &why));
  EXPECT_FALSE(why.empty());
  // Trailing bytes declared as part of the zero bitmap: both bitmaps still
  // parse, but the lengths do not match.
  t = s + std::string(5, '\0');
  put_le<uint32_t>(t, kOffZeroLen, get_le<uint32_t>(s, kOffZeroLen) + 5);
  reseal(t);
  EXPECT_FALSE(decodes(t, id, &m, &why));
  EXPECT_NE(why.find("do not fill"), std::string::npos) << why;
}

TEST(LayerDiffTrailer, RoundTripAndRefusals) {
  const LayerId id = test_id();
  const std::string t = encode_diff_trailer(id);
  ASSERT_EQ(t.size(), kDiffTrailerSize);
  std::string why;
  EXPECT_TRUE(decode_diff_trailer(u8(t), t.size(), id, &why)) << why;
  EXPECT_FALSE(decode_diff_trailer(u8(t), 10, id, &why));
  EXPECT_NE(why.find("truncated"), std::string::npos) << why;
  LayerId other = id;
  other.layer_tag ^= 0x100;
  EXPECT_FALSE(decode_diff_trailer(u8(t), t.size(), other, &why));
  EXPECT_NE(why.find("different layer"), std::string::npos) << why;
  // A map slot is not a trailer, nor the other way round.
  const std::string slot = encode_map_slot(id, 1, Roaring(), Roaring());
  EXPECT_FALSE(decode_diff_trailer(u8(slot), slot.size(), id, &why));
  EXPECT_NE(why.find("magic"), std::string::npos) << why;
  BlockMap m;
  EXPECT_FALSE(decode_map_slot(u8(t), t.size(), id, &m, &why));
  EXPECT_NE(why.find("magic"), std::string::npos) << why;
  for (size_t i = 0; i < 64; ++i) {
    std::string bad = t;
    bad[i] ^= 0x20;
    EXPECT_FALSE(decode_diff_trailer(u8(bad), bad.size(), id, &why)) << "byte " << i;
  }
}

TEST(LayerDiffTrailer, DurableSeqRoundTripsAndIsChecksummed) {
  const LayerId id = test_id();
  std::string why;
  uint64_t seq = 99;
  const std::string old = encode_diff_trailer(id);  // as layers before the field
  ASSERT_TRUE(decode_diff_trailer(u8(old), old.size(), id, &why, &seq)) << why;
  EXPECT_EQ(seq, 0u);
  const std::string t = encode_diff_trailer(id, 12345);
  ASSERT_TRUE(decode_diff_trailer(u8(t), t.size(), id, &why, &seq)) << why;
  EXPECT_EQ(seq, 12345u);
  EXPECT_EQ(get_le<uint64_t>(t, kOffSeq), 12345u);
  EXPECT_EQ(trailer_header(id, 12345), t.substr(0, kMapHeaderSize));
  std::string bad = t;
  put_le<uint64_t>(bad, kOffSeq, 12346);
  EXPECT_FALSE(decode_diff_trailer(u8(bad), bad.size(), id, &why));
  EXPECT_NE(why.find("checksum"), std::string::npos) << why;
}

TEST(LayerTags, GenerationTagIsStableAndNewLayerTagIsNonZero) {
  EXPECT_EQ(generation_tag("a", "b"), generation_tag("a", "b"));
  EXPECT_NE(generation_tag("a", "b"), generation_tag("a", "c"));
  EXPECT_NE(new_layer_tag(), 0u);
  EXPECT_NE(new_layer_tag(), new_layer_tag());
}

// The slot stride must hold the largest pair of maps the codec can produce,
// or store_map writes past its slot into the other one. Worst case: both
// maps a bitset in every container (disjoint: alternate bits), plus one run
// container each, which switches the portable format to its run layout
// (one flag bit per container instead of a 4-byte count).
TEST(LayerMapSlot, StrideHoldsWorstCaseMaps) {
  for (uint64_t containers : {1u, 4u, 57u, 250u}) {
    const uint64_t blocks = containers * 65536;
    Roaring dirty, zero;
    for (uint64_t c = 0; c < containers; ++c) {
      const uint32_t base = uint32_t(c * 65536);
      if (c == 0) {
        // 2047 runs of 3 in each map: a run container of 8190 bytes,
        // smaller than the 8192-byte bitset.
        for (uint32_t r = 0; r < 2047; ++r) {
          dirty.addRange(base + r * 8, base + r * 8 + 3);
          zero.addRange(base + r * 8 + 4, base + r * 8 + 7);
        }
      } else {
        for (uint32_t i = 0; i < 65536; i += 2) {
          dirty.add(base + i);
          zero.add(base + i + 1);
        }
      }
    }
    dirty.runOptimize();
    zero.runOptimize();
    const LayerId id = test_id(blocks, 512);
    const std::string slot = encode_map_slot(id, 1, dirty, zero);
    EXPECT_LE(slot.size(), slot_stride(blocks))
        << containers << " containers: a " << slot.size() << "-byte slot, stride "
        << slot_stride(blocks);
  }
}

// ---------------------------------------------------------------------------
// Files.

class LayerFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "layer_file_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr) << strerror(errno);
    dir_ = tmpl;
  }
  void TearDown() override {
    for (int fd : fds_) ::close(fd);
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  int open_rw(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    EXPECT_GE(fd, 0) << path << ": " << strerror(errno);
    if (fd >= 0) fds_.push_back(fd);
    return fd;
  }

  struct Layer {
    std::string diff, map;
    int dfd = -1, mfd = -1;
  };
  Layer create(const std::string& name, const LayerId& id) {
    Layer l{dir_ + "/" + name + ".diff", dir_ + "/" + name + ".bitmap"};
    std::string err;
    EXPECT_TRUE(create_layer(l.diff, l.map, id, &err)) << err;
    l.dfd = open_rw(l.diff);
    l.mfd = open_rw(l.map);
    return l;
  }

  static void pwrite_all(int fd, const std::string& s, uint64_t off) {
    ASSERT_EQ(::pwrite(fd, s.data(), s.size(), off_t(off)), ssize_t(s.size())) << strerror(errno);
  }
  static std::string pread_n(int fd, size_t n, uint64_t off) {
    std::string s(n, '\0');
    ssize_t r = ::pread(fd, s.data(), n, off_t(off));
    s.resize(r < 0 ? 0 : size_t(r));
    return s;
  }

  std::string dir_;
  std::vector<int> fds_;
};

TEST_F(LayerFileTest, CreateThenLoad) {
  const LayerId id = test_id(100);
  Layer l = create("n", id);
  struct stat st;
  ASSERT_EQ(fstat(l.dfd, &st), 0);
  EXPECT_EQ(uint64_t(st.st_size), id.size + kDiffTrailerSize);
  BlockMap m;
  std::string err;
  ASSERT_TRUE(load_layer(l.dfd, l.mfd, id, &m, &err)) << err;
  EXPECT_TRUE(m.dirty.isEmpty());
  EXPECT_TRUE(m.zero.isEmpty());
  // load_map with layer tag 0 finds the tag.
  LayerId any = id, found;
  any.layer_tag = 0;
  BlockMap m2;
  ASSERT_TRUE(load_map(l.mfd, any, &m2, &found, &err)) << err;
  EXPECT_EQ(found, id);
  EXPECT_EQ(m2.seq, m.seq);
  // Creating again replaces the layer.
  Layer again = create("n", id);
  ASSERT_TRUE(load_layer(again.dfd, again.mfd, id, &m2, &err)) << err;
}

TEST_F(LayerFileTest, StoreMapAlternatesSlots) {
  const LayerId id = test_id(5000);
  const uint64_t stride = slot_stride(id.blocks());
  Layer l = create("n", id);
  BlockMap m;
  std::string err;
  ASSERT_TRUE(load_layer(l.dfd, l.mfd, id, &m, &err)) << err;
  std::mt19937_64 rng(3);
  for (int i = 0; i < 8; ++i) {
    random_maps(rng, id.blocks(), &m.dirty, &m.zero);
    const uint64_t before = m.seq;
    ASSERT_TRUE(store_map(l.mfd, id, &m, &err)) << err;
    EXPECT_EQ(m.seq, before + 1);
    // The new map is in one slot, the previous in the other.
    std::string slot = pread_n(l.mfd, size_t(stride), (m.seq % 2) * stride);
    std::string prev = pread_n(l.mfd, size_t(stride), ((m.seq + 1) % 2) * stride);
    BlockMap a, b;
    std::string why;
    ASSERT_TRUE(decodes(slot, id, &a, &why)) << why;
    EXPECT_EQ(a.seq, m.seq);
    EXPECT_TRUE(a.dirty == m.dirty && a.zero == m.zero);
    if (before > 0) {
      ASSERT_TRUE(decodes(prev, id, &b, &why)) << "previous slot: " << why;
      EXPECT_EQ(b.seq, before);
    }
    BlockMap loaded;
    ASSERT_TRUE(load_layer(l.dfd, l.mfd, id, &loaded, &err)) << err;
    EXPECT_EQ(loaded.seq, m.seq);
    EXPECT_TRUE(loaded.dirty == m.dirty && loaded.zero == m.zero);
  }
}

TEST_F(LayerFileTest, LoadFallsBackWhenNewestSlotIsTorn) {
  const LayerId id = test_id(5000);
  const uint64_t stride = slot_stride(id.blocks());
  Layer l = create("n", id);
  BlockMap m;
  std::string err;
  ASSERT_TRUE(load_layer(l.dfd, l.mfd, id, &m, &err)) << err;
  m.dirty.addRange(0, 100);
  ASSERT_TRUE(store_map(l.mfd, id, &m, &err)) << err;
  const BlockMap older = m;
  m.dirty.addRange(100, 300);
  m.zero.addRange(1000, 1200);
  ASSERT_TRUE(store_map(l.mfd, id, &m, &err)) << err;
  const BlockMap newest = m;
  const uint64_t newest_at = (newest.seq % 2) * stride, older_at = (older.seq % 2) * stride;

  BlockMap got;
  OtherSlot other;
  ASSERT_TRUE(load_layer(l.dfd, l.mfd, id, &got, &err)) << err;
  EXPECT_EQ(got.seq, newest.seq);
  ASSERT_TRUE(load_map(l.mfd, id, &got, nullptr, &err, &other)) << err;
  EXPECT_TRUE(other.written && other.valid);
  EXPECT_EQ(other.served, newest_at ? 'B' : 'A');

  // Tear the newest: only its first half reached the disk over older bytes.
  const std::string slot = encode_map_slot(id, newest.seq, newest.dirty, newest.zero);
  pwrite_all(l.mfd, std::string(slot.size(), '\x5a'), newest_at);
  pwrite_all(l.mfd, slot.substr(0, slot.size() / 2), newest_at);
  ASSERT_TRUE(load_layer(l.dfd, l.mfd, id, &got, &err)) << err;
  EXPECT_EQ(got.seq, older.seq);
  EXPECT_TRUE(got.dirty == older.dirty && got.zero == older.zero);
  // The caller learns which slot was rejected, and why.
  ASSERT_TRUE(load_map(l.mfd, id, &got, nullptr, &err, &other)) << err;
  EXPECT_EQ(other.name, newest_at ? 'B' : 'A');
  EXPECT_EQ(other.served, older_at ? 'B' : 'A');
  EXPECT_TRUE(other.written);
  EXPECT_FALSE(other.valid);
  EXPECT_NE(other.why.find("bitmap slot"), std::string::npos) << other.why;

  // One flipped payload byte in the newest.
  pwrite_all(l.mfd, slot, newest_at);
  pwrite_all(l.mfd, std::string(1, char(slot[70] ^ 1)), newest_at + 70);
  ASSERT_TRUE(load_map(l.mfd, id, &got, nullptr, &err)) << err;
  EXPECT_EQ(got.seq, older.seq);

  // The newest intact, the older corrupt: the newest.
  pwrite_all(l.mfd, slot, newest_at);
  pwrite_all(l.mfd, std::string("\xff"), older_at + 60);
  ASSERT_TRUE(load_map(l.mfd, id, &got, nullptr, &err)) << err;
  EXPECT_EQ(got.seq, newest.seq);
  EXPECT_TRUE(got.dirty == newest.dirty && got.zero == newest.zero);

  // Both bad: refused, with both reasons.
  pwrite_all(l.mfd, std::string("\xff"), newest_at + 60);
  EXPECT_FALSE(load_layer(l.dfd, l.mfd, id, &got, &err));
  EXPECT_NE(err.find("slot A"), std::string::npos) << err;
  EXPECT_NE(err.find("slot B"), std::string::npos) << err;
  EXPECT_NE(err.find("checksum"), std::string::npos) << err;
}

TEST_F(LayerFileTest, NewLayerHasANeverWrittenSlotAndDurableSeqInTrailer) {
  const LayerId id = test_id(100);
  Layer l = create("n", id);
  BlockMap m;
  OtherSlot other;
  std::string err;
  ASSERT_TRUE(load_map(l.mfd, id, &m, nullptr, &err, &other)) << err;
  EXPECT_EQ(m.seq, 1u);
  EXPECT_FALSE(other.written);  // the first map goes to B; A is blank
  uint64_t durable = 7;
  ASSERT_TRUE(load_layer(l.dfd, l.mfd, id, &m, &err, &durable)) << err;
  EXPECT_EQ(durable, 0u);
  ASSERT_TRUE(note_durable_map(l.dfd, id, 5));
  ASSERT_TRUE(load_layer(l.dfd, l.mfd, id, &m, &err, &durable)) << err;
  EXPECT_EQ(durable, 5u);
}

TEST_F(LayerFileTest, NewestLogSeqSeesBothRegionsOfItsLayerOnly) {
  const std::string path = dir_ + "/n.log";
  std::string err;
  const int fd = open_map_log(path, &err);
  ASSERT_GE(fd, 0) << err;
  fds_.push_back(fd);
  ASSERT_TRUE(reset_map_log(fd, path, &err)) << err;
  const uint64_t tag = 0x77, boot = 1;
  EXPECT_EQ(newest_log_seq(fd, tag), 0u);
  const MapChange c{MapChange::kDirty, 3, 9};
  // Region 0: seq 4, then an older record of seq 2 behind it.
  pwrite_all(fd, encode_log_record(c, 4, tag, boot) + encode_log_record(c, 2, tag, boot), 0);
  // Region 1: seq 5 of the layer (another boot), behind a record of another layer.
  pwrite_all(fd, encode_log_record(c, 9, tag + 1, boot) + encode_log_record(c, 5, tag, boot + 1),
             kLogRegionSize);
  EXPECT_EQ(newest_log_seq(fd, tag), 5u);
  EXPECT_EQ(newest_log_seq(fd, tag + 1), 9u);
  // A torn record counts for nothing.
  std::string torn = encode_log_record(c, 7, tag, boot);
  torn[20] ^= 1;
  pwrite_all(fd, torn, kLogRegionSize + 2 * kLogRecordSize);
  EXPECT_EQ(newest_log_seq(fd, tag), 5u);
}

TEST_F(LayerFileTest, LoadPicksHighestSequenceEitherWay) {
  const LayerId id = test_id(64);
  const uint64_t stride = slot_stride(id.blocks());
  Layer l = create("n", id);
  Roaring d1, d2;
  d1.add(1);
  d2.add(2);
  // Higher sequence in slot A, then in slot B.
  for (auto [a, b] : {std::pair<uint64_t, uint64_t>{8, 7}, {10, 11}}) {
    pwrite_all(l.mfd, encode_map_slot(id, a, d1, Roaring()), 0);
    pwrite_all(l.mfd, encode_map_slot(id, b, d2, Roaring()), stride);
    BlockMap got;
    std::string err;
    ASSERT_TRUE(load_map(l.mfd, id, &got, nullptr, &err)) << err;
    EXPECT_EQ(got.seq, std::max(a, b));
    EXPECT_TRUE(got.dirty == (a > b ? d1 : d2));
  }
}

TEST_F(LayerFileTest, MapOfAnotherGeometryIsRefused) {
  const LayerId id = test_id(64);
  Layer l = create("n", id);
  LayerId other = id;
  other.size = 65 * other.block_size;
  BlockMap got;
  std::string err;
  EXPECT_FALSE(load_map(l.mfd, other, &got, nullptr, &err));
  EXPECT_FALSE(err.empty());
}

TEST_F(LayerFileTest, TruncatedDiffIsRefused) {
  const LayerId id = test_id(64);
  Layer l = create("n", id);
  for (uint64_t len : {id.size + kDiffTrailerSize - 1, id.size, uint64_t(0)}) {
    ASSERT_EQ(ftruncate(l.dfd, off_t(len)), 0);
    BlockMap m;
    std::string err;
    EXPECT_FALSE(load_layer(l.dfd, l.mfd, id, &m, &err)) << len;
    EXPECT_NE(err.find("truncated"), std::string::npos) << err;
  }
  // Too long is foreign too.
  ASSERT_EQ(ftruncate(l.dfd, off_t(id.size + kDiffTrailerSize + 4096)), 0);
  BlockMap m;
  std::string err;
  EXPECT_FALSE(load_layer(l.dfd, l.mfd, id, &m, &err));
}

TEST_F(LayerFileTest, MissingTrailerIsRefused) {
  const LayerId id = test_id(64);
  Layer l = create("n", id);
  pwrite_all(l.dfd, std::string(kDiffTrailerSize, '\0'), id.size);
  BlockMap m;
  std::string err;
  EXPECT_FALSE(load_layer(l.dfd, l.mfd, id, &m, &err));
  EXPECT_NE(err.find("never written"), std::string::npos) << err;
  pwrite_all(l.dfd, std::string(kDiffTrailerSize, 'D'), id.size);  // data where the trailer was
  EXPECT_FALSE(load_layer(l.dfd, l.mfd, id, &m, &err));
  EXPECT_NE(err.find("magic"), std::string::npos) << err;
}

TEST_F(LayerFileTest, DiffOfAnotherLayerIsRefused) {
  const LayerId x = test_id(64);
  LayerId y = x;
  y.layer_tag = x.layer_tag + 1;
  Layer lx = create("x", x), ly = create("y", y);
  BlockMap m;
  std::string err;
  EXPECT_FALSE(load_layer(ly.dfd, lx.mfd, x, &m, &err));  // y's diff, x's map
  EXPECT_NE(err.find("different layer"), std::string::npos) << err;
  EXPECT_FALSE(load_layer(lx.dfd, ly.mfd, x, &m, &err));  // x's diff, y's map
  EXPECT_NE(err.find("different layer"), std::string::npos) << err;
  // Another base image.
  LayerId z = x;
  z.base_tag = generation_tag("img", "other");
  Layer lz = create("z", z);
  EXPECT_FALSE(load_layer(lz.dfd, lz.mfd, x, &m, &err));
  EXPECT_NE(err.find("different base"), std::string::npos) << err;
  ASSERT_TRUE(load_layer(lx.dfd, lx.mfd, x, &m, &err)) << err;
}

TEST_F(LayerFileTest, CreateReportsPathOnFailure) {
  std::string err;
  EXPECT_FALSE(create_layer(dir_ + "/missing/n.diff", dir_ + "/missing/n.bitmap", test_id(8), &err));
  EXPECT_NE(err.find("missing/n.diff"), std::string::npos) << err;
}

}  // namespace
}  // namespace storage
