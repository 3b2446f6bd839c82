#!/usr/bin/python3
"""A discrete-event simulation of a boot storm: N nodes replay the recorded
boot at once against one server, with or without peers.  It predicts the
storm's wall time and the server's egress for sizes the emulated network
cannot reach (1,000 and 10,000 nodes).  See bench/README.md, "Boot storm on
an emulated network (netstorm.py)".

The model:
- Links are FIFO reservations: the server's uplink and downlink, and each
  node's.  A transfer of b bytes from A to B starts when it is asked for
  (plus half a round trip), or when both A's uplink and B's downlink are
  free, or when A has the data, whichever is latest, and takes b / the
  slower rate; it arrives half a round trip after it ends.  A link's queue
  counts work from the moment a transfer is asked for, so a link waiting
  for data that is still on its way serves other transfers meanwhile.
- The server's CPU is a FIFO of `server_cores` cores; every request to the
  server (a read, a write, a flush) costs `srv_cpu_req` of it before its
  reply is sent, a tracker query `tracker_cpu` (no payload to send: the
  order of nbdserver's CPU per 4K request, bench/README.md).
- A node replays the trace's requests in order with at most `qd` in flight;
  a FLUSH waits for everything before it and holds everything after it.
  Every request costs the node `req_overhead` (the measured client CPU per
  request).
- Without peers every read goes to the server, as requested.
- With peers, reads work on 64 KiB chunks.  A chunk the node holds, or
  is fetching, is a local hit (once it is there).  From its first read on
  the node prefetches the generation's boot order (the trace's chunks in
  first-read order): `prefetch_threads` streams, each asking the tracker
  for `prefetch_batch` chunks at a time and fetching them one by one.  A
  read of a chunk nobody fetched yet asks the tracker itself.  The source
  of a chunk: the first asker gets it from the server; a later one from
  the holder (or the node still fetching it) that can deliver it first,
  or, while it is among the first `tree_askers` askers, from its parent in
  a `fanout`-ary tree in asking order (asker k from asker (k-1)/fanout)
  when that parent would deliver sooner.  (The tracker spreads askers by
  load; the model, which knows every queue, takes the earliest delivery.)
  A chunk the node wrote is read from the server (its own view).
- The emulation host (`host_cores` > 0, netstorm's one machine): every
  chunk an agent receives costs `host_cpu_chunk` of one shared CPU of
  `host_cores` cores (the agents, their threads and the emulated network
  share it), so a chunk is there when both its transfer and that CPU are
  done.  `host_cores` 0 is a LAN: each node's CPU is its own and is not
  modelled beyond `req_overhead`.
- Nodes are simulated in at most `max_actors` actors: with more nodes, an
  actor stands for K identical nodes with K times a node's link; without
  peers it asks the server for K copies, with peers one copy enters the
  actor and the other K-1 spread inside it, log2(K) peer hops.  Aggregated
  per chunk, so 10,000 nodes take seconds.

    /usr/bin/python3 bench/stormsim.py                  # N = 50 ... 10,000
    /usr/bin/python3 bench/stormsim.py --calibration bench/results/netstorm-*/netstorm.json
        (its nbdroot runs calibrate the server and node costs; its peers runs,
        if any, the host's CPU per chunk for the "this host" column)
"""

import argparse
import dataclasses
import gzip
import heapq
import json
import math
import os
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
CHUNK = 64 * 1024


@dataclasses.dataclass
class Params:
    server_rate: float = 125e6      # bytes/s
    node_rate: float = 125e6
    rtt: float = 0.0002             # s, between any two hosts
    qd: int = 4
    chunk: int = CHUNK
    server_cores: float = 2.0
    srv_cpu_req: float = 30e-6      # s of server CPU per request
    tracker_cpu: float = 10e-6      # s of server CPU per tracker query (no payload)
    req_overhead: float = 100e-6    # s per request at the node
    flush_s: float = 0.0            # s a flush takes at the server beyond its CPU
    wire: float = 1.04              # egress bytes on the wire per payload byte
    max_actors: int = 200
    prefetch_threads: int = 3       # the agent's prefetch streams (0: no prefetch)
    prefetch_batch: int = 16        # chunks per tracker question
    fanout: int = 4                 # the tracker's trees
    tree_askers: int = 64
    host_cores: float = 0.0         # 0: a LAN; else the emulation host's cores
    host_cpu_chunk: float = 0.0     # s of host CPU per chunk an agent receives

    def describe(self):
        return (f"server {self.server_rate * 8 / 1e9:.2f} Gbit/s, node {self.node_rate * 8 / 1e9:.2f}"
                f" Gbit/s, rtt {self.rtt * 1e3:.2f} ms, QD{self.qd}, chunk {self.chunk // 1024} KiB,"
                f" server CPU {self.srv_cpu_req * 1e6:.1f} us/request, "
                f"{self.tracker_cpu * 1e6:.0f} us/tracker query on {self.server_cores:g} cores, node overhead {self.req_overhead * 1e6:.0f} us/request, wire "
                f"{self.wire:.3f} bytes/byte, at most {self.max_actors} actors; peers: prefetch "
                f"{self.prefetch_threads} x {self.prefetch_batch} chunks, {self.fanout}-ary trees; "
                + (f"one host of {self.host_cores:g} cores, {self.host_cpu_chunk * 1e3:.3f} ms "
                   "of its CPU per chunk received" if self.host_cores else "a LAN (no shared host)"))


def rate_bps(text):
    """'1gbit', '100mbit', '500kbit' -> bytes/s."""
    t = text.lower()
    for suf, mul in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1)):
        if t.endswith(suf):
            return float(t[:-len(suf)]) * mul / 8
    raise ValueError(f"rate {text!r}: expected e.g. 1gbit")


def read_trace(path):
    reqs = []
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            _, op, off, length = line.split()[:4]
            reqs.append((op, int(off), int(length)))
    return reqs


def trace_stats(reqs):
    """Reads, read bytes, distinct bytes read and distinct 64 KiB chunks read."""
    ranges = sorted((o, o + n) for op, o, n in reqs if op == "R" and n)
    distinct, end = 0, -1
    for s, e in ranges:
        if e > end:
            distinct += e - max(s, end)
            end = e
    chunks = {c for s, e in ranges for c in range(s // CHUNK, (e - 1) // CHUNK + 1)}
    return dict(reads=len(ranges), read_bytes=sum(e - s for s, e in ranges),
                distinct_read_bytes=distinct, distinct_chunks=len(chunks),
                requests=len(reqs))


class Fifo:
    """A link or a CPU: reservations in the order they are asked for."""
    __slots__ = ("rate", "free")

    def __init__(self, rate):
        self.rate, self.free = rate, 0.0


def simulate(reqs, n, p, peers):
    """{'wall_s', 'p50_s', 'server_tx_bytes', 'peer_bytes', 'seconds'} for
    n nodes replaying reqs."""
    t_begin = time.monotonic()
    actors = min(n, p.max_actors)
    size = [n // actors + (1 if a < n % actors else 0) for a in range(actors)]
    ops = [(op, off, ln) for op, off, ln in reqs]
    srv_up, srv_down = Fifo(p.server_rate), Fifo(p.server_rate)
    cpu = Fifo(p.server_cores)
    up = [Fifo(p.node_rate * k) for k in size]
    down = [Fifo(p.node_rate * k) for k in size]
    half = p.rtt / 2
    egress = 0.0
    peer_bytes = 0.0
    held = [dict() for _ in range(actors)]   # chunk -> time it is there
    dirty = [set() for _ in range(actors)]
    holders = {}                             # chunk -> [actor, ...] in order of asking
    host = Fifo(p.host_cores) if p.host_cores > 0 else None
    order, seen = [], set()                  # the boot order: chunks in first-read order
    for op, off, ln in ops:
        if op == "R" and ln:
            for c in range(off // p.chunk, (off + ln - 1) // p.chunk + 1):
                if c not in seen:
                    seen.add(c)
                    order.append(c)
    cursor = [0] * actors                    # where each actor's prefetch is in `order`

    def server_cpu(t, k=1):
        start = max(t, cpu.free)
        cpu.free = start + p.srv_cpu_req * k / cpu.rate
        return cpu.free

    def tracker(t):
        start = max(t, cpu.free)
        cpu.free = start + p.tracker_cpu / cpu.rate
        return cpu.free

    def transfer(src, dst, nbytes, t, ready=0.0):
        """End of a transfer asked for at t, of data the source holds from
        `ready` on.  The links' queues count work from t, not from ready:
        a link waiting for one chunk serves others meanwhile."""
        q = max(t, src.free, dst.free)
        src.free = q + nbytes / src.rate
        dst.free = q + nbytes / dst.rate
        return max(q, ready) + nbytes / min(src.rate, dst.rate)

    def spread(a, t):
        """One copy of a chunk arrived in actor a at t; its other K-1 nodes
        get it from each other."""
        k = size[a]
        if k == 1:
            return t
        up[a].free = max(up[a].free, t) + (k - 1) * p.chunk / up[a].rate
        return t + math.ceil(math.log2(k)) * (p.chunk / p.node_rate + half)

    def fetch_chunk(a, c, t):
        nonlocal egress, peer_bytes
        if c in held[a]:
            return held[a][c]
        hs = holders.setdefault(c, [])
        best, best_t = None, None
        # The tracker weighs every holder; the model looks at 16 of them
        # spread over the asking order, and the newest.
        sample = hs if len(hs) <= 16 else hs[::len(hs) // 16] + hs[-4:]
        def est(h):  # (delivery, the holder's queue: when deliveries tie, the emptier)
            return (max(t + half, held[h][c], up[h].free, down[a].free) + p.chunk / p.node_rate,
                    up[h].free)
        # The tracker spreads askers over the holders by their load, and
        # while few have asked sends them down a tree in asking order; the
        # model, which knows every queue, takes the holder (or the parent)
        # that would deliver first.
        for h in sample:
            e = est(h)
            if best_t is None or e < best_t:
                best, best_t = h, e
        if 0 < len(hs) < p.tree_askers:
            parent = hs[(len(hs) - 1) // p.fanout]
            e = est(parent)
            if e < best_t:
                best, best_t = parent, e
        if best is None:   # first asker: from the server
            ready = server_cpu(t + half)
            end = transfer(srv_up, down[a], p.chunk * p.wire, ready)
            egress += p.chunk * p.wire
        else:
            end = transfer(up[best], down[a], p.chunk * p.wire, t + half, held[best][c])
            peer_bytes += p.chunk * p.wire
        if host:
            host.free = max(t, host.free) + p.host_cpu_chunk * size[a] / host.rate
            end = max(end, host.free)
        arrive = spread(a, end + half)
        peer_bytes += (size[a] - 1) * p.chunk * p.wire
        held[a][c] = arrive
        hs.append(a)
        return arrive

    def serve(a, i, t):
        """Completion time of request i of actor a issued at t."""
        nonlocal egress
        op, off, ln = ops[i]
        k = size[a]
        if op == "F":
            return server_cpu(t + half, k) + p.flush_s + half + p.req_overhead
        if op in "WTZ":
            nbytes = ln * k if op == "W" else 0
            end = transfer(up[a], srv_down, nbytes, t) if nbytes else t
            for c in range(off // p.chunk, (off + max(ln, 1) - 1) // p.chunk + 1):
                dirty[a].add(c)
            return server_cpu(end + half, k) + half + p.req_overhead
        chunks = range(off // p.chunk, (off + ln - 1) // p.chunk + 1)
        if not peers or any(c in dirty[a] for c in chunks):
            ready = server_cpu(t + half, k)
            end = transfer(srv_up, down[a], ln * p.wire * k, ready)
            egress += ln * p.wire * k
            return end + half + p.req_overhead
        missing = [c for c in chunks if c not in held[a]]
        if not missing:
            return max([t] + [held[a][c] for c in chunks]) + p.req_overhead
        t_ask = tracker(t + half) + half               # the tracker's answer
        done = max(fetch_chunk(a, c, t_ask) for c in missing)
        done = max([done] + [held[a][c] for c in chunks])
        return done + p.req_overhead

    streams = {}  # (actor, stream) -> chunks of its batch still to fetch

    def prefetch(a, k, t):
        """Prefetch stream k of actor a is free at t: it fetches the next
        chunk of its batch (first taking a batch and asking the tracker),
        one chunk per event so that links are reserved in time order. The
        time it is free again, or None when the order is used up."""
        batch = streams.setdefault((a, k), [])
        while batch and (batch[0] in held[a] or batch[0] in dirty[a]):
            batch.pop(0)
        if not batch:
            while cursor[a] < len(order) and len(batch) < p.prefetch_batch:
                c = order[cursor[a]]
                cursor[a] += 1
                if c not in held[a] and c not in dirty[a]:
                    batch.append(c)
            if not batch:
                return None
            return tracker(t + half) + half
        return fetch_chunk(a, batch.pop(0), t)

    # Event loop: (time, seq, actor, i): i >= 0 the request completed, -1
    # the actor starts, -2 - k its prefetch stream k is free.
    nxt = [0] * actors
    inflight = [0] * actors
    flushing = [False] * actors
    finished = [0.0] * actors
    completed = [0] * actors
    ev = [(0.0, a, a, -1) for a in range(actors)]
    heapq.heapify(ev)
    seq = actors
    total = len(ops)
    while ev:
        t, _, a, i = heapq.heappop(ev)
        if i <= -2:
            done = prefetch(a, -2 - i, t)
            if done is not None:
                seq += 1
                heapq.heappush(ev, (done, seq, a, i))
            continue
        if i == -1 and peers:
            for k in range(p.prefetch_threads):
                seq += 1
                heapq.heappush(ev, (t, seq, a, -2 - k))
        if i >= 0:
            inflight[a] -= 1
            completed[a] += 1
            if ops[i][0] == "F":
                flushing[a] = False
            if completed[a] == total:
                finished[a] = t
                continue
        while nxt[a] < total and inflight[a] < p.qd and not flushing[a]:
            j = nxt[a]
            if ops[j][0] == "F":
                if inflight[a]:
                    break
                flushing[a] = True
            nxt[a] += 1
            inflight[a] += 1
            seq += 1
            heapq.heappush(ev, (serve(a, j, t), seq, a, j))
    per_node = sorted(t for a in range(actors) for t in [finished[a]] * size[a])
    return dict(wall_s=max(finished), p50_s=per_node[(len(per_node) - 1) // 2],
                server_tx_bytes=egress, peer_bytes=peer_bytes,
                seconds=round(time.monotonic() - t_begin, 2))


def calibrate(p, reqs, runs):
    """Sets p's per-request costs from measured no-peer runs (dicts with
    nodes, server_cpu_s, client_cpu_s, server_tx_bytes): the server's CPU
    per request, the replaying client's CPU per request (a node's own cost
    per request) and the wire bytes per payload byte, medians over the runs.
    Nothing is fitted to the wall times, so the predictions beside them show
    the model's error."""
    if not runs:
        return p
    st = trace_stats(reqs)

    def med(key, per):
        v = sorted(r[key] / (r["nodes"] * per) for r in runs)
        return v[len(v) // 2]

    return dataclasses.replace(p, srv_cpu_req=med("server_cpu_s", st["requests"]),
                               req_overhead=med("client_cpu_s", st["requests"]),
                               wire=med("server_tx_bytes", st["read_bytes"]))


# The emulation host's model is only run up to this many nodes (nobody
# emulates more on one machine, and its cost grows with N).
HOST_MAX_NODES = 1000


def calibrate_host(p, reqs, runs, cores):
    """The emulation host's CPU per chunk an agent receives, from measured
    peers runs (dicts with nodes, wall_s, host_busy, server_cpu_s): the
    host's busy CPU seconds less the server's, per chunk of the boot's
    distinct reads per node; the median over the runs. None without runs."""
    if not runs:
        return None
    chunks = trace_stats(reqs)["distinct_chunks"]
    v = sorted((r["host_busy"] * cores * r["wall_s"] - r["server_cpu_s"]) / (r["nodes"] * chunks)
               for r in runs)
    return dataclasses.replace(p, host_cores=cores, host_cpu_chunk=max(0.0, v[len(v) // 2]))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=os.path.join(BENCH_DIR, "boot-trace.txt.gz"))
    ap.add_argument("--nodes", default="50,100,200,1000,10000")
    ap.add_argument("--calibration", help="netstorm.json: fit to its nbdroot no-peer runs")
    ap.add_argument("--server-rate", default="1gbit")
    ap.add_argument("--node-rate", default="1gbit")
    ap.add_argument("--rtt-ms", type=float, default=0.2)
    ap.add_argument("--server-cores", type=float, default=2.0)
    ap.add_argument("--max-actors", type=int, default=200)
    ap.add_argument("--host-cores", type=float, default=float(os.cpu_count() or 1),
                    help="cores of the host that ran the calibration's peers runs")
    args = ap.parse_args()
    reqs = read_trace(args.trace)
    p = Params(server_rate=rate_bps(args.server_rate), node_rate=rate_bps(args.node_rate),
               rtt=args.rtt_ms / 1000, server_cores=args.server_cores, max_actors=args.max_actors)
    host = None
    if args.calibration:
        with open(args.calibration) as f:
            j = json.load(f)
        p = calibrate(p, reqs, [m for m in j["medians"] if m["setup"] == "nbdroot"])
        host = calibrate_host(p, reqs, [m for m in j["medians"] if m["setup"] == "peers"],
                              args.host_cores)
    st = trace_stats(reqs)
    print(f"trace: {st['requests']} requests, {st['read_bytes'] / 1e6:.1f} MB read, "
          f"{st['distinct_read_bytes'] / 1e6:.1f} MB distinct, {st['distinct_chunks']} chunks")
    print(p.describe())
    if host:
        print("this host: " + host.describe())
    print(f"{'N':>7} {'no-peer wall s':>14} {'p50 s':>7} {'egress/node MB':>14} | "
          f"{'peers wall s':>12} {'p50 s':>7} {'egress/node MB':>14} {'wall ratio':>10} "
          f"{'sim s':>6}" + (f" {'this host s':>11}" if host else ""))
    for n in [int(x) for x in args.nodes.split(",")]:
        a = simulate(reqs, n, p, False)
        b = simulate(reqs, n, p, True)
        print(f"{n:>7} {a['wall_s']:>14.2f} {a['p50_s']:>7.2f} {a['server_tx_bytes'] / n / 1e6:>14.1f}"
              f" | {b['wall_s']:>12.2f} {b['p50_s']:>7.2f} {b['server_tx_bytes'] / n / 1e6:>14.2f}"
              f" {b['wall_s'] / a['wall_s']:>9.2f}x {a['seconds'] + b['seconds']:>6.1f}"
              + (f" {simulate(reqs, n, host, True)['wall_s']:>11.2f}" if host and n <= HOST_MAX_NODES else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
