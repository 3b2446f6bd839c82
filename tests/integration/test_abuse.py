"""Hostile and broken clients, by hand over raw sockets. After each one the
server must still be alive and serve a fresh libnbd client correct data."""

import socket
import struct
import time

import pytest

import nbdraw as N
from conftest import MiB, assert_healthy


@pytest.fixture
def srv(rw_server, image):
    yield rw_server
    assert_healthy(rw_server, image)


@pytest.fixture
def ro_srv(ro_server, image):
    yield ro_server
    assert_healthy(ro_server, image)


def raw(server, **kw):
    return N.RawClient(server.tcp, **kw)


def go_ok(c, image, name="disk"):
    """GO on `c` succeeds and a read on it returns the right data."""
    c.opt_go(name)
    assert c.export_size == image.size
    err, data, _ = c.read(4096, 4096)
    assert err == 0 and data == image.read(4096, 4096)


# ---------------------------------------------------------------- handshake

@pytest.mark.parametrize("flags", [0xFFFFFFFF, 0x4, 0x80000001])
def test_garbage_client_flags_close(srv, flags):
    with raw(srv) as c:
        c.greeting()
        c.send_client_flags(flags)
        c.wait_closed()


def test_bad_option_magic_closes(srv):
    with raw(srv) as c:
        c.handshake()
        c.send_option(N.OPT_GO, c.go_data("disk"), magic=0x1122334455667788)
        c.wait_closed()


def test_option_length_4g_closes_without_memory_blowup(srv):
    with raw(srv) as c:
        c.handshake()
        c.send_option(N.OPT_GO, b"", length=0xFFFFFFFF)
        try:
            c.send(b"\0" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        time.sleep(0.2)
        rss_mib = srv.vmrss_kib() / 1024
        assert rss_mib < 200, f"VmRSS {rss_mib:.0f} MiB after a 4 GiB option header"
        c.wait_closed()
    assert srv.vmrss_kib() / 1024 < 200


def test_option_just_over_16m_closes(srv):
    with raw(srv) as c:
        c.handshake()
        c.send_option(N.OPT_GO, b"", length=(16 << 20) + 1)
        c.wait_closed()


@pytest.mark.parametrize("opt", [N.OPT_GO, N.OPT_INFO, N.OPT_LIST_META_CONTEXT])
def test_option_with_1m_of_data_is_too_big(srv, image, opt):
    with raw(srv) as c:
        c.handshake()
        c.send_option(opt, b"\xa5" * MiB)
        r = c.recv_option_reply(opt)
        assert r.type == N.REP_ERR_TOO_BIG, r
        # The megabyte was drained: the same connection negotiates fine.
        go_ok(c, image)


@pytest.mark.parametrize("data", [
    b"",                                               # no name length at all
    b"\0\0",                                           # truncated name length
    struct.pack(">I", 100) + b"disk",                  # name longer than the data
    struct.pack(">I", 4) + b"disk",                    # no info request count
    struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3) + b"\0\3",  # too few info requests
    struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0) + b"junk",  # trailing bytes
    struct.pack(">I", 0xFFFFFFFF) + b"disk\0\0",       # name length wraps
])
def test_malformed_go_is_invalid(srv, image, data):
    with raw(srv) as c:
        c.handshake()
        r = c.option(N.OPT_GO, data)
        assert r.type == N.REP_ERR_INVALID, r
        go_ok(c, image)


def test_unknown_option_is_unsup_and_data_skipped(srv, image):
    with raw(srv) as c:
        c.handshake()
        r = c.option(0xDEAD, b"\x00\x01\x02" * 333)
        assert r.type == N.REP_ERR_UNSUP, r
        r = c.option(0x7FFFFFFF)
        assert r.type == N.REP_ERR_UNSUP, r
        go_ok(c, image)


def test_starttls_is_unsup(srv, image):
    with raw(srv) as c:
        c.handshake()
        assert c.option(N.OPT_STARTTLS).type == N.REP_ERR_UNSUP
        go_ok(c, image)


def test_list_with_data_is_invalid(srv, image):
    with raw(srv) as c:
        c.handshake()
        r = c.option(N.OPT_LIST, b"xyz")
        assert r.type == N.REP_ERR_INVALID, r
        go_ok(c, image)


def test_list_replies(nbdserver, make_image):
    a = make_image("a.img", size=MiB)
    srv = nbdserver({"a": (a, {"desc": "d-a"}), "bb": a})
    with raw(srv) as c:
        c.handshake()
        replies = c.option_replies(N.OPT_LIST)
        assert replies[-1].type == N.REP_ACK
        entries = {}
        for r in replies[:-1]:
            assert r.type == N.REP_SERVER
            (n,) = struct.unpack(">I", r.data[:4])
            entries[r.data[4:4 + n].decode()] = r.data[4 + n:].decode()
        assert entries == {"a": "d-a", "bb": ""}


@pytest.mark.parametrize("opt", [N.OPT_GO, N.OPT_INFO])
def test_unknown_export_is_err_unknown(srv, image, opt):
    with raw(srv) as c:
        c.handshake()
        replies = c.opt_go("nosuch", opt=opt, check=False)
        assert replies[-1].type == N.REP_ERR_UNKNOWN, replies
        go_ok(c, image)


def test_info_then_go(srv, image):
    with raw(srv) as c:
        c.handshake()
        c.opt_go("disk", opt=N.OPT_INFO, infos=(N.INFO_BLOCK_SIZE, N.INFO_NAME))
        assert c.export_size == image.size
        assert c.block_size == (1, 4096, 32 * MiB)
        go_ok(c, image)


def test_list_meta_context_without_queries_lists_base_allocation(srv, image):
    with raw(srv) as c:
        c.handshake()
        c.opt_structured_reply()
        replies, found = c.opt_set_meta_context("disk", (), opt=N.OPT_LIST_META_CONTEXT)
        assert replies[-1].type == N.REP_ACK
        assert "base:allocation" in found
        go_ok(c, image)


def test_set_meta_context_ignores_unknown_contexts(srv, image):
    with raw(srv) as c:
        c.handshake()
        c.opt_structured_reply()
        replies, found = c.opt_set_meta_context("disk", ("nosuch:thing", "base:allocation"))
        assert replies[-1].type == N.REP_ACK
        assert list(found) == ["base:allocation"]
        go_ok(c, image)
        err, result = c.block_status(0, image.size)
        assert err == 0 and list(result) == [found["base:allocation"]]


def test_export_name_unknown_closes(srv):
    with raw(srv) as c:
        c.handshake()
        c.send_option(N.OPT_EXPORT_NAME, b"nosuch")
        c.wait_closed()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_known(srv, image, no_zeroes):
    with raw(srv) as c:
        c.handshake(N.CLIENT_FIXED_NEWSTYLE | (N.CLIENT_NO_ZEROES if no_zeroes else 0))
        c.opt_export_name("disk")
        assert c.export_size == image.size
        err, data, _ = c.read(0, 4096)
        assert err == 0 and data == image.read(0, 4096)


def test_abort(srv):
    with raw(srv) as c:
        c.handshake()
        c.send_option(N.OPT_ABORT)
        # An ACK is optional; then the server closes.
        try:
            r = c.recv_option_reply(N.OPT_ABORT)
            assert r.type == N.REP_ACK
        except N.Closed:
            return
        c.wait_closed()


def test_too_many_options_hang_up(srv):
    with raw(srv) as c:
        c.handshake()
        one = N.option_bytes(0xDEAD)
        for _ in range(4096 // 512):
            c.send(one * 512)
            for _ in range(512):
                assert c.recv_option_reply(0xDEAD).type == N.REP_ERR_UNSUP
        c.assert_open()  # 4096 options are allowed
        c.send(one)
        c.wait_closed()  # the 4097th is not


def test_disconnect_mid_handshake(srv):
    for cut in range(0, 20, 3):
        c = raw(srv)
        c.greeting()
        msg = struct.pack(">I", 3) + struct.pack(">QII", N.IHAVEOPT, N.OPT_GO, 20) + b"\0" * 20
        c.send(msg[:cut])
        c.close()


# ---------------------------------------------------------------- transmission

@pytest.mark.parametrize("structured", [True, False])
def test_read_length_4g_is_einval(srv, image, structured):
    with N.connect_export(srv.tcp, "disk", structured=structured) as c:
        cookie = c.send_request(N.CMD_READ, 0, 0xFFFFFFFF)
        reply = c.recv_reply(cookie)  # no data follows an error
        assert reply.error == N.EINVAL
        err, data, _ = c.read(0, 4096)
        assert err == 0 and data == image.read(0, 4096)


@pytest.mark.parametrize("structured", [True, False])
def test_offset_wraparound_is_einval(srv, image, structured):
    with N.connect_export(srv.tcp, "disk", structured=structured) as c:
        cookie = c.send_request(N.CMD_READ, (1 << 64) - 512, 1024)
        assert c.recv_reply(cookie).error == N.EINVAL
        for cmd in (N.CMD_TRIM, N.CMD_WRITE_ZEROES, N.CMD_CACHE):
            cookie = c.send_request(cmd, (1 << 64) - 512, 1024)
            assert c.recv_reply(cookie).error in (N.EINVAL, N.ENOSPC), cmd
        err, data, _ = c.read(0, 4096)
        assert err == 0 and data == image.read(0, 4096)


def test_structured_error_has_message(srv, image):
    with N.connect_export(srv.tcp, "disk") as c:
        cookie = c.send_request(N.CMD_READ, image.size, 512)
        reply = c.recv_reply(cookie)
        assert reply.error == N.EINVAL
        assert reply.chunks[-1].done
        assert any(c.message for c in reply.chunks), reply.chunks


@pytest.mark.parametrize("structured", [True, False])
def test_write_to_read_only_drains_payload(ro_srv, image, structured):
    before = image.sha256()
    with N.connect_export(ro_srv.tcp, "disk", structured=structured) as c:
        assert c.transmission_flags & N.TF_READ_ONLY
        # The payload is a valid request header repeated: if the server did
        # not drain it, it would parse it as requests and answer them.
        fake = c.request_bytes(N.CMD_READ, 0, 512, cookie=0xBAD) * 2341
        cookie = c.send_request(N.CMD_WRITE, 0, len(fake), payload=fake)
        assert c.recv_reply(cookie).error == N.EPERM
        err, data, reply = c.read(8192, 4096)
        assert err == 0 and data == image.read(8192, 4096)
        assert reply.cookie != 0xBAD
    assert image.sha256() == before


def test_write_over_max_block_is_einval_and_drained(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--max-block", str(MiB)])
    before = image.sha256()
    with N.connect_export(srv.tcp, "disk") as c:
        payload = c.request_bytes(N.CMD_READ, 0, 512, cookie=0xBAD) * (2 * MiB // 28)
        cookie = c.send_request(N.CMD_WRITE, 0, len(payload), payload=payload)
        assert c.recv_reply(cookie).error == N.EINVAL
        err, data, reply = c.read(0, 4096)
        assert err == 0 and data == image.read(0, 4096)
        assert reply.cookie != 0xBAD
    assert image.sha256() == before
    assert_healthy(srv, image)


def test_write_4g_header_then_disconnect(srv):
    """A WRITE announcing 4 GiB: the server must not allocate it up front."""
    with N.connect_export(srv.tcp, "disk") as c:
        c.send_request(N.CMD_WRITE, 0, 0xFFFFFFFF)
        try:
            for _ in range(64):
                c.send(b"\0" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        time.sleep(0.2)
        assert srv.vmrss_kib() / 1024 < 200


def test_bad_request_magic_closes(srv):
    with N.connect_export(srv.tcp, "disk") as c:
        c.send_request(N.CMD_READ, 0, 4096, magic=0xDEADBEEF)
        c.wait_closed()


@pytest.mark.parametrize("structured", [True, False])
def test_unknown_command_is_einval(srv, image, structured):
    with N.connect_export(srv.tcp, "disk", structured=structured) as c:
        cookie = c.send_request(42, 0, 4096)
        assert c.recv_reply(cookie).error == N.EINVAL
        err, data, _ = c.read(0, 4096)
        assert err == 0 and data == image.read(0, 4096)


def test_unknown_flags_are_einval(srv, image):
    with N.connect_export(srv.tcp, "disk") as c:
        cookie = c.send_request(N.CMD_READ, 0, 4096, flags=1 << 13)
        assert c.recv_reply(cookie).error == N.EINVAL
        err, data, _ = c.read(0, 4096)
        assert err == 0 and data == image.read(0, 4096)


def test_block_status_without_meta_context_is_einval(srv, image):
    with N.connect_export(srv.tcp, "disk", structured=True, meta=False) as c:
        cookie = c.send_request(N.CMD_BLOCK_STATUS, 0, 4096)
        assert c.recv_reply(cookie).error == N.EINVAL
        err, data, _ = c.read(0, 4096)
        assert err == 0 and data == image.read(0, 4096)


def test_disconnect_mid_write_payload(srv, image):
    before = image.read(0, 65536)
    for cut in (0, 1, 4095, 60000):
        c = N.connect_export(srv.tcp, "disk")
        c.send(c.request_bytes(N.CMD_WRITE, 0, 65536) + b"\x77" * cut)
        c.close()
    time.sleep(0.2)
    srv.assert_alive()
    # A partial write must not have been applied.
    assert image.read(0, 65536) == before


def test_disconnect_mid_request_header(srv):
    for cut in (1, 4, 27):
        c = N.connect_export(srv.tcp, "disk")
        c.send(c.request_bytes(N.CMD_READ, 0, 4096)[:cut])
        c.close()


def test_disc_after_pipelined_reads(srv, image):
    with N.connect_export(srv.tcp, "disk") as c:
        cookies = [c.send_request(N.CMD_READ, i * 65536, 65536) for i in range(8)]
        c.disconnect()
        got = {}
        while len(got) < len(cookies):
            ch = c.recv_chunk()
            assert ch.error == 0
            if ch.type == N.REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack(">Q", ch.payload[:8])
                got.setdefault(ch.cookie, bytearray())
                assert image.read(off, len(ch.payload) - 8) == ch.payload[8:]
            if ch.done:
                got.setdefault(ch.cookie, bytearray())
        assert set(got) == set(cookies)
        c.wait_closed()


def test_reset_with_requests_in_flight(srv):
    for _ in range(5):
        c = N.connect_export(srv.tcp, "disk")
        for i in range(32):
            c.send_request(N.CMD_READ, i * 65536, 65536)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST
    time.sleep(0.2)


@pytest.mark.parametrize("structured", [True, False])
def test_deep_pipeline_with_64bit_cookies(srv, image, structured):
    """2000 reads sent before any reply is read: the server must apply
    backpressure, not drop or mix up replies. Cookies are opaque 64-bit."""
    import random
    rng = random.Random(9)
    expected = image.read()
    with N.connect_export(srv.tcp, "disk", structured=structured, timeout=30) as c:
        reqs = {}
        batch = bytearray()
        for i in range(2000):
            cookie = rng.getrandbits(64) | (1 << 63) if i % 2 else rng.getrandbits(64)
            off = rng.randrange(image.size - 4096)
            reqs[cookie] = off
            batch += N.request_bytes(N.CMD_READ, off, 4096, cookie=cookie)
        c.send(bytes(batch))
        lengths = {k: 4096 for k in reqs}
        got = {}
        while len(got) < len(reqs):
            ch = c.recv_chunk(lengths)
            assert ch.cookie in reqs and ch.error == 0, ch
            if ch.kind == "simple":
                got[ch.cookie] = ch.payload
            elif ch.type == N.REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack(">Q", ch.payload[:8])
                assert off == reqs[ch.cookie]
                got[ch.cookie] = ch.payload[8:]
            else:
                assert ch.done and ch.type == N.REPLY_TYPE_NONE, ch
        for cookie, off in reqs.items():
            assert got[cookie] == expected[off:off + 4096]


@pytest.mark.parametrize("cmd", [N.CMD_READ, N.CMD_WRITE, N.CMD_TRIM, N.CMD_WRITE_ZEROES,
                                 N.CMD_CACHE, N.CMD_BLOCK_STATUS, N.CMD_FLUSH])
def test_zero_length_requests_get_an_answer(srv, image, cmd):
    """The spec leaves zero-length requests to the server; whatever it
    answers, it answers once and the connection stays usable."""
    with N.connect_export(srv.tcp, "disk", meta=True) as c:
        cookie = c.send_request(cmd, 4096, 0)
        reply = c.recv_reply(cookie)
        assert reply.error in (0, N.EINVAL), reply.chunks
        if cmd == N.CMD_READ and not reply.error:
            assert all(not ch.payload or len(ch.payload) == 8 for ch in reply.chunks)
        err, data, _ = c.read(0, 4096)
        assert err == 0 and data == image.read(0, 4096)


def test_write_and_read_of_exactly_max_block(nbdserver, make_image):
    img = make_image("big.img", size=33 * MiB, seed=81)
    srv = nbdserver({"disk": img})
    data = bytes(range(256)) * (32 * MiB // 256)
    with N.connect_export(srv.tcp, "disk", timeout=30) as c:
        assert c.block_size[2] == 32 * MiB
        assert c.write(512, data) == 0
        err, got, _ = c.read(512, len(data))
        assert err == 0 and got == data
        cookie = c.send_request(N.CMD_READ, 0, 32 * MiB + 1)
        assert c.recv_reply(cookie).error == N.EINVAL
    assert img.read(512, len(data)) == data
    assert_healthy(srv, img)


@pytest.mark.parametrize("data", [
    struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0xFFFFFFFF),        # huge query count
    struct.pack(">I", 4) + b"disk" + struct.pack(">I", 1) + struct.pack(">I", 50) + b"base:",
    struct.pack(">I", 50) + b"disk",
])
def test_malformed_set_meta_context_is_invalid(srv, image, data):
    with raw(srv) as c:
        c.handshake()
        c.opt_structured_reply()
        replies = c.option_replies(N.OPT_SET_META_CONTEXT, data)
        assert replies[-1].type == N.REP_ERR_INVALID, replies
        go_ok(c, image)
