#!/usr/bin/python3
"""Boot storm: N simulated nodes replay a recorded boot at once (nbdstorm),
against three setups of one nbdserver on the same machine and in the same
run:

  plain     a writable copy of the image served with --export plain=FILE;
            every node writes into that one file
  first     node views created at first attach: a fresh store's nodes/, so
            every node's connect creates node-i (node.json, diff, bitmap,
            map log) and its first flushes persist new maps
  existing  the same node views again, in a new server: every node exists
            and its blocks are dirty already
  nbdkit    (opt-in) nbdkit --filter=cow over the same image: every node
            reads the image and writes into nbdkit's one overlay

With --tls every server requires TLS and node i connects with the
pre-shared key of identity node-i (one key file, a line per node, given to
the server and to nbdstorm).

Prints wall time (the slowest node), p50 and p99 per node, the server's CPU
time, how busy the machine's CPUs were, and the ratios to plain.  See
bench/README.md, "Boot storm (storm.py)".

With --floor it also runs nbdstorm --files (the trace's writes and flushes
for N nodes into N files of their own, with no NBD, network or server) with
and without the flushes, in the same directory, and once more with a block
map per node persisted after the diff (--maps), and prints what making N
distinct diffs durable costs the kernel alone, counted in the process and
on every CPU: with the plain storm CPU-bound, an estimate of the least wall
time views can take on this filesystem (bench/README.md, "The floor").

    /usr/bin/python3 bench/storm.py                   # 200 nodes, 3 reps
    /usr/bin/python3 bench/storm.py --nodes 50 --reps 5
    /usr/bin/python3 bench/storm.py --setups first,existing
    /usr/bin/python3 bench/storm.py --setups first,existing,nbdkit --tls
    /usr/bin/python3 bench/storm.py --floor
"""

import argparse
import datetime
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)
import run as rb  # noqa: E402  (bench/run.py: helpers only)

log = rb.log
median = rb.median
SETUPS = ("plain", "first", "existing", "nbdkit")
DEFAULT_SETUPS = ("plain", "first", "existing")
LABEL = {"plain": "plain export (--export, writable copy)",
         "first": "node views, created at first attach",
         "existing": "node views, existing (second run)",
         "nbdkit": "nbdkit --filter=cow (one overlay)"}
MiB = 1 << 20


# --------------------------------------------------------------------------
# The trace and the image


def read_trace(path):
    """(image size from the header, [(op, offset, length)])."""
    size, reqs = None, []
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        for line in f:
            if line.startswith("# image-size "):
                size = int(line.split()[2])
            if line.startswith("#") or not line.strip():
                continue
            _, op, off, length = line.split()[:4]
            reqs.append((op, int(off), int(length)))
    if size is None:
        size = max(o + n for _, o, n in reqs)
    return size, reqs


def trace_summary(reqs):
    n = {op: 0 for op in "RWFTZ"}
    b = {op: 0 for op in "RWFTZ"}
    for op, _, length in reqs:
        n[op] += 1
        b[op] += length
    return n, b


def prepare_image(workdir, size, reqs):
    """workdir/base.img: `size` bytes, random data wherever the trace reads
    or writes, holes elsewhere (what the boot never touches costs nothing).
    Reused when it matches."""
    path = os.path.join(workdir, "base.img")
    stamp = os.path.join(workdir, "base.img.ranges")
    ranges = merge((off, off + n) for op, off, n in reqs if op in "RW" and n)
    want = json.dumps([size, ranges])
    if os.path.exists(path) and os.path.exists(stamp) and open(stamp).read() == want:
        log(f"reusing {path}")
    else:
        log(f"creating {path} ({size / MiB:.0f} MiB, {sum(e - s for s, e in ranges) / MiB:.1f} "
            f"MiB of data in {len(ranges)} ranges)")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.truncate(size)
            for s, e in ranges:
                f.seek(s)
                f.write(os.urandom(e - s))
        os.replace(tmp, path)
        with open(stamp, "w") as f:
            f.write(want)
    return path


def merge(ranges):
    out = []
    for s, e in sorted(ranges):
        s, e = s // 4096 * 4096, (e + 4095) // 4096 * 4096
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def make_store(workdir, base):
    """workdir/store with generation lab/g1, its image a hard link to
    base.img (one page cache for all setups)."""
    store = os.path.join(workdir, "store")
    gdir = os.path.join(store, "images", "lab", "generations", "g1")
    img = os.path.join(gdir, "image.ext4")
    if not (os.path.exists(img) and os.stat(img).st_ino == os.stat(base).st_ino):
        shutil.rmtree(store, ignore_errors=True)
        os.makedirs(gdir)
        os.link(base, img)
        with open(os.path.join(gdir, "manifest.json"), "w") as f:
            json.dump({"image": "lab", "generation": "g1", "parent": None, "format": "full",
                       "size": os.path.getsize(base), "block_size": 4096}, f)
        os.symlink(os.path.join("generations", "g1"),
                   os.path.join(store, "images", "lab", "current"))
    os.makedirs(os.path.join(store, "nodes"), exist_ok=True)
    return store


def fstype(path):
    r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", path], capture_output=True,
                       text=True, timeout=10)
    return (r.stdout.strip().splitlines() or ["?"])[0]


def cpu_ticks():
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def clear_nodes(store):
    nodes = os.path.join(store, "nodes")
    shutil.rmtree(nodes, ignore_errors=True)
    os.makedirs(nodes)


# --------------------------------------------------------------------------
# One storm


class Server(rb.Server):
    name = "nbdserver"

    def __init__(self, args, store, plain, logpath):
        super().__init__(args, None, False, logpath)
        self.store, self.plain = store, plain

    def start(self):
        ready = os.path.join(self.args.workdir, f"server-{os.getpid()}.ready")
        if os.path.exists(ready):
            os.unlink(ready)
        self.tmpfiles.append(ready)
        argv = [self.args.nbdserver, "--listen", "127.0.0.1:0", "--ready-file", ready,
                "--store", self.store, "--log-level", "warn"]
        if self.plain:
            argv += ["--export", f"plain={self.plain}"]
        if self.args.server_threads:
            argv += ["--threads", str(self.args.server_threads)]
        if self.args.tls:
            argv += ["--tls", "require", "--tls-psk-file", self.args.psk_file]
        argv += self.args.server_arg
        self._spawn(argv)
        deadline = time.monotonic() + 20
        while True:
            self.check_alive()
            try:
                lines = open(ready).read().split()
                if lines:
                    self.port = int(lines[0].rpartition(":")[2])
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise rb.ServerError(f"no ready file after 20 s (log: {self.logpath})")
            time.sleep(0.02)


class NbdkitCow(rb.Server):
    """nbdkit's cow filter over the image: all nodes share one overlay, in
    the workdir. With args.tls it requires TLS with args.psk_file's keys
    (and with args.nbdkit_aes it leaves ChaCha20 out)."""

    name = "nbdkit"
    export = ""

    def __init__(self, args, image, readonly, logpath):
        super().__init__(args, image, readonly, logpath)
        self.tls = args.tls  # uri() for the readiness probe

    def command(self, port):
        argv = ["nbdkit", "-f", "--exit-with-parent", "-p", str(port), "-i", "127.0.0.1"]
        if self.args.tls:
            argv += ["--tls=require", f"--tls-psk={self.args.psk_file}"]
        return argv + ["--filter=cow", "file", self.image, "cow-block-size=4096"]

    def env(self):
        env = {"TMPDIR": self.args.workdir}
        if self.args.tls and getattr(self.args, "nbdkit_aes", False):
            env.update(rb.no_chacha_env(self.args.workdir))
        return env


def write_node_keys(args):
    """args.psk_file: a key for each node-i, and for run.py's identity, which
    nbdinfo uses to see that a server is up."""
    rb.write_psk_file(args.psk_file, [rb.TLS_IDENTITY] + [f"node-{i}" for i in range(args.nodes)])


def storm_uri(args, setup, port):
    """nbdstorm's --uri for a setup: node %d connects as node-%d under TLS."""
    export = {"plain": "plain", "nbdkit": ""}.get(setup, "lab/node-%d")
    if args.tls:
        return f"nbds://node-%d@127.0.0.1:{port}/{export}?tls-psk-file={args.psk_file}"
    return f"nbd://127.0.0.1:{port}/{export}"


def storm(args, setup, store, base, outdir, rep):
    """Runs one storm; returns the result dict."""
    plain = None
    if setup == "plain":
        plain = os.path.join(args.workdir, "plain.img")
        subprocess.run(["cp", "--sparse=always", base, plain], check=True)
    if setup == "first":
        clear_nodes(store)
    os.sync()  # no writeback of an earlier setup during this one
    for p in (base, plain):
        if p:
            rb.warm_cache(p)
    tls = ("-tls-aes" if getattr(args, "nbdkit_aes", False) and setup == "nbdkit" else "-tls"
           ) if args.tls else ""
    tag = f"{setup}{tls}-{rep}"
    logpath = os.path.join(outdir, "logs", f"{tag}.log")
    srv = (NbdkitCow(args, base, False, logpath) if setup == "nbdkit"
           else Server(args, store, plain, logpath))
    srv.start()
    try:
        uri = storm_uri(args, setup, srv.port)
        per_node = os.path.join(outdir, f"pernode-{tag}.txt")
        argv = [args.nbdstorm, "--trace", args.trace, "--uri", uri, "--nodes", str(args.nodes),
                "--qd", str(args.qd), "--threads", str(args.client_threads),
                "--per-node", per_node]
        cpu0 = rb.tree_cpu_seconds(srv.pid)
        box0 = cpu_ticks()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout + 60)
        box1 = cpu_ticks()
        cpu1 = rb.tree_cpu_seconds(srv.pid)
        srv.check_alive()
        if p.returncode != 0:
            raise rb.ServerError(f"{setup}: nbdstorm exited {p.returncode}: {p.stderr.strip()}")
        res = json.loads(p.stdout)
        res.update(setup=setup, rep=rep, tls=args.tls, server_cpu_s=round(cpu1 - cpu0, 2),
                   box_busy=round((box1[0] - box0[0]) / max(1, box1[1] - box0[1]), 3))
        return res
    finally:
        srv.stop()
        if plain:
            os.unlink(plain)


# --------------------------------------------------------------------------
# Report


def fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def report(args, results, summary, out, floor=None):
    lines = [f"{'setup':<42} {'wall s':>7} {'p50 s':>7} {'p99 s':>7} {'conn max':>8} "
             f"{'srv CPU s':>9} {'busy':>5} {'wall/plain':>10} {'p50/plain':>9} {'p99/plain':>9}  "
             f"runs (wall s)"]
    med = {}
    for s in args.setups:
        rs = [r for r in results if r["setup"] == s]
        if rs:
            med[s] = {k: median([r[k] for r in rs]) for k in ("wall_s", "p50_s", "p99_s",
                                                             "connect_max_s", "server_cpu_s",
                                                             "box_busy")}
            med[s]["runs"] = [r["wall_s"] for r in rs]
    ref = med.get("plain")
    for s, m in med.items():
        def rt(k):
            return fmt(m[k] / ref[k]) + "x" if ref and ref[k] else "-"
        lines.append(f"{LABEL[s]:<42} {fmt(m['wall_s']):>7} {fmt(m['p50_s']):>7} "
                     f"{fmt(m['p99_s']):>7} {fmt(m['connect_max_s']):>8} {fmt(m['server_cpu_s']):>9} "
                     f"{m['box_busy'] * 100:>4.0f}% {rt('wall_s'):>10} "
                     f"{rt('p50_s'):>9} {rt('p99_s'):>9}  "
                     + " ".join(fmt(w) for w in m["runs"]))
    if ref:
        lines.append("")
        for s, target in (("existing", 1.1), ("first", 1.3)):
            if s in med:
                r = med[s]["wall_s"] / ref["wall_s"]
                lines.append(f"target {s}/plain wall <= {target}: {r:.2f} "
                             f"{'met' if r <= target else 'NOT met'}")
    if ref and floor:
        lines += floor_lines(args, floor, ref)
    text = "\n".join(lines)
    print(text)
    out.write(text + "\n")
    summary.update(medians=med, floor=floor)


# --------------------------------------------------------------------------
# The floor: the kernel's cost of making N distinct diffs durable


def run_floor(args, d, flush, maps=False):
    argv = [args.nbdstorm, "--trace", args.trace, "--files", d, "--nodes", str(args.nodes)]
    if not flush:
        argv.append("--no-flush")
    if maps:
        argv.append("--maps")
    box0 = cpu_ticks()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout + 60)
    box1 = cpu_ticks()
    if p.returncode != 0:
        raise rb.ServerError(f"nbdstorm --files exited {p.returncode}: {p.stderr.strip()}")
    os.sync()  # nothing it left dirty is written back during the next run
    res = json.loads(p.stdout)
    # Every CPU's busy time over the run: the process, and the writeback,
    # interrupts and block layer work its fdatasyncs cause elsewhere.
    res["box_cpu_s"] = (box1[0] - box0[0]) / os.sysconf("SC_CLK_TCK")
    return res


# The floor's rows: kind (its runs' key), label, and the issue's target.
FLOOR_ROWS = (("first", "first nodes, diffs only", 1.3),
              ("first_maps", "first nodes, diffs and maps", 1.3),
              ("existing", "existing nodes (no map changes)", 1.1))


def floor_runs(args):
    """Per rep: new files with and without the flushes, new files with the
    flushes and a block map per node (--maps), then the first ones again
    (existing nodes: no map changes) without and with the flushes. Returns
    medians of the CPU each costs, the process's and the whole machine's,
    and of the flushes' share (flush run - no-flush run)."""
    rows = []
    for rep in range(args.reps):
        dirs = [os.path.join(args.workdir, f"floor-{k}") for k in ("a", "b", "c")]
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        os.sync()
        runs = {"first": run_floor(args, dirs[0], True),
                "first_noflush": run_floor(args, dirs[1], False),
                "first_maps": run_floor(args, dirs[2], True, maps=True),
                "existing_noflush": run_floor(args, dirs[0], False),
                "existing": run_floor(args, dirs[0], True)}
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        row = dict(rep=rep, flushes=runs["first"]["flushes"], bytes=runs["first"]["bytes"],
                   map_writes=runs["first_maps"]["map_writes"])
        for k, r in runs.items():
            row[f"{k}_cpu_s"], row[f"{k}_box_s"], row[f"{k}_wall_s"] = (
                r["cpu_s"], r["box_cpu_s"], r["wall_s"])
        for k, _, _ in FLOOR_ROWS:
            nf = "existing_noflush" if k == "existing" else "first_noflush"
            row[f"{k}_extra_cpu_s"] = row[f"{k}_cpu_s"] - row[f"{nf}_cpu_s"]
            row[f"{k}_extra_box_s"] = row[f"{k}_box_s"] - row[f"{nf}_box_s"]
        log(f"floor rep {rep}: extra CPU of the flushes, this process / all CPUs: new files "
            f"{row['first_extra_cpu_s']:.2f} / {row['first_extra_box_s']:.2f} s, with maps "
            f"{row['first_maps_extra_cpu_s']:.2f} / {row['first_maps_extra_box_s']:.2f}, "
            f"existing {row['existing_extra_cpu_s']:.2f} / {row['existing_extra_box_s']:.2f}")
        rows.append(row)
    med = {k: median([r[k] for r in rows]) for k in rows[0] if k != "rep"}
    med["runs"] = rows
    return med


def floor_lines(args, floor, ref):
    """The floor, and the estimate it gives of the views' least wall time
    when the plain storm keeps every CPU busy: plain wall + extra CPU / CPUs
    (not a strict bound: plain's own flushes are not subtracted)."""
    cpus = os.cpu_count() or 1
    out = ["",
           f"floor (nbdstorm --files: the trace's writes and flushes for {args.nodes} nodes into "
           f"{args.nodes} files of their own, no NBD, network or server; {floor['flushes']:.0f} "
           f"fdatasyncs, {floor['bytes'] / 1e6:.0f} MB; with maps also {floor['map_writes']:.0f} "
           f"map slots written and fdatasynced after the diff's, as a view's flush does). "
           f"Extra CPU = with the flushes less without; 'process' counts nbdstorm only, "
           f"'machine' every CPU's busy time during the run (writeback, interrupts). The plain "
           f"storm keeps {ref['box_busy'] * 100:.0f} % of {cpus} CPUs busy, so the views' wall "
           f"is about plain's + extra / {cpus} at least (an estimate: plain's own flushes are "
           f"not subtracted):"]
    out.append(f"  {'':<34} {'extra CPU process':>17} {'machine':>8} "
               f"{'est. process':>13} {'machine':>8} {'target':>6}")
    for k, label, target in FLOOR_ROWS:
        ep, em = floor[f"{k}_extra_cpu_s"], floor[f"{k}_extra_box_s"]
        bp, bm = ((ref["wall_s"] + e / cpus) / ref["wall_s"] for e in (ep, em))
        out.append(f"  {label:<34} {ep:>15.2f} s {em:>6.2f} s {bp:>12.2f}x {bm:>7.2f}x "
                   f"{target:>6}")
    return out


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=os.path.join(BENCH_DIR, "boot-trace.txt.gz"))
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--qd", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3,
                    help="repetitions of all setups (in order: plain, first, existing)")
    ap.add_argument("--setups", default=",".join(DEFAULT_SETUPS),
                    help=f"comma list of {', '.join(SETUPS)}")
    ap.add_argument("--workdir", default="/var/tmp/nbdroot-storm",
                    help="image, store and plain copy (on the disk: flushes are real)")
    ap.add_argument("--outdir", help="default bench/results/storm-<timestamp>")
    ap.add_argument("--nbdserver", default=os.path.join(REPO, "build", "nbdserver", "nbdserver"))
    ap.add_argument("--nbdstorm", default=os.path.join(REPO, "build", "bench", "nbdstorm"))
    ap.add_argument("--floor", action="store_true",
                    help="also measure the kernel's cost of persisting N distinct diffs "
                         "(nbdstorm --files) and the lower bound it sets")
    ap.add_argument("--server-threads", type=int, default=0, help="nbdserver --threads")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra nbdserver argument (repeatable)")
    ap.add_argument("--client-threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per storm")
    ap.add_argument("--tls", action="store_true",
                    help="servers require TLS; node i authenticates as node-i with its own key")
    ap.add_argument("--nbdkit-aes", action="store_true",
                    help="with --tls: ChaCha20 disabled in nbdkit, so that it negotiates "
                         "AES-128-GCM as nbdserver does (its default is ChaCha20)")
    args = ap.parse_args()
    args.setups = [s for s in args.setups.split(",") if s]
    for s in args.setups:
        if s not in SETUPS:
            ap.error(f"unknown setup {s!r} (expected {', '.join(SETUPS)})")
    if "existing" in args.setups and "first" not in args.setups and args.reps > 0:
        log("note: 'existing' without 'first' reuses whatever nodes the store holds")
    args.server_cpus = None  # rb.Server reads it
    args.workdir = os.path.abspath(args.workdir)
    args.psk_file = os.path.join(args.workdir, "nodes.psk")
    return args


def main():
    args = parse_args()
    rb.adopt_orphans_and_stop_on_signals()
    for exe in (args.nbdserver, args.nbdstorm):
        if not os.access(exe, os.X_OK):
            sys.exit(f"{exe} not found (ninja -C build nbdserver nbdstorm, or pass the path)")
    if "nbdkit" in args.setups and not shutil.which("nbdkit"):
        sys.exit("nbdkit not installed (apt-get install nbdkit), needed by --setups nbdkit")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outdir = args.outdir or os.path.join(BENCH_DIR, "results", f"storm-{stamp}")
    os.makedirs(os.path.join(outdir, "logs"), exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    if args.tls:
        write_node_keys(args)

    size, reqs = read_trace(args.trace)
    n, b = trace_summary(reqs)
    base = prepare_image(args.workdir, size, reqs)
    store = make_store(args.workdir, base)
    header = (f"boot storm {stamp}: {args.nodes} nodes x {len(reqs)} requests "
              f"({n['R']} reads {b['R'] / 1e6:.1f} MB, {n['W']} writes {b['W'] / 1e6:.1f} MB, "
              f"{n['F']} flushes, {n['T'] + n['Z']} trims/zeroes) at QD{args.qd}; "
              f"trace {os.path.relpath(args.trace, REPO)}; image {size / MiB:.0f} MiB in "
              f"{args.workdir} ({fstype(args.workdir)}); "
              f"{args.reps} rep(s), median shown; {os.cpu_count()} CPUs, loadavg "
              f"{' '.join(open('/proc/loadavg').read().split()[:3])}\n"
              f"server {args.nbdserver}"
              f"{'; TLS required, node-i authenticates with its own key' if args.tls else ''}"
              f"; conn max = the last node's handshake done (s); "
              f"srv CPU = utime+stime of the server during the storm")
    print(header)
    results, problems, floor = [], [], None
    try:
        if args.floor:
            floor = floor_runs(args)
        for rep in range(args.reps):
            for s in args.setups:
                r = storm(args, s, store, base, outdir, rep)
                log(f"rep {rep} {s}: wall {r['wall_s']:.2f} s p50 {r['p50_s']:.2f} "
                    f"p99 {r['p99_s']:.2f} connect max {r['connect_max_s']:.2f} "
                    f"server CPU {r['server_cpu_s']:.2f} s")
                results.append(r)
    except KeyboardInterrupt:
        problems.append("interrupted: results are partial")
    except rb.ServerError as e:
        problems.append(str(e))
    finally:
        for srv in list(rb.LIVE):
            srv.stop()
    summary = dict(header=header, results=results, problems=problems)
    with open(os.path.join(outdir, "storm-report.txt"), "w") as out:
        out.write(header + "\n")
        report(args, results, summary, out, floor)
        for p in problems:
            print("problem: " + p)
            out.write("problem: " + p + "\n")
    with open(os.path.join(outdir, "storm.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"results in {outdir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
