#!/usr/bin/python3
"""The cost of TLS: nbdserver --tls require against plaintext, with nbdkit
--tls=require as the peer, in one run on the same machine.

Two parts, both through the existing harnesses:

  run.py    its workloads (default 4K random read QD32, 1 MiB sequential
            read and write QD8, 4K random write QD32) against five servers
            in one run.py invocation, so its repetitions interleave them:
            ours, ours-tls (--tls require --tls-psk-file), nbdkit,
            nbdkit-tls-aes (ChaCha20 disabled: AES-128-GCM, as ours) and
            nbdkit-tls (nbdkit's default ciphers: ChaCha20-Poly1305)
  storm.py  the boot storm of --nodes nodes on existing node views
            (storm.py's `existing`), plain and TLS, with every node
            authenticating as node-i with its own key, and nbdkit's cow
            filter plain and TLS (both ciphers); the order rotates per rep

Before measuring it checks which cipher each TLS server negotiates with
libnbd (ours logs "TLS established (TLS1.3/AES-128-GCM)" at info level,
nbdkit says it with -D nbdkit.tls.session=1).  Prints a table of medians:
throughput and server CPU per request (utime+stime of the server process
tree, /proc/PID/stat, before and after each run, divided by requests), the
TLS/plain ratios, and ours-TLS against nbdkit-TLS.  About 5 minutes here.

    /usr/bin/python3 bench/tls.py
    /usr/bin/python3 bench/tls.py --reps 5 --nodes 100
    /usr/bin/python3 bench/tls.py --workloads rr4k_qd32,sr1m --no-storm
"""

import argparse
import csv
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)
import run as rb  # noqa: E402  (bench/run.py: servers, accounting)
import storm as st  # noqa: E402  (bench/storm.py: the boot storm)

log = rb.log
RUN_SERVERS = ["ours", "ours-tls", "nbdkit", "nbdkit-tls-aes", "nbdkit-tls"]
# Columns of the table: (heading, run.py server, storm variant).
COLUMNS = [("ours plain", "ours", ("existing", "plain")),
           ("ours TLS", "ours-tls", ("existing", "tls")),
           ("nbdkit plain", "nbdkit", ("nbdkit", "plain")),
           ("nbdkit TLS", "nbdkit-tls-aes", ("nbdkit", "tls-aes")),
           ("nbdkit TLS ChaCha20", "nbdkit-tls", ("nbdkit", "tls"))]
STORM_VARIANTS = [c[2] for c in COLUMNS]


# --------------------------------------------------------------------------
# Which cipher each TLS server negotiates with libnbd


class OursProbe(rb.OursTls):
    log_level = "info"


def nbdkit_probe(cls):
    class Probe(cls):
        def command(self, port):
            argv = super().command(port)
            return argv[:1] + ["-v", "-D", "nbdkit.tls.session=1"] + argv[1:]
    return Probe


def negotiated(cls, args, image, logpath):
    """The 'PROTOCOL/CIPHER' a server of class cls negotiates with nbdinfo
    (libnbd), read from its log; None if it says nothing."""
    srv = cls(args, image, True, logpath)
    srv.start()  # its readiness probe is one nbdinfo over TLS
    try:
        r = subprocess.run(["nbdinfo", "--size", srv.uri()], capture_output=True, text=True,
                           timeout=20)
        if r.returncode != 0:
            raise rb.ServerError(f"{srv.name}: nbdinfo over TLS failed: {r.stderr.strip()}")
        time.sleep(0.2)
    finally:
        srv.stop()
    text = open(logpath, errors="replace").read()
    m = re.search(r"TLS established \(([^)]*)\)", text)
    if m:
        return m.group(1)
    m = re.search(r"TLS session: \(([^)]*)\)--\(([^)]*)\)", text)
    return f"{m.group(1)}/{m.group(2)}" if m else None


def check_ciphers(args, image, logdir):
    out = {}
    for name, cls in (("ours-tls", OursProbe), ("nbdkit-tls-aes", nbdkit_probe(rb.NbdkitTlsAes)),
                      ("nbdkit-tls", nbdkit_probe(rb.NbdkitTls))):
        out[name] = negotiated(cls, args, image, os.path.join(logdir, f"cipher-{name}.log"))
        log(f"{name}: negotiated {out[name] or '? (not in its log)'}")
    return out


# --------------------------------------------------------------------------
# Part 1: run.py


def run_part(args, outdir):
    """Runs run.py over RUN_SERVERS; returns ({(server, workload): row},
    problems)."""
    rundir = os.path.join(outdir, "run")
    argv = [sys.executable, os.path.join(BENCH_DIR, "run.py"),
            "--servers", ",".join(RUN_SERVERS), "--workloads", ",".join(args.workloads),
            "--reps", str(args.reps), "--seconds", str(args.seconds),
            "--warmup", str(args.warmup), "--workdir", args.workdir,
            "--image-size", str(args.image_size), "--outdir", rundir,
            "--nbdserver", args.nbdserver]
    log("$ " + " ".join(argv))
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, timeout=3600)
    problems = [] if r.returncode == 0 else [f"run.py exited {r.returncode}: see "
                                             f"{os.path.join(rundir, 'report.txt')}"]
    rows = {}
    path = os.path.join(rundir, "results.csv")
    if os.path.exists(path):
        with open(path) as f:
            for row in csv.DictReader(f):
                rows[(row["server"], row["workload"])] = row
    return rows, problems


# --------------------------------------------------------------------------
# Part 2: storm.py


def storm_args(args):
    return argparse.Namespace(
        trace=os.path.join(BENCH_DIR, "boot-trace.txt.gz"), nodes=args.nodes, qd=4,
        client_threads=2, workdir=os.path.join(args.workdir, "storm"), nbdserver=args.nbdserver,
        nbdstorm=args.nbdstorm, server_threads=0, server_arg=[], timeout=300, tls=False,
        nbdkit_aes=False, server_cpus=None, psk_file=None)


def storm_part(args, outdir):
    """Runs the storms; returns ({variant: [result, ...]}, requests per
    node, problems)."""
    sa = storm_args(args)
    os.makedirs(sa.workdir, exist_ok=True)
    os.makedirs(os.path.join(outdir, "logs"), exist_ok=True)
    sa.psk_file = os.path.join(sa.workdir, "nodes.psk")
    st.write_node_keys(sa)
    size, reqs = st.read_trace(sa.trace)
    base = st.prepare_image(sa.workdir, size, reqs)
    store = st.make_store(sa.workdir, base)
    results = {v: [] for v in STORM_VARIANTS}
    problems = []
    try:
        # Unmeasured: creates the nodes that `existing` attaches.
        st.storm(sa, "first", store, base, outdir, "setup")
        for rep in range(args.reps):
            k = rep % len(STORM_VARIANTS)
            for setup, transport in STORM_VARIANTS[k:] + STORM_VARIANTS[:k]:
                sa.tls = transport != "plain"
                sa.nbdkit_aes = transport == "tls-aes"
                r = st.storm(sa, setup, store, base, outdir, rep)
                results[(setup, transport)].append(r)
                log(f"storm rep {rep} {setup} {transport}: wall {r['wall_s']:.2f} s, "
                    f"server CPU {r['server_cpu_s']:.2f} s, client CPU {r['client_cpu_s']:.2f} s")
    except rb.ServerError as e:
        problems.append(f"storm: {e}")
        log(problems[-1])
    return results, len(reqs), problems


# --------------------------------------------------------------------------
# Report


def ratio(a, b):
    return a / b if a == a and b == b and b else float("nan")


def cell(v, nd):
    return "-" if v != v else f"{v:,.{nd}f}"


def table(args, rows, storm_res, storm_reqs):
    """Markdown lines: per workload a throughput row and a CPU row."""
    head = ["workload", "metric"] + [c[0] for c in COLUMNS[:2]] + ["TLS/plain"] + \
        [c[0] for c in COLUMNS[2:4]] + ["TLS/plain", "ours TLS / nbdkit TLS", COLUMNS[4][0]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def add(label, metric, vals, nd):
        o, ot, k, kt, kc = vals
        lines.append("| " + " | ".join([
            label, metric, cell(o, nd), cell(ot, nd), cell(ratio(ot, o), 2) + "x",
            cell(k, nd), cell(kt, nd), cell(ratio(kt, k), 2) + "x",
            cell(ratio(ot, kt), 2) + "x", cell(kc, nd)]) + " |")

    for w in args.workloads:
        key = rb.THROUGHPUT_KEY[w]
        get = [float(rows[(c[1], w)][key]) if (c[1], w) in rows else float("nan")
               for c in COLUMNS]
        cpu = [float(rows[(c[1], w)]["cpu_us_per_op"]) if (c[1], w) in rows else float("nan")
               for c in COLUMNS]
        add(rb.WORKLOADS[w][0], "IOPS" if key == "iops" else "MB/s", get, 0)
        add("", "server CPU us/op", cpu, 2)
    if storm_res:
        ops = args.nodes * storm_reqs

        def med(v, k):
            return rb.median([r[k] for r in storm_res.get(v, [])])
        label = f"boot storm, {args.nodes} node views"
        add(label, "wall s (lower is better)", [med(c[2], "wall_s") for c in COLUMNS], 2)
        add("", "server CPU us/op", [med(c[2], "server_cpu_s") * 1e6 / ops for c in COLUMNS], 2)
        add("", "client CPU s", [med(c[2], "client_cpu_s") for c in COLUMNS], 2)
    return lines


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="rr4k_qd32,sr1m,sw1m,rw4k_qd32",
                    help="run.py workload ids (see bench/README.md)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every part (median)")
    ap.add_argument("--seconds", type=float, default=2.0, help="measured seconds per nbdload run")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--image-size", type=int, default=512 << 20)
    ap.add_argument("--nodes", type=int, default=50, help="nodes of the boot storm")
    ap.add_argument("--no-storm", action="store_true")
    ap.add_argument("--workdir", default="/dev/shm/nbdroot-tls",
                    help="images, copies and keys (tmpfs: the storm's flushes cost nothing, "
                         "so it measures the transport); removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--outdir", help="default bench/results/tls-<timestamp>")
    ap.add_argument("--nbdserver", default=os.path.join(REPO, "build", "nbdserver", "nbdserver"))
    ap.add_argument("--nbdstorm", default=os.path.join(REPO, "build", "bench", "nbdstorm"))
    args = ap.parse_args()
    args.workloads = [w for w in args.workloads.split(",") if w]
    for w in args.workloads:
        if w not in rb.WORKLOADS or rb.WORKLOADS[w][1] != "load":
            ap.error(f"{w}: not an nbdload workload of run.py")
    args.workdir = os.path.abspath(args.workdir)
    # what rb.Ours and rb.Nbdkit read (the cipher probes)
    args.server_cpus, args.ours_threads, args.ours_arg, args.nbdkit_threads = "", 0, [], 0
    args.psk_file = os.path.join(args.workdir, "bench.psk")
    return args


def main():
    args = parse_args()
    rb.adopt_orphans_and_stop_on_signals()
    exes = [args.nbdserver] + ([] if args.no_storm else [args.nbdstorm])
    for exe in exes:
        if not os.access(exe, os.X_OK):
            sys.exit(f"{exe} not found (ninja -C build nbdserver nbdload nbdstorm)")
    for tool in ("nbdkit", "nbdinfo"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not installed (apt-get install nbdkit libnbd-bin)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outdir = args.outdir or os.path.join(BENCH_DIR, "results", f"tls-{stamp}")
    logdir = os.path.join(outdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    loadavg = " ".join(open("/proc/loadavg").read().split()[:3])
    aes = "aes" in open("/proc/cpuinfo").read().split()
    t0 = time.monotonic()

    problems, ciphers, rows, storm_res, storm_reqs = [], {}, {}, {}, 0
    try:
        rb.write_psk_file(args.psk_file, [rb.TLS_IDENTITY])
        probe_img = os.path.join(args.workdir, "probe.img")
        with open(probe_img, "wb") as f:
            f.truncate(1 << 20)
        ciphers = check_ciphers(args, probe_img, logdir)
        rows, p = run_part(args, outdir)
        problems += p
        if not args.no_storm:
            storm_res, storm_reqs, p = storm_part(args, outdir)
            problems += p
    except KeyboardInterrupt:
        problems.append("interrupted: results are partial")
    except rb.ServerError as e:
        problems.append(str(e))
    finally:
        for srv in list(rb.LIVE):
            srv.stop()
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)

    header = [
        f"TLS cost {stamp}: {os.cpu_count()} CPUs (AES-NI {'present' if aes else 'absent'}), "
        f"loadavg at start {loadavg}, {time.monotonic() - t0:.0f} s; medians of {args.reps} "
        f"rep(s); run.py {args.seconds:g} s (+{args.warmup:g} s warmup) per run, "
        f"{args.image_size >> 20} MiB image in {args.workdir}"
        + ("" if args.no_storm else f"; storm {args.nodes} nodes x {storm_reqs} requests"),
        "negotiated with libnbd: " + ", ".join(f"{k} {v or '?'}" for k, v in ciphers.items()),
        "nbdkit TLS = ChaCha20 disabled in its GnuTLS priorities (AES-128-GCM, as ours); "
        "nbdkit TLS ChaCha20 = its defaults. Ratios: TLS/plain and ours/nbdkit of the "
        "numbers in the row (throughput: higher is better; CPU and wall: lower is better).",
        "server CPU us/op = utime+stime of the server's process tree over the run / requests "
        "(storm: requests of all nodes, handshakes included)",
        ""]
    lines = header + table(args, rows, storm_res, storm_reqs)
    if problems:
        lines += ["", "problems:"] + ["  " + p for p in problems]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(outdir, "tls-report.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(outdir, "tls.json"), "w") as f:
        json.dump(dict(ciphers=ciphers, run={f"{s}/{w}": r for (s, w), r in rows.items()},
                       storm={f"{s}/{t}": v for (s, t), v in storm_res.items()},
                       problems=problems), f, indent=1)
    log(f"results in {outdir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
