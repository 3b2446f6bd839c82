#include "device_io.hpp"

#include <cinttypes>
#include <cstdio>
#include <cstring>

namespace ib {
namespace {

constexpr const char* kPrefix = "nbdroot-device:";

BlockDevice* dev_of(io_channel ch) { return static_cast<BlockDevice*>(ch->private_data); }

uint64_t byte_len(io_channel ch, int count) {
  return count < 0 ? uint64_t(-int64_t(count)) : uint64_t(count) * uint64_t(ch->block_size);
}

errcode_t dev_open(const char* name, int /*flags*/, io_channel* out);

errcode_t dev_close(io_channel ch) {
  if (--ch->refcount > 0) return 0;
  ext2fs_free_mem(&ch->name);
  ext2fs_free_mem(&ch);
  return 0;
}

errcode_t dev_set_blksize(io_channel ch, int blksize) {
  ch->block_size = blksize;
  return 0;
}

errcode_t dev_read64(io_channel ch, unsigned long long block, int count, void* data) {
  return dev_of(ch)->read(block * uint64_t(ch->block_size), data, byte_len(ch, count));
}

errcode_t dev_write64(io_channel ch, unsigned long long block, int count, const void* data) {
  return dev_of(ch)->write(block * uint64_t(ch->block_size), data, byte_len(ch, count));
}

errcode_t dev_read(io_channel ch, unsigned long block, int count, void* data) {
  return dev_read64(ch, block, count, data);
}

errcode_t dev_write(io_channel ch, unsigned long block, int count, const void* data) {
  return dev_write64(ch, block, count, data);
}

errcode_t dev_write_byte(io_channel ch, unsigned long offset, int count, const void* data) {
  return dev_of(ch)->write(offset, data, size_t(count));
}

errcode_t dev_flush(io_channel ch) { return dev_of(ch)->flush(); }

errcode_t dev_set_option(io_channel, const char*, const char*) {
  return EXT2_ET_INVALID_ARGUMENT;
}

errcode_t dev_discard(io_channel, unsigned long long, unsigned long long) {
  return EXT2_ET_UNIMPLEMENTED;
}

errcode_t dev_zeroout(io_channel, unsigned long long, unsigned long long) {
  return EXT2_ET_UNIMPLEMENTED;
}

struct struct_io_manager manager = [] {
  struct struct_io_manager m;
  memset(&m, 0, sizeof m);
  m.magic = EXT2_ET_MAGIC_IO_MANAGER;
  m.name = "nbdroot block device";
  m.open = dev_open;
  m.close = dev_close;
  m.set_blksize = dev_set_blksize;
  m.read_blk = dev_read;
  m.write_blk = dev_write;
  m.flush = dev_flush;
  m.write_byte = dev_write_byte;
  m.set_option = dev_set_option;
  m.read_blk64 = dev_read64;
  m.write_blk64 = dev_write64;
  m.discard = dev_discard;
  m.zeroout = dev_zeroout;
  return m;
}();

errcode_t dev_open(const char* name, int /*flags*/, io_channel* out) {
  void* ptr = nullptr;
  if (!name || strncmp(name, kPrefix, strlen(kPrefix)) != 0 ||
      sscanf(name + strlen(kPrefix), "%p", &ptr) != 1 || !ptr)
    return EXT2_ET_BAD_DEVICE_NAME;
  io_channel ch;
  errcode_t r = ext2fs_get_mem(sizeof(struct struct_io_channel), &ch);
  if (r) return r;
  memset(ch, 0, sizeof *ch);
  ch->magic = EXT2_ET_MAGIC_IO_CHANNEL;
  ch->manager = &manager;
  r = ext2fs_get_mem(strlen(name) + 1, &ch->name);
  if (r) {
    ext2fs_free_mem(&ch);
    return r;
  }
  strcpy(ch->name, name);
  ch->block_size = 1024;
  ch->refcount = 1;
  ch->private_data = ptr;
  *out = ch;
  return 0;
}

}  // namespace

io_manager device_io_manager() { return &manager; }

std::string device_name(BlockDevice* dev) {
  char buf[64];
  snprintf(buf, sizeof buf, "%s%p", kPrefix, static_cast<void*>(dev));
  return buf;
}

}  // namespace ib
