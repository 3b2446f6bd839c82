"""Listeners and configuration: Unix socket, several listeners, --config,
systemd socket activation and readiness notification."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import NBDSERVER, MiB, nbd_handle, run, sha256_file


@pytest.fixture
def short_dir():
    """A directory with a short path: sun_path is limited to 108 bytes."""
    d = tempfile.mkdtemp(prefix="nbdt", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unix_socket(nbdserver, image, short_dir, tmp_path):
    path = os.path.join(short_dir, "nbd.sock")
    srv = nbdserver({"disk": image}, args=["--socket", path], listen=False)
    assert path in srv.addresses
    uri = srv.unix_uri("disk")
    assert int(run(["nbdinfo", "--size", uri]).stdout) == image.size
    out = tmp_path / "copy.img"
    run(["nbdcopy", uri, str(out)])
    assert sha256_file(out) == image.sha256()


def test_unix_socket_and_tcp_together(nbdserver, image, short_dir):
    path = os.path.join(short_dir, "nbd.sock")
    srv = nbdserver({"disk": image}, args=["--socket", path])
    assert len(srv.addresses) == 2
    a = nbd_handle(srv.unix_uri("disk"))
    b = nbd_handle(srv.uri("disk"))
    a.pwrite(b"\x42" * 4096, 8192)
    a.flush()
    assert b.pread(4096, 8192) == b"\x42" * 4096
    a.shutdown()
    b.shutdown()


def test_two_tcp_listeners(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--listen", "127.0.0.1:0"])
    tcp = [a for a in srv.addresses if not a.startswith("/")]
    assert len(tcp) == 2 and tcp[0] != tcp[1]
    for a in tcp:
        h = nbd_handle(f"nbd://{a}/disk")
        assert h.pread(4096, 0) == image.read(0, 4096)
        h.shutdown()


def test_config_file(nbdserver, make_image, tmp_path):
    a = make_image("a.img", size=1 * MiB)
    b = make_image("b.img", size=2 * MiB)
    cfg = tmp_path / "nbdserver.conf"
    cfg.write_text(
        "# test configuration\n"
        "listen = 127.0.0.1:0\n"
        f"export = alpha={a.path},desc=from config\n"
        f"export = beta={b.path},ro\n"
        "max-block = 65536\n"
    )
    srv = nbdserver(args=["--config", str(cfg)], listen=False)
    import nbd
    h = nbd_handle(srv.uri("alpha"))
    assert h.get_size() == a.size
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 65536
    assert h.pread(4096, 0) == a.read(0, 4096)
    h.shutdown()
    h = nbd_handle(srv.uri("beta"))
    assert h.is_read_only()
    assert h.get_size() == b.size
    h.shutdown()


def test_config_file_combined_with_command_line(nbdserver, make_image, tmp_path):
    a = make_image("a.img", size=1 * MiB)
    b = make_image("b.img", size=2 * MiB)
    cfg = tmp_path / "nbdserver.conf"
    cfg.write_text(f"export = alpha={a.path}\n")
    srv = nbdserver({"beta": b}, args=["--config", str(cfg)])
    for name, img in (("alpha", a), ("beta", b)):
        h = nbd_handle(srv.uri(name))
        assert h.get_size() == img.size
        h.shutdown()


def test_sd_notify_ready(nbdserver, image, short_dir):
    path = os.path.join(short_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=path)
    srv = nbdserver({"disk": image}, env=env)
    messages = []
    deadline = time.monotonic() + 10
    while not any("READY=1" in m for m in messages) and time.monotonic() < deadline:
        messages.append(sock.recv(4096).decode(errors="replace"))
    sock.close()
    assert any("READY=1" in m.split("\n") for m in messages), messages
    h = nbd_handle(srv.uri("disk"))
    h.shutdown()


def test_socket_activation(image, tmp_path):
    """LISTEN_FDS=1 with the listening socket on fd 3, as systemd passes it."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    fd = lsock.fileno()

    def child_setup():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)
        os.environ["LISTEN_FDS"] = "1"
        os.environ["LISTEN_PID"] = str(os.getpid())

    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([NBDSERVER, "--export", f"disk={image.path}"],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                close_fds=False, preexec_fn=child_setup)
    lsock.close()
    try:
        h = nbd_handle(f"nbd://127.0.0.1:{port}/disk")  # the kernel queues it until accepted
        assert h.pread(4096, 0) == image.read(0, 4096)
        h.shutdown()
        proc.terminate()
        assert proc.wait(15) == 0, err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_listener(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--listen", "[::1]:0"], listen=False)
    (addr,) = srv.addresses
    assert addr.startswith("[::1]:"), addr
    assert srv.uri("disk").startswith("nbd://[::1]:")
    h = nbd_handle(srv.uri("disk"))
    assert h.pread(4096, 0) == image.read(0, 4096)
    h.shutdown()
