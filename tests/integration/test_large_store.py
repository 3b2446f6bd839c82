"""A store with many nodes: listing them all (nbdinfo --list asks two
options per export on one connection) must not run into the handshake
timeout, which times a lack of progress, not the whole handshake; a client
that trickles bytes of an option that never finishes is still cut off.
"""

import json
import os
import struct
import time

import pytest

import nbdraw as N
import storeutil
from conftest import run

NODES = 1000


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A store with one image and NODES registered nodes (one admin run)."""
    store, _ = storeutil.make_store(tmp_path_factory.mktemp("big"))
    storeutil.admin(store, "create", *[f"n{i:04d}" for i in range(NODES)], "--image", "lab")
    return store


def listed(uri):
    p = run(["nbdinfo", "--list", "--json", uri], timeout=120)
    return {e["export-name"] for e in json.loads(p.stdout)["exports"]}


def test_nbdinfo_lists_1000_nodes(nbdserver, tmp_path, big_store):
    """Over a Unix socket nbdinfo needs a few ms per export, so a thousand
    take longer than the (small) timeout but each option far less."""
    sock = str(tmp_path / "sock")
    srv = nbdserver(args=["--store", big_store, "--socket", sock, "--handshake-timeout", "3"])
    t0 = time.monotonic()
    names = listed(f"nbd+unix:///?socket={sock}")
    elapsed = time.monotonic() - t0
    want = {"lab", "lab@g1"} | {f"lab/n{i:04d}" for i in range(NODES)}
    assert names == want, f"missing {sorted(want - names)[:5]}, extra {sorted(names - want)[:5]}"
    srv.assert_alive()
    print(f"nbdinfo --list of {len(names)} exports: {elapsed:.2f} s")
    # Asking about a node (NBD_OPT_INFO, LIST_META_CONTEXT) does not attach
    # it: no lock, no layer files, no "last seen".
    nodes = os.path.join(big_store, "nodes")
    touched = [n for n in os.listdir(nodes) if os.listdir(os.path.join(nodes, n)) != ["node.json"]]
    assert not touched, f"listing touched {len(touched)} nodes, e.g. {touched[:3]}"
    assert storeutil.node_record(big_store, "n0007")["last_seen"] == ""


def test_admin_list_of_1000_nodes_changes_nothing(big_store):
    before = {n: sorted(os.listdir(os.path.join(big_store, "nodes", n)))
              for n in os.listdir(os.path.join(big_store, "nodes"))}
    out = storeutil.admin(big_store, "list", "--json").stdout
    assert sorted(r["node"] for r in json.loads(out)) == [f"n{i:04d}" for i in range(NODES)]
    after = {n: sorted(os.listdir(os.path.join(big_store, "nodes", n)))
             for n in os.listdir(os.path.join(big_store, "nodes"))}
    assert after == before, "admin list created files"


def test_nbdinfo_list_over_tcp_outlasts_the_timeout(nbdserver, tmp_path):
    """libnbd 1.14 over TCP spends ~0.1-0.2 s per export (its options go
    out corked with MSG_MORE): 60 exports take several times the 1 s timeout."""
    store, _ = storeutil.make_store(tmp_path)
    storeutil.admin(store, "create", *[f"t{i:02d}" for i in range(60)], "--image", "lab")
    srv = nbdserver(args=["--store", store, "--handshake-timeout", "1"])
    host, port = srv.tcp
    names = listed(f"nbd://{host}:{port}")
    assert names == {"lab", "lab@g1"} | {f"lab/t{i:02d}" for i in range(60)}


def test_client_finishing_options_slowly_is_not_cut_off(nbdserver, tmp_path):
    """One option every 0.5 s for 5 s, with a 2 s timeout: each one is
    progress, so the client reaches transmission and reads."""
    store, base = storeutil.make_store(tmp_path)
    srv = nbdserver(args=["--store", store, "--handshake-timeout", "2"])
    c = N.RawClient(srv.tcp)
    c.handshake()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        replies = c.option_replies(N.OPT_LIST)
        assert replies[-1].type == N.REP_ACK
        time.sleep(0.5)  # the client's pace, not a synchronisation
    c.opt_structured_reply()
    c.opt_go("lab")
    err, data, _ = c.read(0, 4096)
    assert err == 0 and data == base[:4096]
    c.close()


def trickle(c, data, every, limit):
    """Sends `data` a byte at a time, one per `every` s, until the server
    closes the connection; returns the seconds until then (None: still open
    after `limit` s)."""
    t0 = time.monotonic()
    for b in data:
        if time.monotonic() - t0 > limit:
            return None
        try:
            c.send(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - t0
        c.sock.settimeout(every)
        try:
            if c.sock.recv(65536) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - t0
    return None


@pytest.mark.parametrize("what", ["header", "data"])
def test_option_trickled_in_is_cut_off(nbdserver, tmp_path, what):
    """A slowloris: a byte every 0.2 s of an option header, or of option
    data that would take 20 s, is never progress, so the 1 s timeout ends
    it however steadily the bytes come."""
    store, _ = storeutil.make_store(tmp_path)
    srv = nbdserver(args=["--store", store, "--handshake-timeout", "1"])
    c = N.RawClient(srv.tcp)
    c.handshake()
    if what == "header":
        data = struct.pack(">QII", N.IHAVEOPT, N.OPT_INFO, 100) + b"x" * 100
    else:
        c.send(struct.pack(">QII", N.IHAVEOPT, N.OPT_INFO, 100))
        data = b"x" * 100
    took = trickle(c, data, 0.2, limit=15)
    assert took is not None, "a client trickling bytes was never cut off"
    assert took < 1 + 5, took
    c.close()
    assert "no option finished" in srv.stderr()
