"""Boot scripts, reports and heartbeats over HTTP (issue 12;
nbdserver/http/boot_api.hpp), against the real server with curl and
python's urllib:

  GET  /boot/<node>.ipxe[?uuid=&serial=&platform=&mac=]
  POST /nodes/<node>/report
  POST /nodes/<node>/heartbeat

The node's state is read from its nodes/<node>/state.json, as an admin
would. Requests that are refused must leave the store byte for byte as it
was (tree_hash before and after).
"""

import hashlib
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request

import nbd
import pytest

from storeutil import add_generation, admin, make_store

MiB = 1 << 20
NODE = "52-54-00-12-34-56"
REPORT_MAX = 8 << 20  # lifecycle::kReportMaxBytes


# ---------------------------------------------------------------- helpers

def fetch(srv, path, body=None, headers=None, method=None):
    """urllib: (status, headers, body bytes); HTTP errors are returned too."""
    req = urllib.request.Request(f"http://{srv.http}{path}", data=body,
                                 headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def curl(srv, path, *args):
    """curl: (status, body text)."""
    r = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args,
                        f"http://{srv.http}{path}"],
                       capture_output=True, text=True, timeout=60, check=True)
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def script(srv, node=NODE, query=""):
    """The boot script, fetched with curl; asserts 200 and text/plain."""
    r = subprocess.run(["curl", "-sS", "-D", "-", f"http://{srv.http}/boot/{node}.ipxe{query}"],
                       capture_output=True, text=True, timeout=60, check=True)
    head, _, body = r.stdout.partition("\n\n")  # text mode: \r\n read as \n
    assert head.startswith("HTTP/1.1 200"), r.stdout
    assert re.search(r"(?im)^content-type: text/plain", head), head
    return body


def post_json(srv, path, doc, content_type="application/json", headers=None):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    status, _, data = fetch(srv, path, body, {"Content-Type": content_type, **(headers or {})},
                            "POST")
    return status, data


def error_of(data):
    j = json.loads(data)
    assert set(j) == {"error"} and j["error"], j
    return j["error"]


def state_of(store, node=NODE):
    with open(os.path.join(store, "nodes", node, "state.json")) as f:
        return json.load(f)


def wait_for(pred, what, timeout=30):
    """Polls pred() until true (bounded: a slow machine gets time, a broken
    server fails the test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def tree_hash(root):
    """Every path under root with its type and contents (symlinks by
    target), hashed: equal hashes mean an identical store."""
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        h.update(b"D" + os.path.relpath(d, root).encode() + b"\0")
        for name in sorted(files):
            p = os.path.join(d, name)
            h.update(b"F" + os.path.relpath(p, root).encode() + b"\0")
            if os.path.islink(p):
                h.update(b"L" + os.readlink(p).encode())
            else:
                with open(p, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def report(node, run, status="passed", **extra):
    """A report as the verification initrd sends it (docs/verification.md)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc = {
        "schema": "nbdroot.report/1", "node": node, "run": run,
        "started": now, "finished": now,
        "inventory": {
            "cpu": {"model_name": "QEMU Virtual CPU", "count": 2, "architecture": "x86_64"},
            "memory": {"total": 512 * MiB, "physical_mb": 512, "dimms": []},
            "disks": [], "interfaces": [{"name": "eth0", "mac_address": "52:54:00:12:34:56"}],
            "system_vendor": {"manufacturer": "QEMU", "product_name": "Standard PC",
                              "serial_number": ""},
            "boot": {"current_boot_mode": "bios"}},
        "steps": [
            {"name": "edac", "status": "passed", "exit_code": 0, "duration_s": 0.1,
             "results": {}},
            {"name": "inventory", "status": status, "exit_code": 0 if status == "passed" else 1,
             "duration_s": 0.2, "results": {}}],
        "logs": {},
    }
    doc.update(extra)
    return doc


@pytest.fixture
def boot(nbdserver, tmp_path):
    """start(*args) -> (server, store): a store with lab@g1, served with
    --http on a free port."""
    store, _ = make_store(tmp_path, size=4 * MiB)

    def start(*args, store_dir=None):
        srv = nbdserver(args=["--store", store_dir or store, "--http", "127.0.0.1:0",
                              "--threads", "1", *args])
        assert srv.http, srv.args
        return srv, store_dir or store
    return start


def verifying(boot, *args):
    """A server with --new-nodes verify and NODE in its verification run:
    (server, store, run id)."""
    srv, store = boot("--new-nodes", "verify", *args)
    text = script(srv)
    st = state_of(store)
    assert st["state"] == "verify" and st["run"], st
    assert f"nbdroot.run={st['run']} " in text, text
    return srv, store, st["run"]


# ---------------------------------------------------------------- scripts

def test_templates_are_written_at_start_and_never_overwritten(boot, tmp_path):
    store, _ = make_store(tmp_path / "s2", size=4 * MiB)
    os.makedirs(os.path.join(store, "templates"))
    with open(os.path.join(store, "templates", "ready.ipxe"), "w") as f:
        f.write("#!ipxe\necho mine {{node}}\n")
    srv, _ = boot(store_dir=store)
    names = sorted(os.listdir(os.path.join(store, "templates")))
    assert names == ["failed.ipxe", "new.ipxe", "ready.ipxe", "retired.ipxe", "verify.ipxe"]
    for n in names:
        with open(os.path.join(store, "templates", n)) as f:
            assert f.read().startswith("#!ipxe\n"), n
    assert script(srv) == f"#!ipxe\necho mine {NODE}\n"


def test_ready_script_with_curl_and_urllib(boot):
    srv, store = boot()
    host, port = srv.http.split(":")
    nbd_port = srv.tcp[1]
    text = script(srv)
    base = f"http://{srv.http}"
    assert text.startswith("#!ipxe\n")
    assert f"kernel {base}/files/lab/g1/vmlinuz initrd=initrd.img " \
           f"nbdroot={host}:{nbd_port}/lab/{NODE} ip=dhcp ||" in text, text
    assert f"initrd --name initrd.img {base}/files/lab/g1/initrd.img" in text
    assert f"chain --replace --autofree {base}/boot/{NODE}.ipxe\n" in text
    # The default policy makes an unknown node ready (plain NBD use).
    st = state_of(store)
    assert st["state"] == "ready" and st["boots"] == 1
    status, headers, body = fetch(srv, f"/boot/{NODE}.ipxe")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert body.decode() == text
    assert state_of(store)["boots"] == 2


def test_verify_script_and_a_reboot_mid_run_fails(boot):
    srv, store, run = verifying(boot)
    base = f"http://{srv.http}"
    text = script(srv)  # the node booted again during its Linux step
    st = state_of(store)
    assert st["state"] == "failed", st
    # The failed script says why, waits, and asks again.
    assert f"echo nbdroot: node {NODE} is failed: " in text, text
    assert "sleep 60\n" in text
    assert f"chain --replace --autofree {base}/boot/{NODE}.ipxe\n" in text
    assert "\nkernel " not in text


def test_verify_script_contents(boot):
    srv, store = boot("--new-nodes", "verify", "--boot-cmdline", "console=ttyS0,115200")
    text = script(srv)
    st = state_of(store)
    assert st["state"] == "verify" and st["step"] == "linux", st
    assert "iseq xlinux xmemtest86 && goto memtest86 ||" in text, text
    assert f"kernel http://{srv.http}/files/lab/g1/vmlinuz initrd=verify.img " \
           f"nbdroot.verify=http://{srv.http}/nodes/{NODE} nbdroot.node={NODE} " \
           f"nbdroot.run={st['run']} ip=dhcp memtest=1 console=ttyS0,115200 ||" in text, text
    assert f"initrd --name verify.img http://{srv.http}/files/lab/g1/verify.img" in text


def test_memtest86_step_then_linux_step(boot):
    srv, store = boot("--new-nodes", "verify", "--memtest-timeout", "30")
    text = script(srv, query="?platform=efi")
    st = state_of(store)
    assert st["state"] == "verify" and st["step"] == "memtest86", st
    assert "iseq xmemtest86 xmemtest86 && goto memtest86 ||" in text, text
    assert "iseq ${platform} efi && goto memtest_efi ||" in text
    for kind in ("efi", "bin"):
        assert f"kernel http://{srv.http}/files/boot/memtest86+x64.{kind} " \
               "console=ttyS0,115200 nopause" in text, text
    assert f"chain --replace --autofree http://{srv.http}/boot/{NODE}.ipxe?platform=efi\n" \
        in text
    # The next fetch goes on to the Linux step: the verification initrd.
    text = script(srv, query="?platform=efi")
    st = state_of(store)
    assert st["state"] == "verify" and st["step"] == "linux", st
    assert "iseq xlinux xmemtest86" in text
    assert f"nbdroot.run={st['run']} ip=dhcp memtest=1 ||" in text, text


@pytest.mark.parametrize("state", ["new", "retired", "failed", "ready", "verify"])
def test_each_state_set_by_an_admin(boot, state):
    srv, store = boot()
    script(srv)  # creates the node (ready)
    admin(store, "state", NODE, state)
    text = script(srv)
    st = state_of(store)
    assert text.startswith("#!ipxe\n"), text
    if state == "retired":
        assert st["state"] == "retired"
        assert f"echo nbdroot: node {NODE} is retired" in text and text.endswith("exit\n")
    elif state in ("new", "failed"):
        assert st["state"] == state
        assert f"echo nbdroot: node {NODE} is {state}: " in text
        assert "sleep 60\n" in text and f"/boot/{NODE}.ipxe\n" in text
    elif state == "ready":
        assert f"nbdroot=127.0.0.1:{srv.tcp[1]}/lab/{NODE} ip=dhcp" in text
    else:
        assert st["state"] == "verify" and "initrd=verify.img" in text, (st, text)


def test_node_override_file_is_served_as_it_is(boot):
    srv, store = boot()
    script(srv)
    own = "#!ipxe\n# {{not_a_variable}} ${net0/mac}\nchain http://elsewhere/x.ipxe\n"
    with open(os.path.join(store, "nodes", NODE, "boot.ipxe"), "w") as f:
        f.write(own)
    assert script(srv) == own
    code, body = curl(srv, f"/boot/{NODE}.ipxe")
    assert code == 200 and body == own
    os.unlink(os.path.join(store, "nodes", NODE, "boot.ipxe"))
    assert "nbdroot=" in script(srv)


def test_template_edited_on_disk_takes_effect_without_restart(boot):
    srv, store = boot()
    path = os.path.join(store, "templates", "ready.ipxe")
    for i in range(3):
        with open(path + ".new", "w") as f:
            f.write(f"#!ipxe\necho edit {i}: {{{{ node }}}} {{{{image}}}}@{{{{generation}}}}\n")
        os.replace(path + ".new", path)
        assert script(srv) == f"#!ipxe\necho edit {i}: {NODE} lab@g1\n"
    # Written in place (not renamed) works too.
    with open(path, "w") as f:
        f.write("#!ipxe\necho in place {{extra}}.\n")
    assert script(srv) == "#!ipxe\necho in place .\n"


def test_unknown_variable_is_a_500_naming_file_and_line(boot):
    srv, store = boot()
    with open(os.path.join(store, "templates", "ready.ipxe"), "w") as f:
        f.write("#!ipxe\necho {{node}}\nkernel {{kernal}} {{cmdline}}\n")
    for get in (lambda: fetch(srv, f"/boot/{NODE}.ipxe")[::2],
                lambda: curl(srv, f"/boot/{NODE}.ipxe")):
        status, body = get()
        assert status == 500
        assert error_of(body) == "templates/ready.ipxe:3: unknown variable {{kernal}}"
    wait_for(lambda: "templates/ready.ipxe:3: unknown variable {{kernal}}" in srv.stderr(),
             "the log line")
    srv.assert_alive()


@pytest.mark.parametrize("query", [
    "?serial=abc%0Ashell",               # a newline: a second command
    "?serial=a%20b",                     # a space
    "?uuid=${net0/mac}",                 # iPXE expansion
    "?uuid=%24%7Bnet0%2Fmac%7D",
    "?platform=efi%7C%7Cshell",          # efi||shell
    "?platform=efi%26%26shell",          # efi&&shell
    "?mac=a%3Bb",
    "?serial=%22quoted%22",
    "?serial=" + "x" * 65,
    "?uuid=a&uuid=b",                    # repeated
    "?serial=%C3%A9",                    # not ASCII
])
def test_injection_in_query_is_refused(boot, query):
    srv, store = boot()
    script(srv)  # the node exists
    before = tree_hash(store)
    status, _, body = fetch(srv, f"/boot/{NODE}.ipxe{query}")
    assert status == 400, body
    assert "query parameter" in error_of(body)
    code, body = curl(srv, f"/boot/{NODE}.ipxe{query}", "-g")
    assert code == 400 and "query parameter" in error_of(body)
    # Refused before the lifecycle saw it: nothing counted, nothing kept.
    assert tree_hash(store) == before
    # And for an unknown node, nothing is created.
    status, _, _ = fetch(srv, f"/boot/52-54-00-00-00-99.ipxe{query}")
    assert status == 400
    assert not os.path.exists(os.path.join(store, "nodes", "52-54-00-00-00-99"))


def test_safe_hints_are_kept_and_chained_again(boot):
    srv, store = boot("--new-nodes", "verify")
    uuid = "a0b1c2d3-0000-4000-8000-1234567890ab"
    text = script(srv, query=f"?uuid={uuid}&serial=SN.123_x&platform=pcbios&mac=52:54:00:12:34:56")
    st = state_of(store)
    assert st["hints"] == {"uuid": uuid, "serial": "SN.123_x", "platform": "pcbios",
                           "mac": "52:54:00:12:34:56"}
    assert (f"chain --replace --autofree http://{srv.http}/boot/{NODE}.ipxe?uuid={uuid}"
            f"&serial=SN.123_x&platform=pcbios&mac=52:54:00:12:34:56\n") in text


@pytest.mark.parametrize("host", ["evil${x}", "a b", "x:99999", "[zz::1]:80", "-x"])
def test_bad_host_header_is_refused(boot, host):
    srv, store = boot()
    before = tree_hash(store)
    code, body = curl(srv, f"/boot/{NODE}.ipxe", "-H", f"Host: {host}")
    assert code == 400 and "Host header" in error_of(body)
    assert tree_hash(store) == before


def test_no_host_header_needs_advertise(boot):
    srv, store = boot()
    code, body = curl(srv, f"/boot/{NODE}.ipxe", "-H", "Host:")
    assert code == 400 and "--advertise" in error_of(body)
    assert not os.path.exists(os.path.join(store, "nodes", NODE))


def test_advertise_names_the_server(boot):
    srv, _ = boot("--advertise", "boot.example")
    http_port = srv.http.split(":")[1]
    text = script(srv)
    assert f"http://boot.example:{http_port}/files/lab/g1/vmlinuz" in text
    assert f"nbdroot=boot.example:{srv.tcp[1]}/lab/{NODE}" in text
    # The Host header a node sends is then not used.
    code, body = curl(srv, f"/boot/{NODE}.ipxe", "-H", "Host: other:1")
    assert code == 200 and "other" not in body


def test_cmdline_from_flag_and_node_file(boot):
    srv, store = boot("--boot-cmdline", "console=ttyS0,115200  quiet")
    script(srv)
    path = os.path.join(store, "nodes", NODE, "cmdline")
    with open(path, "w") as f:
        f.write("nbdroot.mode=ephemeral\n  loglevel=7\n")
    text = script(srv)
    assert "ip=dhcp console=ttyS0,115200 quiet nbdroot.mode=ephemeral loglevel=7 ||" in text
    with open(path, "w") as f:
        f.write("x=${evil}\n")
    status, _, body = fetch(srv, f"/boot/{NODE}.ipxe")
    assert status == 500 and f"nodes/{NODE}/cmdline" in error_of(body)


@pytest.mark.parametrize("flag", ["a;b", "x ${y}", "a|b"])
def test_bad_boot_cmdline_flag_is_refused_at_start(boot, tmp_path, flag):
    from conftest import NBDSERVER
    r = subprocess.run([NBDSERVER, "--store", str(tmp_path), "--http", "127.0.0.1:0",
                        "--boot-cmdline", flag], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--boot-cmdline" in r.stderr, r.stderr


def test_which_image(boot, tmp_path):
    srv, store = boot()
    add_generation(store, "other", "o1", size=4 * MiB)
    # Two images, no --boot-image, no node.json: no image to boot.
    status, _, body = fetch(srv, f"/boot/{NODE}.ipxe")
    assert status == 409 and "several" in error_of(body) and "--boot-image" in error_of(body)
    # A node created on an image boots that one, at its pinned generation.
    admin(store, "create", "pinned", "--image", "other")
    add_generation(store, "other", "o2", size=4 * MiB)
    assert "/files/other/o1/vmlinuz" in script(srv, node="pinned")
    srv.terminate()
    srv, _ = boot("--boot-image", "other")
    assert "/files/other/o2/vmlinuz" in script(srv, node="fresh")
    assert "/lab/" not in script(srv, node="fresh")


def test_store_without_image(boot, tmp_path):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    srv, _ = boot(store_dir=empty)
    status, _, body = fetch(srv, f"/boot/{NODE}.ipxe")
    assert status == 409 and "no image" in error_of(body)


@pytest.mark.parametrize("node", [".hidden", "a%2Fb", "..", "a%00b"])
def test_bad_node_ids(boot, node):
    srv, store = boot()
    before = tree_hash(store)
    status, _, body = fetch(srv, f"/boot/{node}.ipxe")
    assert status in (400, 404), (status, body)
    status, body = post_json(srv, f"/nodes/{node}/report", report(node, "r"))
    assert status in (400, 404), (status, body)
    assert tree_hash(store) == before


# ---------------------------------------------------------------- policy

def test_new_nodes_policy(boot, tmp_path):
    srv, store = boot("--new-nodes", "refuse")
    code, body = curl(srv, f"/boot/{NODE}.ipxe")
    assert code == 403 and "unknown" in body and "refuse" in body
    status, headers, _ = fetch(srv, f"/boot/{NODE}.ipxe")
    assert status == 403 and headers["Content-Type"].startswith("text/plain")
    assert not os.path.exists(os.path.join(store, "nodes", NODE))
    # A node an admin created is served.
    admin(store, "create", NODE, "--image", "lab")
    assert "nbdroot=" in script(srv)
    srv.terminate()
    srv, _ = boot("--new-nodes", "verify")
    assert "initrd=verify.img" in script(srv, node="n-verify")
    assert state_of(store, "n-verify")["state"] == "verify"
    srv.terminate()
    srv, _ = boot("--new-nodes", "ready")
    assert "nbdroot=" in script(srv, node="n-ready")
    assert state_of(store, "n-ready")["state"] == "ready"


# ---------------------------------------------------------------- reports

def test_report_passes_then_the_node_attaches(boot):
    srv, store, run = verifying(boot)
    uri = f"nbd://127.0.0.1:{srv.tcp[1]}/lab/{NODE}"
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(uri)
    status, data = post_json(srv, f"/nodes/{NODE}/report", report(NODE, run))
    assert status == 201, data
    assert json.loads(data) == {"status": "passed", "state": "ready"}
    assert state_of(store)["state"] == "ready"
    assert os.path.exists(os.path.join(store, "nodes", NODE, "reports", f"{run}.json"))
    assert f"nbdroot=127.0.0.1:{srv.tcp[1]}/lab/{NODE}" in script(srv)
    h = nbd.NBD()
    h.connect_uri(uri)
    assert len(h.pread(4096, 0)) == 4096
    h.shutdown()


def test_report_fails_the_node(boot):
    srv, store, run = verifying(boot)
    r = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-H",
                        "Content-Type: application/json", "--data-binary",
                        json.dumps(report(NODE, run, status="failed")),
                        f"http://{srv.http}/nodes/{NODE}/report"],
                       capture_output=True, text=True, timeout=60, check=True)
    body, _, code = r.stdout.rpartition("\n")
    assert code == "201" and json.loads(body) == {"status": "failed", "state": "failed"}
    st = state_of(store)
    assert st["state"] == "failed" and st["reason"], st
    text = script(srv)
    assert f"echo nbdroot: node {NODE} is failed: " in text


def test_bad_reports_change_nothing(boot):
    srv, store, run = verifying(boot)
    good = report(NODE, run)
    cases = [
        (400, b"{not json", "application/json"),
        (400, b"[1, 2]", "application/json"),
        (400, json.dumps({**good, "steps": "all of them"}).encode(), "application/json"),
        (400, json.dumps({**good, "run": 7}).encode(), "application/json"),
        (400, json.dumps({**good, "node": "someone-else"}).encode(), "application/json"),
        (400, json.dumps(report(NODE, run, status="sideways")).encode(), "application/json"),
        (415, json.dumps(good).encode(), "text/plain"),
        (415, json.dumps(good).encode(), "application/x-www-form-urlencoded"),
        (409, json.dumps(report(NODE, "not-the-run")).encode(), "application/json"),
        (413, b"{" + b" " * REPORT_MAX + b"}", "application/json"),
    ]
    before = tree_hash(store)
    for want, body, ctype in cases:
        status, data = post_json(srv, f"/nodes/{NODE}/report", body, ctype)
        assert status == want, (want, status, data[:200], body[:80])
        assert error_of(data)
        assert tree_hash(store) == before, (want, body[:80])
    # An unknown node: 404, and it is not created.
    status, data = post_json(srv, "/nodes/ghost/report", report("ghost", run))
    assert status == 404 and "ghost" in error_of(data)
    assert tree_hash(store) == before
    # With curl too: oversize and bad JSON.
    big = os.path.join(srv.workdir, "big.json")
    with open(big, "wb") as f:
        f.write(b"[" + b"0," * (REPORT_MAX // 2) + b"0]")
    for data_arg, want in ((f"@{big}", 413), ("{bad", 400)):
        code, body = curl(srv, f"/nodes/{NODE}/report", "-H", "Content-Type: application/json",
                          "--data-binary", data_arg)
        assert code == want and error_of(body)
    assert tree_hash(store) == before
    # The node still reports fine afterwards.
    status, data = post_json(srv, f"/nodes/{NODE}/report", good)
    assert status == 201, data


def test_report_for_a_node_not_verifying(boot):
    srv, store = boot()
    script(srv)  # ready
    before = tree_hash(store)
    status, data = post_json(srv, f"/nodes/{NODE}/report", report(NODE, "r1"))
    assert status == 409 and "not running" in error_of(data)
    assert tree_hash(store) == before


def test_concurrent_reports_for_one_node(boot):
    """Reports of one node are taken one at a time: exactly one is taken,
    the others are refused (the run is over) and store nothing, so the
    stored report is the one that got 201."""
    srv, store, run = verifying(boot)
    n = 6
    bodies = [json.dumps(report(NODE, run, finished=f"2026-12-04T21:00:0{i}Z")).encode()
              for i in range(n)]
    results = {}
    start = threading.Barrier(n)

    def send(i):
        start.wait()
        results[i] = post_json(srv, f"/nodes/{NODE}/report", bodies[i])[0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [201] + [409] * (n - 1), results
    winner = [i for i, s in results.items() if s == 201][0]
    with open(os.path.join(store, "nodes", NODE, "reports", f"{run}.json")) as f:
        assert json.load(f)["finished"] == f"2026-12-04T21:00:0{winner}Z"
    assert state_of(store)["state"] == "ready"


# ---------------------------------------------------------------- heartbeats

def heartbeat(srv, run, node=NODE, step="memtester", progress=0.5, ctype="application/json",
              headers=None):
    doc = {"run": run, "step": step, "progress": progress}
    return post_json(srv, f"/nodes/{node}/heartbeat", doc, ctype, headers)


def test_heartbeats_keep_a_run_alive_and_silence_fails_it(boot):
    timeout = 3
    srv, store, run = verifying(boot, "--heartbeat-timeout", str(timeout),
                                "--verify-timeout", "600")
    # Heartbeats every 0.3 s for more than twice the timeout: still verifying.
    end = time.monotonic() + 2.5 * timeout
    while time.monotonic() < end:
        status, data = heartbeat(srv, run, progress=0.4)
        assert status == 204, data
        assert state_of(store)["state"] == "verify", state_of(store)
        time.sleep(0.3)
    # Silence: the sweeper fails it, "timed out".
    st = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(state_of(store)),
                  "the node to fail", timeout=60)
    assert "timed out" in st["reason"], st
    wait_for(lambda: f"node {NODE} is failed: {st['reason']}" in srv.stderr(), "the log line")
    # Then its heartbeats and its report are refused.
    status, data = heartbeat(srv, run)
    assert status == 409, data
    status, data = post_json(srv, f"/nodes/{NODE}/report", report(NODE, run))
    assert status == 409, data
    assert "timed out" in script(srv)


def test_bad_heartbeats(boot):
    srv, store, run = verifying(boot)
    before = tree_hash(store)
    for body, ctype, want in [
            (b"{nope", "application/json", 400),
            (b"[]", "application/json", 400),
            (json.dumps({"run": 1, "step": "x"}).encode(), "application/json", 400),
            (json.dumps({"run": run}).encode(), "application/json", 400),
            (json.dumps({"run": run, "step": "m", "progress": "half"}).encode(),
             "application/json", 400),
            (json.dumps({"run": run, "step": "a b"}).encode(), "application/json", 400),
            (json.dumps({"run": run, "step": "m"}).encode(), "text/plain", 415),
            (json.dumps({"run": "other-run", "step": "m"}).encode(), "application/json", 409),
            (b"{" + b" " * 8192 + b"}", "application/json", 413)]:
        status, data = post_json(srv, f"/nodes/{NODE}/heartbeat", body, ctype)
        assert status == want, (want, status, data, body[:60])
        assert error_of(data)
    assert tree_hash(store) == before
    status, data = heartbeat(srv, run, node="ghost")
    assert status == 404
    code, body = curl(srv, f"/nodes/{NODE}/heartbeat", "-H", "Content-Type: application/json",
                      "--data-binary", json.dumps({"run": run, "step": "memtester"}))
    assert code == 204 and body == ""


def test_heartbeat_for_a_ready_node_is_refused(boot):
    srv, store = boot()
    script(srv)
    status, data = heartbeat(srv, "r1")
    assert status == 409 and error_of(data)


# ---------------------------------------------------------------- the tls tier's report token

TOKEN_RE = re.compile(r" nbdroot\.report_token=([0-9a-f]{64}) ")


def token_header(token):
    return {"X-Nbdroot-Report-Token": token}


def test_tls_tier_reports_and_heartbeats_need_the_runs_token(boot):
    """Under --tls require the Linux step's script carries a report token
    (256 bits); the node's state keeps only its SHA-256. A report or a
    heartbeat without it, or with another, is refused (401) and changes
    nothing; with it, the node becomes ready."""
    srv, store = boot("--new-nodes", "verify", "--tls", "require")
    text = script(srv)
    st = state_of(store)
    assert st["state"] == "verify" and st["step"] == "linux", st
    run = st["run"]
    m = TOKEN_RE.search(text)
    assert m, text
    token = m.group(1)
    assert st["report_token_sha256"] == hashlib.sha256(token.encode()).hexdigest(), st
    with open(os.path.join(store, "nodes", NODE, "state.json")) as f:
        assert token not in f.read()
    assert f"nbdroot.run={run} ip=dhcp memtest=1 nbdroot.report_token={token} ||" in text, text

    before = tree_hash(store)
    other = "ab" * 32
    for headers, why in (({}, "no X-Nbdroot-Report-Token header"),
                         (token_header(other), f"does not match run {run}'s token"),
                         (token_header(token.upper()), f"does not match run {run}'s token"),
                         (token_header(token[:-1]), f"does not match run {run}'s token")):
        status, data = post_json(srv, f"/nodes/{NODE}/report", report(NODE, run), headers=headers)
        assert status == 401 and why in error_of(data), (status, data)
        status, data = heartbeat(srv, run, headers=headers)
        assert status == 401 and why in error_of(data), (status, data)
    assert tree_hash(store) == before
    assert state_of(store)["state"] == "verify"

    status, data = heartbeat(srv, run, headers=token_header(token))
    assert status == 204, data
    status, data = post_json(srv, f"/nodes/{NODE}/report", report(NODE, run),
                             headers=token_header(token))
    assert status == 201 and json.loads(data)["state"] == "ready", data
    log = srv.stderr()
    assert f"report of node {NODE} from 127.0.0.1 refused: no X-Nbdroot-Report-Token" in log, log
    assert token not in log
    audit = open(os.path.join(store, "audit.log")).read()
    assert f"{NODE} report token of run {run} delivered in the boot script to 127.0.0.1" in audit
    assert token not in audit



def test_tls_tier_token_is_per_run_and_only_in_the_linux_step(boot):
    """memtest86+'s step gets no token (it reports nothing); the Linux step
    does. A new run (an admin's `state verify`) gets a new token, and the
    old run's token is refused for it."""
    srv, store = boot("--new-nodes", "verify", "--tls", "require", "--memtest-timeout", "30")
    text = script(srv)
    st = state_of(store)
    assert st["step"] == "memtest86" and not TOKEN_RE.search(text), text
    assert st["report_token_sha256"] == "", st
    text = script(srv)
    st = state_of(store)
    assert st["step"] == "linux", st
    first_run, first = st["run"], TOKEN_RE.search(text).group(1)

    admin(store, "state", NODE, "verify")
    script(srv)  # memtest86+ again
    text = script(srv)
    st = state_of(store)
    assert st["step"] == "linux" and st["run"] != first_run, st
    second = TOKEN_RE.search(text).group(1)
    assert second != first
    status, data = post_json(srv, f"/nodes/{NODE}/report", report(NODE, st["run"]),
                             headers=token_header(first))
    assert status == 401, data
    status, data = post_json(srv, f"/nodes/{NODE}/report", report(NODE, st["run"]),
                             headers=token_header(second))
    assert status == 201, data


def test_tls_tier_run_without_a_delivered_token_cannot_report(boot):
    """A verify template without {{verify_cmdline}} delivers no token: the
    server says so when it serves the script, and the run's reports are
    refused with that reason."""
    srv, store = boot("--new-nodes", "verify", "--tls", "require")
    with open(os.path.join(store, "templates", "verify.ipxe"), "w") as f:
        f.write("#!ipxe\necho nbdroot: {{node}} run {{run}}\n")
    script(srv)
    st = state_of(store)
    assert st["step"] == "linux" and st["report_token_sha256"] == "", st
    assert "has no {{verify_cmdline}}: it gets no report token" in srv.stderr()
    status, data = post_json(srv, f"/nodes/{NODE}/report", report(NODE, st["run"]),
                             headers=token_header("ab" * 32))
    assert status == 401 and "has no report token" in error_of(data), data


def test_lab_tier_scripts_carry_no_report_token(boot):
    srv, store, run = verifying(boot)
    admin(store, "state", NODE, "verify")
    text = script(srv)
    assert "report_token" not in text, text
    assert state_of(store)["report_token_sha256"] == ""
