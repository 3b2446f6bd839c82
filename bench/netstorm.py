#!/usr/bin/python3
"""Boot storm on an emulated LAN: N nodes, each in its own network namespace
behind a shaped veth link, replay the recorded boot (bench/boot-trace.txt.gz)
at once against a server in its own namespace.  Setups, on the same network
and in one run:

  nbdkit   nbdkit --filter=cow file BASE: every node reads the image from the
           server, and all nodes write into nbdkit's one overlay
  nbdroot  nbdserver --store: node i attaches lab/node-i directly (created at
           first attach), no peers
  peers    nbdserver --store --http (the tracker), and in each node's
           namespace an agent, nbdserver node, that serves its view on a Unix
           socket and fetches clean chunks from peers; nbdstorm replays
           against the agents' sockets

Reports, per setup and N: wall time (the last node done), p50 per node,
server egress bytes per node (the server veth's tx counter), server CPU
time, each agent's peak RSS, ratios to the best no-peer setup, the issue's
targets, and bench/stormsim.py's predictions beside the measured figures.
See bench/README.md, "Boot storm on an emulated network (netstorm.py)".

    /usr/bin/python3 bench/netstorm.py                        # N = 50,100,200
    /usr/bin/python3 bench/netstorm.py --nodes 20 --setups nbdroot
    /usr/bin/python3 bench/netstorm.py --cleanup               # stale namespaces only

Needs root (network namespaces), iproute2 (ip, tc), nbdkit, and
/usr/bin/python3 with matplotlib (apt-get install python3-matplotlib) for
the chart.
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
import zlib

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)
import run as rb  # noqa: E402  (bench/run.py: process helpers)
import storm  # noqa: E402  (bench/storm.py: the trace, the image, the store)
import stormsim  # noqa: E402

log = rb.log
median = rb.median
libc = rb.libc
CLONE_NEWNET = 0x40000000
MB = 1e6

SETUPS = ("nbdkit", "nbdroot", "peers")
NO_PEER = ("nbdkit", "nbdroot")
LABEL = {"nbdkit": "nbdkit cow, no peers",
         "nbdroot": "nbdroot --store, no peers",
         "peers": "nbdroot with peers (agents)"}
NBD_PORT, HTTP_PORT, PEER_PORT = 10809, 8080, 10809
NS_RE = re.compile(r"^nbst(\d+)-")


# --------------------------------------------------------------------------
# The emulated network


def sh(argv, stdin=None, check=True):
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def netns_names():
    out = sh(["ip", "-j", "netns", "list"], check=False).strip()
    return [n["name"] for n in json.loads(out or "[]")]


def delete_netns(names):
    if names:
        sh(["ip", "-force", "-batch", "-"], "".join(f"netns del {n}\n" for n in names),
           check=False)


def cleanup_stale():
    """Deletes the namespaces of netstorm runs whose process is gone (one
    killed with SIGKILL cannot clean up after itself)."""
    def gone(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return b"netstorm" not in f.read()
        except OSError:
            return True

    stale = [n for n in netns_names() if NS_RE.match(n) and gone(NS_RE.match(n).group(1))]
    if stale:
        log(f"deleting {len(stale)} stale namespaces of earlier runs")
        delete_netns(stale)
    for d in os.listdir("/tmp"):
        m = re.match(r"^nbdroot-netstorm-(\d+)$", d)
        if m and gone(m.group(1)):
            shutil.rmtree(os.path.join("/tmp", d), ignore_errors=True)


class Net:
    """Namespaces PREFIX-w (the switch: bridge br0), PREFIX-s (the server)
    and PREFIX-n<i> (node i).  Each host has eth0, one end of a veth pair
    whose other end (srv, n<i>) is a port of br0.  Both ends shape their
    egress, so each direction of each link is limited: with netem (delay
    rtt/4 and rate: a round trip between two hosts crosses four egress
    queues) where the kernel has it, else with tbf (rate only)."""

    def __init__(self, prefix, nodes, args):
        self.prefix, self.nodes, self.args = prefix, nodes, args
        self.switch, self.server = f"{prefix}-w", f"{prefix}-s"
        self.server_ip = "10.77.0.1"
        self.created = []
        self.netem = None  # known after up()

    def node_ns(self, i):
        return f"{self.prefix}-n{i}"

    @staticmethod
    def node_ip(i):
        h = i + 2
        if h > 65533:
            raise ValueError("at most 65,532 nodes in 10.77.0.0/16")
        return f"10.77.{h >> 8}.{h & 255}"

    def qdisc(self, dev, rate):
        if self.netem:
            us = self.args.rtt_ms * 1000 / 4
            return (f"qdisc add dev {dev} root netem delay {us:.0f}us rate {rate} "
                    f"limit {self.args.queue_packets}")
        return (f"qdisc add dev {dev} root tbf rate {rate} burst {self.args.burst} "
                f"limit {self.args.queue_bytes}")

    def has_netem(self):
        r = subprocess.run(["tc", "-n", self.switch, "qdisc", "add", "dev", "lo", "root", "netem",
                            "delay", "1us"], capture_output=True, text=True, timeout=30)
        return r.returncode == 0

    def up(self):
        t0 = time.monotonic()
        hosts = [(self.server, self.server_ip, "srv", self.args.server_rate)]
        hosts += [(self.node_ns(i), self.node_ip(i), f"n{i}", self.args.node_rate)
                  for i in range(self.nodes)]
        names = [self.switch] + [h[0] for h in hosts]
        self.created = names
        sh(["ip", "-batch", "-"], "".join(f"netns add {n}\n" for n in names))
        self.netem = self.has_netem()
        if not self.netem:
            log("this kernel has no sch_netem: links are shaped with tbf, rate only; "
                "the round trip is the software path's own")
        sw = ["link add br0 type bridge", "link set br0 addrgenmode none", "link set br0 up"]
        for ns, _, port, _ in hosts:
            sw += [f"link add {port} type veth peer name eth0 netns {ns}",
                   f"link set {port} addrgenmode none", f"link set {port} master br0",
                   f"link set {port} up"]
        sh(["ip", "-n", self.switch, "-batch", "-"], "\n".join(sw) + "\n")
        # The switch's port toward a host shapes that host's download.
        sh(["tc", "-n", self.switch, "-batch", "-"],
           "".join(self.qdisc(port, rate) + "\n" for _, _, port, rate in hosts))
        procs = []
        for ns, ip, _, rate in hosts:
            procs.append(subprocess.Popen(["ip", "-n", ns, "-batch", "-"], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True))
            procs[-1].stdin.write(f"link set lo up\nlink set eth0 addrgenmode none\n"
                                  f"addr add {ip}/16 dev eth0\nlink set eth0 up\n")
            procs[-1].stdin.close()
            procs.append(subprocess.Popen(["tc", "-n", ns] + self.qdisc("eth0", rate).split(),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True))
            if len(procs) >= 16:
                self._wait(procs)
        self._wait(procs)
        log(f"network up: {len(hosts)} hosts in {time.monotonic() - t0:.1f} s")

    @staticmethod
    def _wait(procs):
        for p in procs:
            err = p.stderr.read()
            if p.wait() != 0:
                raise RuntimeError(f"{' '.join(p.args)}: {err.strip()}")
        procs.clear()

    def down(self):
        if self.created:
            delete_netns(self.created)
            left = set(self.created) & set(netns_names())
            if left:
                log(f"warning: namespaces left behind: {sorted(left)[:5]}...")
            self.created = []

    def rtt_ms(self, i, samples=20):
        """The round trip node i -> server in ms: the median time of a TCP
        connect (SYN, SYN-ACK) to a socket listening in the server's
        namespace (this machine has no ping)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)

        def enter(ns):
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise RuntimeError(f"setns {ns} failed")
            finally:
                os.close(fd)

        socks = []
        try:
            enter(self.server)
            ls = socket.socket()
            socks.append(ls)
            ls.bind((self.server_ip, 0))
            ls.listen(samples)
            enter(self.node_ns(i))
            clients = [socket.socket() for _ in range(samples)]
            socks += clients
        finally:
            libc.setns(home, CLONE_NEWNET)
            os.close(home)
        try:
            times = []
            for c in clients:
                t = time.perf_counter()
                c.connect(ls.getsockname())
                times.append((time.perf_counter() - t) * 1000)
            return median(times)
        finally:
            for c in socks:
                c.close()

    def counters(self, ns):
        """{dev: (tx_bytes, rx_bytes)} of every link in namespace ns."""
        out = json.loads(sh(["ip", "-n", ns, "-j", "-s", "link", "show"]))
        return {l["ifname"]: (l["stats64"]["tx"]["bytes"], l["stats64"]["rx"]["bytes"])
                for l in out}


# --------------------------------------------------------------------------
# Processes in namespaces


SPAWNED = []  # every process spawn() started, for the cleanup on the way out


def spawn(ns, argv, logpath, env=None):
    """Starts argv inside network namespace ns; it dies with us."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)

    def pre():
        if libc.setns(fd, CLONE_NEWNET) != 0:
            os._exit(126)
        libc.prctl(rb.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.setpgid(0, 0)

    try:
        with open(logpath, "ab") as logf:
            logf.write(("\n$ " + " ".join(argv) + "\n").encode())
            logf.flush()
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                 stderr=subprocess.STDOUT, preexec_fn=pre, env=env)
            SPAWNED.append(p)
            return p
    finally:
        os.close(fd)


def stop_all(procs, grace=5.0):
    """SIGTERM to every process, SIGKILL to those alive after `grace` s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_for(what, cond, proc_list, timeout, logpath):
    deadline = time.monotonic() + timeout
    while not cond():
        for p in proc_list:
            if p.poll() is not None:
                raise rb.ServerError(f"{what}: {p.args[0]} exited {p.returncode} "
                                     f"(log {logpath}):\n{rb.tail(logpath)}")
        if time.monotonic() > deadline:
            raise rb.ServerError(f"{what}: not ready after {timeout:.0f} s (log {logpath})")
        time.sleep(0.05)


def host_cpu():
    """(busy, total) jiffies of all CPUs from /proc/stat: busy is
    everything but idle and iowait (other tenants' work included)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def node_supported(nbdserver):
    """Does this nbdserver have the node role?  An nbdserver without it
    prints its own help for `node --help` and exits 0, so look at the text."""
    try:
        r = subprocess.run([nbdserver, "node", "--help"], capture_output=True, text=True,
                           timeout=10)
    except OSError:
        return False
    return r.returncode == 0 and "--peer-listen" in r.stdout + r.stderr


def server_has_tracker(nbdserver):
    """Does this nbdserver serve the tracker (--http)?"""
    r = subprocess.run([nbdserver, "--help"], capture_output=True, text=True, timeout=10)
    return "--http" in r.stdout


def write_chunk_digests(store, image="lab", gen="g1", chunk=65536):
    """The generation's chunks.sha256 (docs/imagebuilder.md), which agents
    need to check chunks from peers; storm.make_store links the image in
    without one.  Skipped when it is newer than the image."""
    gdir = os.path.join(store, "images", image, "generations", gen)
    img, out = os.path.join(gdir, "image.ext4"), os.path.join(gdir, "chunks.sha256")
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(img):
        return
    size = os.path.getsize(img)
    table = bytearray()
    with open(img, "rb") as f:
        while block := f.read(chunk):
            table += hashlib.sha256(block).digest()
    tag = 1469598103934665603  # storage::le::fnv1a's offset basis (not FNV's own)
    for b in f"{image}@{gen}".encode():
        tag = ((tag ^ b) * 0x100000001b3) & 0xffffffffffffffff
    head = struct.pack("<8sIIIIII QQQ 32s 36x", b"NBDRCHKS", 1, 128, 1, 32, chunk, 0, size,
                       (size + chunk - 1) // chunk, tag, hashlib.sha256(table).digest())
    head += struct.pack("<I", zlib.crc32(head))
    with open(out + ".tmp", "wb") as f:
        f.write(head + table)
    os.replace(out + ".tmp", out)
    log(f"wrote {out} ({len(table) // 32} chunk digests)")


# --------------------------------------------------------------------------
# One storm


def start_server(args, net, setup, base, store, tmp, logpath):
    """(process, nbdstorm --uri) of the setup's server, listening in the
    server's namespace."""
    srv_ip = net.server_ip
    if setup == "nbdkit":
        pidf = os.path.join(tmp, "nbdkit.pid")
        argv = ["nbdkit", "-f", "--exit-with-parent", "-p", str(NBD_PORT), "-i", srv_ip,
                "-P", pidf, "--filter=cow", "file", base, "cow-block-size=4096"]
        p = spawn(net.server, argv, logpath, env=dict(os.environ, TMPDIR=args.workdir))
        wait_for("nbdkit", lambda: os.path.exists(pidf), [p], 20, logpath)
        return p, f"nbd://{srv_ip}:{NBD_PORT}/"
    ready = os.path.join(tmp, "server.ready")
    argv = [args.nbdserver, "--listen", f"{srv_ip}:{NBD_PORT}", "--ready-file", ready,
            "--store", store] + args.server_arg
    if not any(a.startswith("--log-level") for a in args.server_arg):
        argv += ["--log-level", "warn"]
    if setup == "peers" and args.tracker:
        argv += ["--http", f"{srv_ip}:{HTTP_PORT}"]
    p = spawn(net.server, argv, logpath)
    wait_for("nbdserver", lambda: os.path.exists(ready) and os.path.getsize(ready) > 0, [p], 20,
             logpath)
    return p, f"nbd://{srv_ip}:{NBD_PORT}/lab/node-%d"


def start_agents(args, net, n, tmp, logdir, name="node", port=PEER_PORT):
    """n agents lab/<name>-i, agent i in node i's namespace, kernel socket
    <tmp>/<name>-i.sock; returns once every socket takes connections."""
    agents = []
    for i in range(n):
        sock = os.path.join(tmp, f"{name}-{i}.sock")
        argv = [args.agent_nbdserver, "node", "--server", f"{net.server_ip}:{NBD_PORT}",
                "--export", f"lab/{name}-{i}", "--socket", sock,
                "--peer-listen", f"{net.node_ip(i)}:{port}", "--peers", "on",
                "--stats-file", os.path.join(tmp, f"{name}-{i}.stats")]
        if args.tracker:
            argv += ["--tracker", f"{net.server_ip}:{HTTP_PORT}"]
        argv += args.agent_arg
        if args.cache:
            argv += ["--cache", args.cache]
        agents.append(spawn(net.node_ns(i), argv, os.path.join(logdir, f"agent-{name}-{i}.log")))

    def all_listening():
        for i in range(n):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(os.path.join(tmp, f"{name}-{i}.sock"))
            except OSError:
                return False
            finally:
                s.close()
        return True

    wait_for("agents", all_listening, agents, 60,
             os.path.join(logdir, f"agent-{name}-0.log"))
    return agents


def seed_boot(args, net, tmp, logdir):
    """One node boots alone before the storm, untimed, so that the tracker
    records the generation's boot order (what a lab's first boot of a new
    generation does); it then leaves, so it serves nobody in the storm."""
    seed = start_agents(args, net, 1, tmp, logdir, name="seed", port=PEER_PORT + 1)
    try:
        argv = [args.nbdstorm, "--trace", args.trace, "--nodes", "1", "--qd", str(args.qd),
                "--threads", "1", "--timeout", str(args.timeout),
                "--uri", f"nbd+unix:///?socket={tmp}/seed-%d.sock"]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout + 60,
                           preexec_fn=rb._preexec)
        if p.returncode != 0:
            raise rb.ServerError(f"seed boot: nbdstorm exited {p.returncode}: "
                                 f"{p.stderr.strip()[-2000:]}")
    finally:
        stop_all(seed)


AGENT_COUNTERS = ("gen_server_bytes", "gen_peer_bytes", "view_read_bytes", "gen_cache_hits",
                  "prefetched_chunks", "peer_failures", "peer_skipped", "peer_timeouts", "peer_bad_chunks",
                  "served_bytes", "served_refused")


def agent_totals(tmp, n, name="node"):
    """The agents' counters (--stats-file, rewritten every 250 ms: read
    after a wait), summed over the storm's nodes."""
    time.sleep(0.6)
    tot = dict.fromkeys(AGENT_COUNTERS, 0)
    for i in range(n):
        try:
            with open(os.path.join(tmp, f"{name}-{i}.stats")) as f:
                st = json.load(f)
        except (OSError, ValueError):
            continue
        for k in AGENT_COUNTERS:
            tot[k] += st.get(k, 0)
    return tot


def storm_once(args, net, setup, n, rep, base, store, outdir):
    tmp = os.path.join(args.rundir, f"{setup}-{n}-{rep}")
    os.makedirs(tmp)
    logdir = os.path.join(outdir, "logs", f"{setup}-{n}-{rep}")
    os.makedirs(logdir)
    if setup != "nbdkit":
        storm.clear_nodes(store)
        shutil.rmtree(os.path.join(store, "tracker"), ignore_errors=True)  # boot orders
    os.sync()
    rb.warm_cache(base)
    srv, uri = start_server(args, net, setup, base, store, tmp, os.path.join(logdir, "server.log"))
    agents = []
    try:
        argv = [args.nbdstorm, "--trace", args.trace, "--nodes", str(n), "--qd", str(args.qd),
                "--threads", str(args.client_threads), "--timeout", str(args.timeout),
                "--per-node", os.path.join(logdir, "pernode.txt")]
        if setup == "peers":
            if args.seed_boot:
                seed_boot(args, net, tmp, logdir)
            agents = start_agents(args, net, n, tmp, logdir)
            argv += ["--uri", f"nbd+unix:///?socket={tmp}/node-%d.sock"]
        else:
            argv += ["--uri", uri, "--netns", f"{net.prefix}-n%d"]
        c0, w0 = net.counters(net.server)["eth0"], net.counters(net.switch)
        cpu0, host0 = rb.tree_cpu_seconds(srv.pid), host_cpu()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout + 60,
                           preexec_fn=rb._preexec)
        cpu1, host1 = rb.tree_cpu_seconds(srv.pid), host_cpu()
        c1, w1 = net.counters(net.server)["eth0"], net.counters(net.switch)
        if srv.poll() is not None:
            raise rb.ServerError(f"{setup}: the server exited {srv.returncode} during the storm")
        if p.returncode != 0:
            raise rb.ServerError(f"{setup} N={n}: nbdstorm exited {p.returncode}: "
                                 f"{p.stderr.strip()[-2000:]}")
        res = json.loads(p.stdout)
        # A node's upload is what the switch's port n<i> received.
        node_up = sum(w1[f"n{i}"][1] - w0[f"n{i}"][1] for i in range(n))
        hwm = [vm_hwm_kib(a.pid) for a in agents]
        if agents:
            res["agents"] = agent_totals(tmp, n)
        busy = (host1[0] - host0[0]) / max(1, host1[1] - host0[1])
        res.update(setup=setup, nodes=n, rep=rep, server_cpu_s=round(cpu1 - cpu0, 2),
                   host_busy=round(busy, 3),
                   link_util=round((c1[0] - c0[0]) / (res["run_s"] * stormsim.rate_bps(
                       args.server_rate)), 3),
                   server_tx_bytes=c1[0] - c0[0], server_rx_bytes=c1[1] - c0[1],
                   node_tx_bytes=node_up,
                   agent_hwm_kib_max=max((h for h in hwm if h), default=None),
                   agent_hwm_kib_median=median([h for h in hwm if h]) if agents else None)
        return res
    finally:
        stop_all(agents + [srv])


# --------------------------------------------------------------------------
# Report


def fmt(v, nd=2, unit=""):
    if v is None or v != v:
        return "-"
    return f"{v:.{nd}f}{unit}"


def summarize(results, setups, sizes):
    med = {}
    for s in setups:
        for n in sizes:
            rs = [r for r in results if r["setup"] == s and r["nodes"] == n]
            if not rs:
                continue
            m = {k: median([r[k] for r in rs]) for k in
                 ("wall_s", "p50_s", "server_cpu_s", "server_tx_bytes", "server_rx_bytes",
                  "node_tx_bytes", "client_cpu_s", "host_busy", "link_util")}
            m["egress_per_node"] = m["server_tx_bytes"] / n
            m["runs"] = [r["wall_s"] for r in rs]
            hw = [r["agent_hwm_kib_max"] for r in rs if r.get("agent_hwm_kib_max")]
            m["agent_hwm_mib_max"] = max(hw) / 1024 if hw else None
            med[(s, n)] = m
    return med


def report(args, med, sims, tr, out):
    lines = []
    hdr = (f"{'setup':<30} {'N':>5} {'wall s':>7} {'p50 s':>7} {'egress/node MB':>14} "
           f"{'% distinct':>10} {'srv CPU s':>9} {'link':>5} {'host':>5} {'agent RSS MiB':>13} {'wall/best':>9} "
           f"{'egr/best':>8} | {'sim wall':>8} {'err':>6} {'sim egr MB':>10} {'err':>6}  runs")
    lines.append(hdr)
    for (s, n), m in med.items():
        best = [med[(b, n)] for b in NO_PEER if (b, n) in med]
        bw = min((b["wall_s"] for b in best), default=None)
        be = min((b["egress_per_node"] for b in best), default=None)
        # Peers are compared with the model of this host (its CPU shared by
        # every agent), when a peers run calibrated it.
        sim = (sims.get(("peers-host", n)) or sims.get(("peers", n))
               if s == "peers" and args.tracker else sims.get(("nopeer", n)))
        sw = sim["wall_s"] if sim else None
        se = sim["server_tx_bytes"] / n / MB if sim else None
        err_w = (sw / m["wall_s"] - 1) * 100 if sw and m["wall_s"] else None
        err_e = (se / (m["egress_per_node"] / MB) - 1) * 100 if se else None
        lines.append(
            f"{LABEL[s]:<30} {n:>5} {fmt(m['wall_s']):>7} {fmt(m['p50_s']):>7} "
            f"{fmt(m['egress_per_node'] / MB, 1):>14} "
            f"{fmt(100 * m['egress_per_node'] / tr['distinct_read_bytes'], 0, '%'):>10} "
            f"{fmt(m['server_cpu_s']):>9} {fmt(100 * m['link_util'], 0, '%'):>5} "
            f"{fmt(100 * m['host_busy'], 0, '%'):>5} {fmt(m['agent_hwm_mib_max'], 1):>13} "
            f"{fmt(m['wall_s'] / bw if bw else None, 2, 'x'):>9} "
            f"{fmt(m['egress_per_node'] / be if be else None, 2, 'x'):>8} | "
            f"{fmt(sw):>8} {fmt(err_w, 0, '%'):>6} {fmt(se, 1):>10} {fmt(err_e, 0, '%'):>6}  "
            + " ".join(fmt(w) for w in m["runs"]))
    lines.append("")
    lines.append(f"one boot's distinct reads: {tr['distinct_read_bytes'] / MB:.1f} MB "
                 f"({tr['distinct_chunks']} chunks of 64 KiB = "
                 f"{tr['distinct_chunks'] * 65536 / MB:.1f} MB); reads {tr['read_bytes'] / MB:.1f} MB "
                 f"in {tr['reads']} requests")
    big = max((n for (s, n) in med), default=None)
    if big is not None:
        best = [med[(b, big)] for b in NO_PEER if (b, big) in med]
        p = med.get(("peers", big))
        if p and best:
            rw = p["wall_s"] / min(b["wall_s"] for b in best)
            re_ = p["egress_per_node"] / tr["distinct_read_bytes"]
            if not args.tracker:
                lines.append("peers were off (the server has no tracker): these are the agents' "
                             "figures, not the peers'")
            lines.append(f"target N={big}: wall peers/best no-peer <= 0.2: {rw:.2f} "
                         f"{'met' if rw <= 0.2 else 'NOT met'}")
            lines.append(f"target N={big}: egress/node <= 10% of distinct reads: {re_ * 100:.0f}% "
                         f"{'met' if re_ <= 0.1 else 'NOT met'}")
            lines.append(f"peers N={big}: nodes uploaded {p['node_tx_bytes'] / big / MB:.1f} MB "
                         f"per node (what peers served, plus the node's writes and requests)")
            if p["agent_hwm_mib_max"]:
                lines.append(f"agent peak RSS (VmHWM, max over agents): {p['agent_hwm_mib_max']:.1f}"
                             f" MiB (bound: cache + 16 MiB)")
        else:
            lines.append(f"targets (N={big}): wall <= 0.2x best no-peer, egress/node <= "
                         f"{tr['distinct_read_bytes'] * 0.1 / MB:.1f} MB: no peers setup measured")
    text = "\n".join(lines)
    print(text)
    out.write(text + "\n")


def sim_report(sims, sizes, calibrated, out):
    lines = ["", "stormsim predictions (" + ("calibrated from the no-peer runs above" if calibrated
                                             else "not calibrated: no no-peer run") +
             "; peers on a LAN, where each node's CPU is its own, and, when a peers run "
             "calibrated it, on this host, whose CPU every agent shares):",
             f"{'N':>7} {'no-peer wall s':>14} {'egress/node MB':>14} {'peers wall s':>12} "
             f"{'egress/node MB':>14} {'wall ratio':>10} {'this host s':>11}"]
    for n in sizes:
        a, b, h = sims.get(("nopeer", n)), sims.get(("peers", n)), sims.get(("peers-host", n))
        if not a:
            continue
        lines.append(f"{n:>7} {a['wall_s']:>14.2f} {a['server_tx_bytes'] / n / MB:>14.1f} "
                     f"{b['wall_s']:>12.2f} {b['server_tx_bytes'] / n / MB:>14.2f} "
                     f"{b['wall_s'] / a['wall_s']:>9.2f}x {fmt(h['wall_s'] if h else None):>11}")
    text = "\n".join(lines)
    print(text)
    out.write(text + "\n")


def chart(med, sims, setups, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"nbdkit": "tab:gray", "nbdroot": "tab:blue", "peers": "tab:green"}
    for s in setups:
        pts = sorted((n, m) for (ss, n), m in med.items() if ss == s)
        if pts:
            ax[0].plot([n for n, _ in pts], [m["wall_s"] for _, m in pts], "o-",
                       color=colors[s], label=LABEL[s])
            ax[1].plot([n for n, _ in pts], [m["egress_per_node"] / MB for _, m in pts], "o-",
                       color=colors[s], label=LABEL[s])
    for kind, c in (("nopeer", "tab:blue"), ("peers", "tab:green"), ("peers-host", "tab:olive")):
        pts = sorted((n, v) for (k, n), v in sims.items() if k == kind)
        if pts:
            lbl = "stormsim, " + {"nopeer": "no peers", "peers": "peers on a LAN",
                                  "peers-host": "peers on this host"}[kind]
            ax[0].plot([n for n, _ in pts], [v["wall_s"] for _, v in pts], "x--", color=c,
                       alpha=0.6, label=lbl)
            ax[1].plot([n for n, _ in pts], [v["server_tx_bytes"] / n / MB for n, v in pts],
                       "x--", color=c, alpha=0.6, label=lbl)
    for a, t in ((ax[0], "storm wall time (s)"), (ax[1], "server egress per node (MB)")):
        a.set_xscale("log")
        a.set_xlabel("nodes")
        a.set_title(t)
        a.grid(True, alpha=0.3)
    ax[1].set_yscale("log")
    ax[0].set_yscale("log")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=os.path.join(BENCH_DIR, "boot-trace.txt.gz"))
    ap.add_argument("--nodes", default="50,100,200", help="comma list of N")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--setups", default=None,
                    help=f"comma list of {', '.join(SETUPS)} (default: those available; "
                         f"peers needs nbdserver node)")
    ap.add_argument("--qd", type=int, default=4)
    ap.add_argument("--server-rate", default="1gbit", help="tc rate of the server's link")
    ap.add_argument("--node-rate", default="1gbit", help="tc rate of each node's link")
    ap.add_argument("--rtt-ms", type=float, default=0.2,
                    help="round trip between two hosts added by netem (rtt/4 per egress)")
    ap.add_argument("--queue-packets", type=int, default=10000, help="netem limit (packets)")
    ap.add_argument("--queue-bytes", default="16mb", help="tbf limit (without netem)")
    ap.add_argument("--burst", default="256kb", help="tbf burst (without netem)")
    ap.add_argument("--cache", help="the agents' --cache SIZE")
    ap.add_argument("--no-seed-boot", dest="seed_boot", action="store_false",
                    help="peers: no untimed boot of one node before the storm (then the "
                         "tracker has no boot order and the agents do not prefetch)")
    ap.add_argument("--workdir", default="/var/tmp/nbdroot-netstorm",
                    help="image, store (on the disk: flushes are real)")
    ap.add_argument("--outdir", help="default bench/results/netstorm-<timestamp>")
    ap.add_argument("--nbdserver", default=os.path.join(REPO, "build", "nbdserver", "nbdserver"))
    ap.add_argument("--nbdstorm", default=os.path.join(REPO, "build", "bench", "nbdstorm"))
    ap.add_argument("--agent-nbdserver",
                    help="the nbdserver whose node role the agents run (default --nbdserver)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra nbdserver argument")
    ap.add_argument("--agent-arg", action="append", default=[], help="extra nbdserver node argument")
    ap.add_argument("--client-threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per storm")
    ap.add_argument("--sim-nodes", default="50,100,200,1000,10000")
    ap.add_argument("--cleanup", action="store_true",
                    help="only delete stale namespaces of killed runs, then exit")
    args = ap.parse_args()
    args.agent_nbdserver = args.agent_nbdserver or args.nbdserver
    args.sizes = [int(x) for x in args.nodes.split(",") if x]
    args.sim_sizes = sorted(set(int(x) for x in args.sim_nodes.split(",") if x) | set(args.sizes))
    if args.setups is not None:
        args.setups = [s for s in args.setups.split(",") if s]
        for s in args.setups:
            if s not in SETUPS:
                ap.error(f"unknown setup {s!r} (expected {', '.join(SETUPS)})")
    return args


def check_tools(args):
    if os.geteuid() != 0:
        sys.exit("netstorm.py needs root (network namespaces, tc)")
    for exe in ("ip", "tc", "nbdkit"):
        if not shutil.which(exe):
            sys.exit(f"{exe} not found (apt-get install iproute2 nbdkit)")
    for exe in (args.nbdserver, args.agent_nbdserver, args.nbdstorm):
        if not os.access(exe, os.X_OK):
            sys.exit(f"{exe} not found (ninja -C build nbdserver nbdstorm, or pass the path)")
    have_node = node_supported(args.agent_nbdserver)
    if args.setups is None:
        args.setups = list(SETUPS if have_node else NO_PEER)
        if not have_node:
            log(f"{args.agent_nbdserver} has no node role (nbdserver node --help): "
                f"setup peers skipped")
    elif "peers" in args.setups and not have_node:
        sys.exit(f"setup peers: {args.agent_nbdserver} has no node role: `nbdserver node --help` "
                 f"does not describe --peer-listen.  Build one with it, or leave peers out of "
                 f"--setups.")
    args.tracker = have_node and server_has_tracker(args.nbdserver)
    if "peers" in args.setups and not args.tracker:
        LABEL["peers"] = "nbdroot agents, no tracker"
        log(f"{args.nbdserver} has no tracker (--http): the peers setup runs its agents "
            f"without --tracker, so they read everything from the server (peers off)")


def raise_neigh_limits(need):
    """The ARP table's gc thresholds are global (shared by all namespaces);
    raise gc_thresh3 (and 2) if N nodes talking to each other would overflow
    it.  Returns what to restore."""
    base = "/proc/sys/net/ipv4/neigh/default/"
    old = {k: int(open(base + k).read()) for k in ("gc_thresh1", "gc_thresh2", "gc_thresh3")}
    if old["gc_thresh3"] >= need:
        return {}
    for k, v in (("gc_thresh3", need), ("gc_thresh2", need * 3 // 4)):
        with open(base + k, "w") as f:
            f.write(str(max(v, old[k])))
    log(f"raised the ARP table's gc_thresh3 to {need} for this run")
    return old


def main():
    args = parse_args()
    if args.cleanup:
        cleanup_stale()
        return 0
    check_tools(args)
    rb.adopt_orphans_and_stop_on_signals()
    cleanup_stale()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outdir = args.outdir or os.path.join(BENCH_DIR, "results", f"netstorm-{stamp}")
    os.makedirs(os.path.join(outdir, "logs"), exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    args.rundir = f"/tmp/nbdroot-netstorm-{os.getpid()}"
    os.makedirs(args.rundir)

    size, reqs = storm.read_trace(args.trace)
    tr = stormsim.trace_stats(reqs)
    base = storm.prepare_image(args.workdir, size, reqs)
    store = storm.make_store(args.workdir, base)
    if "peers" in args.setups:
        write_chunk_digests(store)
    header = (f"netstorm {stamp}: setups {','.join(args.setups)}; N {args.nodes}; {args.reps} "
              f"rep(s), median shown; server link {args.server_rate}, node links "
              f"{args.node_rate}, QD{args.qd}; "
              f"{os.cpu_count()} CPUs, loadavg "
              f"{' '.join(open('/proc/loadavg').read().split()[:3])}\n"
              f"egress = tx bytes of the server's veth (NBD payload + headers + TCP/IP); "
              f"srv CPU = utime+stime of the server during the storm;\nlink = server egress / "
              f"(storm time x server link rate); host = busy share of all CPUs during the storm "
              f"(other tenants included)")
    print(header)
    results, problems, restore, net = [], [], {}, None
    sim_rtt = args.rtt_ms / 1000
    try:
        restore = raise_neigh_limits(4 * max(args.sizes) + 64 +
                                     (max(args.sizes) ** 2 if "peers" in args.setups else 0))
        net = Net(f"nbst{os.getpid()}", max(args.sizes), args)
        net.up()
        rtt = net.rtt_ms(0)
        log(f"round trip node 0 -> server (TCP connect): {fmt(rtt, 3)} ms")
        header += (f"\nlinks shaped with "
                   f"{f'netem (rate, rtt {args.rtt_ms} ms)' if net.netem else 'tbf (rate only: no sch_netem in this kernel)'}; "
                   f"measured round trip node 0 -> server (TCP connect): {fmt(rtt, 3)} ms")
        sim_rtt = args.rtt_ms / 1000 if net.netem else (rtt or 0) / 1000
        failed = set()
        for n in args.sizes:
            for rep in range(args.reps):
                for s in args.setups:
                    if s in failed:
                        continue
                    try:
                        r = storm_once(args, net, s, n, rep, base, store, outdir)
                    except (rb.ServerError, subprocess.TimeoutExpired) as e:
                        log(f"{s} N={n} rep {rep} failed; {s} is left out from here on:\n{e}")
                        problems.append(f"{s} N={n} rep {rep}: {e}")
                        failed.add(s)
                        continue
                    log(f"{s} N={n} rep {rep}: wall {r['wall_s']:.2f} s p50 {r['p50_s']:.2f} "
                        f"egress/node {r['server_tx_bytes'] / n / MB:.1f} MB, server CPU "
                        f"{r['server_cpu_s']:.2f} s, client CPU {r['client_cpu_s']:.2f} s"
                        + (f", agent VmHWM max {r['agent_hwm_kib_max'] / 1024:.1f} MiB"
                           if r.get("agent_hwm_kib_max") else ""))
                    if r.get("agents"):
                        a = r["agents"]
                        log(f"  agents, per node: chunks from the server "
                            f"{a['gen_server_bytes'] / n / MB:.1f} MB, from peers "
                            f"{a['gen_peer_bytes'] / n / MB:.1f} MB, view reads "
                            f"{a['view_read_bytes'] / n / MB:.2f} MB, prefetched "
                            f"{a['prefetched_chunks'] / n:.0f} chunks; peer failures "
                            f"{a['peer_failures']} ({a['peer_timeouts']} timeouts, "
                            f"{a['peer_bad_chunks']} bad), skipped (backed off) {a['peer_skipped']}, "
                            f"refused {a['served_refused']}")
                    results.append(r)
    except KeyboardInterrupt:
        problems.append("interrupted: results are partial")
    except (rb.ServerError, RuntimeError, subprocess.TimeoutExpired) as e:
        problems.append(str(e))
    finally:
        stop_all([p for p in SPAWNED if p.poll() is None])
        if net:
            net.down()
        for k, v in restore.items():
            with open("/proc/sys/net/ipv4/neigh/default/" + k, "w") as f:
                f.write(str(v))
        subprocess.run(["rm", "-rf", args.rundir])
    med = summarize(results, args.setups, args.sizes)
    sims = {}
    host_params = None
    calib = [m | {"nodes": n} for (s, n), m in med.items() if s == "nbdroot"] or \
        [m | {"nodes": n} for (s, n), m in med.items() if s == "nbdkit"]
    try:
        params = stormsim.calibrate(stormsim.Params(server_rate=stormsim.rate_bps(args.server_rate),
                                                    node_rate=stormsim.rate_bps(args.node_rate),
                                                    rtt=sim_rtt, qd=args.qd),
                                    reqs, calib)
        for n in args.sim_sizes:
            for kind in ("nopeer", "peers"):
                sims[(kind, n)] = stormsim.simulate(reqs, n, params, peers=kind == "peers")
        # This host: every agent shares its CPU; the cost per chunk comes
        # from the peers runs, so the sizes not measured show the error.
        host_params = stormsim.calibrate_host(
            params, reqs, [m | {"nodes": n} for (s, n), m in med.items() if s == "peers"],
            os.cpu_count() or 1)
        if host_params:
            for n in args.sim_sizes:
                if n <= stormsim.HOST_MAX_NODES:
                    sims[("peers-host", n)] = stormsim.simulate(reqs, n, host_params, peers=True)
    except Exception:  # noqa: BLE001  (the measured figures must survive a sim bug)
        problems.append("stormsim failed:\n" + traceback.format_exc())
    with open(os.path.join(outdir, "netstorm-report.txt"), "w") as out:
        out.write(header + "\n")
        report(args, med, sims, tr, out)
        if sims:
            out.write(f"stormsim parameters: {params.describe()}\n")
            print(f"stormsim parameters: {params.describe()}")
            if host_params:
                out.write(f"stormsim on this host: {host_params.describe()}\n")
                print(f"stormsim on this host: {host_params.describe()}")
            sim_report(sims, args.sim_sizes, bool(calib), out)
        for p in problems:
            print("problem: " + p)
            out.write("problem: " + p + "\n")
    with open(os.path.join(outdir, "netstorm.json"), "w") as f:
        json.dump(dict(header=header, trace=tr, results=results, problems=problems,
                       medians=[dict(setup=s, nodes=n, **m) for (s, n), m in med.items()],
                       sim=[dict(kind=k, nodes=n, **v) for (k, n), v in sims.items()],
                       sim_params=vars(params) if sims else None,
                       sim_host_params=vars(host_params) if sims and host_params else None),
                  f, indent=1)
    try:
        chart(med, sims, args.setups, os.path.join(outdir, "chart.png"))
    except Exception:  # noqa: BLE001  (a missing matplotlib must not lose the results)
        log("chart failed:\n" + traceback.format_exc())
    log(f"results in {outdir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
