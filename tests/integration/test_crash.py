"""Crash safety of node views (issue 3, "Durability" and "Bad state").

test_crash_rounds: rounds of: start nbdserver on a store, run a seeded
random load on lab/n1 (aligned and unaligned writes of 1 byte to 256 KiB,
trims, write-zeroes, FUA writes and flushes, many requests in flight, over
one or two connections), SIGKILL the server at a random moment (right after
the n-th request is sent, with others in flight; inside the callback of the
k-th flush or FUA reply; after a random delay; or once all is answered),
restart it, read the whole view and check it against what the load may
legally have left behind. The next round starts from what was read. The node persists
across rounds. NBDROOT_CRASH_ROUNDS (default 100) sets the number of rounds,
split over node block sizes 4096, 512 and 65536; NBDROOT_CRASH_SEED the seed.

The rule, per 512-byte sector s. Let M(s) be the round's mutations that
change bytes of s, in the order they were sent. m1 happened before m2
(m1 -> m2) when m1's reply was seen before m2 was sent. A mutation is
covered when it was acknowledged before a FLUSH that was itself
acknowledged was sent (with CAN_MULTI_CONN, a flush on either connection
covers both), or when it is an acknowledged FUA write. After the crash, s
must equal the sector obtained from its value at the start of the round by
applying the mutations of some set S of M(s), one after another, where
  - each is applied whole: all of its bytes in s or none of them (a write
    covering part of s changes only its bytes, the rest of s keeps the
    value it had: never torn inside a sector, never misplaced);
  - S holds every covered mutation (a completed flush is durable);
  - S is closed under "happened before" (if m2 in S and m1 -> m2, then
    m1 in S: an acknowledged write is not lost while a later one lives);
  - the order agrees with "happened before".
So a sector touched only by covered, ordered writes reads exactly as
modelled, and an unflushed write leaves each sector it touches old or new.
A write-zeroes zeroes its range. A trim zeroes the whole blocks (of the
node's block size) inside its range and leaves partial blocks alone
(overlay.hpp); as NBD leaves trimmed bytes to the server, the check also
accepts zeros in those partial blocks, but nothing else.
To keep the search per sector small, the load never has more than
MAX_PER_SECTOR mutations touching one sector in flight at once.

test_bad_layer: with nodes n1..n3 holding data, SIGKILL the server, damage
n1's bitmap or diff (truncated, corrupt, foreign), restart: n1 is refused
with a clear message, n2 and n3 read back exactly, n1's files are left byte
for byte as they were, and the server stays up. test_crash_rounds ends with
one such damage on the store its rounds left behind.
"""

import bisect
import collections
import faulthandler
import hashlib
import os
import random
import re
import select
import signal
import struct
import subprocess
import time
import zlib

import nbd
import pytest

import nbdraw as N
import storeutil
from conftest import NBDSERVER, TEST_TIMEOUT, _die_with_parent, wait_ready

MiB = 1 << 20
KiB = 1 << 10
SECTOR = 512
SIZE = 8 * MiB
ROUNDS = int(os.environ.get("NBDROOT_CRASH_ROUNDS", "100"))
SEED = int(os.environ.get("NBDROOT_CRASH_SEED", "20261126"))
MAX_PER_SECTOR = 3
SEARCH_LIMIT = 200_000  # (set, value) states explored for one sector

BLOCK_SIZES = (4096, 512, 65536)


def rounds_for(bs):
    """ROUNDS split over the block sizes: half at 4096, a quarter each else."""
    quarter = ROUNDS // 4
    return ROUNDS - 2 * quarter if bs == 4096 else quarter


@pytest.fixture(autouse=True)
def watchdog():
    """conftest's watchdog, with room for long runs (NBDROOT_CRASH_ROUNDS)."""
    faulthandler.dump_traceback_later(max(TEST_TIMEOUT, 5 * ROUNDS), exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------- server

class StoreServer:
    """nbdserver on a store, in its own process group, which the test
    SIGKILLs. Every start appends to one log file."""

    def __init__(self, store, workdir):
        self.store = store
        self.workdir = str(workdir)
        self.log = os.path.join(self.workdir, "nbdserver.log")
        self.proc = None
        self.addr = None
        self.starts = 0
        self.env = None  # extra environment variables for the next starts

    def start(self):
        self.starts += 1
        ready = os.path.join(self.workdir, f"ready{self.starts}")
        argv = [NBDSERVER, "--store", self.store, "--listen", "127.0.0.1:0",
                "--ready-file", ready, "--threads", "2"]
        with open(self.log, "ab") as log:
            log.write(f"==== start {self.starts}: {' '.join(argv)}\n".encode())
            log.flush()
            env = dict(os.environ, **self.env) if self.env else None
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, preexec_fn=_die_with_parent,
                                         env=env)
        self.addr = wait_ready(self.proc, ready, self.log)[0]

    def uri(self, node):
        return f"nbd://{self.addr}/lab/{node}"

    def kill(self):
        """SIGKILL (the whole process group) and reap."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc:
            self.proc.wait(10)

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def log_tail(self, n=6000):
        return "--- nbdserver log (tail) ---\n" + self.log_text()[-n:]


@pytest.fixture
def new_server(tmp_path):
    servers = []

    def make(store):
        s = StoreServer(store, tmp_path)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.kill()


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def read_view(h):
    return b"".join(h.pread(2 * MiB, off) for off in range(0, SIZE, 2 * MiB))


# ---------------------------------------------------------------- the load

class Mut:
    """One mutation of [off, off + length): a write of `data`, a
    write-zeroes, or a trim, which zeroes the whole blocks [za, zb) inside
    it. Times are ticks of Load.clock; acked is None when no reply was seen."""
    __slots__ = ("kind", "off", "length", "end", "data", "za", "zb", "conn", "fua", "sent",
                 "acked")

    def __init__(self, kind, off, length, data, conn, bs, fua=False):
        self.kind, self.off, self.length, self.end = kind, off, length, off + length
        self.data, self.conn, self.fua = data, conn, fua
        self.za, self.zb = -(-off // bs) * bs, self.end // bs * bs
        if kind != "trim":
            self.za, self.zb = off, self.end
        elif self.zb <= self.za:
            self.za = self.zb = off  # no whole block
        self.sent = self.acked = None

    def apply(self, buf):
        """Applies the documented effect to the whole view `buf`."""
        if self.data is not None:
            buf[self.off:self.end] = self.data
        else:
            buf[self.za:self.zb] = bytes(self.zb - self.za)

    def sector_values(self, s, val):
        """The values sector s may take from `val` by this mutation: for a
        trim, its partial blocks may also read as zeros (NBD lets a trim
        leave anything; we accept only untouched or zero)."""
        out = [put_sector(s, val, self.za, self.zb, self.data, self.off)]
        if self.kind == "trim":
            out.append(put_sector(s, val, self.off, self.end, None, self.off))
        return out

    def __repr__(self):
        fua = "+fua" if self.fua else ""
        return (f"{self.kind}{fua}(off={self.off}, len={self.length}, conn={self.conn}, "
                f"sent={self.sent}, acked={self.acked})")


class Flush:
    __slots__ = ("conn", "sent", "acked")

    def __init__(self, conn):
        self.conn = conn
        self.sent = self.acked = None


class Load:
    """A seeded random load on `handles` that ends by calling kill() at a
    moment chosen by `plan`. Records what was sent and what was seen
    acknowledged before the kill; nothing after it counts."""

    PLANS = ("count", "count", "count", "flush_ack", "flush_ack", "time", "drained")

    def __init__(self, rng, handles, bs, kill, alive):
        self.rng, self.handles, self.bs = rng, handles, bs
        self.kill_server, self.server_alive = kill, alive
        self.clock = 0
        self.muts, self.flushes = [], []
        self.killed = False
        self.errors = []
        self.inflight = [0] * len(handles)
        self.busy = bytearray(SIZE // SECTOR)  # mutations in flight per sector
        self.plan = rng.choice(self.PLANS)
        self.budget = rng.choice((0, rng.randrange(1, 40), rng.randrange(1, 400),
                                  rng.randrange(200, 1500)))
        self.qd = [rng.choice((1, 4, 16, 32, 64)) for _ in handles]
        self.flush_kill = rng.randint(1, 4)
        self.flush_acks = 0
        self.deadline = time.monotonic() + rng.uniform(0, 0.4)
        self.flush_rate = rng.choice((0.01, 0.05, 0.15))
        self.hot = rng.randrange(0, SIZE - 4 * bs - 2 * SECTOR) // SECTOR * SECTOR + \
            rng.choice((0, rng.randrange(SECTOR)))
        self.keep = {}  # buffers of requests in flight

    def describe(self):
        return (f"plan={self.plan} budget={self.budget} qd={self.qd} "
                f"flush_rate={self.flush_rate} ops sent={len(self.muts)}+{len(self.flushes)} flushes")

    def tick(self):
        self.clock += 1
        return self.clock

    def kill(self):
        if not self.killed:
            self.kill_server()
            self.killed = True

    # -- choosing requests

    def pick_range(self, kind):
        rng, bs = self.rng, self.bs
        r = rng.random()
        if kind == "write":
            n = max(1, int(2 ** rng.uniform(0, 18)))
        else:
            n = max(1, int(2 ** rng.uniform(0, 20)))
        if r < 0.3:        # anywhere, any alignment
            off = rng.randrange(SIZE)
        elif r < 0.55:     # a small hot window: overlapping unaligned requests
            n = min(n, rng.choice((1, 7, SECTOR - 3, SECTOR, bs, 2 * bs + 5)))
            off = self.hot + rng.randrange(0, 3 * bs)
        elif r < 0.8:      # whole blocks
            n = max(bs, n // bs * bs)
            off = rng.randrange(SIZE // bs) * bs
        else:              # whole sectors
            n = max(SECTOR, n // SECTOR * SECTOR)
            off = rng.randrange(SIZE // SECTOR) * SECTOR
        off = min(off, SIZE - 1)
        n = max(1, min(n, SIZE - off))
        return off, n

    def make_mut(self, conn):
        rng = self.rng
        x = rng.random()
        kind = "write" if x < 0.72 else "trim" if x < 0.86 else "zero"
        for _ in range(6):
            off, n = self.pick_range(kind)
            if max(self.busy[off // SECTOR:(off + n - 1) // SECTOR + 1]) < MAX_PER_SECTOR:
                break
        else:
            return None
        data = rng.randbytes(n) if kind == "write" else None
        fua = kind == "write" and rng.random() < 0.06
        return Mut(kind, off, n, data, conn, self.bs, fua)

    # -- sending and completing

    def send_mut(self, m):
        h = self.handles[m.conn]
        cb = lambda err, m=m: self.done(m, err)
        m.sent = self.tick()
        for s in range(m.off // SECTOR, (m.off + m.length - 1) // SECTOR + 1):
            self.busy[s] += 1
        self.inflight[m.conn] += 1
        self.muts.append(m)
        if m.kind == "write":
            buf = nbd.Buffer.from_bytearray(bytearray(m.data))
            self.keep[id(m)] = buf
            h.aio_pwrite(buf, m.off, completion=cb, flags=nbd.CMD_FLAG_FUA if m.fua else 0)
        elif m.kind == "trim":
            h.aio_trim(m.length, m.off, completion=cb)
        else:
            flags = nbd.CMD_FLAG_NO_HOLE if self.rng.random() < 0.3 else 0
            h.aio_zero(m.length, m.off, completion=cb, flags=flags)

    def send_flush(self, conn):
        f = Flush(conn)
        f.sent = self.tick()
        self.inflight[conn] += 1
        self.flushes.append(f)
        self.handles[conn].aio_flush(completion=lambda err, f=f: self.done(f, err))

    def done(self, op, err):
        """Completion callback; after the kill, replies no longer count."""
        if self.killed:
            return 1
        op.acked = self.tick()
        self.inflight[op.conn] -= 1
        err = err.value
        if isinstance(op, Mut):
            self.keep.pop(id(op), None)
            for s in range(op.off // SECTOR, (op.off + op.length - 1) // SECTOR + 1):
                self.busy[s] -= 1
        if err:
            self.errors.append(f"{op!r} failed: {os.strerror(err)}")
        if isinstance(op, Flush) or op.fua:
            self.flush_acks += 1
            if self.plan == "flush_ack" and self.flush_acks >= self.flush_kill:
                self.kill()  # right after the flush's reply
        return 1

    def pump(self, timeout):
        rl, wl = [], []
        for h in self.handles:
            d = h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                rl.append(h.aio_get_fd())
            if d & nbd.AIO_DIRECTION_WRITE:
                wl.append(h.aio_get_fd())
        r, w, _ = select.select(rl, wl, [], timeout)
        for h in self.handles:
            if self.killed:
                return
            fd = h.aio_get_fd()
            if fd in r:
                h.aio_notify_read()
            if not self.killed and fd in w:
                h.aio_notify_write()

    # -- the round

    def run(self):
        sent = 0
        if self.plan == "count" and self.budget == 0:
            self.kill()
        while not self.killed:
            while sent < self.budget and not self.killed:
                free = [c for c in range(len(self.handles)) if self.inflight[c] < self.qd[c]]
                if not free:
                    break
                conn = self.rng.choice(free)
                if self.rng.random() < self.flush_rate:
                    self.send_flush(conn)
                else:
                    m = self.make_mut(conn)
                    if m is None:
                        break
                    self.send_mut(m)
                sent += 1
                if self.plan == "count" and sent == self.budget:
                    self.kill()  # with requests in flight
            if self.killed:
                break
            if not self.server_alive():
                raise AssertionError("the server died before it was killed")
            idle = sum(self.inflight) == 0
            if sent >= self.budget and idle:
                if self.plan == "flush_ack":
                    self.send_flush(self.rng.randrange(len(self.handles)))
                elif self.plan == "drained" or time.monotonic() >= self.deadline:
                    time.sleep(self.rng.choice((0, 0.001, 0.02)))
                    self.kill()
                    break
            if self.plan == "time" and time.monotonic() >= self.deadline:
                self.kill()
                break
            self.pump(0.05)


# ---------------------------------------------------------------- the check

STATS = collections.Counter()  # what the checks saw, printed with -s


def covered_flags(load, multi_conn, flushed_only=False):
    """Per mutation: whether it must have survived the kill.

    The server logs every map change before it acknowledges the mutation
    (storage/map_log.hpp) and replays the log after a kill on the same host
    boot, so every acknowledged mutation is covered. With flushed_only (a
    host crash, whose boot the log does not match), only those acknowledged
    before an acknowledged flush was sent (on its connection, or any with
    multi-conn), and acknowledged FUA writes."""
    if not flushed_only:
        return [m.acked is not None for m in load.muts]
    latest = {}  # conn (or None for any) -> latest send tick of an acknowledged flush
    for f in load.flushes:
        if f.acked is not None:
            key = None if multi_conn else f.conn
            latest[key] = max(latest.get(key, 0), f.sent)
    out = []
    for m in load.muts:
        if m.acked is None:
            out.append(False)
        elif m.fua:
            out.append(True)
        else:
            out.append(m.acked < latest.get(None if multi_conn else m.conn, 0))
    return out


def put_sector(s, val, a, b, data, data_off):
    """Sector s's value `val` with bytes [a, b) of the view replaced by
    data[x - data_off] (data None: zeros)."""
    lo, hi = max(a, s * SECTOR), min(b, s * SECTOR + SECTOR)
    if hi <= lo:
        return val
    piece = data[lo - data_off:hi - data_off] if data is not None else bytes(hi - lo)
    return val[:lo - s * SECTOR] + piece + val[hi - s * SECTOR:]


def sector_reachable(s, got, start, muts, covered):
    """Whether `got` is a legal value of sector s (the rule at the top)."""
    k = len(muts)
    preds = [0] * k
    for i, mi in enumerate(muts):
        for j, mj in enumerate(muts):
            if mj.acked is not None and mj.acked < mi.sent:
                preds[i] |= 1 << j
    need = sum(1 << i for i in range(k) if covered[i])
    seen = {(0, start)}
    stack = [(0, start)]
    while stack:
        mask, val = stack.pop()
        if val == got and mask & need == need:
            return True
        for i in range(k):
            bit = 1 << i
            if mask & bit or preds[i] & ~mask:
                continue
            for nv in muts[i].sector_values(s, val):
                nxt = (mask | bit, nv)
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        if len(seen) > SEARCH_LIMIT:
            raise AssertionError(f"sector {s}: more than {SEARCH_LIMIT} states to search "
                                 f"over {k} mutations: {muts}")
    return False


def check_view(got, start, load, multi_conn, flushed_only=False):
    """Returns descriptions of the sectors of `got` that break the rule."""
    muts = load.muts
    cov_all = covered_flags(load, multi_conn, flushed_only)
    covered = {id(m): c for m, c in zip(load.muts, cov_all)}
    everything = bytearray(start)  # all mutations, in the order sent
    for m in muts:
        m.apply(everything)
    odd = []
    for c in range(0, SIZE, 64 * KiB):
        if got[c:c + 64 * KiB] != everything[c:c + 64 * KiB]:
            odd += [s for s in range(c // SECTOR, (c + 64 * KiB) // SECTOR)
                    if got[s * SECTOR:(s + 1) * SECTOR] != everything[s * SECTOR:(s + 1) * SECTOR]]
    touching = {s: [] for s in odd}
    for m in muts:
        lo = bisect.bisect_left(odd, m.off // SECTOR)
        hi = bisect.bisect_right(odd, (m.end - 1) // SECTOR)
        for s in odd[lo:hi]:
            touching[s].append(m)
    problems = []
    STATS["muts"] += len(muts)
    STATS["covered"] += sum(cov_all)
    STATS["inflight at kill"] += sum(m.acked is None for m in load.muts)
    STATS["sectors not as sent"] += len(odd)
    for s in odd:
        g = bytes(got[s * SECTOR:(s + 1) * SECTOR])
        old = bytes(start[s * SECTOR:(s + 1) * SECTOR])
        ms = touching[s]
        cov = [covered[id(m)] for m in ms]
        if g == old and not any(cov):
            STATS["sectors lost"] += 1
            continue
        STATS["sectors searched"] += 1
        if ms and sector_reachable(s, g, old, ms, cov):
            continue
        problems.append(describe_sector(s, g, old, everything, ms, cov))
        if len(problems) >= 4:
            break
    return problems


def describe_sector(s, got, old, everything, ms, cov):
    new = bytes(everything[s * SECTOR:(s + 1) * SECTOR])
    diff = [i for i in range(SECTOR) if got[i] != new[i]]
    at = diff[0] // 16 * 16
    lines = [f"sector {s} (bytes {s * SECTOR}..{(s + 1) * SECTOR}): no legal value; "
             f"{len(diff)} bytes differ from all sent, in [{diff[0]}, {diff[-1]}]; "
             f"from byte {at} of the sector:",
             f"  read      {got[at:at + 32].hex()}",
             f"  at start  {old[at:at + 32].hex()}  (whole sector equal: {got == old})",
             f"  all sent  {new[at:at + 32].hex()}",
             f"  read is all zeros: {got == bytes(SECTOR)}"]
    if not ms:
        lines.append("  no mutation of this round touches it")
    for m, c in zip(ms, cov):
        lines.append(f"  {m!r}{' covered' if c else ''}")
    return "\n".join(lines)


# ---------------------------------------------------------------- crash rounds

def one_round(server, rng, bs, rnd):
    """Runs one load against a started server and kills it. Returns the load
    and whether the view advertised multi-conn."""
    handles = [connect(server.uri("n1")) for _ in range(1 if rng.random() < 0.6 else 2)]
    multi = all(h.can_multi_conn() for h in handles)
    load = Load(rng, handles, bs, server.kill, lambda: server.proc.poll() is None)
    try:
        load.run()
    except (nbd.Error, AssertionError) as e:
        raise AssertionError(f"round {rnd}: before the kill: {e}\n"
                             f"{load.describe()}\n{server.log_tail()}")
    finally:
        load.kill()
        del handles[:]
        load.handles = []
    assert not load.errors, (f"round {rnd}: requests failed before the kill: {load.errors[:5]}\n"
                             f"{server.log_tail()}")
    return load, multi


LOG_RECORD = 56
LOG_REGION = 512 * 1024


def move_log_to_another_boot(store):
    """Rewrites n1's map log as if written in another boot of the host (a
    host crash): the boot field of every record changes, CRC resealed."""
    path = storeutil.node_files(store, "n1")[0][:-len(".diff")] + ".log"
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        n = 0
        for region in (0, LOG_REGION):
            for off in range(region, region + LOG_REGION - LOG_RECORD + 1, LOG_RECORD):
                rec = data[off:off + LOG_RECORD]
                if len(rec) < LOG_RECORD or rec[:4] != b"LMRN":
                    break
                struct.pack_into("<Q", rec, 16, struct.unpack_from("<Q", rec, 16)[0] ^ 1)
                struct.pack_into("<I", rec, 48, zlib.crc32(bytes(rec[:48])))
                data[off:off + LOG_RECORD] = rec
                n += 1
        f.seek(0)
        f.write(data)
    return n


@pytest.mark.parametrize("bs,boot", [(b, "same") for b in BLOCK_SIZES] + [(4096, "other")])
def test_crash_rounds(tmp_path, new_server, bs, boot):
    """boot "same": SIGKILL, the host keeps running (every acknowledged
    mutation survives, through the map log). boot "other": the log is made
    to look like another boot's before the restart, as after a host crash
    (only flushed mutations are promised; the log must not be replayed)."""
    rounds = rounds_for(bs) if boot == "same" else max(2, ROUNDS // 5)
    STATS.clear()
    store, base = storeutil.make_store(tmp_path, size=SIZE)
    storeutil.admin(store, "create", "n1", "--image", "lab", "--block-size", str(bs))
    server = new_server(store)
    known, load, multi, t0 = base, None, True, time.monotonic()
    for rnd in range(rounds + 1):
        server.start()
        try:
            h = connect(server.uri("n1"))
        except nbd.Error as e:
            raise AssertionError(f"block size {bs}: after round {rnd - 1}, n1 cannot be "
                                 f"attached: {e}\n{server.log_tail()}")
        got = read_view(h)
        del h
        if load is not None:
            problems = check_view(got, known, load, multi, flushed_only=boot == "other")
            assert not problems, (
                f"block size {bs}, round {rnd - 1} of {rounds} (NBDROOT_CRASH_SEED={SEED}): "
                f"after SIGKILL and restart:\n"
                + "\n".join(problems) + f"\n{load.describe()}\n{server.log_tail()}")
        elif got != base:
            raise AssertionError("a new node does not read as its generation")
        known = got
        if rnd == rounds:
            break
        rng = random.Random(f"{SEED}/{bs}/{rnd}")
        load, multi = one_round(server, rng, bs, rnd)
        if boot == "other":
            STATS["log records moved to another boot"] += move_log_to_another_boot(store)
    elapsed = time.monotonic() - t0
    print(f"block size {bs}, {boot} boot: {rounds} crash rounds in {elapsed:.1f} s; {dict(STATS)}")
    if boot == "other":
        return
    # Then damage n1 on the store the rounds left behind.
    server.kill()
    variant = {4096: "bitmap-both-slots", 512: "diff-trailer", 65536: "bitmap-empty"}[bs]
    server.start()
    expected = {"n1": known}
    expected.update(fill_nodes(server, ("n2", "n3"), random.Random(bs)))
    server.kill()
    check_bad_layer(server, store, variant, expected, bs)


# ---------------------------------------------------------------- bad layers

def slot_stride(blocks):
    containers = (blocks + 65535) // 65536
    one = 8 + containers * (4 + 4 + 8192) + 1
    return (64 + 2 * one + 4095) // 4096 * 4096


def slot_seq(path, stride, slot):
    with open(path, "rb") as f:
        f.seek(slot * stride)
        h = f.read(64)
    return struct.unpack_from("<Q", h, 40)[0] if len(h) == 64 and h[:8] == b"NBDRMAP1" else None


def reseal(slot):
    """Recomputes a slot's CRC (CRC-32 over header with zero CRC, and payload)."""
    dlen, zlen = struct.unpack_from("<II", slot, 48)
    body = bytearray(slot[:64 + dlen + zlen])
    struct.pack_into("<I", body, 56, 0)
    struct.pack_into("<I", body, 56, zlib.crc32(bytes(body)))
    return bytes(body)


def roaring_with(values):
    """A portable-format roaring bitmap of a few 16-bit-keyed values."""
    by_key = {}
    for v in sorted(values):
        by_key.setdefault(v >> 16, []).append(v & 0xffff)
    keys = sorted(by_key)
    out = struct.pack("<II", 12346, len(keys))
    for k in keys:
        out += struct.pack("<HH", k, len(by_key[k]) - 1)
    off = len(out) + 4 * len(keys)
    for k in keys:
        out += struct.pack("<I", off)
        off += 2 * len(by_key[k])
    for k in keys:
        out += b"".join(struct.pack("<H", v) for v in by_key[k])
    return out


def rewrite_slots(map_path, stride, make_payload):
    """Replaces both slots' dirty bitmaps with make_payload(), CRC resealed,
    so only the content check can refuse them."""
    with open(map_path, "r+b") as f:
        for slot in (0, 1):
            f.seek(slot * stride)
            h = bytearray(f.read(64))
            dlen, zlen = struct.unpack_from("<II", h, 48)
            zero = f.read(dlen + zlen)[dlen:]
            dirty = make_payload()
            struct.pack_into("<II", h, 48, len(dirty), len(zero))
            f.seek(slot * stride)
            f.write(reseal(bytes(h) + dirty + zero))


def damage(variant, store, stride):
    """Damages n1's layer files as `variant` says."""
    diff, bitmap = storeutil.node_files(store, "n1")
    diff2, bitmap2 = storeutil.node_files(store, "n2")
    rng = random.Random(variant)
    if variant == "bitmap-empty":
        os.truncate(bitmap, 0)
    elif variant == "bitmap-in-slot-a":
        os.truncate(bitmap, 40)
    elif variant == "bitmap-newest-slot-cut":
        # The newest map is in slot B (arranged by the caller); the file
        # can never legitimately end before slot B's header (slot B is
        # written, and synced, when the layer is created).
        assert slot_seq(bitmap, stride, 1) > slot_seq(bitmap, stride, 0)
        os.truncate(bitmap, stride)
    elif variant == "bitmap-both-slots":
        with open(bitmap, "r+b") as f:
            for slot in (0, 1):
                f.seek(slot * stride + 48)
                dlen, zlen = struct.unpack("<II", f.read(8))
                at = slot * stride + (64 + rng.randrange(dlen + zlen) if dlen + zlen else 40)
                f.seek(at)
                b = f.read(1)
                f.seek(at)
                f.write(bytes([b[0] ^ 0x10]))
    elif variant == "bitmap-garbage-resealed":
        rewrite_slots(bitmap, stride, lambda: rng.randbytes(64))
    elif variant == "bitmap-past-end-resealed":
        blocks = SIZE // 4096
        rewrite_slots(bitmap, stride, lambda: roaring_with([3, blocks + 5]))
    elif variant == "bitmap-foreign":
        with open(bitmap2, "rb") as src, open(bitmap, "wb") as dst:
            dst.write(src.read())
    elif variant == "diff-half":
        os.truncate(diff, SIZE // 2)
    elif variant == "diff-no-trailer":
        os.truncate(diff, SIZE)
    elif variant == "diff-trailer":
        with open(diff, "r+b") as f:
            f.seek(SIZE)
            f.write(rng.randbytes(4096))
    elif variant == "diff-trailer-foreign":
        with open(diff2, "rb") as src, open(diff, "r+b") as dst:
            src.seek(SIZE)
            dst.seek(SIZE)
            dst.write(src.read(4096))
    else:
        raise AssertionError(variant)


VARIANTS = {  # variant -> which file the refusal must name
    "bitmap-empty": "bitmap",
    "bitmap-in-slot-a": "bitmap",
    "bitmap-newest-slot-cut": "bitmap",
    "bitmap-both-slots": "bitmap",
    "bitmap-garbage-resealed": "bitmap",
    "bitmap-past-end-resealed": "bitmap",
    "bitmap-foreign": "layer|bitmap|diff",
    "diff-half": "diff",
    "diff-no-trailer": "diff",
    "diff-trailer": "diff",
    "diff-trailer-foreign": "layer|diff",
}


def fill_nodes(server, nodes, rng):
    """Writes (aligned and not), trims and zeroes each node, flushes and
    disconnects. Returns {node: the view's contents}."""
    out = {}
    for node in nodes:
        h = connect(server.uri(node))
        for _ in range(40):
            off = rng.randrange(SIZE - 300 * KiB)
            if rng.random() < 0.5:
                off = off // 4096 * 4096
            h.pwrite(rng.randbytes(rng.randrange(1, 256 * KiB)), off)
        h.trim(64 * KiB, rng.randrange(SIZE // 4096 - 16) * 4096)
        h.zero(5000, rng.randrange(SIZE - 5000))
        h.flush()
        out[node] = read_view(h)
        h.shutdown()
        del h
    return out


def file_state(store, node):
    d = os.path.join(store, "nodes", node)
    diff, bitmap = storeutil.node_files(store, node)
    digest = {}
    for p in (diff, bitmap):
        with open(p, "rb") as f:
            digest[os.path.basename(p)] = hashlib.sha256(f.read()).hexdigest()
    return sorted(os.listdir(d)), digest


def check_bad_layer(server, store, variant, expected, bs=4096):
    """n1 (block size `bs`) gets its layer damaged while the server is down;
    after a restart n1 is refused, clearly, with its files untouched, and
    the others are served."""
    stride = slot_stride(SIZE // bs)
    damage(variant, store, stride)
    before = file_state(store, "n1")
    log_before = len(server.log_text())
    server.start()
    try:
        h = connect(server.uri("n1"))
    except nbd.Error:
        pass
    else:
        got = read_view(h)
        wrong = sum(got[i:i + 4096] != expected["n1"][i:i + 4096] for i in range(0, SIZE, 4096))
        raise AssertionError(
            f"{variant}: n1 was served, not refused; {wrong} of its {SIZE // 4096} 4 KiB "
            f"blocks differ from its last flushed contents\n{server.log_tail()}")
    new_log = server.log_text()[log_before:]
    kind = VARIANTS[variant]
    lines = [l for l in new_log.splitlines() if "lab/n1" in l and re.search(kind, l)]
    assert lines, (f"{variant}: no log line names the export lab/n1 and the {kind} "
                   f"that was refused\n{server.log_tail()}")
    assert re.search(r"\berror\b", lines[0]), lines[0]
    print(f"{variant}: {lines[0]}")
    for node in ("n2", "n3"):
        h = connect(server.uri(node))
        assert read_view(h) == expected[node], f"{variant}: {node} does not read back"
        h.shutdown()
        del h
    with pytest.raises(nbd.Error):
        connect(server.uri("n1"))  # still refused, nothing cached or repaired
    assert server.proc.poll() is None, f"{variant}: the server died\n{server.log_tail()}"
    assert file_state(store, "n1") == before, f"{variant}: n1's files were changed"
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(20)
    assert rc == 0, f"{variant}: exit status {rc} after SIGTERM\n{server.log_tail()}"
    assert file_state(store, "n1") == before, f"{variant}: n1's files were changed at exit"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bad_layer(tmp_path, new_server, variant):
    store, _ = storeutil.make_store(tmp_path, size=SIZE)
    server = new_server(store)
    server.start()
    expected = fill_nodes(server, ("n1", "n2", "n3"), random.Random(variant))
    diff, bitmap = storeutil.node_files(store, "n1")
    stride = slot_stride(SIZE // 4096)
    if variant == "bitmap-newest-slot-cut":
        # Each change of n1's map and flush moves the newest map to the other
        # slot (writing a block, then trimming it, always changes the map);
        # stop when it is in slot B.
        for i in range(4):
            if slot_seq(bitmap, stride, 1) > (slot_seq(bitmap, stride, 0) or 0):
                break
            h = connect(server.uri("n1"))
            if i % 2:
                h.trim(4096, 100 * 4096)
            else:
                h.pwrite(b"x" * 4096, 100 * 4096)
            h.flush()
            expected["n1"] = read_view(h)
            h.shutdown()
            del h
    server.kill()
    check_bad_layer(server, store, variant, expected)


# ---------------------------------------------------------------- the map log

@pytest.mark.parametrize("boot", ["same", "other", "torn", "other layer"])
def test_map_log_replays_only_its_own_boot_and_layer(tmp_path, new_server, boot):
    """Acknowledged, never flushed: a write, a write-zeroes over written
    blocks and a trim. After SIGKILL they all read back (the map log); when
    the log looks like another boot's (a host crash) or another layer's, or
    its first record is torn, nothing of it is replayed: the view is the
    last flushed map over the diff, and the log is then started afresh."""
    store, base = storeutil.make_store(tmp_path, size=SIZE)
    server = new_server(store)
    server.start()
    h = connect(server.uri("n1"))
    h.pwrite(b"F" * 8192, 0)
    h.flush()
    h.pwrite(b"W" * 16384, 64 * KiB)           # new dirty blocks
    h.pwrite(b"V" * 8192, 128 * KiB)
    h.zero(8192, 128 * KiB)                    # dirty blocks become zero
    h.pwrite(b"X" * 4096, 4096)                # a rewrite of a flushed dirty block
    # Killed with the client still connected: a disconnect first would let
    # the server flush the map at detach (a race the test once lost).
    server.kill()
    del h
    log = storeutil.node_files(store, "n1")[0][:-len(".diff")] + ".log"
    with open(log, "r+b") as f:
        head = bytearray(f.read(LOG_RECORD))
        assert head[:4] == b"LMRN", "no map log record written before the acknowledgements"
        if boot == "other":
            assert move_log_to_another_boot(store) == 4  # F, W, V, the zeroing; not X
        elif boot == "torn":
            f.seek(30)
            f.write(b"\xff\xfe")
        elif boot == "other layer":
            struct.pack_into("<Q", head, 24, struct.unpack_from("<Q", head, 24)[0] ^ 1)
            struct.pack_into("<I", head, 48, zlib.crc32(bytes(head[:48])))
            f.seek(0)
            f.write(head)
    server.start()
    got = read_view(connect(server.uri("n1")))
    assert got[4096:8192] == b"X" * 4096       # dirty in the flushed map: its data is the diff's
    assert got[:4096] == b"F" * 4096
    if boot == "same":
        assert got[64 * KiB:80 * KiB] == b"W" * 16384
        assert got[128 * KiB:136 * KiB] == bytes(8192)
    else:
        assert got[64 * KiB:80 * KiB] == base[64 * KiB:80 * KiB]
        # Not in the flushed map: the generation's bytes (the diff's zeros
        # are not taken for data).
        assert got[128 * KiB:136 * KiB] == base[128 * KiB:136 * KiB]
    server.kill()
    # Replayed or not, the log was emptied at the attach: a second kill
    # with nothing new changes nothing.
    server.start()
    assert read_view(connect(server.uri("n1"))) == got
    server.kill()


def test_map_log_full_region_waits_for_a_flush_and_loses_nothing(tmp_path, new_server):
    """More map changes between two flushes than a log region holds (a
    block toggled between written and zeroed, each toggle a record): the
    requests past the end wait for a flush instead, which makes their
    changes durable. After SIGKILL everything acknowledged is there."""
    store, base = storeutil.make_store(tmp_path, size=SIZE)
    server = new_server(store)
    server.start()
    h = connect(server.uri("n1"))
    bitmap = storeutil.node_files(store, "n1")[1]
    stride = slot_stride(SIZE // 4096)

    def newest_seq():
        return max(s for s in (slot_seq(bitmap, stride, 0), slot_seq(bitmap, stride, 1))
                   if s is not None)

    seq0 = newest_seq()
    per_region = LOG_REGION // LOG_RECORD
    for i in range(per_region + 200):
        block = (i // 2) % 8  # written, then zeroed, then written...
        if i % 2 == 0:
            h.pwrite(bytes([i % 250 + 1]) * 4096, block * 4096)
        else:
            h.zero(4096, block * 4096)
    want = bytearray(base)
    for i in range(per_region + 184, per_region + 200):  # the last ops on each block
        block = (i // 2) % 8
        want[block * 4096:(block + 1) * 4096] = (bytes([i % 250 + 1]) * 4096 if i % 2 == 0
                                                 else bytes(4096))
    assert read_view(h) == bytes(want)
    # The client never flushed: the server did, when the region filled up.
    assert newest_seq() > seq0
    del h
    server.kill()
    assert "map log write failed" not in server.log_tail(), server.log_tail()
    server.start()
    assert read_view(connect(server.uri("n1"))) == bytes(want)
    server.kill()


@pytest.mark.parametrize("first,second", [("write", "write"), ("trim", "zero"),
                                          ("zero", "trim")])
def test_ack_never_outruns_an_earlier_map_log_record(tmp_path, new_server, first, second):
    """Two requests on one block, pipelined: the first changes the map (its
    record goes to the map log), the second finds the map already changed
    and changes nothing in it. The second must not be acknowledged before
    the first one's record is in the log: it lives on that record, and a
    SIGKILL right after the second reply must keep it. Map log writes are
    held back by fault injection, so the order is forced."""
    store, base = storeutil.make_store(tmp_path, size=SIZE)
    server = new_server(store)
    server.env = {"NBDROOT_FAULT_MAP_LOG_DELAY_MS": "700"}
    server.start()
    host, port = server.addr.rsplit(":", 1)
    c = N.RawClient((host, int(port))).connect_export("lab/n1")
    block = 40 * 4096  # not in one of the generation's holes
    payload = {"write": lambda b: bytes([b]) * 4096, "trim": None, "zero": None}
    cmd = {"write": N.CMD_WRITE, "trim": N.CMD_TRIM, "zero": N.CMD_WRITE_ZEROES}
    cookies = []
    for kind, byte in ((first, 0xA1), (second, 0xB2)):
        data = payload[kind](byte) if payload[kind] else b""
        cookies.append(c.send_request(cmd[kind], block, 4096, payload=data))
    r = c.recv_reply()
    order = [r.cookie]
    assert not r.error
    if r.cookie == cookies[1]:
        server.kill()  # the second is acknowledged: it must survive
    else:
        r = c.recv_reply()
        assert not r.error and r.cookie == cookies[1]
        order.append(r.cookie)
        server.kill()
    c.close()
    server.env = None
    server.start()
    got = read_view(connect(server.uri("n1")))[block:block + 4096]
    want = bytes([0xB2]) * 4096 if second == "write" else bytes(4096)
    assert got == want, (f"acknowledged {second} lost (replies in order {order}, "
                         f"sent {cookies}); block reads "
                         f"{'the generation' if got == base[block:block + 4096] else got[:8]!r}\n"
                         + server.log_tail())
    server.kill()
