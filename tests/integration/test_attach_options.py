"""Export-name options of node views: IMAGE/NODE?resume, ?mode=persistent,
?mode=ephemeral, and both joined with '&'.

- `resume` is a node reconnecting within one boot (nbdroot-keeper after a
  server restart or a network drop): an ephemeral node keeps its changes,
  whether its view is still open in the server or the server restarted. A
  resume of a node that does not exist, or whose layer files are gone
  (admin reset or delete), is refused with a message and creates nothing.
  A resume also closes the node's older connections (the kernel gave up on
  them).
- `mode=M` gives a node created by this attach mode M (over --node-mode);
  an existing node of the other mode is refused with a message that names
  both modes, and nothing changes on disk.
- Anything else after '?' is refused ("unknown attach option ..."), and so
  are options on names that are not node views (IMAGE?..., IMAGE@GEN?...).

Everything goes through real clients (libnbd, nbdinfo) plus the raw client
of nbdraw.py for the exact option replies. A refused attach must leave the
store byte-identical (contents, and no file or directory touched).
"""

import json
import os
import subprocess
import time
import urllib.parse

import nbd
import pytest

import nbdraw as N
from conftest import MiB, run
from storeutil import (BS, DIRTY, Model, add_generation, admin, block_runs, kill9, make_store,
                       nbdinfo_map, node_record, read_all, restart, serve_store, sha256_path)

SIZE = 16 * MiB


@pytest.fixture
def store(tmp_path):
    """(store dir, base bytes of lab@g1)."""
    return make_store(tmp_path)


# ---------------------------------------------------------------- helpers

def tree(root):
    """Everything under `root`: {relative path: what it is}. Files by content
    hash, size and mtime, directories by mtime (an entry created and removed
    again changes it), symlinks by target."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", st.st_mtime_ns)
            else:
                out[rel] = ("file", sha256_path(p), st.st_size, st.st_mtime_ns)
    return out


def assert_same_tree(before, after):
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, "the store changed: " + ", ".join(
        f"{k}: {before.get(k)} -> {after.get(k)}" for k in changed)


def attach(srv, name, meta=True):
    """A libnbd handle on export `name` (given as is: no URI quoting)."""
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
        h.add_meta_context(DIRTY)
    h.set_export_name(name)
    host, port = srv.tcp
    h.connect_tcp(host, str(port))
    return h


SERVER_MSG = "server error message: "


def refused(srv, name):
    """Attaches `name` with libnbd, which must fail, and returns the server's
    message as the client saw it (libnbd 1.14 has it only in its debug log).
    Cross-checks with the raw client: NBD_OPT_GO gets an error reply with
    the same message."""
    log = []
    h = nbd.NBD()
    h.set_debug_callback(lambda ctx, msg: log.append(msg))
    h.set_debug(True)
    h.add_meta_context("base:allocation")
    h.set_export_name(name)
    host, port = srv.tcp
    with pytest.raises(nbd.Error) as ei:
        h.connect_tcp(host, str(port))
    msgs = [m.split(SERVER_MSG, 1)[1] for m in log if SERVER_MSG in m]
    assert msgs, f"attach of {name!r} failed without a server message: {ei.value}"
    with N.RawClient(srv.tcp) as c:
        c.handshake()
        c.opt_structured_reply()
        final = c.opt_go(name, check=False)[-1]
    assert final.is_error, f"NBD_OPT_GO {name!r} was accepted by the raw client: {final!r}"
    assert final.data.decode(errors="replace") == msgs[-1]
    return msgs[-1]


def uri(srv, name):
    """nbd:// URI for export `name`: '?' must be %3F there, or it starts the
    URI's query."""
    return srv.uri(urllib.parse.quote(name, safe="/@=&"))


def nbdinfo_json(srv, name):
    r = run(["nbdinfo", "--json", uri(srv, name)])
    return json.loads(r.stdout)["exports"][0]


def admin_list(root):
    return {n["node"]: n for n in json.loads(admin(root, "list", "--json").stdout)}


def wait_detached(root, node):
    """A detach ends asynchronously after the client went: poll admin list."""
    for _ in range(500):
        if not admin_list(root)[node]["attached"]:
            return
    raise AssertionError(f"node {node} stays attached")


def write(h, m, off, data):
    h.pwrite(data, off)
    m.write(off, data)


def some_writes(h, m, seed):
    """Unaligned writes, a trim and a zero: changes in many states."""
    import random
    rnd = random.Random(seed)
    for i in range(8):
        off = rnd.randrange(SIZE - 3 * BS)
        write(h, m, off, rnd.randbytes(rnd.randrange(1, 3 * BS)))
    h.trim(4 * BS, 100 * BS)
    m.trim(100 * BS, 4 * BS)
    h.zero(2 * BS + 10, 200 * BS)
    m.zero_range(200 * BS, 2 * BS + 10)


# ---------------------------------------------------------------- unknown options

def bad_token(opts):
    for tok in opts.split("&"):
        if tok != "resume" and tok not in ("mode=persistent", "mode=ephemeral"):
            return tok
    raise AssertionError(opts)


BAD_OPTIONS = ["foo", "mode=weird", "", "resume&", "&resume", "mode=", "mode", "RESUME",
               "resume=1", "mode=Ephemeral", "mode=ephemeral&foo", "resume&&mode=persistent",
               "resume?mode=ephemeral", " resume", "mode=persistent "]


@pytest.mark.parametrize("opts,word", [("mode=persistent&mode=ephemeral", "mode"),
                                       ("mode=ephemeral&mode=ephemeral", "mode"),
                                       ("resume&resume", "resume"),
                                       ("resume&mode=persistent&resume", "resume")])
def test_attach_options_given_twice_are_refused(nbdserver, store, opts, word):
    root, base = store
    admin(root, "create", "n1", "--image", "lab")
    srv = serve_store(nbdserver, root)
    before = tree(root)
    msg = refused(srv, f"lab/n1?{opts}")
    assert f"attach option '{word}' given twice" in msg, msg
    assert_same_tree(before, tree(root))
    srv.assert_alive()


@pytest.mark.parametrize("opts", BAD_OPTIONS)
def test_unknown_attach_options_are_refused(nbdserver, store, opts):
    root, base = store
    admin(root, "create", "n1", "--image", "lab")
    srv = serve_store(nbdserver, root)
    before = tree(root)
    tok = bad_token(opts)
    for node in ("n1", "ghost"):  # an existing node and one that is not
        msg = refused(srv, f"lab/{node}?{opts}")
        assert f"unknown attach option '{tok}'" in msg, msg
    assert_same_tree(before, tree(root))
    assert not os.path.exists(os.path.join(root, "nodes", "ghost"))
    srv.assert_alive()
    h = attach(srv, "lab/n1")
    assert h.pread(BS, 0) == base[:BS]
    h.shutdown()


@pytest.mark.parametrize("name", ["lab?resume", "lab@g1?resume", "lab?mode=ephemeral",
                                  "lab@g1?mode=persistent&resume", "lab?", "lab@g1?foo"])
def test_options_on_names_without_a_node_are_refused(nbdserver, store, name):
    root, base = store
    srv = serve_store(nbdserver, root)
    before = tree(root)
    msg = refused(srv, name)
    assert "node views" in msg and "IMAGE/NODE" in msg, msg
    assert_same_tree(before, tree(root))
    plain = name.split("?")[0]
    h = attach(srv, plain, meta=False)
    assert h.is_read_only() and h.pread(BS, 0) == base[:BS]
    h.shutdown()


def test_bad_options_with_nbd_opt_export_name_close_the_connection(nbdserver, store):
    """NBD_OPT_EXPORT_NAME has no error reply: the server hangs up, and a
    good name with options still works there."""
    root, base = store
    srv = serve_store(nbdserver, root)
    before = tree(root)
    for name in ("lab/n1?foo", "lab?resume", "lab/ghost?resume"):
        c = N.RawClient(srv.tcp)
        c.handshake()
        with pytest.raises(N.Closed):
            c.opt_export_name(name)
        c.close()
    assert_same_tree(before, tree(root))
    c = N.RawClient(srv.tcp)
    c.handshake()
    c.opt_export_name("lab/n1?mode=ephemeral")
    assert c.export_size == SIZE and not c.transmission_flags & N.TF_READ_ONLY
    err, data, _ = c.read(0, BS)
    assert err == 0 and data == base[:BS]
    c.disconnect()
    c.close()
    assert node_record(root, "n1")["mode"] == "ephemeral"


def test_nbdinfo_sees_the_refusal_and_the_options(nbdserver, store):
    root, _ = store
    srv = serve_store(nbdserver, root)
    r = subprocess.run(["nbdinfo", uri(srv, "lab/n1?frobnicate")], capture_output=True,
                       text=True, timeout=30, env=dict(os.environ, LIBNBD_DEBUG="1"))
    assert r.returncode != 0
    assert "unknown attach option 'frobnicate'" in r.stderr, r.stderr[-3000:]
    assert not os.path.exists(os.path.join(root, "nodes", "n1"))
    e = nbdinfo_json(srv, "lab/n1?mode=ephemeral")
    assert e["export-name"] == "lab/n1?mode=ephemeral"
    assert e["description"] == "node n1 on lab@g1 (ephemeral)"
    assert e["export-size"] == SIZE and e["is_read_only"] is False
    assert DIRTY in e["contexts"]
    e = nbdinfo_json(srv, "lab/n1?resume&mode=ephemeral")
    assert e["description"] == "node n1 on lab@g1 (ephemeral)"


# ---------------------------------------------------------------- resume

@pytest.mark.parametrize("policy", ["auto", "registered"])
@pytest.mark.parametrize("opts", ["resume", "mode=ephemeral&resume", "resume&mode=persistent"])
def test_resume_of_a_node_that_does_not_exist_is_refused(nbdserver, store, policy, opts):
    root, base = store
    srv = serve_store(nbdserver, root, "--nodes", policy)
    before = tree(root)
    msg = refused(srv, f"lab/ghost?{opts}")
    assert "node 'ghost' does not exist" in msg and "nothing to resume" in msg, msg
    assert_same_tree(before, tree(root))
    assert os.listdir(os.path.join(root, "nodes")) == []
    if policy == "auto":
        # Not refused for some other reason: a boot (the same options
        # without resume) creates it, and then the resume works.
        boot = "&".join(t for t in opts.split("&") if t != "resume")
        h = attach(srv, "lab/ghost" + ("?" + boot if boot else ""))
        h.pwrite(b"g" * 10, 0)
        h.shutdown()
        wait_detached(root, "ghost")
        h = attach(srv, f"lab/ghost?{opts}")
        assert h.pread(20, 0) == b"g" * 10 + base[10:20]
        h.shutdown()


@pytest.mark.parametrize("mode", ["persistent", "ephemeral"])
@pytest.mark.parametrize("how", ["reset", "reset-generation", "delete", "reset-while-running"])
def test_resume_after_the_layer_is_gone_is_refused(nbdserver, store, mode, how):
    """The node's layer files went away (an admin reset or delete) while
    the node ran: its resume is refused, so that it reboots rather than go
    on over data it no longer has; nothing is created."""
    root, base = store
    base2 = add_generation(root, "lab", "g2", seed=2, publish=False)
    srv = serve_store(nbdserver, root)
    h = attach(srv, f"lab/n1?mode={mode}")
    h.pwrite(b"x" * 3000, 5 * BS + 7)
    h.shutdown()
    if how == "reset-while-running":
        wait_detached(root, "n1")
        admin(root, "reset", "n1")
    else:
        rc = srv.terminate()
        assert rc == 0
        if how == "reset":
            admin(root, "reset", "n1")
        elif how == "reset-generation":
            admin(root, "reset", "n1", "--generation", "g2")
        else:
            admin(root, "delete", "n1")
        srv = serve_store(nbdserver, root)
    before = tree(root)
    msg = refused(srv, "lab/n1?resume")
    if how == "delete":
        assert "node 'n1' does not exist" in msg and "nothing to resume" in msg, msg
    else:
        assert "no changes on disk to resume" in msg and "must reboot" in msg, msg
        gen = "g2" if how == "reset-generation" else "g1"
        assert f"lab.{gen}.diff" in msg, msg
    assert_same_tree(before, tree(root))
    # A boot (plain attach) starts the node afresh; after it, resumes work.
    h = attach(srv, "lab/n1")
    want = base2 if how == "reset-generation" else base
    assert h.pread(4 * BS, 4 * BS) == want[4 * BS:8 * BS]
    h.pwrite(b"y" * 10, 0)
    h.shutdown()
    wait_detached(root, "n1")
    h = attach(srv, "lab/n1?resume")
    assert h.pread(20, 0) == b"y" * 10 + want[10:20]
    assert h.pread(3000, 5 * BS + 7) == want[5 * BS + 7:5 * BS + 3007]
    h.shutdown()


@pytest.mark.parametrize("how", ["flag", "option", "admin"])
def test_resume_keeps_ephemeral_changes_across_restarts(nbdserver, store, how):
    """How nbdroot-keeper brings a node back after a server restart: the
    ephemeral node's changes are all there, unflushed ones included (the
    SIGTERM flushes), until the node boots again (a plain attach)."""
    root, base = store
    args = ["--node-mode", "ephemeral"] if how == "flag" else []
    boot, resume = "lab/e1", "lab/e1?resume"
    if how == "option":
        boot, resume = "lab/e1?mode=ephemeral", "lab/e1?mode=ephemeral&resume"
    elif how == "admin":
        admin(root, "create", "e1", "--image", "lab", "--mode", "ephemeral")
    srv = serve_store(nbdserver, root, *args)
    m = Model(base)
    h = attach(srv, boot)
    some_writes(h, m, 1)
    h.shutdown()  # no flush
    assert node_record(root, "e1")["mode"] == "ephemeral"

    srv = restart(nbdserver, srv, root, *args)
    h = attach(srv, resume)
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()
    # (nbdinfo resumes too: with h still attached it would close h.)
    assert nbdinfo_map(uri(srv, resume), DIRTY) == block_runs(m.changed, SIZE)
    h = attach(srv, resume)
    some_writes(h, m, 2)
    # SIGTERM with the node still attached and its last writes unflushed.
    srv = restart(nbdserver, srv, root, *args)
    del h
    h = attach(srv, resume)
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()
    wait_detached(root, "e1")

    # A plain attach is a boot: the changes go, also for later resumes.
    h = attach(srv, boot)
    assert read_all(h, SIZE) == base
    assert nbdinfo_map(uri(srv, boot), DIRTY) == [(0, SIZE, 0)]
    h.shutdown()
    srv = restart(nbdserver, srv, root, *args)
    h = attach(srv, resume)
    assert read_all(h, SIZE) == base
    h.shutdown()
    assert node_record(root, "e1")["mode"] == "ephemeral"


def test_resume_after_sigkill_keeps_acknowledged_ephemeral_writes(nbdserver, store):
    """The server killed (not stopped) under an attached ephemeral node:
    what it acknowledged, unflushed, is still there for the resume."""
    root, base = store
    srv = serve_store(nbdserver, root)
    m = Model(base)
    h = attach(srv, "lab/e1?mode=ephemeral")
    some_writes(h, m, 4)
    kill9(srv)
    del h
    srv = serve_store(nbdserver, root)
    h = attach(srv, "lab/e1?resume")
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()
    wait_detached(root, "e1")
    h = attach(srv, "lab/e1")
    assert read_all(h, SIZE) == base
    h.shutdown()


def test_resume_keeps_ephemeral_changes_while_the_view_is_open(nbdserver, store):
    """Reconnects right after a disconnect race the detach (the view may
    still be open, or already closed): a resume must see the previous
    connection's writes either way, a boot (plain attach) never."""
    root, base = store
    srv = serve_store(nbdserver, root, "--node-mode", "ephemeral")
    clean = base[9 * BS:10 * BS]
    for i in range(1, 16):
        h = attach(srv, "lab/n1")
        assert h.pread(BS, 9 * BS) == clean, f"round {i}: a boot sees an earlier boot's write"
        h.pwrite(bytes([i]) * BS, 9 * BS)
        h.shutdown()
        for j in range(3):
            h = attach(srv, "lab/n1?resume")
            got = h.pread(BS, 9 * BS)
            assert got == bytes([i + 50 * j]) * BS, f"round {i}.{j}: a resume lost the writes"
            h.pwrite(bytes([i + 50 * (j + 1)]) * BS, 9 * BS)
            h.shutdown()
    # Two connections at once, the second a boot: the view is in use, so
    # the boot joins it and drops nothing.
    h1 = attach(srv, "lab/n1?resume")
    h2 = attach(srv, "lab/n1")
    assert h2.pread(BS, 9 * BS) == bytes([165]) * BS
    h1.shutdown()
    h2.shutdown()
    wait_detached(root, "n1")
    h = attach(srv, "lab/n1")
    assert h.pread(BS, 9 * BS) == clean
    h.shutdown()


def test_a_connection_handed_to_the_views_loop_is_attached_before_its_client_goes_on(
        nbdserver, store):
    """With two loops, a node's connection accepted by the loop that does
    not own its view is handed over after the handshake. The client must
    not see the handshake end before the owner attached it: else the node's
    next connection (here a boot joining the resumed view) reaches the owner
    first, drops the node's changes, and is then closed as superseded by the
    late resume. NBDROOT_FAULT_HANDOFF_DELAY_MS widens that window."""
    root, base = store
    srv = nbdserver(args=["--store", root, "--threads", "2", "--node-mode", "ephemeral"],
                    env=dict(os.environ, NBDROOT_FAULT_HANDOFF_DELAY_MS="150"))
    h = attach(srv, "lab/n1")
    h.pwrite(b"\x01" * BS, 9 * BS)
    h.shutdown()
    for i in range(2, 14):
        h1 = attach(srv, "lab/n1?resume")
        h2 = attach(srv, "lab/n1")
        want = bytes([i - 1]) * BS
        assert h2.pread(BS, 9 * BS) == want, f"round {i}: the boot dropped the resumed changes"
        assert h1.pread(BS, 9 * BS) == want, f"round {i}: the resume lost its changes"
        h2.pwrite(bytes([i]) * BS, 9 * BS)
        h2.shutdown()
        h1.shutdown()
    assert "fault injection: hand-offs" in srv.stderr()


@pytest.mark.parametrize("restart_first", [False, True])
@pytest.mark.parametrize("query", ["nbdinfo --list", "NBD_OPT_INFO", "NBD_OPT_LIST_META_CONTEXT"])
def test_queries_while_an_ephemeral_node_is_away_keep_its_changes(nbdserver, store, query,
                                                                   restart_first):
    """Between a node's disconnect (network drop, server restart) and its
    keeper's ?resume, something only asks about the node's export (an
    admin's nbdinfo --list, a monitoring probe). That is no boot: the
    resume must still find the node's changes."""
    root, base = store
    srv = serve_store(nbdserver, root)
    h = attach(srv, "lab/e1?mode=ephemeral")
    h.pwrite(b"X" * BS, 2 * BS)
    h.shutdown()
    wait_detached(root, "e1")
    if restart_first:
        srv = restart(nbdserver, srv, root)
    if query == "nbdinfo --list":
        r = run(["nbdinfo", "--list", "--json", srv.uri("")])
        assert "lab/e1" in r.stdout
    else:
        with N.RawClient(srv.tcp) as c:
            c.handshake()
            if query == "NBD_OPT_INFO":
                c.opt_go("lab/e1", opt=N.OPT_INFO)
            else:
                c.opt_structured_reply()
                replies, found = c.opt_set_meta_context("lab/e1", (),
                                                        opt=N.OPT_LIST_META_CONTEXT)
                assert replies[-1].type == N.REP_ACK, replies
    h = attach(srv, "lab/e1?resume")
    assert h.pread(BS, 2 * BS) == b"X" * BS, f"{query} wiped the node's changes"
    h.shutdown()


def closed_soon(h, timeout=5):
    """Whether the server closes h's connection within `timeout` seconds
    (a close from another connection's attach lands asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            h.pread(1, 0)
        except nbd.Error:
            return True
        time.sleep(0.05)
    return False


def test_resume_closes_the_nodes_older_connections(nbdserver, store):
    """The node's kernel gave up on its older connections when it resumed:
    the server closes them (their unread requests are stale). A boot's
    extra connections and other nodes' connections stay."""
    root, base = store
    srv = serve_store(nbdserver, root)
    h1 = attach(srv, "lab/n1?mode=ephemeral")
    h1.pwrite(b"1" * 100, 0)
    h2 = attach(srv, "lab/n1")  # joins the open view, closes nothing
    other = attach(srv, "lab/n2")
    other.pwrite(b"o", 0)
    assert h1.pread(100, 0) == b"1" * 100 and h2.pread(100, 0) == b"1" * 100
    h3 = attach(srv, "lab/n1?resume")
    assert closed_soon(h1) and closed_soon(h2)
    assert "node 'n1' resumed on conn" in srv.stderr()
    assert h3.pread(100, 0) == b"1" * 100, "the resume lost the node's changes"
    assert other.pread(2, 0) == b"o" + base[1:2]
    h4 = attach(srv, "lab/n1?resume&mode=ephemeral")
    assert closed_soon(h3)
    assert h4.pread(100, 0) == b"1" * 100
    assert not closed_soon(other, timeout=0.3)
    h4.shutdown()
    other.shutdown()


def test_resume_of_a_persistent_node_is_an_attach(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    m = Model(base)
    h = attach(srv, "lab/p1")
    some_writes(h, m, 3)
    h.shutdown()
    for name in ("lab/p1?resume", "lab/p1", "lab/p1?resume&mode=persistent"):
        wait_detached(root, "p1")
        h = attach(srv, name)
        assert read_all(h, SIZE) == bytes(m.data), name
        h.shutdown()
    srv = restart(nbdserver, srv, root)
    h = attach(srv, "lab/p1?resume")
    assert read_all(h, SIZE) == bytes(m.data)
    h.shutdown()
    assert node_record(root, "p1")["mode"] == "persistent"


# ---------------------------------------------------------------- mode

@pytest.mark.parametrize("server_mode, mode", [("persistent", "ephemeral"),
                                               ("ephemeral", "persistent"),
                                               ("persistent", "persistent"),
                                               ("ephemeral", "ephemeral")])
def test_mode_option_chooses_the_mode_of_a_new_node(nbdserver, store, server_mode, mode):
    root, base = store
    srv = serve_store(nbdserver, root, "--node-mode", server_mode)
    name = f"lab/n1?mode={mode}"
    h = attach(srv, name)
    assert node_record(root, "n1")["mode"] == mode
    assert admin_list(root)["n1"]["mode"] == mode
    h.pwrite(b"m" * 5000, 3 * BS + 1)
    h.flush()
    h.shutdown()
    wait_detached(root, "n1")
    assert nbdinfo_json(srv, name)["description"] == f"node n1 on lab@g1 ({mode})"
    wait_detached(root, "n1")
    h = attach(srv, name)
    got = h.pread(5000, 3 * BS + 1)
    if mode == "ephemeral":
        assert got == base[3 * BS + 1:3 * BS + 5001], "an ephemeral node kept changes at a boot"
    else:
        assert got == b"m" * 5000
    h.shutdown()
    # Later plain attaches follow the node's mode, not --node-mode.
    wait_detached(root, "n1")
    srv = restart(nbdserver, srv, root, "--node-mode", server_mode)
    h = attach(srv, "lab/n1")
    h.pread(1, 0)
    h.shutdown()
    assert node_record(root, "n1")["mode"] == mode


@pytest.mark.parametrize("attached", [False, True])
@pytest.mark.parametrize("mode, other", [("persistent", "ephemeral"), ("ephemeral", "persistent")])
def test_mode_mismatch_is_refused_and_changes_nothing(nbdserver, store, mode, other, attached):
    root, base = store
    admin(root, "create", "n1", "--image", "lab", "--mode", mode)
    srv = serve_store(nbdserver, root)
    h = attach(srv, "lab/n1")
    h.pwrite(b"k" * 700, 11 * BS + 3)
    h.flush()
    if not attached:
        h.shutdown()
        wait_detached(root, "n1")
    before = tree(root)
    for opts in (f"mode={other}", f"mode={other}&resume", f"resume&mode={other}"):
        msg = refused(srv, f"lab/n1?{opts}")
        assert f"node 'n1' is {mode} but attached with mode={other}" in msg, msg
    assert_same_tree(before, tree(root))
    assert node_record(root, "n1")["mode"] == mode
    if attached:
        # The attached connection is unharmed.
        assert h.pread(700, 11 * BS + 3) == b"k" * 700
        h.pwrite(b"l", 0)
        assert h.pread(2, 0) == b"l" + base[1:2]
        h.shutdown()
        wait_detached(root, "n1")
    h = attach(srv, f"lab/n1?mode={mode}&resume")
    assert h.pread(700, 11 * BS + 3) == b"k" * 700
    h.shutdown()


def test_mode_option_with_registered_nodes(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root, "--nodes", "registered")
    before = tree(root)
    msg = refused(srv, "lab/x?mode=ephemeral")
    assert "not registered" in msg, msg
    assert_same_tree(before, tree(root))
    admin(root, "create", "x", "--image", "lab", "--mode", "ephemeral")
    h = attach(srv, "lab/x?mode=ephemeral")
    h.pwrite(b"e", 0)
    h.shutdown()
    wait_detached(root, "x")
    msg = refused(srv, "lab/x?mode=persistent")
    assert "is ephemeral but attached with mode=persistent" in msg, msg
    h = attach(srv, "lab/x?resume&mode=ephemeral")
    assert h.pread(2, 0) == b"e" + base[1:2]
    h.shutdown()


def test_options_combine_in_either_order(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    h = attach(srv, "lab/n1?mode=ephemeral")
    h.pwrite(b"1" * 100, 0)
    h.shutdown()
    for i, name in enumerate(["lab/n1?resume&mode=ephemeral", "lab/n1?mode=ephemeral&resume"]):
        wait_detached(root, "n1")
        h = attach(srv, name)
        assert h.pread(100, 0) == (b"1" if i == 0 else b"2") * 100, name
        h.pwrite(b"2" * 100, 0)
        h.shutdown()
    wait_detached(root, "n1")
    h = attach(srv, "lab/n1?mode=ephemeral")
    assert h.pread(100, 0) == base[:100]
    h.shutdown()
