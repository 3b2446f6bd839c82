"""GET /metrics, GET /status and the status page GET / (issue 12,
nbdserver/http/status_api.hpp), against the real server:
- /metrics through `promtool check metrics`, and its per-node counters
  moving as nbdsh and nbdcopy read and write a node's view;
- /status's JSON shape;
- the page in a real headless chromium (python3-selenium): it lists the
  nodes, shows a node's state change without a reload, and shows text
  from nodes (reasons, report summaries) as text, never as HTML.
"""

import http.client
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time

import nbd
import pytest

from conftest import run
from storeutil import admin, make_store

MiB = 1 << 20
BS = 4096

PROMTOOL = shutil.which("promtool")
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"


def get(hostport, path):
    host, _, port = hostport.rpartition(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def status(srv):
    code, headers, body = get(srv.http, "/status")
    assert code == 200, body
    assert headers["Content-Type"] == "application/json", headers
    return json.loads(body)


def node_status(srv, node):
    for n in status(srv)["nodes"]:
        if n["node"] == node:
            return n
    raise AssertionError(f"no node {node} in /status")


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metrics(srv):
    """{(name, frozenset(labels.items())): value}, after checking that every
    family has HELP and TYPE before its samples and the nbdroot_ prefix."""
    code, headers, body = get(srv.http, "/metrics")
    assert code == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers
    out, helped, typed = {}, set(), set()
    for line in body.decode().splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            typed.add(line.split()[2])
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.groups()
            assert name.startswith("nbdroot_"), name
            assert name in helped and name in typed, f"{name}: no HELP or TYPE before it"
            lab = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                   for k, v in LABEL.findall(labels or "")}
            out[(name, frozenset(lab.items()))] = float(value)
    return out


def metric(m, name, **labels):
    return m.get((name, frozenset(labels.items())))


def wait_for(what, cond, timeout=20):
    """Polls `cond` (a function returning a truthy value or None) until it
    holds; the server publishes some values on its 0.5 s tick."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write_report(store, node, run_id, status_, step="memtester", tested_mib=400,
                 finished="2026-12-04T20:00:00Z"):
    """A stored verification report as lifecycle/report.hpp lays them out:
    reports/<run>.json (normalised: overall status set, logs moved out) and
    reports/latest naming the newest run. Written here directly, as a
    store holds it, so that the page meets whatever a file may hold."""
    d = os.path.join(store, "nodes", node, "reports")
    os.makedirs(d, exist_ok=True)
    doc = {"schema": "nbdroot.report/1", "node": node, "run": run_id,
           "started": "2026-12-04T19:50:00Z", "finished": finished, "status": status_,
           "inventory": {}, "log_files": [],
           "steps": [{"name": step, "status": status_, "exit_code": 0 if status_ == "passed" else 1,
                      "duration_s": 1.0,
                      "results": {"bytes_tested": tested_mib * MiB, "ram_share": 0.83}}]}
    with open(os.path.join(d, run_id + ".json"), "w") as f:
        json.dump(doc, f)
    with open(os.path.join(d, "latest.tmp"), "w") as f:
        f.write(run_id)
    os.replace(os.path.join(d, "latest.tmp"), os.path.join(d, "latest"))


def set_state(store, node, state, reason=""):
    """Moves a node with `nbdserver admin state` (its reason, when given,
    through --reason)."""
    args = ["state", node, state]
    if reason:
        args += ["--reason", reason]
    r = admin(store, *args, check=False)
    if r.returncode != 0 and "\n  state " not in r.stderr:
        # No `admin state` in this build yet: write the record as lifecycle.hpp
        # keeps it (to_json), which the server reads as it reads its own.
        with open(os.path.join(store, "nodes", node, "state.json"), "w") as f:
            json.dump({"node": node, "state": state, "reason": reason, "since": "",
                       "deadline": 0, "run": "", "step": "", "run_started": 0, "boots": 0,
                       "last_seen": 0, "history": []}, f)
        return
    assert r.returncode == 0, r.stderr


@pytest.fixture
def served(nbdserver, tmp_path):
    """(server, store): lab@g1 (16 MiB), nodes n1 and n2 registered, --http."""
    store, _ = make_store(tmp_path)
    admin(store, "create", "n1", "n2", "--image", "lab")
    srv = nbdserver(args=["--store", store, "--http", "127.0.0.1:0", "--threads", "2"])
    return srv, store


# ---------------------------------------------------------------- /metrics

@pytest.mark.skipif(PROMTOOL is None, reason="no promtool (scripts/install-deps.sh installs "
                    "the prometheus package)")
def test_metrics_pass_promtool(served):
    srv, store = served
    write_report(store, "n1", "r1", "passed")
    h = nbd.NBD()
    h.connect_uri(srv.uri("lab/n1"))
    h.pwrite(b"\1" * BS, 0)
    try:
        code, _, body = get(srv.http, "/metrics")
        assert code == 200
        p = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True,
                           timeout=60)
        assert p.returncode == 0, (p.stdout.decode(), p.stderr.decode(), body.decode())
        assert p.stdout.strip() == b"" and p.stderr.strip() == b"", (p.stdout, p.stderr)
        m = metrics(srv)
        for name in ["nbdroot_nodes", "nbdroot_node_last_seen_timestamp_seconds",
                     "nbdroot_node_boots_total", "nbdroot_node_read_bytes_total",
                     "nbdroot_node_written_bytes_total", "nbdroot_node_dirty_bytes",
                     "nbdroot_connections", "nbdroot_errors_total",
                     "nbdroot_verification_last_status", "nbdroot_verifications_total",
                     "nbdroot_build_info"]:
            assert any(k[0] == name for k in m), f"no {name} sample"
        assert metric(m, "nbdroot_nodes", state="ready") == 2
        assert metric(m, "nbdroot_nodes", state="failed") == 0
        assert metric(m, "nbdroot_verification_last_status", node="n1", status="passed") == 1
        assert metric(m, "nbdroot_verification_last_status", node="n1", status="failed") == 0
        assert metric(m, "nbdroot_verification_last_status", node="n2", status="passed") is None
        assert metric(m, "nbdroot_verifications_total", status="passed") == 1
    finally:
        h.shutdown()


def test_counters_move_with_reads_and_writes(served, tmp_path):
    srv, store = served
    m = metrics(srv)
    assert metric(m, "nbdroot_node_read_bytes_total", node="n1") == 0
    assert metric(m, "nbdroot_node_boots_total", node="n1") == 0
    assert metric(m, "nbdroot_connections") == 0

    # nbdsh: one connection, a write and a read of known sizes, a bad read.
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(srv.uri("lab/n1"))
    h.pwrite(b"\xab" * (16 * BS), 0)
    h.pread(3 * BS, 20 * BS)
    with pytest.raises(nbd.Error):
        h.pread(BS, 16 * MiB)  # past the end: an error reply
    m = metrics(srv)
    assert metric(m, "nbdroot_node_written_bytes_total", node="n1") == 16 * BS
    assert metric(m, "nbdroot_node_read_bytes_total", node="n1") == 3 * BS
    assert metric(m, "nbdroot_node_errors_total", node="n1") == 1
    assert metric(m, "nbdroot_errors_total", kind="reply") == 1
    assert metric(m, "nbdroot_node_boots_total", node="n1") == 1
    assert metric(m, "nbdroot_node_connections", node="n1") == 1
    assert metric(m, "nbdroot_connections") == 1
    assert metric(m, "nbdroot_node_read_bytes_total", node="n2") == 0  # never attached
    # Attached: dirty bytes come from the view's block map (published on
    # the loop's tick), last seen is now.
    n1 = wait_for("n1's dirty bytes from its map",
                  lambda: (lambda n: n if n["dirty_bytes"] == 16 * BS and
                           n["dirty_source"] == "map" else None)(node_status(srv, "n1")))
    assert n1["connections"] == 1
    assert abs(n1["last_seen"] - time.time()) < 30
    # A resume is not a boot.
    h2 = nbd.NBD()
    h2.connect_uri(srv.uri("lab/n1?resume"))
    h2.shutdown()
    h.shutdown()
    wait_for("n1 detached", lambda: metric(metrics(srv), "nbdroot_connections") == 0)
    m = metrics(srv)
    assert metric(m, "nbdroot_node_boots_total", node="n1") == 1
    assert metric(m, "nbdroot_node_connections", node="n1") == 0
    # Detached: from the diff's blocks on disk (a filesystem may allocate more).
    n1 = node_status(srv, "n1")
    assert n1["dirty_source"] == "disk"
    assert 16 * BS <= n1["dirty_bytes"] <= 16 * BS + MiB, n1

    # nbdcopy: a file of random data onto the view, then the view out.
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 * MiB))
    before = metrics(srv)
    run(["nbdcopy", "--flush", str(src), srv.uri("lab/n1")])
    wait_for("nbdcopy's connections closed",
             lambda: metric(metrics(srv), "nbdroot_connections") == 0)
    m = metrics(srv)
    written = (metric(m, "nbdroot_node_written_bytes_total", node="n1")
               - metric(before, "nbdroot_node_written_bytes_total", node="n1"))
    assert written == 16 * MiB, written
    boots = metric(m, "nbdroot_node_boots_total", node="n1")
    assert boots >= 2, boots
    out = tmp_path / "out.img"
    run(["nbdcopy", srv.uri("lab/n1"), str(out)])
    assert out.read_bytes() == src.read_bytes()
    wait_for("nbdcopy's connections closed",
             lambda: metric(metrics(srv), "nbdroot_connections") == 0)
    m = metrics(srv)
    read = (metric(m, "nbdroot_node_read_bytes_total", node="n1")
            - metric(before, "nbdroot_node_read_bytes_total", node="n1"))
    assert read == 16 * MiB, read  # all data: nothing to skip as holes
    assert metric(m, "nbdroot_node_boots_total", node="n1") > boots
    assert node_status(srv, "n1")["dirty_bytes"] >= 16 * MiB


def test_handshake_errors_counted(served):
    srv, store = served
    m0 = metrics(srv)
    # An unknown export: an option error reply (the client then aborts).
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(srv.uri("nosuchimage"))
    # Bad option magic: the server closes the handshake.
    with socket.create_connection(srv.tcp, timeout=30) as s:
        greeting = b""
        while len(greeting) < 18:
            chunk = s.recv(18 - len(greeting))
            assert chunk, "closed during the greeting"
            greeting += chunk
        s.sendall(struct.pack(">I", 1) + b"\0" * 16)
        while s.recv(4096):
            pass
    m = wait_for("the closed handshake counted",
                 lambda: (lambda m: m if metric(m, "nbdroot_errors_total", kind="handshake")
                          == 1 else None)(metrics(srv)))
    assert metric(m, "nbdroot_errors_total", kind="option") == 1
    assert (metric(m, "nbdroot_connections_accepted_total")
            == metric(m0, "nbdroot_connections_accepted_total") + 2)
    assert metric(m, "nbdroot_errors_total", kind="reply") == 0


# ---------------------------------------------------------------- /status

def test_status_json_shape(served):
    srv, store = served
    write_report(store, "n2", "r7", "failed")
    st = status(srv)
    assert set(st) == {"server", "nodes"}
    s = st["server"]
    for k in ["version", "now", "started", "nodes_by_state", "connections", "errors", "problems"]:
        assert k in s, k
    assert abs(s["now"] - time.time()) < 30
    assert s["nodes_by_state"] == {"new": 0, "verify": 0, "ready": 2, "failed": 0, "retired": 0}
    assert [n["node"] for n in st["nodes"]] == ["n1", "n2"]
    types = {"node": str, "state": str, "reason": str, "image": str, "generation": str,
             "dirty_bytes": int, "dirty_source": str, "connections": int, "boots": int,
             "read_bytes": int, "written_bytes": int, "errors": int}
    for n in st["nodes"]:
        for k, t in types.items():
            assert isinstance(n[k], t), (k, n)
        assert n["image"] == "lab" and n["generation"] == "g1"
        assert "last_seen" in n and "last_verification" in n
    n1, n2 = st["nodes"]
    assert n1["last_verification"] is None
    v = n2["last_verification"]
    assert set(v) == {"run", "status", "summary", "finished"}, v
    assert (v["run"], v["status"], v["finished"]) == ("r7", "failed", "2026-12-04T20:00:00Z")
    # The server's own summary of the report (lifecycle::report_summary).
    assert "memtester failed" in v["summary"] and "400 MiB" in v["summary"], v


# ---------------------------------------------------------------- the page

def have_browser():
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return os.access(CHROMEDRIVER, os.X_OK) and os.access(CHROMIUM, os.X_OK)


@pytest.fixture
def browser(tmp_path):
    if not have_browser():
        pytest.skip("no chromium, chromium-driver or python3-selenium "
                    "(scripts/install-deps.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}"]:
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def rows(driver):
    """{node id: {field: text}} of the page's table, read in one script."""
    return driver.execute_script("""
        const out = {};
        for (const tr of document.querySelectorAll('#node-rows tr')) {
          const r = {state_attr: tr.dataset.state};
          for (const td of tr.querySelectorAll('td')) r[td.dataset.field] = td.textContent;
          out[tr.dataset.node] = r;
        }
        return out;""")


def wait_page(driver, what, cond, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: cond(rows(d)), message=f"the page never showed {what}: {rows(driver)}")


def test_page_lists_nodes_and_follows_a_state_change(served, browser):
    srv, store = served
    write_report(store, "n1", "r1", "passed")
    h = nbd.NBD()
    h.connect_uri(srv.uri("lab/n2"))
    h.pwrite(b"\1" * (4 * BS), 0)
    browser.get(f"http://{srv.http}/")
    assert browser.title == "nbdroot status"
    r = wait_page(browser, "nodes n1 and n2", lambda r: set(r) == {"n1", "n2"} and r)
    assert r["n1"]["state"] == "ready" and r["n1"]["state_attr"] == "ready"
    assert r["n1"]["generation"] == "g1" and r["n1"]["image"] == "lab"
    assert r["n1"]["verification"].startswith("pass"), r["n1"]
    assert "83 % of RAM" in r["n1"]["verification"]
    assert r["n2"]["verification"] == "none"
    wait_page(browser, "n2 attached and seen now",
              lambda r: r["n2"]["connections"] == "1" and r["n2"]["last_seen"].endswith("s ago")
              and r["n2"]["dirty"] == "16 KiB")
    h.shutdown()
    # A node changes state while the page is open: it shows without a
    # reload (a marker set in the page survives).
    browser.execute_script("window.__marker = 'same page';")
    set_state(store, "n1", "failed", "timed out in memtester")
    r = wait_page(browser, "n1 failed",
                  lambda r: r["n1"]["state"] == "failed" and r["n1"]["state_attr"] == "failed"
                  and r)
    assert r["n1"]["reason"] == "timed out in memtester"
    assert browser.execute_script("return window.__marker;") == "same page"
    summary = browser.find_element("id", "summary").text
    assert "failed: 1" in summary and "ready: 1" in summary, summary
    write_report(store, "n1", "r2", "failed")
    wait_page(browser, "n1's new failed verification",
              lambda r: r["n1"]["verification"].startswith("FAIL"))


HOSTILE = '<img src=x onerror="window.__pwned=1"><b id="inj">bold</b>&amp;<script>window.__pwned=2</script>'


def test_page_shows_text_from_nodes_as_text(served, browser):
    srv, store = served
    set_state(store, "n1", "failed", HOSTILE)
    write_report(store, "n2", "r1", "failed", step=HOSTILE)
    browser.get(f"http://{srv.http}/")
    r = wait_page(browser, "the hostile reason and summary",
                  lambda r: set(r) == {"n1", "n2"} and r["n1"]["state"] == "failed" and r)
    assert r["n1"]["reason"] == HOSTILE
    summary = node_status(srv, "n2")["last_verification"]["summary"]
    assert HOSTILE in summary
    assert r["n2"]["verification"] == "FAIL (failed): " + summary
    # Nothing of it became markup, and none of it ran.
    assert browser.execute_script(
        "return document.querySelectorAll('#nodes img, #nodes b, #nodes script').length") == 0
    assert browser.execute_script("return document.getElementById('inj')") is None
    assert browser.execute_script("return window.__pwned === undefined")
