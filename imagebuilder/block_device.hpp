// Block sources that libext2fs reads and writes through device_io (a
// custom io_manager), so that imagebuilder can open any generation, and
// write a new delta generation, without materialising an image file.
//
//   FileDevice       a plain image file (full generations, flattening)
//   GenerationChain  a generation as stored, read-only: block i comes from
//                    the first level, top down, whose layer holds it (set in
//                    `dirty`: the layer's diff; in `zero`: zeros), ending at
//                    a full image.ext4. A generation directory that holds
//                    image.ext4 is full whatever else it holds.
//   LayerWriter      a new layer over a GenerationChain. A written block is
//                    compared with what the chain below holds: equal blocks
//                    stay clean (shared), all-zero blocks are marked `zero`,
//                    others go to the diff and are marked `dirty`.
//
// Devices are used by one thread. The first error is kept (sticky) with its
// message, so the builder can report it instead of libext2fs's generic code.
#pragma once

#include "status.hpp"

#include "storage/layer_file.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace ib {

class Store;

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;
  virtual uint64_t size() const = 0;
  // Byte ranges within [0, size()). Return an errno value, 0 on success.
  virtual int read(uint64_t offset, void* buf, size_t len) = 0;
  virtual int write(uint64_t offset, const void* buf, size_t len) = 0;
  virtual int flush() = 0;
  // The first failure, with path and cause; empty if none.
  const std::string& error() const { return error_; }

 protected:
  int fail(int err, const std::string& what);
  std::string error_;
};

class FileDevice : public BlockDevice {
 public:
  // Opens an existing file; `writable` false refuses writes.
  static Result<std::unique_ptr<FileDevice>> open(const std::string& path, bool writable);
  ~FileDevice() override;
  uint64_t size() const override { return size_; }
  int read(uint64_t offset, void* buf, size_t len) override;
  int write(uint64_t offset, const void* buf, size_t len) override;
  int flush() override;

 private:
  FileDevice(std::string path, int fd, uint64_t size, bool writable)
      : path_(std::move(path)), fd_(fd), size_(size), writable_(writable) {}
  std::string path_;
  int fd_;
  uint64_t size_;
  bool writable_;
};

class GenerationChain : public BlockDevice {
 public:
  struct Level {
    std::string gen;
    std::string path;  // image.ext4 or layer.diff
    int fd = -1;
    bool full = false;
    storage::LayerId id;
    storage::BlockMap map;  // layers only
  };
  // Where a block's bytes are: level index and offset in its file, or zero.
  struct Where {
    int level = -1;  // -1: reads as zeros
    uint64_t offset = 0;
  };

  // Opens `gen` of `image` and every parent it needs. Each layer's diff and
  // bitmap are validated (load_layer) against the deterministic tags.
  static Result<std::unique_ptr<GenerationChain>> open(const Store& store, const std::string& image,
                                                       const std::string& gen);
  ~GenerationChain() override;
  uint64_t size() const override { return size_; }
  uint32_t block_size() const { return block_size_; }
  int read(uint64_t offset, void* buf, size_t len) override;
  int write(uint64_t, const void*, size_t) override { return EROFS; }
  int flush() override { return 0; }

  Where locate(uint64_t block) const;
  int read_block(uint64_t block, void* buf);
  const std::vector<Level>& levels() const { return levels_; }

 private:
  GenerationChain() = default;
  Status add_level(const Store& store, const std::string& image, const std::string& gen,
                   std::string* parent);
  std::vector<Level> levels_;  // [0] is the generation itself; the last one is full
  uint64_t size_ = 0;
  uint32_t block_size_ = 4096;
};

class LayerWriter : public BlockDevice {
 public:
  // Creates layer.diff and layer.bitmap in `dir` for a layer `id` over
  // `below` (which it owns and which must have the same size).
  static Result<std::unique_ptr<LayerWriter>> create(const std::string& dir,
                                                     const storage::LayerId& id,
                                                     std::unique_ptr<GenerationChain> below);
  ~LayerWriter() override;
  uint64_t size() const override { return id_.size; }
  int read(uint64_t offset, void* buf, size_t len) override;
  int write(uint64_t offset, const void* buf, size_t len) override;
  int flush() override { return 0; }
  // Makes the diff and then the map durable.
  Status commit();
  uint64_t blocks_stored() const { return map_.dirty.cardinality() + map_.zero.cardinality(); }
  // The blocks this layer changed (dirty or zero).
  const storage::BlockMap& map() const { return map_; }
  GenerationChain& below() { return *below_; }

 private:
  LayerWriter() = default;
  int read_block(uint64_t block, uint8_t* buf);
  int write_block(uint64_t block, const uint8_t* data);
  std::string dir_;
  int diff_fd_ = -1;
  int map_fd_ = -1;
  storage::LayerId id_;
  storage::BlockMap map_;
  std::unique_ptr<GenerationChain> below_;
  std::vector<uint8_t> scratch_;
};

}  // namespace ib
