#!/usr/bin/python3
"""The node agent's CPU per 64 KiB chunk, on loopback, with the recorded boot.

One server (`--store --http`, the tracker), then node agents that replay the
reads of bench/boot-trace.txt.gz (QD1, in trace order, through libnbd on the
agent's Unix socket) one after the other:

  seed     agent n0, peers on, the first: every chunk comes from the server
  peer     agent nK, peers on: every chunk comes from n0 (which serves it)
  off      agent nK, --peers off: every read goes to the node's view

For each phase it prints the reading agent's CPU (`perf stat -e task-clock`
when perf is there; the user/sys split from /proc/PID/stat's ticks) per
chunk it fetched and per read, and for `peer` also the
CPU the serving agent n0 spent meanwhile. `--reps` repeats `peer` and `off`
with fresh nodes (medians). `--wrap "valgrind --tool=callgrind ..."` runs
the reading agents of `peer` under a tool (then --peer-timeout-ms is
raised), `--perf DIR` records them with `perf record -e cpu-clock -g`.

    /usr/bin/python3 bench/agentcpu.py [--nbdserver build/nbdserver/nbdserver]
"""

import argparse
import gzip
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import nbd

BENCH = os.path.dirname(os.path.abspath(__file__))
CHUNK = 65536
TICK = os.sysconf("SC_CLK_TCK")


def read_trace(path):
    size, reads = None, []
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.startswith("# image-size "):
                size = int(line.split()[2])
            if line.startswith("#") or not line.strip():
                continue
            _, op, off, length = line.split()[:4]
            if op == "R":
                reads.append((int(off), int(length)))
    return size, reads


def make_store(work, size, reads):
    """A store with lab@g1: random bytes in the chunks the trace reads
    (holes elsewhere), and its chunks.sha256."""
    store = os.path.join(work, "store")
    shutil.rmtree(store, ignore_errors=True)
    gdir = os.path.join(store, "images", "lab", "generations", "g1")
    os.makedirs(gdir)
    os.makedirs(os.path.join(store, "nodes"))
    touched = sorted({c for off, n in reads for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1)})
    rnd = random.Random(7)
    nchunks = (size + CHUNK - 1) // CHUNK
    zero = hashlib.sha256(bytes(CHUNK)).digest()
    table = bytearray(zero * nchunks)
    with open(os.path.join(gdir, "image.ext4"), "wb") as f:
        for c in touched:
            data = rnd.randbytes(min(CHUNK, size - c * CHUNK))
            f.seek(c * CHUNK)
            f.write(data)
            table[c * 32:(c + 1) * 32] = hashlib.sha256(data).digest()
        f.truncate(size)
    if size % CHUNK and (nchunks - 1) not in touched:
        table[-32:] = hashlib.sha256(bytes(size % CHUNK)).digest()
    with open(os.path.join(gdir, "manifest.json"), "w") as f:
        json.dump({"image": "lab", "generation": "g1", "parent": None, "format": "full",
                   "size": size, "block_size": 4096}, f)
    os.symlink(os.path.join("generations", "g1"), os.path.join(store, "images", "lab", "current"))
    tag = 1469598103934665603
    for b in b"lab@g1":
        tag = ((tag ^ b) * 0x100000001b3) & 0xffffffffffffffff
    head = struct.pack("<8sIIIIII QQQ 32s 36x", b"NBDRCHKS", 1, 128, 1, 32, CHUNK, 0, size,
                       nchunks, tag, hashlib.sha256(table).digest())
    head += struct.pack("<I", zlib.crc32(head))
    with open(os.path.join(gdir, "chunks.sha256"), "wb") as f:
        f.write(head + table)
    return store, len(touched)


def wait_file(path, proc, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                lines = [l.split() for l in f if l.strip()]
            if lines:
                return lines
        if proc.poll() is not None:
            sys.exit(f"{what} exited with status {proc.returncode}")
        time.sleep(0.02)
    sys.exit(f"{what} not ready after {timeout} s")


def spawn(argv, log):
    with open(log, "ab") as f:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f)


def cpu(pid):
    """(utime, stime) in seconds of a process, its exited threads included
    (the scheduler's tick accounting: 10 ms steps, statistical)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


class TaskClock:
    """perf stat -e task-clock on a process, threads made later included:
    the CPU time the scheduler measured, in ns, not ticks. None without perf."""

    def __init__(self, pid, path):
        self.path = path
        try:
            self.p = subprocess.Popen(["perf", "stat", "-e", "task-clock", "-x", ",", "-p", str(pid),
                                       "-o", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except FileNotFoundError:
            self.p = None
        time.sleep(0.3)  # perf attaches (no known point to wait for)

    def stop(self):
        if not self.p:
            return None
        self.p.send_signal(signal.SIGINT)
        self.p.wait()
        with open(self.path) as f:
            for line in f:
                if "task-clock" in line:
                    return float(line.split(",")[0]) / 1e3  # msec -> s
        return None


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Run:
    def __init__(self, args, work):
        self.args, self.work = args, work
        self.procs = []

    def server(self, store):
        ready = os.path.join(self.work, "server.ready")
        p = spawn([self.args.nbdserver, "--listen", "127.0.0.1:0", "--store", store,
                   "--threads", "2", "--http", "127.0.0.1:0", "--ready-file", ready],
                  os.path.join(self.work, "server.log"))
        self.procs.append(p)
        lines = wait_file(ready, p, "the server")
        self.nbd = next(l[0] for l in lines if not l[0].startswith("http://"))
        self.http = next(l[0][len("http://"):] for l in lines if l[0].startswith("http://"))
        return p

    def agent(self, node, peers, wrap=(), extra=()):
        sock = os.path.join(self.work, f"{node}.sock")
        ready = os.path.join(self.work, f"{node}.ready")
        argv = [*wrap, self.args.nbdserver, "node", "--server", self.nbd, "--export", f"lab/{node}",
                "--socket", sock, "--stats-file", os.path.join(self.work, f"{node}.stats"),
                "--ready-file", ready, *extra]
        if peers:
            argv += ["--tracker", self.http, "--peer-listen", "127.0.0.1:0"]
        else:
            argv += ["--peers", "off"]
        p = spawn(argv, os.path.join(self.work, f"{node}.log"))
        self.procs.append(p)
        wait_file(ready, p, f"agent {node}", timeout=300)
        return p, sock

    def stats(self, node):
        with open(os.path.join(self.work, f"{node}.stats")) as f:
            return json.load(f)


def replay(sock, reads):
    h = nbd.NBD()
    h.connect_unix(sock)
    t0 = time.monotonic()
    for off, n in reads:
        h.pread(n, off)
    t = time.monotonic() - t0
    h.shutdown()
    return t


def phase(run, node, peers, reads, serving=None, wrap=(), extra=(), perf=None):
    p, sock = run.agent(node, peers, wrap, extra)
    rec = None
    if perf:
        rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-g", "-q", "-p", str(p.pid),
                                "-o", os.path.join(perf, f"{node}.perf.data")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # perf attaches (no known point to wait for; a profile only)
    tc = TaskClock(p.pid, os.path.join(run.work, f"{node}.task-clock"))
    tcs = TaskClock(serving.pid, os.path.join(run.work, f"{node}.serving.task-clock")) if serving else None
    a0, s0 = cpu(p.pid), cpu(serving.pid) if serving else (0, 0)
    wall = replay(sock, reads)
    a1, s1 = cpu(p.pid), cpu(serving.pid) if serving else (0, 0)
    task, task_s = tc.stop(), tcs.stop() if tcs else None
    time.sleep(0.3)  # the stats file is rewritten every 250 ms
    if rec:
        rec.send_signal(signal.SIGINT)
        rec.wait()
    st = run.stats(node)
    stop(p)
    chunks = (st["gen_server_bytes"] + st["gen_peer_bytes"]) / CHUNK
    return {"node": node, "wall": wall, "user": a1[0] - a0[0], "sys": a1[1] - a0[1],
            "serve_user": s1[0] - s0[0], "serve_sys": s1[1] - s0[1], "chunks": chunks,
            "task": task, "serve_task": task_s,
            "peer_chunks": st["gen_peer_bytes"] / CHUNK, "server_chunks": st["gen_server_bytes"] / CHUNK,
            "peer_failures": st["peer_failures"], "view_mb": st["view_read_bytes"] / 1e6}


def show(name, rs, nreads):
    def med(k):
        return statistics.median(r[k] for r in rs)
    cpu_ms = med("user") * 1e3 + med("sys") * 1e3
    src = "ticks"
    if all(r.get("task") for r in rs):
        cpu_ms, src = med("task") * 1e3, "task-clock"
    chunks = med("chunks") or None
    line = (f"{name:5} wall {med('wall'):6.2f} s  agent CPU {cpu_ms:7.1f} ms {src} "
            f"(user {med('user') * 1e3:.0f}, sys {med('sys') * 1e3:.0f})  "
            f"{cpu_ms / nreads:.3f} ms/read")
    if chunks:
        line += (f"  {cpu_ms / chunks:.3f} ms/chunk ({med('peer_chunks'):.0f} from peers, "
                 f"{med('server_chunks'):.0f} from the server, {med('peer_failures'):.0f} peer failures)")
    if name == "peer":
        sv = (med("serve_user") + med("serve_sys")) * 1e3
        if all(r.get("serve_task") for r in rs):
            sv = med("serve_task") * 1e3
        line += f"\n      serving agent CPU {sv:.1f} ms, {sv / max(1, med('peer_chunks')):.3f} ms/chunk served"
    print(line, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nbdserver", default=os.path.join(os.path.dirname(BENCH), "build/nbdserver/nbdserver"))
    ap.add_argument("--trace", default=os.path.join(BENCH, "boot-trace.txt.gz"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--phases", default="seed,peer,off")
    ap.add_argument("--wrap", default="", help="a command the reading agents of `peer` run under")
    ap.add_argument("--perf", metavar="DIR", help="perf record the reading agents into DIR")
    ap.add_argument("--agent-arg", action="append", default=[], help="an extra agent argument")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    size, reads = read_trace(args.trace)
    work = args.workdir or tempfile.mkdtemp(prefix="agentcpu", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    store, touched = make_store(work, size, reads)
    print(f"trace: {len(reads)} reads, {sum(n for _, n in reads) / 1e6:.1f} MB, {touched} chunks; "
          f"workdir {work}; load {os.getloadavg()[0]:.1f}", flush=True)
    phases = args.phases.split(",")
    run = Run(args, work)
    try:
        run.server(store)
        seed, _ = run.agent("n0", True, extra=args.agent_arg)
        # The seed's CPU, measured on n0 itself (it keeps serving afterwards).
        tc = TaskClock(seed.pid, os.path.join(work, "n0.task-clock"))
        a0 = cpu(seed.pid)
        wall = replay(os.path.join(work, "n0.sock"), reads)
        a1 = cpu(seed.pid)
        task = tc.stop()
        time.sleep(0.3)
        st = run.stats("n0")
        seed_r = {"wall": wall, "user": a1[0] - a0[0], "sys": a1[1] - a0[1], "task": task, "serve_user": 0,
                  "serve_sys": 0, "chunks": st["gen_server_bytes"] / CHUNK, "peer_chunks": 0,
                  "server_chunks": st["gen_server_bytes"] / CHUNK, "peer_failures": 0}
        if "seed" in phases:
            show("seed", [seed_r], len(reads))
        wrap = shlex.split(args.wrap)
        extra = list(args.agent_arg) + (["--peer-timeout-ms", "600000"] if wrap else [])
        if args.perf:
            os.makedirs(args.perf, exist_ok=True)
        k = 1
        for name in ("peer", "off"):
            if name not in phases:
                continue
            rs = []
            for _ in range(args.reps):
                rs.append(phase(run, f"n{k}", name == "peer", reads, serving=seed,
                                wrap=wrap if name == "peer" else (),
                                extra=extra if name == "peer" else (),
                                perf=args.perf if name == "peer" else None))
                k += 1
            show(name, rs, len(reads))
    finally:
        for p in reversed(run.procs):
            stop(p)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
