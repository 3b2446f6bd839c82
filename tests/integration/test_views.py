"""Node views (--store) against real clients: libnbd (aio, multi-conn),
nbdinfo, nbdcopy and qemu-img, checked against a byte-array model, plus
`nbdserver admin` while the server runs.

Every test starts its own server on a free port (the `nbdserver` fixture)
with --threads 2, so connections of one node are handed between loops.
"""

import json
import os
import random
import subprocess
import threading
import time

import nbd
import nbdraw as N
import pytest

from conftest import MiB, NBDSERVER, run
from storeutil import (BS, DIRTY, Model, add_generation, admin, aio_pread, aio_pwrite,
                       block_runs, connect, kill9, make_store, merge_runs, nbdinfo_map,
                       node_files, node_record, publish_generation, read_all, restart,
                       serve_store, wait_all)

SIZE = 16 * MiB


@pytest.fixture
def store(tmp_path):
    """(store dir, base bytes of lab@g1)."""
    return make_store(tmp_path)


def nbdcopy_to(uri, path):
    run(["nbdcopy", uri, str(path)])
    with open(path, "rb") as f:
        return f.read()


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------- isolation

def test_two_nodes_keep_their_own_data(nbdserver, store, tmp_path):
    root, base = store
    srv = serve_store(nbdserver, root)
    a, b = connect(srv, "lab/n1"), connect(srv, "lab/n2")
    da, db = pattern(1, 3 * BS + 777), pattern(2, 3 * BS + 777)
    a.pwrite(da, 5 * BS + 123)
    b.pwrite(db, 5 * BS + 123)
    a.pwrite(b"A" * 100, SIZE - 100)
    a.flush()
    b.flush()
    ma, mb = Model(base), Model(base)
    ma.write(5 * BS + 123, da)
    ma.write(SIZE - 100, b"A" * 100)
    mb.write(5 * BS + 123, db)
    assert read_all(a, SIZE) == bytes(ma.data)
    assert read_all(b, SIZE) == bytes(mb.data)
    a.shutdown()
    b.shutdown()
    assert nbdcopy_to(srv.uri("lab"), tmp_path / "lab.raw") == base
    assert nbdcopy_to(srv.uri("lab@g1"), tmp_path / "g1.raw") == base
    # And the generation's file itself was never written.
    with open(os.path.join(root, "images/lab/generations/g1/image.ext4"), "rb") as f:
        assert f.read() == base


# ---------------------------------------------------------------- modes

def test_persistent_node_survives_restart_after_flush(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    m = Model(base)
    for i, off in enumerate([0, 3 * BS + 5, 100 * BS, SIZE - BS - 1]):
        d = pattern(10 + i, BS + 1)
        h.pwrite(d, off)
        m.write(off, d)
    h.trim(8 * BS, 40 * BS)
    m.trim(40 * BS, 8 * BS)
    h.flush()
    assert read_all(h, SIZE) == bytes(m.data)
    srv = restart(nbdserver, srv, root)
    h = connect(srv, "lab/n1")
    assert read_all(h, SIZE) == bytes(m.data)
    assert nbdinfo_map(srv.uri("lab/n1"), DIRTY) == block_runs(m.changed, SIZE)
    h.shutdown()


def test_persistent_node_clean_disconnect_without_flush(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    d = pattern(3, 5 * BS + 300)
    h.pwrite(d, 7 * BS + 11)
    h.shutdown()  # NBD_CMD_DISC, no flush
    srv = restart(nbdserver, srv, root)
    m = Model(base)
    m.write(7 * BS + 11, d)
    h = connect(srv, "lab/n1")
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()


@pytest.mark.parametrize("how", ["flag", "admin"])
def test_ephemeral_node_forgets_on_reattach(nbdserver, store, how):
    root, base = store
    if how == "flag":
        srv = serve_store(nbdserver, root, "--node-mode", "ephemeral")
    else:
        admin(root, "create", "n1", "--image", "lab", "--mode", "ephemeral")
        srv = serve_store(nbdserver, root)
    assert how == "flag" or node_record(root, "n1")["mode"] == "ephemeral"
    h = connect(srv, "lab/n1")
    h.pwrite(b"E" * 3000, 2 * BS + 500)
    h.flush()
    assert h.pread(3000, 2 * BS + 500) == b"E" * 3000
    h.shutdown()
    wait_attached(root, "n1", False)  # see the next test for a reattach that races
    h = connect(srv, "lab/n1")
    assert h.pread(4 * BS, 0) == base[:4 * BS]
    assert nbdinfo_map(srv.uri("lab/n1"), DIRTY) == [(0, SIZE, 0)]
    h.shutdown()
    assert node_record(root, "n1")["mode"] == "ephemeral"


def test_ephemeral_reattach_right_after_disconnect(nbdserver, store):
    """A reattach that races the previous connection's detach must still
    start afresh: the old changes may never show up in a new attach."""
    root, base = store
    srv = serve_store(nbdserver, root, "--node-mode", "ephemeral")
    for i in range(20):
        h = connect(srv, "lab/n1")
        got = h.pread(BS, 9 * BS)
        assert got == base[9 * BS:10 * BS], f"round {i}: the previous attach's write is visible"
        h.pwrite(bytes([i + 1]) * BS, 9 * BS)
        h.shutdown()


def test_ephemeral_node_shared_by_connections_attached_together(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root, "--node-mode", "ephemeral")
    h1 = connect(srv, "lab/n1")
    h2 = connect(srv, "lab/n1")
    assert h1.can_multi_conn() and h2.can_multi_conn()
    h1.pwrite(b"1" * 700, 3 * BS + 100)
    h2.pwrite(b"2" * 700, 3 * BS + 2000)
    h2.flush()
    blk = h1.pread(BS, 3 * BS)
    want = bytearray(base[3 * BS:4 * BS])
    want[100:800] = b"1" * 700
    want[2000:2700] = b"2" * 700
    assert blk == bytes(want)
    assert h2.pread(BS, 3 * BS) == bytes(want)
    h1.shutdown()
    # h2 is still attached: the view lives on.
    assert h2.pread(BS, 3 * BS) == bytes(want)
    h2.shutdown()


# ---------------------------------------------------------------- block status

def test_dirty_map_shows_exactly_the_changed_blocks(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    m = Model(base)
    ops = [("w", 0, BS), ("w", 10 * BS + 1, 10), ("w", 20 * BS - 5, 10),
           ("w", 33 * BS, 7 * BS), ("t", 50 * BS, 4 * BS), ("t", 60 * BS + 1, 2 * BS),
           ("z", 70 * BS + 100, 3 * BS), ("z", 80 * BS, BS), ("w", SIZE - 1, 1),
           ("t", 200 * BS + 10, 100), ("z", 300 * BS + 10, 100),
           ("w", 51 * BS + 7, 9)]  # a write into a trimmed block
    for i, (op, off, n) in enumerate(ops):
        if op == "w":
            d = pattern(100 + i, n)
            h.pwrite(d, off)
            m.write(off, d)
        elif op == "t":
            h.trim(n, off)
            m.trim(off, n)
        else:
            h.zero(n, off)
            m.zero_range(off, n)
    # Before a flush (server memory) and after (same answer).
    assert nbdinfo_map(srv.uri("lab/n1"), DIRTY) == block_runs(m.changed, SIZE)
    h.flush()
    assert nbdinfo_map(srv.uri("lab/n1"), DIRTY) == block_runs(m.changed, SIZE)
    assert read_all(h, SIZE) == bytes(m.data)
    # The unaligned trim of 100 bytes changes nothing; a 100-byte zero does.
    assert 200 not in m.changed and 300 in m.changed
    # Via libnbd too, for one range.
    got = []
    h.block_status(64 * BS, 48 * BS,
                   lambda ctx, off, ents, err: got.append((ctx, list(ents))) or 0)
    runs, pos = [], 48 * BS
    for ctx, ents in got:
        if ctx == DIRTY:
            for i in range(0, len(ents), 2):
                runs.append((pos, ents[i], ents[i + 1]))
                pos += ents[i]
    runs = merge_runs(runs)
    covered = runs[-1][0] + runs[-1][1]
    want = merge_runs([(b * BS, BS, 1 if b in m.changed else 0)
                       for b in range(48, covered // BS)])
    assert runs == want and covered > 54 * BS
    h.shutdown()


def expected_allocation(m, base_path):
    """base:allocation per the model: zero blocks are holes, dirty blocks
    data, clean blocks what the base file says (hole = 3, data = 0)."""
    from conftest import file_extents
    file_runs = file_extents(base_path)

    def base_type(off):
        for o, n, hole in file_runs:
            if o <= off < o + n:
                return 3 if hole else 0
        raise AssertionError(off)

    runs = []
    for b in range(m.size // m.bs):
        off = b * m.bs
        if b in m.zero:
            runs.append((off, m.bs, 3))
        elif b in m.changed:
            runs.append((off, m.bs, 0))
        else:
            # 4 KiB blocks lie inside one 64 KiB run of the base's layout.
            runs.append((off, m.bs, base_type(off)))
    return merge_runs(runs)


def test_base_allocation_reports_base_holes_and_zeroed_blocks(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    m = Model(base)
    # Write into a base hole (block 2), zero and trim data blocks of the base.
    h.pwrite(b"x" * 10, 2 * BS + 3)
    m.write(2 * BS + 3, b"x" * 10)
    h.zero(8 * BS, 20 * BS)
    m.zero_range(20 * BS, 8 * BS)
    h.trim(4 * BS, MiB + 16 * BS)
    m.trim(MiB + 16 * BS, 4 * BS)
    h.flush()
    base_path = os.path.join(root, "images/lab/generations/g1/image.ext4")
    assert nbdinfo_map(srv.uri("lab/n1")) == expected_allocation(m, base_path)
    h.shutdown()
    # The base export reports just the base file's holes.
    assert nbdinfo_map(srv.uri("lab")) == expected_allocation(Model(base), base_path)


def nbdinfo_json(uri):
    r = run(["nbdinfo", "--json", uri])
    return json.loads(r.stdout)["exports"][0]


def test_nbdinfo_flags_of_views_and_generations(nbdserver, store):
    root, _ = store
    srv = serve_store(nbdserver, root)
    v = nbdinfo_json(srv.uri("lab/n1"))
    assert v["can_multi_conn"] is True and v["is_read_only"] is False
    assert v["can_flush"] and v["can_fua"] and v["can_trim"] and v["can_zero"]
    assert v["export-size"] == SIZE
    assert DIRTY in v["contexts"] and "base:allocation" in v["contexts"]
    for name in ("lab", "lab@g1"):
        g = nbdinfo_json(srv.uri(name))
        assert g["is_read_only"] is True, name
        assert g["export-size"] == SIZE
        assert DIRTY not in g.get("contexts", []), name


def test_nbdinfo_list_shows_store_images(nbdserver, store):
    root, _ = store
    srv = serve_store(nbdserver, root)
    r = run(["nbdinfo", "--list", "--json", srv.uri("")])
    names = {e["export-name"]: e for e in json.loads(r.stdout)["exports"]}
    assert "lab" in names and names["lab"]["is_read_only"] is True


def test_qemu_img_convert_is_base_plus_diff(nbdserver, store, tmp_path):
    root, base = store
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    m = Model(base)
    rnd = random.Random(5)
    for i in range(60):
        off = rnd.randrange(SIZE - 3 * BS)
        d = rnd.randbytes(rnd.randrange(1, 3 * BS))
        h.pwrite(d, off)
        m.write(off, d)
    h.zero(64 * BS, 2 * MiB)
    m.zero_range(2 * MiB, 64 * BS)
    h.shutdown()
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri("lab/n1"), str(out)])
    with open(out, "rb") as f:
        assert f.read() == bytes(m.data)


# ---------------------------------------------------------------- concurrency

def test_two_unaligned_writes_into_one_clean_block(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    m = Model(base)
    # Block 7, then 200 rounds on distinct clean blocks, all in flight at once.
    pairs = [(7, 100, 500, 3000, 500)]
    rnd = random.Random(7)
    for i, blk in enumerate(rnd.sample(range(8, SIZE // BS), 200)):
        a = rnd.randrange(0, BS // 2 - 1)
        b = rnd.randrange(BS // 2, BS - 1)
        pairs.append((blk, a, rnd.randrange(1, BS // 2 - a), b, rnd.randrange(1, BS - b)))
    cookies = []
    for i, (blk, a, na, b, nb) in enumerate(pairs):
        da, db = pattern(2 * i, na), pattern(2 * i + 1, nb)
        cookies.append(aio_pwrite(h, da, blk * BS + a))
        cookies.append(aio_pwrite(h, db, blk * BS + b))
        m.write(blk * BS + a, da)
        m.write(blk * BS + b, db)
    wait_all([h])
    for c in cookies:
        assert h.aio_command_completed(c)
    assert read_all(h, SIZE) == bytes(m.data)
    h.flush()
    h.shutdown()
    srv = restart(nbdserver, srv, root)
    h = connect(srv, "lab/n1")
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()


def test_multi_conn_disjoint_unaligned_writes_flush_on_one_read_on_another(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    hs = [connect(srv, "lab/n1") for _ in range(4)]
    m = Model(base)
    cookies = []
    for blk in range(40, 90):
        for i, h in enumerate(hs):
            off = blk * BS + i * 1024 + 37
            d = pattern(blk * 10 + i, 900)
            cookies.append((h, aio_pwrite(h, d, off)))
            m.write(off, d)
    wait_all(hs)
    for h, c in cookies:
        assert h.aio_command_completed(c)
    hs[0].flush()
    for h in hs[1:]:
        assert h.pread(50 * BS, 40 * BS) == bytes(m.data[40 * BS:90 * BS])
    for h in hs:
        h.shutdown()
    srv = restart(nbdserver, srv, root)
    h = connect(srv, "lab/n1")
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()


def test_overlapping_writes_in_flight_give_old_or_new_per_sector(nbdserver, store):
    """The one place requests overlap: each 512-byte sector of the overlap
    ends up as one of the two writes, whole."""
    root, base = store
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    rnd = random.Random(11)
    checks = []
    for r in range(50):
        off = r * 4 * BS + rnd.randrange(BS)
        a, b = rnd.randbytes(2 * BS), rnd.randbytes(2 * BS)
        shift = rnd.randrange(1, BS) // 512 * 512
        aio_pwrite(h, a, off)
        aio_pwrite(h, b, off + shift)
        checks.append((off, a, b, shift))
    wait_all([h])
    for off, a, b, shift in checks:
        got = h.pread(2 * BS + shift, off)
        assert got[:shift] == a[:shift]
        assert got[2 * BS:] == b[2 * BS - shift:]
        for s in range(shift, 2 * BS, 512):
            sec = got[s:s + 512]
            assert sec in (a[s:s + 512], b[s - shift:s - shift + 512]), (off, s)
    h.shutdown()


# ---------------------------------------------------------------- reference model

RSIZE = 4 * MiB
SEEDS = int(os.environ.get("NBD_VIEW_SEEDS", "10"))  # per block size; more for a soak


def random_batch(rnd, bs, size):
    """Up to 64 requests whose byte ranges do not overlap, concentrated in a
    few regions so that many share blocks."""
    ops, taken = [], []
    span = min(64 * bs, size // 4)
    hot = [rnd.randrange(0, size - span) for _ in range(3)]
    for _ in range(rnd.randrange(1, 65)):
        kind = rnd.choices(["r", "w", "t", "z", "f"], [30, 40, 10, 12, 3])[0]
        if kind == "f":
            ops.append(("f", 0, 0))
            continue
        base = rnd.choice(hot) if rnd.random() < 0.8 else rnd.randrange(0, size - span)
        if rnd.random() < 0.4:  # aligned
            off = base // bs * bs + rnd.randrange(0, 8) * bs
            n = rnd.randrange(1, 4) * bs
        else:
            off = base + rnd.randrange(0, span // 8)
            n = rnd.randrange(1, min(3 * bs, span // 4))
        n = min(n, size - off)
        if any(off < o + l and o < off + n for o, l in taken):
            continue
        taken.append((off, n))
        ops.append((kind, off, n))
    return ops


def run_batch(hs, m, ops, rnd):
    """Submits `ops` spread over the handles `hs`, waits, checks reads."""
    if not isinstance(hs, list):
        hs = [hs]
    pending = []
    for kind, off, n in ops:
        h = rnd.choice(hs)
        fua = nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0
        if kind == "r":
            c, buf = aio_pread(h, n, off)
            pending.append((h, c, buf, bytes(m.data[off:off + n]), off))
        elif kind == "w":
            d = rnd.randbytes(n)
            pending.append((h, aio_pwrite(h, d, off, fua), None, None, off))
            m.write(off, d)
        elif kind == "t":
            pending.append((h, h.aio_trim(n, off, flags=fua), None, None, off))
            m.trim(off, n)
        elif kind == "z":
            pending.append((h, h.aio_zero(n, off, flags=fua), None, None, off))
            m.zero_range(off, n)
        else:
            pending.append((h, h.aio_flush(), None, None, 0))
    wait_all(hs)
    for h, c, buf, want, off in pending:
        assert h.aio_command_completed(c)
        if buf is not None:
            assert bytes(buf.to_bytearray()) == want, f"read at {off}"


@pytest.mark.parametrize("bs", [4096, 512, 65536])
def test_random_operations_match_the_model(nbdserver, tmp_path, bs):
    root, base = make_store(tmp_path, size=RSIZE, seed=3)
    seeds = list(range(SEEDS))
    for s in seeds:
        if bs != 4096:
            admin(root, "create", f"s{s}", "--image", "lab", "--block-size", str(bs))
    srv = serve_store(nbdserver, root)
    models = {}
    for s in seeds:
        rnd = random.Random(s * 1000 + bs)
        m = models[s] = Model(base, bs)
        h = connect(srv, f"lab/s{s}")
        for _ in range(20):
            run_batch(h, m, random_batch(rnd, bs, RSIZE), rnd)
        h.flush()
        assert read_all(h, RSIZE) == bytes(m.data), f"seed {s}"
        assert nbdinfo_map(srv.uri(f"lab/s{s}"), DIRTY) == block_runs(m.changed, RSIZE, bs)
        h.shutdown()
        if s == len(seeds) // 2:
            srv = restart(nbdserver, srv, root)
            for t in range(s + 1):
                h = connect(srv, f"lab/s{t}")
                assert read_all(h, RSIZE) == bytes(models[t].data), f"seed {t} after restart"
                h.shutdown()
    srv = restart(nbdserver, srv, root)
    for s in seeds:
        h = connect(srv, f"lab/s{s}")
        assert read_all(h, RSIZE) == bytes(models[s].data), f"seed {s} after restart"
        h.shutdown()


# ---------------------------------------------------------------- admin

def admin_list(root):
    return {n["node"]: n for n in json.loads(admin(root, "list", "--json").stdout)}


def wait_attached(root, node, attached):
    """Polls `admin list` until the node is (not) attached: a detach ends
    asynchronously, after the client has gone."""
    for _ in range(500):
        n = admin_list(root)[node]
        if n["attached"] is attached:
            return n
    raise AssertionError(f"node {node}: attached is not {attached}: {n}")


def test_admin_list_while_running(nbdserver, store):
    root, _ = store
    srv = serve_store(nbdserver, root)
    h1, h2 = connect(srv, "lab/n1"), connect(srv, "lab/n1")
    h1.pwrite(b"x" * (3 * BS), 10 * BS)
    h1.pwrite(b"y", 20 * BS + 9)
    h1.trim(2 * BS, 30 * BS)
    h1.flush()
    h2.pread(1, 0)  # h2's handoff to the node's loop (and its count) is done
    n = admin_list(root)["n1"]
    assert (n["image"], n["generation"], n["mode"]) == ("lab", "g1", "persistent")
    assert n["dirty_bytes"] == 4 * BS and n["zeroed_bytes"] == 2 * BS
    assert n["attached"] is True and n["connections"] == 2
    assert n["last_seen"] and n["error"] == ""
    text = admin(root, "list").stdout
    assert "n1" in text and "lab" in text and "g1" in text and "persistent" in text
    assert "16.0 KiB" in text
    h1.shutdown()
    h2.shutdown()
    n = wait_attached(root, "n1", False)
    assert n["connections"] == 0


def test_admin_create_under_registered_then_attach(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root, "--nodes", "registered")
    # libnbd 1.14 shows the server's message only in its debug output.
    r = subprocess.run(["nbdinfo", srv.uri("lab/n1")], capture_output=True, text=True,
                       timeout=30, env=dict(os.environ, LIBNBD_DEBUG="1"))
    assert r.returncode != 0
    assert "server error message" in r.stderr and "not registered" in r.stderr, r.stderr
    assert "not registered" in srv.stderr()
    assert not os.path.exists(os.path.join(root, "nodes", "n1"))
    admin(root, "create", "n1", "--image", "lab")
    h = connect(srv, "lab/n1")
    h.pwrite(b"r" * 10, 0)
    assert h.pread(20, 0) == b"r" * 10 + base[10:20]
    h.shutdown()
    srv.assert_alive()


def wait_detached(root, node):
    for _ in range(1000):
        r = admin(root, "reset", node, check=False)
        if r.returncode == 0:
            return r
        assert "in use" in r.stderr, r.stderr
    raise AssertionError(f"node {node} never detached")


def test_admin_reset_and_delete_refused_while_attached(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    h.pwrite(b"q" * BS, 0)
    h.flush()
    diff, bitmap = node_files(root, "n1")
    for cmd in ("reset", "delete"):
        r = admin(root, cmd, "n1", check=False)
        assert r.returncode == 1 and "in use" in r.stderr, r.stderr
    assert os.path.exists(diff) and os.path.exists(bitmap)
    assert h.pread(BS, 0) == b"q" * BS
    h.shutdown()
    wait_detached(root, "n1")
    h = connect(srv, "lab/n1")
    assert h.pread(BS, 0) == base[:BS]
    assert nbdinfo_map(srv.uri("lab/n1"), DIRTY) == [(0, SIZE, 0)]
    h.shutdown()
    for _ in range(1000):
        r = admin(root, "delete", "n1", check=False)
        if r.returncode == 0:
            break
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(root, "nodes", "n1"))
    assert "n1" not in admin_list(root)


def test_admin_extents_prints_changed_runs(nbdserver, store):
    root, _ = store
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    h.pwrite(b"a" * (2 * BS), 4 * BS)
    h.pwrite(b"b", 6 * BS + 5)
    h.trim(3 * BS, 10 * BS)
    h.pwrite(b"c", SIZE - 1)
    h.flush()
    ext = json.loads(admin(root, "extents", "n1", "--json").stdout)
    assert ext == [{"offset": 4 * BS, "length": 3 * BS, "state": "data"},
                   {"offset": 10 * BS, "length": 3 * BS, "state": "zero"},
                   {"offset": SIZE - BS, "length": BS, "state": "data"}]
    lines = [l.split() for l in admin(root, "extents", "n1").stdout.splitlines()]
    assert lines == [[str(4 * BS), str(3 * BS), "data"], [str(10 * BS), str(3 * BS), "zero"],
                     [str(SIZE - BS), str(BS), "data"]]
    h.shutdown()


def test_new_generation_served_without_restart_nodes_keep_theirs(nbdserver, store, tmp_path):
    root, base1 = store
    srv = serve_store(nbdserver, root)
    old = connect(srv, "lab/old")
    old.pwrite(b"o" * 100, 5 * BS)
    m_old = Model(base1)
    m_old.write(5 * BS, b"o" * 100)
    base2 = add_generation(root, "lab", "g2", seed=2, publish=False)
    assert base2 != base1
    publish_generation(root, "lab", "g2")
    assert nbdcopy_to(srv.uri("lab"), tmp_path / "lab.raw") == base2
    assert nbdcopy_to(srv.uri("lab@g1"), tmp_path / "g1.raw") == base1
    assert read_all(old, SIZE) == bytes(m_old.data)
    new = connect(srv, "lab/new")
    assert read_all(new, SIZE) == base2
    assert node_record(root, "new")["generation"] == "g2"
    assert node_record(root, "old")["generation"] == "g1"
    old.shutdown()
    new.shutdown()
    # reset --generation g2 moves the old node, and drops its changes.
    wait_detached(root, "old")
    admin(root, "reset", "old", "--generation", "g2")
    assert node_record(root, "old")["generation"] == "g2"
    assert admin_list(root)["old"]["generation"] == "g2"
    h = connect(srv, "lab/old")
    assert read_all(h, SIZE) == base2
    h.shutdown()
    assert not os.path.exists(node_files(root, "old", gen="g1")[0])


# ---------------------------------------------------------------- command line

@pytest.mark.parametrize("args, rc, words", [
    (["--nodes", "bogus"], 2, ["--nodes", "bogus"]),
    (["--node-mode", "x"], 2, ["--node-mode", "persistent or ephemeral"]),
    (["--block-size", "1000"], 2, ["--block-size", "power of two"]),
    (["--block-size", "2097152"], 2, ["--block-size", "power of two"]),
])
def test_bad_store_flags(store, tmp_path, args, rc, words):
    root, _ = store
    r = subprocess.run([NBDSERVER, "--store", root, "--listen", "127.0.0.1:0", *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == rc, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_missing_store_directory(tmp_path):
    r = subprocess.run([NBDSERVER, "--store", str(tmp_path / "nonexistent"), "--listen",
                        "127.0.0.1:0"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stderr
    assert "nonexistent" in r.stderr and "No such file or directory" in r.stderr


@pytest.mark.parametrize("args, words", [
    (["create", "x", "--image", "lab", "--block-size", "1000"], ["power of two"]),
    (["create", "x", "--image", "lab", "--mode", "x"], ["persistent or ephemeral"]),
    (["create", "x"], ["--image"]),
    (["frobnicate", "x"], ["unknown command"]),
    (["reset"], ["which node"]),
])
def test_admin_usage_errors(store, args, words):
    root, _ = store
    r = admin(root, *args, check=False)
    assert r.returncode == 2, r.stderr
    for w in words:
        assert w in r.stderr


def test_admin_errors_on_unknown_things(store):
    root, _ = store
    r = admin(root, "create", "x", "--image", "nosuch", check=False)
    assert r.returncode == 1 and "no published generation" in r.stderr, r.stderr
    r = admin(root, "create", "x", "--image", "lab", "--generation", "g9", check=False)
    assert r.returncode == 1 and "g9" in r.stderr, r.stderr
    admin(root, "create", "x", "--image", "lab")
    r = admin(root, "create", "x", "--image", "lab", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr, r.stderr
    for cmd in ("reset", "delete", "extents"):
        r = admin(root, cmd, "nosuch", check=False)
        assert r.returncode == 1 and "does not exist" in r.stderr, (cmd, r.stderr)


# ---------------------------------------------------------------- more attach rules

def test_node_of_another_image_is_refused(nbdserver, store):
    root, base = store
    add_generation(root, "lab2", "g1", seed=9)
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    h.pwrite(b"n", 0)
    with pytest.raises(nbd.Error):
        connect(srv, "lab2/n1")  # while attached
    h.shutdown()
    wait_attached(root, "n1", False)
    with pytest.raises(nbd.Error):
        connect(srv, "lab2/n1")  # and after
    assert "belongs to image 'lab'" in srv.stderr()
    h = connect(srv, "lab/n1")
    assert h.pread(2, 0) == b"n" + base[1:2]
    h.shutdown()


def test_block_size_not_dividing_the_image_is_refused(nbdserver, tmp_path):
    # (Not SIZE + BS: add_generation's 64 KiB holes at each MiB would grow it.)
    root, _ = make_store(tmp_path, size=SIZE - BS)
    admin(root, "create", "big", "--image", "lab", "--block-size", "65536")
    srv = serve_store(nbdserver, root)
    with pytest.raises(nbd.Error):
        connect(srv, "lab/big")
    assert "not a multiple" in srv.stderr()
    h = connect(srv, "lab/small")  # 4 KiB blocks divide it
    h.pwrite(b"e" * 10, SIZE - BS - 10)
    assert h.pread(10, SIZE - BS - 10) == b"e" * 10
    h.shutdown()


def test_sigterm_with_a_node_attached_keeps_its_writes(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    m = Model(base)
    for i in range(20):
        d = pattern(500 + i, 3000)
        h.pwrite(d, i * 3 * BS + 77)
        m.write(i * 3 * BS + 77, d)
    srv = restart(nbdserver, srv, root)  # the client is still attached, unflushed
    h2 = connect(srv, "lab/n1")
    assert read_all(h2, SIZE) == bytes(m.data)
    h2.shutdown()


def test_ephemeral_node_is_fresh_after_restart(nbdserver, store):
    root, base = store
    admin(root, "create", "e1", "--image", "lab", "--mode", "ephemeral")
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/e1")
    h.pwrite(b"E" * BS, 0)
    h.flush()
    h.shutdown()
    srv = restart(nbdserver, srv, root)
    h = connect(srv, "lab/e1")
    assert h.pread(BS, 0) == base[:BS]
    h.shutdown()


@pytest.mark.parametrize("how", ["flush", "fua"])
def test_acknowledged_durable_writes_survive_sigkill(nbdserver, store, how):
    root, base = store
    srv = serve_store(nbdserver, root)
    m = Model(base)
    rnd = random.Random(21)
    for rnd_i in range(5):
        h = connect(srv, "lab/n1")
        for i in range(10):
            off = rnd.randrange(SIZE - 2 * BS)
            d = rnd.randbytes(rnd.randrange(1, 2 * BS))
            h.pwrite(d, off, nbd.CMD_FLAG_FUA if how == "fua" else 0)
            m.write(off, d)
        if how == "flush":
            h.flush()
        kill9(srv)
        srv = serve_store(nbdserver, root)
        h = connect(srv, "lab/n1")
        assert read_all(h, SIZE) == bytes(m.data), f"round {rnd_i}"
        h.shutdown()


def test_two_servers_on_one_store_never_share_a_node(nbdserver, store):
    root, base = store
    a = serve_store(nbdserver, root)
    b = serve_store(nbdserver, root)
    h = connect(a, "lab/n1")
    h.pwrite(b"a" * 10, 0)
    with pytest.raises(nbd.Error):
        connect(b, "lab/n1")
    assert "in use" in b.stderr()
    h.pwrite(b"b" * 10, 10)
    h.shutdown()
    wait_attached(root, "n1", False)
    h = connect(b, "lab/n1")
    assert h.pread(30, 0) == b"a" * 10 + b"b" * 10 + base[20:30]
    h.shutdown()


def test_dirty_and_allocation_maps_with_thousands_of_runs(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    h = connect(srv, "lab/n1")
    m = Model(base)
    cookies = []
    for b in range(0, SIZE // BS, 2):
        d = bytes([b % 200 + 1]) * 10
        cookies.append(aio_pwrite(h, d, b * BS + 100))
        m.write(b * BS + 100, d)
    for b in range(1, SIZE // BS, 6):
        cookies.append(h.aio_trim(BS, b * BS))
        m.trim(b * BS, BS)
    wait_all([h])
    for c in cookies:
        assert h.aio_command_completed(c)
    want = block_runs(m.changed, SIZE)
    assert len(want) > 1000
    assert nbdinfo_map(srv.uri("lab/n1"), DIRTY) == want
    base_path = os.path.join(root, "images/lab/generations/g1/image.ext4")
    assert nbdinfo_map(srv.uri("lab/n1")) == expected_allocation(m, base_path)
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()


@pytest.mark.parametrize("name", ["lab/.hidden", "lab/..", "lab/a/../../../etc", "../lab/x",
                                  "lab/x y", "lab@../g1", ".lab/n1", "lab/" + "n" * 300,
                                  "lab@g1/n1", "nosuch/n1"])
def test_bad_store_names_are_unknown_and_create_nothing(nbdserver, store, name):
    root, _ = store
    srv = serve_store(nbdserver, root)
    before = sorted(os.walk(os.path.dirname(root)))
    with pytest.raises(nbd.Error):
        connect(srv, name)
    assert sorted(os.walk(os.path.dirname(root))) == before
    srv.assert_alive()


def test_admin_create_pinned_to_an_older_generation(nbdserver, store):
    root, base1 = store
    base2 = add_generation(root, "lab", "g2", seed=2)
    admin(root, "create", "old", "--image", "lab", "--generation", "g1")
    srv = serve_store(nbdserver, root)
    h, n = connect(srv, "lab/old"), connect(srv, "lab/new")
    assert read_all(h, SIZE) == base1
    assert read_all(n, SIZE) == base2
    h.shutdown()
    n.shutdown()
    assert admin_list(root)["old"]["generation"] == "g1"
    assert admin_list(root)["new"]["generation"] == "g2"


@pytest.mark.parametrize("mode", ["persistent", "ephemeral"])
def test_attach_detach_cycles_leak_no_descriptors(nbdserver, store, mode):
    root, base = store
    srv = serve_store(nbdserver, root, "--node-mode", mode)

    def cycle(node):
        h = connect(srv, f"lab/{node}")
        h.pwrite(b"c" * 100, 5 * BS + 1)
        h.flush()
        h.shutdown()

    cycle("warm")
    wait_attached(root, "warm", False)
    fds = srv.num_fds()
    for i in range(30):
        cycle(f"c{i}")
        cycle("warm")
    for i in range(30):
        wait_attached(root, f"c{i}", False)
    wait_attached(root, "warm", False)
    assert srv.num_fds() == fds


def test_random_operations_over_several_connections(nbdserver, tmp_path):
    """The same model test with each batch spread over three connections
    of one node (handed to one loop): what one completed, all see."""
    root, base = make_store(tmp_path, size=RSIZE, seed=4)
    srv = serve_store(nbdserver, root)
    for s in range(SEEDS):
        rnd = random.Random(s + 4242)
        m = Model(base)
        hs = [connect(srv, f"lab/mc{s}") for _ in range(3)]
        for _ in range(20):
            run_batch(hs, m, random_batch(rnd, BS, RSIZE), rnd)
        hs[1].flush()
        for h in hs:
            assert read_all(h, RSIZE) == bytes(m.data), f"seed {s}"
        assert nbdinfo_map(srv.uri(f"lab/mc{s}"), DIRTY) == block_runs(m.changed, RSIZE)
        for h in hs:
            h.shutdown()


def test_unpublished_and_missing_generations(nbdserver, store, tmp_path):
    root, base1 = store
    base2 = add_generation(root, "lab", "g2", seed=2, publish=False)
    srv = serve_store(nbdserver, root)
    assert nbdcopy_to(srv.uri("lab@g2"), tmp_path / "g2.raw") == base2
    assert nbdcopy_to(srv.uri("lab"), tmp_path / "lab.raw") == base1
    with pytest.raises(nbd.Error):
        connect(srv, "lab@g9", dirty=False)
    assert "g9" in srv.stderr()
    assert not os.path.exists(os.path.join(root, "nodes", "n1"))


def resume_handle(srv, export):
    """A libnbd handle on `export` (may hold '?', which a URI cannot)."""
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_tcp(*[str(x) for x in srv.tcp])
    return h


@pytest.mark.parametrize("mode", ["persistent", "ephemeral"])
def test_resume_supersedes_the_nodes_older_connections(nbdserver, store, mode):
    """A node that resumes (nbdroot-keeper after its kernel gave up on a
    connection) keeps its data, ephemeral or not, and the server closes the
    node's older connections, whose unread requests would be stale."""
    root, base = store
    srv = serve_store(nbdserver, root, "--node-mode", mode)
    old = connect(srv, "lab/n1")
    old.pwrite(b"o" * 3 * BS, 4 * BS)          # acknowledged, never flushed
    new = resume_handle(srv, f"lab/n1?mode={mode}&resume")
    assert new.pread(3 * BS, 4 * BS) == b"o" * 3 * BS
    deadline = time.monotonic() + 10
    while True:
        try:
            old.pread(BS, 0)
        except nbd.Error:
            break  # closed by the server
        assert time.monotonic() < deadline, "the older connection is still served"
        time.sleep(0.1)
    new.pwrite(b"n" * BS, 5 * BS)
    new.flush()
    assert new.pread(3 * BS, 4 * BS) == b"o" * BS + b"n" * BS + b"o" * BS
    assert "node 'n1' resumed on conn" in srv.stderr()
    new.shutdown()


def test_page_cached_reads_of_mixed_views_match_the_model(nbdserver, tmp_path):
    """Reads of a view in runs of changed, zeroed and clean blocks, once all
    of it is in the page cache: such replies are sent straight from the
    mappings as one iovec list (diff, image, zero pages). Up to
    SendQueue::kMaxParts (256) pieces per read go that way, more the normal
    way. Simple replies (a raw client) and structured ones (libnbd) alike."""
    import nbdraw as N
    size = 8 * MiB
    root, base = make_store(tmp_path, size=size, seed=9)
    srv = serve_store(nbdserver, root)
    m = Model(base, BS)
    h = connect(srv, "lab/n1")
    rnd = random.Random(9)
    # One piece per block in the first 2 MiB, per run of 8 blocks after it.
    run = 8 * BS
    runs = [(off, BS) for off in range(0, 2 * MiB, BS)]
    runs += [(off, run) for off in range(2 * MiB, size, run)]
    for i, (off, n) in enumerate(runs):
        kind = i % 3
        if kind == 0:
            data = rnd.randbytes(n)
            h.pwrite(data, off)
            m.write(off, data)
        elif kind == 1:
            h.zero(n, off)
            m.zero_range(off, n)
    h.flush()
    read_all(h, size)  # the diff and the image in the page cache
    host, port = srv.addresses[0].rsplit(":", 1)
    raw = N.RawClient((host, int(port))).connect_export("lab/n1", structured=False)
    spans = [(0, MiB), (3 * BS, MiB + 5 * BS), (BS, 256 * BS), (BS, 257 * BS),
             (2 * MiB, 192 * run), (5 * BS, 2 * BS), (2 * MiB + run + BS, run),
             (size - 3 * run, 3 * run), (2 * MiB - 3 * BS, 6 * run)]
    spans += [(rnd.randrange(0, size - MiB) // 512 * 512, rnd.randrange(1, MiB // 512) * 512)
              for _ in range(40)]
    for off, n in spans:
        want = bytes(m.data[off:off + n])
        for _ in range(2):
            assert h.pread(n, off) == want, f"structured read {off}+{n}"
            err, got, _ = raw.read(off, n)
            assert err == 0 and got == want, f"simple read {off}+{n}"
    raw.disconnect()
    h.shutdown()


# ---------------------------------------------------------------- attach threads

ATTACH_DELAY = 1.5  # s, NBDROOT_FAULT_ATTACH_DELAY_MS: a node creation as slow as a busy disk


def raw_info(srv, export):
    """NBD_OPT_INFO of `export` on a raw connection; returns its replies."""
    with N.RawClient(srv.tcp, timeout=30) as c:
        c.handshake()
        return c.opt_go(export, opt=N.OPT_INFO)


@pytest.mark.parametrize("how", ["go", "info"])
def test_a_slow_attach_does_not_stall_other_nodes_on_its_loop(nbdserver, store, how):
    """Opening or creating a node's view (NBD_OPT_GO), or creating its
    record (NBD_OPT_INFO of a new node), runs on the attach threads, not on
    the event loop: while one node's creation is slow (fault injection,
    under the store's lock as a creation's fsyncs are), another node on the
    same loop (--threads 1) keeps reading, and closing a connection does
    not wait for it either."""
    root, base = store
    srv = nbdserver(args=["--store", root, "--threads", "1"],
                    env=dict(os.environ, NBDROOT_FAULT_ATTACH_DELAY_MS=str(int(ATTACH_DELAY * 1000))))
    a = connect(srv, "lab/a")  # pays the delay itself
    spare = connect(srv, "lab/spare")
    assert a.pread(BS, 0) == base[:BS]
    got = {}

    def attach_b():
        t0 = time.monotonic()
        got["b"] = connect(srv, "lab/b") if how == "go" else raw_info(srv, "lab/b")
        got["took"] = time.monotonic() - t0

    th = threading.Thread(target=attach_b)
    th.start()
    time.sleep(0.2)  # b's attach is under way
    worst, n, closed = 0.0, 0, False
    start = time.monotonic()
    while time.monotonic() < start + ATTACH_DELAY * 0.6:
        if not closed and time.monotonic() > start + ATTACH_DELAY * 0.2:
            spare.shutdown()  # a detach on the same loop during b's attach: a's
            closed = True     # next reads wait for it if it waits for b
        off = (n * 977 % (SIZE // BS)) * BS
        t0 = time.monotonic()
        assert a.pread(BS, off) == base[off:off + BS]
        worst = max(worst, time.monotonic() - t0)
        n += 1
    th.join(30)
    assert "b" in got, "b's attach did not finish"
    assert got["took"] >= ATTACH_DELAY * 0.9, f"b's attach took {got['took']:.2f} s"
    assert worst < ATTACH_DELAY / 3, (
        f"a read of node a waited {worst:.2f} s during node b's attach ({n} reads)")
    if how == "go":
        b = got["b"]
        b.pwrite(b"b" * BS, 0)
        b.flush()
        assert b.pread(BS, 0) == b"b" * BS
        b.shutdown()
    else:
        assert not got["b"][-1].is_error, got["b"]
        assert node_record(root, "b")["image"] == "lab"
    assert a.pread(BS, 0) == base[:BS]
    a.shutdown()


def test_a_client_gone_during_its_attach_leaves_the_node_free(nbdserver, store):
    """A client that hangs up while its node is being attached: the attach
    finishes on the attach threads, and the loop lets it go, so the node
    can be attached again (from another address too), and SIGTERM during
    an attach still stops the server cleanly."""
    root, base = store
    srv = nbdserver(args=["--store", root, "--threads", "1"],
                    env=dict(os.environ, NBDROOT_FAULT_ATTACH_DELAY_MS="800"))
    with N.RawClient(srv.tcp) as c:
        c.handshake()
        c.send_option(N.OPT_GO, c.go_data("lab/gone"))
        time.sleep(0.2)  # the attach is under way
    time.sleep(1.0)  # and done, for nobody
    h = connect(srv, "lab/gone")
    assert h.pread(BS, 0) == base[:BS]
    h.shutdown()
    deadline = time.monotonic() + 10
    while node_record(root, "gone")["connections"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node_record(root, "gone")["connections"] == 0, node_record(root, "gone")
    srv.assert_alive()
    # SIGTERM while an attach runs: the loop waits for it, then stops.
    with N.RawClient(srv.tcp) as c:
        c.handshake()
        c.send_option(N.OPT_GO, c.go_data("lab/late"))
        time.sleep(0.2)
        assert srv.terminate() == 0, srv.stderr()[-3000:]
