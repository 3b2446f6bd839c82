"""A node boots its root under `--tls require` (issue 13): the kernel talks
to nbdroot-agent over a Unix socket inside the node, and the agent holds a
TLS 1.3 connection to the server, authenticated by the node's pre-shared
key (`nbdserver admin key NODE`, given as nbdroot.key=NODE:HEX). A second
node with a wrong key never attaches its view."""

import re
import time

import pytest

import nodelab
from test_boot import MAC_A, MAC_B, assert_clean, markers


@pytest.fixture
def tlslab(lab):
    """`lab` with its server restarted under --tls require."""
    lab.server.stop()
    lab.server = nodelab.Server(lab.server.binary, lab.store.path, lab.workdir,
                                args=["--tls", "require"]).start()
    yield lab
    for v in lab.vms:
        v.kill()


def tls_args(key):
    return f"nbdroot.agent=on nbdroot.tls=require nbdroot.key={key}"


def wait_for_log(server, pattern, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, server.text())
        if m:
            return m
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} in the server's log within {timeout} s:\n"
                         + server.text()[-3000:])


def test_node_boots_with_its_key_and_a_wrong_key_does_not_attach(tlslab):
    lab = tlslab
    key = lab.store.admin("key", "t1").strip()
    assert re.fullmatch(r"t1:[0-9a-f]{64}", key), key

    first = lab.boot("tls1", lab.cmdline("t1", f"{tls_args(key)} e2e.write=own.txt:t1"), MAC_A)
    assert_clean(first)
    log = lab.server.text()
    assert re.search(r"TLS established \(TLS1\.3/AES-128-GCM\) as 't1'", log), log[-3000:]
    assert "attached export 'lab/t1'" in log, log[-3000:]
    # Its change is in its own view: a second boot with the key sees it.
    again = lab.boot("tls1b", lab.cmdline("t1", tls_args(key)), MAC_A)
    assert_clean(again)
    assert markers(again).get("own.txt") == "t1"

    # A node whose key is not the one the store holds: the server refuses
    # every handshake, says why in its log, and never attaches its view.
    lab.store.admin("key", "t2")
    wrong = "t2:" + "5a" * 32
    bad = lab.vm("tls2", lab.cmdline("t2", tls_args(wrong)), MAC_B).start()
    wait_for_log(lab.server, r"TLS handshake failed.*identity t2 has a key here", 600)
    time.sleep(5)  # a few more attempts
    assert bad.proc.poll() is None or "E2E: done" not in bad.console()
    assert "E2E: done" not in bad.console(), "a node with a wrong key booted its root"
    bad.kill()
    log = lab.server.text()
    assert "attached export 'lab/t2'" not in log
    assert "'t2'" not in re.findall(r"TLS established .* as ('[^']*')", log)
    # The client was told nothing of why.
    assert "has a key here" not in bad.console()
