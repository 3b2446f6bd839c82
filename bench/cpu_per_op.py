#!/usr/bin/python3
"""Server CPU per operation: nbdserver against nbdkit, driven by nbdblast.

For each round and each server: start the server on a file, run nbdblast
(io_uring, raw NBD) against it, and read the server's utime + stime from
/proc/PID/stat (every thread, io_uring workers included) just before and
after the measured run. CPU per op = CPU ticks used / ops completed.

Rounds alternate the servers, and the table shows medians over the rounds,
because the machine may be shared and noisy.

    /usr/bin/python3 bench/cpu_per_op.py                       # 4K rand read QD32
    /usr/bin/python3 bench/cpu_per_op.py --op write --fua --qd 8 --image /work/tmp/fua.img

Pinning: --server-cpus 0 --client-cpus 1 runs each under taskset, so that
the client cannot steal the server's core.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # after the comm field: state is fields[0]; utime, stime are stat fields 14, 15
    return (int(fields[11]) + int(fields[12])) / TICK


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(proc, port, what):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what}: not listening after 20 s")


NICE = []


def taskset(cpus):
    return NICE + (["taskset", "-c", cpus] if cpus else [])


def start_ours(args, image, readonly, exe=None, extra=None):
    ready = tempfile.mktemp(prefix="cpo-", suffix=".ready")
    spec = f"bench={image}" + (",ro" if readonly else "")
    argv = taskset(args.server_cpus) + [exe or args.nbdserver, "--listen", "127.0.0.1:0",
                                        "--ready-file", ready, "--export", spec,
                                        "--log-level", "warn"]
    argv += args.ours_arg if extra is None else extra
    proc = subprocess.Popen(argv)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            sys.exit(f"nbdserver exited with status {proc.returncode}")
        try:
            with open(ready) as f:
                line = f.read().strip()
            if line:
                port = int(line.rpartition(":")[2])
                break
        except (FileNotFoundError, ValueError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit("nbdserver: no ready file after 20 s")
        time.sleep(0.02)
    os.unlink(ready)
    return proc, f"nbd://127.0.0.1:{port}/bench"


def start_nbdkit(args, image, readonly):
    port = free_port()
    argv = taskset(args.server_cpus) + ["nbdkit", "-f", "--exit-with-parent", "-p", str(port),
                                        "-i", "127.0.0.1"]
    if readonly:
        argv.append("-r")
    proc = subprocess.Popen(argv + ["file", image])
    wait_port(proc, port, "nbdkit")
    return proc, f"nbd://127.0.0.1:{port}/"


def one(args, name, image):
    readonly = args.op == "read"
    if name == "ours":
        proc, uri = start_ours(args, image, readonly)
    elif name == "base":
        proc, uri = start_ours(args, image, readonly, args.base_nbdserver or args.nbdserver,
                               args.base_arg)
    else:
        proc, uri = start_nbdkit(args, image, readonly)
    try:
        cmd = taskset(args.client_cpus) + [
            args.blast, "--uri", uri, "--op", args.op, "--bs", str(args.bs), "--qd", str(args.qd),
            "--conns", str(args.conns), "--threads", str(args.client_threads),
            "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
        if args.fua:
            cmd.append("--fua")
        blast = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        # The server's CPU is sampled over the measured window only.
        time.sleep(args.warmup)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.seconds)
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        out, _ = blast.communicate(timeout=args.seconds + args.warmup + 60)
        if blast.returncode != 0:
            sys.exit(f"nbdblast failed against {name}: {out}")
        r = json.loads(out)
        # ops completed in the sampled window, at the measured rate
        ops = r["iops"] * (t1 - t0)
        return {"iops": r["iops"], "server_us_per_op": (c1 - c0) * 1e6 / ops,
                "client_us_per_op": r["client_cpu_us_per_op"], "p50_us": r["lat_p50_us"],
                "p99_us": r["lat_p99_us"]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nbdserver", default=os.path.join(REPO, "build", "nbdserver", "nbdserver"))
    ap.add_argument("--blast", default=os.path.join(REPO, "build", "bench", "nbdblast"))
    ap.add_argument("--servers", default="ours,nbdkit",
                    help="any of ours, nbdkit, base (another nbdserver: --base-nbdserver)")
    ap.add_argument("--base-nbdserver", help="an nbdserver to compare with, e.g. before a change"
                    " (default: --nbdserver)")
    ap.add_argument("--base-arg", action="append", default=[], help="extra argument for base")
    ap.add_argument("--image", help="file to serve (default: a 1 GiB file in /dev/shm, removed after)")
    ap.add_argument("--image-size", default=1 << 30, type=int)
    ap.add_argument("--op", default="read", choices=["read", "write"])
    ap.add_argument("--fua", action="store_true")
    ap.add_argument("--bs", default=4096, type=int)
    ap.add_argument("--qd", default=32, type=int)
    ap.add_argument("--conns", default=1, type=int)
    ap.add_argument("--client-threads", default=1, type=int)
    ap.add_argument("--seconds", default=5.0, type=float)
    ap.add_argument("--warmup", default=1.0, type=float)
    ap.add_argument("--rounds", default=5, type=int)
    ap.add_argument("--server-cpus", help="taskset -c list for the server")
    ap.add_argument("--client-cpus", help="taskset -c list for nbdblast")
    ap.add_argument("--ours-arg", action="append", default=[], help="extra nbdserver argument")
    ap.add_argument("--nice", type=int, help="run server and client under nice -n N (negative"
                    " needs root): less noise from other work on a shared machine")
    ap.add_argument("--json", action="store_true", help="also print every run as JSON")
    args = ap.parse_args()
    if args.nice is not None:
        NICE[:] = ["nice", "-n", str(args.nice)]

    image, made = args.image, False
    if not image:
        image = f"/dev/shm/cpu_per_op-{os.getpid()}.img"
        made = True
    if not os.path.exists(image):
        with open(image, "wb") as f:  # real data, so that reads are not of holes
            chunk = os.urandom(1 << 20)
            for _ in range(args.image_size >> 20):
                f.write(chunk)
    else:
        made = False
    servers = args.servers.split(",")
    runs = {s: [] for s in servers}
    try:
        for rnd in range(args.rounds):
            for s in servers:
                r = one(args, s, image)
                runs[s].append(r)
                if args.json:
                    print(json.dumps({"server": s, "round": rnd, **r}), flush=True)
    finally:
        if made:
            os.unlink(image)

    med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]} for s in servers}
    what = f"{args.op}{' FUA' if args.fua else ''} bs={args.bs} qd={args.qd} conns={args.conns}"
    print(f"# {what}; medians of {args.rounds} rounds x {args.seconds:g} s"
          f" (server cpus {args.server_cpus or 'any'}, client cpus {args.client_cpus or 'any'}"
          f", nice {args.nice or 0})")
    print(f"{'server':8} {'IOPS':>9} {'srv us/op':>10} {'cli us/op':>10} {'p50 us':>8} {'p99 us':>8}"
          f"  IOPS runs")
    for s in servers:
        m = med[s]
        spread = " ".join(f"{r['iops'] / 1000:.1f}k" for r in runs[s])
        print(f"{s:8} {m['iops']:9.0f} {m['server_us_per_op']:10.2f} {m['client_us_per_op']:10.2f}"
              f" {m['p50_us']:8.1f} {m['p99_us']:8.1f}  {spread}")
    for other in ("nbdkit", "base"):
        if "ours" in med and other in med:
            o, k = med["ours"], med[other]
            print(f"ours/{other}: IOPS {o['iops'] / k['iops']:.2f}x,"
                  f" server CPU per op {o['server_us_per_op'] / k['server_us_per_op']:.2f}x")


if __name__ == "__main__":
    main()
