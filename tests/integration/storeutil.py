"""Helpers for tests that serve a store (--store): lay out images and
generations by hand (no imagebuilder needed), run `nbdserver admin`, and
read a node's files.

Store layout (docs/ARCHITECTURE.md, "The store"):
  images/<image>/generations/<gen>/{image.ext4,manifest.json}
  images/<image>/current -> generations/<gen>
  nodes/<node>/{node.json,<image>.<gen>.diff,<image>.<gen>.bitmap,lock}
"""

import json
import os
import random
import subprocess
import time

from conftest import NBDSERVER

MiB = 1 << 20


def add_generation(store, image, gen, size=16 * MiB, seed=1, publish=True, data=None):
    """Writes a full generation whose image holds random bytes (or `data`),
    with some holes, and returns those bytes."""
    d = os.path.join(store, "images", image, "generations", gen)
    os.makedirs(d, exist_ok=True)
    if data is None:
        rnd = random.Random(seed)
        data = bytearray(rnd.randbytes(size))
        # Holes every 1 MiB, so base:allocation has something to report.
        for off in range(0, size, MiB):
            data[off:off + 64 * 1024] = bytes(len(data[off:off + 64 * 1024]))
    path = os.path.join(d, "image.ext4")
    # Written sparsely: all-zero 64 KiB chunks are left as holes.
    with open(path, "wb") as f:
        for off in range(0, len(data), 64 * 1024):
            chunk = data[off:off + 64 * 1024]
            if any(chunk):
                f.seek(off)
                f.write(chunk)
        f.truncate(len(data))
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump({"image": image, "generation": gen, "parent": None, "format": "full",
                   "size": len(data), "block_size": 4096}, f)
    if publish:
        publish_generation(store, image, gen)
    return bytes(data)


def publish_generation(store, image, gen):
    link = os.path.join(store, "images", image, "current")
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.join("generations", gen), tmp)
    os.replace(tmp, link)


def make_store(tmp_path, image="lab", gen="g1", size=16 * MiB, seed=1):
    """A store with one published generation. Returns (store dir, base bytes)."""
    store = str(tmp_path / "store")
    os.makedirs(store, exist_ok=True)
    base = add_generation(store, image, gen, size=size, seed=seed)
    return store, base


def admin(store, *args, check=True):
    """Runs `nbdserver admin --store STORE ARGS...`; returns CompletedProcess."""
    r = subprocess.run([NBDSERVER, "admin", "--store", store, *args],
                       capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"admin {args} failed ({r.returncode}): {r.stderr}")
    return r


def node_files(store, node, image="lab", gen="g1"):
    """Paths of a node's diff and bitmap."""
    prefix = os.path.join(store, "nodes", node, f"{image}.{gen}")
    return prefix + ".diff", prefix + ".bitmap"


def node_record(store, node):
    with open(os.path.join(store, "nodes", node, "node.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- test helpers
# (appended for test_views.py and test_views_faults.py)

import hashlib
import signal as _signal

import nbd as _nbd

BS = 4096
DIRTY = "nbdroot:dirty"


def serve_store(start, store, *args, threads=2):
    """Starts nbdserver --store STORE (via the conftest `nbdserver` factory)."""
    return start(args=["--store", store, "--threads", str(threads), *args])


def restart(start, server, store, *args, threads=2):
    """SIGTERMs `server` (must exit 0) and starts a new one on the same store."""
    rc = server.terminate()
    assert rc == 0, f"nbdserver exit status after SIGTERM: {rc}\n{server.stderr()[-3000:]}"
    return serve_store(start, store, *args, threads=threads)


def kill9(server):
    server.proc.send_signal(_signal.SIGKILL)
    server.proc.wait(10)
    server.stopped = True


def connect(server, export, dirty=True):
    """A libnbd handle on `export` with base:allocation (and nbdroot:dirty)."""
    h = _nbd.NBD()
    h.add_meta_context("base:allocation")
    if dirty:
        h.add_meta_context(DIRTY)
    h.connect_uri(server.uri(export))
    return h


def wait_all(handles):
    """Polls each handle until nothing is in flight."""
    for h in handles:
        while h.aio_in_flight() > 0:
            h.poll(-1)


def aio_pwrite(h, data, offset, flags=0):
    return h.aio_pwrite(_nbd.Buffer.from_bytearray(bytearray(data)), offset, flags=flags)


def aio_pread(h, length, offset):
    """Returns (cookie, buffer); read the data with buf.to_bytearray()."""
    buf = _nbd.Buffer(length)
    return h.aio_pread(buf, offset), buf


def read_all(h, size, chunk=4 * MiB):
    out = bytearray()
    for off in range(0, size, chunk):
        out += h.pread(min(chunk, size - off), off)
    return bytes(out)


def sha256_path(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(MiB), b""):
            h.update(b)
    return h.hexdigest()


def snapshot_files(paths):
    return {p: sha256_path(p) if os.path.exists(p) else None for p in paths}


def merge_runs(runs):
    """Merges adjacent (offset, length, type) runs of the same type."""
    out = []
    for off, n, t in runs:
        if n == 0:
            continue
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, t)
        else:
            out.append((off, n, t))
    return out


def nbdinfo_map(uri, context="base:allocation"):
    """nbdinfo --map=CONTEXT --json as merged (offset, length, type) runs."""
    r = subprocess.run(["nbdinfo", "--json", f"--map={context}", uri], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, f"nbdinfo --map failed: {r.stderr}"
    return merge_runs([(e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout)])


def block_runs(blocks, size, bs=BS):
    """(offset, length, 1 if in `blocks` else 0) runs over the whole view."""
    return merge_runs([(b * bs, bs, 1 if b in blocks else 0) for b in range(size // bs)])


class Model:
    """The reference: bytes of a view plus the set of changed blocks."""

    def __init__(self, base, bs=BS):
        self.data = bytearray(base)
        self.bs = bs
        self.size = len(base)
        self.changed = set()
        self.zero = set()  # blocks in the zero state (read as holes)

    def _blocks(self, off, n):
        return range(off // self.bs, (off + n - 1) // self.bs + 1)

    def write(self, off, data):
        self.data[off:off + len(data)] = data
        for b in self._blocks(off, len(data)):
            self.changed.add(b)
            self.zero.discard(b)

    def _whole(self, off, n):
        first = (off + self.bs - 1) // self.bs
        end = (off + n) // self.bs if off + n < self.size else (off + n + self.bs - 1) // self.bs
        return range(first, end)

    def trim(self, off, n):
        """Whole blocks inside the range read as zeros; partial ones are kept."""
        for b in self._whole(off, n):
            self.data[b * self.bs:(b + 1) * self.bs] = bytes(self.bs)
            self.changed.add(b)
            self.zero.add(b)

    def zero_range(self, off, n):
        whole = set(self._whole(off, n))
        for b in self._blocks(off, n):
            if b in whole:
                self.zero.add(b)
            elif b not in self.zero:
                pass  # a partial edge is written with zeros (dirty, not zero)
            self.changed.add(b)
        self.data[off:off + n] = bytes(n)


def write_chunk_digests(store, image, gen, data, chunk_size=64 * 1024):
    """Writes generations/GEN/chunks.sha256 for `data` as imagebuilder does
    (format: nbdserver/storage/chunk_digests.hpp): a 128-byte header, then
    one SHA-256 per chunk. Returns the path."""
    import hashlib
    import struct
    import zlib
    table = b"".join(hashlib.sha256(data[o:o + chunk_size]).digest()
                     for o in range(0, len(data), chunk_size))
    tag = 1469598103934665603
    for ch in f"{image}@{gen}".encode():
        tag = ((tag ^ ch) * 1099511628211) & (2**64 - 1)
    head = struct.pack("<8sIIIIII QQQ", b"NBDRCHKS", 1, 128, 1, 32, chunk_size, 0,
                       len(data), (len(data) + chunk_size - 1) // chunk_size, tag)
    head += hashlib.sha256(table).digest() + bytes(36)
    head += struct.pack("<I", zlib.crc32(head))
    assert len(head) == 128
    path = os.path.join(store, "images", image, "generations", gen, "chunks.sha256")
    with open(path, "wb") as f:
        f.write(head + table)
    return path


def wait_for_text(path, text, timeout=20):
    """Waits until the file at `path` (a log) holds `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            if text in f.read():
                return
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {path} within {timeout} s: {open(path).read()}")


def stop_cleanly(proc):
    """SIGTERM; the process must exit 0 within 20 s."""
    proc.send_signal(_signal.SIGTERM)
    assert proc.wait(20) == 0


def kill_if_running(proc):
    """For a finally: no process outlives its test."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
