"""Many connections, and slow clients that must be cut off without slowing
anybody else down."""

import random
import resource
import select
import statistics
import struct
import threading
import time

import pytest

import nbdraw as N
from conftest import assert_healthy, nbd_handle

P99_LIMIT = 0.050  # seconds, for one 4 KiB read on loopback


@pytest.fixture
def many_fds():
    """Raises RLIMIT_NOFILE before the server starts (it inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192
    try:
        # Root may raise the hard limit too; others get what the hard limit allows.
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        if hard < 2200:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 1000 connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_1000_concurrent_connections(many_fds, nbdserver, make_image):
    img = make_image("disk.img", size=8 * (1 << 20), seed=61)
    srv = nbdserver({"disk": img})
    n = 1000
    clients = []
    try:
        for _ in range(n):
            clients.append(N.RawClient(srv.tcp, timeout=20))
        # Every phase is sent to all connections before any reply is read,
        # so all of them are in the handshake at the same time.
        for c in clients:
            c.greeting()
        assert srv.num_fds() >= n, f"server holds only {srv.num_fds()} fds"
        go = N.option_bytes(N.OPT_STRUCTURED_REPLY) + N.option_bytes(N.OPT_GO, N.RawClient.go_data("disk"))
        for c in clients:
            c.send(struct.pack(">I", N.CLIENT_FIXED_NEWSTYLE | N.CLIENT_NO_ZEROES) + go)
        for c in clients:
            assert c.recv_option_reply(N.OPT_STRUCTURED_REPLY).type == N.REP_ACK
            c.structured = True
            while True:
                r = c.recv_option_reply(N.OPT_GO)
                assert not r.is_error, r
                if r.type == N.REP_ACK:
                    break
        rng = random.Random(3)
        offsets = [rng.randrange(img.size - 4096) for _ in clients]
        cookies = [c.send_request(N.CMD_READ, off, 4096) for c, off in zip(clients, offsets)]
        expected = img.read()
        for c, off, cookie in zip(clients, offsets, cookies):
            reply = c.recv_reply(cookie)
            assert reply.error == 0
            data = b"".join(ch.payload[8:] for ch in reply.chunks
                            if ch.type == N.REPLY_TYPE_OFFSET_DATA)
            assert data == expected[off:off + 4096], f"wrong data at {off}"
    finally:
        for c in clients:
            c.close()
    assert_healthy(srv, img)


# ---------------------------------------------------------------- latency

def read_latencies(uri, size, count=200, spacing=0.01):
    """Latencies of `count` 4 KiB reads at random offsets, `spacing`
    seconds apart, on one libnbd connection (sorted)."""
    h = nbd_handle(uri)
    rng = random.Random(5)
    out = []
    try:
        for _ in range(count):
            off = rng.randrange(size - 4096) & ~4095
            t0 = time.perf_counter()
            h.pread(4096, off)
            out.append(time.perf_counter() - t0)
            time.sleep(spacing)
    finally:
        h.shutdown()
    return sorted(out)


def p99(sorted_values):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * 0.99))]


class SlowClients(threading.Thread):
    """`n` clients that each send `script` (after `prefix`) one byte per
    second. Records, per client, the seconds from connect to the server's
    close (None if still open when the thread gives up after `limit` s)."""

    def __init__(self, connect, n, script, limit=10.0):
        super().__init__(daemon=True)
        self.clients = [connect() for _ in range(n)]
        self.script = script
        self.limit = limit
        self.closed_after = [None] * n
        self.error = None

    def run(self):
        try:
            self._run()
        except Exception as e:  # reported by the test
            self.error = e

    def _run(self):
        start = [c.started for c in self.clients]
        pos = [0] * len(self.clients)
        next_send = time.monotonic()
        while time.monotonic() - min(start) < self.limit:
            open_ = [i for i, t in enumerate(self.closed_after) if t is None]
            if not open_:
                return
            socks = {self.clients[i].sock.fileno(): i for i in open_}
            r, _, _ = select.select(list(socks), [], [], 0.05)
            for fd in r:
                i = socks[fd]
                try:
                    data = self.clients[i].sock.recv(65536)
                except (ConnectionResetError, OSError):
                    data = b""
                if not data:
                    self.closed_after[i] = time.monotonic() - start[i]
            if time.monotonic() >= next_send:
                next_send += 1.0
                for i in open_:
                    if self.closed_after[i] is not None or pos[i] >= len(self.script):
                        continue
                    try:
                        self.clients[i].sock.send(self.script[pos[i]:pos[i] + 1])
                        pos[i] += 1
                    except (BrokenPipeError, ConnectionResetError, OSError):
                        self.closed_after[i] = time.monotonic() - start[i]

    def close(self):
        for c in self.clients:
            c.close()


def connect_at_greeting(srv):
    def connect():
        c = N.RawClient(srv.tcp)
        c.started = time.monotonic()
        c.greeting()
        return c
    return connect


def connect_in_transmission(srv, prefix=b""):
    def connect():
        c = N.RawClient(srv.tcp)
        c.started = time.monotonic()
        c.connect_export("disk")
        c.started = time.monotonic()  # the request timer starts now
        if prefix:
            c.send(prefix)
        return c
    return connect


def check_cut_off(slow, timeout, what):
    slow.join(slow.limit + 5)
    assert slow.error is None, slow.error
    for t in slow.closed_after:
        assert t is not None, f"{what}: not closed within {slow.limit} s (timeout {timeout} s)"
        assert timeout * 0.75 <= t <= timeout + 2.5, f"{what}: closed after {t:.2f} s"


def check_latency(lat, what):
    med = statistics.median(lat)
    assert p99(lat) < P99_LIMIT, (f"{what}: 4K read p99 {p99(lat) * 1000:.1f} ms, "
                                  f"median {med * 1000:.2f} ms")


HANDSHAKE_SCRIPT = (struct.pack(">I", N.CLIENT_FIXED_NEWSTYLE | N.CLIENT_NO_ZEROES)
                    + N.option_bytes(N.OPT_GO, N.RawClient.go_data("disk")))


def test_handshake_slowloris_is_cut_off(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--handshake-timeout", "2"])
    slow = SlowClients(connect_at_greeting(srv), 20, HANDSHAKE_SCRIPT, limit=8)
    slow.start()
    lat = read_latencies(srv.uri("disk"), image.size, count=200, spacing=0.01)
    check_cut_off(slow, 2, "handshake slowloris")
    slow.close()
    check_latency(lat, "during handshake slowloris")
    assert_healthy(srv, image)


def test_silent_client_in_handshake_is_cut_off(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--handshake-timeout", "2"])
    c = N.RawClient(srv.tcp)
    t0 = time.monotonic()
    c.greeting()
    c.wait_closed(timeout=6)
    elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed <= 4.5, elapsed
    assert_healthy(srv, image)


def test_handshake_timeout_does_not_touch_established_connections(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--handshake-timeout", "1"])
    c = N.connect_export(srv.tcp, "disk")
    time.sleep(2.5)
    err, data, _ = c.read(0, 4096)
    assert err == 0 and data == image.read(0, 4096)
    c.close()


def test_stalled_request_header_is_cut_off(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--request-timeout", "2"])
    half = N.request_bytes(N.CMD_READ, 0, 4096)[:14]
    slow = SlowClients(connect_in_transmission(srv, half), 10, b"", limit=8)
    slow.start()
    lat = read_latencies(srv.uri("disk"), image.size, count=200, spacing=0.01)
    check_cut_off(slow, 2, "half a request header")
    slow.close()
    check_latency(lat, "during stalled requests")
    assert_healthy(srv, image)


def test_stalled_write_payload_is_cut_off(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--request-timeout", "2"])
    req = N.request_bytes(N.CMD_WRITE, 0, 65536)
    slow = SlowClients(connect_in_transmission(srv, req + b"\x33" * 30000), 10, b"", limit=8)
    slow.start()
    lat = read_latencies(srv.uri("disk"), image.size, count=200, spacing=0.01)
    check_cut_off(slow, 2, "half a write payload")
    slow.close()
    check_latency(lat, "during stalled write payloads")
    assert image.read(0, 65536) != b"\x33" * 65536
    assert_healthy(srv, image)


def test_trickled_request_header_is_cut_off(nbdserver, image):
    """One byte per second never completes a request within the timeout."""
    srv = nbdserver({"disk": image}, args=["--request-timeout", "2"])
    req = N.request_bytes(N.CMD_READ, 0, 4096)
    slow = SlowClients(connect_in_transmission(srv, req[:1]), 5, req[1:], limit=10)
    slow.start()
    check_cut_off(slow, 2, "trickled request header")
    slow.close()
    assert_healthy(srv, image)


def test_idle_connection_survives_request_timeout(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--request-timeout", "1"])
    c = N.connect_export(srv.tcp, "disk")
    err, data, _ = c.read(0, 4096)
    assert err == 0
    time.sleep(2.5)  # idle between requests is not a stall
    err, data, _ = c.read(4096, 4096)
    assert err == 0 and data == image.read(4096, 4096)
    c.close()


def test_max_connections_refuses_extra_and_recovers(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--max-connections", "4"])
    held = [N.connect_export(srv.tcp, "disk") for _ in range(4)]
    extra = N.RawClient(srv.tcp)
    try:
        extra.greeting()
    except N.Closed:
        pass  # refused before the greeting
    else:
        extra.wait_closed(timeout=5)  # or right after it
    extra.close()
    # The connections being served are not disturbed.
    for c in held:
        err, data, _ = c.read(0, 4096)
        assert err == 0 and data == image.read(0, 4096)
    # A slot that frees up can be used again.
    held.pop().close()
    deadline = time.monotonic() + 5
    while True:
        c = N.RawClient(srv.tcp)
        try:
            c.connect_export("disk")
            break
        except N.Closed:
            c.close()
            assert time.monotonic() < deadline, "a freed connection slot was never reused"
            time.sleep(0.1)
    err, data, _ = c.read(8192, 4096)
    assert err == 0 and data == image.read(8192, 4096)
    for c2 in held + [c]:
        c2.close()


def test_silent_clients_free_their_slots_after_handshake_timeout(nbdserver, image):
    """Clients that connect and say nothing hold connection slots only until
    the handshake timeout; then real clients get in again."""
    srv = nbdserver({"disk": image}, args=["--max-connections", "8", "--handshake-timeout", "1"])
    silent = [N.RawClient(srv.tcp) for _ in range(8)]
    t0 = time.monotonic()
    for c in silent:
        c.greeting()  # all 8 are in the handshake, holding every slot
    refused = N.RawClient(srv.tcp)
    with pytest.raises(N.Closed):
        refused.greeting()
    refused.close()
    while True:
        c = N.RawClient(srv.tcp)
        try:
            c.connect_export("disk")
            break
        except N.Closed:
            c.close()
            assert time.monotonic() - t0 < 5, "slots were not freed by the handshake timeout"
            time.sleep(0.1)
    assert time.monotonic() - t0 >= 0.5, "the server let a 9th connection in with 8 in use"
    err, data, _ = c.read(0, 4096)
    assert err == 0 and data == image.read(0, 4096)
    c.close()
    for s in silent:
        s.wait_closed(timeout=3)
        s.close()
