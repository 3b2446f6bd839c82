"""qemu's NBD client (qemu-img, qemu-io) against nbdserver."""

import json

from conftest import KiB, MiB, run, sha256_file


def test_qemu_img_info(rw_server, image):
    p = run(["qemu-img", "info", "--output=json", rw_server.uri("disk")])
    info = json.loads(p.stdout)
    assert info["virtual-size"] == image.size
    assert info["format"] == "raw"


def test_qemu_img_convert_to_raw(nbdserver, make_image, tmp_path):
    img = make_image("src.img", size=8 * MiB, seed=31)
    srv = nbdserver({"disk": (img, {"ro": True})})
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri("disk"), str(out)])
    assert sha256_file(out) == img.sha256()


def test_qemu_img_convert_into_export(nbdserver, make_image):
    src = make_image("src.img", size=4 * MiB, seed=32)
    dst = make_image("dst.img", size=4 * MiB, seed=33, hole_fraction=0.0)
    srv = nbdserver({"disk": dst})
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src.path, srv.uri("disk")])
    assert sha256_file(dst.path) == src.sha256()


def test_qemu_img_compare(nbdserver, make_image):
    img = make_image("src.img", size=4 * MiB, seed=34)
    srv = nbdserver({"disk": (img, {"ro": True})})
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", img.path, srv.uri("disk")])


def qemu_io(uri, *cmds, check=True):
    argv = ["qemu-io", "-f", "raw", uri]
    for c in cmds:
        argv += ["-c", c]
    p = run(argv, check=check)
    if check:
        # qemu-io reports most command failures on stdout and still exits 0.
        out = p.stdout + p.stderr
        for bad in ("failed", "error", "Pattern verification"):
            assert bad not in out, out
    return p


def test_qemu_io_write_and_read_pattern(rw_server, image):
    qemu_io(rw_server.uri("disk"),
            "write -P 0xab 0 64k", "read -P 0xab 0 64k",
            "write -P 0x5c 1m 128k", "read -P 0x5c 1m 128k")
    assert image.read(0, 64 * KiB) == b"\xab" * (64 * KiB)
    assert image.read(1 * MiB, 128 * KiB) == b"\x5c" * (128 * KiB)


def test_qemu_io_read_detects_wrong_pattern(rw_server, image):
    """The check above can fail: reading a pattern that is not there is
    reported by qemu-io."""
    p = run(["qemu-io", "-f", "raw", rw_server.uri("disk"), "-c", "read -P 0xab 0 64k"],
            check=False)
    assert "Pattern verification failed" in p.stdout + p.stderr


def test_qemu_io_zero_and_discard(rw_server, image):
    qemu_io(rw_server.uri("disk"),
            "write -P 0x11 0 256k",
            "write -z 0 64k", "read -P 0 0 64k", "read -P 0x11 64k 192k",
            "discard 128k 64k")
    assert image.read(0, 64 * KiB) == bytes(64 * KiB)
    assert image.read(64 * KiB, 64 * KiB) == b"\x11" * (64 * KiB)


def test_qemu_io_write_to_read_only_fails(ro_server, image):
    before = image.sha256()
    p = run(["qemu-io", "-f", "raw", "-r", ro_server.uri("disk"), "-c", "write -P 0xab 0 64k"],
            check=False)
    assert "fail" in (p.stdout + p.stderr).lower() or p.returncode != 0
    assert image.sha256() == before
