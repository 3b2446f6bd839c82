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
#include <cstdio>
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

// The script given, else $env, else initrd-hooks/<name> of this source tree.
std::string find_script(const std::string& given, const char* env, const char* name) {
  if (!given.empty()) return given;
  if (const char* e = getenv(env); e && *e) return e;
  return std::string(NBDROOT_SOURCE_DIR) + "/initrd-hooks/" + name;
}

bool valid_host_port(const std::string& s) {
  size_t colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == s.size() || colon + 6 < s.size())
    return false;
  unsigned port = 0;
  for (char c : s.substr(colon + 1)) {
    if (c < '0' || c > '9') return false;
    port = port * 10 + unsigned(c - '0');
  }
  return port >= 1 && port <= 65535 && s.find_first_of(" /\t\n") == std::string::npos;
}

// Puts directory `tmp` at `dest` in one step: renamed there, or swapped with
// the directory already there (RENAME_EXCHANGE), whose old contents go.
Status install_dir(const std::string& tmp, const std::string& dest, const std::string& parent) {
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, dest.c_str(), RENAME_NOREPLACE) != 0) {
    if (errno != EEXIST) return Status::fail(errno_message("rename " + tmp, errno));
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, dest.c_str(), RENAME_EXCHANGE) != 0)
      return Status::fail(errno_message("exchange " + tmp + " and " + dest, errno));
    (void)remove_tree(tmp);  // now the old boot files
  }
  return fsync_dir(parent);
}

// Copies `src` to `dest` atomically (small files: memtest86+ is ~150 KB).
Status copy_small_file(const std::string& src, const std::string& dest) {
  auto data = read_file(src);
  if (!data) return data.status();
  return write_file_atomic(dest, *data, 0644);
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
    // NBDROOT_KEEPER_PATH is only read by mkinitrd.sh; mkverify.sh ignores it.
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

// Store mode: the generation's boot/ directory, memtest86+ and chain.ipxe.
Status write_to_store(const Store& store, const BootOptions& opt, const std::string& gen,
                      ext2_filsys fs, const std::string& kernel, const std::string& kver,
                      const std::string& source, const std::string& mkinitrd,
                      const std::string& mkverify, std::string* summary) {
  const std::string gdir = store.generation_dir(opt.image, gen);
  std::string tmpl = gdir + "/.boot.tmp-XXXXXX";
  if (!mkdtemp(tmpl.data())) return Status::fail(errno_message("mkdtemp " + tmpl, errno));
  const std::string tmp = tmpl;
  Status s = ::chmod(tmp.c_str(), 0755) == 0 ? Status() : Status::fail(errno_message("chmod " + tmp, errno));
  if (s) s = extract(fs, kernel, tmp + "/vmlinuz");
  if (s) s = run_mkinitrd(mkinitrd, source, tmp + "/initrd.img", kver);
  if (s) s = run_mkinitrd(mkverify, source, tmp + "/verify.img", kver);
  if (s) s = fsync_dir(tmp);
  if (s) s = install_dir(tmp, gdir + "/boot", gdir);
  if (!s) {
    (void)remove_tree(tmp);
    return s;
  }
  *summary = gdir + "/boot/vmlinuz (" + kver + ", from /" + kernel + " of " + opt.image + "@" + gen +
             ")\n" + gdir + "/boot/initrd.img (" + mkinitrd + ")\n" + gdir + "/boot/verify.img (" +
             mkverify + ")\n";

  const std::string bdir = store.root() + "/boot";
  if (::mkdir(bdir.c_str(), 0755) != 0 && errno != EEXIST)
    return Status::fail(errno_message("mkdir " + bdir, errno));
  int copied = 0;
  for (const char* name : {"memtest86+x64.bin", "memtest86+x64.efi"}) {
    const std::string src = opt.memtest_dir + "/" + name;
    if (!exists(src)) continue;
    if (Status c = copy_small_file(src, bdir + "/" + name); !c) return c;
    *summary += bdir + "/" + name + " (" + src + ")\n";
    ++copied;
  }
  if (copied == 0)
    *summary += "no memtest86+ in " + opt.memtest_dir + " (Debian: apt-get install memtest86+): none copied\n";
  if (!opt.http_server.empty()) {
    const std::string chain = "#!ipxe\n"
                              "# nbdroot: every node asks nbdserver for its own script (issue 12).\n"
                              "chain http://" + opt.http_server + "/boot/${net0/mac:hexhyp}.ipxe\n";
    if (Status c = write_file_atomic(bdir + "/chain.ipxe", chain, 0644); !c) return c;
    *summary += bdir + "/chain.ipxe (chain http://" + opt.http_server + "/boot/${net0/mac:hexhyp}.ipxe)\n";
  }
  return Status();
}

}  // namespace

Status write_boot_files(const Store& store, const BootOptions& opt, std::string* summary) {
  if (!valid_name(opt.image)) return Status::fail("invalid image name \"" + opt.image + "\"");
  if (Status s = store.check(); !s) return s;
  const bool to_store = opt.out.empty();
  if (!to_store && opt.server.find(':') == std::string::npos)
    return Status::fail("--server must be HOST:PORT, not \"" + opt.server + "\"");
  if (to_store && !opt.server.empty())
    return Status::fail("--server goes with --out (it is written into --out's boot.ipxe); the boot "
                        "files in the store are served by nbdserver --http, whose scripts name it");
  if (!opt.http_server.empty() && !valid_host_port(opt.http_server))
    return Status::fail("--http-server must be HOST:PORT, not \"" + opt.http_server + "\"");
  std::string gen = opt.generation;
  if (gen.empty()) {
    auto cur = store.current(opt.image);
    if (!cur) return Status::fail("image " + opt.image + " has no current generation: publish one, or pass --generation");
    gen = *cur;
  }
  auto m = store.manifest(opt.image, gen);
  if (!m) return m.status();
  const std::string script = find_script(opt.mkinitrd, "NBDROOT_MKINITRD", "mkinitrd.sh");
  if (access(script.c_str(), X_OK) != 0)
    return Status::fail("no initrd builder: " + script +
                        " is missing or not executable (initrd-hooks/mkinitrd.sh TREE OUT comes "
                        "with the node boot path; pass --mkinitrd SCRIPT or set NBDROOT_MKINITRD)");
  const std::string verify_script = find_script(opt.mkverify, "NBDROOT_MKVERIFY", "mkverify.sh");
  if (to_store && access(verify_script.c_str(), X_OK) != 0)
    return Status::fail("no verification initrd builder: " + verify_script +
                        " is missing or not executable (initrd-hooks/mkverify.sh TREE OUT; pass "
                        "--mkverify SCRIPT or set NBDROOT_MKVERIFY)");
  if (!is_dir(m->source))
    return Status::fail("the generation's source tree " + m->source + " is gone; the initrd is made from it");
  if (!to_store && ::mkdir(opt.out.c_str(), 0755) != 0 && errno != EEXIST)
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
  if (to_store)
    return write_to_store(store, opt, gen, fs.get(), *kernel, kver, m->source, script, verify_script,
                          summary);
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
