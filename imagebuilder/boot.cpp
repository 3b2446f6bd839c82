#include "boot.hpp"

#include "block_device.hpp"
#include "device_io.hpp"
#include "util.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ext2fs/ext2fs.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#ifndef NBDROOT_SOURCE_DIR
#define NBDROOT_SOURCE_DIR "."
#endif

namespace ib {
namespace {

struct FsCloser {
  void operator()(struct struct_ext2_filsys* fs) const { ext2fs_close_free(&fs); }
};
using FsPtr = std::unique_ptr<struct struct_ext2_filsys, FsCloser>;

// Newest "vmlinuz-<version>" in /boot, by version order.
Result<std::string> find_kernel(ext2_filsys fs) {
  ext2_ino_t boot;
  errcode_t r = ext2fs_namei(fs, EXT2_ROOT_INO, EXT2_ROOT_INO, "boot", &boot);
  if (r) return Status::fail(ext2_message("the image has no /boot", r));
  std::vector<std::string> names;
  r = ext2fs_dir_iterate2(
      fs, boot, 0, nullptr,
      [](ext2_ino_t, int, struct ext2_dir_entry* d, int, int, char*, void* priv) -> int {
        std::string n(d->name, ext2fs_dirent_name_len(d));
        if (n.rfind("vmlinuz-", 0) == 0) static_cast<std::vector<std::string>*>(priv)->push_back(n);
        return 0;
      },
      &names);
  if (r) return Status::fail(ext2_message("read /boot in the image", r));
  if (names.empty()) return Status::fail("the image's /boot holds no vmlinuz-* kernel");
  std::string best = names[0];
  for (auto& n : names)
    if (strverscmp(n.c_str(), best.c_str()) > 0) best = n;
  return "boot/" + best;
}

// Copies a file of the image (symlinks followed) to `out`, atomically.
Status extract(ext2_filsys fs, const std::string& path, const std::string& out) {
  ext2_ino_t ino;
  errcode_t r = ext2fs_namei_follow(fs, EXT2_ROOT_INO, EXT2_ROOT_INO, path.c_str(), &ino);
  if (r) return Status::fail(ext2_message("/" + path + " in the image", r));
  ext2_file_t f;
  r = ext2fs_file_open(fs, ino, 0, &f);
  if (r) return Status::fail(ext2_message("open /" + path + " in the image", r));
  std::string tmp = out + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  Status s = fd < 0 ? Status::fail(errno_message(tmp, errno)) : Status();
  std::vector<char> buf(1 << 20);
  while (s) {
    unsigned int got = 0;
    r = ext2fs_file_read(f, buf.data(), unsigned(buf.size()), &got);
    if (r) s = Status::fail(ext2_message("read /" + path + " in the image", r));
    if (!s || got == 0) break;
    if (::write(fd, buf.data(), got) != ssize_t(got)) s = Status::fail(errno_message("write " + tmp, errno));
  }
  ext2fs_file_close(f);
  if (fd >= 0) {
    if (s && fsync(fd) != 0) s = Status::fail(errno_message("fsync " + tmp, errno));
    ::close(fd);
  }
  if (s && ::rename(tmp.c_str(), out.c_str()) != 0) s = Status::fail(errno_message("rename " + tmp, errno));
  if (!s) ::unlink(tmp.c_str());
  return s;
}

std::string find_mkinitrd(const BootOptions& opt) {
  if (!opt.mkinitrd.empty()) return opt.mkinitrd;
  if (const char* e = getenv("NBDROOT_MKINITRD"); e && *e) return e;
  return std::string(NBDROOT_SOURCE_DIR) + "/initrd-hooks/mkinitrd.sh";
}

Status run_mkinitrd(const std::string& script, const std::string& tree, const std::string& out,
                    const std::string& kver) {
  std::string tmp = out + ".tmp";
  pid_t pid = fork();
  if (pid < 0) return Status::fail(errno_message("fork", errno));
  if (pid == 0) {
    setenv("NBDROOT_KERNEL_VERSION", kver.c_str(), 1);
    // The reconnect daemon built beside us, unless the caller chose one.
    if (access(NBDROOT_KEEPER_PATH, X_OK) == 0) setenv("NBDROOT_KEEPER", NBDROOT_KEEPER_PATH, 0);
    dup2(2, 1);  // keep our stdout for the summary
    execl(script.c_str(), script.c_str(), tree.c_str(), tmp.c_str(), "--kver", kver.c_str(),
          (char*)nullptr);
    fprintf(stderr, "cannot run %s: %s\n", script.c_str(), strerror(errno));
    _exit(127);
  }
  int st = 0;
  while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0 || !exists(tmp)) {
    ::unlink(tmp.c_str());
    return Status::fail(script + " " + tree + " " + tmp + " failed (status " +
                        std::to_string(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st)) + ")");
  }
  if (::rename(tmp.c_str(), out.c_str()) != 0) return Status::fail(errno_message("rename " + tmp, errno));
  return Status();
}

std::string ipxe_script(const BootOptions& opt, const std::string& gen, const std::string& kver) {
  std::string cmdline = "nbdroot=" + opt.server + "/" + opt.image + "/${net0/mac:hexhyp} ip=dhcp";
  if (!opt.extra_cmdline.empty()) cmdline += " " + opt.extra_cmdline;
  return "#!ipxe\n"
         "# nbdroot: image " + opt.image + ", built from generation " + gen + ", kernel " + kver + ".\n"
         "# Nodes attach export " + opt.image + "/<mac> (their own copy-on-write view of the\n"
         "# current generation at first attach).\n"
         "dhcp\n"
         "kernel vmlinuz initrd=initrd.img " + cmdline + "\n"
         "initrd initrd.img\n"
         "boot\n";
}

}  // namespace

Status write_boot_files(const Store& store, const BootOptions& opt, std::string* summary) {
  if (!valid_name(opt.image)) return Status::fail("invalid image name \"" + opt.image + "\"");
  if (Status s = store.check(); !s) return s;
  if (opt.server.find(':') == std::string::npos)
    return Status::fail("--server must be HOST:PORT, not \"" + opt.server + "\"");
  std::string gen = opt.generation;
  if (gen.empty()) {
    auto cur = store.current(opt.image);
    if (!cur) return Status::fail("image " + opt.image + " has no current generation: publish one, or pass --generation");
    gen = *cur;
  }
  auto m = store.manifest(opt.image, gen);
  if (!m) return m.status();
  const std::string script = find_mkinitrd(opt);
  if (access(script.c_str(), X_OK) != 0)
    return Status::fail("no initrd builder: " + script +
                        " is missing or not executable (initrd-hooks/mkinitrd.sh TREE OUT comes "
                        "with the node boot path; pass --mkinitrd SCRIPT or set NBDROOT_MKINITRD)");
  if (!is_dir(m->source))
    return Status::fail("the generation's source tree " + m->source + " is gone; the initrd is made from it");
  if (::mkdir(opt.out.c_str(), 0755) != 0 && errno != EEXIST)
    return Status::fail(errno_message("mkdir " + opt.out, errno));

  auto chain = GenerationChain::open(store, opt.image, gen);
  if (!chain) return chain.status();
  ext2_filsys raw = nullptr;
  errcode_t r = ext2fs_open2(device_name(chain->get()).c_str(), nullptr, EXT2_FLAG_64BITS, 0, 0,
                             device_io_manager(), &raw);
  if (r) return Status::fail(ext2_message(opt.image + "@" + gen + ": open filesystem", r));
  FsPtr fs(raw);
  auto kernel = find_kernel(fs.get());
  if (!kernel) return kernel.status();
  const std::string kver = kernel->substr(strlen("boot/vmlinuz-"));
  Status s = extract(fs.get(), *kernel, opt.out + "/vmlinuz");
  if (!s) return s;
  s = run_mkinitrd(script, m->source, opt.out + "/initrd.img", kver);
  if (!s) return s;
  s = write_file_atomic(opt.out + "/boot.ipxe", ipxe_script(opt, gen, kver), 0644);
  if (!s) return s;
  *summary = opt.out + "/vmlinuz (" + kver + ", from /" + *kernel + " of " + opt.image + "@" + gen +
             ")\n" + opt.out + "/initrd.img (" + script + ")\n" + opt.out + "/boot.ipxe\n";
  return Status();
}

}  // namespace ib
