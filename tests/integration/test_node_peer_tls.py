"""Peers in the tls tier (issue 13): under `nbdserver --store --tls require`
node agents serve and read a generation's chunks over TLS only.

Each agent opens the generation's peer key from the server's answer for its
node (sealed with the node's own key), serves its chunks on --peer-listen
to clients that run STARTTLS and authenticate as "peer/IMAGE@GEN" with that
key, and reads from peers the same way.

- Two agents with their own keys: the second reads at least half its
  image from the first, over TLS.
- The peer listener gives nothing to a plaintext client (raw and libnbd), or
  to TLS with a wrong key, a node's own key, or a node's identity; the peer
  key itself reads (so the refusals were the keys).
- A peer that refuses STARTTLS (a fake the tracker names) is dropped,
  reported as bad, and never gets a plaintext byte.
- A server answer without a peer key, or one that does not open with the
  node's key (a proxy in front of the HTTP API rewrites it): peers off, one
  log line, the root still works.
- A packet capture of a whole run (tcpdump on the loopback of a network
  namespace the test makes: test_tls.py's netns): none of 64 windows of
  the image's bytes under --tls require; the same run under --tls off has
  them all (the control).

Every agent and server is the real binary.
"""

import http.server
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import nbd
import pytest

import nbdraw
from sockutil import Listener, recv_exact
from storeutil import MiB, add_generation, admin, write_chunk_digests
from test_node_agent import Agent, agent, read_all, serve
from test_tls import netns, windows  # noqa: F401 (netns is a fixture)

SIZE = 16 * MiB
CHUNK = 64 * 1024
GEN = "lab@g1"
PEER_ID = "peer/lab@g1"


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="nbdpt", dir="/tmp")  # short: sun_path holds 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def store(tmp_path):
    """A store whose generation lab@g1 is 16 MiB of a seeded random pattern
    (no holes: every window of it is distinctive), with chunk digests."""
    root = str(tmp_path / "store")
    base = add_generation(root, "lab", "g1", data=random.Random(0x5EED).randbytes(SIZE))
    write_chunk_digests(root, "lab", "g1", base)
    return root, base


def node_key(store, tmp_path, node):
    """`admin key NODE` into a 0600 key file; returns (path, hex key)."""
    line = admin(store, "key", node).stdout.strip()
    return psk_file(tmp_path, line), line.split(":", 1)[1]


def psk_file(tmp_path, line):
    path = tmp_path / f"k{random.randrange(1 << 30)}.psk"
    path.write_text(line + "\n")
    path.chmod(0o600)
    return str(path)


def tls_agent(nbdserver, srv, sockdir, node, key, *args):
    return agent(nbdserver, srv, sockdir, node, "--tls", "require", "--tls-key-file", key, *args)


def request_mac(hexkey, method, target, counter, body):
    """tls::request_mac: HMAC-SHA256 under the node's key."""
    import hashlib
    import hmac
    msg = f"nbdroot request\n{method}\n{target}\n{counter}\n".encode() + body
    return hmac.new(bytes.fromhex(hexkey), msg, hashlib.sha256).hexdigest()


def http_json(hostport, path, body=None, key=None, counter=None, auth=None):
    """GET, or POST `body` as JSON; signed as node `key` (hex) with
    `counter` (default: the clock in microseconds), or with the header
    `auth` as given."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        counter = counter if counter is not None else time.time_ns() // 1000
        headers["X-Nbdroot-Auth"] = f"{counter} {request_mac(key, 'POST', path, counter, data)}"
    if auth is not None:
        headers["X-Nbdroot-Auth"] = auth
    req = urllib.request.Request(f"http://{hostport}{path}", data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def http_refusal(hostport, path, body, **kw):
    """The JSON of a 401 answer to a POST."""
    with pytest.raises(urllib.error.HTTPError) as e:
        http_json(hostport, path, body, **kw)
    assert e.value.code == 401, e.value.code
    return json.load(e.value)


def open_peer_key(hexkey, node, sealed):
    """What the agent does with the server's answer (tls/seal.hpp)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    raw = bytes.fromhex(sealed)
    aad = f"nbdroot peer key for {node} on {GEN}".encode()
    return AESGCM(bytes.fromhex(hexkey)).decrypt(raw[:12], raw[12:], aad)


def tls_handle(host, port, identity, hexkey, tmp_path):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(psk_file(tmp_path, f"{identity}:{hexkey}"))
    h.set_tls_username(identity)
    h.set_export_name(GEN)
    h.connect_tcp(host, str(port))
    return h


def split(hostport):
    host, _, port = hostport.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------- peers over TLS

def test_a_second_node_reads_from_the_first_over_tls(nbdserver, store, sockdir, tmp_path):
    root, base = store
    srv = serve(nbdserver, root, extra=("--tls", "require"))
    k1, _ = node_key(root, tmp_path, "n1")
    k2, _ = node_key(root, tmp_path, "n2")
    a = tls_agent(nbdserver, srv, sockdir, "n1", k1)
    ha = a.handle()
    assert read_all(ha) == base
    b = tls_agent(nbdserver, srv, sockdir, "n2", k2)
    hb = b.handle("lab/n2")
    assert read_all(hb) == base
    sb = b.wait_stats(lambda s: s["gen_peer_bytes"] >= SIZE // 2)
    assert sb["gen_peer_bytes"] >= SIZE // 2, sb
    assert sb["peer_bad_chunks"] == 0 and sb["peer_failures"] == 0, sb
    sa = a.wait_stats(lambda s: s["served_bytes"] >= sb["gen_peer_bytes"])
    assert sa["served_bytes"] >= sb["gen_peer_bytes"], sa
    for x in (a, b):
        log = x.stderr()
        assert "peers off" not in log, log
        assert f"over TLS only, as '{PEER_ID}'" in log, log
    ha.shutdown()
    hb.shutdown()


def test_the_peer_listener_gives_nothing_without_the_peer_key(nbdserver, store, sockdir,
                                                              tmp_path):
    root, base = store
    srv = serve(nbdserver, root, extra=("--tls", "require"))
    k1, hex1 = node_key(root, tmp_path, "n1")
    a = tls_agent(nbdserver, srv, sockdir, "n1", k1)
    ha = a.handle()
    assert read_all(ha, size=MiB) == base[:MiB]  # it holds these chunks now
    host, port = split(a.peer)

    # Plaintext, by hand: every option but STARTTLS is refused, and
    # NBD_OPT_EXPORT_NAME ends the connection without an export.
    with nbdraw.RawClient((host, port)) as c:
        c.handshake()
        assert c.opt_go(GEN, check=False)[-1].type == nbdraw.REP_ERR_TLS_REQD
        assert c.option(nbdraw.OPT_STRUCTURED_REPLY).type == nbdraw.REP_ERR_TLS_REQD
        c.send_option(nbdraw.OPT_EXPORT_NAME, GEN.encode())
        c.wait_closed()
    # Plaintext, libnbd.
    h = nbd.NBD()
    h.set_export_name(GEN)
    with pytest.raises(nbd.Error):
        h.connect_tcp(host, str(port))
    # TLS with a wrong key, a node's own key (under either identity), and
    # the peer key under a node's identity.
    sealed = http_json(srv.http, "/v1/nodes/lab/n1")["peer_key_sealed"]
    peer_key = open_peer_key(hex1, "n1", sealed).hex()
    for identity, key in ((PEER_ID, "e" * 64), ("n1", hex1), (PEER_ID, hex1), ("n1", peer_key)):
        with pytest.raises(nbd.Error):
            tls_handle(host, port, identity, key, tmp_path)
    assert a.stats()["served_bytes"] == 0
    log = a.stderr()
    assert f"identity 'n1' is not '{PEER_ID}', the peer identity here" in log, log
    # The peer key, as the server hands it to n1, reads the chunks: the
    # refusals above were the keys.
    h = tls_handle(host, port, PEER_ID, peer_key, tmp_path)
    assert h.pread(CHUNK, CHUNK) == base[CHUNK:2 * CHUNK]
    h.shutdown()
    ha.shutdown()


class PlainPeer(Listener):
    """A peer that speaks no TLS: greets, answers the first option with
    NBD_REP_ERR_UNSUP (as a plaintext server answers STARTTLS), then records
    whatever the client sends until it closes."""

    def __init__(self):
        self.sessions = []
        super().__init__()

    def _session(self, c):
        rec = {"first_option": None, "after": b""}
        self.sessions.append(rec)
        try:
            c.settimeout(10)
            c.sendall(struct.pack(">QQH", nbdraw.NBDMAGIC, nbdraw.IHAVEOPT,
                                  nbdraw.FLAG_FIXED_NEWSTYLE | nbdraw.FLAG_NO_ZEROES))
            recv_exact(c, 4)
            _, opt, length = struct.unpack(">QII", recv_exact(c, 16))
            rec["first_option"] = opt
            recv_exact(c, length)
            c.sendall(struct.pack(">QIII", nbdraw.OPT_REPLY_MAGIC, opt, nbdraw.REP_ERR_UNSUP, 0))
            while True:
                b = c.recv(65536)
                if not b:
                    break
                rec["after"] += b
        except (OSError, ConnectionError):
            pass
        finally:
            c.close()


def test_a_peer_that_refuses_starttls_is_dropped_reported_and_never_read(
        nbdserver, store, sockdir, tmp_path):
    root, base = store
    srv = serve(nbdserver, root, extra=("--tls", "require"))
    fake = PlainPeer()
    # The fake registers as a node of the store about to hold every chunk:
    # the tracker sends the next node to it.
    admin(root, "create", "n3", "--image", "lab")
    _, k3 = node_key(root, tmp_path, "n3")
    http_json(srv.http, f"/v1/tracker/{GEN}/sources",
              {"node": "n3", "peer_port": fake.port, "chunks": list(range(SIZE // CHUNK))}, key=k3)
    k2, _ = node_key(root, tmp_path, "n2")
    b = tls_agent(nbdserver, srv, sockdir, "n2", k2)
    hb = b.handle("lab/n2")
    assert read_all(hb, size=2 * MiB) == base[:2 * MiB]
    st = b.wait_stats(lambda s: s["peer_failures"] >= 1)
    assert st["gen_peer_bytes"] == 0 and st["peer_failures"] >= 1, st
    log = b.stderr()
    assert "did not accept NBD_OPT_STARTTLS" in log and "dropping that peer" in log, log
    assert fake.sessions, "the agent never tried the fake peer"
    time.sleep(0.3)  # let the fake see the close
    for s in fake.sessions:
        assert s["first_option"] == nbdraw.OPT_STARTTLS, s
        assert s["after"] == b"", f"plaintext after a refused STARTTLS: {s['after'][:64]!r}"
    tr = http_json(srv.http, f"/v1/tracker/{GEN}")
    assert tr["quarantines"] == 1, tr
    assert [p for p in tr["peers"] if p["node"] == "n3"][0]["quarantined_s"] > 0, tr
    hb.shutdown()
    fake.close()


# ---------------------------------------------------------------- no peer key

class RewritingApi:
    """An HTTP proxy in front of the server's API that passes everything
    through, but rewrites the answer for a node with `rewrite(json)`."""

    def __init__(self, upstream, rewrite):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self._relay(None)

            def do_POST(self):
                self._relay(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def _relay(self, body):
                req = urllib.request.Request(f"http://{upstream}{self.path}", data=body,
                                             method=self.command,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                if status == 200 and self.path.startswith("/v1/nodes/"):
                    data = json.dumps(rewrite(json.loads(data))).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def without_peer_key(j):
    j.pop("peer_key_sealed", None)
    j.pop("peer_identity", None)
    return j


def with_a_bad_peer_key(j):
    s = j["peer_key_sealed"]
    j["peer_key_sealed"] = s[:-1] + ("0" if s[-1] != "0" else "1")  # the tag no longer matches
    return j


@pytest.mark.parametrize("rewrite,why", [
    (without_peer_key, "carries no peer key for lab@g1"),
    (with_a_bad_peer_key, "carries a peer key for lab@g1 that this node cannot open"),
])
def test_without_a_peer_key_that_opens_peers_stay_off_and_the_root_works(
        nbdserver, store, sockdir, tmp_path, rewrite, why):
    root, base = store
    srv = serve(nbdserver, root, extra=("--tls", "require"))
    proxy = RewritingApi(srv.http, rewrite)
    k1, _ = node_key(root, tmp_path, "n1")
    sock = os.path.join(sockdir, "n1.sock")
    stats = os.path.join(sockdir, "n1.stats")
    host, port = srv.tcp
    p = nbdserver(args=["node", "--server", f"{host}:{port}", "--export", "lab/n1", "--socket",
                        sock, "--stats-file", stats, "--tracker", proxy.address,
                        "--peer-listen", "127.0.0.1:0", "--tls", "require", "--tls-key-file", k1],
                  listen=False)
    assert not any(l.startswith("peer ") for l in p.addresses), p.addresses
    log = p.stderr()
    lines = [l for l in log.splitlines() if "peers off" in l]
    assert len(lines) == 1 and why in lines[0], log
    assert "serving chunks" not in log, log
    h = nbd.NBD()
    h.set_export_name("lab/n1")
    h.connect_unix(sock)
    assert read_all(h) == base
    st = Agent(p, sock, stats).wait_stats(lambda s: s["view_read_bytes"] >= SIZE)
    assert st["view_read_bytes"] == SIZE and st["gen_server_bytes"] == 0, st
    h.shutdown()
    proxy.close()


# ---------------------------------------------------------------- packet capture

class Capture:
    """tcpdump of every TCP packet on lo (in this thread's namespace) into
    `path`, from start() to stop()."""

    def __init__(self, path):
        self.path = path
        self.proc = None
        self.summary = ""

    def start(self):
        if shutil.which("tcpdump") is None:
            pytest.skip("no tcpdump")
        self.proc = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-U", "-s", "0", "-B", "65536", "-w", str(self.path),
             "tcp"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        line = self.proc.stderr.readline()  # "listening on lo, ..." once capturing
        if "listening on" not in line:
            self.proc.wait(5)
            pytest.skip(f"tcpdump cannot capture here: {line}{self.proc.stderr.read()}")

    def stop(self):
        time.sleep(0.3)  # -U writes each packet as it arrives; let the last ones land
        self.proc.send_signal(signal.SIGINT)
        try:
            self.summary = self.proc.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.summary = self.proc.communicate(timeout=5)[1]
        return self.path.read_bytes()


@pytest.mark.parametrize("tls", ["require", "off"])
def test_no_image_byte_crosses_the_wire_in_plaintext_peers_included(
        nbdserver, store, sockdir, tmp_path, netns, tls):
    root, base = store
    flags = {}
    if tls == "require":
        for n in ("n1", "n2"):
            flags[n] = ("--tls", "require", "--tls-key-file", node_key(root, tmp_path, n)[0])
    cap = Capture(tmp_path / "run.pcap")
    cap.start()
    srv = serve(nbdserver, root, extra=("--tls", tls))
    a = agent(nbdserver, srv, sockdir, "n1", *flags.get("n1", ()))
    ha = a.handle()
    assert read_all(ha) == base
    b = agent(nbdserver, srv, sockdir, "n2", *flags.get("n2", ()))
    hb = b.handle("lab/n2")
    assert read_all(hb) == base
    sb = b.wait_stats(lambda s: s["gen_peer_bytes"] >= SIZE // 2)
    assert sb["gen_peer_bytes"] >= SIZE // 2, sb
    ha.shutdown()
    hb.shutdown()
    data = cap.stop()
    assert "0 packets dropped by kernel" in cap.summary.splitlines(), cap.summary
    # n1's image from the server, and n2's from n1 and the server.
    assert len(data) > 2 * SIZE, f"the capture holds {len(data)} bytes: it missed the transfer"
    ws = windows(base)
    seen = [w for w in ws if w in data]
    if tls == "require":
        assert not seen, f"{len(seen)} of {len(ws)} windows of the image are in the capture"
    else:
        # The control: the same run in plaintext, and the capture has them.
        assert len(seen) == len(ws), f"only {len(seen)} of {len(ws)} windows in a plaintext capture"


# ---------------------------------------------------------------- tracker calls bound to the node

def test_tracker_changes_need_the_nodes_key(nbdserver, store, tmp_path):
    """Under --tls require a tracker POST proves it comes from the node it
    names: a MAC under that node's key over method, target, a counter and
    the body. Without it, with another node's key, with a changed body or
    with a counter played again, 401 with the reason, and nothing changes;
    a 401 for a stale counter names the last one taken."""
    root, base = store
    srv = serve(nbdserver, root, extra=("--tls", "require"))
    admin(root, "create", "n1", "n2", "--image", "lab")
    _, k1 = node_key(root, tmp_path, "n1")
    _, k2 = node_key(root, tmp_path, "n2")
    path = f"/v1/tracker/{GEN}/sources"
    body = {"node": "n1", "peer_port": 4000, "chunks": [0, 1]}
    assert "no X-Nbdroot-Auth" in http_refusal(srv.http, path, body)["error"]
    assert "does not match" in http_refusal(srv.http, path, body, key=k2)["error"]
    good = f"{10**15} {request_mac(k1, 'POST', path, 10**15, json.dumps(body).encode())}"
    changed = dict(body, chunks=[0, 1, 2])
    assert "does not match" in http_refusal(srv.http, path, changed, auth=good)["error"]
    for bad in ("", "12", "x y", "-1 ab", "1" * 25 + " ab"):
        http_refusal(srv.http, path, body, auth=bad)
    assert http_json(srv.http, f"/v1/tracker/{GEN}")["peers"] == []  # nothing registered
    assert http_json(srv.http, path, body, auth=good)["sources"] == [0, 0]
    j = http_refusal(srv.http, path, body, auth=good)  # played again
    assert "not above the last one taken" in j["error"] and j["counter"] == 10**15, j
    assert http_json(srv.http, path, body, key=k1, counter=10**15 + 1)["sources"] == [0, 0]
    # report too, and a node without a key
    rep = {"node": "n1", "peer_port": 4000, "leaving": True}
    assert "no X-Nbdroot-Auth" in http_refusal(srv.http, f"/v1/tracker/{GEN}/report", rep)["error"]
    admin(root, "create", "n9", "--image", "lab")
    j = http_refusal(srv.http, path, dict(body, node="n9"), key=k1)
    assert "node 'n9' has no usable key: no key" in j["error"], j
    assert k1 not in srv.stderr() and k2 not in srv.stderr()
    assert "refused: the request's MAC does not match" in srv.stderr()


def test_an_agent_whose_clock_went_back_moves_past_the_servers_counter(
        nbdserver, store, sockdir, tmp_path):
    """The server took a counter from the node's future (a clock set back
    since): the agent's first signed call is refused naming it, and the
    agent signs again past it."""
    root, base = store
    srv = serve(nbdserver, root, extra=("--tls", "require"))
    admin(root, "create", "n1", "--image", "lab")
    kf, k1 = node_key(root, tmp_path, "n1")
    future = (time.time_ns() // 1000) + 10**12
    http_json(srv.http, f"/v1/tracker/{GEN}/report", {"node": "n1"}, key=k1, counter=future)
    a = tls_agent(nbdserver, srv, sockdir, "n1", kf)
    h = a.handle()
    assert read_all(h, size=MiB) == base[:MiB]
    a.wait_stats(lambda s: s["gen_server_bytes"] >= MiB)
    tr = http_json(srv.http, f"/v1/tracker/{GEN}")
    assert [p["node"] for p in tr["peers"] if p["chunks_held"] >= 16] == ["n1"], tr
    assert "not above the last one taken" in srv.stderr()
    h.shutdown()
