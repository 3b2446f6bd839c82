"""nbdcopy in both directions, checked by sha256 against the source."""

import os

from conftest import MiB, run, sha256_file


def test_copy_export_to_file(nbdserver, make_image, tmp_path):
    img = make_image("src.img", size=16 * MiB, seed=1)
    srv = nbdserver({"disk": (img, {"ro": True})})
    out = tmp_path / "out.img"
    run(["nbdcopy", srv.uri("disk"), str(out)])
    assert os.path.getsize(out) == img.size
    assert sha256_file(out) == img.sha256()


def test_copy_file_to_writable_export(nbdserver, make_image, tmp_path):
    src = make_image("src.img", size=16 * MiB, seed=2)
    # The destination starts with different data, holes in other places:
    # nbdcopy must overwrite data and zero the source's holes.
    dst = make_image("dst.img", size=16 * MiB, seed=3, hole_fraction=0.1)
    assert dst.sha256() != src.sha256()
    srv = nbdserver({"disk": dst})
    run(["nbdcopy", "--flush", src.path, srv.uri("disk")])
    assert sha256_file(dst.path) == src.sha256()


def test_copy_export_to_export_multi_conn(nbdserver, make_image):
    src = make_image("src.img", size=8 * MiB, seed=4)
    dst = make_image("dst.img", size=8 * MiB, seed=5, hole_fraction=0.0)
    srv = nbdserver({"src": (src, {"ro": True}), "dst": dst})
    run(["nbdcopy", "--connections=4", "--requests=16",
         srv.uri("src"), srv.uri("dst")])
    assert sha256_file(dst.path) == src.sha256()


def test_copy_with_requests_of_max_block(nbdserver, make_image, tmp_path):
    """Requests of exactly --max-block bytes are accepted."""
    src = make_image("src.img", size=4 * MiB, seed=6)
    srv = nbdserver({"disk": (src, {"ro": True})}, args=["--max-block", str(64 * 1024)])
    out = tmp_path / "out.img"
    run(["nbdcopy", "--request-size=65536", srv.uri("disk"), str(out)])
    assert sha256_file(out) == src.sha256()
