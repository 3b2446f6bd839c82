"""The node agent's TLS upstream (issue 13, the `tls` tier):
`nbdserver node --tls require --tls-key-file FILE`, and node::NbdClient under
it (tests/nbdclient-probe --tls-key-file).

- The flags: a missing, group- or world-readable, malformed or other node's
  key file exits 2 with the reason.
- A man in the middle that strips STARTTLS (Relay, below: a real plaintext
  `nbdserver --store` behind it): the agent refuses, logs why and names the
  server, and sends nothing after its NBD_OPT_STARTTLS.
- Against `nbdserver --store --tls require` with the node's key from
  `admin key`: reads and writes through the agent's socket; a wrong key does
  not attach, and says why; a relay that lets the first connection through
  and strips STARTTLS from the reconnects gets nothing in plaintext, and
  the kernel's read waits until TLS is back.
- The first attach keeps trying (the key reaches a node once per arming):
  an agent started before its server, or before the server has its key,
  attaches once it is there, logs each reason once, and its key file
  still works afterwards; an unknown export still ends it at once.
- node::NbdClient against nbdkit --tls=require --tls-psk (a TLS-PSK server
  that is not ours): reads, writes and 4 threads of both work with the key;
  a wrong key fails the TLS handshake; nbdkit without TLS refuses STARTTLS.
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

import nbd
import pytest

from conftest import NBDSERVER, run, spawn, wait_ready
from sockutil import Listener, recv_exact
from storeutil import MiB, admin, kill_if_running, make_store, stop_cleanly, wait_for_text
from test_nbd_client import PROBE
from test_node_agent import free_port

NODE = "n1"
HEX = "0123456789abcdef" * 4
NBD_OPT_STARTTLS = 5
NBD_REP_ERR_UNSUP = (1 << 31) | 1
OPT_REPLY_MAGIC = 0x3e889045565a9


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="nbdtls", dir="/tmp")  # short: sun_path holds 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def key_file(tmp_path, line=f"{NODE}:{HEX}\n", mode=0o600, name="node.psk"):
    path = tmp_path / name
    path.write_text(line)
    path.chmod(mode)
    return str(path)


class Relay(Listener):
    """A man in the middle on 127.0.0.1 in front of `upstream` (host, port),
    for each connection:
    - "pass": relays every byte both ways;
    - "strip": relays the server's greeting and the client's flags, answers
      the client's NBD_OPT_STARTTLS itself with NBD_REP_ERR_UNSUP, as a
      plaintext-only server would;
    - "strip-relay": the same, but the server answers the STARTTLS;
    and in both strip modes records every byte the client sends after its
    first option until it closes, forwarding none of them."""

    def __init__(self, upstream, mode="strip"):
        self.upstream = upstream
        self.mode = mode
        self.sessions = []
        self.open = []
        super().__init__()

    def _session(self, c):
        s = socket.create_connection(self.upstream)
        self.open += [c, s]
        if self.mode == "pass":
            for a, b in ((c, s), (s, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
            return
        rec = {"first_option": None, "after": b"", "done": threading.Event()}
        self.sessions.append(rec)
        try:
            c.sendall(recv_exact(s, 18))  # the greeting
            s.sendall(recv_exact(c, 4))   # the client's flags
            hdr = recv_exact(c, 16)
            _, opt, length = struct.unpack(">QII", hdr)
            rec["first_option"] = opt
            data = recv_exact(c, length)
            if self.mode == "strip-relay":
                s.sendall(hdr + data)
                head = recv_exact(s, 20)
                c.sendall(head + recv_exact(s, struct.unpack(">I", head[16:])[0]))
            else:
                c.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, NBD_REP_ERR_UNSUP, 0))
            c.settimeout(10)
            while True:
                b = c.recv(65536)
                if not b:
                    break
                rec["after"] += b
        except (OSError, ConnectionError):
            pass
        finally:
            rec["done"].set()
            c.close()
            s.close()

    @staticmethod
    def _pipe(a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        for x in (a, b):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        """Breaks every connection so far (the client sees a reset)."""
        for x in self.open:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        super().close()
        self.cut()


def node_argv(server, sockdir, *extra, export=f"lab/{NODE}"):
    return ["node", "--server", server, "--export", export,
            "--socket", os.path.join(sockdir, "agent.sock"), *extra]


def agent_flags(*argv):
    return subprocess.run([NBDSERVER, *argv], capture_output=True, text=True, timeout=30)


# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("case,why", [
    ("no-file", "--tls require needs --tls-key-file FILE"),
    ("missing", "No such file or directory"),
    ("0644", "permissions 0644 are too open"),
    ("0640", "permissions 0640 are too open"),
    ("0604", "permissions 0604 are too open"),
    ("other-node", "the key is for node 'n2', and --export names node 'n1'"),
    ("not-psktool", "not IDENTITY:HEX (psktool format)"),
    ("short-key", "the key is not 64 hex digits"),
    ("two-lines", "expected one line NODE:HEX"),
    ("empty", "empty: expected one line NODE:HEX"),
    ("tls-maybe", "--tls must be off or require, got 'maybe'"),
    ("file-without-tls", "--tls-key-file is for --tls require"),
])
def test_bad_tls_flags_exit_2_with_the_reason(tmp_path, sockdir, case, why):
    good = key_file(tmp_path)
    args = {
        "no-file": ["--tls", "require"],
        "missing": ["--tls", "require", "--tls-key-file", str(tmp_path / "none")],
        "0644": ["--tls", "require", "--tls-key-file", key_file(tmp_path, mode=0o644, name="a")],
        "0640": ["--tls", "require", "--tls-key-file", key_file(tmp_path, mode=0o640, name="b")],
        "0604": ["--tls", "require", "--tls-key-file", key_file(tmp_path, mode=0o604, name="c")],
        "other-node": ["--tls", "require",
                       "--tls-key-file", key_file(tmp_path, f"n2:{HEX}\n", name="d")],
        "not-psktool": ["--tls", "require", "--tls-key-file", key_file(tmp_path, HEX, name="e")],
        "short-key": ["--tls", "require",
                      "--tls-key-file", key_file(tmp_path, f"{NODE}:{HEX[2:]}", name="f")],
        "two-lines": ["--tls", "require",
                      "--tls-key-file", key_file(tmp_path, f"{NODE}:{HEX}\n{NODE}:{HEX}\n",
                                                 name="g")],
        "empty": ["--tls", "require", "--tls-key-file", key_file(tmp_path, "", name="h")],
        "tls-maybe": ["--tls", "maybe", "--tls-key-file", good],
        "file-without-tls": ["--tls-key-file", good],
    }[case]
    p = agent_flags(*node_argv("127.0.0.1:1", sockdir, *args))
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert why in p.stderr, p.stderr
    assert HEX not in p.stderr and HEX[2:] not in p.stderr  # never the key


# ---------------------------------------------------------------- a man in the middle

@pytest.fixture
def plain_server(nbdserver, tmp_path):
    store, _ = make_store(tmp_path, size=4 * MiB)
    return nbdserver(args=["--listen", "127.0.0.1:0", "--store", store, "--threads", "2"],
                     listen=False)


@pytest.mark.parametrize("mode", ["strip", "strip-relay"])
def test_an_agent_whose_starttls_is_stripped_sends_nothing_more(plain_server, tmp_path, sockdir,
                                                                mode):
    """The first attach: the agent retries (the server may speak TLS a
    moment later) until --attach-timeout, then exits 1; it says why once
    and names the server; not one byte follows its NBD_OPT_STARTTLS on any
    try, so nothing of the node's (its export name, its blocks) crosses in
    plaintext."""
    relay = Relay(plain_server.tcp, mode)
    try:
        argv = node_argv(relay.address, sockdir, "--tls", "require",
                         "--tls-key-file", key_file(tmp_path), "--attach-timeout", "2",
                         "--ready-file", str(tmp_path / "ready"))
        proc, stderr_path = spawn(argv, str(tmp_path), name="agent")
        assert proc.wait(60) == 1
        err = open(stderr_path).read()
        assert relay.address in err, err
        assert len(relay.sessions) >= 2, "the agent did not retry"
        assert err.count("retrying") == 1, "the same refusal logged more than once"
        assert "given up after --attach-timeout 2 s" in err, err
        assert "node's key a moment later" not in err, err  # not a key problem
        assert "did not accept NBD_OPT_STARTTLS" in err, err
        assert "refusing to continue without TLS" in err, err
        if mode == "strip-relay":
            assert "TLS is not supported by this server" in err, err  # the server's own words
        assert not os.path.exists(tmp_path / "ready")
        assert relay.sessions, "the agent never connected"
        for rec in relay.sessions:
            assert rec["done"].wait(15)
            assert rec["first_option"] == NBD_OPT_STARTTLS
            assert rec["after"] == b"", f"sent in plaintext after STARTTLS: {rec['after']!r}"
    finally:
        relay.close()


# ---------------------------------------------------------------- nbdserver --tls require

@pytest.fixture
def tls_store(tmp_path):
    """A store, and the node key file of n1 that `admin key` made."""
    store, base = make_store(tmp_path, size=4 * MiB)
    line = admin(store, "key", NODE).stdout
    return store, base, key_file(tmp_path, line)


def tls_server(nbdserver, store):
    return nbdserver(args=["--listen", "127.0.0.1:0", "--store", store, "--threads", "2",
                           "--tls", "require"], listen=False)


def server_address(srv):
    host, port = srv.tcp
    return f"{host}:{port}"


def handle(sockdir):
    h = nbd.NBD()
    h.set_export_name(f"lab/{NODE}")
    h.connect_unix(os.path.join(sockdir, "agent.sock"))
    return h


def test_the_agent_reads_and_writes_over_tls(nbdserver, tls_store, sockdir, tmp_path):
    store, base, key = tls_store
    srv = tls_server(nbdserver, store)
    agent = nbdserver(args=node_argv(server_address(srv), sockdir, "--tls", "require",
                                     "--tls-key-file", key), listen=False)
    err = agent.stderr()
    assert "over TLS1.3/AES-" in err and f"as '{NODE}'" in err, err
    h = handle(sockdir)
    assert h.pread(4 * MiB, 0) == base
    data = bytes(range(256)) * 1024
    h.pwrite(data, MiB + 512)
    h.flush()
    assert h.pread(len(data), MiB + 512) == data
    h.shutdown()
    assert agent.terminate() == 0
    # The server has it, and a TLS client with the node's key reads it back.
    d = nbd.NBD()
    d.set_tls(nbd.TLS_REQUIRE)
    d.set_tls_psk_file(key)
    d.set_tls_username(NODE)
    d.set_export_name(f"lab/{NODE}?resume")
    d.connect_tcp(*map(str, srv.tcp))
    assert d.pread(len(data), MiB + 512) == data
    d.shutdown()


def test_a_wrong_key_does_not_attach_and_says_why(nbdserver, tls_store, sockdir, tmp_path):
    store, _, _ = tls_store
    srv = tls_server(nbdserver, store)
    wrong = key_file(tmp_path, f"{NODE}:{'e' * 64}\n", name="wrong.psk")
    argv = node_argv(server_address(srv), sockdir, "--tls", "require", "--tls-key-file", wrong,
                     "--attach-timeout", "1")
    proc, stderr_path = spawn(argv, str(tmp_path), name="agent")
    assert proc.wait(60) == 1
    err = open(stderr_path).read()
    assert f"cannot attach 'lab/{NODE}' yet: {server_address(srv)}: TLS handshake failed" in err
    assert "the server may have this node's key a moment later" in err, err
    assert f"cannot attach 'lab/{NODE}': {server_address(srv)}: TLS handshake failed" in err, err
    assert f"is the server's key for '{NODE}' the one this node has?" in err, err
    assert "e" * 64 not in err


# ---------------------------------------------------------------- the first attach keeps trying

def attached_agent_serves(proc, ready, stderr_path, sockdir, base):
    """Waits for the agent's ready file; reads the view and writes to it."""
    wait_ready(proc, ready, stderr_path, timeout=30)
    h = handle(sockdir)
    assert h.pread(4 * MiB, 0) == base
    h.pwrite(b"K" * 4096, MiB)
    h.flush()
    h.shutdown()


def key_still_works(nbdserver, srv, key, sockdir):
    """A second agent with the same key file attaches, and sees the first's write."""
    again = nbdserver(args=node_argv(server_address(srv), sockdir, "--tls", "require",
                                     "--tls-key-file", key, "--attach-timeout", "10"),
                      listen=False)
    h = handle(sockdir)
    assert h.pread(4096, MiB) == b"K" * 4096
    h.shutdown()
    assert again.terminate() == 0


def test_an_agent_started_before_its_tls_server_attaches_once_it_is_up(
        nbdserver, tls_store, sockdir, tmp_path):
    """The server is not there yet (a node booting while it restarts): the
    agent keeps trying, logs the refused connection once, and attaches over
    TLS once the server listens. The key file is as it was, and works."""
    store, base, key = tls_store
    with open(key) as f:
        line = f.read()
    port = free_port()
    ready = str(tmp_path / "ready")
    argv = node_argv(f"127.0.0.1:{port}", sockdir, "--tls", "require", "--tls-key-file", key,
                     "--ready-file", ready)
    proc, stderr_path = spawn(argv, str(tmp_path), name="agent")
    try:
        wait_for_text(stderr_path, "Connection refused")
        time.sleep(2)  # passes at 0.2, 0.6, 1.4 s: one line for them all
        assert proc.poll() is None, open(stderr_path).read()
        assert not os.path.exists(ready)
        err = open(stderr_path).read()
        assert err.count("Connection refused") == 1, err
        assert f"cannot attach 'lab/{NODE}' yet: 127.0.0.1:{port}: connect" in err, err
        srv = nbdserver(args=["--listen", f"127.0.0.1:{port}", "--store", store, "--threads", "2",
                              "--tls", "require"], listen=False)
        attached_agent_serves(proc, ready, stderr_path, sockdir, base)
        err = open(stderr_path).read()
        assert f"upstream: 'lab/{NODE}' on 127.0.0.1:{port} over TLS1.3/AES-" in err, err
        assert line[line.index(":") + 1:].strip() not in err  # never the key
        stop_cleanly(proc)
    finally:
        kill_if_running(proc)
    with open(key) as f:
        assert f.read() == line
    key_still_works(nbdserver, srv, key, sockdir)


def test_an_agent_whose_key_the_server_lacks_yet_attaches_once_it_has_it(
        nbdserver, tls_store, sockdir, tmp_path):
    """The server runs but has no key for the node yet: every TLS handshake
    fails. The agent says so once (the key may come a moment later), keeps
    trying, and attaches once the server has the key."""
    store, base, key = tls_store
    record = os.path.join(store, "nodes", NODE, "tls-key.json")
    with open(record) as f:
        saved = f.read()
    admin(store, "key", NODE, "--remove")
    srv = tls_server(nbdserver, store)
    ready = str(tmp_path / "ready")
    argv = node_argv(server_address(srv), sockdir, "--tls", "require", "--tls-key-file", key,
                     "--ready-file", ready)
    proc, stderr_path = spawn(argv, str(tmp_path), name="agent")
    try:
        wait_for_text(stderr_path, "TLS handshake failed")
        time.sleep(2)
        assert proc.poll() is None, open(stderr_path).read()
        assert not os.path.exists(ready)
        err = open(stderr_path).read()
        assert err.count("TLS handshake failed") == 1, err
        assert "the server may have this node's key a moment later" in err, err
        # The key comes back (as an admin's restore would put it).
        tmp = record + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, saved.encode())
        os.close(fd)
        os.replace(tmp, record)
        attached_agent_serves(proc, ready, stderr_path, sockdir, base)
        stop_cleanly(proc)
    finally:
        kill_if_running(proc)
    key_still_works(nbdserver, srv, key, sockdir)


def test_an_unknown_export_ends_the_first_attach_at_once(nbdserver, tls_store, sockdir,
                                                         tmp_path):
    """A refusal that retrying cannot change: exit 1 at once, with the
    server's answer, and no retry."""
    store, _, key = tls_store
    srv = tls_server(nbdserver, store)
    argv = node_argv(server_address(srv), sockdir, "--tls", "require", "--tls-key-file", key,
                     export=f"nosuch/{NODE}")
    t0 = time.monotonic()
    proc, stderr_path = spawn(argv, str(tmp_path), name="agent")
    assert proc.wait(30) == 1
    assert time.monotonic() - t0 < 5
    err = open(stderr_path).read()
    assert f"cannot attach 'nosuch/{NODE}': {server_address(srv)}: export 'nosuch/{NODE}' " \
           "refused: NBD_REP_ERR_UNKNOWN" in err, err
    assert "retrying" not in err, err


def test_a_man_in_the_middle_stripping_starttls_on_a_reconnect_gets_nothing(
        nbdserver, tls_store, sockdir, tmp_path):
    """The agent is attached over TLS through a relay; the relay cuts the
    connection and strips STARTTLS from the reconnects. The agent refuses
    each, logs it, sends nothing after STARTTLS, and keeps retrying; a read
    on the kernel's socket waits meanwhile (does not fail), and completes
    once the relay lets TLS through again."""
    store, base, key = tls_store
    srv = tls_server(nbdserver, store)
    relay = Relay(srv.tcp, "pass")
    try:
        agent = nbdserver(args=node_argv(relay.address, sockdir, "--tls", "require",
                                         "--tls-key-file", key), listen=False)
        h = handle(sockdir)
        assert h.pread(65536, 0) == base[:65536]
        relay.mode = "strip"
        relay.cut()
        result = {}

        def read():
            try:
                h2 = handle(sockdir)
                result["data"] = h2.pread(65536, MiB)
                h2.shutdown()
            except Exception as e:  # noqa: BLE001 -- reported below
                result["error"] = e

        t = threading.Thread(target=read, daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        while len(relay.sessions) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(relay.sessions) >= 3, "the agent did not retry"
        time.sleep(1)
        assert t.is_alive() and not result, f"the kernel's read did not wait: {result}"
        err = agent.stderr()
        assert "error upstream: 'lab/n1' on " + relay.address in err, err
        assert "did not accept NBD_OPT_STARTTLS" in err and "refusing to continue" in err, err
        assert err.count("did not accept") == 1, "the same refusal logged more than once"
        relay.mode = "pass"
        t.join(30)
        assert result.get("data") == base[MiB:MiB + 65536], result
        for rec in relay.sessions:
            assert rec["done"].wait(15)
            assert rec["first_option"] == NBD_OPT_STARTTLS
            assert rec["after"] == b"", f"sent in plaintext after STARTTLS: {rec['after']!r}"
        assert "reconnected to " + relay.address in agent.stderr()
        h.shutdown()
    finally:
        relay.close()


# ---------------------------------------------------------------- NbdClient and nbdkit

needs_nbdkit = pytest.mark.skipif(not shutil.which("nbdkit"), reason="needs nbdkit")


@pytest.fixture
def nbdkit(tmp_path, sockdir):
    """start(*args) -> "unix:PATH" of nbdkit's memory plugin (4 MiB)."""
    procs = []

    def start(*args):
        sock = os.path.join(sockdir, f"kit{len(procs)}.sock")
        p = subprocess.Popen(["nbdkit", "-f", "-U", sock, *args, "memory", "4M"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        return f"unix:{sock}"

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def probe(endpoint, *ops, key=None):
    argv = [PROBE, "--timeout", "20000"] + (["--tls-key-file", key] if key else [])
    p = run(argv + [endpoint, "disk", *[str(o) for o in ops]], check=False)
    return p.returncode, [json.loads(l) for l in p.stdout.splitlines() if l.strip()], p.stderr


@needs_nbdkit
def test_nbd_client_reads_and_writes_over_tls_with_nbdkit(nbdkit, tmp_path):
    key = key_file(tmp_path)
    ep = nbdkit("--tls=require", f"--tls-psk={key}")
    data = bytes(range(256)) * 150  # one argument: at most 128 KiB of hex
    rc, out, err = probe(ep, "info", "write", 12345, data.hex(), "read", 12345, len(data),
                         "flush", "stress", 4, 200, 7, MiB, tmp_path / "model", key=key)
    assert rc == 0, (out, err)
    assert out[0]["tls"].startswith("TLS1.3/AES-"), out[0]
    assert out[0]["size"] == 4 * MiB
    assert bytes.fromhex(out[2]["data"]) == data
    assert out[4]["result"] == "ok", out[4]


@needs_nbdkit
def test_nbd_client_with_a_wrong_key_fails_the_tls_handshake(nbdkit, tmp_path):
    ep = nbdkit("--tls=require", f"--tls-psk={key_file(tmp_path)}")
    wrong = key_file(tmp_path, f"{NODE}:{'f' * 64}\n", name="wrong.psk")
    rc, out, _ = probe(ep, "info", key=wrong)
    assert rc == 3, out
    assert out[0]["tls_failed"] is True
    assert "TLS handshake failed" in out[0]["why"], out[0]
    assert f"key for '{NODE}'" in out[0]["why"], out[0]


@needs_nbdkit
def test_nbd_client_refuses_a_server_without_tls(nbdkit, tmp_path):
    ep = nbdkit("--tls=off")
    rc, out, _ = probe(ep, "info", key=key_file(tmp_path))
    assert rc == 3, out
    assert out[0]["tls_failed"] is True
    assert "did not accept NBD_OPT_STARTTLS" in out[0]["why"], out[0]
