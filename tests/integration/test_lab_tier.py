"""The `lab` security tier (issue 13, docs/security.md): no authentication,
but guards against accidents.

- The server says at start, once and at warn level, that nothing is
  authenticated.
- One writer per view: while a node's view is attached from one address, an
  attach from another is refused, naming both. Two source addresses come
  from raw clients bound to 127.0.0.2 and 127.0.0.3 (Linux routes all of
  127/8 to the loopback interface, so no namespace is needed).
- Address pinning: `admin pin NODE ADDRESS` / `unpin`, and --pin-addresses.
- Canonical export names: spelling tricks are refused and leave the store
  as it was.
- The audit log of admin changes.
"""

import hashlib
import json
import os
import time

import pytest

from nbdraw import CMD_FLUSH, Closed, RawClient, REP_ACK
from storeutil import admin, make_store, serve_store


def test_start_warns_once_that_nothing_is_authenticated(nbdserver, tmp_path):
    store, _ = make_store(tmp_path)
    srv = serve_store(nbdserver, store)
    lines = [l for l in srv.stderr().splitlines() if "no authentication" in l]
    assert len(lines) == 1, srv.stderr()
    assert " warning " in lines[0], lines[0]
    # It says what the tier guards against, and what it does not.
    for word in ("one writer per view", "spoof"):
        assert word in lines[0], lines[0]


# ---------------------------------------------------------------- one writer per view

A, B = "127.0.0.2", "127.0.0.3"
MAX_REASON = 512  # a refusal's text stays short, whatever it names


def attach(srv, export, source, check=True):
    """A raw client from `source` that sends NBD_OPT_GO for `export`.
    Returns (client, final reply); with check, the reply must be an ACK."""
    c = RawClient(srv.tcp, source=source)
    c.handshake()
    c.opt_structured_reply()
    final = c.opt_go(export, check=False)[-1]
    if check:
        assert final.type == REP_ACK, f"{export} from {source}: {final!r} {final.data!r}"
    return c, final


def pread(c, length, offset):
    err, data, _ = c.read(offset, length)
    assert err == 0, f"read error {err}"
    return data


def pwrite(c, data, offset):
    assert c.write(offset, data) == 0


def refused(srv, export, source):
    c, final = attach(srv, export, source, check=False)
    c.close()
    assert final.is_error, f"{export} from {source} was not refused"
    reason = final.data.decode(errors="replace")
    assert len(final.data) <= MAX_REASON, reason
    return reason


def attach_eventually(srv, export, source, timeout=10.0):
    """Attaches once the server has let go of the view's other connections
    (it notices their close asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        c, final = attach(srv, export, source, check=False)
        if final.type == REP_ACK:
            return c
        c.close()
        assert time.monotonic() < deadline, f"still refused: {final.data!r}"
        time.sleep(0.02)


def test_one_writer_per_view(nbdserver, tmp_path):
    store, _ = make_store(tmp_path)
    srv = serve_store(nbdserver, store, threads=2)
    # Several connections from one address (multi-connection), enough that
    # both loops run handshakes for the node.
    first = [attach(srv, "lab/n1", A)[0] for _ in range(6)]
    for _ in range(6):
        reason = refused(srv, "lab/n1", B)
        assert A in reason and B in reason and "n1" in reason, reason
    # NBD_OPT_EXPORT_NAME has no error reply: the connection is closed.
    c = RawClient(srv.tcp, source=B)
    c.handshake()
    with pytest.raises(Closed):
        c.opt_export_name("lab/n1")
    c.close()
    assert f"refusing an attach from {B}" in srv.stderr()
    # Another node, and the read-only generation, are not held by n1's writer.
    attach(srv, "lab/n2", B)[0].close()
    attach(srv, "lab", B)[0].close()
    # Data written from A is what A reads; B wrote nothing.
    pwrite(first[0], b"A" * 4096, 0)
    assert pread(first[1], 4096, 0) == b"A" * 4096
    for c in first:
        c.close()
    # Once every connection from A is gone, B may attach (and then A may not).
    second = attach_eventually(srv, "lab/n1", B)
    assert pread(second, 4096, 0) == b"A" * 4096
    reason = refused(srv, "lab/n1", A)
    assert f"attached from {B}" in reason and f"from {A}" in reason, reason
    second.close()


def test_resume_from_the_same_address_supersedes_from_another_is_refused(nbdserver, tmp_path):
    store, _ = make_store(tmp_path)
    srv = serve_store(nbdserver, store, threads=2)
    old = attach(srv, "lab/n1", A)[0]
    pwrite(old, b"o" * 4096, 0)
    # A resume from another address would close the writer's connections:
    # refused, and the writer keeps its connection.
    reason = refused(srv, "lab/n1?resume", B)
    assert "refusing a resume" in reason and A in reason and B in reason, reason
    assert pread(old, 4096, 0) == b"o" * 4096
    # The node's own resume (same host, new connection) supersedes the old one.
    new = attach(srv, "lab/n1?resume", A)[0]
    old.wait_closed()
    assert pread(new, 4096, 0) == b"o" * 4096
    new.close()


def test_resume_after_restart_from_the_same_address(nbdserver, tmp_path):
    store, _ = make_store(tmp_path)
    srv = serve_store(nbdserver, store, threads=2)
    conns = [attach(srv, "lab/n1", A)[0] for _ in range(3)]
    pwrite(conns[0], b"r" * 4096, 8192)
    assert conns[0].command(CMD_FLUSH).error == 0
    rc = srv.terminate()
    assert rc == 0, srv.stderr()[-3000:]
    for c in conns:
        c.close()
    srv = serve_store(nbdserver, store, threads=2)
    again = [attach(srv, "lab/n1?resume", A)[0] for _ in range(3)]
    assert pread(again[2], 4096, 8192) == b"r" * 4096
    assert B in refused(srv, "lab/n1?resume", B)
    for c in again:
        c.close()


# ---------------------------------------------------------------- address pinning

def read_pin(store, node):
    with open(os.path.join(store, "nodes", node, "pin")) as f:
        return f.read().strip()


def test_admin_pin_and_unpin(nbdserver, tmp_path):
    store, _ = make_store(tmp_path)
    admin(store, "create", "n1", "n2", "--image", "lab")
    r = admin(store, "pin", "n1", A)
    assert r.stdout.strip() == f"pinned n1 to {A}", r.stdout
    # An IPv4-mapped IPv6 address is the IPv4 address the server sees.
    assert admin(store, "pin", "n2", f"::ffff:{B}").stdout.strip() == f"pinned n2 to {B}"
    assert read_pin(store, "n2") == B
    srv = serve_store(nbdserver, store, threads=2)
    # Refused from another address even though nothing is attached.
    reason = refused(srv, "lab/n1", B)
    assert f"pinned to {A}" in reason and f"from {B}" in reason, reason
    assert f"pinned to {B}" in refused(srv, "lab/n2", A)
    c = attach(srv, "lab/n1", A)[0]
    pwrite(c, b"p" * 4096, 0)
    c.close()
    r = admin(store, "unpin", "n1")
    assert r.stdout.strip() == "unpinned n1", r.stdout
    assert not os.path.exists(os.path.join(store, "nodes", "n1", "pin"))
    assert admin(store, "unpin", "n1").stdout.strip() == "n1 was not pinned"
    c = attach_eventually(srv, "lab/n1", B)
    assert pread(c, 4096, 0) == b"p" * 4096
    c.close()


def test_admin_pin_refuses_bad_input(tmp_path):
    store, _ = make_store(tmp_path)
    admin(store, "create", "n1", "--image", "lab")
    for bad in ("10.0.0", "10.0.0.1:10809", "host.example", "", "x" * 5000):
        r = admin(store, "pin", "n1", bad, check=False)
        assert r.returncode == 1, (bad, r)
        assert "bad address" in r.stderr and len(r.stderr) < 300, r.stderr
    r = admin(store, "pin", "ghost", A, check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr, r.stderr
    assert admin(store, "pin", "n1", check=False).returncode == 2
    assert admin(store, "unpin", "ghost", check=False).returncode == 1
    assert not os.path.exists(os.path.join(store, "nodes", "n1", "pin"))
    assert not os.path.exists(os.path.join(store, "nodes", "ghost"))


def test_pin_addresses_pins_at_first_attach(nbdserver, tmp_path):
    store, _ = make_store(tmp_path)
    admin(store, "create", "n1", "--image", "lab")
    admin(store, "pin", "n1", B)
    srv = serve_store(nbdserver, store, "--pin-addresses", threads=2)
    # n2 is created at its first attach, and pinned to that address.
    c = attach(srv, "lab/n2", A)[0]
    assert read_pin(store, "n2") == A
    c.close()
    # An admin's pin is never replaced.
    attach(srv, "lab/n1", B)[0].close()
    assert read_pin(store, "n1") == B
    # The pin outlives the connection and the server.
    rc = srv.terminate()
    assert rc == 0, srv.stderr()[-3000:]
    srv = serve_store(nbdserver, store, threads=2)
    reason = refused(srv, "lab/n2", B)
    assert f"pinned to {A}" in reason, reason
    attach(srv, "lab/n2", A)[0].close()


def test_unix_socket_clients_have_the_address_unix(nbdserver, tmp_path):
    store, _ = make_store(tmp_path)
    sock = str(tmp_path / "nbd.sock")
    srv = serve_store(nbdserver, store, "--socket", sock, "--pin-addresses", threads=2)
    c = RawClient(sock)
    c.handshake()
    c.opt_go("lab/n1")
    assert read_pin(store, "n1") == "unix"
    reason = refused(srv, "lab/n1", A)
    assert "pinned to unix" in reason, reason
    c.close()


# ---------------------------------------------------------------- canonical names

def tree(store):
    """Every path under the store with its contents' digest: the store's bytes."""
    out = {}
    for root, dirs, files in os.walk(store):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), store) + "/"] = None
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, store)] = hashlib.sha256(fh.read()).hexdigest()
    return out


LONG = "x" * 201  # one byte over the 200-byte limit of an image, generation or node name
TRICKS = [
    b"lab/N1", b"LAB/n1", b"Lab/n1",                       # case
    b"lab/n%31", b"lab%2Fn1", b"lab/%6E1",                 # percent-encoding
    b"lab/../n1", b"lab/..", b"../lab/n1", b"lab/./n1",   # dot parts
    b"lab//n1", b"/lab/n1", b"lab/", b"/n1", b"lab@",     # empty parts
    b"lab/n1/", b"lab/n1//",                               # trailing slashes
    b"lab/n1 ", b"lab/n1\n", b" lab/n1", b"lab/n1\t",      # blanks
    "lab/n\uff11".encode(), "l\u0430b/n1".encode(),         # look-alike letters
    b"lab/n1?", b"lab/n1?resume&", b"lab/n1?RESUME",      # malformed options
    b"lab@g1/n1",                                         # a node on a named generation
    ("lab/" + LONG).encode(), (LONG + "/n1").encode(), ("lab@" + LONG).encode(),
    b"lab/n1?" + b"\x01\xff" * 2000,                        # long, unprintable options
    b"lab/" + b"\x1b[31m" * 500,                            # terminal escapes
]


def test_spelling_tricks_are_refused_and_change_nothing(nbdserver, tmp_path):
    store, _ = make_store(tmp_path)
    admin(store, "create", "n1", "--image", "lab")
    srv = serve_store(nbdserver, store, threads=2)  # --nodes auto: a typo could create a node
    attach(srv, "lab/n1", A)[0].close()
    c = attach_eventually(srv, "lab/n1", B)  # n1's view is held from B meanwhile
    before = tree(store)
    for name in TRICKS:
        for source in (A, B):
            c2, final = attach(srv, name, source, check=False)
            c2.close()
            assert final.is_error, f"{name!r} was accepted from {source}"
            reason = final.data
            assert len(reason) <= MAX_REASON, (name, reason)
            # A refusal echoes at most 64 bytes of the name, escaped.
            assert b"x" * 65 not in reason and b"\x1b" not in reason, (name, reason)
            assert all(32 <= ch < 127 for ch in reason), (name, reason)
        # NBD_OPT_EXPORT_NAME: closed, and the log line is as bounded.
        r = RawClient(srv.tcp, source=A)
        r.handshake()
        with pytest.raises(Closed):
            r.send_option(1, name)
            r.recv_exact(1)
        r.close()
    pwrite(c, b"still here", 0)
    c.close()
    srv.assert_alive()
    after = tree(store)
    after = {k: v for k, v in after.items() if not k.endswith("node.json") and ".g1." not in k}
    before = {k: v for k, v in before.items() if not k.endswith("node.json") and ".g1." not in k}
    assert after == before
    assert "x" * 65 not in srv.stderr() and "\x1b" not in srv.stderr()


def test_admin_create_refuses_a_case_variant(tmp_path):
    store, _ = make_store(tmp_path)
    admin(store, "create", "node-a", "--image", "lab")
    before = tree(store)
    for name in ("Node-A", "NODE-A"):
        r = admin(store, "create", name, "--image", "lab", check=False)
        assert r.returncode == 1, r
        assert "only in case" in r.stderr and "node-a" in r.stderr, r.stderr
    r = admin(store, "create", "n2", "N2", "--image", "lab", check=False)
    assert r.returncode == 1 and "only in case" in r.stderr, r.stderr
    r = admin(store, "create", "y" * 201, "--image", "lab", check=False)
    assert r.returncode == 1 and len(r.stderr) < 1000, r.stderr
    assert tree(store) == before


def test_first_attach_refuses_a_case_variant(nbdserver, tmp_path):
    """A node created by its first attach follows admin create's name rules:
    a case variant of an existing node (or of a node directory that only
    holds a boot script's state) is refused with the reason, and nothing
    is created; the directory's own name attaches."""
    store, _ = make_store(tmp_path)
    admin(store, "create", "node-a", "--image", "lab")
    os.makedirs(os.path.join(store, "nodes", "node-b"))
    before = tree(store)
    srv = serve_store(nbdserver, store, threads=2)
    for name, existing in (("Node-A", "node-a"), ("NODE-B", "node-b")):
        reason = refused(srv, f"lab/{name}", A)
        assert "only in case" in reason and existing in reason, reason
    assert tree(store) == before
    attach(srv, "lab/node-b", A)[0].close()
    assert os.path.exists(os.path.join(store, "nodes", "node-b", "node.json"))
    # The server keeps the names it knows current (inotify): nodes another
    # process creates or deletes while it runs count from then on.
    admin(store, "create", "node-c", "--image", "lab")
    reason = refused(srv, "lab/Node-C", A)
    assert "only in case" in reason and "node-c" in reason, reason
    admin(store, "delete", "node-a")
    attach(srv, "lab/Node-A", A)[0].close()
    assert os.path.exists(os.path.join(store, "nodes", "Node-A", "node.json"))
    reason = refused(srv, "lab/NODE-a", B)
    assert "only in case" in reason and "Node-A" in reason, reason
    srv.assert_alive()


# ---------------------------------------------------------------- audit log

def audit_lines(store):
    with open(os.path.join(store, "audit.log")) as f:
        return [json.loads(l) for l in f]


def test_admin_changes_are_audited(tmp_path):
    store, _ = make_store(tmp_path)
    admin(store, "create", "n1", "n2", "--image", "lab")
    admin(store, "pin", "n1", A)
    admin(store, "unpin", "n1")
    admin(store, "unpin", "n1")  # changes nothing: no line
    admin(store, "reset", "n2", "--generation", "current")
    admin(store, "delete", "n2")
    admin(store, "list")  # reads only: no line
    admin(store, "extents", "n1")
    assert admin(store, "delete", "ghost", check=False).returncode == 1  # failed: no line
    lines = audit_lines(store)
    assert [(l["action"], l["detail"].split()[0]) for l in lines] == [
        ("create", "n1"), ("create", "n2"), ("pin", "n1"), ("unpin", "n1"),
        ("reset", "n2"), ("delete", "n2")]
    assert lines[2]["detail"] == f"n1 {A}"
    assert "image=lab" in lines[0]["detail"]
    for l in lines:
        assert set(l) == {"time", "uid", "pid", "action", "detail"}, l
        assert l["uid"] == os.getuid() and isinstance(l["pid"], int)
        assert l["time"].endswith("Z")
    # The log is appended to, never rewritten.
    with open(os.path.join(store, "audit.log"), "rb") as f:
        head = f.read()
    admin(store, "create", "n3", "--image", "lab")
    with open(os.path.join(store, "audit.log"), "rb") as f:
        assert f.read().startswith(head)
