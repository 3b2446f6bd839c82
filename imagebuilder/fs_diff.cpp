#include "fs_diff.hpp"

#include "block_device.hpp"
#include "device_io.hpp"
#include "util.hpp"

#include <ext2fs/ext2fs.h>

#include <cstring>
#include <map>
#include <memory>
#include <set>

namespace ib {
namespace {

struct Node {
  ext2_ino_t ino = 0;
  uint16_t mode = 0;
  uint32_t uid = 0, gid = 0;
  uint64_t size = 0;
  uint32_t mtime = 0, mtime_extra = 0;
  uint32_t block0 = 0, block1 = 0;  // devices: the encoded number
  uint64_t xattr_hash = 0;
  bool operator==(const Node& o) const {
    return mode == o.mode && uid == o.uid && gid == o.gid && size == o.size &&
           mtime == o.mtime && mtime_extra == o.mtime_extra && block0 == o.block0 &&
           block1 == o.block1 && xattr_hash == o.xattr_hash;
  }
};

// One generation opened read-only.
class Generation {
 public:
  static Result<std::unique_ptr<Generation>> open(const Store& store, const std::string& image,
                                                  const std::string& gen) {
    auto chain = GenerationChain::open(store, image, gen);
    if (!chain) return chain.status();
    std::unique_ptr<Generation> g(new Generation());
    g->name_ = image + "@" + gen;
    g->chain_ = std::move(*chain);
    errcode_t r = ext2fs_open2(device_name(g->chain_.get()).c_str(), nullptr, EXT2_FLAG_64BITS, 0,
                               0, device_io_manager(), &g->fs_);
    if (r) return Status::fail(ext2_message(g->name_ + ": open filesystem", r));
    return g;
  }
  ~Generation() {
    if (fs_) ext2fs_close_free(&fs_);
  }

  Status walk(std::map<std::string, Node>* out) { return walk_dir(EXT2_ROOT_INO, "", out); }

  // Physical blocks of a file, in logical order, with holes as 0.
  Result<std::vector<std::pair<uint64_t, uint64_t>>> blocks(ext2_ino_t ino) {
    std::vector<std::pair<uint64_t, uint64_t>> v;  // logical, physical
    errcode_t r = ext2fs_block_iterate3(
        fs_, ino, BLOCK_FLAG_DATA_ONLY | BLOCK_FLAG_READ_ONLY, nullptr,
        [](ext2_filsys, blk64_t* blk, e2_blkcnt_t lblk, blk64_t, int, void* priv) -> int {
          static_cast<std::vector<std::pair<uint64_t, uint64_t>>*>(priv)->emplace_back(
              uint64_t(lblk), uint64_t(*blk));
          return 0;
        },
        &v);
    if (r) return Status::fail(ext2_message(name_ + ": block map of inode " + std::to_string(ino), r));
    return v;
  }

  // The whole contents of a regular file or symlink.
  Result<std::string> contents(ext2_ino_t ino) {
    struct ext2_inode in;
    errcode_t r = ext2fs_read_inode(fs_, ino, &in);
    if (r) return Status::fail(ext2_message(name_ + ": read inode", r));
    if (LINUX_S_ISLNK(in.i_mode) && ext2fs_is_fast_symlink(&in))
      return std::string(reinterpret_cast<const char*>(in.i_block), EXT2_I_SIZE(&in));
    ext2_file_t f;
    r = ext2fs_file_open(fs_, ino, 0, &f);
    if (r) return Status::fail(ext2_message(name_ + ": open inode", r));
    std::string out;
    std::vector<char> buf(1 << 20);
    for (;;) {
      unsigned int got = 0;
      r = ext2fs_file_read(f, buf.data(), unsigned(buf.size()), &got);
      if (r || got == 0) break;
      out.append(buf.data(), got);
    }
    ext2fs_file_close(f);
    if (r) return Status::fail(ext2_message(name_ + ": read inode", r));
    return out;
  }

  GenerationChain& chain() { return *chain_; }

 private:
  Generation() = default;

  Status walk_dir(ext2_ino_t dir, const std::string& prefix, std::map<std::string, Node>* out) {
    std::vector<std::pair<std::string, ext2_ino_t>> kids;
    errcode_t r = ext2fs_dir_iterate2(
        fs_, dir, 0, nullptr,
        [](ext2_ino_t, int, struct ext2_dir_entry* d, int, int, char*, void* priv) -> int {
          std::string n(d->name, ext2fs_dirent_name_len(d));
          if (n != "." && n != "..")
            static_cast<std::vector<std::pair<std::string, ext2_ino_t>>*>(priv)->emplace_back(n, d->inode);
          return 0;
        },
        &kids);
    if (r) return Status::fail(ext2_message(name_ + ": read directory /" + prefix, r));
    if (prefix.empty()) {
      auto root = node(EXT2_ROOT_INO);
      if (!root) return root.status();
      (*out)[""] = *root;
    }
    for (auto& [name, ino] : kids) {
      std::string path = prefix.empty() ? name : prefix + "/" + name;
      auto n = node(ino);
      if (!n) return n.status();
      (*out)[path] = *n;
      if (LINUX_S_ISDIR(n->mode)) {
        Status s = walk_dir(ino, path, out);
        if (!s) return s;
      }
    }
    return Status();
  }

  Result<Node> node(ext2_ino_t ino) {
    std::vector<char> buf(EXT2_INODE_SIZE(fs_->super), 0);
    auto* in = reinterpret_cast<ext2_inode_large*>(buf.data());
    errcode_t r = ext2fs_read_inode_full(fs_, ino, reinterpret_cast<ext2_inode*>(in), int(buf.size()));
    if (r) return Status::fail(ext2_message(name_ + ": read inode " + std::to_string(ino), r));
    Node n;
    n.ino = ino;
    n.mode = in->i_mode;
    n.uid = inode_uid(*in);
    n.gid = inode_gid(*in);
    n.size = LINUX_S_ISDIR(in->i_mode) ? 0 : EXT2_I_SIZE(in);
    n.mtime = in->i_mtime;
    n.mtime_extra = in->i_extra_isize >= 8 ? in->i_mtime_extra : 0;
    if (LINUX_S_ISCHR(in->i_mode) || LINUX_S_ISBLK(in->i_mode)) {
      n.block0 = in->i_block[0];
      n.block1 = in->i_block[1];
    }
    n.xattr_hash = xattr_hash(ino);
    return n;
  }

  uint64_t xattr_hash(ext2_ino_t ino) {
    struct ext2_xattr_handle* h = nullptr;
    uint64_t hash = fnv1a("xattrs");
    if (ext2fs_xattrs_open(fs_, ino, &h)) return hash;
    if (!ext2fs_xattrs_read(h)) {
      std::map<std::string, std::string> all;
      ext2fs_xattrs_iterate(
          h,
          [](char* name, char* value, size_t len, void* priv) -> int {
            (*static_cast<std::map<std::string, std::string>*>(priv))[name] = std::string(value, len);
            return 0;
          },
          &all);
      for (auto& [k, v] : all) hash = fnv1a(v, fnv1a(k + '\0', hash));
    }
    ext2fs_xattrs_close(&h);
    return hash;
  }

  std::string name_;
  std::unique_ptr<GenerationChain> chain_;
  ext2_filsys fs_ = nullptr;
};

// Same stored bytes for every block of both files, without reading them.
bool same_storage(Generation& a, Generation& b,
                  const std::vector<std::pair<uint64_t, uint64_t>>& ba,
                  const std::vector<std::pair<uint64_t, uint64_t>>& bb) {
  if (ba != bb) return false;
  const auto& la = a.chain().levels();
  const auto& lb = b.chain().levels();
  for (auto& [logical, phys] : ba) {
    auto wa = a.chain().locate(phys);
    auto wb = b.chain().locate(phys);
    if ((wa.level < 0) != (wb.level < 0)) return false;
    if (wa.level < 0) continue;
    if (la[size_t(wa.level)].gen != lb[size_t(wb.level)].gen || wa.offset != wb.offset) return false;
  }
  return true;
}

Result<bool> same_contents(Generation& a, Generation& b, const Node& na, const Node& nb) {
  if (!LINUX_S_ISREG(na.mode) && !LINUX_S_ISLNK(na.mode)) return true;
  auto ba = a.blocks(na.ino);
  auto bb = b.blocks(nb.ino);
  if (!ba) return ba.status();
  if (!bb) return bb.status();
  if (same_storage(a, b, *ba, *bb)) return true;
  auto ca = a.contents(na.ino);
  auto cb = b.contents(nb.ino);
  if (!ca) return ca.status();
  if (!cb) return cb.status();
  return *ca == *cb;
}

}  // namespace

Result<std::vector<std::string>> diff_generations(const Store& store, const std::string& image,
                                                  const std::string& a, const std::string& b) {
  auto ga = Generation::open(store, image, a);
  if (!ga) return ga.status();
  auto gb = Generation::open(store, image, b);
  if (!gb) return gb.status();
  std::map<std::string, Node> ta, tb;
  Status s = (*ga)->walk(&ta);
  if (s) s = (*gb)->walk(&tb);
  if (!s) return s;
  std::vector<std::string> out;
  for (auto& [path, nb] : tb) {
    auto it = ta.find(path);
    if (it == ta.end()) {
      out.push_back("+ /" + path);
      continue;
    }
    bool same = it->second == nb;
    if (same) {
      auto c = same_contents(**ga, **gb, it->second, nb);
      if (!c) return c.status();
      same = *c;
    }
    if (!same) out.push_back("M /" + path);
  }
  for (auto& [path, na] : ta)
    if (!tb.count(path)) out.push_back("- /" + path);
  return out;
}

}  // namespace ib
