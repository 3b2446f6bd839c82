"""The `tls` security tier (issue 13, docs/security.md): `--tls require`.

- Before STARTTLS (raw client, nbdraw.py: Debian's libnbd 1.14 has no
  nbd_opt_starttls): every option but ABORT gets NBD_REP_ERR_TLS_REQD with
  its payload drained, in order and in sync; EXPORT_NAME closes; STARTTLS
  with data is invalid; plaintext sent after STARTTLS is the TLS stream and
  is never parsed as NBD. Nothing before TLS touches the store.
- Over TLS (libnbd with a PSK file): a node reads and writes its own view;
  generations are read-only for any identity; another node's view, under any
  spelling, is refused. Bad credentials are refused with the reason in the
  server's log only.
- A packet capture in a network namespace never holds a byte pattern a node
  wrote and read back, and does hold it when the same run uses --tls off.

Identities come from --tls-psk-file (psktool lines IDENTITY:HEX): node-a
and node-b are named like nodes, `ops` like none. The store's own node keys
(`nbdserver admin key`) are read at each handshake: rotation, removal and
expiry take effect at once.
"""

import ctypes
import os
import random
import re
import signal
import socket
import subprocess
import time

import nbd
import pytest

from conftest import MiB, run
from nbdraw import (OPT_ABORT, OPT_EXPORT_NAME, OPT_EXTENDED_HEADERS, OPT_GO, OPT_INFO,
                    OPT_LIST, OPT_LIST_META_CONTEXT, OPT_REPLY_MAGIC, OPT_SET_META_CONTEXT,
                    OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID,
                    REP_ERR_TLS_REQD, Closed, RawClient, option_bytes)
from nbdtls import starttls
from storeutil import admin, make_store, serve_store
from test_lab_tier import tree  # every path of the store with its digest

SIZE = 4 * MiB
IDENTITIES = ("node-a", "node-b", "ops")


def new_key():
    return os.urandom(32).hex()


def write_psk_file(path, lines):
    """A psktool file (IDENTITY:HEX per line), mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for identity, key in lines:
            f.write(f"{identity}:{key}\n")
    return str(path)


class Tier:
    """A server (--tls require, or `tls`) on a fresh store, and a PSK file
    per identity (each client holds its own key only)."""

    def __init__(self, start, tmp_path, tls="require"):
        self.store, self.base = make_store(tmp_path, size=SIZE)
        self.keys = {i: new_key() for i in IDENTITIES}
        self.client_files = {i: write_psk_file(tmp_path / f"{i}.psk", [(i, k)])
                             for i, k in self.keys.items()}
        self.server_file = write_psk_file(tmp_path / "server.psk", self.keys.items())
        args = ["--tls", tls]
        if tls == "require":
            args += ["--tls-psk-file", self.server_file]
        self.srv = serve_store(start, self.store, *args)
        self.initial = tree(self.store)  # as the server left it at start

    @property
    def port(self):
        return self.srv.tcp[1]

    def raw(self):
        c = RawClient(self.srv.tcp)
        c.handshake()
        return c

    def uri(self, identity, export, psk_file=None):
        f = psk_file or self.client_files[identity]
        return f"nbds://{identity}@127.0.0.1:{self.port}/{export}?tls-psk-file={f}"

    def handle(self, identity, export, psk_file=None):
        """A libnbd handle over TLS as `identity`; raises nbd.Error if refused."""
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(psk_file or self.client_files[identity])
        h.set_tls_username(identity)
        h.set_export_name(export)
        h.connect_tcp("127.0.0.1", str(self.port))
        return h


@pytest.fixture
def tier(nbdserver, tmp_path):
    return Tier(nbdserver, tmp_path)


# ---------------------------------------------------------------- before STARTTLS

def meta_data(export, contexts=("base:allocation",)):
    data = len(export).to_bytes(4, "big") + export.encode()
    data += len(contexts).to_bytes(4, "big")
    for c in contexts:
        data += len(c).to_bytes(4, "big") + c.encode()
    return data


def refused_before_tls():
    """(option, data) pairs that must each get NBD_REP_ERR_TLS_REQD. The
    payloads of the last two hold whole options (ABORT, EXPORT_NAME): a
    server that parsed a payload it should have drained would act on them."""
    hidden = option_bytes(OPT_ABORT) + option_bytes(OPT_EXPORT_NAME, b"lab/new-node")
    big = (hidden * (70 * 1024 // len(hidden) + 1))[:70 * 1024]  # > the 64 KiB buffer
    return [
        (OPT_LIST, b""),
        (OPT_INFO, RawClient.go_data("lab")),
        (OPT_INFO, RawClient.go_data("lab/new-node")),
        (OPT_GO, RawClient.go_data("lab/new-node")),
        (OPT_GO, RawClient.go_data("lab@g1")),
        (OPT_STRUCTURED_REPLY, b""),
        (OPT_LIST_META_CONTEXT, meta_data("lab/new-node")),
        (OPT_SET_META_CONTEXT, meta_data("lab/new-node")),
        (OPT_EXTENDED_HEADERS, b""),
        (0x7777, hidden),
        (OPT_GO, big),
    ]


def assert_tls_reqd(reply, opt):
    assert reply.opt == opt and reply.type == REP_ERR_TLS_REQD, (
        f"option {opt:#x} before STARTTLS: {reply!r} {reply.data[:200]!r}")
    assert len(reply.data) <= 512 and all(32 <= ch < 127 for ch in reply.data), reply.data


def test_every_option_before_starttls_is_refused_drained_and_in_sync(tier):
    before = tree(tier.store)
    opts = refused_before_tls()
    c = tier.raw()
    # One at a time, each answered before the next is sent...
    for opt, data in opts:
        c.send_option(opt, data)
        assert_tls_reqd(c.recv_option_reply(), opt)
    # ...then all in one send(): the replies come in order, one each.
    c.send(b"".join(option_bytes(opt, data) for opt, data in opts))
    for opt, _ in opts:
        assert_tls_reqd(c.recv_option_reply(), opt)
    c.assert_open()
    # ABORT still works: an ACK (or a close), and the connection ends.
    c.send_option(OPT_ABORT)
    try:
        r = c.recv_option_reply()
        assert r.opt == OPT_ABORT and r.type == REP_ACK, r
    except Closed:
        pass
    c.wait_closed()
    c.close()
    tier.srv.assert_alive()
    # No node was created, nothing in the store changed.
    assert not os.path.exists(os.path.join(tier.store, "nodes", "new-node"))
    assert tree(tier.store) == before


@pytest.mark.parametrize("export", ["lab", "lab/node-a", "lab/new-node"])
def test_export_name_before_starttls_closes_without_a_reply(tier, export):
    before = tree(tier.store)
    c = tier.raw()
    c.send_option(OPT_EXPORT_NAME, export.encode())
    assert c.recv_some() == b"", "the server answered NBD_OPT_EXPORT_NAME before TLS"
    c.close()
    tier.srv.assert_alive()
    assert tree(tier.store) == before


def test_starttls_with_data_is_invalid_and_the_connection_stays_in_sync(tier):
    c = tier.raw()
    r = c.opt_starttls(data=b"x" * 100)
    assert r.type == REP_ERR_INVALID, f"{r!r} {r.data!r}"
    # The 100 bytes were drained: the next option is answered as such.
    c.send_option(OPT_LIST)
    assert_tls_reqd(c.recv_option_reply(), OPT_LIST)
    # And a proper STARTTLS is still accepted.
    assert c.opt_starttls().type == REP_ACK
    c.close()


PLAINTEXT = {
    "go": option_bytes(OPT_GO, RawClient.go_data("lab/new-node")),
    "export_name": option_bytes(OPT_EXPORT_NAME, b"lab/new-node"),
    "abort": option_bytes(OPT_ABORT),
    "starttls": option_bytes(OPT_STARTTLS),
}


def read_until_closed(c, timeout):
    """Everything the server sends until it closes, or until `timeout`
    seconds pass without a byte. Returns (bytes, closed)."""
    got = b""
    while True:
        try:
            part = c.recv_some(timeout)
        except TimeoutError:
            return got, False
        if not part:
            return got, True
        got += part


def assert_no_nbd_after_starttls(got):
    """What follows STARTTLS's ACK is TLS: nothing, or an alert record."""
    assert got == b"" or got[0] == 0x15, (
        f"after STARTTLS the server sent {got[:40].hex()}, not a TLS alert or a close")
    assert OPT_REPLY_MAGIC.to_bytes(8, "big") not in got, got.hex()


@pytest.mark.parametrize("kind", PLAINTEXT)
def test_plaintext_after_starttls_is_the_tls_stream(tier, kind):
    """STARTTLS and plaintext options in one send(): they are the start of
    what must be a ClientHello. Enough of them to fill a TLS record (more
    than 16 KiB): the TLS handshake fails at once, and no NBD reply follows
    the ACK."""
    before = tree(tier.store)
    c = tier.raw()
    plaintext = PLAINTEXT[kind] * (20 * 1024 // len(PLAINTEXT[kind]) + 1)
    r = c.opt_starttls(then=plaintext)
    assert r.type == REP_ACK, f"{r!r} {r.data!r}"
    got, closed = read_until_closed(c, 5.0)
    assert closed, "the server kept the connection open after a bad ClientHello"
    assert_no_nbd_after_starttls(got)
    c.close()
    deadline = time.monotonic() + 5
    while "TLS handshake failed" not in tier.srv.stderr():
        assert time.monotonic() < deadline, tier.srv.stderr()[-3000:]
        time.sleep(0.02)
    tier.srv.assert_alive()
    assert tree(tier.store) == before


def test_one_plaintext_option_after_starttls_is_never_answered(tier):
    """One plaintext GO after STARTTLS, in the same send(): too short to be
    judged as a TLS record yet, it is held as TLS input, never answered; once
    the client stops sending the server closes, still without an NBD reply."""
    before = tree(tier.store)
    c = tier.raw()
    assert c.opt_starttls(then=PLAINTEXT["go"]).type == REP_ACK
    got, closed = read_until_closed(c, 1.0)
    assert_no_nbd_after_starttls(got)
    if not closed:
        c.sock.shutdown(socket.SHUT_WR)
        got, closed = read_until_closed(c, 5.0)
        assert closed, "the server kept the connection open after the client's EOF"
        assert_no_nbd_after_starttls(got)
    c.close()
    tier.srv.assert_alive()
    assert tree(tier.store) == before


# ---------------------------------------------------------------- after STARTTLS (raw)

def raw_tls(tier, identity, before=()):
    """A raw client that sends `before` (options; whatever the replies),
    STARTTLS, and completes the TLS handshake as `identity`."""
    c = tier.raw()
    for opt, data in before:
        c.option_replies(opt, data)
    assert c.opt_starttls().type == REP_ACK
    starttls(c, identity, tier.keys[identity])
    return c


def test_nothing_negotiated_before_starttls_survives_it(tier):
    c = raw_tls(tier, "node-a", before=[
        (OPT_STRUCTURED_REPLY, b""),
        (OPT_EXTENDED_HEADERS, b""),
        (OPT_SET_META_CONTEXT, meta_data("lab/node-a")),
    ])
    # A second STARTTLS, with or without data, is invalid, and changes nothing.
    assert c.opt_starttls().type == REP_ERR_INVALID
    assert c.opt_starttls(data=b"yy").type == REP_ERR_INVALID
    replies = c.option_replies(OPT_LIST)
    assert replies[-1].type == REP_ACK, replies
    # No structured replies were negotiated: a read gets a simple reply.
    c.opt_go("lab/node-a")
    assert c.write(0, b"a" * 4096) == 0
    err, data, reply = c.read(0, 4096)
    assert err == 0 and data == b"a" * 4096
    assert reply.chunks[0].kind == "simple", reply.chunks
    c.disconnect()
    c.close()


def test_over_tls_another_nodes_view_is_refused_with_a_reason(tier):
    c = raw_tls(tier, "node-a")
    final = c.opt_go("lab/node-b", check=False)[-1]
    assert final.is_error, final
    assert b"node-a" in final.data and len(final.data) <= 512, final.data
    # The connection stays usable: the node's own view attaches.
    c.opt_go("lab/node-a")
    c.disconnect()
    c.close()
    assert not os.path.exists(os.path.join(tier.store, "nodes", "node-b"))


def test_over_tls_export_name_attaches_a_generation(tier):
    c = raw_tls(tier, "ops")
    c.opt_export_name("lab")
    assert c.export_size == SIZE
    err, data, _ = c.read(SIZE - 4096, 4096)
    assert err == 0 and data == tier.base[-4096:]
    c.disconnect()
    c.close()


# ---------------------------------------------------------------- over TLS (libnbd)

def pattern(seed, n):
    return random.Random(seed).randbytes(n)


def test_a_node_reads_and_writes_its_own_view(tier):
    data = pattern(1, 256 * 1024)
    h = tier.handle("node-a", "lab/node-a")
    assert not h.is_read_only()
    assert h.get_size() == SIZE
    assert h.pread(4096, 0) == tier.base[:4096]
    h.pwrite(data, MiB)
    h.flush()
    h.shutdown()
    # Reconnects (libnbd and nbdinfo) see the write; the generation does not.
    h = tier.handle("node-a", "lab/node-a")
    assert h.pread(len(data), MiB) == data
    h.shutdown()
    out = run(["nbdinfo", "--size", tier.uri("node-a", "lab/node-a")]).stdout
    assert int(out) == SIZE
    h = tier.handle("node-a", "lab")
    assert h.pread(len(data), MiB) == tier.base[MiB:MiB + len(data)]
    h.shutdown()
    line = [l for l in tier.srv.stderr().splitlines() if "TLS established" in l][0]
    assert "TLS1.3" in line and "GCM" in line and "node-a" in line, line


@pytest.mark.parametrize("identity", IDENTITIES)
def test_generations_are_read_only_for_any_identity(tier, identity):
    for export in ("lab", "lab@g1"):
        h = tier.handle(identity, export)
        assert h.is_read_only(), export
        assert h.pread(64 * 1024, SIZE - 64 * 1024) == tier.base[-64 * 1024:]
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 4096, 0)
        h.shutdown()
    assert not os.path.exists(os.path.join(tier.store, "nodes", identity))


TRICKS = [
    "lab/node-b", "lab/NODE-B", "lab/Node-b", "LAB/node-b",
    "lab//node-b", "lab/node-b/", "lab/node-b//", "/lab/node-b",
    "lab%2Fnode-b", "lab/node%2Db", "lab/%6Eode-b",
    "lab/./node-b", "lab/../lab/node-b", "lab/node-a/../node-b",
    "lab/node-b?resume", "lab/node-b?mode=ephemeral", "lab/node-b?",
    "lab/node-b ", " lab/node-b", "lab/node-b\n",
    "lab@g1/node-b", "lab/node-b@g1",
    "lab/node-\u0431", "lab/node-b\u200b",
    "lab/node-b?" + "x" * 3000, "lab/node-b" + "/" * 300, "lab/" + "node-b" * 40,
]


def assert_attach_refused(tier, identity, export):
    """TLS works for `identity`, and then NBD_OPT_GO for `export` fails."""
    with pytest.raises(nbd.Error) as e:
        tier.handle(identity, export).shutdown()
    assert "tls" not in str(e.value).lower(), (identity, export, str(e.value))


def test_another_nodes_view_is_refused_under_every_spelling(tier):
    before = tree(tier.store)
    for identity in ("node-a", "ops"):
        for name in TRICKS:
            assert_attach_refused(tier, identity, name)
    tier.srv.assert_alive()
    assert tree(tier.store) == before
    # The view itself is fine: node-b attaches it.
    h = tier.handle("node-b", "lab/node-b")
    h.pwrite(b"b" * 4096, 0)
    h.shutdown()


def test_ops_attaches_no_nodes_view(tier):
    """An identity named like no node reads generations only."""
    assert_attach_refused(tier, "ops", "lab/node-a")
    assert tree(tier.store) == tier.initial


def handshake_failures(srv):
    return [l for l in srv.stderr().splitlines() if "TLS handshake failed" in l]


def refused_handshake(tier, identity, export, psk_file):
    """nbdinfo with these credentials must fail in TLS. Returns (what the
    client printed, the server's new log line), after checking that the
    server's reason is not in the client's output."""
    n = len(handshake_failures(tier.srv))
    p = run(["nbdinfo", "--size", tier.uri(identity, export, psk_file)], check=False)
    assert p.returncode != 0, f"{identity} with {psk_file} was accepted: {p.stdout}"
    client = p.stdout + p.stderr
    assert re.search(r"tls|gnutls|handshake", client, re.I), client
    deadline = time.monotonic() + 5
    while len(handshake_failures(tier.srv)) == n:
        assert time.monotonic() < deadline, f"no log line; client: {client}\n{tier.srv.stderr()}"
        time.sleep(0.02)
    line = handshake_failures(tier.srv)[n]
    reason = line.split("TLS handshake failed", 1)[1]
    assert reason.strip(": ") and reason.strip(": ") not in client, (line, client)
    detail = re.search(r"\(([^)]*)\)\s*$", reason)
    if detail:
        assert detail.group(1) not in client, (line, client)
    return client, line


def test_bad_credentials_are_refused_with_the_reason_logged_only(tier, tmp_path):
    wrong = write_psk_file(tmp_path / "wrong.psk", [("node-a", new_key())])
    _, line = refused_handshake(tier, "node-a", "lab/node-a", wrong)
    assert "node-a" in line and "match" in line, line
    # node-b's key presented as node-a.
    swapped = write_psk_file(tmp_path / "swapped.psk", [("node-a", tier.keys["node-b"])])
    refused_handshake(tier, "node-a", "lab/node-a", swapped)
    unknown = write_psk_file(tmp_path / "mallory.psk", [("mallory", new_key())])
    _, line = refused_handshake(tier, "mallory", "lab", unknown)
    assert "mallory" in line, line
    # Case is not folded: NODE-A is not node-a.
    upper = write_psk_file(tmp_path / "upper.psk", [("NODE-A", tier.keys["node-a"])])
    refused_handshake(tier, "NODE-A", "lab", upper)
    # None of it touched the store, and the right key still works.
    assert tree(tier.store) == tier.initial
    tier.handle("node-a", "lab/node-a").shutdown()


def test_a_plaintext_client_is_refused(tier):
    for export in ("lab", "lab/node-a"):
        p = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{tier.port}/{export}"], check=False)
        assert p.returncode != 0, p.stdout
        assert re.search(r"requires TLS", p.stderr), p.stderr
    # libnbd 1.14 reports ERR_TLS_REQD to NBD_OPT_LIST as "not supported".
    p = run(["nbdinfo", "--list", f"nbd://127.0.0.1:{tier.port}/"], check=False)
    assert p.returncode != 0, p.stdout
    assert "NBD_OPT_LIST: NBD_REP_ERR_TLS_REQD" in tier.srv.stderr()
    assert tree(tier.store) == tier.initial


# ---------------------------------------------------------------- the store's node keys

def admin_key(store, node, *args):
    """`nbdserver admin key NODE ARGS`; returns the printed NODE:HEX line."""
    r = admin(store, "key", node, *args)
    lines = [l for l in r.stdout.splitlines() if l.startswith(node + ":")]
    return lines[0] if lines else None


def test_store_keys_rotation_removal_and_expiry_take_effect_at_once(tier, tmp_path):
    store = tier.store
    admin(store, "create", "node-k", "node-e", "--image", "lab")
    first = admin_key(store, "node-k")
    first_file = write_psk_file(tmp_path / "k1.psk", [tuple(first.split(":", 1))])
    h = tier.handle("node-k", "lab/node-k", first_file)
    h.pwrite(b"k" * 4096, 0)
    h.shutdown()
    # Rotated: the old value is refused, the new one works, with no restart.
    second = admin_key(store, "node-k")
    assert second != first
    second_file = write_psk_file(tmp_path / "k2.psk", [tuple(second.split(":", 1))])
    _, line = refused_handshake(tier, "node-k", "lab/node-k", first_file)
    assert "node-k" in line and "match" in line, line
    h = tier.handle("node-k", "lab/node-k", second_file)
    assert h.pread(4096, 0) == b"k" * 4096
    h.shutdown()
    # Removed: refused.
    admin(store, "key", "node-k", "--remove")
    _, line = refused_handshake(tier, "node-k", "lab/node-k", second_file)
    assert "node-k" in line and "no key" in line, line
    # Expired: works until it expires, then refused.
    start = time.monotonic()
    exp = admin_key(store, "node-e", "--expires", "3s")
    exp_file = write_psk_file(tmp_path / "e.psk", [tuple(exp.split(":", 1))])
    tier.handle("node-e", "lab/node-e", exp_file).shutdown()
    assert time.monotonic() - start < 2.5, "too slow to test the key before it expired"
    time.sleep(max(0.0, start + 4.2 - time.monotonic()))
    _, line = refused_handshake(tier, "node-e", "lab/node-e", exp_file)
    assert "node-e" in line and "expired" in line, line


# ---------------------------------------------------------------- packet capture

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


@pytest.fixture
def netns(request):
    """A fresh network namespace with loopback up; this test's thread (and
    so every process it starts) runs in it until the test ends."""
    name = f"nbdtls-{os.getpid()}-{random.randrange(1 << 30)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
    request.addfinalizer(lambda: subprocess.run(["ip", "netns", "del", name]))
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    setns(f"/run/netns/{name}")

    def leave():
        try:
            if _libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original namespace")
        finally:
            os.close(original)
    request.addfinalizer(leave)
    return name


NBDSH_SCRIPT = """
h.set_uri_allow_local_file(True)
h.connect_uri(URI)
data = open(PATTERN, 'rb').read()
h.pwrite(data, 0)
h.flush()
assert h.pread(len(data), 0) == data
print('ok')
"""


def captured_run(tmp_path, srv, uri, data):
    """nbdsh writes `data` at 0 of `uri` and reads it back while tcpdump
    records loopback. Returns the capture's bytes."""
    cap = tmp_path / f"cap-{srv.pid}.pcap"
    dump = subprocess.Popen(["tcpdump", "-i", "lo", "-n", "-U", "-s", "0", "-w", str(cap),
                             "tcp"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = dump.stderr.readline()  # "listening on lo, ..." once capturing
        assert "listening on" in line, line + dump.stderr.read()
        pat = tmp_path / "pattern.bin"
        pat.write_bytes(data)
        env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
        script = NBDSH_SCRIPT.replace("URI", repr(uri)).replace("PATTERN", repr(str(pat)))
        out = run(["nbdsh", "-c", script], env=env).stdout
        assert "ok" in out, out
        time.sleep(0.3)  # -U writes each packet as it arrives; let the last ones land
    finally:
        dump.send_signal(signal.SIGINT)
        try:
            dump.wait(10)
        except subprocess.TimeoutExpired:
            dump.kill()
            dump.wait(5)
    return cap.read_bytes()


def windows(data, n=64, size=32):
    rnd = random.Random(7)
    return [data[o:o + size] for o in (rnd.randrange(len(data) - size) for _ in range(n))]


@pytest.mark.parametrize("tls", ["require", "off"])
def test_a_nodes_pattern_never_crosses_the_wire_in_plaintext(nbdserver, tmp_path, netns, tls):
    t = Tier(nbdserver, tmp_path, tls=tls)
    data = pattern(0xC0FFEE, MiB)
    if tls == "require":
        uri = t.uri("node-a", "lab/node-a")
    else:
        uri = f"nbd://127.0.0.1:{t.port}/lab/node-a"
    cap = captured_run(tmp_path, t.srv, uri, data)
    assert len(cap) > MiB, f"the capture holds {len(cap)} bytes: it missed the transfer"
    seen = [w for w in windows(data) if w in cap]
    if tls == "require":
        assert not seen, f"{len(seen)} of 64 windows of the pattern are in the capture"
    else:
        # The control: a capture of the same run in plaintext holds the pattern
        # (but for windows that straddle packets in both directions).
        assert len(seen) >= 48, f"only {len(seen)} of 64 windows in a plaintext capture"
