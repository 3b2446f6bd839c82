"""SIGTERM while writes are in flight: the server stops reading requests
(except the rest of a write payload already arriving), finishes and
answers those it has read, flushes node views, and closes each connection
once idle. A request is never failed because of the shutdown: it is
answered successfully or not at all (a reconnecting client, the kernel
with nbdroot-keeper, sends it again). Every acknowledged write is there
after a restart, without a FLUSH from the client.

How a server error reply is told from a lost connection with libnbd: a
reply with an error completes the command with the errno the server sent
(NBD_EIO -> EIO, NBD_ESHUTDOWN -> ESHUTDOWN, ...), while commands that
were still in flight when the connection died are completed by libnbd
itself with ENOTCONN, an errno no NBD error maps to. So every failed
command must have failed with ENOTCONN. As a second, independent check the
server's log must have no line for an error reply (it logs each one), and
the raw-client test reads every reply off the wire itself.
"""

import errno
import random
import re
import signal
import socket
import struct
import time

import nbd
import pytest

import nbdraw as N
from conftest import MiB
from storeutil import BS, make_store, read_all, serve_store

SIZE = 64 * MiB
SLOT = 64 * 1024
# "conn 3: NBD_CMD_WRITE offset 0 length 4096: NBD_ESHUTDOWN: server is ..."
ERROR_REPLY = re.compile(r"conn \d+: NBD_CMD_\w+ offset \d+ length \d+: NBD_E[A-Z]+: .*")


def error_replies_logged(srv):
    return ERROR_REPLY.findall(srv.stderr())


def wait_for_log(srv, text, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in srv.stderr():
            return
        time.sleep(0.01)
    raise AssertionError(f"no {text!r} in the server log within {timeout} s")


def attach(srv, name):
    h = nbd.NBD()
    h.set_export_name(name)
    host, port = srv.tcp
    h.connect_tcp(host, str(port))
    return h


# ---------------------------------------------------------------- libnbd

def one_write(rnd, slot):
    """Random bytes at a random place inside a slot; some block-aligned."""
    if rnd.random() < 0.3:
        off = slot * SLOT + rnd.randrange(0, SLOT // BS) * BS
        n = rnd.randrange(1, (slot + 1) * SLOT // BS - off // BS + 1) * BS
    else:
        off = slot * SLOT + rnd.randrange(0, SLOT - 1)
        n = rnd.randrange(1, (slot + 1) * SLOT - off + 1)
    return off, rnd.randbytes(n)


def errno_counts(status):
    out = {}
    for e in status.values():
        k = errno.errorcode.get(e, str(e)) if e else "ok"
        out[k] = out.get(k, 0) + 1
    return out


def sigterm_round(srv, h, writes):
    """Queues `writes` on `h` while the server is stopped (so a backlog
    waits in the socket and in libnbd whatever the speed of either side),
    lets it go, and SIGTERMs it at the 20th completion. Returns the errno
    of each write (0 = acknowledged) once the connection is gone and the
    server has exited (0, and promptly)."""
    status = {}
    signalled = []

    def completion(i):
        def cb(err):
            status[i] = err.value
            if len(status) == 20 and not signalled:
                signalled.append(time.monotonic())
                srv.proc.send_signal(signal.SIGTERM)
            return 1  # retire the command
        return cb

    bufs = [nbd.Buffer.from_bytearray(bytearray(data)) for _, data in writes]
    srv.proc.send_signal(signal.SIGSTOP)
    try:
        for i, (off, _) in enumerate(writes):
            h.aio_pwrite(bufs[i], off, completion=completion(i))
    finally:
        srv.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while h.aio_in_flight() > 0 and time.monotonic() < deadline:
        try:
            h.poll(1000)
        except nbd.Error:
            break  # the connection is gone: libnbd completes the rest
    if not signalled:  # fewer than 20 writes: cannot happen with hundreds
        signalled.append(time.monotonic())
        srv.proc.send_signal(signal.SIGTERM)
    assert h.aio_in_flight() == 0 or h.aio_is_dead(), "commands still in flight after 60 s"
    assert len(status) == len(writes), f"{len(writes) - len(status)} writes never completed"
    assert srv.terminate(timeout=30) == 0
    # Finishing what was read takes moments, not the --shutdown-timeout (30 s).
    took = time.monotonic() - signalled[0]
    assert took < 10, f"the server took {took:.1f} s to exit after SIGTERM"
    assert "shutdown timeout" not in srv.stderr()
    return status


@pytest.mark.parametrize("mode", ["persistent", "ephemeral"])
def test_sigterm_with_aio_writes_in_flight(nbdserver, tmp_path, mode):
    """Rounds of: hundreds of writes queued on one connection to a node
    (distinct data, each 64 KiB slot written at most once per round, many
    over data of earlier rounds), SIGTERM once the first twenty are
    acknowledged, restart. No command may fail with an error reply; after
    each restart every acknowledged write reads back (no FLUSH was ever
    sent), and each one that failed (ENOTCONN) left its place either
    untouched or fully written. The ephemeral node comes back with
    ?resume, as nbdroot-keeper does."""
    root, base = make_store(tmp_path, size=SIZE, seed=7)
    srv = serve_store(nbdserver, root)
    boot = "lab/n1" if mode == "persistent" else "lab/n1?mode=ephemeral"
    resume = "lab/n1" if mode == "persistent" else "lab/n1?resume"
    rnd = random.Random(61)
    model = bytearray(base)
    nslots = SIZE // SLOT

    # Data before the first round, acknowledged but never flushed.
    h = attach(srv, boot)
    cookies = []
    for slot in rnd.sample(range(nslots), nslots // 3):
        off, data = one_write(rnd, slot)
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off))
        model[off:off + len(data)] = data
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)

    # Whether a round's SIGTERM finds writes the server has not read yet
    # depends on timing: rounds go on until one did (at least 3, at most 8).
    tested = 0
    for rnd_i in range(8):
        if rnd_i >= 3 and tested:
            break
        writes = [one_write(rnd, slot) for slot in rnd.sample(range(nslots), nslots * 4 // 5)]
        status = sigterm_round(srv, h, writes)
        del h
        names = errno_counts(status)
        print(f"round {rnd_i}: {len(writes)} writes queued at SIGTERM: {names}")
        bad = {i: e for i, e in status.items() if e not in (0, errno.ENOTCONN)}
        assert not bad, (f"round {rnd_i}: {len(bad)} writes failed with an error reply from "
                         f"the server (not ENOTCONN): {names}")
        assert not error_replies_logged(srv), error_replies_logged(srv)[:5]
        tested += names.get("ENOTCONN", 0) > 0

        failed = []
        for i, (off, data) in enumerate(writes):
            if status[i] == 0:
                model[off:off + len(data)] = data
            else:
                failed.append((off, data))
        srv = serve_store(nbdserver, root)
        h = attach(srv, resume)
        got = read_all(h, SIZE)
        executed = 0
        for off, data in failed:
            piece = got[off:off + len(data)]
            if piece == data:
                executed += 1
            else:
                assert piece == bytes(model[off:off + len(data)]), (
                    f"round {rnd_i}: failed write at {off}+{len(data)}: neither old nor new data")
            model[off:off + len(data)] = piece
        print(f"round {rnd_i}: {len(failed)} failed writes, {executed} of them done anyway")
        for pos in range(0, SIZE, SLOT):
            assert got[pos:pos + SLOT] == bytes(model[pos:pos + SLOT]), (
                f"round {rnd_i}: slot at {pos}: an acknowledged write is missing after the "
                "restart")
    h.shutdown()
    assert tested, "no round's SIGTERM found a write the server had not read: nothing tested"


# ---------------------------------------------------------------- raw client

def read_replies(raw, read_lengths, timeout=10):
    """Reads replies until the server closes the connection; returns them
    by cookie. Fails if the connection stays open `timeout` seconds."""
    raw.sock.settimeout(timeout)
    replies = {}
    try:
        while True:
            r = raw.recv_reply(read_lengths=read_lengths)
            assert r.cookie not in replies, f"two replies for cookie {r.cookie}"
            replies[r.cookie] = r
    except N.Closed:
        pass
    except socket.timeout:
        raise AssertionError(f"the connection is still open {timeout} s after the shutdown "
                             f"began; replies so far: {sorted(replies)}")
    return replies


def read_data(reply, offset, length):
    """The bytes of a structured read reply (data and hole chunks)."""
    buf = bytearray(length)
    covered = 0
    for ch in reply.chunks:
        if ch.type == N.REPLY_TYPE_OFFSET_DATA:
            (off,) = struct.unpack(">Q", ch.payload[:8])
            data = ch.payload[8:]
        elif ch.type == N.REPLY_TYPE_OFFSET_HOLE:
            off, n = struct.unpack(">QI", ch.payload[:12])
            data = bytes(n)
        else:
            continue
        buf[off - offset:off - offset + len(data)] = data
        covered += len(data)
    assert covered == length, f"read reply covers {covered} of {length} bytes"
    return bytes(buf)


@pytest.mark.parametrize("kind", ["view", "file"])
@pytest.mark.parametrize("tail", [4096, 512 * 1024])
def test_requests_after_sigterm_are_never_failed(nbdserver, tmp_path, make_image, kind, tail):
    """Raw client. Before the signal: a write, a read, a flush, and the
    header and all but `tail` bytes of a big write. After it: the rest of
    that payload together with a read, a write and a flush. The big write
    is finished and answered; the requests sent after the signal get no
    error reply: none at all when the server never read them (a large tail
    is received straight into the write's buffer), or a good one when they
    came in with the payload's last bytes (a small tail is received into
    the request buffer, and what is there has been read). An idle second
    connection is closed without a byte and answers nothing."""
    if kind == "view":
        root, base = make_store(tmp_path, size=16 * MiB, seed=8)
        srv = serve_store(nbdserver, root)
        name = "lab/n1"
    else:
        img = make_image("disk.img", size=16 * MiB, seed=8)
        base = img.read()
        srv = nbdserver({"disk": img}, args=["--threads", "2"])
        name = "disk"
    big = random.Random(9).randbytes(tail + 512 * 1024)
    raw = N.connect_export(srv.tcp, name)
    idle = N.connect_export(srv.tcp, name)
    ca = raw.send_request(N.CMD_WRITE, 0, BS, payload=b"A" * BS)
    cr = raw.send_request(N.CMD_READ, MiB, BS)
    cf = raw.send_request(N.CMD_FLUSH)
    cb = raw.next_cookie()
    raw.send(raw.request_bytes(N.CMD_WRITE, 2 * MiB, len(big), cookie=cb) + big[:-tail])
    time.sleep(0.3)  # all of it read by the server
    srv.proc.send_signal(signal.SIGTERM)
    wait_for_log(srv, "finishing in-flight requests")
    time.sleep(0.2)

    # The idle connection is closed, without a reply or anything else.
    idle.sock.settimeout(5)
    try:
        got = idle.sock.recv(1)
    except ConnectionResetError:
        got = b""
    assert got == b"", f"the idle connection got {got!r} after SIGTERM"

    # The rest of the payload in pieces, a pause after each, so that it
    # takes more than the receive that was waiting when the signal came;
    # the new requests go with the last piece.
    c1 = raw.next_cookie()
    c2 = raw.next_cookie()
    c3 = raw.next_cookie()
    rest = big[-tail:]
    for i in range(3):
        raw.send(rest[i * tail // 4:(i + 1) * tail // 4])
        time.sleep(0.1)
    raw.send(rest[3 * tail // 4:] + raw.request_bytes(N.CMD_READ, 0, BS, cookie=c1) +
             raw.request_bytes(N.CMD_WRITE, 8 * BS, BS, cookie=c2) + b"C" * BS +
             raw.request_bytes(N.CMD_FLUSH, cookie=c3))
    replies = read_replies(raw, {cr: BS, c1: BS})
    raw.close()
    errors = {c: (r.error, r.messages) for c, r in replies.items() if r.error}
    assert not errors, f"error replies after SIGTERM: {errors}"
    assert set(replies) <= {ca, cr, cf, cb, c1, c2, c3}, sorted(replies)
    for c in (ca, cr, cf, cb):
        assert c in replies, f"request {c}, read before the signal, was not answered"
    assert read_data(replies[cr], MiB, BS) == base[MiB:MiB + BS]
    if c1 in replies:
        assert read_data(replies[c1], 0, BS) == b"A" * BS
    late = [c for c in (c1, c2, c3) if c in replies]
    print(f"tail {tail}: requests sent after SIGTERM answered: {len(late)} of 3")
    if tail >= 16 * 1024:
        assert not late, "requests sent after SIGTERM were read and answered"
    # A request on the closed idle connection gets nothing back.
    try:
        idle.send(idle.request_bytes(N.CMD_READ, 0, BS))
        idle.sock.settimeout(5)
        assert idle.sock.recv(1) == b""
    except (BrokenPipeError, ConnectionResetError):
        pass
    idle.close()
    assert srv.terminate(timeout=30) == 0
    assert not error_replies_logged(srv), error_replies_logged(srv)[:5]
    assert "shutdown timeout" not in srv.stderr()

    # What was answered is on disk (the big write had no flush after it);
    # a write that was never answered was never done.
    if kind == "view":
        srv = serve_store(nbdserver, root)
        h = attach(srv, name)
        got = read_all(h, 16 * MiB)
        h.shutdown()
    else:
        got = img.read()
    assert got[:BS] == b"A" * BS
    assert got[2 * MiB:2 * MiB + len(big)] == big
    want = b"C" * BS if c2 in replies else base[8 * BS:9 * BS]
    assert got[8 * BS:9 * BS] == want
