#!/usr/bin/python3
"""HTTP boot files under a storm: N clients at once, each on one kept-alive
connection, fetch a kernel (8 MiB) and then an initrd (5 MiB), as iPXE does,
from nbdserver --http (GET /files/IMAGE/GEN/NAME, http/files_api.hpp) and
from nginx (sendfile on) serving the same files from the same directory.

Reports per server, the median over --rounds (servers alternate each
round): wall time for all N, median and p99 of the per-client time
(connect to the initrd's last byte), the server's CPU time per request
(/proc/PID/stat of its process tree: utime+stime, children included), the
load generator's CPU, and the ratios ours/nginx. With --linger, each
client keeps its connection open after its downloads until every client is
done, as a node does that boots the kernel without closing it.

    /usr/bin/python3 bench/httpboot.py                  # N = 200, 5 rounds
    /usr/bin/python3 bench/httpboot.py --clients 50 --rounds 3 --linger

The load generator is python asyncio on raw sockets (recv_into one buffer
per client, no parsing beyond the status line and Content-Length), run in
this process. Needs nginx (Debian's nginx-light or nginx), run as any user.
See bench/README.md, "HTTP boot files (httpboot.py)".
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)
import run as rb  # noqa: E402  (bench/run.py: process accounting, free ports)

log = rb.log
median = rb.median
MiB = 1 << 20
FILES = ("vmlinuz", "initrd.img")


# ---------------------------------------------------------------- files

def make_files(root, kernel_mib, initrd_mib):
    """images/lab/generations/g1/boot/{vmlinuz,initrd.img} under root,
    random bytes; returns {name: size}."""
    d = os.path.join(root, "images", "lab", "generations", "g1", "boot")
    os.makedirs(d)
    sizes = {}
    for name, mib in zip(FILES, (kernel_mib, initrd_mib)):
        size = int(mib * MiB)
        with open(os.path.join(d, name), "wb") as f:
            left = size
            while left:
                n = min(left, MiB)
                f.write(os.urandom(n))
                left -= n
        sizes[name] = size
    for p in (root, os.path.dirname(d)):
        os.chmod(p, 0o755)
    return sizes


# ---------------------------------------------------------------- servers

class Proc:
    """A server process: pid, the URL path prefix of the files, stop()."""

    def __init__(self, name, popen, host, port, prefix, logpath):
        self.name, self.popen, self.host, self.port = name, popen, host, port
        self.prefix, self.logpath = prefix, logpath

    @property
    def pid(self):
        return self.popen.pid

    def cpu(self):
        return rb.tree_cpu_seconds(self.pid)

    def stop(self):
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_ours(args, store, tmp):
    ready = os.path.join(tmp, "ours.ready")
    logpath = os.path.join(tmp, "ours.log")
    argv = [args.nbdserver, "--store", store, "--listen", "127.0.0.1:0", "--threads", "1",
            "--http", "127.0.0.1:0", "--ready-file", ready, *args.ours_arg]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(logpath, "w"),
                         preexec_fn=rb._preexec)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"nbdserver exited: {rb.tail(logpath)}")
        if os.path.exists(ready):
            lines = open(ready).read().split()
            http = [l for l in lines if l.startswith("http://")]
            if http:
                host, _, port = http[0][len("http://"):].rpartition(":")
                return Proc("ours", p, host, int(port), "/files/lab/g1/", logpath)
        time.sleep(0.05)
    p.kill()
    raise SystemExit("nbdserver did not get ready in 30 s")


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 5;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/nginx-body;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {root};
        location / {{ }}
    }}
}}
"""


def start_nginx(args, store, tmp):
    """nginx on a free port (retried if another process takes it first)."""
    logpath = os.path.join(tmp, "nginx.log")
    for attempt in range(3):
        port = rb.free_port()
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(workers=args.nginx_workers, tmp=tmp, port=port, root=store,
                                      user="user root;" if os.geteuid() == 0 else ""))
        p = subprocess.Popen([args.nginx, "-p", tmp, "-c", conf], stdout=subprocess.DEVNULL,
                             stderr=open(logpath, "w"), preexec_fn=rb._preexec)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and p.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return Proc("nginx", p, "127.0.0.1", port,
                            "/images/lab/generations/g1/boot/", logpath)
            except OSError:
                time.sleep(0.05)
        p.kill()
        p.wait()
        log(f"nginx did not start on port {port} (attempt {attempt + 1}): {rb.tail(logpath)}")
    raise SystemExit("nginx did not start")


# ---------------------------------------------------------------- load

async def read_response(loop, sock, buf, expect_len):
    """Reads one response: headers, then exactly Content-Length bytes into
    buf (overwritten). Returns the body length."""
    view = memoryview(buf)
    head = b""
    while b"\r\n\r\n" not in head:
        n = await loop.sock_recv_into(sock, view)
        if n == 0:
            raise ConnectionError("closed in the headers")
        head += bytes(view[:n])
    head, _, rest = head.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        raise ConnectionError(lines[0])
    length = None
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    if length != expect_len:
        raise ConnectionError(f"Content-Length {length}, expected {expect_len}")
    got = len(rest)
    while got < length:
        n = await loop.sock_recv_into(sock, view)
        if n == 0:
            raise ConnectionError(f"closed after {got} of {length} bytes")
        got += n
    return got


async def storm(srv, sizes, n, linger):
    """All n clients at once; returns (wall seconds, per-client seconds).
    With linger, each client closes only when all are done."""
    all_done = asyncio.Event()
    times = []
    t0 = time.monotonic()

    async def one(buf):
        loop = asyncio.get_running_loop()
        c0 = time.monotonic()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (srv.host, srv.port))
            for name in FILES:
                req = f"GET {srv.prefix}{name} HTTP/1.1\r\nHost: boot\r\n\r\n".encode()
                await loop.sock_sendall(sock, req)
                await read_response(loop, sock, buf, sizes[name])
            times.append(time.monotonic() - c0)
            if len(times) == n:
                all_done.set()
            if linger:
                await all_done.wait()
        finally:
            sock.close()

    await asyncio.gather(*(one(bytearray(256 * 1024)) for _ in range(n)))
    return time.monotonic() - t0, times


def p99(vals):
    s = sorted(vals)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def one_round(srv, sizes, n, linger):
    c0 = srv.cpu()
    l0 = time.process_time()
    wall, times = asyncio.run(storm(srv, sizes, n, linger))
    # Let the server's last writes and closes be counted.
    time.sleep(0.2)
    cpu = srv.cpu() - c0
    return {"wall_s": wall, "p50_s": median(times), "p99_s": p99(times),
            "cpu_ms_per_req": 1000 * cpu / (len(FILES) * n),
            "loadgen_cpu_s": time.process_time() - l0,
            "MBps": n * sum(sizes.values()) / wall / 1e6}


# ---------------------------------------------------------------- report

KEYS = (("wall_s", "wall (s)", 2), ("p50_s", "p50/client (s)", 2), ("p99_s", "p99/client (s)", 2),
        ("cpu_ms_per_req", "server CPU ms/req", 2), ("MBps", "MB/s", 0),
        ("loadgen_cpu_s", "loadgen CPU (s)", 1))


def report(res, args):
    med = {s: {k: median([r[k] for r in rs]) for k, _, _ in KEYS} for s, rs in res.items()}
    names = list(res)
    w = max(len(t) for _, t, _ in KEYS) + 2
    lines = [f"N={args.clients} clients, kernel {args.kernel_mib} MiB + initrd "
             f"{args.initrd_mib} MiB each, {args.rounds} rounds (median)"
             + (", connections kept until all are done" if args.linger else "")]
    lines.append("".ljust(w) + "".join(s.rjust(12) for s in names)
                 + ("ours/nginx".rjust(12) if len(names) == 2 else ""))
    for k, title, nd in KEYS:
        row = title.ljust(w) + "".join(f"{med[s][k]:12.{nd}f}" for s in names)
        if len(names) == 2 and med[names[1]][k]:
            row += f"{med[names[0]][k] / med[names[1]][k]:12.2f}"
        lines.append(row)
    print("\n".join(lines))
    return med


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kernel-mib", type=float, default=8)
    ap.add_argument("--initrd-mib", type=float, default=5)
    ap.add_argument("--linger", action="store_true",
                    help="clients keep their connection open until all are done")
    ap.add_argument("--servers", default="ours,nginx")
    ap.add_argument("--nbdserver", default=os.path.join(REPO, "build", "nbdserver", "nbdserver"))
    ap.add_argument("--ours-arg", action="append", default=[],
                    help="an extra nbdserver argument (repeatable)")
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--nginx-workers", default="auto")
    ap.add_argument("--json", help="write the raw and median results here")
    return ap.parse_args()


def main():
    args = parse_args()
    rb.adopt_orphans_and_stop_on_signals()
    servers = args.servers.split(",")
    tmp = tempfile.mkdtemp(prefix="httpboot-")
    os.chmod(tmp, 0o755)
    store = os.path.join(tmp, "store")
    procs = {}
    try:
        sizes = make_files(store, args.kernel_mib, args.initrd_mib)
        for s in servers:
            procs[s] = {"ours": start_ours, "nginx": start_nginx}[s](args, store, tmp)
            log(f"{s}: pid {procs[s].pid}, http://{procs[s].host}:{procs[s].port}")
        res = {s: [] for s in servers}
        for r in range(args.rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            for s in order:
                m = one_round(procs[s], sizes, args.clients, args.linger)
                res[s].append(m)
                log(f"round {r + 1} {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
        med = report(res, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "rounds": res, "median": med}, f, indent=1)
    finally:
        for p in procs.values():
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
