"""The libnbd Python bindings against nbdserver: data path, flags, block
status, multi-connection consistency and error codes."""

import errno
import os
import random

import nbd
import pytest

from conftest import GRAIN, KiB, MiB, file_extents, merge_extents, nbd_handle


def rand(n, seed):
    return random.Random(seed).randbytes(n)


def nbd_errno(excinfo):
    return excinfo.value.errnum


# ---------------------------------------------------------------- negotiation

@pytest.mark.parametrize("structured", [True, False])
def test_negotiation(rw_server, image, structured):
    h = nbd_handle(rw_server.uri("disk"), structured=structured)
    assert h.get_structured_replies_negotiated() is structured
    assert h.get_protocol() == "newstyle-fixed"
    assert h.get_size() == image.size
    assert h.can_meta_context("base:allocation") is structured
    h.shutdown()


def test_flags_of_writable_export(rw_server):
    h = nbd_handle(rw_server.uri("disk"))
    assert not h.is_read_only()
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    assert h.can_fast_zero() and h.can_cache() and h.can_multi_conn() and h.can_df()
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
    h.shutdown()


def test_flags_of_read_only_export(ro_server):
    h = nbd_handle(ro_server.uri("disk"))
    assert h.is_read_only()
    assert h.can_multi_conn()
    h.shutdown()


def test_list_meta_contexts(rw_server):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.add_meta_context("base:allocation")
    h.connect_uri(rw_server.uri("disk"))
    seen = []
    h.opt_list_meta_context(lambda name: seen.append(name) or 0)
    assert "base:allocation" in seen
    h.opt_go()
    assert h.can_meta_context("base:allocation")
    h.shutdown()


def test_opt_info_then_go_other_export(nbdserver, make_image):
    a = make_image("a.img", size=1 * MiB)
    b = make_image("b.img", size=2 * MiB)
    srv = nbdserver({"a": a, "b": (b, {"ro": True})})
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(srv.uri("a"))
    h.set_export_name("b")
    h.opt_info()
    assert h.get_size() == b.size
    assert h.is_read_only()
    h.set_export_name("a")
    h.opt_go()
    assert h.get_size() == a.size
    assert h.pread(4096, 0) == a.read(0, 4096)
    h.shutdown()


def test_unknown_export_go_fails(rw_server):
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(rw_server.uri("nosuch"))


# ---------------------------------------------------------------- data path

@pytest.mark.parametrize("structured", [True, False])
def test_pread_matches_file(rw_server, image, structured):
    h = nbd_handle(rw_server.uri("disk"), structured=structured)
    rng = random.Random(7)
    points = [(0, 4096), (0, image.size), (image.size - 1, 1), (GRAIN - 100, 300)]
    points += [(rng.randrange(image.size - 70000), rng.randrange(1, 70000)) for _ in range(50)]
    for off, n in points:
        assert h.pread(n, off) == image.read(off, n), (off, n)
    h.shutdown()


def test_pread_of_maximum_block(nbdserver, make_image):
    img = make_image("big.img", size=40 * MiB, seed=9, hole_fraction=0.2)
    srv = nbdserver({"disk": (img, {"ro": True})})
    h = nbd_handle(srv.uri("disk"))
    assert h.pread(32 * MiB, 4 * MiB) == img.read(4 * MiB, 32 * MiB)
    h.shutdown()


@pytest.mark.parametrize("structured", [True, False])
def test_pwrite_then_pread(rw_server, image, structured):
    h = nbd_handle(rw_server.uri("disk"), structured=structured)
    writes = [(0, rand(4096, 1)), (5 * GRAIN + 12345, rand(70001, 2)),
              (image.size - 513, rand(513, 3)), (GRAIN, rand(3 * GRAIN, 4))]
    for off, data in writes:
        h.pwrite(data, off)
    for off, data in writes:
        assert h.pread(len(data), off) == data
    h.flush()
    for off, data in writes:
        assert image.read(off, len(data)) == data
    h.shutdown()


def test_fua_write_reaches_file(rw_server, image):
    h = nbd_handle(rw_server.uri("disk"))
    data = rand(64 * KiB, 11)
    h.pwrite(data, 256 * KiB, nbd.CMD_FLAG_FUA)
    # A FUA write has completed when it is acknowledged: no flush needed.
    assert image.read(256 * KiB, len(data)) == data
    other = nbd_handle(rw_server.uri("disk"))
    assert other.pread(len(data), 256 * KiB) == data
    h.shutdown()
    other.shutdown()


def test_write_flush_visible_on_other_connection(rw_server, image):
    a = nbd_handle(rw_server.uri("disk"))
    b = nbd_handle(rw_server.uri("disk"))
    assert a.can_multi_conn()
    before = b.pread(128 * KiB, 1 * MiB)
    data = rand(128 * KiB, 12)
    assert data != before
    a.pwrite(data, 1 * MiB)
    a.flush()
    assert b.pread(128 * KiB, 1 * MiB) == data
    a.shutdown()
    b.shutdown()


def test_many_parallel_aio_requests(rw_server, image):
    h = nbd_handle(rw_server.uri("disk"))
    expected = image.read()
    bufs = []
    rng = random.Random(13)
    for _ in range(64):
        off = rng.randrange(image.size - 65536)
        buf = nbd.Buffer(65536)
        h.aio_pread(buf, off)
        bufs.append((off, buf))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for off, buf in bufs:
        assert buf.to_bytearray() == expected[off:off + 65536]
    h.shutdown()


def test_many_concurrent_fua_writes_and_flushes_all_answered(rw_server, image):
    """More FUA writes and FLUSHes in flight than a loop runs fdatasyncs at
    once (four per export): those that find no idle one wait and share the
    next, and every one is answered with its data in the file."""
    h = nbd_handle(rw_server.uri("disk"))
    other = nbd_handle(rw_server.uri("disk"))
    writes = [(i * 80 * KiB + 512 * (i % 5), rand(4096 + 512 * (i % 3), 100 + i))
              for i in range(48)]
    assert writes[-1][0] + len(writes[-1][1]) <= image.size
    cookies, bufs = [], []
    for i, (off, data) in enumerate(writes):
        conn = h if i % 2 == 0 else other
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        bufs.append(buf)  # alive until the writes complete
        cookies.append((conn, conn.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA)))
        if i % 6 == 0:
            cookies.append((conn, conn.aio_flush()))
    for conn in (h, other):
        while conn.aio_in_flight() > 0:
            conn.poll(-1)
    # aio_command_completed raises the request's error, if it had one.
    for conn, cookie in cookies:
        assert conn.aio_command_completed(cookie)
    for off, data in writes:
        assert image.read(off, len(data)) == data
    h.shutdown()
    other.shutdown()


def test_cache(rw_server, image):
    h = nbd_handle(rw_server.uri("disk"))
    h.cache(1 * MiB, 0)
    assert h.pread(4096, 0) == image.read(0, 4096)
    h.shutdown()


# ---------------------------------------------------------------- trim/zero

def test_trim_then_read(rw_server, image):
    """This server implements TRIM by punching a hole: the range reads as
    zeroes afterwards and block status reports it as a hole."""
    h = nbd_handle(rw_server.uri("disk"))
    off, n = 0, 2 * GRAIN  # the first run of the image is data
    assert image.read(off, n) != bytes(n)
    h.trim(n, off)
    h.flush()
    assert h.pread(n, off) == bytes(n)
    assert image.read(off, n) == bytes(n)
    h.shutdown()


def test_zero(rw_server, image):
    h = nbd_handle(rw_server.uri("disk"))
    off, n = 100, 3 * GRAIN
    assert h.pread(n, off) != bytes(n)
    h.zero(n, off)
    assert h.pread(n, off) == bytes(n)
    # The neighbours are untouched.
    assert h.pread(100, 0) == image.read(0, 100)
    assert h.pread(100, off + n) == image.read(off + n, 100)
    h.shutdown()


def test_zero_no_hole(rw_server, image):
    h = nbd_handle(rw_server.uri("disk"))
    h.zero(GRAIN, 0, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(GRAIN, 0) == bytes(GRAIN)
    h.shutdown()


def test_fast_zero(rw_server, image):
    h = nbd_handle(rw_server.uri("disk"))
    assert h.can_fast_zero()
    off, n = GRAIN, 2 * GRAIN
    h.pwrite(rand(n, 21), off)
    try:
        h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as e:
        # The only failure the spec allows for a fast zero that can't be fast.
        assert e.errnum == errno.ENOTSUP, e
        assert h.pread(n, off) == rand(n, 21)  # a failed fast zero changes nothing
    else:
        assert h.pread(n, off) == bytes(n)
    h.shutdown()


# ---------------------------------------------------------------- block status

def block_status_runs(h, size, offset=0):
    """[(offset, length, flags)] for base:allocation, merged."""
    runs = []
    pos = offset

    def cb(metacontext, off, entries, err):
        assert metacontext == "base:allocation"
        p = off
        for i in range(0, len(entries), 2):
            runs.append((p, entries[i], entries[i + 1]))
            p += entries[i]
        return 0

    while pos < size:
        before = sum(r[1] for r in runs)
        h.block_status(min(size - pos, 1 << 30), pos, cb)
        got = sum(r[1] for r in runs) - before
        assert got > 0, "block status made no progress"
        pos += got
    return merge_extents(runs)


def test_block_status_matches_file(rw_server, image):
    h = nbd_handle(rw_server.uri("disk"))
    expected = [(o, n, 3 if hole else 0) for o, n, hole in file_extents(image.path)]
    assert len(expected) > 2
    assert block_status_runs(h, image.size) == expected
    h.shutdown()


def test_block_status_from_unaligned_offset(rw_server, image):
    h = nbd_handle(rw_server.uri("disk"))
    start = GRAIN + 12345
    truth = [(o, n, 3 if hole else 0) for o, n, hole in file_extents(image.path)]
    expected = []
    for o, n, t in truth:
        end = o + n
        if end <= start:
            continue
        expected.append((max(o, start), end - max(o, start), t))
    assert block_status_runs(h, image.size, start) == merge_extents(expected)
    h.shutdown()


def test_block_status_req_one(rw_server, image):
    h = nbd_handle(rw_server.uri("disk"))
    first = file_extents(image.path)[0]
    got = []

    def cb(metacontext, off, entries, err):
        got.extend(entries)
        return 0

    h.block_status(image.size, 0, cb, nbd.CMD_FLAG_REQ_ONE)
    assert len(got) == 2, got
    assert 0 < got[0] <= first[1]
    assert got[1] == (3 if first[2] else 0)
    h.shutdown()


def test_block_status_after_write(make_image, nbdserver):
    img = make_image("sparse.img", layout=[(0, 1 * MiB, "hole")])
    srv = nbdserver({"s": img})
    h = nbd_handle(srv.uri("s"))
    h.pwrite(rand(GRAIN, 5), 2 * GRAIN)
    h.flush()
    runs = block_status_runs(h, img.size)
    assert runs == [(0, 2 * GRAIN, 3), (2 * GRAIN, GRAIN, 0), (3 * GRAIN, 1 * MiB - 3 * GRAIN, 3)]
    h.shutdown()


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("structured", [True, False])
def test_pread_out_of_range_is_einval(rw_server, image, structured):
    h = nbd_handle(rw_server.uri("disk"), strict=False, structured=structured)
    for off, n in [(image.size, 1), (image.size - 4096, 8192), (image.size + (1 << 30), 4096)]:
        with pytest.raises(nbd.Error) as e:
            h.pread(n, off)
        assert nbd_errno(e) == errno.EINVAL, (off, n, e.value)
    # The connection is still usable.
    assert h.pread(4096, 0) == image.read(0, 4096)
    h.shutdown()


def test_write_out_of_range_is_enospc(rw_server, image):
    h = nbd_handle(rw_server.uri("disk"), strict=False)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 4096, image.size - 2048)
    assert nbd_errno(e) == errno.ENOSPC
    with pytest.raises(nbd.Error) as e:
        h.zero(4096, image.size)
    assert nbd_errno(e) == errno.ENOSPC
    assert os.path.getsize(image.path) == image.size  # the file did not grow
    assert h.pread(4096, image.size - 4096) == image.read(image.size - 4096, 4096)
    h.shutdown()


@pytest.mark.parametrize("op", ["pwrite", "trim", "zero"])
def test_modify_read_only_is_eperm(ro_server, image, op):
    before = image.sha256()
    h = nbd_handle(ro_server.uri("disk"), strict=False)
    with pytest.raises(nbd.Error) as e:
        if op == "pwrite":
            h.pwrite(b"\xee" * 65536, 0)
        elif op == "trim":
            h.trim(65536, 0)
        else:
            h.zero(65536, 0)
    assert nbd_errno(e) == errno.EPERM
    # The same connection still works: the write payload was drained.
    assert h.pread(65536, 0) == image.read(0, 65536)
    h.shutdown()
    assert image.sha256() == before


def test_read_larger_than_max_block_is_einval(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--max-block", str(64 * KiB)])
    h = nbd_handle(srv.uri("disk"), strict=False)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 64 * KiB
    with pytest.raises(nbd.Error) as e:
        h.pread(64 * KiB + 1, 0)
    assert nbd_errno(e) == errno.EINVAL
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"\x01" * (128 * KiB), 0)
    assert nbd_errno(e) == errno.EINVAL
    assert h.pread(64 * KiB, 0) == image.read(0, 64 * KiB)
    h.shutdown()


def test_unknown_command_flag_is_einval(rw_server, image):
    h = nbd_handle(rw_server.uri("disk"), strict=False)
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 0, 1 << 9)  # a flag bit the spec does not define
    assert nbd_errno(e) == errno.EINVAL
    assert h.pread(4096, 0) == image.read(0, 4096)
    h.shutdown()


# ---------------------------------------------------------------- odd sizes, threads

def test_odd_sized_file_tail(nbdserver, make_image):
    img = make_image("odd.img", layout=[(0, 3 * 4096 + 1234, "data")])
    srv = nbdserver({"odd": img})
    h = nbd_handle(srv.uri("odd"), strict=False)
    assert h.get_size() == img.size
    assert h.pread(1234, 3 * 4096) == img.read(3 * 4096, 1234)
    assert h.pread(img.size, 0) == img.read()
    h.pwrite(b"\xcd" * 100, img.size - 100)
    assert h.pread(200, img.size - 200) == img.read(img.size - 200, 100) + b"\xcd" * 100
    with pytest.raises(nbd.Error) as e:
        h.pread(2, img.size - 1)
    assert nbd_errno(e) == errno.EINVAL
    h.shutdown()


@pytest.mark.parametrize("threads", [1, 3])
def test_concurrent_writers_on_many_connections(nbdserver, make_image, threads):
    img = make_image("w.img", size=8 * MiB, seed=71)
    srv = nbdserver({"disk": img}, args=["--threads", str(threads)])
    expected = bytearray(img.read())
    handles = [nbd_handle(srv.uri("disk")) for _ in range(4)]
    rng = random.Random(threads)
    chunk = 32 * KiB
    slots = list(range(img.size // chunk))
    rng.shuffle(slots)
    for i, slot in enumerate(slots[:160]):
        data = rng.randbytes(chunk)
        expected[slot * chunk:(slot + 1) * chunk] = data
        handles[i % 4].aio_pwrite(data, slot * chunk)
    for h in handles:
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()
    for h in handles:
        assert h.pread(img.size, 0) == bytes(expected)
        h.shutdown()
    assert img.read() == bytes(expected)


def test_nbdsh_script(rw_server, image):
    """The same through nbdsh, the way an administrator would poke at it."""
    from conftest import run
    script = (
        "assert h.get_structured_replies_negotiated()\n"
        "assert h.can_meta_context('base:allocation')\n"
        "h.pwrite(b'\\x99' * 4096, 4096, nbd.CMD_FLAG_FUA)\n"
        "h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)\n"
        "print(h.get_size())\n"
        "print(h.pread(4096 * 3, 0).hex())\n"
    )
    # nbdsh runs the `python3` on PATH: make it the one with the bindings.
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    out = run(["nbdsh", "--base-allocation", "-u", rw_server.uri("disk"), "-c", script],
              env=env).stdout.split()
    assert int(out[0]) == image.size
    expected = image.read(0, 4096) + b"\x99" * 4096 + bytes(4096)
    assert bytes.fromhex(out[1]) == expected
    assert image.read(0, 3 * 4096) == expected
