// One immutable image generation in the store, open for serving.
//
// A generation directory holds either a full image (image.ext4) or a delta
// layer (layer.diff + layer.bitmap, layer_file.hpp) over its parent
// generation, named in manifest.json. Opening a delta generation opens its
// whole chain down to a full image. Nothing here changes after open(), so
// any thread may read it; the descriptors are shared by every loop (reads
// of immutable files need no per-loop descriptor).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "storage/image_file.hpp"
#include "storage/names.hpp"
#include "storage/overlay.hpp"

namespace storage {

class Generation {
 public:
  // Opens images/<image>/generations/<gen> under `store`, with its chain.
  // Returns nullptr and sets *err (naming the file and the cause) when any
  // layer is missing, corrupt or does not match its parent.
  static std::shared_ptr<Generation> open(const std::string& store, const std::string& image,
                                          const std::string& gen, std::string* err);
  ~Generation();
  Generation(const Generation&) = delete;
  Generation& operator=(const Generation&) = delete;

  const std::string& image() const { return image_; }
  const std::string& name() const { return gen_; }
  uint64_t size() const { return size_; }
  uint32_t block_size() const { return block_size_; }
  uint64_t tag() const { return generation_tag(image_, gen_); }
  // The bottom of the chain: the full image file.
  const std::shared_ptr<ImageFile>& full() const { return full_; }
  // The delta layers' block maps, newest first, for Overlay.
  const std::shared_ptr<const LayerStack>& stack() const { return stack_; }
  // The descriptor to read layer k from (k == deltas: the full image).
  int layer_fd(size_t k) const { return k < delta_fds_.size() ? delta_fds_[k] : full_->fd(); }
  size_t deltas() const { return delta_fds_.size(); }

 private:
  Generation() = default;
  std::string image_, gen_;
  uint64_t size_ = 0;
  uint32_t block_size_ = 4096;
  std::shared_ptr<ImageFile> full_;
  std::vector<int> delta_fds_;
  std::shared_ptr<const LayerStack> stack_;
};

// Reads images/<image>/current; returns the generation name or "" with *err.
std::string current_generation(const std::string& store, const std::string& image,
                               std::string* err);

}  // namespace storage
