// A libext2fs io_manager over a BlockDevice, so ext2fs_open2 can work on a
// generation chain or a new layer. libext2fs names the device by a string;
// device_name() encodes the BlockDevice's address in it, and the manager's
// open() decodes it. The BlockDevice must outlive the ext2_filsys.
#pragma once

#include "block_device.hpp"

#include <ext2fs/ext2fs.h>

#include <string>

namespace ib {

io_manager device_io_manager();
std::string device_name(BlockDevice* dev);

}  // namespace ib
