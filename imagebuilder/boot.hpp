// `boot`: what a node needs to start from an image.
//   vmlinuz     the newest kernel in the generation's /boot (vmlinuz-*), read
//               from the image itself with libext2fs
//   initrd.img  made by initrd-hooks/mkinitrd.sh TREE OUT --kver VERSION (the
//               boot issue's script), run on the generation's recorded source tree
//
// With --out DIR (and --server), into DIR, with
//   boot.ipxe   kernel, initrd and the command line
//               nbdroot=HOST:PORT/<image>/${net0/mac:hexhyp} ip=dhcp
//
// Without --out, into the store, for nbdserver --http to serve (issue 12):
//   images/<image>/generations/<gen>/boot/{vmlinuz,initrd.img,verify.img}
//               made in a temporary directory beside it and renamed into
//               place (an existing boot/ is swapped out whole), where
//               verify.img is initrd-hooks/mkverify.sh TREE OUT --kver VERSION
//   boot/memtest86+x64.{bin,efi}   copied from --memtest-dir (/boot) when there
//   boot/chain.ipxe   with --http-server HOST:PORT, the one fixed line that
//               DHCP or TFTP hands to iPXE:
//               chain http://HOST:PORT/boot/${net0/mac:hexhyp}.ipxe
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
  std::string mkverify;   // default: initrd-hooks/mkverify.sh (store mode only)
  std::string extra_cmdline;
  std::string http_server;  // HOST:PORT of nbdserver --http, for boot/chain.ipxe
  std::string memtest_dir = "/boot";
};

Status write_boot_files(const Store& store, const BootOptions& opt, std::string* summary);

}  // namespace ib
