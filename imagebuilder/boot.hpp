// `boot`: what a node needs to start from an image, written to --out:
//   vmlinuz     the newest kernel in the generation's /boot (vmlinuz-*), read
//               from the image itself with libext2fs
//   initrd.img  made by initrd-hooks/mkinitrd.sh TREE OUT --kver VERSION (the
//               boot issue's script), run on the generation's recorded source tree
//   boot.ipxe   kernel, initrd and the command line
//               nbdroot=HOST:PORT/<image>/${net0/mac:hexhyp} ip=dhcp
#pragma once

#include "status.hpp"
#include "store.hpp"

#include <string>

namespace ib {

struct BootOptions {
  std::string image;
  std::string out;
  std::string server;     // HOST:PORT
  std::string generation; // default: current
  std::string mkinitrd;   // default: initrd-hooks/mkinitrd.sh next to the binary's repo
  std::string extra_cmdline;
};

Status write_boot_files(const Store& store, const BootOptions& opt, std::string* summary);

}  // namespace ib
