#!/usr/bin/python3
"""Records the NBD requests of one real Debian 12 systemd boot, for the boot
storm (bench/storm.py, bench/nbdstorm.c).

It boots the e2e Debian tree (tests/e2e/make_debian_tree.sh, cached as
debian-bookworm.tar; made when missing) under qemu from nbdserver, through
our initrd (initrd-hooks/mkinitrd.sh made from the tree) and the kernel's
NBD client, as a node view. nbdserver runs with --log-level trace, which
logs every request it receives ("conn N: NBD_CMD_... flags F offset O length
L"). The node's requests become the trace, one line each:

    T_MS OP OFFSET LENGTH [fua]      OP: R W F T Z

where T_MS is the time since the node's first request. The boot ends when
systemd has reached multi-user.target: a unit ordered after it reads a
4 KiB sentinel file with O_DIRECT, and the trace stops before that read
(its block is found with debugfs). What follows (the unit powers the VM
off) is not part of the trace.

    /usr/bin/python3 bench/record_boot.py                 # bench/boot-trace.txt.gz
    /usr/bin/python3 bench/record_boot.py --out /tmp/t.txt.gz --keep

Runs as root (it unpacks the tree and runs chroot-free image builds).
"""

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(REPO, "tests", "e2e"))
import nodelab  # noqa: E402

SENTINEL = "/var/lib/nbdroot-bench/boot-done"
MARK_UNIT = f"""[Unit]
Description=nbdroot bench: boot done (reads a sentinel block), then report and power off
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/dd if={SENTINEL} of=/dev/null bs=4096 count=1 iflag=direct
ExecStart=/usr/local/sbin/e2e-report
[Install]
WantedBy=multi-user.target
"""
REQ = re.compile(r"^(\S+ \S+) trace conn (\d+): NBD_CMD_(\w+) flags (\S+) offset (\d+) "
                 r"length (\d+)")
ATTACHED = re.compile(r"conn (\d+): .* attached export '([^']+)'")
OPS = {"READ": "R", "WRITE": "W", "FLUSH": "F", "TRIM": "T", "WRITE_ZEROES": "Z"}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare_tree(tar, tree):
    os.makedirs(tree)
    nodelab.run(["tar", "-C", tree, "--numeric-owner", "-xf", tar], timeout=600)
    shutil.copy(os.path.join(REPO, "tests", "e2e", "debian_report.sh"),
                os.path.join(tree, "usr/local/sbin/e2e-report"))
    os.chmod(os.path.join(tree, "usr/local/sbin/e2e-report"), 0o755)
    os.makedirs(os.path.dirname(tree + SENTINEL), exist_ok=True)
    with open(tree + SENTINEL, "wb") as f:
        f.write(os.urandom(4096))
    units = os.path.join(tree, "etc/systemd/system")
    with open(os.path.join(units, "nbdroot-bench-mark.service"), "w") as f:
        f.write(MARK_UNIT)
    os.makedirs(os.path.join(units, "multi-user.target.wants"), exist_ok=True)
    os.symlink("/etc/systemd/system/nbdroot-bench-mark.service",
               os.path.join(units, "multi-user.target.wants", "nbdroot-bench-mark.service"))
    # The serial getty would hang up the console the report writes to.
    os.symlink("/dev/null", os.path.join(units, "serial-getty@ttyS0.service"))


def sentinel_offset(image):
    out = nodelab.run(["debugfs", "-R", f"bmap {SENTINEL} 0", image]).stdout.split()
    return int(out[-1]) * 4096


def parse_log(text, export_prefix):
    """[(t_seconds, op, offset, length, fua)] of the connections that
    attached an export starting with export_prefix, in the order received."""
    conns = {int(m.group(1)) for m in ATTACHED.finditer(text)
             if m.group(2).startswith(export_prefix)}
    out = []
    for line in text.splitlines():
        m = REQ.match(line)
        if not m or int(m.group(2)) not in conns or m.group(3) not in OPS:
            continue
        t = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + \
            int(m.group(1)[20:23]) / 1000
        out.append((t, OPS[m.group(3)], int(m.group(5)), int(m.group(6)),
                    bool(int(m.group(4), 16) & 1)))
    return out, conns


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(BENCH, "boot-trace.txt.gz"))
    ap.add_argument("--nbdserver", default=os.path.join(REPO, "build", "nbdserver", "nbdserver"))
    ap.add_argument("--imagebuilder",
                    default=os.path.join(REPO, "build", "imagebuilder", "imagebuilder"))
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--memory", type=int, default=1024, help="the VM's MiB")
    ap.add_argument("--timeout", type=int, default=900, help="seconds for the boot")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args()

    tar = os.path.join(nodelab.cache_dir(), "debian-bookworm.tar")
    if not os.path.exists(tar):
        log(f"no {tar}: making it with make_debian_tree.sh (several minutes)")
        nodelab.run([os.path.join(REPO, "tests", "e2e", "make_debian_tree.sh"), tar],
                    timeout=3600)
    work = tempfile.mkdtemp(prefix="nbdroot-record-", dir=args.workdir)
    server = None
    try:
        tree = os.path.join(work, "tree")
        log(f"unpacking {tar} into {tree}")
        prepare_tree(tar, tree)
        vmlinuz = sorted(f for f in os.listdir(os.path.join(tree, "boot"))
                         if f.startswith("vmlinuz-"))[-1]
        version = vmlinuz[len("vmlinuz-"):]
        kernel = os.path.join(work, vmlinuz)
        shutil.copy(os.path.join(tree, "boot", vmlinuz), kernel)
        initrd = os.path.join(work, "initrd.img")
        log("making our initrd from the tree")
        nodelab.run([os.path.join(nodelab.HOOKS, "mkinitrd.sh"), tree, initrd], timeout=600)
        store = nodelab.Store(os.path.join(work, "store"), args.nbdserver, args.imagebuilder)
        log("building the generation (imagebuilder)")
        gen = store.build("deb", tree, "g1")
        store.publish("deb", gen)
        image = os.path.join(store.path, "images", "deb", "generations", gen, "image.ext4")
        size = os.path.getsize(image)
        mark = sentinel_offset(image)
        shutil.rmtree(tree)

        port = nodelab.free_port()
        ready = os.path.join(work, "ready")
        srv_log = os.path.join(work, "nbdserver.log")
        with open(srv_log, "wb") as lf:
            server = subprocess.Popen([args.nbdserver, "--listen", f"127.0.0.1:{port}",
                                       "--store", store.path, "--threads", "1",
                                       "--ready-file", ready, "--log-level", "trace"],
                                      stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
        deadline = time.monotonic() + 20
        while not (os.path.exists(ready) and open(ready).read().strip()):
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"nbdserver did not start; see {srv_log}")
            time.sleep(0.05)
        lab = nodelab.Lab(work, None, initrd, None, store)
        vm = lab.vm("record", f"console=ttyS0 nbdroot=10.0.2.2:{port}/deb ip=dhcp panic=10 rw",
                    vmlinuz=kernel, memory_mib=args.memory)
        log(f"booting Debian ({version}) under qemu {lab.accel}; console {vm.console_path}")
        t0 = time.monotonic()
        vm.start()
        vm.wait(args.timeout)
        log(f"VM done in {time.monotonic() - t0:.0f} s")
        con = vm.console()
        if "E2E: systemd up" not in con:
            sys.exit(f"the node did not report systemd up; console in {vm.console_path}")
        server.terminate()
        server.wait(30)
        reqs, conns = parse_log(open(srv_log, errors="replace").read(), "deb/")
        cut = next((i for i, r in enumerate(reqs) if r[1] == "R" and r[2] <= mark < r[2] + r[3]),
                   None)
        if cut is None:
            sys.exit(f"no read of the sentinel block at {mark} in the trace; log {srv_log}")
        boot = reqs[:cut]
        t_first = boot[0][0]
        n = {op: sum(1 for r in boot if r[1] == op) for op in "RWFTZ"}
        b = {op: sum(r[3] for r in boot if r[1] == op) for op in "RWFTZ"}
        with gzip.open(args.out, "wt", compresslevel=9) as f:
            f.write("# nbdroot boot trace v1: one Debian 12 (bookworm) systemd boot to "
                    "multi-user.target\n")
            f.write(f"# recorded {time.strftime('%Y-%m-%d', time.gmtime())} by "
                    f"bench/record_boot.py: kernel {version}, kernel NBD client through "
                    f"initrd-hooks, qemu {lab.accel} -smp 1 -m {args.memory}, "
                    f"{len(conns)} connection(s)\n")
            f.write(f"# image-size {size}\n")
            f.write(f"# requests {len(boot)}: {n['R']} reads {b['R']} bytes, {n['W']} writes "
                    f"{b['W']} bytes, {n['F']} flushes, {n['T']} trims, {n['Z']} zeroes\n")
            f.write("# T_MS OP OFFSET LENGTH [fua]\n")
            for t, op, off, length, fua in boot:
                f.write(f"{(t - t_first) * 1000:.0f} {op} {off} {length}{' fua' if fua else ''}\n")
        log(f"{args.out}: {len(boot)} requests ({n['R']} reads {b['R'] / 1e6:.1f} MB, "
            f"{n['W']} writes {b['W'] / 1e6:.1f} MB, {n['F']} flushes, {n['T']} trims, "
            f"{n['Z']} zeroes) over {boot[-1][0] - t_first:.0f} s; "
            f"{len(reqs) - cut} more after the boot (report, poweroff) left out")
    finally:
        if server and server.poll() is None:
            server.kill()
            server.wait()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
