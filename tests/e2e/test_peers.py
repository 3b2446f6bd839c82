"""Nodes read their root's clean blocks from each other (issue 11): two VMs
on one virtual network (nodelab.PeerNet: a bridge in a network namespace,
nbdserver and its tracker on it), each through nbdroot-agent. The first
boots from the server and stays up serving what it read; the second reads
most of its clean blocks from the first. Both keep their own changes. The
first is killed in the middle of the second one's next boot, which still
boots (from the server)."""

import json
import time

import pytest

import nodelab
from test_boot import MAC_A, MAC_B, assert_clean, markers



def agent_stats(vm):
    """The last counters the node printed (E2E: agent {...})."""
    lines = [l for l in vm.e2e() if l.startswith("agent {")]
    assert lines, f"{vm.name}: no agent counters on the console ({vm.console_path})"
    return json.loads(lines[-1][len("agent "):])


def tracker(lab):
    gen = lab.first_generation
    # The tracker is in the namespace: ask from there.
    out = nodelab.run(lab.server.net.prefix + [
        "python3", "-c",
        "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read()"
        ".decode())", f"http://{lab.server.tracker}/v1/tracker/lab@{gen}"]).stdout
    return json.loads(out)


@pytest.fixture
def peerlab(lab):
    """`lab` with its server moved onto a PeerNet, with the tracker."""
    lab.server.stop()
    net = nodelab.PeerNet()
    try:
        lab.server = nodelab.Server(lab.server.binary, lab.store.path, lab.workdir, net=net).start()
        yield lab
    finally:
        for v in lab.vms:
            v.kill()
        lab.server.stop()
        net.close()


def test_second_node_reads_its_clean_blocks_from_the_first(peerlab):
    lab = peerlab
    net = lab.server.net
    peers = f"nbdroot.agent=on nbdroot.tracker={lab.server.tracker}"

    first = lab.vm("first", lab.cmdline("p1", f"{peers} e2e.write=own.txt:p1 e2e.stay"),
                   MAC_A, net=net).start()
    first.wait_for(r"E2E: done")
    assert_clean(first)

    second = lab.boot("second", lab.cmdline("p2", f"{peers} e2e.write=own.txt:p2"), MAC_B,
                      net=net)
    assert_clean(second)
    s = agent_stats(second)
    print(f"second: {s}")
    # Most of its clean-block reads came from the first node, checked
    # against the digests (no bad chunk).
    assert s["gen_peer_bytes"] > 0, s
    assert s["gen_peer_bytes"] > s["gen_server_bytes"], s
    assert s["peer_bad_chunks"] == 0, s
    # The first served them: its counters, and the tracker's.
    # It prints its counters every second (written every 250 ms).
    deadline = time.monotonic() + 60
    while agent_stats(first)["served_bytes"] < s["gen_peer_bytes"] and time.monotonic() < deadline:
        assert first.proc.poll() is None, f"first: qemu exited; console in {first.console_path}"
        time.sleep(0.5)
    f = agent_stats(first)
    print(f"first: {f}")
    assert f["served_bytes"] >= s["gen_peer_bytes"], (f, s)
    t = tracker(lab)
    print(f"tracker: {t}")
    by_node = {p["node"]: p for p in t["peers"]}
    assert by_node["p1"]["address"] == f"{first.address}:10809", t
    assert by_node["p1"]["answers"] > 0, t

    # The first is killed in the middle of the second one's next boot: once
    # the second has mounted its root, before its /sbin/init runs.
    again = lab.vm("second-again", lab.cmdline("p2", f"{peers} e2e.files"), MAC_B,
                   net=net).start()
    again.wait_for(r"EXT4-fs \(nbd0\): mounted")
    first.kill()
    again.wait()
    assert_clean(again)
    assert markers(again) == {"own.txt": "p2"}, markers(again)
    print(f"second-again: {agent_stats(again)}")

    # The first kept its own change (and only its own).
    # Its own NIC again, so its own address: the killed VM's connection may
    # still be open, and one address at a time writes a node's view.
    back = lab.boot("first-again", lab.cmdline("p1", f"{peers} e2e.files"), MAC_A, net=net)
    assert_clean(back)
    assert markers(back) == {"own.txt": "p1"}, markers(back)
