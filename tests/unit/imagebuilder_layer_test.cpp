// GenerationChain and LayerWriter against a reference model: a plain byte
// vector per generation. Blocks equal to the base stay shared, zero blocks
// are marked zero, and a chain of layers reads back what was written.
#include "block_device.hpp"
#include "manifest.hpp"
#include "store.hpp"
#include "util.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace ib {
namespace {

constexpr uint32_t kBs = 4096;
constexpr uint64_t kBlocks = 64;

class LayerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ib-layer-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    store_ = std::make_unique<Store>(root_);
    ASSERT_EQ(::system(("mkdir -p " + store_->generations_dir("img")).c_str()), 0);
  }
  void TearDown() override { (void)remove_tree(root_); }

  std::string mkgen(const std::string& gen, std::optional<std::string> parent) {
    std::string dir = store_->generation_dir("img", gen);
    EXPECT_EQ(::mkdir(dir.c_str(), 0755), 0);
    Manifest m;
    m.image = "img";
    m.generation = gen;
    m.parent = parent;
    m.format = parent ? "delta" : "full";
    m.size = kBlocks * kBs;
    EXPECT_TRUE(store_->write_manifest(dir, m).ok());
    return dir;
  }

  std::vector<uint8_t> read_all(BlockDevice& d) {
    std::vector<uint8_t> v(kBlocks * kBs);
    EXPECT_EQ(d.read(0, v.data(), v.size()), 0) << d.error();
    return v;
  }

  std::string root_;
  std::unique_ptr<Store> store_;
  std::mt19937 rng_{42};
};

TEST_F(LayerTest, ChainOfLayersMatchesModel) {
  std::vector<uint8_t> model(kBlocks * kBs);
  for (auto& b : model) b = uint8_t(rng_());
  std::string dir = mkgen("g0", std::nullopt);
  int fd = ::open((dir + "/image.ext4").c_str(), O_WRONLY | O_CREAT, 0644);
  ASSERT_EQ(pwrite(fd, model.data(), model.size(), 0), ssize_t(model.size()));
  ::close(fd);

  std::string parent = "g0";
  for (int layer = 1; layer <= 3; ++layer) {
    std::string gen = "g" + std::to_string(layer);
    std::string gdir = mkgen(gen, parent);
    auto chain = GenerationChain::open(*store_, "img", parent);
    ASSERT_TRUE(chain.ok()) << chain.status().message();
    storage::LayerId id{kBs, kBlocks * kBs, storage::generation_tag("img", parent),
                        storage::generation_tag("img", gen)};
    auto w = LayerWriter::create(gdir, id, std::move(*chain));
    ASSERT_TRUE(w.ok()) << w.status().message();
    // unaligned random writes, a block rewritten with its own bytes, zeros
    for (int i = 0; i < 20; ++i) {
      uint64_t off = rng_() % (model.size() - 9000);
      size_t len = 1 + rng_() % 9000;
      std::vector<uint8_t> data(len);
      for (auto& b : data) b = uint8_t(rng_());
      ASSERT_EQ((*w)->write(off, data.data(), len), 0);
      std::copy(data.begin(), data.end(), model.begin() + long(off));
    }
    std::vector<uint8_t> same(model.begin() + 5 * kBs, model.begin() + 6 * kBs);
    ASSERT_EQ((*w)->write(5 * kBs, same.data(), kBs), 0);
    std::vector<uint8_t> zeros(2 * kBs, 0);
    ASSERT_EQ((*w)->write(10 * kBs, zeros.data(), zeros.size()), 0);
    std::fill(model.begin() + 10 * kBs, model.begin() + 12 * kBs, 0);
    EXPECT_EQ(read_all(**w), model);
    ASSERT_TRUE((*w)->commit().ok());
    EXPECT_LE((*w)->blocks_stored(), 20u * 4 + 2);
    parent = gen;
  }
  auto top = GenerationChain::open(*store_, "img", "g3");
  ASSERT_TRUE(top.ok()) << top.status().message();
  EXPECT_EQ((*top)->levels().size(), 4u);
  EXPECT_EQ(read_all(**top), model);
  EXPECT_LT((*top)->locate(10).level, 0);  // zeroed in the last layer
}

TEST_F(LayerTest, EqualBlocksStayShared) {
  std::string dir = mkgen("g0", std::nullopt);
  std::vector<uint8_t> base(kBlocks * kBs, 7);
  int fd = ::open((dir + "/image.ext4").c_str(), O_WRONLY | O_CREAT, 0644);
  ASSERT_EQ(pwrite(fd, base.data(), base.size(), 0), ssize_t(base.size()));
  ::close(fd);
  std::string gdir = mkgen("g1", "g0");
  auto chain = GenerationChain::open(*store_, "img", "g0");
  ASSERT_TRUE(chain.ok());
  storage::LayerId id{kBs, kBlocks * kBs, storage::generation_tag("img", "g0"),
                      storage::generation_tag("img", "g1")};
  auto w = LayerWriter::create(gdir, id, std::move(*chain));
  ASSERT_TRUE(w.ok());
  ASSERT_EQ((*w)->write(0, base.data(), base.size()), 0);  // rewrite everything, unchanged
  EXPECT_EQ((*w)->blocks_stored(), 0u);
  std::vector<uint8_t> other(kBs, 9);
  ASSERT_EQ((*w)->write(3 * kBs, other.data(), kBs), 0);
  EXPECT_EQ((*w)->blocks_stored(), 1u);
  ASSERT_EQ((*w)->write(3 * kBs, base.data(), kBs), 0);  // written back: shared again
  EXPECT_EQ((*w)->blocks_stored(), 0u);
}

TEST_F(LayerTest, MissingOrForeignLayersAreRejected) {
  mkgen("g0", std::nullopt);
  EXPECT_FALSE(GenerationChain::open(*store_, "img", "g0").ok());  // no image.ext4
  EXPECT_FALSE(GenerationChain::open(*store_, "img", "nope").ok());
}

}  // namespace
}  // namespace ib
