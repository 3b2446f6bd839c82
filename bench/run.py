#!/usr/bin/python3
"""Benchmark nbdserver against nbdkit, qemu-nbd and nbd-server.

See bench/README.md.  Typical use:

    /usr/bin/python3 bench/run.py              # full run, ~10 minutes
    /usr/bin/python3 bench/run.py --quick      # smoke test, 1 rep x 2 s
    /usr/bin/python3 bench/run.py --servers ours,nbdkit --workloads rr4k_qd32,sr1m

Every server runs on 127.0.0.1 on a free port.  Read workloads use a
read-only export of one shared, page-cached 1 GiB image of random data; write
workloads use a writable export of a per-server copy of that image.
"""

import argparse
import csv
import ctypes
import datetime
import json
import math
import mmap
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
NBDCOPY_REQUEST = 256 * 1024  # nbdcopy --request-size we pass (its default)

libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def log(msg):
    ts = time.strftime("%H:%M:%S")
    print(f"[{ts}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Process accounting


def _read_stat(pid):
    """(ppid, state, utime+stime+cutime+cstime in ticks) or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    # rest[0] = field 3 (state); field N is rest[N - 3]
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ppid, rest[0], ticks


def process_tree(root):
    """{pid: (state, ticks)} for root and all its descendants."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st:
                stats[int(name)] = st
    if root not in stats:
        return {}
    children = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        p = todo.pop()
        if p in out or p not in stats:
            continue
        out[p] = (stats[p][1], stats[p][2])
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(root):
    """CPU seconds (user+sys) of the process tree under root, including reaped
    children (cutime/cstime).  /proc/PID/stat already sums all threads."""
    return sum(t for _, t in process_tree(root).values()) / CLK_TCK


def settle_tree(root, baseline_n, timeout=3.0):
    """Wait until the tree has no more processes than baseline_n (e.g. the
    per-connection children of nbd-server exited and were reaped, so their
    CPU time has moved into the parent's cutime/cstime)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree = process_tree(root)
        live = [p for p, (state, _) in tree.items()]
        if len(live) <= baseline_n:
            return True
        time.sleep(0.02)
    return False


def _preexec():
    # Children die with us, even on SIGKILL of the harness (not inherited by
    # daemons that fork, those are handled by Server.stop / the subreaper).
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setpgid(0, 0)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# Servers


class ServerError(Exception):
    pass


class Server:
    """One running server instance serving one export.  With `tls` set, the
    server requires TLS with the pre-shared key of identity TLS_IDENTITY in
    args.psk_file, and uri() is an nbds:// URI that makes libnbd's clients
    (nbdload, nbdinfo, nbdcopy) connect with that key."""

    name = "?"
    export = "bench"
    tls = False

    def __init__(self, args, image, readonly, logpath):
        self.args = args
        self.image = image
        self.readonly = readonly
        self.logpath = logpath
        self.proc = None
        self.pid = None  # pid whose tree is measured
        self.port = None
        self.tmpfiles = []

    # subclasses: command(port) -> argv ; or override start()
    def uri(self):
        if self.tls:
            return (f"nbds://{TLS_IDENTITY}@127.0.0.1:{self.port}/{self.export}"
                    f"?tls-psk-file={self.args.psk_file}")
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    def _spawn(self, argv, env=None):
        if self.args.server_cpus:
            argv = ["taskset", "-c", self.args.server_cpus] + argv
        self.logf = open(self.logpath, "ab")
        self.logf.write(("\n$ " + " ".join(argv) + "\n").encode())
        self.logf.flush()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT, preexec_fn=_preexec,
                                     env=None if env is None else dict(os.environ, **env))
        LIVE.add(self)
        self.pid = self.proc.pid

    def env(self):
        """Extra environment of the server process, or None."""
        return None

    def start(self):
        last = None
        for attempt in range(3):  # a free port can be stolen between probe and bind
            self.port = free_port()
            self._spawn(self.command(self.port), self.env())
            try:
                self.wait_ready()
                return
            except ServerError as e:
                last = e
                self.stop()
        raise last

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                r = subprocess.run(["nbdinfo", "--size", self.uri()], capture_output=True,
                                   timeout=5)
                if r.returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.1)
        raise ServerError(f"{self.name}: not ready after {timeout:.0f} s (log: {self.logpath})")

    def alive(self):
        if self.proc is not None and self.proc.pid == self.pid:
            return self.proc.poll() is None
        st = _read_stat(self.pid) if self.pid else None
        return st is not None and st[1] != "Z"

    def check_alive(self):
        if not self.alive():
            rc = self.proc.returncode if self.proc is not None and self.proc.pid == self.pid else "?"
            raise ServerError(f"{self.name}: server process {self.pid} died (rc={rc}); "
                              f"log tail:\n{tail(self.logpath)}")

    def stop(self):
        pids = []
        for root in {self.pid, self.proc.pid if self.proc else None} - {None}:
            pids.extend(process_tree(root).keys())
        for p in pids:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        own = [p for p in pids if not (self.proc is not None and p == self.proc.pid)]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            reap(own)
            if not any(_alive_pid(p) for p in pids):
                break
            time.sleep(0.05)
        for p in pids:
            if _alive_pid(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        reap(own)
        LIVE.discard(self)
        if getattr(self, "logf", None):
            self.logf.close()
            self.logf = None
        for f in self.tmpfiles:
            try:
                os.unlink(f)
            except OSError:
                pass


def _alive_pid(pid):
    st = _read_stat(pid)
    return st is not None and st[1] != "Z"


def reap(pids):
    """Reap those of pids that are our exited children (daemons re-parented to
    us because we are a child subreaper).  Never waitpid(-1): that would steal
    the exit status of subprocess.Popen children."""
    for p in pids:
        try:
            os.waitpid(p, os.WNOHANG)
        except ChildProcessError:
            pass


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join("    " + l for l in lines[-n:])
    except OSError:
        return "    (no log)"


class Ours(Server):
    name = "ours"
    log_level = "warn"

    def start(self):
        ready = os.path.join(self.args.workdir, f"ours-{os.getpid()}.ready")
        try:
            os.unlink(ready)
        except FileNotFoundError:
            pass
        self.tmpfiles.append(ready)
        spec = f"{self.export}={self.image}" + (",ro" if self.readonly else "")
        argv = [self.args.nbdserver, "--listen", "127.0.0.1:0", "--ready-file", ready,
                "--export", spec, "--log-level", self.log_level]
        if self.tls:
            argv += ["--tls", "require", "--tls-psk-file", self.args.psk_file]
        if self.args.ours_threads:
            argv += ["--threads", str(self.args.ours_threads)]
        argv += self.args.ours_arg
        self._spawn(argv)
        deadline = time.monotonic() + 20
        while True:
            self.check_alive()
            try:
                with open(ready) as f:
                    line = f.read().strip()
                if line:
                    host, _, port = line.rpartition(":")
                    self.port = int(port)
                    break
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"ours: no ready file after 20 s (log: {self.logpath})")
            time.sleep(0.02)
        try:
            self.wait_ready()
        except ServerError:
            self.stop()
            raise


class Nbdkit(Server):
    name = "nbdkit"

    def command(self, port):
        argv = ["nbdkit", "-f", "--exit-with-parent", "-p", str(port), "-i", "127.0.0.1"]
        if self.args.nbdkit_threads:
            argv += ["--threads", str(self.args.nbdkit_threads)]
        if self.tls:
            argv += ["--tls=require", f"--tls-psk={self.args.psk_file}"]
        if self.readonly:
            argv.append("-r")
        return argv + ["file", self.image]


class QemuNbd(Server):
    name = "qemu-nbd"

    def command(self, port):
        argv = ["qemu-nbd", "-t", "-p", str(port), "-b", "127.0.0.1", "-f", "raw",
                "-x", self.export, "--cache=writeback", "--aio=threads", "-e", "8"]
        if self.readonly:
            argv.append("-r")
        return argv + [self.image]


class NbdServer(Server):
    """nbd-server daemonizes (-d would also stop it forking per connection, so
    multi-connection would not work).  The daemon re-parents to us because we
    are a child subreaper; we measure the daemon's tree via its pid file."""

    name = "nbd-server"

    def start(self):
        last = None
        for attempt in range(3):
            self.port = free_port()
            conf = os.path.join(self.args.workdir, f"nbd-server-{os.getpid()}.conf")
            pidf = os.path.join(self.args.workdir, f"nbd-server-{os.getpid()}.pid")
            for f in (conf, pidf):
                if f not in self.tmpfiles:
                    self.tmpfiles.append(f)
            try:
                os.unlink(pidf)
            except FileNotFoundError:
                pass
            with open(conf, "w") as f:
                f.write("[generic]\n"
                        f"    port = {self.port}\n"
                        "    listenaddr = 127.0.0.1\n"
                        "    allowlist = false\n")
                if self.args.nbd_server_threads:
                    f.write(f"    max_threads = {self.args.nbd_server_threads}\n")
                f.write(f"[{self.export}]\n"
                        f"    exportname = {self.image}\n"
                        f"    readonly = {'true' if self.readonly else 'false'}\n")
            self._spawn(["nbd-server", "-C", conf, "-p", pidf])
            try:
                self.proc.wait(timeout=10)  # the foreground part exits after daemonizing
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with open(pidf) as f:
                        self.pid = int(f.read().strip())
                    break
                except (FileNotFoundError, ValueError):
                    time.sleep(0.02)
            try:
                if self.pid == self.proc.pid:
                    raise ServerError(f"nbd-server: no pid file (log: {self.logpath})")
                self.wait_ready()
                return
            except ServerError as e:
                last = e
                self.stop()
        raise last


class OursTls(Ours):
    name = "ours-tls"
    tls = True


class NbdkitTls(Nbdkit):
    """nbdkit with its default TLS priorities: with libnbd as the client that
    negotiates ChaCha20-Poly1305 (nbdkit -D nbdkit.tls.session=1 says so)."""

    name = "nbdkit-tls"
    tls = True


class NbdkitTlsAes(NbdkitTls):
    """nbdkit-tls with ChaCha20 disabled through a GnuTLS system priority file
    in its environment, so it negotiates AES-128-GCM as ours does."""

    name = "nbdkit-tls-aes"

    def env(self):
        return no_chacha_env(self.args.workdir)


def no_chacha_env(workdir):
    """Environment that makes a GnuTLS program (nbdkit) leave ChaCha20 out of
    every priority string: a system priority file in workdir that disables
    it.  nbdkit then negotiates AES-128-GCM with libnbd."""
    path = os.path.join(workdir, "gnutls-no-chacha.config")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("[overrides]\ntls-disabled-cipher = CHACHA20-POLY1305\n")
    return {"GNUTLS_SYSTEM_PRIORITY_FILE": path}


SERVERS = {"ours": Ours, "nbdkit": Nbdkit, "qemu-nbd": QemuNbd, "nbd-server": NbdServer,
           "ours-tls": OursTls, "nbdkit-tls": NbdkitTls, "nbdkit-tls-aes": NbdkitTlsAes}
# run.py --tls: each server of --servers is replaced by its TLS variant.
TLS_VARIANT = {"ours": "ours-tls", "nbdkit": "nbdkit-tls"}
TLS_IDENTITY = "bench"


def write_psk_file(path, identities):
    """A psktool-format key file (IDENTITY:HEX, one 256-bit key per line) with
    mode 0600, as nbdserver --tls-psk-file, nbdkit --tls-psk and libnbd's
    tls-psk-file read it.  Replaces any file at path."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for ident in identities:
            f.write(f"{ident}:{os.urandom(32).hex()}\n")
    os.replace(tmp, path)
    return path


LIVE = set()

# --------------------------------------------------------------------------
# Workloads

# id -> (label, kind, params).  kind "load" runs nbdload, "nbdcopy" runs nbdcopy.
WORKLOADS = {
    "rr4k_qd1": ("4K rand read QD1", "load", dict(op="read", pattern="rand", bs=4096, qd=1, conns=1)),
    "rr4k_qd32": ("4K rand read QD32", "load", dict(op="read", pattern="rand", bs=4096, qd=32, conns=1)),
    "rr4k_4x16": ("4K rand read 4conn x QD16", "load",
                  dict(op="read", pattern="rand", bs=4096, qd=16, conns=4)),
    "sr1m": ("1M seq read QD8", "load", dict(op="read", pattern="seq", bs=1 << 20, qd=8, conns=1)),
    "sr128k": ("128K seq read QD8", "load", dict(op="read", pattern="seq", bs=128 << 10, qd=8, conns=1)),
    "nbdcopy": ("nbdcopy whole export -> null:", "nbdcopy", {}),
    "rw4k_qd32": ("4K rand write QD32", "load", dict(op="write", pattern="rand", bs=4096, qd=32, conns=1)),
    # opt-in: 1 MiB sequential writes (bench/tls.py: the server decrypts bulk data)
    "sw1m": ("1M seq write QD8", "load", dict(op="write", pattern="seq", bs=1 << 20, qd=8, conns=1)),
    # opt-in (not in the default list): every write with FUA, i.e. durable
    "rw4k_fua_qd8": ("4K rand write FUA QD8", "load",
                     dict(op="write", pattern="rand", bs=4096, qd=8, conns=1, fua=True)),
}
DEFAULT_WORKLOADS = ["rr4k_qd1", "rr4k_qd32", "rr4k_4x16", "sr1m", "sr128k", "nbdcopy", "rw4k_qd32"]
# Which number is "throughput" for a workload (4K: IOPS, big blocks: MB/s).
THROUGHPUT_KEY = {w: ("iops" if WORKLOADS[w][2].get("bs") == 4096 else "mb_s") for w in WORKLOADS}


def exec_nbdload(argv, limit):
    """Runs an nbdload command line; returns its JSON result line as a dict.
    Raises ServerError on a timeout, a failure or no result."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise ServerError(f"nbdload timed out after {limit:.0f} s: {' '.join(argv)}")
    res = None
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            res = json.loads(line)
    if r.returncode != 0 or res is None:
        raise ServerError(f"nbdload failed (rc={r.returncode}): {' '.join(argv)}\n"
                          f"    stderr: {r.stderr.strip()}\n    stdout: {r.stdout.strip()}")
    return res


def run_nbdload(args, server, params):
    conns = params["conns"]
    threads = min(conns, args.client_threads)
    argv = [args.nbdload, "--uri", server.uri(), "--op", params["op"], "--pattern",
            params["pattern"], "--bs", str(params["bs"]), "--qd", str(params["qd"]),
            "--conns", str(conns), "--threads", str(threads), "--seconds", str(args.seconds),
            "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if params.get("fua"):
        argv.append("--fua")
    if args.client_cpus:
        argv = ["taskset", "-c", args.client_cpus] + argv
    limit = args.seconds + args.warmup + 60
    res = exec_nbdload(argv, limit)
    return dict(ops=res["ops"], ops_all=res["ops_all"], bytes=res["bytes"],
                seconds=res["seconds"], iops=res["iops"], mb_s=res["mb_s"],
                p50_us=res["lat_p50_us"], p99_us=res["lat_p99_us"],
                client_cpu_s=res["client_cpu_s"], multi_conn=res["multi_conn"],
                client_cores=res["client_cpu_s"] / (res["seconds"] + args.warmup)
                if res["seconds"] else float("nan"))


def run_nbdcopy(args, server, size):
    argv = ["nbdcopy", f"--request-size={NBDCOPY_REQUEST}", server.uri(), "null:"]
    if args.client_cpus:
        argv = ["taskset", "-c", args.client_cpus] + argv
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        raise ServerError(f"nbdcopy timed out: {' '.join(argv)}")
    secs = time.monotonic() - t0
    if r.returncode != 0:
        raise ServerError(f"nbdcopy failed (rc={r.returncode}): {' '.join(argv)}\n"
                          f"    stderr: {r.stderr.strip()}")
    ops = math.ceil(size / NBDCOPY_REQUEST)
    return dict(ops=ops, ops_all=ops, bytes=size, seconds=secs, iops=ops / secs,
                mb_s=size / secs / 1e6, p50_us=float("nan"), p99_us=float("nan"),
                client_cpu_s=float("nan"), multi_conn=None, client_cores=float("nan"))


def measure(args, server, wid, size):
    """Run one workload once against a running server; adds server CPU."""
    label, kind, params = WORKLOADS[wid]
    server.check_alive()
    base_n = len(process_tree(server.pid))
    cpu0 = tree_cpu_seconds(server.pid)
    if kind == "load":
        res = run_nbdload(args, server, params)
    else:
        res = run_nbdcopy(args, server, size)
    if not settle_tree(server.pid, base_n):
        log(f"warning: {server.name}: per-connection processes still alive after the run; "
            "CPU of those is counted only up to now")
    cpu1 = tree_cpu_seconds(server.pid)
    server.check_alive()
    cpu = cpu1 - cpu0
    res["server_cpu_s"] = cpu
    res["cpu_us_per_op"] = cpu / res["ops_all"] * 1e6 if res["ops_all"] else float("nan")
    res["server_cores"] = cpu / res["seconds"] if res["seconds"] else float("nan")
    return res


def verify(server, image, timeout=120):
    """Read the whole export with nbdcopy and compare with the image file."""
    with open(image, "rb") as ref:
        p = subprocess.Popen(["nbdcopy", server.uri(), "-"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        off = 0
        try:
            while True:
                if time.monotonic() > deadline:
                    raise ServerError(f"{server.name}: verify timed out")
                chunk = p.stdout.read(8 << 20)
                if not chunk:
                    break
                want = ref.read(len(chunk))
                if chunk != want:
                    i = next((i for i, (a, b) in enumerate(zip(chunk, want)) if a != b),
                             min(len(chunk), len(want)))
                    raise ServerError(f"{server.name}: data mismatch at byte {off + i} "
                                      f"(reproduce: nbdcopy {server.uri()} - | cmp - {image})")
                off += len(chunk)
            if ref.read(1):
                raise ServerError(f"{server.name}: export shorter than image ({off} bytes)")
            try:
                p.wait(timeout=30)  # EOF on the pipe comes before nbdcopy has exited
            except subprocess.TimeoutExpired:
                raise ServerError(f"{server.name}: nbdcopy for verify did not exit")
        finally:
            if p.poll() is None:
                p.kill()
            _, err = p.communicate(timeout=10)
        if p.returncode != 0:
            raise ServerError(f"{server.name}: nbdcopy for verify failed rc={p.returncode}: "
                              f"{err.decode(errors='replace').strip()}")


# --------------------------------------------------------------------------
# Image preparation


def resident_fraction(path):
    """Fraction of the file's pages in the page cache (mincore)."""
    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return float("nan")
        try:
            npages = (size + PAGE - 1) // PAGE
            vec = ctypes.create_string_buffer(npages)
            if libc.mincore(addr, size, vec) != 0:
                return float("nan")
            return sum(1 for b in vec.raw if b & 1) / npages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def warm_cache(path):
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    return resident_fraction(path)


def prepare_image(args):
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, "base.img")
    if not (os.path.exists(path) and os.path.getsize(path) == args.image_size):
        log(f"creating {args.image_size >> 20} MiB random image {path}")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            left = args.image_size
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n
        os.replace(tmp, path)
    else:
        log(f"reusing {path}")
    frac = warm_cache(path)
    log(f"{path}: {frac * 100:.1f} % in page cache")
    return path


def make_copy(src, dst):
    """Fresh copy of src (page cache warm, written back)."""
    r = subprocess.run(["cp", "--reflink=auto", src, dst], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"cp failed: {r.stderr}")


# --------------------------------------------------------------------------
# Reporting


def fmt(v, nd=0):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if nd == 0:
        return f"{v:,.0f}"
    return f"{v:,.{nd}f}"


def median(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else float("nan")


def summarize(raw, servers, workloads):
    """Medians per (server, workload)."""
    summ = {}
    for s in servers:
        for w in workloads:
            runs = [r for r in raw if r["server"] == s and r["workload"] == w and r["ok"]]
            fails = [r for r in raw if r["server"] == s and r["workload"] == w and not r["ok"]]
            d = dict(server=s, workload=w, reps=len(runs), failures=len(fails))
            for k in ("iops", "mb_s", "p50_us", "p99_us", "cpu_us_per_op", "server_cores",
                      "client_cores", "seconds", "ops"):
                d[k] = median([r[k] for r in runs])
            tk = THROUGHPUT_KEY[w]
            thr = [r[tk] for r in runs]
            d["spread_pct"] = ((max(thr) - min(thr)) / d[tk] * 100) if len(thr) > 1 and d[tk] else float("nan")
            summ[(s, w)] = d
    return summ


def ratio(a, b):
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return float("nan")
    return a / b


def best_peer(summ, peers, w, key, lower_is_better=False):
    vals = [(summ[(p, w)][key], p) for p in peers
            if (p, w) in summ and not math.isnan(summ[(p, w)][key])]
    if not vals:
        return float("nan"), None
    return (min(vals) if lower_is_better else max(vals))


def ours_and_peers(servers):
    """(the nbdserver that ratios are taken for, its peers): ours and the
    other plaintext servers, or ours-tls and the TLS ones when ours is not
    run (run.py --tls)."""
    ref = "ours" if "ours" in servers else ("ours-tls" if "ours-tls" in servers else None)
    if ref is None:
        return None, []
    return ref, [s for s in servers
                 if not s.startswith("ours") and SERVERS[s].tls == SERVERS[ref].tls]


def report(summ, servers, workloads, out):
    lines = []
    me, peers = ours_and_peers(servers)
    have_ours = me is not None
    for w in workloads:
        label = WORKLOADS[w][0]
        tk = THROUGHPUT_KEY[w]
        lines.append("")
        lines.append(f"== {label} [{w}]  (throughput metric: {'IOPS' if tk == 'iops' else 'MB/s'})")
        hdr = f"{'server':<14} {'IOPS':>10} {'MB/s':>9} {'p50 us':>9} {'p99 us':>9} {'CPU us/op':>10} {'srv cores':>9} {'cli cores':>9} {'spread':>7} {'n':>3}"
        lines.append(hdr)
        for s in servers:
            d = summ[(s, w)]
            line = (f"{s:<14} {fmt(d['iops']):>10} {fmt(d['mb_s'], 1):>9} {fmt(d['p50_us'], 1):>9} "
                    f"{fmt(d['p99_us'], 1):>9} {fmt(d['cpu_us_per_op'], 2):>10} "
                    f"{fmt(d['server_cores'], 2):>9} {fmt(d['client_cores'], 2):>9} "
                    f"{(fmt(d['spread_pct'], 0) + '%') if not math.isnan(d['spread_pct']) else '-':>7} "
                    f"{d['reps']:>3}")
            if d["failures"]:
                line += f"  FAILED x{d['failures']}"
            lines.append(line)
        if have_ours and peers:
            o = summ[(me, w)]
            parts = []
            for p in peers:
                d = summ[(p, w)]
                parts.append(f"vs {p}: thr x{fmt(ratio(o[tk], d[tk]), 2)}, "
                             f"CPU/op x{fmt(ratio(o['cpu_us_per_op'], d['cpu_us_per_op']), 2)}")
            lines.append(f"{me}/peer  " + "; ".join(parts))
    if have_ours and peers:
        lines.append("")
        lines.append(f"== Targets (medians; {me} / best peer)")

        def target_line(text, w, key, target, lower=False):
            if w not in workloads:
                return
            bp, who = best_peer(summ, peers, w, key, lower)
            r = ratio(summ[(me, w)][key], bp)
            ok = "" if math.isnan(r) else ("  OK" if (r <= target if lower else r >= target) else "  MISS")
            op = "<=" if lower else ">="
            lines.append(f"{text}: ours/best peer = {fmt(r, 2)} (target {op} {target}) "
                         f"[best peer: {who}]{ok}")

        target_line("4K rand read QD32", "rr4k_qd32", "iops", 1.5)
        target_line("1M seq read", "sr1m", "mb_s", 1.0)
        target_line("CPU/op (4K rand read QD32)", "rr4k_qd32", "cpu_us_per_op", 0.5, lower=True)
        rs = []
        for w in workloads:
            bp, _ = best_peer(summ, peers, w, "cpu_us_per_op", True)
            r = ratio(summ[(me, w)]["cpu_us_per_op"], bp)
            if not math.isnan(r) and r > 0:
                rs.append(r)
        if rs:
            g = math.exp(sum(math.log(r) for r in rs) / len(rs))
            lines.append(f"CPU/op: ours/best peer = {g:.2f} (target <= 0.5) "
                         f"[geometric mean over {len(rs)} workloads, best peer per workload]"
                         + ("  OK" if g <= 0.5 else "  MISS"))
    text = "\n".join(lines)
    print(text, flush=True)
    out.write(text + "\n")


def chart(summ, servers, workloads, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(workloads)
    fig, axes = plt.subplots(2, n, figsize=(max(3.0 * n, 6), 7.5), squeeze=False)
    colors = {"ours": "#d62728", "nbdkit": "#1f77b4", "qemu-nbd": "#2ca02c", "nbd-server": "#9467bd",
              "ours-tls": "#ff9896", "nbdkit-tls": "#aec7e8", "nbdkit-tls-aes": "#6baed6"}
    for i, w in enumerate(workloads):
        tk = THROUGHPUT_KEY[w]
        for row, (key, unit) in enumerate([(tk, "IOPS" if tk == "iops" else "MB/s"),
                                           ("cpu_us_per_op", "server CPU µs/op")]):
            ax = axes[row][i]
            vals = [summ[(s, w)][key] for s in servers]
            vals = [0 if math.isnan(v) else v for v in vals]
            bars = ax.bar(range(len(servers)), vals,
                          color=[colors.get(s, "#7f7f7f") for s in servers])
            ax.set_xticks(range(len(servers)))
            ax.set_xticklabels(servers, rotation=40, ha="right", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            top = max(vals) if max(vals) > 0 else 1
            ax.set_ylim(0, top * 1.18)
            for b, v in zip(bars, vals):
                txt = f"{v / 1000:.0f}k" if v >= 10000 else (f"{v:.0f}" if v >= 100 else f"{v:.2f}")
                ax.text(b.get_x() + b.get_width() / 2, v + top * 0.01, txt, ha="center",
                        va="bottom", fontsize=7)
            if row == 0:
                ax.set_title(WORKLOADS[w][0], fontsize=9)
            ax.set_ylabel(unit, fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle("NBD servers on 127.0.0.1, page-cached 1 GiB image: throughput (top, higher is better) "
                 "and server CPU per request (bottom, lower is better); medians", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------


def ensure_nbdload(args):
    if args.nbdload:
        return args.nbdload
    src = os.path.join(BENCH_DIR, "nbdload.c")
    cand = os.path.join(REPO, "build", "bench", "nbdload")
    if os.path.exists(cand) and os.path.getmtime(cand) >= os.path.getmtime(src):
        return cand
    bdir = os.path.join(args.workdir, "build-nbdload")
    log(f"building nbdload in {bdir}")
    for cmd in (["cmake", "-S", BENCH_DIR, "-B", bdir, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release"],
                ["ninja", "-C", bdir, "nbdload"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            sys.exit(f"building nbdload failed: {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return os.path.join(bdir, "nbdload")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="ours,nbdkit,qemu-nbd,nbd-server",
                    help="comma list of: " + ", ".join(SERVERS))
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                    help="comma list of: " + ", ".join(WORKLOADS) + " (default: all but rw4k_fua_qd8)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per workload, median reported")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per nbdload run")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each run")
    ap.add_argument("--quick", action="store_true", help="1 rep, 2 s runs (CI smoke)")
    ap.add_argument("--workdir", default="/var/tmp/nbdroot-bench", help="images, logs, configs")
    ap.add_argument("--image-size", type=int, default=1 << 30)
    ap.add_argument("--outdir", default=None, help="default bench/results/<UTC timestamp>")
    ap.add_argument("--nbdserver", default=os.path.join(REPO, "build", "nbdserver", "nbdserver"))
    ap.add_argument("--nbdload", default=None, help="default: build/bench/nbdload, else built in workdir")
    ap.add_argument("--client-threads", type=int, default=2,
                    help="max nbdload threads (only matters for multi-connection workloads)")
    ap.add_argument("--ours-threads", type=int, default=0, help="pass --threads N to ours")
    ap.add_argument("--ours-arg", action="append", default=[], help="extra argument for ours (repeatable)")
    ap.add_argument("--nbdkit-threads", type=int, default=0, help="nbdkit --threads (default: nbdkit's 16)")
    ap.add_argument("--nbd-server-threads", type=int, default=0, help="nbd-server max_threads (default 4)")
    ap.add_argument("--server-cpus", default="", help="run servers under taskset -c CPUS (e.g. 0)")
    ap.add_argument("--client-cpus", default="", help="run nbdload/nbdcopy under taskset -c CPUS")
    ap.add_argument("--no-verify", action="store_true", help="skip the data check of each server")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tls", action="store_true",
                    help="run every server with TLS required and a pre-shared key (ours and "
                         "nbdkit only); or name TLS variants in --servers: ours-tls, "
                         "nbdkit-tls, nbdkit-tls-aes")
    a = ap.parse_args()
    if a.quick:
        a.reps, a.seconds, a.warmup = 1, 2.0, 0.2
    a.servers = [s for s in a.servers.split(",") if s]
    a.workloads = [w for w in a.workloads.split(",") if w]
    if a.tls:
        for s in a.servers:
            if s in SERVERS and not SERVERS[s].tls and s not in TLS_VARIANT:
                ap.error(f"--tls: {s} has no TLS variant here (only ours and nbdkit)")
        a.servers = [TLS_VARIANT.get(s, s) for s in a.servers]
    for s in a.servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s}")
    for w in a.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w}")
    a.workdir = os.path.abspath(a.workdir)
    a.psk_file = os.path.join(a.workdir, "bench.psk")
    return a


def adopt_orphans_and_stop_on_signals():
    """Become the subreaper of every server a run starts (so none outlives
    it), and turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt, so the
    harness's cleanup runs. SIGINT too: a background job starts with SIGINT
    ignored."""
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def on_term(sig, frame):
        raise KeyboardInterrupt(f"signal {sig}")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)


def main():
    args = parse_args()
    adopt_orphans_and_stop_on_signals()

    for s in [s for s in args.servers if s.startswith("ours")]:
        if not os.access(args.nbdserver, os.X_OK):
            log(f"{s}: {args.nbdserver} not found, skipping it")
            args.servers.remove(s)
    for s in list(args.servers):
        exe = {"nbdkit": "nbdkit", "qemu-nbd": "qemu-nbd", "nbd-server": "nbd-server"}.get(
            s.split("-tls")[0])
        if exe and not shutil.which(exe):
            log(f"{s}: not installed, skipping it")
            args.servers.remove(s)
    if not args.servers:
        sys.exit("no servers to run")

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outdir = args.outdir or os.path.join(BENCH_DIR, "results", stamp)
    os.makedirs(outdir, exist_ok=True)
    logdir = os.path.join(outdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    args.nbdload = ensure_nbdload(args)
    os.makedirs(args.workdir, exist_ok=True)
    if any(SERVERS[s].tls for s in args.servers):
        write_psk_file(args.psk_file, [TLS_IDENTITY])

    base = prepare_image(args)
    size = os.path.getsize(base)
    read_wl = [w for w in args.workloads if WORKLOADS[w][2].get("op", "read") == "read"]
    write_wl = [w for w in args.workloads if WORKLOADS[w][2].get("op") == "write"]
    copies = {}
    if write_wl:
        for s in args.servers:
            copies[s] = os.path.join(args.workdir, f"write-{s}.img")
            log(f"copying image for {s} writes -> {copies[s]}")
            make_copy(base, copies[s])
        log("sync")
        os.sync()
    warm_cache(base)

    n_runs = len(args.servers) * len(args.workloads) * args.reps
    log(f"{len(args.servers)} servers x {len(args.workloads)} workloads x {args.reps} reps "
        f"({args.seconds:g} s + {args.warmup:g} s warmup each): ~{n_runs * (args.seconds + args.warmup + 1.5) / 60:.1f} min")
    meta = dict(loadavg=" ".join(open("/proc/loadavg").read().split()[:3]), started=stamp, args={k: v for k, v in vars(args).items()}, host=os.uname().nodename,
                cpus=os.cpu_count(), versions={})
    for exe, flag in (("nbdkit", "--version"), ("qemu-nbd", "--version"), ("nbd-server", "-V"),
                      ("nbdcopy", "--version")):
        try:
            r = subprocess.run([exe, flag], capture_output=True, text=True, timeout=10)
            meta["versions"][exe] = (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            meta["versions"][exe] = f"? ({e})"

    raw = []
    problems = []
    verified = set()
    interrupted = False
    try:
        # Repetitions are the outer loop, so slow drifts of the shared machine
        # are spread over all servers instead of hitting one.
        for rep in range(args.reps):
            for s in args.servers:
                cls = SERVERS[s]
                for group, image, ro in ((read_wl, base, True), (write_wl, copies.get(s), False)):
                    if not group:
                        continue
                    srv = cls(args, image, ro, os.path.join(logdir, f"{s}.log"))
                    try:
                        srv.start()
                    except ServerError as e:
                        problems.append(f"rep {rep}: {s}: failed to start: {e}")
                        log(problems[-1])
                        for w in group:
                            raw.append(dict(server=s, workload=w, rep=rep, ok=False, error=str(e)))
                        continue
                    try:
                        if ro and not args.no_verify and s not in verified:
                            verified.add(s)
                            try:
                                t0 = time.monotonic()
                                verify(srv, image)
                                log(f"{s}: data verified ({time.monotonic() - t0:.1f} s)")
                            except ServerError as e:
                                problems.append(f"{s}: VERIFY FAILED: {e}")
                                log(problems[-1])
                        for w in group:
                            if not srv.alive():
                                log(f"{s}: restarting after crash")
                                srv.stop()
                                srv = cls(args, image, ro, os.path.join(logdir, f"{s}.log"))
                                try:
                                    srv.start()
                                except ServerError as e:
                                    problems.append(f"rep {rep}: {s}: failed to restart: {e}")
                                    log(problems[-1])
                                    raw.append(dict(server=s, workload=w, rep=rep, ok=False, error=str(e)))
                                    continue
                            try:
                                res = measure(args, srv, w, size)
                                row = dict(server=s, workload=w, rep=rep, ok=True, error="", **res)
                                log(f"rep {rep} {s:<10} {w:<10} iops={fmt(res['iops']):>9} "
                                    f"MB/s={fmt(res['mb_s'], 1):>8} p99={fmt(res['p99_us'], 1):>8}us "
                                    f"cpu/op={fmt(res['cpu_us_per_op'], 2):>7}us "
                                    f"cores={fmt(res['server_cores'], 2)}")
                            except ServerError as e:
                                row = dict(server=s, workload=w, rep=rep, ok=False, error=str(e))
                                problems.append(f"rep {rep}: {s} {w}: {e}")
                                log(problems[-1])
                            raw.append(row)
                            if not ro:
                                os.sync()  # write back outside the measurement
                    finally:
                        srv.stop()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up and reporting what was measured")
    finally:
        for srv in list(LIVE):
            srv.stop()

    workloads = [w for w in args.workloads if any(r["workload"] == w for r in raw)]
    servers = [s for s in args.servers if any(r["server"] == s for r in raw)]
    if not raw:
        sys.exit("nothing measured")
    summ = summarize(raw, servers, workloads)

    fields = ["server", "workload", "rep", "ok", "iops", "mb_s", "p50_us", "p99_us",
              "cpu_us_per_op", "server_cpu_s", "server_cores", "ops", "ops_all", "bytes",
              "seconds", "client_cpu_s", "client_cores", "multi_conn", "error"]
    with open(os.path.join(outdir, "raw.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        wr.writeheader()
        for r in raw:
            wr.writerow(r)
    sfields = ["workload", "label", "server", "reps", "failures", "iops", "mb_s", "p50_us", "p99_us",
               "cpu_us_per_op", "server_cores", "client_cores", "spread_pct", "thr_ratio_ours_over_this",
               "cpu_ratio_ours_over_this"]
    with open(os.path.join(outdir, "results.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=sfields, extrasaction="ignore")
        wr.writeheader()
        for w in workloads:
            for s in servers:
                d = dict(summ[(s, w)], label=WORKLOADS[w][0])
                me, _ = ours_and_peers(servers)
                if me:
                    o = summ[(me, w)]
                    d["thr_ratio_ours_over_this"] = ratio(o[THROUGHPUT_KEY[w]], d[THROUGHPUT_KEY[w]])
                    d["cpu_ratio_ours_over_this"] = ratio(o["cpu_us_per_op"], d["cpu_us_per_op"])
                wr.writerow(d)
    with open(os.path.join(outdir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)

    with open(os.path.join(outdir, "report.txt"), "w") as out:
        hdr = (f"nbd benchmark {stamp}: {args.reps} rep(s) x {args.seconds:g} s (+{args.warmup:g} s warmup), "
               f"median shown; {os.cpu_count()} CPUs, loadavg at start {meta['loadavg']}\n"
               f"CPU us/op = server process tree utime+stime (incl. reaped children) / requests; "
               f"srv/cli cores = server/nbdload CPU s / wall s (cli near 1.0 = client-bound); "
               f"spread = (max-min)/median of throughput\n"
               f"ours = {args.nbdserver if any(x.startswith('ours') for x in servers) else '(not run)'}; nbdload client threads <= {args.client_threads}"
               + (f"; server cpus {args.server_cpus}" if args.server_cpus else "")
               + (f"; client cpus {args.client_cpus}" if args.client_cpus else ""))
        print(hdr)
        out.write(hdr + "\n")
        report(summ, servers, workloads, out)
        if problems or interrupted:
            items = problems + (["run was interrupted: results are partial"] if interrupted else [])
            msg = "\n== Problems\n" + "\n".join("  " + p for p in items)
            print(msg)
            out.write(msg + "\n")
    try:
        chart(summ, servers, workloads, os.path.join(outdir, "chart.png"))
    except Exception:  # noqa: BLE001  (a missing matplotlib must not lose the results)
        log("chart failed:\n" + traceback.format_exc())
    log(f"results in {outdir}")
    return 1 if (problems or interrupted) else 0


if __name__ == "__main__":
    sys.exit(main())
