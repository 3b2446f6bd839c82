"""Nodes boot Debian's kernel with our own initrd and mount their root from
nbdserver (issue 5, scenarios 1-6). Every boot has a timeout; consoles of
failed tests are kept (see conftest.py).

The node's /sbin/init is node_init.sh: it prints "E2E: ..." lines and
powers the VM off."""

import json
import re
import time

import nodelab

MAC_A = "52:54:00:12:34:56"
MAC_B = "52:54:00:12:34:57"
IO_ERRORS = re.compile(r"I/O error|EXT4-fs error|Buffer I/O error|IO-ERROR")


def assert_clean(vm):
    """The node finished its init and saw no I/O error."""
    lines = vm.e2e()
    assert "done" in lines, f"{vm.name}: the node's init did not finish:\n" + "\n".join(lines)
    bad = [l for l in vm.console().splitlines() if IO_ERRORS.search(l)]
    assert not bad, f"{vm.name}: I/O errors:\n" + "\n".join(bad[:20])


def markers(vm):
    return dict(l[len("marker "):].split("=", 1) for l in vm.e2e() if l.startswith("marker "))


def generation(vm):
    for l in vm.e2e():
        m = re.match(r"init started, generation (\S+)", l)
        if m:
            return m.group(1)
    raise AssertionError(f"{vm.name}: no generation line")


def state(vm):
    return dict(l[len("state "):].split("=", 1) for l in vm.e2e() if l.startswith("state "))


def test_persistent_node_keeps_its_changes(lab):
    """1: a persistent node writes a file, reboots and sees it."""
    first = lab.boot("first", lab.cmdline(extra="e2e.write=note.txt:kept-1"), MAC_A)
    assert_clean(first)
    st = state(first)
    # The node id defaults to the MAC address of the boot interface.
    assert st["NBDROOT_EXPORT"] == "lab/52-54-00-12-34-56", st
    assert "note.txt" not in markers(first)
    second = lab.boot("second", lab.cmdline(), MAC_A)
    assert_clean(second)
    assert markers(second).get("note.txt") == "kept-1"
    print(f"boot times: {first.elapsed:.1f} s, {second.elapsed:.1f} s")


def test_ephemeral_node_starts_clean(lab):
    """2: an ephemeral node does not see what it wrote in its last boot."""
    lab.store.admin("create", "eph", "--image", "lab", "--mode", "ephemeral")
    args = "nbdroot.mode=ephemeral"
    first = lab.boot("first", lab.cmdline("eph", f"{args} e2e.write=note.txt:gone"), MAC_A)
    assert_clean(first)
    assert state(first)["NBDROOT_MODE"] == "ephemeral"
    second = lab.boot("second", lab.cmdline("eph", args), MAC_A)
    assert_clean(second)
    assert "note.txt" not in markers(second), markers(second)


def test_two_nodes_at_once_see_only_their_own(lab):
    """3: two nodes boot at once from one generation; each sees only its
    own change."""
    a = lab.vm("a1", lab.cmdline(extra="e2e.write=who.txt:node-a"), MAC_A).start()
    b = lab.vm("b1", lab.cmdline(extra="e2e.write=who.txt:node-b"), MAC_B).start()
    a.wait()
    b.wait()
    assert_clean(a)
    assert_clean(b)
    assert state(a)["NBDROOT_NODE"] == "52-54-00-12-34-56"
    assert state(b)["NBDROOT_NODE"] == "52-54-00-12-34-57"
    a = lab.vm("a2", lab.cmdline(), MAC_A).start()
    b = lab.vm("b2", lab.cmdline(), MAC_B).start()
    a.wait()
    b.wait()
    assert markers(a).get("who.txt") == "node-a"
    assert markers(b).get("who.txt") == "node-b"


def test_running_node_survives_publish_and_moves_after_reset(lab, tmp_path):
    """4: a new generation is published while a node runs: the node keeps
    working on its own; it stays on it across a reboot (pinned) and comes
    up on the new one after `admin reset --generation current`."""
    node = "n4"
    vm = lab.vm("running", lab.cmdline(node, "e2e.ticks=6 e2e.tickwait=1"), MAC_A).start()
    vm.wait_for(r"E2E: tick 2 ok")
    tree = nodelab.make_test_tree(str(tmp_path / "tree-g2"), "g2")
    gen2 = lab.store.build("lab", tree, "g2")
    lab.store.publish("lab", gen2)
    vm.wait()
    assert_clean(vm)
    assert "tick 6 ok" in vm.e2e()
    assert generation(vm) == "g1"

    again = lab.boot("pinned", lab.cmdline(node, "e2e.files"), MAC_A)
    assert_clean(again)
    assert generation(again) == "g1"
    assert "files ok 6" in again.e2e()

    lab.store.admin("reset", node, "--generation", "current")
    moved = lab.boot("moved", lab.cmdline(node, "e2e.files"), MAC_A)
    assert_clean(moved)
    assert generation(moved) == "g2"
    assert not any(l.startswith("files ") for l in moved.e2e()), "changes survived the reset"


def writes_through_a_restart(lab, name, cmdline, restart_after, ticks):
    """Boots a node that writes and re-reads a file per tick (every tick
    re-reads all the files before it); stops nbdserver (SIGTERM) after tick
    `restart_after` and starts it again on the same port a second later.
    The node must finish with no I/O error, reconnected by nbdroot-keeper."""
    vm = lab.vm(name, cmdline, MAC_A).start()
    vm.wait_for(rf"E2E: tick {restart_after} ok")
    assert lab.server.stop() == 0
    time.sleep(1)
    lab.server.start()
    vm.wait()
    assert_clean(vm)
    assert f"tick {ticks} ok" in vm.e2e()
    # The kernel lost its socket and nbdroot-keeper gave it a new one.
    con = vm.console()
    assert "nbdroot-keeper: reconnected to 10.0.2.2:" in con, con[-3000:]
    print("\n".join(l for l in con.splitlines() if "nbdroot-keeper" in l or "nbd0" in l))
    return vm


def test_node_survives_server_restart(lab):
    """5: nbdserver is stopped (SIGTERM) and started again on the same port
    while the node writes and re-reads; the node sees no I/O error and all
    its data is there afterwards."""
    node = "n5"
    writes_through_a_restart(lab, "writer", lab.cmdline(node, "e2e.ticks=12 e2e.tickwait=1"),
                             restart_after=3, ticks=12)
    after = lab.boot("after", lab.cmdline(node, "e2e.files"), MAC_A)
    assert_clean(after)
    assert "files ok 12" in after.e2e()


def test_ephemeral_node_keeps_its_changes_across_a_server_restart(lab):
    """5b: an ephemeral node's changes last for its boot, server restarts
    included: nbdroot-keeper reattaches with ?resume, which the server does
    not take for a new boot. The next boot starts clean."""
    lab.store.admin("create", "eph5", "--image", "lab", "--mode", "ephemeral")
    args = "nbdroot.mode=ephemeral e2e.ticks=8 e2e.tickwait=1"
    writes_through_a_restart(lab, "eph-writer", lab.cmdline("eph5", args), restart_after=2,
                             ticks=8)
    again = lab.boot("eph-again", lab.cmdline("eph5", "nbdroot.mode=ephemeral e2e.files"), MAC_A)
    assert_clean(again)
    assert not any(l.startswith("files ") for l in again.e2e()), "an ephemeral node kept its changes"


def test_node_survives_server_restart_through_the_agent(lab):
    """5c: as 5, booted through nbdroot-agent (peers off: no tracker): the
    kernel's socket is the agent's, which reconnects to the server by
    itself (?resume); no nbdroot-keeper."""
    node = "n5c"
    vm = lab.vm("agent-writer", lab.cmdline(node, "nbdroot.agent=on e2e.ticks=12 e2e.tickwait=1"),
                MAC_A).start()
    vm.wait_for(r"E2E: tick 3 ok")
    assert lab.server.stop() == 0
    time.sleep(1)
    lab.server.start()
    vm.wait()
    assert_clean(vm)
    assert "tick 12 ok" in vm.e2e()
    assert state(vm)["NBDROOT_SERVER"] == "unix:/run/nbdroot/agent.sock", state(vm)
    lines = vm.e2e()
    assert any(re.match(r"process +\d+ .*@bdroot-agent ", l) for l in lines), lines
    assert not any("nbdroot-keeper" in l for l in lines), lines
    stats = json.loads(next(l[len("agent "):] for l in lines if l.startswith("agent ")))
    assert stats["reconnects"] >= 1, stats
    after = lab.boot("agent-after", lab.cmdline(node, "nbdroot.agent=on e2e.files"), MAC_A)
    assert_clean(after)
    assert "files ok 12" in after.e2e()


def test_no_server_fails_clearly_and_boundedly(lab):
    """6: nobody listens: the node says why and reboots (panic=) within a
    bounded time."""
    lab.server.stop()
    port = nodelab.free_port()
    t0 = time.monotonic()
    vm = lab.boot("noserver", lab.cmdline(extra="nbdroot.retries=2", port=port), MAC_A,
                  timeout=150)
    took = time.monotonic() - t0
    con = vm.console()
    assert "nbdroot: FAILED: no server gave us export lab/52-54-00-12-34-56 after 2 rounds" in con
    assert f"connecting to 10.0.2.2:{port}" in con
    assert "nbdroot: rebooting in 5 s" in con
    assert took < 120, f"failing took {took:.0f} s"
    print(f"failed and rebooted after {took:.1f} s")
