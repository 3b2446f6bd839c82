"""imagebuilder: a directory becomes ext4 generations in a store.

Real tools only: the imagebuilder binary, e2fsck, loop mounts (we run as
root), tmpfs for full-disk cases, nbdserver and nbdcopy for serving.

- fidelity: a generated tree with every file type and attribute is built,
  checked with `e2fsck -fn`, loop-mounted read-only and compared whole
  (contents, metadata, hard-link groups, xattrs) with the source;
- determinism, incremental builds (sharing, store growth, time), life cycle
  (publish, rollback, gc with node.json files), every bad input, and
  generations served by nbdserver through <image>@<gen>.
"""

import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import time
import zlib

import pytest

from conftest import MiB, NBDSERVER, run, sha256_file

IMAGEBUILDER = os.environ.get("IMAGEBUILDER", "/work/main/build-ib/imagebuilder/imagebuilder")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts and mknod need root")


# ---------------------------------------------------------------- helpers

def ib(store, *args, check=True, timeout=300, **kw):
    """Runs imagebuilder; returns the CompletedProcess."""
    return run([IMAGEBUILDER, "--store", str(store)] + [str(a) for a in args],
               timeout=timeout, check=check, **kw)


def build(store, image, src, *extra):
    p = ib(store, "build", image, "--from", src, *extra)
    gen = p.stdout.strip().splitlines()[-1]
    assert gen and "/" not in gen and "@" not in gen, p.stdout
    return gen


def gen_dir(store, image, gen):
    return os.path.join(store, "images", image, "generations", gen)


def manifest(store, image, gen):
    with open(os.path.join(gen_dir(store, image, gen), "manifest.json")) as f:
        return json.load(f)


def flat_image(store, image, gen, tmp_path):
    """A full image file of `gen`: image.ext4, or a flattened copy of the store."""
    d = gen_dir(store, image, gen)
    if os.path.exists(os.path.join(d, "image.ext4")):
        return os.path.join(d, "image.ext4")
    copy = tmp_path / f"flatcopy-{gen}"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(store, copy, symlinks=True)
    ib(copy, "flatten", image, gen)
    return os.path.join(gen_dir(copy, image, gen), "image.ext4")


def e2fsck(path):
    p = run(["e2fsck", "-fn", path], check=False)
    assert p.returncode == 0, f"e2fsck -fn {path}: {p.returncode}\n{p.stdout}\n{p.stderr}"


class Mounted:
    def __init__(self, image, mnt):
        self.image, self.mnt = image, str(mnt)

    def __enter__(self):
        os.makedirs(self.mnt, exist_ok=True)
        run(["mount", "-o", "loop,ro,noload", self.image, self.mnt])
        return self.mnt

    def __exit__(self, *a):
        run(["umount", self.mnt], check=False)


def store_snapshot(store):
    """Every path under the store with type, size and symlink target."""
    out = {}
    for root, dirs, files in os.walk(store):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            out[os.path.relpath(p, store)] = (
                stat.S_IFMT(st.st_mode), st.st_size if stat.S_ISREG(st.st_mode) else 0,
                os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
    return out


# ---------------------------------------------------------------- trees

def _fd_path(dirfd, name):
    return f"/proc/self/fd/{dirfd}/{name}"


def make_full_tree(root, seed=1):
    """Every file type and attribute, long names and a tree deeper than PATH_MAX."""
    rng = random.Random(seed)
    os.makedirs(root)
    r = str(root)
    os.makedirs(f"{r}/etc/sub")
    for i in range(12):
        with open(f"{r}/etc/file{i}", "wb") as f:
            f.write(rng.randbytes(rng.choice([1, 100, 4095, 4096, 4097, 70000, 300000])))
    open(f"{r}/empty", "wb").close()
    with open(f"{r}/sparse", "wb") as f:        # holes at the start, middle and end
        f.truncate(64 * MiB)
        f.seek(5 * MiB)
        f.write(rng.randbytes(10000))
        f.seek(40 * MiB + 123)
        f.write(b"tail data")
    with open(f"{r}/etc/big", "wb") as f:
        f.write(rng.randbytes(3 * MiB))
    os.symlink("etc/file1", f"{r}/link-short")
    os.symlink("x" * 200 + "/long/target", f"{r}/link-long")
    os.symlink("dangling", f"{r}/etc/sub/dangling")
    os.link(f"{r}/etc/file2", f"{r}/hard1")
    os.link(f"{r}/etc/file2", f"{r}/etc/sub/hard2")
    os.link(f"{r}/link-short", f"{r}/hardlink-to-symlink")
    os.mknod(f"{r}/chr", 0o620 | stat.S_IFCHR, os.makedev(4, 64))
    os.mknod(f"{r}/blk", 0o660 | stat.S_IFBLK, os.makedev(259, 300000))
    os.mkfifo(f"{r}/fifo", 0o600)
    s = socket.socket(socket.AF_UNIX)
    s.bind(f"{r}/sock")
    s.close()
    os.chmod(f"{r}/etc/file3", 0o4755)          # setuid
    os.chmod(f"{r}/etc/file4", 0o2711)          # setgid
    os.mkdir(f"{r}/tmp")
    os.chmod(f"{r}/tmp", 0o1777)                # sticky
    os.mkdir(f"{r}/sgid-dir")
    os.chmod(f"{r}/sgid-dir", 0o2775)
    os.chown(f"{r}/etc/file5", 1000, 1000)
    os.chown(f"{r}/etc/file6", 100000, 70000)   # ids above 16 bits
    os.chown(f"{r}/link-short", 33, 44, follow_symlinks=False)
    os.chown(f"{r}/chr", 0, 5)
    os.setxattr(f"{r}/etc/file1", "user.comment", b"hello")
    os.setxattr(f"{r}/etc/file1", "trusted.overlay", rng.randbytes(300))
    # file capabilities (cap_net_raw+ep, v2) and an SELinux label
    os.setxattr(f"{r}/etc/file7", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    os.setxattr(f"{r}/etc/file7", "security.selinux", b"system_u:object_r:bin_t:s0\0")
    os.setxattr(f"{r}/etc/sub", "user.dir", b"on a directory")
    os.setxattr(f"{r}/etc/file8", "user.big", rng.randbytes(2000))
    os.setxattr(f"{r}", "user.root", b"root xattr")
    os.chmod(r, 0o750)
    os.chown(r, 0, 10)
    long_name = "L" * 255
    with open(f"{r}/{long_name}", "w") as f:
        f.write("long name")
    os.mkdir(f"{r}/é-ünïcode \t name\n")
    # deeper than PATH_MAX: 60 levels of 100-byte names, created by fd
    fd = os.open(r, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(60):
        name = f"{i:03d}" + "d" * 97
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"at the bottom")
    os.close(leaf)
    os.close(fd)
    # timestamps with nanoseconds, old and post-2038
    os.utime(f"{r}/etc/file9", ns=(1_000_000_123, 2_000_000_456))
    os.utime(f"{r}/etc/file10", ns=(4_102_444_800_000_000_001, 4_102_444_800_999_999_999))
    os.utime(f"{r}/link-long", ns=(1_500_000_000_111_111_111, 1_500_000_000_222_222_222),
             follow_symlinks=False)


def walk(root):
    """{relpath: record} of a tree, with fds so paths may exceed PATH_MAX.
    Reads use O_NOATIME, so walking leaves access times as they were."""
    out = {}

    def rec(dirfd, rel, name):
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        p = _fd_path(dirfd, name)
        try:
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False)
                      for k in sorted(os.listxattr(p, follow_symlinks=False))}
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            xattrs = {}
        r = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
             "mtime": st.st_mtime_ns, "ctime": st.st_ctime_ns, "xattrs": xattrs,
             "ino": st.st_ino, "nlink": st.st_nlink}
        if not stat.S_ISLNK(st.st_mode):
            r["atime"] = st.st_atime_ns
        if stat.S_ISREG(st.st_mode):
            r["size"] = st.st_size
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME, dir_fd=dirfd)
            h = hashlib.sha256()
            while True:
                b = os.read(fd, MiB)
                if not b:
                    break
                h.update(b)
            os.close(fd)
            r["sha256"] = h.hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            r["target"] = os.readlink(name, dir_fd=dirfd)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            r["rdev"] = st.st_rdev
        out[rel] = r
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME, dir_fd=dirfd)
            try:
                for child in sorted(os.listdir(fd)):
                    rec(fd, f"{rel}/{child}" if rel else child, child)
            finally:
                os.close(fd)

    top = os.open(os.path.dirname(os.path.abspath(root)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        rec(top, "", os.path.basename(os.path.abspath(root)))
    finally:
        os.close(top)
    return out


def link_groups(tree):
    groups = {}
    for p, r in tree.items():
        if not stat.S_ISDIR(r["mode"]) and r["nlink"] > 1:
            groups.setdefault(r["ino"], set()).add(p)
    return sorted(sorted(g) for g in groups.values())


def assert_same_tree(src, img, check_ctime=True, check_atime=True):
    img = dict(img)
    if "lost+found" not in src and "lost+found" in img:   # made by mke2fs
        img.pop("lost+found")
        img[""] = dict(img[""], nlink=img[""]["nlink"] - 1)
    assert sorted(src) == sorted(img), (set(src) ^ set(img))
    for p in src:
        a, b = dict(src[p]), dict(img[p])
        for r in (a, b):
            r.pop("ino")
            if not check_ctime:
                r.pop("ctime")
            if not check_atime:
                r.pop("atime", None)
        if p == "":   # the mount point's own atime/ctime are ours
            a.pop("atime", None), b.pop("atime", None)
        assert a == b, f"/{p} differs:\nsource {a}\nimage  {b}"
    assert link_groups(src) == link_groups(img)


def make_data_tree(root, files, total, seed):
    """`files` regular files of random data summing to about `total` bytes."""
    rng = random.Random(seed)
    os.makedirs(root)
    sizes = [rng.randint(1, 2 * total // files) for _ in range(files)]
    scale = total / sum(sizes)
    for i, s in enumerate(sizes):
        d = os.path.join(root, f"dir{i % 8}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:04d}"), "wb") as f:
            f.write(rng.randbytes(max(1, int(s * scale))))


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def store(tmp_path):
    d = tmp_path / "store"
    d.mkdir()
    return str(d)


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("full") / "src"
    make_full_tree(root)
    return str(root)


# ---------------------------------------------------------------- fidelity

def test_full_build_is_faithful(store, full_tree, tmp_path):
    p = ib(store, "build", "lab", "--from", full_tree)
    gen = p.stdout.strip().splitlines()[-1]
    assert p.stdout == gen + "\n"                       # progress goes to stderr
    assert "\r" not in p.stderr and "copy:" in p.stderr   # plain lines on a pipe
    m = manifest(store, "lab", gen)
    assert m["image"] == "lab" and m["generation"] == gen and m["parent"] is None
    assert m["format"] == "full" and m["block_size"] == 4096 and m["size"] % 4096 == 0
    assert m["source"] == os.path.abspath(full_tree) and m["files"] > 20
    img = os.path.join(gen_dir(store, "lab", gen), "image.ext4")
    assert os.path.getsize(img) == m["size"]
    e2fsck(img)
    src = walk(full_tree)
    with Mounted(img, tmp_path / "mnt") as mnt:
        got = walk(mnt)
    assert_same_tree(src, got)
    # the image's inode tables are initialised (no lazy init after mount)
    dump = run(["dumpe2fs", img]).stdout
    assert "ITABLE_ZEROED" in dump
    assert not os.path.exists(os.path.join(store, "images", "lab", "current"))


def test_builds_are_deterministic(tmp_path, full_tree):
    stores = [tmp_path / "s1", tmp_path / "s2"]
    imgs = []
    for s in stores:
        s.mkdir()
        gen = build(s, "lab", full_tree, "--full")
        imgs.append(os.path.join(gen_dir(s, "lab", gen), "image.ext4"))
    gen2 = build(stores[0], "lab", full_tree, "--full")
    imgs.append(os.path.join(gen_dir(stores[0], "lab", gen2), "image.ext4"))
    digests = {sha256_file(i) for i in imgs}
    assert len(digests) == 1, "two builds of one tree differ"
    # the source's access times are untouched by building
    before = walk(full_tree)
    build(stores[1], "lab", full_tree, "--full")
    after = walk(full_tree)
    assert before == after


# ---------------------------------------------------------------- incremental

def layer_bytes(store, image, gen):
    d = gen_dir(store, image, gen)
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512
               for f in os.listdir(d) if f.startswith("layer."))


def timed_build(store, image, src, *extra):
    t = time.monotonic()
    gen = build(store, image, src, *extra)
    return gen, time.monotonic() - t


def test_incremental_meets_targets(store, tmp_path):
    """Grow one file, add one, delete one, rewrite one: the delta shares
    >= 98% of blocks and grows the store by <= 5% of the image size. The
    time target (<= 10% of the full build) is bench/build_bench.py's, not a
    test's: timed under ASan beside busy loops, it failed (0.21 s of a
    1.17 s full build) with nothing wrong. The issue's case is 512 MiB in
    480 files (bench/ runs it); here 128 MiB in 480 files, changes of the
    average file size, so changes weigh the same against the image."""
    src = str(tmp_path / "src")
    make_data_tree(src, files=480, total=128 * MiB, seed=7)
    full, t_full = timed_build(store, "lab", src)
    rng = random.Random(8)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)
    # Three rounds of the four changes on different files.
    parent = full
    for k in range(3):
        with open(files[3 + k], "ab") as f:             # grow
            f.write(rng.randbytes(256 * 1024))
        with open(os.path.join(src, "dir2", f"added{k}"), "wb") as f:   # add
            f.write(rng.randbytes(256 * 1024))
        os.unlink(files[10 + k])                        # delete
        size = os.path.getsize(files[20 + k])           # rewrite in place
        with open(files[20 + k], "r+b") as f:
            f.write(rng.randbytes(size))
        inc, t_inc = timed_build(store, "lab", src)
        m = manifest(store, "lab", inc)
        assert m["format"] == "delta" and m["parent"] == parent
        assert m["size"] == manifest(store, "lab", full)["size"]
        shared = m["blocks_shared"] / (m["size"] // 4096)
        growth = layer_bytes(store, "lab", inc) / m["size"]
        print(f"full {t_full:.2f} s, incremental {t_inc:.3f} s, shared {shared:.4f}, growth {growth:.4f}")
        assert shared >= 0.98
        assert growth <= 0.05
        parent = inc
    img = flat_image(store, "lab", inc, tmp_path)
    e2fsck(img)
    # Listing the tree above moved directories' atimes; an atime change
    # alone is not a change (docs/imagebuilder.md).
    with Mounted(img, tmp_path / "mnt") as mnt:
        assert_same_tree(walk(src), walk(mnt), check_atime=False)


def test_incremental_every_kind_of_change(store, tmp_path):
    src = str(tmp_path / "src")
    make_full_tree(src, seed=3)
    gens = [build(store, "lab", src)]
    r = src
    changes = [
        lambda: os.chmod(f"{r}/etc/file1", 0o600),                       # metadata
        lambda: os.chown(f"{r}/etc/file2", 7, 8),                        # owner of a link group
        lambda: os.setxattr(f"{r}/etc/file7", "user.new", b"v"),        # xattr added
        lambda: os.removexattr(f"{r}/etc/file1", "trusted.overlay"),    # xattr removed
        lambda: (os.unlink(f"{r}/link-short"), os.symlink("elsewhere", f"{r}/link-short")),
        lambda: (os.unlink(f"{r}/fifo"), os.mkdir(f"{r}/fifo")),         # type change
        lambda: shutil.rmtree(f"{r}/etc/sub"),                          # whole subtree
        lambda: os.link(f"{r}/etc/file5", f"{r}/tmp/newlink"),          # new hard link
        lambda: os.truncate(f"{r}/etc/big", 1000),                      # shrink
        lambda: open(f"{r}/sparse", "r+b").write(b"head"),              # rewrite a sparse file
        lambda: os.makedirs(f"{r}/new/a/b/c"),
        lambda: [open(f"{r}/new/a/f{i}", "w").write("x" * i) for i in range(300)],  # dir grows
    ]
    for change in changes:
        change()
    gens.append(build(store, "lab", src))
    assert manifest(store, "lab", gens[-1])["format"] == "delta"
    os.unlink(f"{r}/etc/file5")                                          # a second delta
    gens.append(build(store, "lab", src))
    m = manifest(store, "lab", gens[-1])
    assert m["parent"] == gens[1] and m["depth"] == 2
    img = flat_image(store, "lab", gens[-1], tmp_path)
    e2fsck(img)
    with Mounted(img, tmp_path / "mnt") as mnt:
        assert_same_tree(walk(src), walk(mnt))
    # diff reads the images: tmp/newlink lost its second link, but what
    # it holds is the same; the builder's index saw its source inode change
    diff = ib(store, "diff", "lab", gens[1], gens[2]).stdout.split("\n")
    assert "- /etc/file5" in diff and "M /tmp/newlink" not in diff
    assert sorted(diff) == sorted(["- /etc/file5", "M /etc", ""]), diff
    diff = ib(store, "diff", "--index", "lab", gens[1], gens[2]).stdout.split("\n")
    assert "- /etc/file5" in diff and "M /tmp/newlink" in diff
    diff = ib(store, "diff", "lab", gens[0], gens[1]).stdout.split("\n")
    for line in ("- /etc/sub/hard2", "+ /new/a/f7", "M /etc/file1", "M /etc/big", "M /sparse",
                 "M /link-short", "M /fifo", "M /etc/file7", "M /etc/file2", "M /hard1"):
        assert line in diff, (line, diff)
    for line in ("M /etc/file3", "M /chr", "M /etc/file9", "M /" + "L" * 255):
        assert line not in diff, line
    # unchanged tree: an empty delta that shares every block
    gens.append(build(store, "lab", src))
    m = manifest(store, "lab", gens[-1])
    assert m["blocks_stored"] <= 16, m


def test_flatten_and_auto_flatten(store, tmp_path):
    src = str(tmp_path / "src")
    make_data_tree(src, files=10, total=4 * MiB, seed=9)
    gens = [build(store, "lab", src)]
    for i in range(3):
        with open(os.path.join(src, f"n{i}"), "w") as f:
            f.write("x" * 5000 * (i + 1))
        gens.append(build(store, "lab", src, "--max-depth", "2"))
    # depth 3 > 2: the last one is flattened in the background after its build
    # (done when the image lock is free again and the manifest says full)
    deadline = time.time() + 120
    while time.time() < deadline:
        with open(os.path.join(store, "images", "lab", ".lock"), "a") as lf:
            try:
                fcntl.flock(lf, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.1)
                continue
        if manifest(store, "lab", gens[-1])["format"] == "full":
            break
        time.sleep(0.1)
    m = manifest(store, "lab", gens[-1])
    assert m["format"] == "full" and m["parent"] is None and m["flattened_from"] == gens[-2]
    d = gen_dir(store, "lab", gens[-1])
    assert sorted(os.listdir(d)) == ["chunks.sha256", "files.idx", "image.ext4", "manifest.json"]
    e2fsck(os.path.join(d, "image.ext4"))
    ib(store, "verify", "lab", gens[-1])               # flattening kept the content
    # explicit flatten gives the same bytes as a copy made through the chain
    before = flat_image(store, "lab", gens[2], tmp_path)
    ib(store, "flatten", "lab", gens[2])
    after = os.path.join(gen_dir(store, "lab", gens[2]), "image.ext4")
    assert sha256_file(before) == sha256_file(after)
    assert manifest(store, "lab", gens[2])["format"] == "full"
    # a child of the flattened generation still reads correctly through it
    e2fsck(flat_image(store, "lab", gens[3], tmp_path))
    # deltas are deterministic too: the same change over the same parent
    with open(os.path.join(src, "n0"), "a") as f:
        f.write("more")
    twins = [build(store, "lab", src, "--parent", gens[1]) for _ in range(2)]
    assert len({sha256_file(flat_image(store, "lab", g, tmp_path)) for g in twins}) == 1


# ---------------------------------------------------------------- life cycle

def write_node(store, node, image, gen):
    d = os.path.join(store, "nodes", node)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "node.json"), "w") as f:
        json.dump({"image": image, "generation": gen, "mode": "persistent",
                   "created": "2026-11-26T00:00:00Z", "last_seen": "2026-11-26T00:00:00Z"}, f)


def current(store, image):
    return os.readlink(os.path.join(store, "images", image, "current"))


def test_publish_rollback_list_gc(store, tmp_path):
    src = str(tmp_path / "src")
    make_data_tree(src, files=6, total=2 * MiB, seed=11)
    gens = []
    for i in range(6):
        with open(os.path.join(src, "counter"), "w") as f:
            f.write(str(i))
        gens.append(build(store, "lab", src, "--full" if i in (0, 3) else "--max-depth=8"))
    assert ib(store, "publish", "lab").stdout.strip() == gens[-1]
    assert current(store, "lab") == f"generations/{gens[-1]}"
    ib(store, "publish", "lab", gens[4])
    assert current(store, "lab") == f"generations/{gens[4]}"
    assert ib(store, "rollback", "lab").stdout.strip() == gens[3]
    assert current(store, "lab") == f"generations/{gens[3]}"
    p = ib(store, "publish", "lab", "nosuchgen", check=False)
    assert p.returncode == 1 and "no generation nosuchgen" in p.stderr
    write_node(store, "52-54-00-12-34-56", "lab", gens[2])   # pins 2 and its parents 1, 0
    write_node(store, "other-image-node", "other", gens[4])  # another image: no effect
    listing = ib(store, "list", "lab").stdout
    assert "52-54-00-12-34-56" in listing and f"* {gens[3]}" in listing
    assert "delta" in listing and "full" in listing
    removed = ib(store, "gc", "lab").stdout.split()
    # kept: current (3), newest (5) and its parent 4, node's 2 with parents 1, 0
    assert [g for g in removed if g != "removed"] == []
    ib(store, "publish", "lab", gens[5])
    os.unlink(os.path.join(store, "nodes", "52-54-00-12-34-56", "node.json"))
    removed = [w for w in ib(store, "gc", "lab").stdout.split() if w != "removed"]
    assert manifest(store, "lab", gens[4])["parent"] == gens[3]
    assert removed == gens[0:3], removed
    left = sorted(os.listdir(os.path.join(store, "images", "lab", "generations")))
    assert gens[5] in left and gens[4] in left
    e2fsck(flat_image(store, "lab", gens[5], tmp_path))


def test_gc_removes_the_boot_orders_of_the_generations_it_removes(store, tmp_path):
    """nbdserver's tracker keeps a boot order per generation in
    STORE/tracker/IMAGE@GEN.order; gc takes a removed generation's with it
    (and a temporary of one the tracker was writing), and leaves the kept
    generations' and other images' orders alone."""
    src = str(tmp_path / "src")
    make_data_tree(src, files=3, total=MiB, seed=12)
    gens = []
    for i in range(3):
        with open(os.path.join(src, "counter"), "w") as f:
            f.write(str(i))
        gens.append(build(store, "lab", src, "--full"))
    ib(store, "publish", "lab")
    tracker = os.path.join(store, "tracker")
    os.mkdir(tracker)
    names = [f"lab@{g}.order" for g in gens] + [f"lab@{gens[0]}.order.tmp.123.4",
                                                f"other@{gens[0]}.order", "lab@x.notes"]
    for n in names:
        with open(os.path.join(tracker, n), "w") as f:
            f.write("order\n")
    removed = [w for w in ib(store, "gc", "lab").stdout.split() if w != "removed"]
    assert removed == gens[0:2], removed
    assert sorted(os.listdir(tracker)) == sorted(
        [f"lab@{gens[2]}.order", f"other@{gens[0]}.order", "lab@x.notes"])
    # A store whose tracker has never run has no tracker/: gc works as before.
    shutil.rmtree(tracker)
    assert ib(store, "gc", "lab").stdout.split() == []


# Where a build can be stopped (NBDROOT_IB_PAUSE_AT, see imagebuilder/build.hpp)
# before its generation is renamed into generations/.
STAGES_BEFORE_RENAME = ["tmp", "copy", "image", "digests", "manifest"]


def build_stopped_at(store, image, src, stage, log, *extra, timeout=120):
    """Starts a build that stops itself (SIGSTOP) at `stage`; returns its
    Popen once it is stopped there."""
    env = dict(os.environ, NBDROOT_IB_PAUSE_AT=stage)
    with open(log, "wb") as out:
        proc = subprocess.Popen([IMAGEBUILDER, "--store", store, "build", image, "--from", src,
                                 *extra], stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return proc
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            pytest.fail(f"the build ended (status {proc.returncode}) without stopping at "
                        f"{stage!r}: {open(log).read()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"the build did not reach {stage!r} in {timeout} s: {open(log).read()}")
        time.sleep(0.01)


def temporaries(img_dir):
    return [n for n in os.listdir(img_dir) if n.startswith(".tmp-")]


@pytest.mark.parametrize("kind", ["full", "delta"])
def test_interrupted_build_leaves_only_a_temporary(store, tmp_path, kind):
    """A build killed at each stage up to the rename into generations/ leaves
    the generations, `list` and `current` as they were, plus a temporary that
    the next build removes; killed just after the rename, its generation is
    visible and whole."""
    src = str(tmp_path / "src")
    make_data_tree(src, files=20, total=4 * MiB, seed=12)
    g1 = build(store, "lab", src)
    ib(store, "publish", "lab")
    extra = ["--full"] if kind == "full" else []
    for i in range(4):
        with open(os.path.join(src, f"dir{i}", "added"), "wb") as f:
            f.write(random.Random(i).randbytes(100_000))
    img_dir = os.path.join(store, "images", "lab")
    gens_dir = os.path.join(img_dir, "generations")
    listing = ib(store, "list", "lab").stdout
    before = store_snapshot(store)
    data = {"full": ["image.ext4"], "delta": ["layer.bitmap", "layer.diff"]}[kind]
    expect_files = {"tmp": [], "image": data, "digests": sorted(data + ["chunks.sha256"]),
                    "manifest": sorted(data + ["chunks.sha256", "files.idx", "manifest.json"])}

    for stage in STAGES_BEFORE_RENAME:
        proc = build_stopped_at(store, "lab", src, stage, tmp_path / f"{stage}.log", *extra)
        assert os.listdir(gens_dir) == [g1], f"stopped at {stage}, the build is visible"
        tmps = temporaries(img_dir)
        assert len(tmps) == 1, (stage, tmps)     # the previous killed build's is gone
        if stage in expect_files:
            assert sorted(os.listdir(os.path.join(img_dir, tmps[0]))) == expect_files[stage], stage
        proc.kill()
        proc.wait()
        assert os.listdir(gens_dir) == [g1], f"killed at {stage}, the build became visible"
        assert ib(store, "list", "lab").stdout == listing, stage
        after = {p: v for p, v in store_snapshot(store).items()
                 if p.split("/")[2:3] != [tmps[0]]}
        assert after == before, stage

    # Killed after the rename: the generation is there, complete, not current.
    proc = build_stopped_at(store, "lab", src, "renamed", tmp_path / "renamed.log", *extra)
    proc.kill()
    proc.wait()
    assert temporaries(img_dir) == []
    gens = sorted(os.listdir(gens_dir))
    assert len(gens) == 2 and gens[0] == g1, gens
    g2 = gens[1]
    assert manifest(store, "lab", g2)["format"] == kind
    assert g2 in ib(store, "list", "lab").stdout
    assert current(store, "lab") == f"generations/{g1}"
    e2fsck(flat_image(store, "lab", g2, tmp_path))
    ib(store, "verify", "lab", g2)

    g3 = build(store, "lab", src, *extra)
    assert temporaries(img_dir) == []
    assert sorted(os.listdir(gens_dir)) == [g1, g2, g3]


# ---------------------------------------------------------------- bad input

def assert_fails_cleanly(store, args, *needles):
    before = store_snapshot(store)
    p = ib(store, *args, check=False)
    assert p.returncode != 0, p.stdout
    for n in needles:
        assert n in p.stderr, f"{n!r} not in: {p.stderr}"
    assert store_snapshot(store) == before, "a failed build changed the store"
    return p


@pytest.fixture
def small_src(tmp_path):
    src = str(tmp_path / "small")
    make_data_tree(src, files=5, total=1 * MiB, seed=13)
    return src


def test_missing_or_bad_source(store, small_src, tmp_path):
    assert_fails_cleanly(store, ["build", "lab", "--from", tmp_path / "nope"],
                         "nope", "No such file")
    assert_fails_cleanly(store, ["build", "lab", "--from", os.path.join(small_src, "dir0", "f0000")],
                         "not a directory")
    assert_fails_cleanly(store, ["build", "bad/name", "--from", small_src], "invalid image name")
    # with an existing image too
    build(store, "lab", small_src)
    assert_fails_cleanly(store, ["build", "lab", "--from", tmp_path / "nope"], "No such file")


@pytest.fixture
def world_dir():
    """A directory an unprivileged user can reach (pytest's are 0700)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="ib-test-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unreadable_files(world_dir):
    """As an unprivileged user, a file or directory it cannot read fails the
    build with its path; O_NOATIME on files it does not own is not needed."""
    import pathlib
    tmp = pathlib.Path(world_dir)
    src = tmp / "src"
    store = str(tmp / "store")
    os.mkdir(store)
    make_data_tree(str(src), files=4, total=64 * 1024, seed=14)
    for root, dirs, files in os.walk(src):
        for n in dirs + files:
            shutil.chown(os.path.join(root, n), "nobody", "nogroup")
    shutil.chown(src, "nobody", "nogroup")
    shutil.chown(store, "nobody", "nogroup")
    (src / "root-owned").write_text("readable by all")           # not owned: no O_NOATIME
    user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", IMAGEBUILDER,
            "--store", store]
    p = run(user + ["build", "lab", "--from", str(src)])
    secret = src / "secret"
    secret.write_text("no")
    os.chmod(secret, 0o000)
    before = store_snapshot(store)
    p = run(user + ["build", "lab", "--from", str(src)], check=False)
    assert p.returncode == 1 and "secret" in p.stderr and "Permission denied" in p.stderr, p.stderr
    assert store_snapshot(store) == before
    os.unlink(secret)
    closed = src / "closed-dir"
    closed.mkdir(mode=0o700)
    p = run(user + ["build", "lab", "--from", str(src)], check=False)
    assert p.returncode == 1 and "closed-dir" in p.stderr, p.stderr
    assert store_snapshot(store) == before


def test_tree_larger_than_size(store, tmp_path):
    src = str(tmp_path / "src")
    make_data_tree(src, files=8, total=40 * MiB, seed=15)
    assert_fails_cleanly(store, ["build", "lab", "--from", src, "--size", "20M"],
                         "too small")
    # an estimate that passes, but a tree that does not fit: many inodes
    many = tmp_path / "many"
    many.mkdir()
    for i in range(3000):
        (many / f"f{i}").write_text("x" * 3000)
    p = assert_fails_cleanly(store, ["build", "lab", "--from", many, "--size", str(16 * MiB)])
    assert "too small" in p.stderr or "does not fit" in p.stderr, p.stderr


@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def make(name, size):
        d = tmp_path / name
        d.mkdir()
        run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)])
        mounts.append(str(d))
        return str(d)

    yield make
    for m in mounts:
        run(["umount", "-l", m], check=False)


def test_unrepresentable_files(store, tmpfs):
    src = tmpfs("src", "64M")
    with open(os.path.join(src, "ok"), "w") as f:
        f.write("fine")
    big = os.path.join(src, "huge-sparse")
    with open(big, "wb") as f:
        f.truncate(17 << 40)                     # beyond ext4's 16 TiB
    assert_fails_cleanly(store, ["build", "lab", "--from", src], "huge-sparse", "16 TiB")
    os.unlink(big)
    x = os.path.join(src, "fat-xattrs")
    open(x, "w").close()
    try:
        for i in range(3):
            os.setxattr(x, f"user.v{i}", b"v" * 3000)
    except OSError as e:
        pytest.skip(f"tmpfs here lacks big user xattrs: {e}")
    assert_fails_cleanly(store, ["build", "lab", "--from", src], "fat-xattrs", "xattrs")


def test_store_on_a_full_disk(tmpfs, tmp_path):
    store = tmpfs("store", "24M")
    src = str(tmp_path / "src")
    make_data_tree(src, files=10, total=40 * MiB, seed=16)
    assert_fails_cleanly(store, ["build", "lab", "--from", src], "full")
    assert os.listdir(store) == [] or store_snapshot(store) == {}
    # a delta that fits the image's size but not the disk
    small = str(tmp_path / "small")
    make_data_tree(small, files=4, total=2 * MiB, seed=17)
    build(store, "lab", small, "--size", "64M")
    make_data_tree(str(tmp_path / "small" / "more"), files=4, total=30 * MiB, seed=18)
    p = assert_fails_cleanly(store, ["build", "lab", "--from", small])
    assert "full" in p.stderr or "does not fit" in p.stderr, p.stderr


def test_concurrent_builds_are_refused(store, small_src):
    build(store, "lab", small_src)
    lock = os.path.join(store, "images", "lab", ".lock")
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert_fails_cleanly(store, ["build", "lab", "--from", small_src], "in progress", ".lock")
        assert_fails_cleanly(store, ["gc", "lab"], "in progress")
    finally:
        os.close(fd)
    build(store, "lab", small_src)
    # another image is not blocked
    build(store, "lab2", small_src)


# ---------------------------------------------------------------- served by nbdserver

def server_has_store():
    try:
        p = subprocess.run([NBDSERVER, "--help"], capture_output=True, text=True, timeout=10)
    except OSError:
        return False
    return "--store" in p.stdout + p.stderr


@pytest.mark.skipif(not server_has_store(), reason="nbdserver --help does not list --store yet")
def test_generations_served_byte_for_byte(store, tmp_path, nbdserver):
    src = str(tmp_path / "src")
    make_data_tree(src, files=30, total=24 * MiB, seed=19)
    g1 = build(store, "lab", src)
    with open(os.path.join(src, "dir1", "new"), "wb") as f:
        f.write(os.urandom(3 * MiB))
    g2 = build(store, "lab", src)
    os.unlink(os.path.join(src, "dir1", "new"))
    g3 = build(store, "lab", src)
    ib(store, "publish", "lab", g1)
    srv = nbdserver(args=["--store", store])
    for g in (g1, g2, g3):
        out = tmp_path / f"served-{g}.img"
        run(["nbdcopy", srv.uri(f"lab@{g}"), str(out)])
        assert sha256_file(out) == sha256_file(flat_image(store, "lab", g, tmp_path)), g

    # publishing while a client reads the old generation: its reads stay correct
    import nbd
    h = nbd.NBD()
    h.connect_uri(srv.uri("lab"))
    old = flat_image(store, "lab", g1, tmp_path)
    with open(old, "rb") as f:
        expect = f.read(4 * MiB)
    assert h.pread(4 * MiB, 0) == expect
    ib(store, "publish", "lab", g3)
    assert h.pread(4 * MiB, 0) == expect
    h.shutdown()
    out = tmp_path / "current.img"
    run(["nbdcopy", srv.uri("lab"), str(out)])
    assert sha256_file(out) == sha256_file(flat_image(store, "lab", g3, tmp_path))


# ---------------------------------------------------------------- chunk digests

CHUNK = 64 * 1024


def fnv1a(s):
    h = 1469598103934665603
    for c in s.encode():
        h = ((h ^ c) * 1099511628211) % (1 << 64)
    return h


def read_digests(store, image, gen):
    """Parses chunks.sha256 (nbdserver/storage/chunk_digests.hpp) on its own
    and checks its header; returns (size, [digest per chunk])."""
    with open(os.path.join(gen_dir(store, image, gen), "chunks.sha256"), "rb") as f:
        data = f.read()
    (magic, version, hsize, algo, dsize, csize, reserved, size, count, tag) = \
        struct.unpack_from("<8sIIIIIIQQQ", data, 0)
    assert (magic, version, hsize, algo, dsize, csize, reserved) == \
        (b"NBDRCHKS", 1, 128, 1, 32, CHUNK, 0)
    assert data[88:124] == bytes(36)
    assert struct.unpack_from("<I", data, 124)[0] == zlib.crc32(data[:124])
    assert tag == fnv1a(f"{image}@{gen}")
    assert size == manifest(store, image, gen)["size"]
    assert count == (size + CHUNK - 1) // CHUNK and len(data) == 128 + 32 * count
    table = data[128:]
    assert hashlib.sha256(table).digest() == data[56:88]
    return size, [table[i * 32:(i + 1) * 32] for i in range(count)]


def chunk_hashes(path, size):
    """SHA-256 of each 64 KiB of the first `size` bytes of a file (the last
    chunk may be short)."""
    out = []
    with open(path, "rb") as f:
        for off in range(0, size, CHUNK):
            out.append(hashlib.sha256(f.read(min(CHUNK, size - off))).digest())
    return out


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5a]))


def verify_fails(store, gen, *needles):
    p = ib(store, "verify", "lab", gen, check=False)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    for n in needles:
        assert n in p.stdout + p.stderr, f"{n!r} not in: {p.stdout}{p.stderr}"
    return p


def test_full_build_digests_match_the_image(store, tmp_path):
    """Every 64 KiB of image.ext4, hashed by hashlib, is what the build
    recorded (the size is not a multiple of 64 KiB: the last chunk is
    short); verify passes, then names a chunk with one byte flipped."""
    src = str(tmp_path / "src")
    make_data_tree(src, files=20, total=6 * MiB, seed=31)
    size = 33 * MiB + 12 * 1024
    gen = build(store, "lab", src, "--size", size)
    img = os.path.join(gen_dir(store, "lab", gen), "image.ext4")
    got_size, digests = read_digests(store, "lab", gen)
    assert got_size == size == os.path.getsize(img)
    assert digests == chunk_hashes(img, size)
    assert len(digests) == 529 and size - 528 * CHUNK == 12 * 1024
    p = ib(store, "verify", "lab", gen)
    assert f"lab@{gen}: 529 chunks of 65536 bytes checked, 0 bad" in p.stdout
    for off in (200 * CHUNK + 777, size - 1):          # a middle chunk, the short last one
        flip_byte(img, off)
        p = verify_fails(store, gen, f"bad chunk {off // CHUNK} at offset {off // CHUNK * CHUNK}",
                         "529 chunks of 65536 bytes checked, 1 bad", "do not match")
        assert p.stdout.count("bad chunk") == 1, p.stdout
        flip_byte(img, off)
        ib(store, "verify", "lab", gen)
    # GEN defaults to current, else the newest
    g2 = build(store, "lab", src, "--full")
    assert f"lab@{g2}:" in ib(store, "verify", "lab").stdout
    ib(store, "publish", "lab", gen)
    assert f"lab@{gen}:" in ib(store, "verify", "lab").stdout


def changed_chunk_and_block(delta, parent, size):
    """A chunk whose content the delta changed, and a block in it that the
    delta holds in its diff (non-zero, and different from the parent's)."""
    with open(delta, "rb") as d, open(parent, "rb") as p:
        for off in range(0, size, 4096):
            a, b = d.read(4096), p.read(4096)
            if a != b and a != bytes(4096):
                return off // CHUNK, off
    pytest.fail("the delta changed nothing")


@pytest.mark.skipif(not server_has_store(), reason="nbdserver --help does not list --store yet")
def test_delta_digests_match_served_content(store, tmp_path, nbdserver):
    """A delta's digests are those of its content as nbdserver serves it
    (lab@GEN through the chain); unchanged chunks came from the parent's
    file. A byte flipped in layer.diff is named by verify, and stops
    flatten; flatten and gc keep the digests valid."""
    src = str(tmp_path / "src")
    make_data_tree(src, files=40, total=16 * MiB, seed=32)
    g1 = build(store, "lab", src)
    with open(os.path.join(src, "dir3", "new"), "wb") as f:
        f.write(random.Random(1).randbytes(700_000))
    d5 = os.path.join(src, "dir5")
    os.unlink(os.path.join(d5, sorted(os.listdir(d5))[0]))
    p = ib(store, "build", "lab", "--from", src)
    g2 = p.stdout.strip().splitlines()[-1]
    with open(os.path.join(src, "dir1", "new"), "wb") as f:
        f.write(random.Random(2).randbytes(300_000))
    p = ib(store, "build", "lab", "--from", src)
    g3 = p.stdout.strip().splitlines()[-1]
    assert manifest(store, "lab", g3)["format"] == "delta" and manifest(store, "lab", g3)["depth"] == 2
    size = manifest(store, "lab", g3)["size"]
    count = size // CHUNK
    # the build hashed only the changed chunks and took the others from g2
    line = [l for l in p.stderr.splitlines() if l.startswith("digests:")][-1]
    hashed, reused = int(line.split()[1]), int(line.split()[4])
    assert hashed + reused == count and 0 < hashed < count // 4, line

    srv = nbdserver(args=["--store", store])
    served = {}
    for g in (g1, g2, g3):
        served[g] = str(tmp_path / f"served-{g}.img")
        run(["nbdcopy", srv.uri(f"lab@{g}"), served[g]])
        assert read_digests(store, "lab", g) == (size, chunk_hashes(served[g], size)), g
        ib(store, "verify", "lab", g)

    # one byte of the delta's own diff: verify names its chunk, flatten refuses
    chunk, block_off = changed_chunk_and_block(served[g3], served[g2], size)
    diff = os.path.join(gen_dir(store, "lab", g3), "layer.diff")
    flip_byte(diff, block_off + 100)
    verify_fails(store, g3, f"bad chunk {chunk} at offset {chunk * CHUNK}", "1 bad")
    ib(store, "verify", "lab", g2)                       # the parent is intact
    before = store_snapshot(store)
    p = ib(store, "flatten", "lab", g3, check=False)
    assert p.returncode == 1 and f"chunk {chunk} (offset {chunk * CHUNK}) does not match" in p.stderr
    assert store_snapshot(store) == before
    flip_byte(diff, block_off + 100)

    # flatten: same content, so the same digests file, and it still verifies
    digests_file = os.path.join(gen_dir(store, "lab", g3), "chunks.sha256")
    digest_bytes = open(digests_file, "rb").read()
    ib(store, "flatten", "lab", g3)
    assert manifest(store, "lab", g3)["format"] == "full"
    assert open(digests_file, "rb").read() == digest_bytes
    ib(store, "verify", "lab", g3)
    # gc removes g1 and g2 (nothing needs them now); g3 stands alone
    ib(store, "publish", "lab", g3)
    assert sorted(ib(store, "gc", "lab").stdout.split()) == sorted(["removed", g1, "removed", g2])
    ib(store, "verify", "lab", g3)
    out = tmp_path / "after-gc.img"
    run(["nbdcopy", srv.uri(f"lab@{g3}"), str(out)])
    assert chunk_hashes(str(out), size) == read_digests(store, "lab", g3)[1]


def test_corrupt_or_missing_digests(store, tmp_path, nbdserver):
    """A damaged digest file is refused by verify with the reason; a
    generation without one (built before digests) is said to have none,
    is still served, and a delta over it hashes every chunk."""
    src = str(tmp_path / "src")
    make_data_tree(src, files=10, total=2 * MiB, seed=33)
    g1 = build(store, "lab", src)
    g2 = build(store, "lab", src, "--full")
    path = os.path.join(gen_dir(store, "lab", g1), "chunks.sha256")
    good = open(path, "rb").read()

    def damaged(data, *needles):
        os.chmod(path, 0o644)
        with open(path, "wb") as f:
            f.write(data)
        p = verify_fails(store, g1, path, *needles)
        assert "chunks of" not in p.stdout
        return p

    damaged(good[:100], "truncated header")
    damaged(good[:-1], "truncated")
    damaged(good + b"\0", "trailing bytes")
    damaged(good[:130] + bytes([good[130] ^ 1]) + good[131:], "digest table does not match")
    damaged(good[:33] + bytes([good[33] ^ 1]) + good[34:], "header checksum mismatch")
    damaged(b"X" + good[1:], "bad magic")
    damaged(open(os.path.join(gen_dir(store, "lab", g2), "chunks.sha256"), "rb").read(),
            "another generation")
    damaged(b"", "truncated header")
    with open(path, "wb") as f:
        f.write(good)
    ib(store, "verify", "lab", g1)

    # no digest file: said so, exit 1; still served, and builds go on
    os.unlink(path)
    verify_fails(store, g1, "has no chunk digests", "built before")
    ib(store, "publish", "lab", g1)
    srv = nbdserver(args=["--store", store])
    out = tmp_path / "served.img"
    run(["nbdcopy", srv.uri("lab"), str(out)])
    assert sha256_file(out) == sha256_file(os.path.join(gen_dir(store, "lab", g1), "image.ext4"))
    with open(os.path.join(src, "dir0", "more"), "wb") as f:
        f.write(b"m" * 100_000)
    p = ib(store, "build", "lab", "--from", src, "--parent", g1)
    g3 = p.stdout.strip().splitlines()[-1]
    assert manifest(store, "lab", g3)["format"] == "delta"
    assert f"parent {g1} has no chunk digests: hashing every chunk" in p.stderr
    size = manifest(store, "lab", g3)["size"]
    assert f"digests: {size // CHUNK} chunks hashed, 0 from the parent" in p.stderr
    ib(store, "verify", "lab", g3)
    out = tmp_path / "served3.img"
    run(["nbdcopy", srv.uri(f"lab@{g3}"), str(out)])
    assert read_digests(store, "lab", g3)[1] == chunk_hashes(str(out), size)
    # flatten of a delta without digests works, and writes none
    os.unlink(os.path.join(gen_dir(store, "lab", g3), "chunks.sha256"))
    ib(store, "flatten", "lab", g3)
    assert manifest(store, "lab", g3)["format"] == "full"
    assert not os.path.exists(os.path.join(gen_dir(store, "lab", g3), "chunks.sha256"))


# ---------------------------------------------------------------- the store itself

def test_first_build_creates_the_store(tmp_path, small_src, nbdserver):
    store = str(tmp_path / "new" / "store")
    gen = build(store, "lab", small_src)
    assert sorted(os.listdir(store)) == ["images", "nodes"]
    assert os.listdir(os.path.join(store, "images", "lab", "generations")) == [gen]
    ib(store, "publish", "lab")
    assert gen in ib(store, "list", "lab").stdout
    srv = nbdserver(args=["--store", store])
    out = tmp_path / "served.img"
    run(["nbdcopy", srv.uri("lab"), str(out)])
    assert sha256_file(out) == sha256_file(os.path.join(gen_dir(store, "lab", gen), "image.ext4"))


def test_failed_first_build_leaves_no_store(tmpfs, tmp_path):
    disk = tmpfs("disk", "24M")       # fails while copying, after making the store
    src = str(tmp_path / "src")
    make_data_tree(src, files=10, total=40 * MiB, seed=16)
    p = ib(os.path.join(disk, "new", "store"), "build", "lab", "--from", src, check=False)
    assert p.returncode == 1 and "is full" in p.stderr, p.stderr
    assert os.listdir(disk) == []


MISSING_STORE_COMMANDS = [["list", "lab"], ["publish", "lab"], ["rollback", "lab"], ["gc", "lab"],
                          ["diff", "lab", "a", "b"], ["flatten", "lab", "a"],
                          ["boot", "lab", "--out", "OUT", "--server", "h:1"]]


def test_commands_on_a_missing_store(tmp_path):
    missing = tmp_path / "nowhere"
    out = tmp_path / "out"
    for args in MISSING_STORE_COMMANDS:
        p = ib(missing, *[out if a == "OUT" else a for a in args], check=False)
        assert p.returncode == 1, (args, p.stderr)
        assert f"no store at {missing}: the first `imagebuilder --store {missing} build IMAGE " \
               "--from SRCDIR` creates it" in p.stderr, (args, p.stderr)
    assert not missing.exists() and not out.exists()


def test_store_that_is_a_file(tmp_path, small_src):
    store = tmp_path / "store"
    store.write_text("not a store")
    out = tmp_path / "out"
    for args in [["build", "lab", "--from", small_src]] + MISSING_STORE_COMMANDS:
        p = ib(store, *[out if a == "OUT" else a for a in args], check=False)
        assert p.returncode == 1, (args, p.stderr)
        assert f"store {store} exists but is not a directory" in p.stderr, (args, p.stderr)
    assert store.read_text() == "not a store" and not out.exists()


# ---------------------------------------------------------------- boot artifacts

FAKE_MKINITRD = """#!/bin/sh
# stands in for initrd-hooks/mkinitrd.sh TREE OUT --kver V
echo "initrd for $1 kver $4" > "$2"
"""


def test_boot_artifacts(store, tmp_path):
    src = tmp_path / "src"
    (src / "boot").mkdir(parents=True)
    (src / "boot" / "vmlinuz-6.1.0-9-amd64").write_bytes(b"old kernel" * 1000)
    (src / "boot" / "vmlinuz-6.1.0-13-amd64").write_bytes(os.urandom(300000))
    (src / "vmlinuz").symlink_to("boot/vmlinuz-6.1.0-13-amd64")
    gen = build(store, "lab", src)
    out = tmp_path / "out"
    script = tmp_path / "mkinitrd.sh"
    script.write_text(FAKE_MKINITRD)
    script.chmod(0o755)
    p = ib(store, "boot", "lab", "--out", out, "--server", "10.0.0.1:10809",
           "--mkinitrd", script, check=False)
    assert p.returncode == 1 and "no current generation" in p.stderr
    ib(store, "publish", "lab")
    # the kernel is read from the image, not from the (edited) source
    (src / "boot" / "vmlinuz-6.1.0-13-amd64").write_bytes(b"edited later")
    ib(store, "boot", "lab", "--out", out, "--server", "10.0.0.1:10809", "--mkinitrd", script)
    assert sorted(os.listdir(out)) == ["boot.ipxe", "initrd.img", "vmlinuz"]
    with Mounted(os.path.join(gen_dir(store, "lab", gen), "image.ext4"), tmp_path / "mnt") as mnt:
        with open(os.path.join(mnt, "boot", "vmlinuz-6.1.0-13-amd64"), "rb") as f:
            assert (out / "vmlinuz").read_bytes() == f.read()
    assert (out / "initrd.img").read_text() == f"initrd for {src} kver 6.1.0-13-amd64\n"
    ipxe = (out / "boot.ipxe").read_text()
    assert ipxe.startswith("#!ipxe\n")
    assert "kernel vmlinuz initrd=initrd.img nbdroot=10.0.0.1:10809/lab/${net0/mac:hexhyp} ip=dhcp" in ipxe
    assert "initrd initrd.img" in ipxe and "boot" in ipxe
    p = ib(store, "boot", "lab", "--out", tmp_path / "o2", "--server", "h:1",
           "--mkinitrd", tmp_path / "missing.sh", check=False)
    assert p.returncode == 1 and "missing.sh" in p.stderr and "mkinitrd" in p.stderr
    assert not os.path.exists(tmp_path / "o2")


def fake_script(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


def boot_tmp_dirs(store, image, gen):
    return [n for n in os.listdir(gen_dir(store, image, gen)) if n.startswith(".boot.tmp-")]


def test_boot_files_into_the_store(store, tmp_path):
    src = tmp_path / "src"
    (src / "boot").mkdir(parents=True)
    (src / "boot" / "vmlinuz-6.1.0-13-amd64").write_bytes(os.urandom(200000))
    gen = build(store, "lab", src)
    ib(store, "publish", "lab")
    mkinitrd = fake_script(tmp_path / "mkinitrd.sh", FAKE_MKINITRD)
    mkverify = fake_script(tmp_path / "mkverify.sh",
                           '#!/bin/sh\necho "verify initrd for $1 kver $4" > "$2"\n')
    memtest = tmp_path / "memtest"
    memtest.mkdir()
    (memtest / "memtest86+x64.bin").write_bytes(os.urandom(1000))
    (memtest / "memtest86+x64.efi").write_bytes(os.urandom(1200))
    p = ib(store, "boot", "lab", "--mkinitrd", mkinitrd, "--mkverify", mkverify,
           "--memtest-dir", memtest, "--http-server", "10.0.0.1:8080")
    boot = os.path.join(gen_dir(store, "lab", gen), "boot")
    assert sorted(os.listdir(boot)) == ["initrd.img", "verify.img", "vmlinuz"], p.stdout
    assert open(os.path.join(boot, "verify.img")).read() == f"verify initrd for {src} kver 6.1.0-13-amd64\n"
    assert open(os.path.join(boot, "initrd.img")).read() == f"initrd for {src} kver 6.1.0-13-amd64\n"
    assert open(os.path.join(boot, "vmlinuz"), "rb").read() == \
        (src / "boot" / "vmlinuz-6.1.0-13-amd64").read_bytes()
    sboot = os.path.join(store, "boot")
    assert sorted(os.listdir(sboot)) == ["chain.ipxe", "memtest86+x64.bin", "memtest86+x64.efi"]
    for n in ("memtest86+x64.bin", "memtest86+x64.efi"):
        assert open(os.path.join(sboot, n), "rb").read() == (memtest / n).read_bytes()
    chain = open(os.path.join(sboot, "chain.ipxe")).read()
    assert chain.startswith("#!ipxe\n")
    assert chain.splitlines()[-1] == "chain http://10.0.0.1:8080/boot/${net0/mac:hexhyp}.ipxe"
    assert boot_tmp_dirs(store, "lab", gen) == []

    # Again, with a new verification initrd: boot/ is replaced whole.
    fake_script(mkverify, '#!/bin/sh\necho "second" > "$2"\n')
    ib(store, "boot", "lab", "--mkinitrd", mkinitrd, "--mkverify", mkverify,
       "--memtest-dir", tmp_path / "none")
    assert open(os.path.join(boot, "verify.img")).read() == "second\n"
    assert boot_tmp_dirs(store, "lab", gen) == []
    # memtest86+ missing from --memtest-dir: the copies already there stay
    assert sorted(os.listdir(sboot)) == ["chain.ipxe", "memtest86+x64.bin", "memtest86+x64.efi"]

    # A failing builder changes nothing and leaves no temporary directory.
    fake_script(mkverify, '#!/bin/sh\necho "half" > "$2"\nexit 3\n')
    p = ib(store, "boot", "lab", "--mkinitrd", mkinitrd, "--mkverify", mkverify, check=False)
    assert p.returncode == 1 and "mkverify.sh" in p.stderr and "status 3" in p.stderr, p.stderr
    assert open(os.path.join(boot, "verify.img")).read() == "second\n"
    assert sorted(os.listdir(boot)) == ["initrd.img", "verify.img", "vmlinuz"]
    assert boot_tmp_dirs(store, "lab", gen) == []

    # Bad arguments: a clear error, nothing written.
    for args, code, needle in [
        (["--server", "h:1"], 1, "--server goes with --out"),
        (["--http-server", "nohostport"], 1, "--http-server must be HOST:PORT"),
        (["--http-server", "h:99999"], 1, "--http-server must be HOST:PORT"),
        (["--mkverify", tmp_path / "missing.sh"], 1, "no verification initrd builder"),
    ]:
        p = ib(store, "boot", "lab", "--mkinitrd", mkinitrd, *args, check=False)
        assert p.returncode == code and needle in p.stderr, (args, p.stderr)
    assert open(os.path.join(boot, "verify.img")).read() == "second\n"
    assert boot_tmp_dirs(store, "lab", gen) == []


def test_command_line_errors(store, tmp_path):
    for args, code, needle in [
        ([], 2, "usage"),
        (["frobnicate", "lab"], 2, "unknown command"),
        (["build", "lab"], 2, "--from"),
        (["build", "lab", "--from", tmp_path, "--size", "12Q"], 2, "--size"),
        (["publish", "lab"], 1, "no image lab"),
        (["list", "lab"], 1, "no image lab"),
        (["diff", "lab", "a"], 2, "wrong arguments"),
        (["boot", "lab", "--out", tmp_path / "o"], 2, "--server"),
    ]:
        p = ib(store, *args, check=False)
        assert p.returncode == code and needle in p.stderr, (args, p.returncode, p.stderr)
    p = run([IMAGEBUILDER, "build", "lab", "--from", str(tmp_path)], check=False)
    assert p.returncode == 2 and "--store" in p.stderr


def test_tree_outgrowing_its_image_makes_a_full_generation(store, tmp_path):
    src = str(tmp_path / "src")
    make_data_tree(src, files=4, total=2 * MiB, seed=21)
    g1 = build(store, "lab", src, "--size", "16M")
    make_data_tree(os.path.join(src, "more"), files=8, total=24 * MiB, seed=22)
    p = ib(store, "build", "lab", "--from", src)
    g2 = p.stdout.strip().splitlines()[-1]
    m = manifest(store, "lab", g2)
    assert m["format"] == "full" and m["parent"] is None and m["derived_from"] == g1
    assert m["size"] > 16 * MiB and "full build with a new size" in p.stderr
    img = flat_image(store, "lab", g2, tmp_path)
    e2fsck(img)
    with Mounted(img, tmp_path / "mnt") as mnt:
        assert_same_tree(walk(src), walk(mnt), check_atime=False)
