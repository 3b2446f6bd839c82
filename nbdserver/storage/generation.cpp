#include "storage/generation.hpp"

#include "storage/json_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace storage {
namespace {

constexpr size_t kMaxChain = 64;

struct Manifest {
  std::string parent;
  uint64_t size = 0;
  uint32_t block_size = 4096;
};

bool read_manifest(const std::string& path, Manifest* m, std::string* err) {
  nlohmann::json j;
  if (!read_json_object(path, &j, err)) return false;
  if (!j.contains("size") || !j["size"].is_number_unsigned()) {
    *err = path + ": no \"size\"";
    return false;
  }
  m->size = j["size"].get<uint64_t>();
  if (j.contains("block_size") && j["block_size"].is_number_unsigned())
    m->block_size = j["block_size"].get<uint32_t>();
  if (j.contains("parent") && j["parent"].is_string()) m->parent = j["parent"].get<std::string>();
  if (m->block_size < 512 || (m->block_size & (m->block_size - 1)) || m->size % m->block_size) {
    *err = path + ": size " + std::to_string(m->size) + " and block size " +
           std::to_string(m->block_size) + " are not consistent";
    return false;
  }
  if (!m->parent.empty() && !valid_store_name(m->parent)) {
    *err = path + ": bad parent name";
    return false;
  }
  return true;
}

bool exists(const std::string& p) { return access(p.c_str(), F_OK) == 0; }

}  // namespace

std::string current_generation(const std::string& store, const std::string& image,
                               std::string* err) {
  const std::string link = store + "/images/" + image + "/current";
  char buf[512];
  ssize_t n = readlink(link.c_str(), buf, sizeof buf - 1);
  if (n < 0) {
    *err = errno == ENOENT ? "image '" + image + "' has no published generation"
                           : link + ": " + strerror(errno);
    return {};
  }
  std::string target(buf, size_t(n));
  std::string gen = target.substr(target.rfind('/') + 1);
  if (!valid_store_name(gen)) {
    *err = link + ": points to a bad name '" + target + "'";
    return {};
  }
  return gen;
}

Generation::~Generation() {
  for (int fd : delta_fds_) ::close(fd);
}

std::shared_ptr<Generation> Generation::open(const std::string& store, const std::string& image,
                                             const std::string& gen, std::string* err) {
  std::shared_ptr<Generation> g(new Generation());
  g->image_ = image;
  g->gen_ = gen;
  std::vector<BlockMap> maps;
  std::string name = gen;
  for (size_t depth = 0;; ++depth) {
    const std::string dir = store + "/images/" + image + "/generations/" + name;
    if (depth == kMaxChain) {
      *err = dir + ": chain of more than " + std::to_string(kMaxChain) + " delta layers";
      return nullptr;
    }
    Manifest m;
    if (!read_manifest(dir + "/manifest.json", &m, err)) return nullptr;
    if (depth == 0) {
      g->size_ = m.size;
      g->block_size_ = m.block_size;
    } else if (m.size != g->size_ || m.block_size != g->block_size_) {
      *err = dir + ": size or block size differs from its child generation";
      return nullptr;
    }
    if (exists(dir + "/image.ext4")) {
      g->full_ = ImageFile::open(dir + "/image.ext4", true, err);
      if (!g->full_) return nullptr;
      if (g->full_->size() < g->size_) {
        *err = dir + "/image.ext4: " + std::to_string(g->full_->size()) +
               " bytes, the manifest says " + std::to_string(g->size_);
        return nullptr;
      }
      break;
    }
    if (m.parent.empty()) {
      *err = dir + ": no image.ext4 and no parent generation";
      return nullptr;
    }
    LayerId id{g->block_size_, g->size_, generation_tag(image, m.parent),
               generation_tag(image, name)};
    int dfd = ::open((dir + "/layer.diff").c_str(), O_RDONLY | O_CLOEXEC);
    int mfd = dfd < 0 ? -1 : ::open((dir + "/layer.bitmap").c_str(), O_RDONLY | O_CLOEXEC);
    if (dfd < 0 || mfd < 0) {
      *err = dir + ": cannot open the delta layer: " + strerror(errno);
      if (dfd >= 0) ::close(dfd);
      return nullptr;
    }
    BlockMap map;
    bool ok = load_layer(dfd, mfd, id, &map, err);
    ::close(mfd);
    if (!ok) {
      *err = dir + ": " + *err;
      ::close(dfd);
      return nullptr;
    }
    g->delta_fds_.push_back(dfd);
    maps.push_back(std::move(map));
    name = m.parent;
  }
  g->stack_ = std::make_shared<const LayerStack>(std::move(maps));
  return g;
}

}  // namespace storage
