#!/usr/bin/python3
"""Copy-on-write benchmark: nbdserver's node views (IMAGE/NODE exports of a
--store) against the plain image, and against nbdkit's cow filter and
qemu-nbd with a qcow2 overlay.  See bench/README.md, "Copy-on-write
benchmark (cow.py)".  Typical use:

    /usr/bin/python3 bench/cow.py                 # full run, ~12 minutes
    /usr/bin/python3 bench/cow.py --quick         # 1 rep x 2 s
    /usr/bin/python3 bench/cow.py --parts read --reps 5

Three parts, each an outer loop over repetitions with every variant run
inside each repetition (A B C, A B C, ...), medians reported:

  read   reads through node views with 0 %, 10 % and 90 % of the blocks
         dirty, against the same image served as a plain file export and as
         the store's read-only image export; ratio view / plain.
  write  4K random writes (and 1K writes at 512-byte offsets) into a fresh
         view, a fresh nbdkit cow overlay and a fresh qcow2 overlay.
  flush  the 4K random writes with a FLUSH every N writes; plus ours on a
         64 MiB range, into a fresh view (every flush persists a changed map)
         and into a view whose blocks there are all dirty already (the map
         never changes, so a flush is one fdatasync of the diff).

With --floor the read part also runs bench/iovfloor on the d10 and d90
diffs: what the kernel alone costs to copy a view's pieces (no server), and
the ceiling that puts on view/plain when the server's CPU is the limit.

Reuses run.py's process accounting, server start/stop and image helpers.
"""

import argparse
import csv
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
import run as rb  # noqa: E402  (bench/run.py: helpers only, its main() is not run)

log = rb.log
fmt = rb.fmt
ratio = rb.ratio
median = rb.median
ServerError = rb.ServerError

KiB, MiB = 1 << 10, 1 << 20

# --------------------------------------------------------------------------
# Workloads

# id -> (label, nbdload params)
READ_WL = {
    "rr4k_qd32": ("4K rand read QD32", dict(op="read", pattern="rand", bs=4096, qd=32)),
    "sr128k": ("128K seq read QD8", dict(op="read", pattern="seq", bs=128 * KiB, qd=8)),
    "sr1m": ("1M seq read QD8", dict(op="read", pattern="seq", bs=MiB, qd=8)),
}
WRITE_WL = {
    "rw4k_qd32": ("4K rand write QD32, fresh overlay",
                  dict(op="write", pattern="rand", bs=4096, qd=32)),
    "rw1k_u512_qd32": ("1K write at 512-byte offsets QD32, fresh overlay",
                       dict(op="write", pattern="rand", bs=1024, align=512, qd=32)),
}
# flush_every is filled in from --flush-every.
FLUSH_WL = {
    # 256 MiB, not the whole export: every run leaves its overlay on the disk,
    # and deleting one with 1 GiB of scattered blocks costs ~1 minute there.
    "rw4k_qd32_flush": ("4K rand write QD32 + FLUSH every N, fresh overlay, first 256 MiB",
                        dict(op="write", pattern="rand", bs=4096, qd=32, size_limit=256 * MiB)),
    "rw4k_qd32_flush_64m": ("4K rand write QD32 + FLUSH every N, first 64 MiB (ours only)",
                            dict(op="write", pattern="rand", bs=4096, qd=32, size_limit=64 * MiB)),
}
ALL_WL = {**READ_WL, **WRITE_WL, **FLUSH_WL}


def tkey(w):
    return "iops" if ALL_WL[w][1]["bs"] <= 4096 else "mb_s"


READ_VARIANTS = ["plain", "lab", "d0", "d10", "d90"]
CHANGED_VIEWS = ("d10", "d90")  # views with part of their blocks changed (--floor)
READ_LABEL = {"plain": "plain file (--export plain=FILE,ro)", "lab": "store image (lab, ro)",
              "d0": "view lab/d0 (0 % dirty)", "d10": "view lab/d10 (10 % dirty)",
              "d90": "view lab/d90 (90 % dirty)"}
DIRTY_TARGET = {"d0": 0.0, "d10": 0.10, "d90": 0.90}
WRITE_SERVERS = ["ours", "nbdkit-cow", "qemu-qcow2"]
FLUSH64_VARIANTS = ["ours-fresh", "ours-rewrite"]

# --------------------------------------------------------------------------
# Servers


def wait_ready_file(srv, ready, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        srv.check_alive()
        try:
            with open(ready) as f:
                line = f.read().strip().splitlines()
            if line:
                srv.port = int(line[0].rpartition(":")[2])
                return
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() > deadline:
            srv.stop()
            raise ServerError(f"{srv.name}: no ready file after {timeout:.0f} s (log: {srv.logpath})")
        time.sleep(0.02)


class OursStore(rb.Server):
    """nbdserver --store STORE [--export plain=FILE,ro].  self.export is the
    export used for the readiness check and for uri()."""

    name = "ours"

    def __init__(self, args, store, export, logpath, plain=None):
        super().__init__(args, None, False, logpath)
        self.store = store
        self.export = export
        self.plain = plain

    def uri_of(self, export):
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def start(self):
        ready = os.path.join(self.args.workdir, f"ours-{os.getpid()}-{id(self)}.ready")
        try:
            os.unlink(ready)
        except FileNotFoundError:
            pass
        self.tmpfiles.append(ready)
        argv = [self.args.nbdserver, "--listen", "127.0.0.1:0", "--ready-file", ready,
                "--store", self.store, "--log-level", "warn"]
        if self.plain:
            argv += ["--export", f"plain={self.plain},ro"]
        if self.args.ours_threads:
            argv += ["--threads", str(self.args.ours_threads)]
        argv += self.args.ours_arg
        self._spawn(argv)
        wait_ready_file(self, ready)
        try:
            self.wait_ready()
        except ServerError:
            self.stop()
            raise


class NbdkitCow(rb.Server):
    """nbdkit --filter=cow file BASE cow-block-size=N.  The overlay is a
    temporary file in $TMPDIR (set to the workdir), thrown away at exit."""

    name = "nbdkit-cow"

    def __init__(self, args, image, logpath, tmpdir):
        super().__init__(args, image, False, logpath)
        self.tmpdir = tmpdir

    def start(self):
        os.environ["TMPDIR"] = self.tmpdir  # where the filter puts its overlay
        super().start()

    def command(self, port):
        argv = ["nbdkit", "-f", "--exit-with-parent", "-p", str(port), "-i", "127.0.0.1"]
        if self.args.nbdkit_threads:
            argv += ["--threads", str(self.args.nbdkit_threads)]
        return argv + ["--filter=cow", "file", self.image,
                       f"cow-block-size={self.args.cow_block_size}"]


class QemuQcow2(rb.Server):
    """qemu-nbd on a fresh qcow2 overlay whose backing file is the raw image."""

    name = "qemu-qcow2"

    def __init__(self, args, image, logpath, overlay, keep=False):
        super().__init__(args, image, False, logpath)
        self.overlay = overlay
        if not keep:
            self.tmpfiles.append(overlay)

    def start(self):
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.image, "-F", "raw"]
        if self.args.qcow2_opts:
            argv += ["-o", self.args.qcow2_opts]
        r = subprocess.run(argv + [self.overlay], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise ServerError(f"qemu-img create failed: {r.stderr.strip()}")
        super().start()

    def command(self, port):
        return (["qemu-nbd", "-t", "-p", str(port), "-b", "127.0.0.1", "-f", "qcow2", "-x",
                 self.export] + self.args.qemu_nbd_opts.split() + [self.overlay])


def stop_all(servers):
    for s in servers:
        try:
            s.stop()
        except Exception:  # noqa: BLE001
            log("stop failed:\n" + traceback.format_exc())


# --------------------------------------------------------------------------
# Measuring


def run_load(args, uri, params, ops=None, seed=None, quiet_timing=False):
    """One nbdload run; returns its JSON (plus a few derived fields)."""
    argv = [args.nbdload, "--uri", uri, "--op", params["op"], "--pattern", params["pattern"],
            "--bs", str(params["bs"]), "--qd", str(params["qd"]), "--conns", "1",
            "--threads", "1", "--seed", str(args.seed if seed is None else seed)]
    if ops is not None:
        argv += ["--ops", str(ops)]
        limit = 600
    else:
        argv += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
        limit = args.seconds + args.warmup + 60
    if params.get("align"):
        argv += ["--align", str(params["align"])]
    if params.get("flush_every"):
        argv += ["--flush-every", str(params["flush_every"])]
    if params.get("size_limit"):
        argv += ["--size-limit", str(params["size_limit"])]
    if params.get("fua"):
        argv.append("--fua")
    if args.client_cpus:
        argv = ["taskset", "-c", args.client_cpus] + argv
    res = rb.exec_nbdload(argv, limit)
    return res


def minor_faults(pid):
    """Minor page faults of the process (all threads), field 10 of stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return int(data[data.rfind(")") + 2:].split()[7])
    except (OSError, ValueError, IndexError):
        return 0


def measure(args, srv, uri, params):
    """Runs one workload against a running server; adds server CPU."""
    srv.check_alive()
    base_n = len(rb.process_tree(srv.pid))
    cpu0 = rb.tree_cpu_seconds(srv.pid)
    flt0 = minor_faults(srv.pid)
    res = run_load(args, uri, params)
    rb.settle_tree(srv.pid, base_n)
    cpu1 = rb.tree_cpu_seconds(srv.pid)
    flt1 = minor_faults(srv.pid)
    srv.check_alive()
    cpu = cpu1 - cpu0
    secs = res["seconds"]
    out = dict(ops=res["ops"], ops_all=res["ops_all"], bytes=res["bytes"], seconds=secs,
               iops=res["iops"], mb_s=res["mb_s"], p50_us=res["lat_p50_us"],
               p99_us=res["lat_p99_us"], client_cpu_s=res["client_cpu_s"],
               client_cores=res["client_cpu_s"] / (secs + args.warmup) if secs else float("nan"),
               server_cpu_s=cpu,
               cpu_us_per_op=cpu / res["ops_all"] * 1e6 if res["ops_all"] else float("nan"),
               server_cores=cpu / secs if secs else float("nan"),
               faults_per_op=(flt1 - flt0) / res["ops_all"] if res["ops_all"] else float("nan"),
               flushes=res.get("flushes", 0),
               flushes_s=res.get("flushes", 0) / (secs + args.warmup) if secs else float("nan"))
    return out


def logline(part, rep, variant, w, res):
    log(f"{part} rep {rep} {variant:<12} {w:<19} iops={fmt(res['iops']):>9} "
        f"MB/s={fmt(res['mb_s'], 1):>8} p99={fmt(res['p99_us'], 1):>8}us "
        f"cpu/op={fmt(res['cpu_us_per_op'], 2):>7}us srv={fmt(res['server_cores'], 2)} "
        f"cli={fmt(res['client_cores'], 2)}"
        + (f" flushes/s={fmt(res['flushes_s'])}" if res.get("flushes") else ""))


# --------------------------------------------------------------------------
# Store


def make_store(topdir, base):
    """TOPDIR/store: images/lab/generations/g1/image.ext4 is base.img (a hard
    link, or a symbolic link on another file system: the same inode, so the
    same page cache as the plain export); nodes/ holds the node views."""
    store = os.path.join(topdir, "store")
    gdir = os.path.join(store, "images", "lab", "generations", "g1")
    img = os.path.join(gdir, "image.ext4")
    size = os.path.getsize(base)
    fresh = not (os.path.exists(img) and os.stat(img).st_ino == os.stat(base).st_ino
                 and os.path.exists(os.path.join(gdir, "manifest.json")))
    if fresh:
        log(f"creating store {store}")
        shutil.rmtree(store, ignore_errors=True)
        os.makedirs(gdir)
        if os.stat(topdir).st_dev == os.stat(base).st_dev:
            os.link(base, img)
        else:
            os.symlink(base, img)
        with open(os.path.join(gdir, "manifest.json"), "w") as f:
            json.dump({"image": "lab", "generation": "g1", "parent": None, "format": "full",
                       "size": size, "block_size": 4096}, f)
        os.symlink(os.path.join("generations", "g1"),
                   os.path.join(store, "images", "lab", "current"))
    os.makedirs(os.path.join(store, "nodes"), exist_ok=True)
    # Leftover write nodes of an interrupted run.
    for n in os.listdir(os.path.join(store, "nodes")):
        if n.startswith("w-"):
            shutil.rmtree(os.path.join(store, "nodes", n), ignore_errors=True)
    return store


def node_list(args, store):
    r = subprocess.run([args.nbdserver, "admin", "--store", store, "list", "--json"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise ServerError(f"admin list failed: {r.stderr.strip()}")
    data = json.loads(r.stdout)
    if isinstance(data, dict):
        data = data.get("nodes", [])
    return {n.get("node") or n.get("name"): n for n in data}


def dirty_fraction(info, size):
    for k in ("dirty_bytes", "dirty", "changed_bytes"):
        if k in info and isinstance(info[k], (int, float)):
            return info[k] / size
    return float("nan")


def prepare_nodes(args, stores, size, logdir):
    """Read-test nodes d0, d10, d90 (dirtied by 4K random writes through the
    server, then flushed at disconnect), and f64 (first 64 MiB all dirty, for
    the map-unchanged flush test).  Reused while their dirty share fits."""
    out = {}
    for part, names in (("read", ("d0", "d10", "d90")), ("flush", ("f64",))):
        if part in args.parts:
            out.update(prepare_store_nodes(args, stores[part], size, logdir, names))
    return out


def prepare_store_nodes(args, store, size, logdir, names):
    want = {n: (64 * MiB / size if n == "f64" else DIRTY_TARGET[n]) for n in names}
    nodes = node_list(args, store)
    todo = []
    for n, frac in want.items():
        have = dirty_fraction(nodes[n], size) if n in nodes else float("nan")
        if n in nodes and nodes[n].get("error"):
            log(f"node {n}: remaking it: {nodes[n]['error']}")
        elif n in nodes and abs(have - frac) <= max(0.02, frac * 0.1):
            continue
        if n in nodes:
            shutil.rmtree(os.path.join(store, "nodes", n))
        todo.append(n)
    if todo:
        srv = OursStore(args, store, "lab", os.path.join(logdir, "ours-prepare.log"))
        srv.start()
        try:
            blocks = size // 4096
            for n in todo:
                frac = want[n]
                t0 = time.monotonic()
                if n == "f64":
                    run_load(args, srv.uri_of(f"lab/{n}"),
                             dict(op="write", pattern="seq", bs=MiB, qd=8, size_limit=64 * MiB),
                             ops=64)
                elif frac == 0:
                    # Attach once, so the node and its (empty) layer exist.
                    r = subprocess.run(["nbdinfo", "--size", srv.uri_of(f"lab/{n}")],
                                       capture_output=True, text=True, timeout=60)
                    if r.returncode != 0:
                        raise ServerError(f"nbdinfo lab/{n}: {r.stderr.strip()}")
                else:
                    # Uniform random 4K blocks with replacement: 1 - exp(-ops/blocks) dirty.
                    ops = int(round(-math.log(1 - frac) * blocks))
                    run_load(args, srv.uri_of(f"lab/{n}"),
                             dict(op="write", pattern="rand", bs=4096, qd=32), ops=ops,
                             seed=1000 + int(frac * 100))
                log(f"node {n}: written in {time.monotonic() - t0:.1f} s")
        finally:
            srv.stop()
        os.sync()
    nodes = node_list(args, store)
    out = {}
    for n in want:
        out[n] = dirty_fraction(nodes.get(n, {}), size)
        log(f"node {n}: {out[n] * 100:.1f} % of the blocks dirty (admin list)")
    return out


def fstype(path):
    try:
        r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", path], capture_output=True,
                           text=True, timeout=10)
        return (r.stdout.strip().splitlines() or ["?"])[0]
    except Exception:  # noqa: BLE001
        return "?"


def warm(paths):
    for p in paths:
        if os.path.exists(p):
            frac = rb.warm_cache(p)
            if frac < 0.99:
                log(f"warning: {p}: only {frac * 100:.1f} % in page cache")


# --------------------------------------------------------------------------
# Parts


def rotate(items, rep):
    """The order of the variants in repetition `rep`: rotated by one each
    time, so no variant always runs first (right after a server start or a
    sync) or always right after the same neighbour."""
    k = rep % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


def hold_exports(srv, exports):
    """One idle connection to each export (libnbd's Python binding, waiting
    on its stdin), so
    the server keeps the generation and the views, and their file mappings,
    from one nbdload run to the next, as it keeps a plain export's mapping.
    Without them every run's connection maps the files afresh and pays the
    page faults again (see --no-hold)."""
    procs = []
    for e in exports:
        code = ("import sys, nbd; h = nbd.NBD(); h.connect_uri(sys.argv[1]); "
                "print('up', flush=True); sys.stdin.read()")
        p = subprocess.Popen(["/usr/bin/python3", "-c", code, srv.uri_of(e)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, preexec_fn=rb._preexec)
        procs.append(p)
        if p.stdout.readline().strip() != "up":
            release(procs)
            raise ServerError(f"could not hold a connection to {e}")
    return procs


def release(procs):
    for p in procs:
        try:
            p.stdin.close()
            p.wait(timeout=10)
        except Exception:  # noqa: BLE001
            p.kill()
            p.wait()


def view_diff(store, node):
    """The diff file of one of the read part's view nodes."""
    return os.path.join(store, "nodes", node, "lab.g1.diff")


def part_read(args, base, stores, logdir, raw, problems):
    store = stores["read"]
    diffs = [view_diff(store, n) for n in ("d0",) + CHANGED_VIEWS]
    if not args.no_verify:
        # In an instance of its own: reading everything would leave the
        # plain and generation mappings faulted in, but not the views' diff
        # mappings (made afresh at each attach), and skew the comparison.
        srv = OursStore(args, store, "lab", os.path.join(logdir, "ours-read.log"), plain=base)
        try:
            srv.start()
            for v in ("plain", "lab", "d0"):
                srv.export = "plain" if v == "plain" else ("lab" if v == "lab" else f"lab/{v}")
                try:
                    rb.verify(srv, base)
                    log(f"read: {v} verified against the image")
                except ServerError as e:
                    problems.append(f"read: {v}: VERIFY FAILED: {e}")
                    log(problems[-1])
        except ServerError as e:
            problems.append(f"read: verify: {e}")
            log(problems[-1])
        finally:
            srv.stop()
    for rep in range(args.reps):
        warm([base] + diffs)
        srv = OursStore(args, store, "lab", os.path.join(logdir, "ours-read.log"), plain=base)
        try:
            srv.start()
        except ServerError as e:
            problems.append(f"read rep {rep}: ours failed to start: {e}")
            log(problems[-1])
            continue
        holders = []
        try:
            if args.hold:
                holders = hold_exports(srv, ["lab", "lab/d0", "lab/d10", "lab/d90"])
            for w in args.read_workloads:
                for v in rotate(READ_VARIANTS, rep):
                    export = "plain" if v == "plain" else ("lab" if v == "lab" else f"lab/{v}")
                    row = dict(part="read", variant=v, workload=w, rep=rep)
                    try:
                        res = measure(args, srv, srv.uri_of(export), READ_WL[w][1])
                        row.update(ok=True, error="", **res)
                        logline("read", rep, v, w, res)
                    except ServerError as e:
                        row.update(ok=False, error=str(e))
                        problems.append(f"read rep {rep} {v} {w}: {e}")
                        log(problems[-1])
                        raw.append(row)
                        if not srv.alive():
                            raise ServerError(f"ours died in read rep {rep}")
                        continue
                    raw.append(row)
        except ServerError as e:
            problems.append(f"read rep {rep}: {e}")
            log(problems[-1])
        finally:
            release(holders)
            srv.stop()


def read_floor(args, base, store, problems):
    """--floor: bench/iovfloor on each changed view's diff, per read size of
    two blocks or more, pinned like the server: what the kernel alone costs
    to copy the view's pieces against one contiguous piece. Returns
    {(view, workload): iovfloor's JSON}."""
    out = {}
    warm([base] + [view_diff(store, v) for v in CHANGED_VIEWS])
    for w in args.read_workloads:
        bs = READ_WL[w][1]["bs"]
        if bs < 2 * 4096:
            continue  # one block: one piece, nothing to alternate
        for v in CHANGED_VIEWS:
            argv = [args.iovfloor, base, view_diff(store, v), "--read", str(bs), "--rounds", "5"]
            if args.server_cpus:
                argv = ["taskset", "-c", args.server_cpus] + argv
            p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                problems.append(f"read floor {v} {w}: iovfloor exited {p.returncode}: "
                                f"{p.stderr.strip()}")
                log(problems[-1])
                continue
            out[(v, w)] = json.loads(p.stdout)
            f = out[(v, w)]
            log(f"read floor {v} {w}: {f['pieces_per_read']:.1f} pieces per read; copying them "
                f"costs {f['view_us_per_mib']:.1f} us/MiB, one contiguous piece "
                f"{f['image_us_per_mib']:.1f}, the same cuts from the image alone "
                f"{f['cuts_us_per_mib']:.1f}")
    return out


def floor_lines(summ, floors):
    """The read floor against the measured server CPU per read: the view's
    server CPU per read is plain's plus at least what the kernel's copy of
    its pieces costs more; where the server's CPU is the limit (srv cores
    about 1 with the server pinned), view/plain is then at most about
    plain CPU / that sum (the ceiling)."""
    lines = ["", "== Kernel copy floor for reads (bench/iovfloor: the view's iovec lists copied by "
             "pwritev into a memfd, no server, no NBD, no network; CPU per MiB, pinned like the "
             "server)",
             f"{'view':<5} {'workload':<9} {'pieces/read':>11} {'copy extra us/read':>18} "
             f"{'of which cuts':>13} {'prefetched':>10} {'plain CPU us/op':>15} {'ceiling':>7} "
             f"{'measured':>8} {'ours extra us/op':>16}"]
    for (v, w), f in sorted(floors.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mib = READ_WL[w][1]["bs"] / (1 << 20)
        extra, cuts = f["view_extra_us_per_mib"] * mib, f["cuts_extra_us_per_mib"] * mib
        pref = f["prefetch_extra_us_per_mib"] * mib
        p, d = summ.get(("read", "plain", w)), summ.get(("read", v, w))
        if not p or not d:
            continue
        ceiling = p["cpu_us_per_op"] / (p["cpu_us_per_op"] + extra)
        lines.append(f"{v:<5} {w:<9} {f['pieces_per_read']:>11.1f} {extra:>18.1f} {cuts:>13.1f} "
                     f"{pref:>10.1f} {p['cpu_us_per_op']:>15.1f} {ceiling:>7.2f} "
                     f"{ratio(d[tkey(w)], p[tkey(w)]):>8.2f} "
                     f"{d['cpu_us_per_op'] - p['cpu_us_per_op']:>16.1f}")
    lines.append("copy extra = the view's pieces less one contiguous piece; of which cuts = the "
                 "same boundaries, all from the image; prefetched = the view's pieces with the "
                 "first 512 bytes of each prefetched first")
    lines.append("ceiling = plain CPU/op / (plain CPU/op + copy extra): view/plain throughput "
                 "when the server's CPU is the limit and the server adds nothing to the kernel's "
                 "copy (medians of noisy runs: a measured ratio can land a few hundredths above "
                 "it); measured = view/plain above; ours extra = the view's server CPU per op "
                 "less plain's")
    return lines


def write_run(args, part, who, w, params, rep, base, topdir, logdir, raw, problems, deferred):
    """Starts a fresh server (fresh overlay in topdir), runs one write
    workload and stops it.  The overlay is thrown away now, or, when
    `deferred` is a list, at the end of the run: deleting a file with many
    scattered blocks on ext4 (mounted with discard here) takes tens of
    seconds of disk time that would disturb the next measurements."""
    store = os.path.join(topdir, "store")
    node = None
    keep = deferred is not None
    if who in ("ours", "ours-fresh"):
        node = f"w-{rep}-{w}-{who}"
        srv = OursStore(args, store, f"lab/{node}", os.path.join(logdir, "ours-write.log"))
    elif who == "ours-rewrite":
        srv = OursStore(args, store, "lab/f64", os.path.join(logdir, "ours-write.log"))
    elif who == "nbdkit-cow":
        srv = NbdkitCow(args, base, os.path.join(logdir, "nbdkit-cow.log"), topdir)
    else:
        ov = os.path.join(topdir, f"overlay-{os.getpid()}-{rep}-{w}.qcow2")
        srv = QemuQcow2(args, base, os.path.join(logdir, "qemu-qcow2.log"), ov, keep=keep)
        if keep:
            deferred.append(ov)
    os.sync()  # nothing left over from earlier runs is written back during this one
    row = dict(part=part, variant=who, workload=w, rep=rep)
    try:
        srv.start()
        res = measure(args, srv, srv.uri(), params)
        row.update(ok=True, error="", **res)
        logline(part, rep, who, w, res)
    except ServerError as e:
        row.update(ok=False, error=str(e))
        problems.append(f"{part} rep {rep} {who} {w}: {e}")
        log(problems[-1])
    finally:
        srv.stop()
        if node:
            path = os.path.join(store, "nodes", node)
            if keep:
                deferred.append(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
    raw.append(row)


def part_write(args, base, logdir, raw, problems):
    deferred = [] if args.defer_delete else None
    for rep in range(args.reps):
        for w in args.write_workloads:
            for who in rotate(args.write_servers, rep):
                write_run(args, "write", who, w, WRITE_WL[w][1], rep, base, args.overlay_dir,
                          logdir, raw, problems, deferred)
    return deferred or []


def part_flush(args, base, logdir, raw, problems):
    deferred = []
    for rep in range(args.flush_reps):
        w = "rw4k_qd32_flush"
        for who in rotate(args.write_servers, rep):
            write_run(args, "flush", who, w, FLUSH_WL[w][1], rep, base, args.flush_dir, logdir,
                      raw, problems, deferred)
        if "ours" in args.write_servers:
            w = "rw4k_qd32_flush_64m"
            for who in rotate(FLUSH64_VARIANTS, rep):
                write_run(args, "flush", who, w, FLUSH_WL[w][1], rep, base, args.flush_dir,
                          logdir, raw, problems, deferred)
    return deferred


def delete_deferred(paths):
    t0 = time.monotonic()
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    if paths:
        os.sync()
        log(f"deleted {len(paths)} overlays of the flush part ({time.monotonic() - t0:.0f} s)")


# --------------------------------------------------------------------------
# Reporting

KEYS = ("iops", "mb_s", "p50_us", "p99_us", "cpu_us_per_op", "server_cores", "client_cores",
        "faults_per_op", "flushes_s")


def summarize(raw):
    summ = {}
    for r in raw:
        summ.setdefault((r["part"], r["variant"], r["workload"]), []).append(r)
    out = {}
    for k, rows in summ.items():
        ok = [r for r in rows if r["ok"]]
        d = dict(part=k[0], variant=k[1], workload=k[2], reps=len(ok), failures=len(rows) - len(ok))
        for key in KEYS:
            d[key] = median([r.get(key, float("nan")) for r in ok])
        tk = tkey(k[2])
        thr = [r[tk] for r in ok]
        d["spread_pct"] = ((max(thr) - min(thr)) / d[tk] * 100) if len(thr) > 1 and d[tk] else float("nan")
        out[k] = d
    return out


def table(lines, summ, part, w, variants, ref, ref_label, flushes=False):
    label = ALL_WL[w][0]
    tk = tkey(w)
    lines.append("")
    lines.append(f"== {label} [{w}]  (throughput: {'IOPS' if tk == 'iops' else 'MB/s'})")
    hdr = (f"{'variant':<13} {'IOPS':>9} {'MB/s':>8} {'p50 us':>8} {'p99 us':>9} {'CPU us/op':>9} "
           f"{'srv cores':>9} {'cli cores':>9} {'flt/op':>6} {'spread':>6} {'n':>2}"
           + (f" {'flush/s':>8}" if flushes else "") + f"  {ref_label}")
    lines.append(hdr)
    r0 = summ.get((part, ref, w))
    for v in variants:
        d = summ.get((part, v, w))
        if not d:
            continue
        rr = ratio(d[tk], r0[tk]) if r0 else float("nan")
        rc = ratio(d["cpu_us_per_op"], r0["cpu_us_per_op"]) if r0 else float("nan")
        sp = (fmt(d["spread_pct"], 0) + "%") if not math.isnan(d["spread_pct"]) else "-"
        line = (f"{v:<13} {fmt(d['iops']):>9} {fmt(d['mb_s'], 1):>8} {fmt(d['p50_us'], 1):>8} "
                f"{fmt(d['p99_us'], 1):>9} {fmt(d['cpu_us_per_op'], 2):>9} "
                f"{fmt(d['server_cores'], 2):>9} {fmt(d['client_cores'], 2):>9} "
                f"{fmt(d['faults_per_op'], 2):>6} {sp:>6} "
                f"{d['reps']:>2}" + (f" {fmt(d['flushes_s']):>8}" if flushes else "")
                + f"  thr x{fmt(rr, 2)} cpu/op x{fmt(rc, 2)}")
        if d["failures"]:
            line += f"  FAILED x{d['failures']}"
        lines.append(line)


def report(args, summ, dirty, out, floors=None):
    lines = []
    targets = []
    if "read" in args.parts:
        lines.append("\n#### 1. Reads through node views vs the plain image (ratios: variant / plain)")
        lines.append("dirty share (admin list): " + ", ".join(
            f"{n} {dirty.get(n, float('nan')) * 100:.1f} %" for n in ("d0", "d10", "d90")))
        for w in args.read_workloads:
            table(lines, summ, "read", w, READ_VARIANTS, "plain", "vs plain")
            p = summ.get(("read", "plain", w))
            for v in ("d0", "d10", "d90"):
                d = summ.get(("read", v, w))
                if p and d:
                    r = ratio(d[tkey(w)], p[tkey(w)])
                    # Issue 10 asks 0.95 of 1 MiB reads of part-changed views.
                    want = 0.95 if w == "sr1m" and v != "d0" else 0.90
                    targets.append(f"read {w:<10} {v:<4} view/plain = {fmt(r, 2)} (target >= {want:.2f})"
                                   + ("" if math.isnan(r) else ("  OK" if r >= want else "  MISS")))
        if floors:
            lines += floor_lines(summ, floors)
    peers = [s for s in args.write_servers if s != "ours"]
    for part, wls, title in (("write", args.write_workloads if "write" in args.parts else [],
                              "#### 2. Writes into a fresh overlay (ratios: server / ours)"),
                             ("flush", ["rw4k_qd32_flush"] if "flush" in args.parts else [],
                              f"#### 3. Flush-heavy: a FLUSH after every {args.flush_every} writes "
                              "(ratios: server / ours)")):
        if not wls:
            continue
        lines.append("\n" + title)
        for w in wls:
            table(lines, summ, part, w, args.write_servers, "ours", "vs ours", flushes=part == "flush")
            o = summ.get((part, "ours", w))
            # nbdkit's cow filter ignores FLUSH (its overlay is a temporary file
            # thrown away at exit; strace shows no fdatasync), so in the flush
            # part only qemu-nbd is a durable peer.
            cand = [p for p in peers if not (part == "flush" and p == "nbdkit-cow")] or peers
            best = [(summ[(part, p, w)][tkey(w)], p) for p in cand
                    if (part, p, w) in summ and not math.isnan(summ[(part, p, w)][tkey(w)])]
            if o and best:
                bt, bp = max(best)
                r = ratio(o[tkey(w)], bt)
                rc = ratio(o["cpu_us_per_op"], summ[(part, bp, w)]["cpu_us_per_op"])
                cmin = min(summ[(part, p, w)]["cpu_us_per_op"] for p in cand if (part, p, w) in summ)
                ok = r >= 1.5 and o["cpu_us_per_op"] < cmin
                targets.append(f"{part} {w:<16} ours/best peer ({bp}): thr x{fmt(r, 2)} (target >= 1.5), "
                               f"CPU/op x{fmt(rc, 2)} (lowest peer CPU/op {fmt(cmin, 2)} us)"
                               + ("" if math.isnan(r) else ("  OK" if ok else "  MISS")))
        if part == "flush" and "ours" in args.write_servers:
            w = "rw4k_qd32_flush_64m"
            table(lines, summ, "flush", w, FLUSH64_VARIANTS, "ours-fresh", "vs ours-fresh",
                  flushes=True)
            lines.append("ours-fresh: every flush finds new dirty blocks, so it persists the map "
                         "(fdatasync diff, write slot, fdatasync bitmap);\nours-rewrite: node f64 "
                         "has the 64 MiB dirty already, the map never changes (one fdatasync).")
    if targets:
        lines.append("\n== Targets (medians)")
        lines += targets
    text = "\n".join(lines)
    print(text, flush=True)
    out.write(text + "\n")


# --------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="read,write,flush", help="comma list of: read, write, flush")
    ap.add_argument("--read-workloads", default=",".join(READ_WL), help=", ".join(READ_WL))
    ap.add_argument("--write-workloads", default=",".join(WRITE_WL), help=", ".join(WRITE_WL))
    ap.add_argument("--write-servers", default=",".join(WRITE_SERVERS),
                    help="comma list of: " + ", ".join(WRITE_SERVERS))
    ap.add_argument("--reps", type=int, default=3, help="repetitions, median reported")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per nbdload run")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each run")
    ap.add_argument("--quick", action="store_true", help="1 rep, 2 s runs")
    ap.add_argument("--flush-reps", type=int, default=0,
                    help="repetitions of the flush part (default: --reps)")
    ap.add_argument("--flush-every", type=int, default=32, help="FLUSH after every N writes (flush part)")
    ap.add_argument("--workdir", default="/var/tmp/nbdroot-cow",
                    help="image, store, overlays (default /var/tmp/nbdroot-cow)")
    ap.add_argument("--overlay-dir", default="/dev/shm/nbdroot-cow",
                    help="write part: store for fresh nodes, qcow2 overlays, nbdkit TMPDIR "
                         "(default /dev/shm/nbdroot-cow, tmpfs)")
    ap.add_argument("--flush-dir", default=None,
                    help="flush part: the same, on the disk (default: the workdir)")
    ap.add_argument("--defer-delete", action="store_true",
                    help="write part: delete overlays at the end (use with a disk --overlay-dir)")
    ap.add_argument("--image-size", type=int, default=1 << 30)
    ap.add_argument("--outdir", default=None, help="default bench/results/<UTC timestamp>")
    ap.add_argument("--nbdserver", default=os.path.join(rb.REPO, "build", "nbdserver", "nbdserver"))
    ap.add_argument("--nbdload", default=None, help="default: build/bench/nbdload, else built in workdir")
    ap.add_argument("--ours-threads", type=int, default=0, help="pass --threads N to ours")
    ap.add_argument("--ours-arg", action="append", default=[], help="extra argument for ours (repeatable)")
    ap.add_argument("--nbdkit-threads", type=int, default=0, help="nbdkit --threads (default 16)")
    ap.add_argument("--cow-block-size", default="4096", help="nbdkit cow-block-size (default 4096)")
    ap.add_argument("--qcow2-opts", default="cluster_size=65536,extended_l2=on",
                    help="qemu-img create -o OPTS for the overlay")
    ap.add_argument("--qemu-nbd-opts", default="--cache=writeback --aio=io_uring -e 8",
                    help="extra qemu-nbd options")
    ap.add_argument("--server-cpus", default="1", help="taskset -c for the servers ('' = unpinned)")
    ap.add_argument("--client-cpus", default="0", help="taskset -c for nbdload ('' = unpinned)")
    ap.add_argument("--no-hold", dest="hold", action="store_false",
                    help="reads: no idle connection holding the store exports open, so each "
                         "run maps the generation and the view's diff afresh")
    ap.add_argument("--no-verify", action="store_true", help="skip the data check of plain/lab/d0")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--floor", action="store_true",
                    help="read part: also measure the kernel's copy of each view's reads "
                         "(bench/iovfloor) and the ceiling it puts on view/plain")
    ap.add_argument("--iovfloor", default=os.path.join(rb.REPO, "build", "bench", "iovfloor"))
    a = ap.parse_args()
    if a.quick:
        a.reps, a.seconds, a.warmup = 1, 2.0, 0.2
    a.flush_reps = a.flush_reps or a.reps
    a.parts = [p for p in a.parts.split(",") if p]
    a.read_workloads = [w for w in a.read_workloads.split(",") if w]
    a.write_workloads = [w for w in a.write_workloads.split(",") if w]
    a.write_servers = [w for w in a.write_servers.split(",") if w]
    for p in a.parts:
        if p not in ("read", "write", "flush"):
            ap.error(f"unknown part {p}")
    for w in a.read_workloads:
        if w not in READ_WL:
            ap.error(f"unknown read workload {w}")
    for w in a.write_workloads:
        if w not in WRITE_WL:
            ap.error(f"unknown write workload {w}")
    for s in a.write_servers:
        if s not in WRITE_SERVERS:
            ap.error(f"unknown write server {s}")
    for wl in FLUSH_WL.values():
        wl[1]["flush_every"] = a.flush_every
    a.workdir = os.path.abspath(a.workdir)
    a.overlay_dir = os.path.abspath(a.overlay_dir)
    a.flush_dir = os.path.abspath(a.flush_dir or a.workdir)
    return a


def main():
    args = parse_args()
    rb.adopt_orphans_and_stop_on_signals()

    if not os.access(args.nbdserver, os.X_OK):
        sys.exit(f"{args.nbdserver} not found (build it, or pass --nbdserver)")
    for s, exe in (("nbdkit-cow", "nbdkit"), ("qemu-qcow2", "qemu-nbd")):
        if s in args.write_servers and not shutil.which(exe):
            log(f"{s}: {exe} not installed, skipping it")
            args.write_servers.remove(s)

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outdir = args.outdir or os.path.join(BENCH_DIR, "results", stamp)
    logdir = os.path.join(outdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    args.nbdload = rb.ensure_nbdload(args)

    base = rb.prepare_image(args)
    size = os.path.getsize(base)
    stores = {}
    for part, d in (("read", args.workdir), ("write", args.overlay_dir), ("flush", args.flush_dir)):
        if part in args.parts:
            os.makedirs(d, exist_ok=True)
            stores[part] = make_store(d, base)

    meta = dict(harness="bench/cow.py", started=stamp, host=os.uname().nodename,
                cpus=os.cpu_count(), loadavg=" ".join(open("/proc/loadavg").read().split()[:3]),
                args=vars(args), versions={})
    for exe, flag in (("nbdkit", "--version"), ("qemu-nbd", "--version"), ("qemu-img", "--version")):
        try:
            r = subprocess.run([exe, flag], capture_output=True, text=True, timeout=10)
            meta["versions"][exe] = (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            meta["versions"][exe] = f"? ({e})"

    if args.floor and "read" in args.parts and not os.access(args.iovfloor, os.X_OK):
        sys.exit(f"{args.iovfloor} not found (ninja -C build iovfloor, or pass --iovfloor)")
    raw, problems, dirty, deferred, floors = [], [], {}, [], {}
    interrupted = False
    t_start = time.monotonic()
    try:
        dirty = prepare_nodes(args, stores, size, logdir)
        if "read" in args.parts:
            part_read(args, base, stores, logdir, raw, problems)
            if args.floor:
                floors = read_floor(args, base, stores["read"], problems)
        if "write" in args.parts:
            warm([base])
            deferred += part_write(args, base, logdir, raw, problems)
        if "flush" in args.parts:
            warm([base])
            deferred += part_flush(args, base, logdir, raw, problems)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up and reporting what was measured")
    except ServerError as e:
        problems.append(str(e))
        log(problems[-1])
    finally:
        stop_all(list(rb.LIVE))
        delete_deferred(deferred)
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    meta["dirty"] = dirty
    if not raw:
        for p in problems:
            print(p)
        sys.exit("nothing measured")
    summ = summarize(raw)

    fields = ["part", "variant", "workload", "rep", "ok", "iops", "mb_s", "p50_us", "p99_us",
              "cpu_us_per_op", "server_cpu_s", "server_cores", "ops", "ops_all", "bytes",
              "seconds", "client_cpu_s", "client_cores", "faults_per_op", "flushes", "flushes_s",
              "error"]
    with open(os.path.join(outdir, "cow-raw.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(raw)
    sfields = ["part", "workload", "label", "variant", "reps", "failures", *KEYS, "spread_pct",
               "ref", "thr_ratio_vs_ref", "cpu_ratio_vs_ref"]
    with open(os.path.join(outdir, "cow-results.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=sfields, extrasaction="ignore")
        wr.writeheader()
        for (part, v, w), d in summ.items():
            ref = {"read": "plain", "write": "ours"}.get(part, "ours")
            if w == "rw4k_qd32_flush_64m":
                ref = "ours-fresh"
            r0 = summ.get((part, ref, w))
            row = dict(d, label=ALL_WL[w][0], ref=ref)
            if r0:
                row["thr_ratio_vs_ref"] = ratio(d[tkey(w)], r0[tkey(w)])
                row["cpu_ratio_vs_ref"] = ratio(d["cpu_us_per_op"], r0["cpu_us_per_op"])
            wr.writerow(row)
    with open(os.path.join(outdir, "cow-meta.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    with open(os.path.join(outdir, "cow-report.txt"), "w") as out:
        hdr = (f"cow benchmark {stamp}: {args.reps} rep(s) (flush part {args.flush_reps}) x {args.seconds:g} s "
               f"(+{args.warmup:g} s warmup), median shown; {os.cpu_count()} CPUs, loadavg at start "
               f"{meta['loadavg']}; server cpus {args.server_cpus or 'any'}, client cpus "
               f"{args.client_cpus or 'any'}\n"
               f"ours = {args.nbdserver}\n"
               f"nbdkit-cow = nbdkit --filter=cow file BASE cow-block-size={args.cow_block_size}"
               f"{' --threads ' + str(args.nbdkit_threads) if args.nbdkit_threads else ''}\n"
               f"qemu-qcow2 = qemu-img create -f qcow2 -b BASE -F raw -o {args.qcow2_opts}; "
               f"qemu-nbd -f qcow2 {args.qemu_nbd_opts}\n"
               f"fresh overlays (nodes, qcow2, nbdkit TMPDIR): write part in {args.overlay_dir}"
               f" ({fstype(args.overlay_dir)}), flush part in {args.flush_dir} ({fstype(args.flush_dir)})\n"
               f"reads: {'an idle connection holds each store export open (mappings persist like plain)' if args.hold else '--no-hold: each run maps the store files afresh'}\n"
               f"CPU us/op = server process tree utime+stime / requests (FLUSHes not counted as "
               f"requests); spread = (max-min)/median of throughput")
        print(hdr)
        out.write(hdr + "\n")
        report(args, summ, dirty, out, floors)
        if problems or interrupted:
            items = problems + (["run was interrupted: results are partial"] if interrupted else [])
            msg = "\n== Problems\n" + "\n".join("  " + p for p in items)
            print(msg)
            out.write(msg + "\n")
    log(f"results in {outdir} ({meta['elapsed_s']:.0f} s)")
    return 1 if (problems or interrupted) else 0


if __name__ == "__main__":
    sys.exit(main())
