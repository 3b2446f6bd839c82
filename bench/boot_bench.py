#!/usr/bin/python3
"""Boot benchmark: time from qemu start to the first line of the node's own
/sbin/init (root mounted over NBD), with the same kernel, initrd and ext4
image served by nbdserver, nbd-server and nbdkit (each serving a
copy-on-write view, as nodes need), and against a node whose whole root is
loaded into RAM (the tree packed into the initrd, as LTSP's and Warewulf's
RAM modes do). Also reports the initrd's size and MemAvailable after boot.

    /usr/bin/python3 bench/boot_bench.py [--runs 3] [--servers nbdserver,nbd-server,nbdkit,ram]

Needs what tests/e2e needs (scripts/install-deps.sh) plus nbd-server
and nbdkit (scripts/install-deps.sh). Runs as root. Uses qemu TCG unless
NBDROOT_E2E_ACCEL says otherwise: the absolute times are the emulator's;
compare the columns."""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "e2e"))

import nodelab  # noqa: E402

MAC = "52:54:00:12:34:56"


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
        log = open(os.path.join(workdir, f"{kind}.log"), "wb")
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
            if not out:
                return
            pid = int(out[0])
            os.kill(pid, 15)
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


def ram_initrd(tree, out):
    """The whole tree as an initramfs (rdinit=/sbin/init)."""
    with open(out, "wb") as f:
        find = subprocess.Popen(["find", "."], cwd=tree, stdout=subprocess.PIPE)
        cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=tree,
                                stdin=find.stdout, stdout=subprocess.PIPE)
        subprocess.run(["zstd", "-q", "-10", "-c"], stdin=cpio.stdout, stdout=f, check=True)
        cpio.wait()
        find.wait()
    return out


def boot(lab, name, append, initrd=None):
    t0 = time.monotonic()
    vm = lab.vm(name, append, MAC, initrd=initrd).start()
    vm.wait_for(r"E2E: init started", timeout=180)
    t_init = time.monotonic() - t0
    vm.wait(timeout=180)
    mem = {}
    for l in vm.e2e():
        if l.startswith("mem "):
            parts = l[4:].split()
            for i in range(0, len(parts) - 2, 3):
                mem[parts[i].rstrip(":")] = int(parts[i + 1])
    return t_init, mem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--servers", default="nbdserver,nbd-server,nbdkit,ram")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (consoles, logs)")
    args = ap.parse_args()
    kinds = args.servers.split(",")

    nbdserver = nodelab.find_binary("NBDSERVER", "build*/nbdserver/nbdserver")
    work = tempfile.mkdtemp(prefix="nbdroot-bootbench.")
    cleanup = []
    try:
        kernel = nodelab.fetch_kernel()
        initrd, initrd_size, _ = nodelab.make_initrd(kernel, os.path.join(work, "initrd.img"))
        tree = nodelab.make_test_tree(os.path.join(work, "tree"), "g1")
        store = nodelab.Store(os.path.join(work, "store"), nbdserver, handmade=True)
        store.build("lab", tree, "g1")
        store.publish("lab", "g1")
        image = os.path.join(store.path, "images/lab/generations/g1/image.ext4")
        server = nodelab.Server(nbdserver, store.path, work).start()
        cleanup.append(server.stop)
        lab = nodelab.Lab(work, kernel, initrd, server, store)
        rd_ram = ram_initrd(tree, os.path.join(work, "ram-initrd.img"))

        # Rounds interleave the servers, so that load from elsewhere on the
        # machine falls on all of them alike.
        samples = {k: ([], []) for k in kinds}
        for r in range(args.runs):
            for kind in kinds:
                name = f"{kind}-{r}"
                node = f"bench{r}"
                if kind == "nbdserver":
                    t, mem = boot(lab, name, lab.cmdline(node))
                elif kind in ("nbd-server", "nbdkit"):
                    peer = Peer(kind, image, f"lab/{node}", work)
                    try:
                        t, mem = boot(lab, name, lab.cmdline(node, port=peer.port))
                    finally:
                        peer.stop()
                elif kind == "ram":
                    t, mem = boot(lab, name, "console=ttyS0 rdinit=/sbin/init panic=5", rd_ram)
                else:
                    raise SystemExit(f"unknown server {kind}")
                samples[kind][0].append(t)
                samples[kind][1].append(mem.get("MemAvailable", 0))
        results = {k: (statistics.median(t), min(t), statistics.median(a))
                   for k, (t, a) in samples.items()}
        print(f"kernel {kernel.version}, qemu -accel {lab.accel}, -m {lab.memory_mib}, "
              f"{args.runs} boots each (median, min)")
        print(f"our initrd: {initrd_size} bytes; RAM-root initrd: {os.path.getsize(rd_ram)} bytes "
              f"(tree {subprocess.run(['du', '-sk', tree], capture_output=True, text=True).stdout.split()[0]} KiB)")
        print(f"{'root from':12} {'to init (s)':>12} {'min (s)':>8} {'MemAvailable (kB)':>18}")
        for kind, (med, best, av) in results.items():
            print(f"{kind:12} {med:12.2f} {best:8.2f} {av:18.0f}")
    finally:
        for stop in cleanup:
            stop()
        for vm in getattr(locals().get("lab"), "vms", []):
            vm.kill()
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
