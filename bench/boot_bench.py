#!/usr/bin/python3
"""Boot benchmark: a diskless node with its root over NBD against the same
node with its whole tree loaded into RAM, as LTSP's and Warewulf's RAM
modes do.

For each mode it boots the same kernel under qemu and measures
  * the time from qemu's start to a marker printed by the node's init on
    its root (bench/boot_node_init.sh, copied into the tree), and
  * the node's MemTotal, MemFree and MemAvailable (/proc/meminfo) at that
    point,
and it reports the size of our initrd (initrd-hooks/mkinitrd.sh) and of the
RAM-mode initramfs. Modes ("servers"):
  nbdserver, nbd-server, nbdkit   root over NBD through our initrd, each
                                  server serving the same ext4 image
                                  copy-on-write (a node view for nbdserver)
  ram                             no NBD: the tree as a compressed cpio
                                  initramfs (rdinit=), the root is rootfs
All of them run with the same -m.

    /usr/bin/python3 bench/boot_bench.py                 # Debian tree if cached, 3 reps
    /usr/bin/python3 bench/boot_bench.py --quick         # 1 rep
    /usr/bin/python3 bench/boot_bench.py --tree small --reps 5
    /usr/bin/python3 bench/boot_bench.py --tree sized --size-mib 512

Trees (--tree):
  debian  the debootstrap tree the e2e tests cache
          ($NBDROOT_E2E_CACHE/debian-bookworm.tar; made with
          tests/e2e/make_debian_tree.sh when absent), with its own kernel;
          its init (systemd) is bypassed with init=/rdinit=
  small   tests/e2e's busybox tree (a few MiB), with the e2e cache's kernel
  sized   the small tree plus --size-mib MiB of files of random data

Needs what tests/e2e needs (scripts/install-deps.sh) plus nbd-server and
nbdkit. Runs as root. VMs run one at a time, under qemu TCG unless
NBDROOT_E2E_ACCEL says otherwise: the absolute times are the emulator's;
compare the rows. See bench/README.md."""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(REPO, "tests", "e2e"))

import nodelab  # noqa: E402

MAC = "52:54:00:12:34:56"
MiB = 1 << 20
NODE_INIT = "/sbin/nbdroot-bench-init"
NBD_KINDS = ("nbdserver", "nbd-server", "nbdkit")
ALL_KINDS = NBD_KINDS + ("ram",)
BOOT_TIMEOUT = 900  # TCG unpacking a large initramfs is slow
MEM_KEYS = ("MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "Shmem")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_port(port, proc, timeout=15):
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("server not listening")


class Peer:
    """nbd-server or nbdkit serving IMAGE copy-on-write as export NAME."""

    def __init__(self, kind, image, name, workdir):
        self.kind = kind
        self.port = nodelab.free_port()
        log = open(os.path.join(workdir, f"{kind}.log"), "ab")
        if kind == "nbd-server":
            conf = os.path.join(workdir, "nbd-server.conf")
            with open(conf, "w") as f:
                f.write(f"[generic]\n    port = {self.port}\n    listenaddr = 127.0.0.1\n"
                        f"[{name}]\n    exportname = {image}\n    copyonwrite = true\n")
            # -d would serve one connection only: let it daemonize.
            cmd = ["nbd-server", "-C", conf]
        else:
            cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.port), "--filter=cow",
                   "file", image]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     cwd=workdir)
        if kind == "nbd-server":
            self.conf = conf
            self.proc.wait(10)  # the parent exits once the daemon runs
            wait_port(self.port, None)
        else:
            wait_port(self.port, self.proc)

    def stop(self):
        if self.kind == "nbd-server":
            # Its pid file setting is not honoured here: find the daemon by
            # its own (unique) config path.
            out = subprocess.run(["pgrep", "-f", f"nbd-server -C {self.conf}$"],
                                 capture_output=True, text=True).stdout.split()
            for pid in map(int, out):
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    continue
                for _ in range(100):
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.05)
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------- trees

def du_bytes(path):
    """Bytes the files under path take (apparent sizes), and their number."""
    total = n = 0
    for d, dirs, files in os.walk(path):
        for name in dirs + files:
            n += 1
            try:
                st = os.lstat(os.path.join(d, name))
            except OSError:
                continue
            total += st.st_size
    return total, n


def debian_tar():
    return os.path.join(nodelab.cache_dir(), "debian-bookworm.tar")


def make_tree(kind, path, size_mib):
    """Lays out the tree; returns (description, Kernel or None = the e2e
    cache's kernel)."""
    if kind == "debian":
        tar = debian_tar()
        if not os.path.exists(tar):
            if shutil.which("debootstrap") is None:
                raise SystemExit(f"no {tar} and no debootstrap to make it (scripts/install-deps.sh)")
            log(f"no {tar}: making it with tests/e2e/make_debian_tree.sh (several minutes)")
            nodelab.run([os.path.join(REPO, "tests", "e2e", "make_debian_tree.sh"), tar],
                        timeout=3600)
        os.makedirs(path)
        nodelab.run(["tar", "-C", path, "--numeric-owner", "-xf", tar], timeout=900)
        kernels = sorted(f for f in os.listdir(os.path.join(path, "boot"))
                         if f.startswith("vmlinuz-"))
        if not kernels:
            raise SystemExit(f"{tar} has no /boot/vmlinuz-*")
        version = kernels[-1][len("vmlinuz-"):]
        desc = "debian (Debian 12 debootstrap tree of the e2e cache, its own kernel)"
        return desc, nodelab.Kernel(path, version)
    nodelab.make_test_tree(path, "g1")
    desc = "small (tests/e2e busybox tree)"
    if kind == "sized":
        # Random data: compresses like nothing, so the RAM image is as large
        # as the tree (a real tree compresses 2-4x; see --tree debian).
        fill = os.path.join(path, "usr", "share", "fill")
        os.makedirs(fill)
        chunk = 4 * MiB
        left = size_mib * MiB
        i = 0
        while left > 0:
            n = min(chunk, left)
            with open(os.path.join(fill, f"f{i:05d}"), "wb") as f:
                f.write(os.urandom(n))
            left -= n
            i += 1
        desc = f"sized (busybox tree + {size_mib} MiB of random data in {i} files)"
    return desc, None


def add_node_init(tree):
    dest = os.path.join(tree, NODE_INIT.lstrip("/"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copy(os.path.join(BENCH, "boot_node_init.sh"), dest)
    os.chmod(dest, 0o755)


def ram_initramfs(tree, out, compress):
    """The whole tree as an initramfs, the way Warewulf packs its node
    images (a newc cpio, gzip by default) and LTSP its RAM image: everything
    but /boot (the kernel and its initrds are loaded on their own, as
    Warewulf's default excludes do). Returns (bytes, cpio bytes)."""
    comp = {"gzip": ["pigz", "-6", "-c"] if shutil.which("pigz") else ["gzip", "-6", "-n", "-c"],
            "zstd": ["zstd", "-q", "-3", "-T0", "-c"],
            "xz": ["xz", "-6", "--check=crc32", "-T0", "-c"]}[compress]
    cpio_bytes = 0
    with open(out, "wb") as f:
        find = subprocess.Popen(["find", ".", "-path", "./boot/*", "-prune", "-o", "-print"],
                                cwd=tree, stdout=subprocess.PIPE)
        cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree,
                                stdin=find.stdout, stdout=subprocess.PIPE)
        find.stdout.close()
        zp = subprocess.Popen(comp, stdin=subprocess.PIPE, stdout=f)
        while True:
            buf = cpio.stdout.read(MiB)
            if not buf:
                break
            cpio_bytes += len(buf)
            zp.stdin.write(buf)
        zp.stdin.close()
        for p, what in ((find, "find"), (cpio, "cpio"), (zp, compress)):
            if p.wait() != 0:
                raise SystemExit(f"RAM initramfs: {what} exited {p.returncode}")
    return os.path.getsize(out), cpio_bytes


# ---------------------------------------------------------------- boots

def boot(lab, name, append, vmlinuz, initrd, memory_mib):
    """One boot; returns {'t': s to the marker, 'uptime': node's s,
    'root': ..., MEM_KEYS: kB}."""
    t0 = time.monotonic()
    vm = lab.vm(name, append, MAC, vmlinuz=vmlinuz, initrd=initrd, memory_mib=memory_mib).start()
    vm.wait_for(r"E2E: init started", timeout=BOOT_TIMEOUT)
    t = time.monotonic() - t0
    vm.wait(timeout=BOOT_TIMEOUT)
    res = {"t": t}
    for l in vm.e2e():
        if l.startswith("mem "):
            parts = l[4:].split()
            for i in range(0, len(parts) - 2, 3):
                res[parts[i]] = int(parts[i + 1])
        elif l.startswith("uptime "):
            res["uptime"] = float(l.split()[1])
        elif l.startswith("root "):
            res["root"] = l[5:]
    missing = [k for k in ("MemTotal", "MemFree", "MemAvailable") if k not in res]
    if missing or "done" not in vm.e2e():
        raise AssertionError(f"{name}: no {' '.join(missing) or 'done'} on the console; "
                             f"console in {vm.console_path}")
    return res


def roundup(x, step):
    return int(math.ceil(x / step) * step)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", "--runs", type=int, default=3, dest="reps",
                    help="boots per mode; medians, min and max are reported (default 3)")
    ap.add_argument("--quick", action="store_true", help="--reps 1")
    ap.add_argument("--tree", choices=("debian", "small", "sized"),
                    help="default: debian if the e2e cache has it, else small")
    ap.add_argument("--size-mib", type=int, default=512, help="for --tree sized (default 512)")
    ap.add_argument("--servers", default=",".join(ALL_KINDS),
                    help=f"modes, in this order (default {','.join(ALL_KINDS)})")
    ap.add_argument("--memory", type=int,
                    help="qemu -m in MiB for every mode (default: 512 for the small tree, else "
                         "enough for the RAM mode: the larger of unpacked + compressed + 768 and "
                         "2 x unpacked + 512 (rootfs may fill half the RAM), rounded up to 256)")
    ap.add_argument("--ram-compress", choices=("gzip", "zstd", "xz"), default="gzip",
                    help="the RAM initramfs' compression (default gzip, as Warewulf)")
    ap.add_argument("--workdir", default="/var/tmp",
                    help="where the work dir is made (default /var/tmp)")
    ap.add_argument("--json", help="also write every sample and the medians to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (consoles, logs)")
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    kinds = [k for k in args.servers.split(",") if k]
    for k in kinds:
        if k not in ALL_KINDS:
            raise SystemExit(f"unknown server/mode {k} (known: {', '.join(ALL_KINDS)})")
    tree_kind = args.tree
    if tree_kind is None:
        if os.path.exists(debian_tar()):
            tree_kind = "debian"
        else:
            tree_kind = "small"
            log(f"WARNING: no {debian_tar()}: using the small busybox tree, which is too "
                "small for a meaningful memory comparison (--tree debian makes the Debian "
                "tree, --tree sized --size-mib N a synthetic one)")
    for k, binary in (("nbd-server", "nbd-server"), ("nbdkit", "nbdkit")):
        if k in kinds and shutil.which(binary) is None:
            log(f"no {binary} installed: skipping it")
            kinds.remove(k)

    nbdserver = nodelab.find_binary("NBDSERVER", "build*/nbdserver/nbdserver")
    if "nbdserver" in kinds and not nbdserver:
        raise SystemExit("no nbdserver binary (ninja -C build, or NBDSERVER=)")
    work = tempfile.mkdtemp(prefix="nbdroot-bootbench.", dir=args.workdir)
    cleanup = []
    lab = None
    failures = []
    try:
        tree = os.path.join(work, "tree")
        log(f"tree {tree_kind} in {tree}")
        tree_desc, kernel = make_tree(tree_kind, tree, args.size_mib)
        add_node_init(tree)
        if kernel is None:
            # As tests/e2e does: the initrd from the kernel package.
            kernel = nodelab.fetch_kernel()
            initrd_from = kernel.root
        else:
            # As test_debian.py's own-initrd boot: from the tree (its
            # kernel's modules, its nbd-client).
            initrd_from = tree
        tree_bytes, tree_files = du_bytes(tree)
        log(f"tree: {tree_files} files, {tree_bytes / MiB:.0f} MiB")

        initrd = os.path.join(work, "initrd.img")
        for attempt in range(4):
            try:
                p = nodelab.run([os.path.join(nodelab.HOOKS, "mkinitrd.sh"), initrd_from, initrd],
                                timeout=900)
                break
            except AssertionError as e:
                if attempt == 3:
                    raise
                log(f"mkinitrd.sh failed (initrd-hooks in flux?), retrying in 2 min: {e}")
                time.sleep(120)
        initrd_size = os.path.getsize(initrd)
        initrd_report = p.stdout.strip().splitlines()[-1].rsplit(" bytes ", 1)[-1]

        rd_ram = os.path.join(work, f"ram-initramfs.cpio.{args.ram_compress}")
        ram_size = ram_cpio = 0
        if "ram" in kinds:
            log(f"packing the tree into a {args.ram_compress} cpio for the RAM mode")
            t0 = time.monotonic()
            ram_size, ram_cpio = ram_initramfs(tree, rd_ram, args.ram_compress)
            log(f"RAM initramfs: {ram_size} bytes ({ram_cpio / MiB:.0f} MiB cpio) in "
                f"{time.monotonic() - t0:.0f} s")

        if args.memory:
            memory = args.memory
        elif tree_kind == "small":
            memory = 512
        else:
            # Unpacking needs the cpio and the compressed image at once;
            # rootfs (tmpfs) takes at most half the RAM.
            unpacked = max(ram_cpio, tree_bytes) / MiB
            memory = max(512, roundup(max(unpacked + ram_size / MiB + 768, 2 * unpacked + 512),
                                      256))

        image = None
        if any(k in NBD_KINDS for k in kinds):
            store = nodelab.Store(os.path.join(work, "store"), nbdserver, handmade=True)
            img_mib = roundup(tree_bytes / MiB * 1.3 + 128, 64)
            log(f"ext4 image of the tree: {img_mib} MiB (mke2fs -d)")
            store.build("lab", tree, "g1", size_mib=img_mib)
            store.publish("lab", "g1")
            image = os.path.join(store.path, "images/lab/generations/g1/image.ext4")
        else:
            store = nodelab.Store(os.path.join(work, "store"), nbdserver, handmade=True)
        server = None
        if "nbdserver" in kinds:
            server = nodelab.Server(nbdserver, store.path, work).start()
            cleanup.append(server.stop)
        lab = nodelab.Lab(work, kernel, initrd, server, store)
        lab.memory_mib = memory

        # Rounds interleave the modes, and the order rotates, so that load
        # from elsewhere on the machine falls on all of them alike.
        samples = {k: [] for k in kinds}
        for r in range(reps):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for kind in order:
                name = f"{kind}-{r}"
                node = f"bench{r}"
                log(f"boot {r + 1}/{reps}: {kind}")
                try:
                    if kind == "nbdserver":
                        res = boot(lab, name, lab.cmdline(node, extra=f"init={NODE_INIT}"),
                                   kernel.vmlinuz, initrd, memory)
                    elif kind in ("nbd-server", "nbdkit"):
                        peer = Peer(kind, image, f"lab/{node}", work)
                        try:
                            append = lab.cmdline(node, extra=f"init={NODE_INIT}", port=peer.port)
                            res = boot(lab, name, append, kernel.vmlinuz, initrd, memory)
                        finally:
                            peer.stop()
                    else:
                        res = boot(lab, name, f"console=ttyS0 rdinit={NODE_INIT} panic=5",
                                   kernel.vmlinuz, rd_ram, memory)
                except Exception as e:  # a failed boot is reported, the others go on
                    failures.append(f"{name}: {e}")
                    log(f"FAILED {name}: {e}")
                    continue
                log(f"  {res['t']:.1f} s, MemAvailable {res['MemAvailable'] / 1024:.0f} MiB, "
                    f"MemFree {res['MemFree'] / 1024:.0f} MiB, root {res.get('root', '?')}")
                samples[kind].append(res)

        report = render(args, reps, kinds, samples, tree_desc, tree_bytes, tree_files, kernel,
                        lab, memory, initrd_size, initrd_report, ram_size, ram_cpio, failures)
        print(report)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"tree": tree_kind, "tree_bytes": tree_bytes, "tree_files": tree_files,
                           "kernel": kernel.version, "accel": lab.accel, "memory_mib": memory,
                           "initrd_bytes": initrd_size, "ram_initramfs_bytes": ram_size,
                           "ram_cpio_bytes": ram_cpio, "ram_compress": args.ram_compress,
                           "samples": samples, "failures": failures}, f, indent=1)
        return 1 if failures else 0
    finally:
        for vm in getattr(lab, "vms", []):
            vm.kill()
        for stop in cleanup:
            stop()
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def render(args, reps, kinds, samples, tree_desc, tree_bytes, tree_files, kernel, lab, memory,
           initrd_size, initrd_report, ram_size, ram_cpio, failures):
    def med(kind, key):
        v = [s[key] for s in samples[kind] if key in s]
        return (statistics.median(v), min(v), max(v)) if v else None

    def mib(kb):
        return kb / 1024

    out = []
    out.append(f"tree: {tree_desc}: {tree_files} files, {tree_bytes / MiB:.0f} MiB")
    out.append(f"kernel {kernel.version}; qemu -accel {lab.accel} -smp 1 -m {memory} for every "
               f"mode; {reps} boot(s) each, one VM at a time")
    out.append(f"our initrd (initrd-hooks/mkinitrd.sh): {initrd_size} bytes "
               f"({initrd_size / MiB:.1f} MiB) {initrd_report}")
    if "ram" in kinds:
        out.append(f"RAM-mode initramfs: {ram_size} bytes ({ram_size / MiB:.1f} MiB, "
                   f"{args.ram_compress} cpio of the tree without /boot, "
                   f"{ram_cpio / MiB:.0f} MiB unpacked); {ram_size / initrd_size:.1f}x our initrd")
    out.append("")
    ram_av = med("ram", "MemAvailable") if "ram" in kinds else None
    ram_free = med("ram", "MemFree") if "ram" in kinds else None
    hdr = (f"{'mode':5} {'server':10} {'boot s med':>10} {'min':>6} {'max':>6} {'node up s':>9} "
           f"{'MemAvail MiB':>12} {'min':>6} {'max':>6} {'MemFree MiB':>11} {'Shmem MiB':>9} "
           f"{'RAM-NBD Avail':>13} {'RAM-NBD Free':>12}")
    out.append(hdr)
    out.append("-" * len(hdr))
    for kind in kinds:
        if not samples[kind]:
            out.append(f"{'ram' if kind == 'ram' else 'nbd':5} {kind:10} (no successful boot)")
            continue
        t, av, fr = med(kind, "t"), med(kind, "MemAvailable"), med(kind, "MemFree")
        up, sh = med(kind, "uptime"), med(kind, "Shmem")
        if kind == "ram" or ram_av is None:
            d_av = d_fr = "-"
        else:
            d_av = f"{mib(ram_av[0] - av[0]):+.0f}"
            d_fr = f"{mib(ram_free[0] - fr[0]):+.0f}"
        mode, server = ("ram", "-") if kind == "ram" else ("nbd", kind)
        out.append(f"{mode:5} {server:10} {t[0]:10.1f} {t[1]:6.1f} {t[2]:6.1f} "
                   f"{up[0] if up else float('nan'):9.1f} "
                   f"{mib(av[0]):12.0f} {mib(av[1]):6.0f} {mib(av[2]):6.0f} {mib(fr[0]):11.0f} "
                   f"{mib(sh[0]) if sh else float('nan'):9.0f} {d_av:>13} {d_fr:>12}")
    total = next((med(k, "MemTotal") for k in kinds if samples[k]), None)
    if total:
        out.append(f"(medians; min/max over the reps; MemTotal {mib(total[0]):.0f} MiB; "
                   "RAM-NBD = RAM mode's median minus this row's, negative: RAM mode "
                   "leaves less)")
    out.append("")
    base = "nbdserver" if samples.get("nbdserver") else None
    if base:
        bt, bav = med(base, "t")[0], med(base, "MemAvailable")[0]
        ratios = [f"{k} {med(k, 't')[0] / bt:.2f}" for k in kinds if k != base and samples[k]]
        if ratios:
            out.append(f"boot time / nbdserver's: {', '.join(ratios)}")
        ratios = [f"{k} {med(k, 'MemAvailable')[0] / bav:.2f}"
                  for k in kinds if k != base and samples[k]]
        if ratios:
            out.append(f"MemAvailable / nbdserver's: {', '.join(ratios)}")
    if ram_av is not None and any(samples.get(k) for k in NBD_KINDS):
        nbd_best = max(((med(k, "MemAvailable")[0], k) for k in kinds
                        if k in NBD_KINDS and samples[k]), key=lambda x: x[0])
        d = mib(nbd_best[0] - ram_av[0])
        out.append(f"MemAvailable, RAM mode vs root over NBD (best: {nbd_best[1]}): "
                   f"{mib(ram_av[0]):.0f} vs {mib(nbd_best[0]):.0f} MiB of {mib(total[0]):.0f}: "
                   f"RAM mode leaves {abs(d):.0f} MiB {'less' if d >= 0 else 'more'} to the node")
    if failures:
        out.append("")
        out.append("== Problems")
        out.extend(failures)
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
