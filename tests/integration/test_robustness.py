"""Regression tests for robustness bugs found in review: memory held for
clients that do not read, request timeouts that cut off clients that are
making progress, clients that stop reading replies, and the allocation map
after a write that failed half-way."""

import errno
import os
import random
import socket
import subprocess
import time

import nbd
import pytest

import nbdraw as N
from conftest import MiB, assert_healthy, nbd_handle


def rand(n, seed):
    return random.Random(seed).randbytes(n)


def drop_page_cache(path):
    """Makes later reads of `path` go to the disk (and so through the
    server's buffer path, not its page-cache mapping)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_client_small_rcvbuf(address, timeout=10.0):
    """A RawClient whose receive buffer is tiny, so replies back up into the
    server quickly when the test does not read them."""
    c = N.RawClient(address, timeout=timeout, connect=False)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(timeout)
    s.connect(address)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sock = s
    return c


# ---------------------------------------------------------------- memory

RSS_LIMIT_MIB = 300


def test_unread_large_reads_do_not_balloon_memory(nbdserver, make_image):
    """256 pipelined 4 MiB READs that are never read: the server must not
    buffer all 1 GiB of replies (it used to reach ~1 GiB of RSS)."""
    img = make_image("disk.img", size=8 * MiB, seed=11, hole_fraction=0)
    drop_page_cache(img.path)
    srv = nbdserver({"disk": img}, args=["--max-block", str(4 * MiB), "--threads", "1"])
    c = raw_client_small_rcvbuf(srv.tcp)
    try:
        c.connect_export("disk", structured=False)
        c.send(b"".join(c.request_bytes(N.CMD_READ, 0, 4 * MiB) for _ in range(256)))
        peak = 0
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            srv.assert_alive()
            peak = max(peak, srv.vmrss_kib() >> 10)
            time.sleep(0.1)
        print(f"peak server RSS {peak} MiB")
        assert peak < RSS_LIMIT_MIB, (
            f"server RSS reached {peak} MiB with 256 x 4 MiB reads unread "
            f"(limit {RSS_LIMIT_MIB} MiB)")
    finally:
        c.close()
    assert_healthy(srv, img)


# ---------------------------------------------------------------- request timeout

def test_steady_slow_write_is_not_cut_off(nbdserver, make_image):
    """A 4 MiB WRITE whose payload arrives steadily at ~1.25 MiB/s takes
    ~3.2 s, longer than --request-timeout 2: it is making progress, so it
    must complete."""
    img = make_image("disk.img", size=8 * MiB, seed=12)
    srv = nbdserver({"disk": img}, args=["--request-timeout", "2"])
    data = rand(4 * MiB, 12)
    step = 256 * 1024
    c = N.connect_export(srv.tcp, "disk", structured=False)
    try:
        t0 = time.monotonic()
        cookie = c.send_request(N.CMD_WRITE, 0, len(data))
        for pos in range(0, len(data), step):
            try:
                c.send(data[pos:pos + step])
            except (BrokenPipeError, ConnectionResetError) as e:
                pytest.fail(f"server cut off a steady write after {pos >> 10} KiB, "
                            f"{time.monotonic() - t0:.1f} s: {e}")
            time.sleep(0.2)
        try:
            reply = c.recv_reply(cookie)
        except N.Closed as e:
            pytest.fail(f"server closed instead of answering a steady slow write "
                        f"after {time.monotonic() - t0:.1f} s: {e}")
        elapsed = time.monotonic() - t0
        assert reply.error == 0, reply.chunks
        assert elapsed > 2.5, f"the write took only {elapsed:.1f} s: not slower than the timeout"
        err, back, _ = c.read(0, len(data))
        assert err == 0 and back == data
    finally:
        c.close()
    h = nbd_handle(srv.uri("disk"))
    try:
        assert h.pread(len(data), 0) == data
    finally:
        h.shutdown()
    assert img.read(0, len(data)) == data


def test_pipelined_client_always_mid_header_survives(nbdserver, make_image):
    """A client whose sends always end in the middle of a request header,
    while every earlier request completes and gets its reply, is active, not
    stalled: --request-timeout must not cut it off."""
    img = make_image("disk.img", size=1 * MiB, seed=13, hole_fraction=0)
    srv = nbdserver({"disk": img}, args=["--request-timeout", "1"])
    expected = img.read(0, 512)
    c = N.connect_export(srv.tcp, "disk", structured=False)
    try:
        cookies = [c.next_cookie() for _ in range(100)]
        hdrs = b"".join(c.request_bytes(N.CMD_READ, 0, 512, cookie=k) for k in cookies)
        pos = 0
        got = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:
            step = 42 if pos == 0 else 28
            c.send(hdrs[pos:pos + step])
            pos += step
            assert pos % 28 == 14  # always half a header outstanding
            while got < pos // 28:
                try:
                    reply = c.recv_reply(cookies[got], {cookies[got]: 512})
                except N.Closed as e:
                    pytest.fail(f"an active pipelined client was cut off after "
                                f"{time.monotonic() - t0:.1f} s with {got} replies: {e}")
                assert reply.error == 0
                assert reply.chunks[0].payload == expected
                got += 1
            time.sleep(0.2)
        assert got >= 12, f"only {got} requests in 3 s"
        c.assert_open(0.3)
        # The half header still pending completes into a normal request.
        n = got
        c.send(hdrs[pos:(n + 1) * 28])
        reply = c.recv_reply(cookies[n], {cookies[n]: 512})
        assert reply.error == 0 and reply.chunks[0].payload == expected
    finally:
        c.close()
    assert_healthy(srv, img)


# ---------------------------------------------------------------- stuck sends

def test_client_that_stops_reading_replies_is_disconnected(nbdserver, make_image):
    """A client that pipelines large READs and never reads the replies is
    closed after --request-timeout without any signal, and other clients
    are served meanwhile."""
    img = make_image("disk.img", size=8 * MiB, seed=14)
    srv = nbdserver({"disk": img}, args=["--request-timeout", "2"])
    c = raw_client_small_rcvbuf(srv.tcp)
    h = nbd_handle(srv.uri("disk"))
    try:
        c.connect_export("disk")
        c.send(b"".join(c.request_bytes(N.CMD_READ, (i % 8) * MiB, MiB) for i in range(64)))
        t0 = time.monotonic()
        closed_after = None
        served = 0
        rng = random.Random(14)
        while time.monotonic() - t0 < 8:
            off = rng.randrange(img.size - 4096) & ~4095
            assert h.pread(4096, off) == img.read(off, 4096), f"wrong data at {off}"
            served += 1
            if "stopped reading replies" in srv.stderr():
                closed_after = time.monotonic() - t0
                break
            time.sleep(0.05)
        assert closed_after is not None, (
            "the server did not drop a client that stopped reading replies within 8 s "
            "(--request-timeout 2)")
        assert 1.5 <= closed_after <= 6, f"dropped after {closed_after:.1f} s"
        assert served > 0
        # The client sees the end of the connection once it reads what is buffered.
        c.wait_closed(timeout=5)
        srv.assert_alive()
    finally:
        c.close()
        h.shutdown()
    assert_healthy(srv, img)


# ---------------------------------------------------------------- ENOSPC

@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs in a temporary directory (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "tiny"
    d.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
    try:
        yield d
    finally:
        # The nbdserver fixture (set up after this one) has stopped the
        # server by now; a lazy unmount covers anything still holding it.
        for cmd in (["umount", str(d)], ["umount", "-l", str(d)]):
            if not os.path.ismount(d):
                break
            subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        assert not os.path.ismount(d), f"could not unmount {d}"


def allocation_runs(h, offset, length):
    """[(offset, length, flags)] from base:allocation over the range."""
    runs = []

    def cb(metacontext, off, entries, err):
        assert metacontext == "base:allocation"
        p = off
        for i in range(0, len(entries), 2):
            runs.append((p, entries[i], entries[i + 1]))
            p += entries[i]
        return 0

    pos, end = offset, offset + length
    while pos < end:
        before = len(runs)
        h.block_status(end - pos, pos, cb)
        assert len(runs) > before, "block status made no progress"
        pos = runs[-1][0] + runs[-1][1]
    return runs


def test_block_status_after_enospc_write_does_not_claim_zero(tiny_tmpfs, nbdserver):
    """A WRITE that lands partly and then fails with ENOSPC must not leave
    the allocation map claiming zeros for bytes that now read back as data."""
    path = tiny_tmpfs / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    srv = nbdserver({"disk": str(path)})
    h = nbd_handle(srv.uri("disk"))
    try:
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"\xcd" * (2 * MiB), 0)
        assert e.value.errnum == errno.ENOSPC, e.value
        runs = allocation_runs(h, 0, 2 * MiB)
        for off, length, flags in runs:
            end = min(off + length, 2 * MiB)
            if off >= end or not flags & N.STATE_ZERO:
                continue
            data = h.pread(end - off, off)
            assert data == bytes(end - off), (
                f"block status claims zero for {off}+{end - off} (flags {flags}) but "
                f"it reads back non-zero; extents {runs}")
        # Reads still work, on this connection and on a new one.
        assert h.pread(4096, 6 * MiB) == bytes(4096)
    finally:
        h.shutdown()
    srv.assert_alive()
    h = nbd_handle(srv.uri("disk"))
    try:
        with open(path, "rb") as f:
            assert h.pread(MiB, 0) == f.read(MiB)
        assert h.pread(4096, 8 * MiB - 4096) == bytes(4096)
    finally:
        h.shutdown()
