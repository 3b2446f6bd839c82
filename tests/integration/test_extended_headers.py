"""NBD_OPT_EXTENDED_HEADERS by hand (no installed client speaks it):
32-byte requests, 32-byte reply headers, 64-bit block status."""

import random
import struct

import pytest

import nbdraw as N
from conftest import GRAIN, KiB, MiB, file_extents


@pytest.fixture
def ext(rw_server):
    """A raw connection in transmission with extended headers and
    base:allocation."""
    c = N.connect_export(rw_server.tcp, "disk", extended=True, meta=True)
    yield c
    c.close()


def test_negotiation_acks(rw_server):
    with N.RawClient(rw_server.tcp) as c:
        c.handshake()
        r = c.opt_extended_headers()
        assert r.type == N.REP_ACK and r.data == b""
        c.opt_go("disk")
        assert c.transmission_flags & N.TF_HAS_FLAGS


def test_structured_reply_after_extended_is_refused(rw_server):
    with N.RawClient(rw_server.tcp) as c:
        c.handshake()
        assert c.opt_extended_headers().type == N.REP_ACK
        r = c.option(N.OPT_STRUCTURED_REPLY)
        assert r.type == N.REP_ERR_EXT_HEADER_REQD
        # Still negotiating fine afterwards.
        c.opt_go("disk")


def test_read(ext, image):
    for off, n in [(0, 4096), (1000, 70000), (image.size - 10, 10), (0, 1 * MiB)]:
        err, data, reply = ext.read(off, n)
        assert err == 0
        assert data == image.read(off, n), (off, n)
        assert all(c.kind == "extended" for c in reply.chunks)
        assert reply.chunks[-1].done


def test_read_reply_uses_offset_data_chunks(ext, image):
    cookie = ext.send_request(N.CMD_READ, 8192, 4096)
    reply = ext.recv_reply(cookie)
    data_chunks = [c for c in reply.chunks if c.type == N.REPLY_TYPE_OFFSET_DATA]
    assert data_chunks
    for c in data_chunks:
        (off,) = struct.unpack(">Q", c.payload[:8])
        assert off == 8192
        assert c.payload[8:] == image.read(8192, len(c.payload) - 8)


def test_write_then_read(ext, image):
    data = random.Random(1).randbytes(100000)
    reply = ext.command(N.CMD_WRITE, 4096, len(data), 0, data)
    assert reply.error == 0
    (c,) = reply.chunks
    assert c.kind == "extended"
    assert c.type == N.REPLY_TYPE_NONE and c.flags & N.REPLY_FLAG_DONE
    assert c.payload == b""
    err, got, _ = ext.read(4096, len(data))
    assert err == 0 and got == data
    assert ext.command(N.CMD_FLUSH).error == 0
    assert image.read(4096, len(data)) == data


def test_write_fua_and_flush(ext, image):
    data = b"\x5a" * 8192
    assert ext.write(0, data, N.CMD_FLAG_FUA) == 0
    assert image.read(0, 8192) == data
    reply = ext.command(N.CMD_FLUSH)
    assert reply.error == 0
    (c,) = reply.chunks
    assert c.type == N.REPLY_TYPE_NONE and c.done and c.kind == "extended"


def test_trim_zero_cache(ext, image):
    assert ext.command(N.CMD_WRITE_ZEROES, GRAIN, 2 * GRAIN).error == 0
    err, data, _ = ext.read(GRAIN, 2 * GRAIN)
    assert err == 0 and data == bytes(2 * GRAIN)
    assert ext.command(N.CMD_TRIM, 0, GRAIN).error == 0
    assert ext.command(N.CMD_CACHE, 0, 1 * MiB).error == 0


def test_block_status_ext(ext, image):
    cid = ext.meta_contexts["base:allocation"]
    err, result = ext.block_status(0, image.size)
    assert err == 0
    assert list(result) == [cid]
    got = []
    pos = 0
    for length, flags in result[cid]:
        assert length > 0
        got.append((pos, length, flags))
        pos += length
    assert 0 < pos <= image.size
    truth = [(o, n, 3 if hole else 0) for o, n, hole in file_extents(image.path)]
    # The reply covers a prefix of the range; it must agree with the file there.
    for off, length, flags in got:
        for o, n, t in truth:
            if o < off + length and off < o + n:
                assert flags == t, (off, length, flags, truth)


def test_block_status_with_64bit_length(ext, image):
    """With extended headers the length is 64 bits; a length past the end of
    the export is still EINVAL, a length that fits is fine."""
    err, result = ext.block_status(0, image.size)
    assert err == 0
    cookie = ext.send_request(N.CMD_BLOCK_STATUS, 0, 1 << 40)
    reply = ext.recv_reply(cookie)
    assert reply.error == N.EINVAL


def test_read_larger_than_4g_is_einval(ext, image):
    cookie = ext.send_request(N.CMD_READ, 0, 1 << 33)
    reply = ext.recv_reply(cookie)
    assert reply.error == N.EINVAL
    assert all(c.kind == "extended" for c in reply.chunks)
    err, data, _ = ext.read(0, 4096)
    assert err == 0 and data == image.read(0, 4096)


def test_error_chunk_has_message(ext, image):
    cookie = ext.send_request(N.CMD_READ, image.size, 4096)
    reply = ext.recv_reply(cookie)
    assert reply.error == N.EINVAL
    (c,) = [c for c in reply.chunks if c.error]
    assert c.type in (N.REPLY_TYPE_ERROR, N.REPLY_TYPE_ERROR_OFFSET)
    assert c.kind == "extended"
    assert reply.chunks[-1].done


def test_pipelined_requests_get_matching_cookies(ext, image):
    cookies = {}
    for i in range(32):
        off = i * 4 * KiB * 7
        cookies[ext.send_request(N.CMD_READ, off, 4096, cookie=1000 + i)] = off
    datas = {c: bytearray() for c in cookies}
    done = set()
    while len(done) < len(cookies):
        c = ext.recv_chunk()
        assert c.cookie in cookies, c
        assert c.error == 0
        if c.type == N.REPLY_TYPE_OFFSET_DATA:
            datas[c.cookie] += c.payload[8:]
        if c.done:
            done.add(c.cookie)
    for cookie, off in cookies.items():
        assert bytes(datas[cookie]) == image.read(off, 4096)


def test_compact_request_after_extended_closes(ext):
    ext.send_request(N.CMD_READ, 0, 4096, extended=False)
    ext.wait_closed(timeout=5)


def test_compact_request_after_extended_server_survives(rw_server, image):
    c = N.connect_export(rw_server.tcp, "disk", extended=True)
    c.send_request(N.CMD_READ, 0, 4096, extended=False)
    c.wait_closed(timeout=5)
    rw_server.assert_alive()
    other = N.connect_export(rw_server.tcp, "disk", extended=True)
    err, data, _ = other.read(0, 4096)
    assert err == 0 and data == image.read(0, 4096)
    other.close()


def test_extended_request_without_negotiation_closes(rw_server):
    c = N.connect_export(rw_server.tcp, "disk", structured=True)
    c.send_request(N.CMD_READ, 0, 4096, extended=True)
    c.wait_closed(timeout=5)


def test_disconnect(ext):
    ext.disconnect()
    ext.wait_closed(timeout=5)


def test_write_over_max_block_is_einval_and_drained(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--max-block", str(64 * KiB)])
    before = image.sha256()
    with N.connect_export(srv.tcp, "disk", extended=True) as c:
        # A payload made of valid requests: not draining it would show.
        fake = N.request_bytes(N.CMD_READ, 0, 512, cookie=0xBAD, extended=True) * 4096
        cookie = c.send_request(N.CMD_WRITE, 0, len(fake), payload=fake)
        reply = c.recv_reply(cookie)
        assert reply.error == N.EINVAL
        err, data, reply = c.read(0, 4096)
        assert err == 0 and data == image.read(0, 4096) and reply.cookie != 0xBAD
    assert image.sha256() == before


def test_write_to_read_only_is_eperm_and_drained(ro_server, image):
    before = image.sha256()
    with N.connect_export(ro_server.tcp, "disk", extended=True) as c:
        fake = N.request_bytes(N.CMD_READ, 0, 512, cookie=0xBAD, extended=True) * 300
        cookie = c.send_request(N.CMD_WRITE, 0, len(fake), payload=fake)
        assert c.recv_reply(cookie).error == N.EPERM
        err, data, reply = c.read(4096, 4096)
        assert err == 0 and data == image.read(4096, 4096) and reply.cookie != 0xBAD
    assert image.sha256() == before


def test_block_status_req_one(ext, image):
    cid = ext.meta_contexts["base:allocation"]
    first_off, first_len, first_hole = file_extents(image.path)[0]
    err, result = ext.block_status(0, image.size, N.CMD_FLAG_REQ_ONE)
    assert err == 0
    (desc,) = result[cid]
    assert 0 < desc[0] <= first_len
    assert desc[1] == (3 if first_hole else 0)


def test_read_of_hole_is_zeroes(ext, image):
    holes = [(o, n) for o, n, hole in file_extents(image.path) if hole]
    assert holes
    off, n = holes[0]
    err, data, _ = ext.read(off, n)
    assert err == 0 and data == bytes(n)
