"""Bad command lines: nbdserver must exit non-zero, quickly, with a message
that says what is wrong."""

import subprocess

import pytest

from conftest import NBDSERVER, MiB


def run_server(args, timeout=10):
    p = subprocess.run([NBDSERVER] + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, text=True)
    return p.returncode, p.stderr


def listen_args(tmp_path):
    return ["--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "ready")]


def test_nonexistent_export_file(tmp_path):
    missing = tmp_path / "does-not-exist.img"
    rc, err = run_server(listen_args(tmp_path) + ["--export", f"disk={missing}"])
    assert rc != 0
    assert str(missing) in err
    assert "no such file" in err.lower()
    assert not (tmp_path / "ready").exists()


def test_export_file_is_a_directory(tmp_path):
    rc, err = run_server(listen_args(tmp_path) + ["--export", f"disk={tmp_path}"])
    assert rc != 0
    assert str(tmp_path) in err


@pytest.mark.parametrize("spec, word", [
    ("noequals", "export"),
    ("=/dev/null", "export"),
    ("disk=", "export"),
    ("disk={img},bogus", "bogus"),
])
def test_bad_export_syntax(tmp_path, make_image, spec, word):
    img = make_image("x.img", size=1 * MiB)
    rc, err = run_server(listen_args(tmp_path) + ["--export", spec.format(img=img.path)])
    assert rc != 0
    assert word in err.lower(), err


def test_duplicate_export_name(tmp_path, make_image):
    img = make_image("x.img", size=1 * MiB)
    rc, err = run_server(listen_args(tmp_path) + ["--export", f"disk={img.path}",
                                                  "--export", f"disk={img.path}"])
    assert rc != 0
    assert "disk" in err


@pytest.mark.parametrize("listen", [
    "127.0.0.1",              # no port
    "127.0.0.1:notaport",
    "127.0.0.1:70000",        # port out of range
    "999.1.1.1:0",            # not an address
])
def test_bad_listen(tmp_path, make_image, listen):
    img = make_image("x.img", size=1 * MiB)
    rc, err = run_server(["--listen", listen, "--ready-file", str(tmp_path / "ready"),
                          "--export", f"disk={img.path}"])
    assert rc != 0
    assert "listen" in err.lower() or listen in err, err


def test_listen_address_in_use(tmp_path, make_image):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    img = make_image("x.img", size=1 * MiB)
    try:
        rc, err = run_server(["--listen", f"127.0.0.1:{port}", "--export", f"disk={img.path}"])
    finally:
        s.close()
    assert rc != 0
    assert str(port) in err, err


def test_unknown_option(tmp_path):
    rc, err = run_server(["--no-such-option"])
    assert rc != 0
    assert "no-such-option" in err


def test_no_exports(tmp_path):
    rc, err = run_server(listen_args(tmp_path))
    assert rc != 0
    assert "export" in err.lower()


def test_default_export_must_exist(tmp_path, make_image):
    img = make_image("x.img", size=1 * MiB)
    rc, err = run_server(listen_args(tmp_path) + ["--export", f"disk={img.path}",
                                                  "--default-export", "other"])
    assert rc != 0
    assert "other" in err


def test_bad_log_level(tmp_path, make_image):
    img = make_image("x.img", size=1 * MiB)
    rc, err = run_server(listen_args(tmp_path) + ["--export", f"disk={img.path}",
                                                  "--log-level", "loud"])
    assert rc != 0
    assert "log-level" in err


def test_missing_config_file(tmp_path):
    rc, err = run_server(["--config", str(tmp_path / "nope.conf")])
    assert rc != 0
    assert "nope.conf" in err


def test_help_and_version():
    rc, _ = run_server(["--help"])
    assert rc == 0
    p = subprocess.run([NBDSERVER, "--version"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0
    assert "nbdserver" in p.stdout + p.stderr


@pytest.mark.parametrize("args, word", [
    (["--max-block", "100"], "max-block"),
    (["--max-inflight", "0"], "max-inflight"),
    (["--max-connections", "0"], "max-connections"),
    (["--threads", "1000"], "threads"),
    (["--poll-us", "20000"], "poll-us"),
    (["--handshake-timeout", "0"], "timeout"),
    (["--threads", "two"], "threads"),
])
def test_bad_limits(tmp_path, make_image, args, word):
    img = make_image("x.img", size=1 * MiB)
    rc, err = run_server(listen_args(tmp_path) + ["--export", f"disk={img.path}"] + args)
    assert rc != 0
    assert word in err.lower(), err
    assert not (tmp_path / "ready").exists()
