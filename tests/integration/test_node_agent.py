"""The node agent, `nbdserver node`: the kernel's side on a Unix socket
(here libnbd stands in for nbd-client -unix), the node's view upstream,
clean chunks from peers checked against the generation's SHA-256 digests,
and serving peers.

Every agent and server is the real binary; clients are libnbd. A peer that
lies, hangs, hangs up or claims chunks it lacks is a real agent with
NBDROOT_FAULT_PEER set (the fault-injection boundary)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import nbd
import pytest

from storeutil import (BS, MiB, kill9, kill_if_running, make_store, node_record, stop_cleanly,
                       wait_for_text, write_chunk_digests)

SIZE = 16 * MiB
CHUNK = 64 * 1024


@pytest.fixture
def store(tmp_path):
    root, base = make_store(tmp_path, size=SIZE)
    write_chunk_digests(root, "lab", "g1", base)
    return root, base


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="nbdag", dir="/tmp")  # short: sun_path holds 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(nbdserver, root, port=None, http=True, extra=()):
    listen = f"127.0.0.1:{port or 0}"
    args = ["--listen", listen, "--store", root, "--threads", "2", *extra]
    if http:
        args += ["--http", "127.0.0.1:0"]
    return nbdserver(args=args, listen=False)


class Agent:
    def __init__(self, proc_server, sock, stats_path):
        self.s = proc_server
        self.sock = sock
        self.stats_path = stats_path
        self.peer = next((l.split()[1] for l in proc_server.addresses if l.startswith("peer ")), None)

    def stats(self):
        with open(self.stats_path) as f:
            return json.load(f)

    def wait_stats(self, pred, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if pred(st) or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def stderr(self):
        return self.s.stderr()

    def handle(self, name="lab/n1"):
        h = nbd.NBD()
        h.set_export_name(name)
        h.connect_unix(self.sock)
        return h


def agent(nbdserver, srv, sockdir, node, *args, peers=True, env=None, servers=None):
    sock = os.path.join(sockdir, f"{node}.sock")
    stats = os.path.join(sockdir, f"{node}.stats")
    host, port = srv.tcp
    argv = ["node", "--server", servers or f"{host}:{port}", "--export", f"lab/{node}",
            "--socket", sock, "--stats-file", stats]
    if peers:
        argv += ["--tracker", srv.http, "--peer-listen", "127.0.0.1:0"]
    else:
        argv += ["--peers", "off"]
    argv += list(args)
    p = nbdserver(args=argv, listen=False, env=env)
    return Agent(p, sock, stats)


def read_all(h, size=SIZE, step=256 * 1024):
    return b"".join(h.pread(min(step, size - o), o) for o in range(0, size, step))


def tracker(srv):
    import urllib.request
    with urllib.request.urlopen(f"http://{srv.http}/v1/tracker/lab@g1", timeout=10) as r:
        return json.load(r)


# ---------------------------------------------------------------- the kernel's side

def test_an_idle_agent_does_not_rewrite_its_stats_file(nbdserver, store, sockdir):
    """The stats file is replaced (a new inode) only when a counter changed."""
    root, base = store
    srv = serve(nbdserver, root, http=False)
    a = agent(nbdserver, srv, sockdir, "n1", peers=False)
    h = a.handle()
    assert h.pread(BS, 0) == base[:BS]
    a.wait_stats(lambda s: s["view_read_bytes"] >= BS)
    ino = os.stat(a.stats_path).st_ino
    time.sleep(1.0)  # four rewrite periods with nothing to say: no event to wait for
    assert os.stat(a.stats_path).st_ino == ino, "an unchanged stats file was rewritten"
    assert h.pread(BS, BS) == base[BS:2 * BS]
    st = a.wait_stats(lambda s: s["view_read_bytes"] >= 2 * BS)
    assert st["view_read_bytes"] >= 2 * BS
    assert os.stat(a.stats_path).st_ino != ino
    h.shutdown()



def test_agent_serves_the_nodes_view_and_writes_reach_the_server(nbdserver, store, sockdir):
    root, base = store
    srv = serve(nbdserver, root, http=False)
    a = agent(nbdserver, srv, sockdir, "n1", peers=False)
    h = a.handle()
    assert h.get_size() == SIZE
    assert read_all(h) == base
    h.pwrite(b"A" * 3 * BS, 5 * BS)
    h.pwrite(b"b" * 100, 9 * BS + 7)           # a partial block
    h.zero(BS, 20 * BS)
    h.trim(BS, 21 * BS)
    h.flush()
    want = bytearray(base)
    want[5 * BS:8 * BS] = b"A" * 3 * BS
    want[9 * BS + 7:9 * BS + 107] = b"b" * 100
    want[20 * BS:21 * BS] = bytes(BS)
    assert h.pread(22 * BS, 0)[:21 * BS] == bytes(want[:21 * BS])
    h.shutdown()
    # Straight from the server: the node's view holds the writes.
    assert a.s.terminate() == 0
    d = nbd.NBD()
    d.set_export_name("lab/n1?resume")
    d.connect_tcp(*map(str, srv.tcp))
    assert d.pread(21 * BS, 0) == bytes(want[:21 * BS])
    d.shutdown()


def test_other_export_names_are_refused(nbdserver, store, sockdir):
    root, _ = store
    srv = serve(nbdserver, root, http=False)
    a = agent(nbdserver, srv, sockdir, "n1", peers=False)
    h = nbd.NBD()
    h.set_export_name("lab/n2")
    with pytest.raises(nbd.Error):
        h.connect_unix(a.sock)
    h = a.handle("")  # the default name is the node's root
    assert h.get_size() == SIZE
    h.shutdown()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_server_restart_is_invisible_to_the_kernel(nbdserver, store, sockdir, how):
    """The agent reconnects (?resume) by itself: the client's socket never
    breaks, and no request fails, acknowledged writes are all there."""
    root, base = store
    port = free_port()
    srv = serve(nbdserver, root, port=port, http=False)
    a = agent(nbdserver, srv, sockdir, "n1", peers=False)
    h = a.handle()
    want = bytearray(base)
    for r in range(6):
        off = (r * 37 % 200) * BS
        h.pwrite(bytes([r + 1]) * 2 * BS, off)
        want[off:off + 2 * BS] = bytes([r + 1]) * 2 * BS
        if how == "sigkill":
            kill9(srv)
        else:
            assert srv.terminate() == 0
        srv = serve(nbdserver, root, port=port, http=False)
        # Issued while the server may still be coming up: it waits, then works.
        assert h.pread(2 * BS, off) == bytes([r + 1]) * 2 * BS
    assert read_all(h) == bytes(want)
    st = a.wait_stats(lambda s: s["reconnects"] >= 6)
    assert st["reconnects"] >= 6
    assert "reconnected to" in a.stderr()
    h.shutdown()


@pytest.mark.parametrize("mode", ["ephemeral", "persistent"])
def test_mode_gives_a_new_node_its_mode_and_is_kept_across_reconnects(nbdserver, store, sockdir,
                                                                      mode):
    """--mode M creates the node in mode M (?mode=M on the first attach) and
    asks for it again on every reconnect (?resume&mode=M)."""
    root, base = store
    port = free_port()
    srv = serve(nbdserver, root, port=port, http=False)
    a = agent(nbdserver, srv, sockdir, "m1", "--mode", mode, peers=False)
    h = a.handle("lab/m1")
    h.pwrite(b"M" * BS, 0)
    assert node_record(root, "m1")["mode"] == mode
    assert srv.terminate() == 0
    srv = serve(nbdserver, root, port=port, http=False)
    assert h.pread(BS, 0) == b"M" * BS  # the resume kept the node's changes
    a.wait_stats(lambda s: s["reconnects"] >= 1)
    h.shutdown()


def test_mode_of_an_existing_node_of_the_other_mode_is_refused(nbdserver, store, sockdir):
    import subprocess
    from conftest import NBDSERVER
    root, _ = store
    srv = serve(nbdserver, root, http=False)
    a = agent(nbdserver, srv, sockdir, "m2", "--mode", "persistent", peers=False)
    a.handle("lab/m2").shutdown()
    assert a.s.terminate() == 0
    host, port = srv.tcp
    r = subprocess.run([NBDSERVER, "node", "--server", f"{host}:{port}", "--export", "lab/m2",
                        "--mode", "ephemeral", "--peers", "off",
                        "--socket", os.path.join(sockdir, "m2b.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert "cannot attach 'lab/m2'" in r.stderr and "persistent" in r.stderr, r.stderr
    assert node_record(root, "m2")["mode"] == "persistent"


# ---------------------------------------------------------------- peers

def test_a_second_node_reads_clean_chunks_from_the_first(nbdserver, store, sockdir):
    root, base = store
    srv = serve(nbdserver, root)
    a = agent(nbdserver, srv, sockdir, "n1")
    ha = a.handle()
    assert read_all(ha) == base
    b = agent(nbdserver, srv, sockdir, "n2")
    hb = b.handle("lab/n2")
    assert read_all(hb) == base
    sb = b.wait_stats(lambda s: s["gen_peer_bytes"] >= SIZE // 2)
    assert sb["gen_peer_bytes"] >= SIZE // 2, sb
    assert sb["peer_bad_chunks"] == 0
    sa = a.wait_stats(lambda s: s["served_bytes"] >= sb["gen_peer_bytes"])
    assert sa["served_bytes"] >= sb["gen_peer_bytes"]
    ha.shutdown()
    hb.shutdown()


def established_to(port):
    """TCP connections to `port` on this host that are established."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return [l for l in out.splitlines() if l.strip()]


def test_agents_hold_no_idle_connection_to_the_tracker(nbdserver, store, sockdir):
    """The HTTP library keeps a thread per open connection, waking every
    ~11 ms while it idles: a storm of agents that kept their tracker
    connections alive cost the server a context switch per agent every few
    milliseconds (40 % of its CPU in a 100-node storm) and would leave later
    agents queued past its thread pool. An agent closes each call's
    connection."""
    root, base = store
    srv = serve(nbdserver, root)
    hport = int(srv.http.rsplit(":", 1)[1])
    agents = [agent(nbdserver, srv, sockdir, f"n{i}") for i in (1, 2)]
    handles = [a.handle(f"lab/n{i}") for i, a in zip((1, 2), agents)]
    for h in handles:
        assert read_all(h) == base
    agents[1].wait_stats(lambda s: s["gen_peer_bytes"] > 0)
    held = 0
    for _ in range(20):
        held += bool(established_to(hport))
        time.sleep(0.05)
    # A call in flight at a sample is open for about a millisecond.
    assert held <= 2, f"agents kept a tracker connection open in {held} of 20 samples"
    for h in handles:
        h.shutdown()


def test_a_booting_node_prefetches_the_recorded_boot_order(nbdserver, store, sockdir):
    """The first boot of a generation records the order of its first reads;
    the server keeps it across a restart; a later node fetches that order
    ahead of its kernel, from its kernel's first read on (not before)."""
    root, base = store
    port, hport = free_port(), free_port()
    extra = ("--http", f"127.0.0.1:{hport}")
    srv = serve(nbdserver, root, port=port, http=False, extra=extra)
    a = agent(nbdserver, srv, sockdir, "n1")
    ha = a.handle()
    order = [37, 5, 200, 6, 90, 12, 13, 14, 255, 0]
    for c in order:
        assert ha.pread(BS, c * CHUNK + BS) == base[c * CHUNK + BS:c * CHUNK + 2 * BS]
    assert srv.terminate() == 0  # saves the order
    with open(os.path.join(root, "tracker", "lab@g1.order")) as f:
        assert [int(w) for w in f.read().split()[2:]] == order
    srv = serve(nbdserver, root, port=port, http=False, extra=extra)
    b = agent(nbdserver, srv, sockdir, "n2")
    assert "boot order of 10 chunks read from" in srv.stderr()
    hb = b.handle("lab/n2")
    time.sleep(1.0)  # nothing to wait for: the agent must not start by itself
    assert b.stats()["prefetched_chunks"] == 0
    assert hb.pread(BS, order[0] * CHUNK) == base[order[0] * CHUNK:order[0] * CHUNK + BS]
    st = b.wait_stats(lambda s: s["prefetched_chunks"] >= len(order) - 1)
    assert st["prefetched_chunks"] >= len(order) - 1, st
    fetched = st["gen_server_bytes"] + st["gen_peer_bytes"]
    for c in order:
        assert hb.pread(CHUNK, c * CHUNK) == base[c * CHUNK:(c + 1) * CHUNK]
    st = b.wait_stats(lambda s: s["gen_cache_hits"] >= len(order))
    assert st["gen_server_bytes"] + st["gen_peer_bytes"] == fetched, st
    assert "prefetch: 10 chunks of lab@g1's boot order" in b.stderr()
    ha.shutdown()
    hb.shutdown()


def test_after_a_server_restart_nodes_tell_the_new_tracker_what_they_hold(
        nbdserver, store, sockdir):
    """A restarted server's tracker knows no holders; the first answer with
    its new epoch makes an agent report what it holds, so the next node
    still reads those chunks from it, not from the server."""
    root, base = store
    port, hport = free_port(), free_port()
    extra = ("--http", f"127.0.0.1:{hport}")
    srv = serve(nbdserver, root, port=port, http=False, extra=extra)
    a = agent(nbdserver, srv, sockdir, "n1", "--prefetch", "off")
    ha = a.handle()
    assert ha.pread(MiB, 0) == base[:MiB]
    assert srv.terminate() == 0
    srv = serve(nbdserver, root, port=port, http=False, extra=extra)
    # n1 asks the new tracker about one more chunk: it sees the new epoch.
    assert ha.pread(CHUNK, 8 * MiB) == base[8 * MiB:8 * MiB + CHUNK]
    deadline = time.monotonic() + 10
    while "telling it the 16 chunks held here" not in a.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "telling it the 16 chunks held here" in a.stderr(), a.stderr()[-2000:]
    b = agent(nbdserver, srv, sockdir, "n2", "--prefetch", "off")
    hb = b.handle("lab/n2")
    assert hb.pread(MiB, 0) == base[:MiB]
    st = b.wait_stats(lambda s: s["gen_peer_bytes"] >= MiB)
    assert st["gen_peer_bytes"] == MiB and st["gen_server_bytes"] == 0, st
    ha.shutdown()
    hb.shutdown()


def test_changed_blocks_are_never_served_to_peers(nbdserver, store, sockdir):
    root, base = store
    srv = serve(nbdserver, root)
    a = agent(nbdserver, srv, sockdir, "n1")
    ha = a.handle()
    # Written before and after the chunk was read: either way the node
    # reads its own bytes, and a peer reads the generation's.
    ha.pwrite(b"W" * BS, 3 * BS)
    assert ha.pread(CHUNK, 0)[3 * BS:4 * BS] == b"W" * BS
    ha.pread(CHUNK, CHUNK)
    ha.pwrite(b"V" * BS, CHUNK + BS)
    assert ha.pread(BS, CHUNK + BS) == b"V" * BS
    b = agent(nbdserver, srv, sockdir, "n2")
    hb = b.handle("lab/n2")
    assert hb.pread(2 * CHUNK, 0) == base[:2 * CHUNK]
    st = b.wait_stats(lambda s: s["gen_peer_bytes"] >= CHUNK)
    assert st["gen_peer_bytes"] >= CHUNK, "the test did not read from the peer"
    ha.shutdown()
    hb.shutdown()


@pytest.mark.parametrize("fault", ["corrupt", "hang", "hangup", "lack", "othergen"])
def test_a_bad_peer_costs_correct_data_nothing(nbdserver, store, sockdir, fault):
    root, base = store
    srv = serve(nbdserver, root)
    a = agent(nbdserver, srv, sockdir, "n1", env=dict(os.environ, NBDROOT_FAULT_PEER=fault))
    ha = a.handle()
    assert read_all(ha, size=2 * MiB) == base[:2 * MiB]
    b = agent(nbdserver, srv, sockdir, "n2", "--peer-timeout-ms", "300")
    hb = b.handle("lab/n2")
    assert read_all(hb, size=2 * MiB) == base[:2 * MiB]
    st = b.wait_stats(lambda s: s["peer_failures"] >= 1)
    assert st["gen_peer_bytes"] == 0 and st["peer_failures"] >= 1, st
    log = b.stderr()
    expect = {"corrupt": "SHA-256 mismatch", "othergen": "SHA-256 mismatch",
              "lack": "does not hold it", "hang": "peer", "hangup": "peer"}[fault]
    assert expect in log, log[-3000:]
    if fault in ("corrupt", "othergen"):
        assert st["peer_bad_chunks"] >= 1
        assert "dropping that peer" in log
    ha.shutdown()
    hb.shutdown()


def test_the_upload_limit_holds(nbdserver, store, sockdir):
    root, base = store
    srv = serve(nbdserver, root)
    limit = 2 * MiB
    a = agent(nbdserver, srv, sockdir, "n1", "--upload-limit", "2M")
    ha = a.handle()
    assert read_all(ha) == base
    b = agent(nbdserver, srv, sockdir, "n2", "--peer-timeout-ms", "2000")
    hb = b.handle("lab/n2")
    t0 = time.monotonic()
    assert read_all(hb, size=6 * MiB) == base[:6 * MiB]
    elapsed = time.monotonic() - t0
    served = a.wait_stats(lambda s: s["served_bytes"] > 0)["served_bytes"]
    assert served > 0
    # One second's worth may go out at once (the bucket starts full).
    assert served <= limit * (elapsed + 1.0) * 1.05, (served, elapsed)
    ha.shutdown()
    hb.shutdown()


# ---------------------------------------------------------------- bad flags

# A command line that starts; each case below spoils one part of it.
GOOD = ["--export", "lab/n1", "--socket", "/tmp/x.sock", "--server", "127.0.0.1:1"]


@pytest.mark.parametrize("args,msg", [
    (["--export", "lab", "--socket", "/tmp/x.sock", "--server", "127.0.0.1:1"], "IMAGE/NODE"),
    (["--export", "lab/n1?resume", "--socket", "/tmp/x.sock", "--server", "127.0.0.1:1"],
     "IMAGE/NODE"),
    (["--export", "lab/n1", "--socket", "/tmp/x.sock", "--server", "nohost"], "--server"),
    (GOOD + ["--cache", "lots"], "--cache"),
    (GOOD + ["--peers", "maybe"], "--peers"),
    (GOOD + ["--prefetch", "sometimes"], "--prefetch must be on or off"),
    (GOOD + ["--huge-pages", "yes"], "--huge-pages must be on or off"),
    (GOOD + ["--attach-timeout", "-1"], "--attach-timeout must be at most"),
    (GOOD + ["--attach-timeout", "soon"], "--attach-timeout"),
    (GOOD + ["--upload-connections", "-1"], "--upload-connections must be 1 to 65536"),
    (GOOD + ["--upload-connections", "0"], "--upload-connections must be 1 to 65536"),
    (GOOD + ["--peer-timeout-ms", "-5"], "--peer-timeout-ms must be 1 to 600000"),
    (["--export", "lab/n1", "--socket", "/tmp/x.sock"], "server"),
    (GOOD + ["--mode", "sometimes"], "--mode"),
    (GOOD + ["--tracker", "127.0.0.1:abc"], "--tracker"),
    (GOOD + ["--tracker", "127.0.0.1:99999"], "--tracker"),
])
def test_bad_flags_are_refused_with_a_message(args, msg):
    import subprocess
    from conftest import NBDSERVER
    r = subprocess.run([NBDSERVER, "node", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    assert msg in r.stderr, r.stderr


def test_an_unreachable_server_fails_the_start_after_attach_timeout(nbdserver, sockdir):
    """--attach-timeout bounds the first attach's retrying: exit 1 with the
    last reason, which was logged once however many passes it took."""
    import subprocess
    from conftest import NBDSERVER
    port = free_port()
    t0 = time.monotonic()
    r = subprocess.run([NBDSERVER, "node", "--server", f"127.0.0.1:{port}",
                        "--export", "lab/n1", "--socket", os.path.join(sockdir, "x.sock"),
                        "--attach-timeout", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert 2 <= time.monotonic() - t0 < 15
    assert f"cannot attach 'lab/n1': 127.0.0.1:{port}: connect: Connection refused " \
           "(given up after --attach-timeout 2 s)" in r.stderr, r.stderr
    assert r.stderr.count("Connection refused") == 2, r.stderr  # once retrying, once at the end


def spawn_agent(tmp_path, sockdir, port, *args):
    from conftest import spawn
    ready = os.path.join(sockdir, "n1.ready")
    argv = ["node", "--server", f"127.0.0.1:{port}", "--export", "lab/n1",
            "--socket", os.path.join(sockdir, "n1.sock"), "--peers", "off",
            "--ready-file", ready, *args]
    proc, stderr_path = spawn(argv, str(tmp_path), name="agent")
    return proc, stderr_path, ready


def test_an_agent_started_before_its_server_keeps_trying_and_attaches(
        nbdserver, store, sockdir, tmp_path):
    """No --attach-timeout: the first attach retries (0.2 s doubling to
    5 s) until the server is there, with one log line for the reason, then
    serves the node's view."""
    from conftest import wait_ready
    root, base = store
    port = free_port()
    proc, stderr_path, ready = spawn_agent(tmp_path, sockdir, port)
    try:
        wait_for_text(stderr_path, "Connection refused")
        time.sleep(2)  # passes at 0.2, 0.6, 1.4 s
        assert proc.poll() is None, open(stderr_path).read()
        assert not os.path.exists(ready)
        err = open(stderr_path).read()
        assert err.count("Connection refused") == 1, err
        assert "cannot attach 'lab/n1' yet: " in err and "; retrying" in err, err
        serve(nbdserver, root, port=port, http=False)
        wait_ready(proc, ready, stderr_path, timeout=30)
        h = nbd.NBD()
        h.set_export_name("lab/n1")
        h.connect_unix(os.path.join(sockdir, "n1.sock"))
        assert read_all(h) == base
        h.shutdown()
        assert f"upstream: 'lab/n1' on 127.0.0.1:{port} after " in open(stderr_path).read()
        stop_cleanly(proc)
    finally:
        kill_if_running(proc)


def test_an_agent_still_trying_its_first_attach_stops_on_sigterm(sockdir, tmp_path):
    proc, stderr_path, _ = spawn_agent(tmp_path, sockdir, free_port())
    try:
        wait_for_text(stderr_path, "Connection refused")
        time.sleep(1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 2
        assert "stopping: 'lab/n1' was never attached" in open(stderr_path).read()
    finally:
        kill_if_running(proc)


def test_an_unknown_export_fails_the_first_attach_at_once(nbdserver, store, sockdir):
    """A refusal that retrying cannot change ends the first attach at
    once (exit 1) with the server's answer, even with no --attach-timeout."""
    import subprocess
    from conftest import NBDSERVER
    root, _ = store
    srv = serve(nbdserver, root, http=False)
    host, port = srv.tcp
    t0 = time.monotonic()
    r = subprocess.run([NBDSERVER, "node", "--server", f"{host}:{port}", "--export", "nosuch/n1",
                        "--peers", "off", "--socket", os.path.join(sockdir, "x.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert time.monotonic() - t0 < 5
    assert f"cannot attach 'nosuch/n1': {host}:{port}: export 'nosuch/n1' refused: " \
           "NBD_REP_ERR_UNKNOWN" in r.stderr, r.stderr
    assert "retrying" not in r.stderr, r.stderr
