"""Node views under bad state and bad luck: corrupt, truncated or foreign
layer files refused at attach (files untouched, other nodes served, the
server running), a full disk (ENOSPC, then writes work again once space is
freed), a real EIO under a diff (sticky for that node), and protocol abuse
on views."""

import json
import os
import shutil
import struct
import subprocess
import time
import zlib

import nbd
import pytest

import nbdraw as N
from conftest import MiB
from storeutil import (BS, DIRTY, Model, add_generation, admin, connect, make_store,
                       merge_runs, node_files, read_all, restart, serve_store, snapshot_files)

SIZE = 16 * MiB
MAP_MAGIC = b"NBDRMAP1"


def admin_node(root, node):
    for n in json.loads(admin(root, "list", "--json").stdout):
        if n["node"] == node:
            return n
    raise AssertionError(f"no node {node}")


def wait_detached(root, node):
    for _ in range(500):
        if not admin_node(root, node)["attached"]:
            return
    raise AssertionError(f"node {node} stays attached")


def write_flush_detach(srv, root, node, writes):
    """Writes [(offset, bytes)], flushes, disconnects and waits until the
    server has let go of the node."""
    h = connect(srv, f"lab/{node}")
    for off, data in writes:
        h.pwrite(data, off)
    h.flush()
    h.shutdown()
    wait_detached(root, node)


def slots(bitmap):
    """[(file offset, seq, payload length)] of the valid-looking slots."""
    with open(bitmap, "rb") as f:
        data = f.read()
    out = []
    pos = data.find(MAP_MAGIC)
    while pos >= 0:
        seq, nd, nz = struct.unpack_from("<QII", data, pos + 40)
        out.append((pos, seq, nd + nz))
        pos = data.find(MAP_MAGIC, pos + 1)
    return out


def flip(path, offset, n=4):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(n)
        f.seek(offset)
        f.write(bytes(x ^ 0xA5 for x in b))


@pytest.fixture
def two_nodes(nbdserver, tmp_path):
    """A server with nodes n1 and n2, each with flushed data, detached.
    Returns (server, root, models)."""
    root, base = make_store(tmp_path)
    srv = serve_store(nbdserver, root)
    models = {}
    for i, node in enumerate(("n1", "n2")):
        m = models[node] = Model(base)
        writes = [(3 * BS + 10 + i, bytes([65 + i]) * 5000), (200 * BS, bytes([97 + i]) * BS)]
        for off, d in writes:
            m.write(off, d)
        write_flush_detach(srv, root, node, writes)
    return srv, root, models


def node_paths(root, node):
    d = os.path.join(root, "nodes", node)
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f != "lock")


def assert_refused(srv, root, node, words, models):
    """Attaching `node` fails with a message naming the problem; its files
    are untouched; the other nodes are served; the server runs on."""
    paths = [p for p in node_paths(root, node) if not p.endswith("node.json")]
    before = snapshot_files(paths)
    for _ in range(2):  # and a second attempt is refused the same way
        with pytest.raises(nbd.Error):
            connect(srv, f"lab/{node}")
    r = subprocess.run(["nbdinfo", srv.uri(f"lab/{node}")], capture_output=True, text=True,
                       timeout=30, env=dict(os.environ, LIBNBD_DEBUG="1"))
    assert r.returncode != 0
    msg = [l for l in r.stderr.splitlines() if "server error message" in l]
    assert msg, r.stderr
    log = srv.stderr()
    for w in words:
        assert w in msg[0], msg[0]
        assert w in log, log[-3000:]
    assert snapshot_files(paths) == before
    srv.assert_alive()
    for other, m in models.items():
        if other == node:
            continue
        h = connect(srv, f"lab/{other}")
        assert read_all(h, SIZE) == bytes(m.data), other
        h.shutdown()
    # New nodes can still be created and used.
    h = connect(srv, "lab/fresh")
    h.pwrite(b"ok", 0)
    assert h.pread(2, 0) == b"ok"
    h.shutdown()


# ---------------------------------------------------------------- corrupt state

def test_bitmap_truncated_to_zero_is_refused(two_nodes):
    srv, root, models = two_nodes
    os.truncate(node_files(root, "n1")[1], 0)
    assert_refused(srv, root, "n1", ["bitmap file is truncated"], models)


def test_bitmap_truncated_to_half_is_refused(two_nodes):
    srv, root, models = two_nodes
    bitmap = node_files(root, "n1")[1]
    # Make the newest map live in the second slot: one more flush with a
    # change if it does not already.
    ss = slots(bitmap)
    newest = max(ss, key=lambda s: s[1])
    if newest[0] == 0:
        h = connect(srv, "lab/n1")
        h.pwrite(b"Z" * BS, 300 * BS)
        h.flush()
        h.shutdown()
        wait_detached(root, "n1")
        models["n1"].write(300 * BS, b"Z" * BS)
        newest = max(slots(bitmap), key=lambda s: s[1])
    assert newest[0] > 0, slots(bitmap)
    os.truncate(bitmap, os.path.getsize(bitmap) // 2)
    assert os.path.getsize(bitmap) <= newest[0]
    assert_refused(srv, root, "n1", ["truncated"], models)


def test_bitmap_corrupt_in_both_slots_is_refused(two_nodes):
    srv, root, models = two_nodes
    bitmap = node_files(root, "n1")[1]
    ss = slots(bitmap)
    assert len(ss) == 2, ss
    for pos, seq, plen in ss:
        assert plen > 8
        flip(bitmap, pos + 64 + plen // 2)
    assert_refused(srv, root, "n1", ["no valid bitmap", "checksum"], models)


def trailer(diff):
    """The 64-byte header of a diff's trailer (at the view's size)."""
    with open(diff, "rb") as f:
        f.seek(SIZE)
        return f.read(64)


def trailer_seq(diff):
    """The map the trailer records as durable (0: none, as older servers left it)."""
    return struct.unpack_from("<Q", trailer(diff), 40)[0]


def put_trailer(diff, header=None, seq=None):
    """Writes back a saved trailer header, or sets its durable seq (with a
    valid CRC), as a crash or an older server would have left it."""
    h = bytearray(header if header is not None else trailer(diff))
    if seq is not None:
        struct.pack_into("<Q", h, 40, seq)
        struct.pack_into("<I", h, 56, 0)
        struct.pack_into("<I", h, 56, zlib.crc32(bytes(h)))
    with open(diff, "r+b") as f:
        f.seek(SIZE)
        f.write(bytes(h))


def two_flushes(srv, root, base):
    """n1: A written and flushed, then B in other blocks and flushed, then
    detached. Returns (model after A, the trailer as it was after A's flush)."""
    diff = node_files(root, "n1")[0]
    h = connect(srv, "lab/n1")
    a_state = Model(base)
    h.pwrite(b"A" * 3000, 10 * BS + 7)
    a_state.write(10 * BS + 7, b"A" * 3000)
    h.flush()
    after_a = trailer(diff)
    h.pwrite(b"B" * 3000, 20 * BS + 7)  # other blocks: A-state keeps them clean
    h.flush()
    h.shutdown()
    wait_detached(root, "n1")
    return a_state, after_a


def newest_and_older(bitmap):
    ss = slots(bitmap)
    newest = max(ss, key=lambda s: s[1])
    older = min(ss, key=lambda s: s[1])
    assert newest[1] == older[1] + 1
    # The slot a map with sequence s lives in: offset (s % 2) * stride.
    stride = max(s[0] for s in ss)
    assert newest[0] == (newest[1] % 2) * stride
    return newest, older


def slot_name(pos):
    return "A" if pos == 0 else "B"


@pytest.mark.parametrize("log", ["same boot", "no log"])
def test_newest_slot_torn_by_a_crash_falls_back_to_the_previous_flush(nbdserver, tmp_path, log):
    """A crash while the newest map was written: its slot fails its CRC and
    the diff's trailer still names the map before it. The node is served
    from the older slot, and a warning names the slot, the reason and the
    map served."""
    root, base = make_store(tmp_path)
    srv = serve_store(nbdserver, root)
    a_state, after_a = two_flushes(srv, root, base)
    diff, bitmap = node_files(root, "n1")
    newest, older = newest_and_older(bitmap)
    assert trailer_seq(diff) == newest[1]
    # What the crash left: the slot half written, the trailer not yet updated.
    flip(bitmap, newest[0] + 64 + newest[2] // 2)
    put_trailer(diff, after_a)
    assert trailer_seq(diff) == older[1]
    expect = Model(base)
    expect.data[:] = a_state.data
    if log == "same boot":
        # The map log of this boot still names the B write, whose data is in
        # the diff: the view is whole.
        expect.write(20 * BS + 7, b"B" * 3000)
    else:
        # Without it (a host crash: the log's boot does not match) the
        # previous flush's map is what there is.
        os.unlink(bitmap[:-len(".bitmap")] + ".log")
    h = connect(srv, "lab/n1")
    assert read_all(h, SIZE) == bytes(expect.data)
    h.shutdown()
    srv.assert_alive()
    # At each opening of the view (the handshake may open it more than once)
    # until a flush rewrites the slot.
    warn = [l for l in srv.stderr().splitlines() if "bitmap slot" in l and "rejected" in l]
    assert warn, srv.stderr()[-3000:]
    assert "warning" in warn[0], warn
    assert f"node 'n1': bitmap slot {slot_name(newest[0])} rejected" in warn[0], warn
    assert "checksum" in warn[0], warn
    assert f"serving map {older[1]} from slot {slot_name(older[0])}" in warn[0], warn


def test_newest_slot_corrupt_after_its_flush_is_refused(two_nodes):
    """The newest slot goes bad after its flush completed: the diff's
    trailer says that map was durable, so falling back would lose flushed
    writes. Refused, files untouched, other nodes served."""
    srv, root, models = two_nodes
    diff, bitmap = node_files(root, "n1")
    newest, older = newest_and_older(bitmap)
    flip(bitmap, newest[0] + 64 + newest[2] // 2)
    assert_refused(srv, root, "n1", [
        f"bitmap slot {slot_name(newest[0])} is not valid", "checksum",
        f"the diff's trailer records map {newest[1]} as durable",
        f"serving map {older[1]} from slot {slot_name(older[0])} would roll back flushed writes"],
        models)


def test_bitmap_older_than_the_map_log_is_refused(nbdserver, tmp_path):
    """Both slots valid but old (the bitmap restored from an earlier copy),
    in a store whose trailer names no map (as older servers left it): the
    map log's records show that newer maps were durable. Refused."""
    root, base = make_store(tmp_path)
    srv = serve_store(nbdserver, root)
    models = {"n2": Model(base)}
    write_flush_detach(srv, root, "n2", [(0, b"n2" * 100)])
    models["n2"].write(0, b"n2" * 100)
    diff, bitmap = node_files(root, "n1")
    h = connect(srv, "lab/n1")
    h.pwrite(b"A" * BS, 10 * BS)
    h.flush()
    with open(bitmap, "rb") as f:
        old_bitmap = f.read()
    old_seq = max(s[1] for s in slots(bitmap))
    for i, c in enumerate(b"BCD"):
        h.pwrite(bytes([c]) * BS, (20 + i) * BS)  # a map change, logged
        if c != ord("D"):
            h.flush()
    h.shutdown()
    wait_detached(root, "n1")
    with open(bitmap, "wb") as f:
        f.write(old_bitmap)
    put_trailer(diff, seq=0)
    assert_refused(srv, root, "n1", [
        f"the bitmap holds no map newer than {old_seq} but its map log holds changes",
        f"so map {old_seq + 1} was durable", "would roll back flushed writes"], models)


def array_bitmap(values):
    """A roaring bitmap in portable format with one array container per key."""
    keys = {}
    for v in sorted(values):
        keys.setdefault(v >> 16, []).append(v & 0xFFFF)
    head = struct.pack("<II", 12346, len(keys))  # SERIAL_COOKIE_NO_RUNCONTAINER
    desc = b"".join(struct.pack("<HH", k, len(vs) - 1) for k, vs in keys.items())
    offsets, body = b"", b""
    pos = len(head) + len(desc) + 4 * len(keys)
    for vs in keys.values():
        offsets += struct.pack("<I", pos + len(body))
        body += struct.pack(f"<{len(vs)}H", *vs)
    return head + desc + offsets + body


def write_crafted_slots(bitmap, dirty, zero):
    """Rewrites both slots with `dirty` + `zero` payloads under a valid
    header and CRC (sequence numbers kept), so that only the bitmap
    validation can catch them."""
    with open(bitmap, "r+b") as f:
        data = f.read()
        for pos, seq, _ in slots(bitmap):
            h = bytearray(data[pos:pos + 64])
            struct.pack_into("<II", h, 48, len(dirty), len(zero))
            struct.pack_into("<I", h, 56, 0)
            struct.pack_into("<I", h, 56, zlib.crc32(bytes(h) + dirty + zero))
            f.seek(pos)
            f.write(bytes(h) + dirty + zero)


@pytest.mark.parametrize("dirty, zero, words", [
    (array_bitmap([5, 5000]), array_bitmap([]), ["beyond the end"]),
    (array_bitmap([5, 9]), array_bitmap([9]), ["both written and zero"]),
    (b"\x01\x02\x03\x04" * 5, array_bitmap([]), ["bitmap slot"]),
], ids=["beyond-end", "dirty-and-zero", "not-roaring"])
def test_bitmap_with_valid_checksum_but_bad_content_is_refused(two_nodes, dirty, zero, words):
    srv, root, models = two_nodes
    bitmap = node_files(root, "n1")[1]
    write_crafted_slots(bitmap, dirty, zero)
    assert_refused(srv, root, "n1", ["no valid bitmap"] + words, models)
    assert admin_node(root, "n1")["error"], "admin list shows no error for a corrupt node"
    r = admin(root, "extents", "n1", check=False)
    assert r.returncode == 1 and "no valid bitmap" in r.stderr, r.stderr


def test_crafted_bitmap_is_accepted_when_valid(two_nodes):
    """The crafted-slot helper itself: a valid crafted map is served."""
    srv, root, models = two_nodes
    bitmap = node_files(root, "n1")[1]
    write_crafted_slots(bitmap, array_bitmap([3, 4, 200]), array_bitmap([7]))
    h = connect(srv, "lab/n1")
    got = h.pread(8 * BS, 0)
    assert got[3 * BS + 10:3 * BS + 10 + 5000] == b"A" * 5000
    assert got[7 * BS:8 * BS] == bytes(BS)
    assert h.pread(BS, 200 * BS) == b"a" * BS
    h.shutdown()


def test_truncated_diff_is_refused_until_reset(two_nodes):
    srv, root, models = two_nodes
    diff = node_files(root, "n1")[0]
    os.truncate(diff, os.path.getsize(diff) - 4096)
    assert_refused(srv, root, "n1", ["diff file is", "truncated"], models)
    # An admin reset starts the node afresh.
    admin(root, "reset", "n1")
    h, g = connect(srv, "lab/n1"), connect(srv, "lab", dirty=False)
    assert read_all(h, SIZE) == read_all(g, SIZE)
    h.shutdown()
    g.shutdown()


def test_diff_of_another_node_is_refused(two_nodes):
    srv, root, models = two_nodes
    shutil.copyfile(node_files(root, "n2")[0], node_files(root, "n1")[0])
    assert_refused(srv, root, "n1", ["different layer"], models)


def test_bitmap_of_another_generation_is_refused(two_nodes):
    srv, root, models = two_nodes
    add_generation(root, "lab", "g2", seed=2, publish=False)
    d1, b1 = node_files(root, "n1")
    d2, b2 = node_files(root, "n1", gen="g2")
    os.rename(d1, d2)
    os.rename(b1, b2)
    rec_path = os.path.join(root, "nodes", "n1", "node.json")
    with open(rec_path) as f:
        rec = json.load(f)
    rec["generation"] = "g2"
    with open(rec_path, "w") as f:
        json.dump(rec, f)
    assert_refused(srv, root, "n1", ["different base image"], models)


def test_missing_diff_with_bitmap_present_is_refused(two_nodes):
    srv, root, models = two_nodes
    os.unlink(node_files(root, "n1")[0])
    assert_refused(srv, root, "n1", ["missing but its bitmap exists"], models)
    assert not os.path.exists(node_files(root, "n1")[0])


def test_garbage_node_record_is_refused(two_nodes):
    srv, root, models = two_nodes
    rec_path = os.path.join(root, "nodes", "n1", "node.json")
    with open(rec_path, "wb") as f:
        f.write(b"\x00{garbage")
    assert_refused(srv, root, "n1", ["node.json", "not valid JSON"], models)
    with open(rec_path, "rb") as f:
        assert f.read() == b"\x00{garbage"


# ---------------------------------------------------------------- full disk

@pytest.fixture
def tmpfs(tmp_path):
    d = tmp_path / "store"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


@pytest.mark.parametrize("skew", [0, 100], ids=["aligned", "unaligned"])
def test_full_disk_is_enospc_and_recovers(nbdserver, tmp_path, tmpfs, skew):
    root, base = make_store(tmp_path)  # the store is the tmpfs
    filler = os.path.join(root, "filler")
    with open(filler, "wb") as f:
        f.write(b"\xff" * (2 * MiB))
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    m = Model(base)
    chunk = 256 * 1024
    err = None
    for i, off in enumerate(range(skew, SIZE - chunk, chunk)):
        d = bytes([i % 251 + 1]) * chunk
        try:
            h.pwrite(d, off)
        except nbd.Error as e:
            err = e
            break
        h.flush()
        m.write(off, d)
    assert err is not None, "the 24 MiB tmpfs never filled up"
    assert err.errno == "ENOSPC", err
    assert 0 < off < SIZE - chunk
    got = read_all(h, SIZE)
    # Every acknowledged write reads back; the failed one's range holds,
    # byte by byte, the old or the new data (NBD leaves it unspecified).
    assert got[:off] == bytes(m.data[:off]) and got[off + chunk:] == bytes(m.data[off + chunk:])
    new = d[0]
    assert all(g in (o, new) for g, o in zip(got[off:off + chunk], m.data[off:off + chunk]))
    m.data[off:off + chunk] = got[off:off + chunk]
    # A flush after the failed write works: ENOSPC is not sticky.
    h.flush()
    os.unlink(filler)
    d = b"\x5a" * chunk
    h.pwrite(d, off)
    h.flush()
    m.write(off, d)
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()
    srv = restart(nbdserver, srv, root)
    h = connect(srv, "lab/n1")
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()


# ---------------------------------------------------------------- real EIO

@pytest.fixture
def faulty_file(tmp_path):
    """A file on FUSE (nbdfuse) backed by nbdkit's file plugin with the
    error filter: pwrites fail with EIO while `trigger` exists. Yields
    (backing file, fuse file, trigger); the caller fills the backing file
    before mounting via mount()."""
    if not shutil.which("nbdfuse") or not shutil.which("nbdkit") or not os.path.exists("/dev/fuse"):
        pytest.skip("EIO injection needs nbdfuse, nbdkit (error filter) and /dev/fuse")
    mp = tmp_path / "fuse"
    mp.mkdir()
    back = tmp_path / "backing.img"
    trigger = tmp_path / "trigger"
    procs = []

    def mount():
        log = open(tmp_path / "nbdfuse.log", "wb")
        p = subprocess.Popen(["nbdfuse", str(mp / "diff"), "--command", "nbdkit", "-s",
                              "--filter=error", "file", str(back), "error-pwrite=EIO",
                              "error-pwrite-rate=1", f"error-pwrite-file={trigger}"],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        procs.append(p)
        deadline = time.monotonic() + 10
        while not os.path.exists(mp / "diff"):
            if p.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"nbdfuse did not mount: {open(tmp_path / 'nbdfuse.log').read()}")
            time.sleep(0.02)
        return str(mp / "diff")

    yield back, mount, trigger
    for p in procs:
        subprocess.run(["umount", str(mp)], capture_output=True)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)


def test_eio_under_the_diff_is_sticky_for_that_node(nbdserver, tmp_path, faulty_file):
    back, mount, trigger = faulty_file
    root, base = make_store(tmp_path)
    srv = serve_store(nbdserver, root)
    m1, m2 = Model(base), Model(base)
    write_flush_detach(srv, root, "n1", [(5 * BS, b"1" * BS)])
    m1.write(5 * BS, b"1" * BS)
    write_flush_detach(srv, root, "n2", [(5 * BS, b"2" * BS)])
    m2.write(5 * BS, b"2" * BS)
    # Move n1's diff onto the faulty file.
    diff = node_files(root, "n1")[0]
    shutil.copyfile(diff, back)
    fuse_diff = mount()
    os.unlink(diff)
    os.symlink(fuse_diff, diff)
    try:
        h = connect(srv, "lab/n1")
        assert read_all(h, SIZE) == bytes(m1.data)
        h.pwrite(b"x" * 100, 9 * BS + 1)  # works before the fault
        m1.write(9 * BS + 1, b"x" * 100)
        h.flush()
        trigger.touch()
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"y" * BS, 30 * BS)
        assert e.value.errno == "EIO"
        trigger.unlink()
        # The device works again, but the node stays refusing writes.
        for op in (lambda: h.pwrite(b"z" * BS, 40 * BS), h.flush,
                   lambda: h.trim(BS, 41 * BS), lambda: h.zero(BS, 42 * BS)):
            with pytest.raises(nbd.Error) as e:
                op()
            assert e.value.errno == "EIO"
        assert read_all(h, SIZE) == bytes(m1.data)
        assert "I/O error" in srv.stderr() or "Input/output error" in srv.stderr()
        # Another connection to the same node sees the same.
        h2 = connect(srv, "lab/n1")
        with pytest.raises(nbd.Error) as e:
            h2.pwrite(b"w", 0)
        assert e.value.errno == "EIO"
        # Other nodes are unaffected.
        o = connect(srv, "lab/n2")
        o.pwrite(b"2" * 10, 50 * BS)
        m2.write(50 * BS, b"2" * 10)
        o.flush()
        assert read_all(o, SIZE) == bytes(m2.data)
        o.shutdown()
        h2.shutdown()
        h.shutdown()
        # Until an admin resets the node; then it works again, on a new diff.
        wait_detached(root, "n1")
        admin(root, "reset", "n1")
        h = connect(srv, "lab/n1")
        h.pwrite(b"again", 9 * BS)
        h.flush()
        assert h.pread(5, 9 * BS) == b"again"
        h.shutdown()
        assert not os.path.islink(diff)
    finally:
        rc = srv.terminate()
    assert rc == 0


# ---------------------------------------------------------------- protocol abuse

@pytest.fixture
def view_srv(nbdserver, tmp_path):
    root, base = make_store(tmp_path)
    srv = serve_store(nbdserver, root)
    yield srv, root, base
    srv.assert_alive()


def test_requests_beyond_the_end_of_a_view(view_srv):
    srv, root, base = view_srv
    with N.connect_export(srv.tcp, "lab/n1") as c:
        assert c.export_size == SIZE
        assert c.write(SIZE - 100, b"x" * 200) == N.ENOSPC
        assert c.write(SIZE, b"x") == N.ENOSPC
        for cmd in (N.CMD_TRIM, N.CMD_WRITE_ZEROES):
            assert c.command(cmd, SIZE - BS, 2 * BS).error in (N.ENOSPC, N.EINVAL), cmd
        err, _, _ = c.read(SIZE - 10, 20)
        assert err == N.EINVAL
        cookie = c.send_request(N.CMD_READ, (1 << 64) - 512, 1024)
        assert c.recv_reply(cookie).error == N.EINVAL
        err, data, _ = c.read(SIZE - BS, BS)
        assert err == 0 and data == base[SIZE - BS:]
    h = connect(srv, "lab/n1")
    assert nbd_dirty_empty(h)
    h.shutdown()


def nbd_dirty_empty(h):
    seen = []
    h.block_status(SIZE, 0, lambda ctx, off, ents, err: seen.append((ctx, list(ents))) or 0)
    return all(ents[1::2] == [0] * (len(ents) // 2) for ctx, ents in seen if ctx == DIRTY)


@pytest.mark.parametrize("export", ["lab", "lab@g1"])
def test_read_only_generation_refuses_writes(view_srv, export):
    srv, root, base = view_srv
    img = os.path.join(root, "images/lab/generations/g1/image.ext4")
    before = snapshot_files([img])
    with N.connect_export(srv.tcp, export) as c:
        assert c.transmission_flags & N.TF_READ_ONLY
        fake = c.request_bytes(N.CMD_READ, 0, 512, cookie=0xBAD) * 300
        assert c.write(0, fake) == N.EPERM
        for cmd in (N.CMD_TRIM, N.CMD_WRITE_ZEROES):
            assert c.command(cmd, 0, BS).error == N.EPERM
        err, data, reply = c.read(0, BS)
        assert err == 0 and data == base[:BS] and reply.cookie != 0xBAD
    assert snapshot_files([img]) == before


@pytest.mark.parametrize("cmd", [N.CMD_READ, N.CMD_WRITE, N.CMD_TRIM, N.CMD_WRITE_ZEROES,
                                 N.CMD_CACHE, N.CMD_FLUSH])
def test_zero_length_requests_on_a_view(view_srv, cmd):
    srv, root, base = view_srv
    with N.connect_export(srv.tcp, "lab/n1") as c:
        reply = c.command(cmd, 7 * BS + 5, 0)
        assert reply.error in (0, N.EINVAL), reply.chunks
        err, data, _ = c.read(7 * BS, BS)
        assert err == 0 and data == base[7 * BS:8 * BS]
    h = connect(srv, "lab/n1")
    assert nbd_dirty_empty(h)
    h.shutdown()


def test_32mib_write_unaligned_at_both_ends(nbdserver, tmp_path):
    root, base = make_store(tmp_path, size=40 * MiB)
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    m = Model(base)
    off = 3 * MiB + 1234
    d = os.urandom(32 * MiB)
    h.pwrite(d, off)
    m.write(off, d)
    h.trim(5 * MiB, 8 * MiB + 1)
    m.trim(8 * MiB + 1, 5 * MiB)
    h.zero(3 * MiB + 5, 20 * MiB - 7)
    m.zero_range(20 * MiB - 7, 3 * MiB + 5)
    h.flush()
    assert read_all(h, 40 * MiB) == bytes(m.data)
    assert h.pread(32 * MiB, 2 * MiB + 3) == bytes(m.data[2 * MiB + 3:34 * MiB + 3])
    h.shutdown()
    srv = restart(nbdserver, srv, root)
    h = connect(srv, "lab/n1")
    assert read_all(h, 40 * MiB) == bytes(m.data)
    h.shutdown()


# ---------------------------------------------------------------- crashes

def test_sigkill_keeps_flushed_writes_and_never_tears_unflushed_sectors(nbdserver, tmp_path):
    """Rounds of: flushed writes, then unflushed writes still in flight when
    the server gets SIGKILL. After each restart every flushed byte reads
    back, and each sector an unflushed write touched is wholly old or new."""
    import random
    from storeutil import aio_pwrite, kill9
    root, base = make_store(tmp_path)
    srv = serve_store(nbdserver, root)
    m = Model(base)
    rnd = random.Random(77)
    nblocks = SIZE // BS
    for rnd_i in range(8):
        h = connect(srv, "lab/n1")
        for _ in range(20):
            off = rnd.randrange(SIZE - 3 * BS)
            d = rnd.randbytes(rnd.randrange(1, 3 * BS))
            h.pwrite(d, off)
            m.write(off, d)
        h.flush()
        # Unflushed: each block touched by at most one of them.
        old = bytes(m.data)
        new = bytearray(old)
        blocks = rnd.sample(range(nblocks), 60)
        for b in blocks:
            off = b * BS + rnd.randrange(BS)
            d = rnd.randbytes(rnd.randrange(1, (b + 1) * BS - off + 1))
            aio_pwrite(h, d, off)
            new[off:off + len(d)] = d
        # Kill while some are in flight: after a random share completed.
        target = rnd.randrange(len(blocks))
        while h.aio_in_flight() > len(blocks) - target and h.aio_in_flight() > 0:
            h.poll(-1)
        kill9(srv)
        srv = serve_store(nbdserver, root)
        h = connect(srv, "lab/n1")
        got = read_all(h, SIZE)
        h.shutdown()
        for s in range(0, SIZE, 512):
            sec = got[s:s + 512]
            assert sec in (old[s:s + 512], new[s:s + 512]), f"round {rnd_i}: sector {s}"
        m.data = bytearray(got)  # the survivors are the new state


def test_full_disk_at_flush_time_is_not_sticky(nbdserver, tmp_path, tmpfs):
    """The disk fills up between the writes and the flush that persists
    their (large) block map. The flush may fail, but once space is freed
    the node must take writes and flushes again, and keep its data."""
    from storeutil import aio_pwrite, wait_all
    root, base = make_store(tmp_path)  # the store is the tmpfs
    # 512-byte blocks: a map of many scattered blocks costs little diff space.
    admin(root, "create", "n1", "--image", "lab", "--block-size", "512")
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    m = Model(base, 512)
    h.pwrite(b"F" * BS, 1 * BS)
    h.flush()
    m.write(1 * BS, b"F" * BS)
    # Every other block of the first 4 MiB: a map of 4096 blocks (8 KiB),
    # which needs pages of the bitmap file that no map used before.
    cookies = []
    for b in range(32, 32 + 2 * 4096, 2):
        d = bytes([b % 250 + 1]) * 64
        cookies.append(aio_pwrite(h, d, b * 512 + 8))
        m.write(b * 512 + 8, d)
    wait_all([h])
    for c in cookies:
        assert h.aio_command_completed(c)
    # Now fill what is left of the tmpfs.
    filler = os.path.join(root, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\xff" * 4096)
    except OSError as e:
        assert e.errno == 28
    finally:
        os.close(fd)
    try:
        h.flush()
    except nbd.Error as e:
        assert e.errno in ("ENOSPC", "EIO"), e
    os.unlink(filler)
    h.pwrite(b"G" * BS, 3 * BS)
    m.write(3 * BS, b"G" * BS)
    h.flush()
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()
    srv = restart(nbdserver, srv, root)
    h = connect(srv, "lab/n1")
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()


@pytest.mark.parametrize("extended", [False, True], ids=["structured", "extended"])
def test_block_status_of_a_view_over_raw_sockets(view_srv, extended):
    """Both contexts at once, REQ_ONE, and the dirty context on a
    read-only generation (not offered)."""
    srv, root, base = view_srv
    h = connect(srv, "lab/n1")
    h.pwrite(b"d" * 10, 10 * BS + 5)
    h.trim(4 * BS, 20 * BS)
    h.flush()
    h.shutdown()
    with N.RawClient(srv.tcp) as c:
        c.handshake()
        if extended:
            assert c.opt_extended_headers().type == N.REP_ACK
        else:
            assert c.opt_structured_reply().type == N.REP_ACK
        _, found = c.opt_set_meta_context("lab/n1", ("base:allocation", DIRTY))
        assert set(found) == {"base:allocation", DIRTY}
        c.opt_go("lab/n1")
        err, res = c.block_status(8 * BS, 20 * BS)
        assert err == 0
        dirty = res[found[DIRTY]]
        assert [tuple(e) for e in dirty] == [(2 * BS, 0), (BS, 1), (9 * BS, 0), (4 * BS, 1),
                                            (4 * BS, 0)]
        # The base's first 64 KiB are a hole; block 10 is written, 20-23 trimmed.
        alloc = [(0, n, t & 3) for n, t in res[found["base:allocation"]]]
        merged, pos = [], 8 * BS
        for _, n, t in alloc:
            merged.append((pos, n, t))
            pos += n
        assert [(n, t) for _, n, t in merge_runs(merged)] == [
            (2 * BS, 3), (BS, 0), (5 * BS, 3), (4 * BS, 0), (4 * BS, 3), (4 * BS, 0)]
        err, res = c.block_status(8 * BS, 20 * BS, flags=N.CMD_FLAG_REQ_ONE)
        assert err == 0
        assert [tuple(e) for e in res[found[DIRTY]]] == [(2 * BS, 0)]
        assert len(res[found["base:allocation"]]) == 1
    with N.RawClient(srv.tcp) as c:
        c.handshake()
        c.opt_structured_reply()
        _, found = c.opt_set_meta_context("lab", ("base:allocation", DIRTY))
        assert set(found) == {"base:allocation"}


def test_no_room_for_a_map_log_refuses_the_node_until_space_frees(nbdserver, tmp_path, tmpfs):
    """A node from before the map log existed (no .log file) attaches on a
    full disk: its log cannot be allocated, so the node is refused with the
    reason, its files are left as they are, and once space is freed it
    attaches with its data."""
    root, base = make_store(tmp_path)  # the store is the tmpfs
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    m = Model(base)
    h.pwrite(b"k" * 5000, 7 * BS + 3)
    m.write(7 * BS + 3, b"k" * 5000)
    h.flush()
    h.shutdown()
    wait_detached(root, "n1")
    log = node_files(root, "n1")[0][:-len(".diff")] + ".log"
    os.unlink(log)
    filler = os.path.join(root, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\xff" * 65536)
    except OSError as e:
        assert e.errno == 28
    finally:
        os.close(fd)
    paths = [p for p in node_paths(root, "n1") if not p.endswith((".json", ".log"))]
    before = snapshot_files(paths)
    r = subprocess.run(["nbdinfo", srv.uri("lab/n1")], capture_output=True, text=True,
                       timeout=30, env=dict(os.environ, LIBNBD_DEBUG="1"))
    assert r.returncode != 0
    msg = [l for l in r.stderr.splitlines() if "server error message" in l]
    assert msg and "map log" in msg[0] and "cannot allocate" in msg[0], r.stderr[-2000:]
    assert "cannot allocate" in srv.stderr()
    assert snapshot_files(paths) == before
    srv.assert_alive()
    os.unlink(filler)
    h = connect(srv, "lab/n1")
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()
    assert os.path.getsize(log) == 1 << 20
