"""node::NbdClient (nbdserver/node/nbd_client.*), the NBD client the node
agent uses upstream and to peers, driven through tests/nbdclient-probe.

Against the real nbdserver: reads agree with libnbd, writes are visible to
libnbd, block status of base:allocation and nbdroot:dirty on a node view
(IMAGE/NODE) is what libnbd gets, a missing export is refused with the
server's message, and 8 threads of mixed reads and writes on one connection
read back what they wrote.

Against a lying server (a fake in this file: the peer is the fault-injection
boundary): data outside the read, a reply to an unknown cookie, a short read,
an oversized chunk, a server that hangs up or never replies. The probe must
report "broken" (every later request too, fast) or "timeout" with a reason,
and never hang.
"""

import json
import os
import random
import shutil
import socket
import struct
import tempfile
import threading

import pytest

from conftest import NBDSERVER, run
from storeutil import DIRTY, MiB, connect, make_store, serve_store

PROBE = os.environ.get("NBDCLIENT_PROBE") or os.path.join(
    os.path.dirname(os.path.abspath(NBDSERVER)), "..", "tests", "nbdclient-probe")
SIZE = 4 * MiB
NODE = "lab/n1"


def probe(endpoint, export, *ops, contexts=(), timeout_ms=60000, check_rc=None):
    """Runs the probe; returns (exit status, [one dict per op])."""
    argv = [PROBE, "--timeout", str(timeout_ms)]
    for c in contexts:
        argv += ["--context", c]
    argv += [endpoint, export, *[str(o) for o in ops]]
    p = run(argv, timeout=120, check=False)
    out = [json.loads(l) for l in p.stdout.splitlines() if l.strip()]
    if check_rc is not None:
        assert p.returncode == check_rc, f"{argv}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.returncode, out


def endpoint(srv):
    host, port = srv.tcp
    return f"{host}:{port}"


@pytest.fixture
def store_server(nbdserver, tmp_path):
    store, base = make_store(tmp_path, size=SIZE)
    return serve_store(nbdserver, store), base


# ---------------------------------------------------------------- real server

def test_reads_match_libnbd(store_server):
    srv, base = store_server
    ranges = [(0, 4096), (MiB - 10, 20), (12345, 100000), (MiB + 65536 - 1, 2),
              (SIZE - 4096, 4096), (2 * MiB, 1 << 20)]
    ops = [x for off, n in ranges for x in ("read", off, n)]
    _, out = probe(endpoint(srv), NODE, *ops, check_rc=0)
    h = connect(srv, NODE)
    for (off, n), r in zip(ranges, out):
        got = bytes.fromhex(r["data"])
        assert got == h.pread(n, off), (off, n)
        assert got == base[off:off + n], (off, n)


def test_writes_are_visible_to_libnbd(store_server):
    srv, base = store_server
    rnd = random.Random(7)
    a, b = rnd.randbytes(3000), rnd.randbytes(4096)
    _, out = probe(endpoint(srv), NODE, "write", 5000, a.hex(), "writefua", 2 * MiB, b.hex(),
                   "zero", 8192, 4096 * 3, "flush", "info", check_rc=0)
    assert [r["op"] for r in out] == ["write", "writefua", "zero", "flush", "info"]
    assert out[4]["size"] == SIZE and not out[4]["read_only"]
    h = connect(srv, NODE)
    assert h.pread(3000, 5000) == a
    assert h.pread(4096, 2 * MiB) == b
    assert h.pread(4096 * 3, 8192) == bytes(4096 * 3)
    assert h.pread(100, 4096 * 4) == base[4096 * 4:4096 * 4 + 100]
    # And libnbd's writes are what the probe reads.
    c = rnd.randbytes(777)
    h.pwrite(c, 3 * MiB + 3)
    _, out = probe(endpoint(srv), NODE, "read", 3 * MiB + 3, 777, check_rc=0)
    assert bytes.fromhex(out[0]["data"]) == c


def libnbd_extents(h, context, off, n):
    got = {}

    def cb(ctx, offset, entries, err):
        if ctx == context:
            got["e"] = [[entries[i], entries[i + 1]] for i in range(0, len(entries), 2)]
        return 0

    h.block_status(n, off, cb)
    return got["e"]


def test_block_status_of_a_node_view(store_server):
    srv, _ = store_server
    data = bytes([0x5a]) * 8192
    probe(endpoint(srv), NODE, "write", MiB, data.hex(), "write", 2 * MiB + 4096,
          data.hex(), "flush", check_rc=0)
    _, out = probe(endpoint(srv), NODE, "info", "status", "base:allocation", 0, SIZE,
                   "status", DIRTY, 0, SIZE, "status", DIRTY, MiB, 4096,
                   contexts=["base:allocation", DIRTY], check_rc=0)
    info, alloc, dirty, dirty_one = out
    assert info["contexts"]["base:allocation"] != 0 and info["contexts"][DIRTY] != 0
    h = connect(srv, NODE)
    assert alloc["extents"] == libnbd_extents(h, "base:allocation", 0, SIZE)
    assert dirty["extents"] == libnbd_extents(h, DIRTY, 0, SIZE)
    # The written blocks are dirty, and nothing else is.
    pos, dirty_runs = 0, []
    for length, flags in dirty["extents"]:
        if flags:
            dirty_runs.append((pos, length))
        pos += length
    assert dirty_runs == [(MiB, 8192), (2 * MiB + 4096, 8192)]
    assert dirty_one["extents"][0][1] != 0


def test_a_context_not_negotiated_is_refused_locally(store_server):
    srv, _ = store_server
    rc, out = probe(endpoint(srv), NODE, "status", DIRTY, 0, 4096, contexts=["base:allocation"])
    assert rc == 1
    assert out[0]["result"] == "nbd-error" and "not negotiated" in out[0]["why"]


def test_missing_export_is_refused_with_the_servers_message(store_server):
    srv, _ = store_server
    rc, out = probe(endpoint(srv), "nosuch", "info")
    assert rc == 3
    assert out[0]["op"] == "connect" and out[0]["result"] == "failed"
    why = out[0]["why"]
    assert "NBD_REP_ERR_UNKNOWN" in why and "nosuch" in why, why


@pytest.fixture
def short_dir():
    """A directory with a short path: sun_path is limited to 108 bytes."""
    d = tempfile.mkdtemp(prefix="nbdc", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unix_socket_and_connection_refused(nbdserver, tmp_path, short_dir):
    store, base = make_store(tmp_path, size=SIZE)
    sock = os.path.join(short_dir, "nbd.sock")
    srv = nbdserver(args=["--store", store, "--socket", sock], listen=False)
    _, out = probe(f"unix:{sock}", NODE, "read", 0, 512, check_rc=0)
    assert bytes.fromhex(out[0]["data"]) == base[:512]
    rc, out = probe(f"unix:{short_dir}/nothing.sock", NODE, "info")
    assert rc == 3 and "No such file" in out[0]["why"]
    srv.assert_alive()


def test_eight_threads_of_mixed_requests(store_server, tmp_path):
    srv, _ = store_server
    model = tmp_path / "model"
    region = 2 * MiB
    _, out = probe(endpoint(srv), NODE, "stress", 8, 400, 11, region, model, check_rc=0)
    assert out[0]["ops"] == 3200
    h = connect(srv, NODE)
    assert h.pread(region, 0) == model.read_bytes()


# ---------------------------------------------------------------- lying servers

OPT_MAGIC = b"IHAVEOPT"
REPLY_MAGIC = struct.pack(">Q", 0x3E889045565A9)
STRUCTURED, SET_META, GO = 8, 10, 7
ACK, INFO, META = 1, 3, 4
ERR_POLICY = 0x80000002
CHUNK_MAGIC, SIMPLE_MAGIC = 0x668E33EF, 0x67446698
FAKE_SIZE = MiB


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        part = s.recv(n - len(b))
        if not part:
            raise EOFError
        b += part
    return b


def opt_reply(opt, typ, data=b""):
    return REPLY_MAGIC + struct.pack(">III", opt, typ, len(data)) + data


def chunk(flags, typ, cookie, payload):
    return struct.pack(">IHHQI", CHUNK_MAGIC, flags, typ, cookie, len(payload)) + payload


class FakeServer:
    """One connection; a correct handshake (unless `refuse`), then `behave(sock,
    request)` for each request: (flags, type, cookie, offset, length)."""

    def __init__(self, behave, refuse=None):
        self.behave, self.refuse = behave, refuse
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.requests = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @property
    def endpoint(self):
        return "127.0.0.1:%d" % self.lsock.getsockname()[1]

    def serve(self):
        try:
            conn, _ = self.lsock.accept()
        except OSError:  # closed before the probe connected
            return
        with conn:
            try:
                self.handshake(conn)
                while True:
                    magic, fl, typ, cookie, off, n = struct.unpack(">IHHQQI", recv_exact(conn, 28))
                    if typ == 1:
                        recv_exact(conn, n)
                    self.requests.append((fl, typ, cookie, off, n))
                    if typ == 2 or not self.behave(conn, (fl, typ, cookie, off, n)):
                        return
            except (EOFError, OSError):
                return

    def handshake(self, conn):
        conn.sendall(b"NBDMAGIC" + OPT_MAGIC + struct.pack(">H", 3))
        recv_exact(conn, 4)
        while True:
            magic, opt, n = struct.unpack(">8sII", recv_exact(conn, 16))
            data = recv_exact(conn, n)
            if opt == STRUCTURED:
                conn.sendall(opt_reply(opt, ACK))
            elif opt == SET_META:
                conn.sendall(opt_reply(opt, META, struct.pack(">I", 1) + b"base:allocation")
                             + opt_reply(opt, ACK))
            elif opt == GO:
                if self.refuse:
                    conn.sendall(opt_reply(opt, ERR_POLICY, self.refuse.encode()))
                    continue
                conn.sendall(opt_reply(opt, INFO, struct.pack(">HQH", 0, FAKE_SIZE, 1 | 4))
                             + opt_reply(opt, ACK))
                return

    def close(self):
        self.lsock.close()
        self.thread.join(10)


@pytest.fixture
def fake():
    servers = []

    def start(behave, refuse=None):
        servers.append(FakeServer(behave, refuse))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def lie(make_reply):
    """A behaviour that answers every request with make_reply(request)."""
    def behave(conn, req):
        conn.sendall(make_reply(req))
        return True
    return behave


@pytest.mark.parametrize("name,reply,why", [
    ("data outside the read",
     lambda r: chunk(1, 1, r[2], struct.pack(">Q", r[3] + r[4]) + b"x" * 16), "outside the read"),
    ("unknown cookie", lambda r: chunk(1, 0, r[2] + 1000, b""), "unknown cookie"),
    ("short read", lambda r: chunk(1, 1, r[2], struct.pack(">Q", r[3]) + b"x" * 16),
     "completed with only 16 bytes"),
    ("oversized chunk",
     lambda r: struct.pack(">IHHQI", CHUNK_MAGIC, 1, 1, r[2], 0xFFFFFFF0), "longer than the read"),
    ("bad magic", lambda r: b"\xde\xad\xbe\xef" * 8, "bad reply magic"),
    ("block status for a read",
     lambda r: chunk(1, 5, r[2], struct.pack(">III", 1, 512, 0)), "block status for another command"),
])
def test_a_lying_server_breaks_the_connection(fake, name, reply, why):
    srv = fake(lie(reply))
    rc, out = probe(srv.endpoint, "disk", "read", 0, 512, "read", 512, 512, "flush",
                    contexts=["base:allocation"])
    assert rc == 1
    assert [r["result"] for r in out] == ["broken"] * 3, out
    assert why in out[0]["why"] and "protocol violation" in out[0]["why"], out[0]["why"]
    assert out[1]["why"] == out[0]["why"]  # later requests fail fast, same reason
    assert len(srv.requests) == 1


def test_block_status_of_a_context_not_negotiated(fake):
    srv = fake(lie(lambda r: chunk(1, 5, r[2], struct.pack(">III", 9, 512, 0))))
    rc, out = probe(srv.endpoint, "disk", "status", "base:allocation", 0, 512, "read", 0, 512,
                    contexts=["base:allocation"])
    assert [r["result"] for r in out] == ["broken", "broken"], out
    assert "context 9, which was not negotiated" in out[0]["why"]


def test_a_server_that_hangs_up(fake):
    srv = fake(lambda conn, req: False)  # reads one request and closes
    rc, out = probe(srv.endpoint, "disk", "read", 0, 512, "read", 0, 512)
    assert rc == 1
    assert [r["result"] for r in out] == ["broken", "broken"]
    assert "closed the connection" in out[0]["why"]


def test_a_silent_server_times_out_and_a_late_reply_is_dropped(fake):
    """The first request is answered only after the second arrives; the
    first times out, the second succeeds on the same connection."""
    held = []

    def behave(conn, req):
        held.append(req)
        if len(held) == 2:
            for r in held:
                conn.sendall(chunk(1, 1, r[2], struct.pack(">Q", r[3]) + bytes([len(held)]) * r[4]))
        return True

    srv = fake(behave)
    rc, out = probe(srv.endpoint, "disk", "timeout", 300, "read", 0, 512,
                    "timeout", 60000, "read", 4096, 512, "timeout", 300, "read", 0, 16)
    out = [r for r in out if r["op"] != "timeout"]
    assert [r["result"] for r in out] == ["timeout", "ok", "timeout"], out
    assert "no reply within 300 ms" in out[0]["why"]
    assert bytes.fromhex(out[1]["data"]) == b"\x02" * 512
    assert rc == 1


def test_a_refusal_carries_the_servers_message(fake):
    srv = fake(lie(lambda r: b""), refuse="node agents only, please")
    rc, out = probe(srv.endpoint, "disk", "info")
    assert rc == 3
    assert "NBD_REP_ERR_POLICY: node agents only, please" in out[0]["why"], out
