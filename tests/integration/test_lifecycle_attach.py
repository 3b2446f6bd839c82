"""Node lifecycles on the NBD side and in `nbdserver admin` (issue 12).

- A node that is not `ready` (new, verify, failed, retired) cannot attach
  its view: NBD_OPT_GO and NBD_OPT_INFO get an error naming the state and
  its reason, which libnbd and nbdinfo show, and the store is left as it
  was. `admin state NODE ready` lets it attach, with the running server.
- A node with node.json and no state.json is ready (made before lifecycles,
  or at an attach). Under --new-nodes verify or refuse, a node the store
  does not know at all is refused at attach and nothing is created; under
  the default (ready) it is created at its attach as before.
- `admin state`, `admin report` and the STATE column of `admin list`,
  with wrong input: unknown state, unknown node, corrupt state.json.
"""

import json
import os
import subprocess
import urllib.parse

import nbd
import pytest

import nbdraw as N
from conftest import MiB
from storeutil import admin, make_store, read_all, serve_store, sha256_path

SIZE = 16 * MiB
SERVER_MSG = "server error message: "


@pytest.fixture
def store(tmp_path):
    """(store dir, base bytes of lab@g1)."""
    return make_store(tmp_path)


def tree(root):
    """{relative path: (kind, content hash or None, mtime)} of everything under root."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (
                os.path.isdir(p), None if os.path.isdir(p) else sha256_path(p), st.st_mtime_ns)
    return out


def refused(srv, name):
    """Attaches `name` with libnbd, which must fail, and returns the
    server's message as libnbd saw it (1.14 has it in its debug log only);
    the raw client's NBD_OPT_GO gets the same error text."""
    log = []
    h = nbd.NBD()
    h.set_debug_callback(lambda ctx, msg: log.append(msg))
    h.set_debug(True)
    h.set_export_name(name)
    host, port = srv.tcp
    with pytest.raises(nbd.Error):
        h.connect_tcp(host, str(port))
    msgs = [m.split(SERVER_MSG, 1)[1] for m in log if SERVER_MSG in m]
    assert msgs, f"attach of {name!r} failed without a server message"
    with N.RawClient(srv.tcp) as c:
        c.handshake()
        c.opt_structured_reply()
        final = c.opt_go(name, check=False)[-1]
    assert final.is_error
    assert final.data.decode(errors="replace") == msgs[-1]
    return msgs[-1]


def attach(srv, name):
    h = nbd.NBD()
    h.set_export_name(name)
    host, port = srv.tcp
    h.connect_tcp(host, str(port))
    return h


def nbdinfo(srv, name):
    """nbdinfo on the export: (returncode, stderr) with libnbd's debug on."""
    r = subprocess.run(["nbdinfo", srv.uri(urllib.parse.quote(name, safe="/@"))],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, LIBNBD_DEBUG="1"))
    return r.returncode, r.stderr


def admin_list(root):
    return {n["node"]: n for n in json.loads(admin(root, "list", "--json").stdout)}


def state_json(root, node):
    with open(os.path.join(root, "nodes", node, "state.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- attach

@pytest.mark.parametrize("state", ["new", "verify", "failed", "retired"])
def test_node_not_ready_cannot_attach_until_an_admin_makes_it_ready(nbdserver, store, state):
    root, base = store
    admin(root, "create", "n1", "--image", "lab")
    out = admin(root, "state", "n1", state, "--reason", "memtester failed").stdout
    assert out == f"node n1: ready -> {state}\n"
    srv = serve_store(nbdserver, root)
    before = tree(root)
    msg = refused(srv, "lab/n1")
    assert f"node n1 is in state {state} (memtester failed): it may not attach its root" in msg
    rc, err = nbdinfo(srv, "lab/n1")
    assert rc != 0
    assert f"node n1 is in state {state} (memtester failed)" in err, err[-3000:]
    assert tree(root) == before, "a refused attach changed the store"
    # The running server reads the state at each attach.
    admin(root, "state", "n1", "ready")
    h = attach(srv, "lab/n1")
    assert read_all(h, SIZE) == base
    h.shutdown()
    assert state_json(root, "n1")["state"] == "ready"
    assert [c["to"] for c in state_json(root, "n1")["history"]] == [state, "ready"]


def test_node_failed_while_attached_gets_no_new_connection(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    h1 = attach(srv, "lab/n1")  # created at its attach: no state.json, ready
    assert not os.path.exists(os.path.join(root, "nodes", "n1", "state.json"))
    admin(root, "state", "n1", "failed", "--reason", "checked by hand")
    msg = refused(srv, "lab/n1")
    assert "node n1 is in state failed (checked by hand)" in msg
    assert h1.pread(4096, 0) == base[:4096]  # the open connection stays
    h1.shutdown()


@pytest.mark.parametrize("policy", ["verify", "refuse"])
def test_unknown_node_is_refused_under_verify_and_refuse(nbdserver, store, policy):
    root, _ = store
    srv = serve_store(nbdserver, root, "--new-nodes", policy)
    before = tree(root)
    msg = refused(srv, "lab/n9")
    assert f"node n9 is unknown to the store and the server runs with --new-nodes {policy}" in msg
    rc, err = nbdinfo(srv, "lab/n9")
    assert rc != 0 and "node n9 is unknown to the store" in err, err[-3000:]
    assert tree(root) == before
    assert not os.path.exists(os.path.join(root, "nodes", "n9"))
    # A registered node without a state is ready under either policy.
    admin(root, "create", "n2", "--image", "lab")
    attach(srv, "lab/n2").shutdown()


def test_registered_nodes_only_and_ready_only_together(nbdserver, store):
    """The lab tier's "registered nodes only, on request": with --nodes
    registered an unknown node is refused, and a registered node that is
    not ready is refused too; only a registered, ready node attaches."""
    root, base = store
    admin(root, "create", "n1", "--image", "lab")
    admin(root, "state", "n1", "verify", "--reason", "new hardware")
    srv = serve_store(nbdserver, root, "--nodes", "registered")
    before = tree(root)
    assert "n9" in refused(srv, "lab/n9")
    assert "node n1 is in state verify (new hardware)" in refused(srv, "lab/n1")
    assert tree(root) == before
    assert not os.path.exists(os.path.join(root, "nodes", "n9"))
    admin(root, "state", "n1", "ready")
    h = attach(srv, "lab/n1")
    assert read_all(h, SIZE) == base
    h.shutdown()


def test_unknown_node_is_created_at_attach_by_default(nbdserver, store):
    root, base = store
    srv = serve_store(nbdserver, root)
    h = attach(srv, "lab/n9")
    assert read_all(h, SIZE) == base
    h.shutdown()
    assert os.path.exists(os.path.join(root, "nodes", "n9", "node.json"))


def test_corrupt_state_json_refuses_the_attach(nbdserver, store):
    root, _ = store
    admin(root, "create", "n1", "--image", "lab")
    path = os.path.join(root, "nodes", "n1", "state.json")
    with open(path, "w") as f:
        f.write('{"state": ')
    srv = serve_store(nbdserver, root)
    msg = refused(srv, "lab/n1")
    assert f"{path}: corrupt record (not valid JSON)" in msg, msg
    with open(path) as f:
        assert f.read() == '{"state": '


@pytest.mark.parametrize("flag,value,word", [
    ("--new-nodes", "auto", "--new-nodes 'auto': expected ready, verify or refuse"),
    ("--verify-timeout", "0", "--verify-timeout must be from 1"),
    ("--heartbeat-timeout", "99999", "--heartbeat-timeout must be from 1 second to"),
    ("--memtest-timeout", "-1", "--memtest-timeout must be from 0"),
    ("--memtest-timeout", "3600", "--memtest-timeout must be from 0"),
    ("--verify-timeout", "soon", "verify-timeout"),
])
def test_lifecycle_flags_are_checked(store, flag, value, word):
    root, _ = store
    from conftest import NBDSERVER
    r = subprocess.run([NBDSERVER, "--store", root, "--listen", "127.0.0.1:0", flag, value],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert word in r.stderr, r.stderr


# ---------------------------------------------------------------- admin

def test_admin_state_is_in_the_history_with_who_and_why(store):
    """Each `admin state` is one history entry: from, to, the reason given
    (or "set by an admin"), and by "admin (uid N)", N the caller's uid."""
    root, _ = store
    admin(root, "create", "n1", "--image", "lab")
    admin(root, "state", "n1", "failed", "--reason", "DIMM B2 reseated, retest")
    admin(root, "state", "n1", "verify")
    hist = state_json(root, "n1")["history"]
    by = f"admin (uid {os.getuid()})"
    assert [(c["from"], c["to"], c["reason"], c["by"]) for c in hist] == [
        ("ready", "failed", "DIMM B2 reseated, retest", by),
        ("failed", "verify", "set by an admin", by)]
    st = state_json(root, "n1")
    assert (st["state"], st["reason"]) == ("verify", "set by an admin")
    # And in the store's audit log, one line each.
    with open(os.path.join(root, "audit.log")) as f:
        lines = [json.loads(l) for l in f if '"state"' in l]
    assert [(l["action"], l["detail"]) for l in lines] == [
        ("state", "n1 ready -> failed: DIMM B2 reseated, retest"),
        ("state", "n1 failed -> verify")], lines


def test_admin_state_wrong_input(store):
    root, _ = store
    admin(root, "create", "n1", "--image", "lab")
    before = tree(root)
    r = admin(root, "state", "n1", "broken", check=False)
    assert r.returncode == 2
    assert "unknown state 'broken' (expected new, verify, ready, failed or retired)" in r.stderr
    r = admin(root, "state", "n1", check=False)
    assert r.returncode == 2 and "state: expected NODE STATE" in r.stderr
    r = admin(root, "state", "nobody", "ready", check=False)
    assert r.returncode == 1 and "node 'nobody' does not exist" in r.stderr
    r = admin(root, "state", "../n1", "ready", check=False)
    assert r.returncode == 1 and "bad node name" in r.stderr
    assert tree(root) == before
    assert not os.path.exists(os.path.join(root, "nodes", "nobody"))


def test_admin_state_with_a_corrupt_state_json(store):
    root, _ = store
    admin(root, "create", "n1", "--image", "lab")
    path = os.path.join(root, "nodes", "n1", "state.json")
    with open(path, "w") as f:
        json.dump({"node": "n1", "state": "sideways"}, f)
    with open(path) as f:
        text = f.read()
    r = admin(root, "state", "n1", "ready", check=False)
    assert r.returncode == 1
    assert f"{path}: corrupt record (" in r.stderr and "remove it" in r.stderr, r.stderr
    with open(path) as f:
        assert f.read() == text
    # list shows the node with state "?" and says why on stderr.
    r = admin(root, "list")
    assert "corrupt record" in r.stderr
    row = [l for l in r.stdout.splitlines() if l.startswith("n1 ")]
    assert row and row[0].split()[1] == "?", r.stdout
    # Removing the record makes the node ready again (it has node.json).
    os.unlink(path)
    assert admin_list(root)["n1"]["state"] == "ready"
    admin(root, "state", "n1", "retired")
    assert admin_list(root)["n1"]["state"] == "retired"


def test_admin_list_shows_states(store):
    root, _ = store
    admin(root, "create", "n1", "n2", "--image", "lab")
    admin(root, "state", "n2", "failed", "--reason", "memtester failed (exit 2)")
    # A node known only from its boot-script fetches (no node.json yet).
    os.makedirs(os.path.join(root, "nodes", "n3"))
    admin(root, "state", "n3", "verify")
    nodes = admin_list(root)
    assert nodes["n1"]["state"] == "ready"
    assert nodes["n2"]["state"] == "failed"
    assert nodes["n2"]["reason"] == "memtester failed (exit 2)"
    assert nodes["n3"]["state"] == "verify" and nodes["n3"]["image"] == ""
    text = admin(root, "list").stdout.splitlines()
    assert text[0].split()[:3] == ["NODE", "STATE", "IMAGE"]
    rows = {l.split()[0]: l.split() for l in text[1:]}
    assert rows["n1"][1:3] == ["ready", "lab"]
    assert rows["n2"][1:3] == ["failed", "lab"]
    assert rows["n3"][1:3] == ["verify", "-"]


REPORT = {
    "schema": "nbdroot.report/1", "node": "n1", "run": "20261204T201500Z-3fa9c2",
    "started": "2026-12-04T20:15:00Z", "finished": "2026-12-04T20:17:00Z",
    "inventory": {"cpu": {"model_name": "QEMU", "count": 2, "architecture": "x86_64"},
                  "memory": {"total": 536870912, "physical_mb": 512, "dimms": []}},
    "steps": [
        {"name": "kernel_memtest", "status": "passed", "exit_code": 0, "duration_s": 1.5,
         "results": {}},
        {"name": "memtester", "status": "failed", "exit_code": 2, "duration_s": 61.2,
         "results": {"bytes_tested": 432013312, "ram_share": 0.83, "loops": 1}}],
    "status": "failed", "log_files": ["memtester.log"]}


def store_report(root, node, doc):
    """Lays a report out as the server stores it (lifecycle/report.hpp)."""
    d = os.path.join(root, "nodes", node, "reports")
    os.makedirs(os.path.join(d, doc["run"]), exist_ok=True)
    with open(os.path.join(d, doc["run"] + ".json"), "w") as f:
        json.dump(doc, f)
    with open(os.path.join(d, doc["run"], "memtester.log"), "w") as f:
        f.write("FAILURE: 0x1 != 0x0\n")
    with open(os.path.join(d, "latest"), "w") as f:
        f.write(doc["run"] + "\n")


def test_admin_report(store):
    root, _ = store
    admin(root, "create", "n1", "--image", "lab")
    r = admin(root, "report", "n1", check=False)
    assert r.returncode == 1 and "node 'n1' has no verification report yet" in r.stderr
    r = admin(root, "report", "nobody", check=False)
    assert r.returncode == 1 and "node 'nobody' does not exist" in r.stderr
    store_report(root, "n1", REPORT)
    out = admin(root, "report", "n1").stdout.splitlines()
    assert out[0] == "node n1, run 20261204T201500Z-3fa9c2: failed"
    assert out[1].strip() == ("memtester failed (exit 2), memtester 412 MiB (83 % of RAM), "
                              "2 CPUs, 512 MiB RAM")
    steps = {l.split()[0]: l.split() for l in out if l.startswith("  ") and len(l.split()) > 2}
    assert steps["memtester"][1:4] == ["failed", "exit", "2"]
    assert "bytes_tested=432013312" in steps["memtester"]
    assert steps["kernel_memtest"][1] == "passed"
    assert any("memtester.log" in l for l in out)
    assert json.loads(admin(root, "report", "n1", "--json").stdout) == REPORT
    # A corrupt `latest` is an error, not a crash or a wrong report.
    with open(os.path.join(root, "nodes", "n1", "reports", "latest"), "w") as f:
        f.write("../../../../etc/passwd\n")
    r = admin(root, "report", "n1", check=False)
    assert r.returncode == 1 and "does not name a run" in r.stderr
