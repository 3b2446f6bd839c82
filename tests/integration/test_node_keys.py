"""Node keys of the `tls` tier (issue 13; storage/node_keys.hpp,
docs/security.md "Node keys"):

  nbdserver admin --store DIR key NODE [--arm] [--expires D] [--show | --remove]

and their delivery in boot scripts under --tls require ({{tls_args}}).
The printed line is checked against psktool's format, and against nbdkit
and nbdinfo as a real TLS-PSK server and client: those read the same
"NODE:HEX" lines (TLS in nbdserver itself is another module's).
"""

import json
import os
import re
import shutil
import stat
import subprocess
import time

import pytest

from storeutil import admin, make_store
from test_boot_api import fetch, script, tree_hash, wait_for

MiB = 1 << 20
NODE = "52-54-00-12-34-56"
LINE = re.compile(r"^([A-Za-z0-9._-]+):([0-9a-f]{64})\n$")


@pytest.fixture
def store(tmp_path):
    s, _ = make_store(tmp_path, size=4 * MiB)
    os.makedirs(os.path.join(s, "nodes"))  # as every admin command makes it
    return s


def key_file(store, node=NODE):
    return os.path.join(store, "nodes", node, "tls-key.json")


def record(store, node=NODE):
    with open(key_file(store, node)) as f:
        return json.load(f)


def audit_lines(store):
    try:
        with open(os.path.join(store, "audit.log")) as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        return []


def new_key(store, *args, node=NODE):
    """admin key NODE ARGS: asserts stdout is exactly one psktool line and
    returns its hex."""
    r = admin(store, "key", node, *args)
    m = LINE.match(r.stdout)
    assert m and m.group(1) == node, repr(r.stdout)
    return m.group(2)


# ---------------------------------------------------------------- admin key

def test_key_is_created_printed_and_kept_with_mode_0600(store):
    hexkey = new_key(store)
    st = os.stat(key_file(store))
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    rec = record(store)
    assert rec["key"] == hexkey and rec["node"] == NODE
    assert rec["expires"] == 0 and rec["generation"] == 0
    assert rec["armed"] is False and rec["delivered_at"] == 0
    assert abs(rec["created"] - time.time()) < 60
    (line,) = audit_lines(store)
    assert line["action"] == "key" and line["detail"].startswith(f"{NODE} created ")
    assert hexkey not in open(os.path.join(store, "audit.log")).read()


def test_rotation_changes_the_key(store):
    a = new_key(store)
    r = admin(store, "key", NODE)
    b = LINE.match(r.stdout).group(2)
    assert a != b and record(store)["key"] == b and record(store)["generation"] == 1
    assert "old key no longer works" in r.stderr
    assert [l["detail"].split(" ")[1] for l in audit_lines(store)] == ["created", "rotated"]
    log = open(os.path.join(store, "audit.log")).read()
    assert a not in log and b not in log


def test_show_prints_the_key_without_rotating(store):
    hexkey = new_key(store)
    before = open(key_file(store), "rb").read()
    assert new_key(store, "--show") == hexkey
    assert open(key_file(store), "rb").read() == before
    assert len(audit_lines(store)) == 1  # showing changes nothing


def test_remove(store):
    new_key(store)
    r = admin(store, "key", NODE, "--remove")
    assert r.stdout == "" and "removed" in r.stderr
    assert not os.path.exists(key_file(store))
    assert audit_lines(store)[-1]["detail"] == f"{NODE} removed"
    r = admin(store, "key", NODE, "--remove")
    assert r.returncode == 0 and "had no key" in r.stderr
    assert len(audit_lines(store)) == 2
    r = admin(store, "key", NODE, "--show", check=False)
    assert r.returncode == 1 and r.stdout == "" and "no key" in r.stderr


def test_arm_creates_a_key_when_there_is_none(store):
    hexkey = new_key(store, "--arm")
    rec = record(store)
    assert rec["key"] == hexkey and rec["armed"] is True and rec["armed_at"] > 0
    assert [l["detail"].split(" ")[1] for l in audit_lines(store)] == ["created", "armed"]


def test_arm_an_existing_key_prints_nothing_secret(store):
    hexkey = new_key(store)
    r = admin(store, "key", NODE, "--arm")
    assert r.stdout == "" and hexkey not in r.stderr and "armed" in r.stderr
    rec = record(store)
    assert rec["armed"] is True and rec["key"] == hexkey
    # --expires applies to a new key only.
    r = admin(store, "key", NODE, "--arm", "--expires", "1d", check=False)
    assert r.returncode == 1 and "--expires applies to a new key" in r.stderr


def test_expires(store):
    new_key(store, "--expires", "30d")
    rec = record(store)
    assert rec["expires"] == rec["created"] + 30 * 86400
    new_key(store, "--expires", "12h")
    rec = record(store)
    assert rec["expires"] == rec["created"] + 12 * 3600
    new_key(store, "--expires", "0")
    assert record(store)["expires"] == 0
    new_key(store, "--expires", "1s")
    time.sleep(1.1)
    for args in (["--show"], ["--arm"]):
        r = admin(store, "key", NODE, *args, check=False)
        assert r.returncode == 1 and r.stdout == "" and "key expired at " in r.stderr, r.stderr
    assert record(store)["armed"] is False
    new_key(store)  # rotating makes it valid again
    assert new_key(store, "--show")


def test_a_corrupt_key_file_is_refused_and_rotation_replaces_it(store):
    new_key(store)
    os.chmod(key_file(store), 0o644)
    r = admin(store, "key", NODE, "--show", check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert "corrupt key file" in r.stderr and "mode 0644" in r.stderr
    r = admin(store, "key", NODE, "--arm", check=False)
    assert r.returncode == 1 and "corrupt key file" in r.stderr
    with open(key_file(store), "w") as f:
        f.write("{not json")
    os.chmod(key_file(store), 0o600)
    r = admin(store, "key", NODE, "--show", check=False)
    assert r.returncode == 1 and "not valid JSON" in r.stderr
    r = admin(store, "key", NODE)
    assert LINE.match(r.stdout) and "replacing a corrupt key file" in r.stderr
    assert stat.S_IMODE(os.stat(key_file(store)).st_mode) == 0o600


@pytest.mark.parametrize("args, words", [
    (["key"], "which node"),
    (["key", "n1", "n2"], "expected one NODE"),
    (["key", "../n1"], "bad node name"),
    (["key", ".n1"], "bad node name"),
    (["key", "n%31"], "bad node name"),
    (["key", "n 1"], "bad node name"),
    (["key", "a" * 201], "bad node name"),
    (["key", "n1", "--expires", "30"], "--expires"),
    (["key", "n1", "--expires", "1x"], "--expires"),
    (["key", "n1", "--expires", "-1d"], "--expires"),
    (["key", "n1", "--expires", ""], "--expires"),
    (["key", "n1", "--expires"], "expires"),
    (["key", "n1", "--show", "--arm"], "exclude each other"),
    (["key", "n1", "--remove", "--arm"], "exclude each other"),
    (["key", "n1", "--show", "--remove"], "exclude each other"),
    (["key", "n1", "--remove", "--expires", "1d"], "--expires makes no sense"),
    (["key", "n1", "--show", "--expires", "1d"], "--expires makes no sense"),
    (["key", "n1", "--rotate"], "rotate"),
    (["list", "--arm"], "options of `key`"),
    (["pin", "n1", "10.0.0.1", "--show"], "options of `key`"),
    (["state", "n1", "ready", "--expires", "1d"], "options of `key`"),
])
def test_bad_key_command_lines_exit_2_and_change_nothing(store, args, words):
    before = tree_hash(store)
    r = admin(store, *args, check=False)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert words in r.stderr, r.stderr
    assert r.stdout == ""
    assert tree_hash(store) == before


def test_a_case_variant_of_a_node_is_refused(store):
    new_key(store, node="node-a")
    r = admin(store, "key", "NODE-A", check=False)
    assert r.returncode == 2 and "only in case" in r.stderr and r.stdout == ""
    assert not os.path.exists(os.path.join(store, "nodes", "NODE-A"))


# ---------------------------------------------------------------- psk format

def test_the_line_is_psktools_format(store, tmp_path):
    """psktool -u NODE -p FILE writes NODE:HEX, 32 bytes in lower-case hex by
    default: the same line as admin key, character classes and length."""
    ours = admin(store, "key", NODE).stdout
    path = tmp_path / "psktool.psk"
    subprocess.run(["psktool", "-u", NODE, "-p", str(path)], check=True, capture_output=True,
                   timeout=30)
    theirs = path.read_text()
    assert LINE.match(theirs), repr(theirs)
    assert LINE.match(ours), repr(ours)
    assert len(theirs) == len(ours)
    # psktool replaces a user's line in a file of our lines, so it reads them.
    ours_file = tmp_path / "ours.psk"
    ours_file.write_text(admin(store, "key", "other").stdout + ours)
    subprocess.run(["psktool", "-u", NODE, "-p", str(ours_file)], check=True,
                   capture_output=True, timeout=30)
    lines = ours_file.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("other:") and lines[1].startswith(NODE + ":")
    assert lines[1] + "\n" != ours  # psktool made NODE a new key


@pytest.mark.skipif(not shutil.which("nbdkit") or not shutil.which("nbdinfo"),
                    reason="needs nbdkit and nbdinfo")
def test_nbdkit_and_nbdinfo_accept_the_line(store, tmp_path):
    """The printed line, as a file, is nbdkit's --tls-psk and nbdinfo's
    tls-psk-file: a TLS-PSK handshake with identity NODE works, and fails
    once the key was rotated (the old value stops working)."""
    psk = tmp_path / "server.psk"
    psk.write_text(admin(store, "key", NODE).stdout)
    psk.chmod(0o600)
    sock = str(tmp_path / "nbdkit.sock")
    kit = subprocess.Popen(["nbdkit", "-f", "-U", sock, "--tls=require", f"--tls-psk={psk}",
                            "memory", "1M"], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(sock), "nbdkit's socket")
        uri = f"nbds+unix://{NODE}@/?socket={sock}&tls-psk-file={psk}"
        r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == str(MiB), r.stderr
        old = tmp_path / "old.psk"
        shutil.copy(psk, old)
        rotated = admin(store, "key", NODE).stdout
        assert rotated != old.read_text()
        psk.write_text(rotated)  # nbdkit reads the file at each handshake
        r = subprocess.run(["nbdinfo", "--size", uri.replace(str(psk), str(old))],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        new = tmp_path / "new.psk"
        new.write_text(rotated)
        r = subprocess.run(["nbdinfo", "--size", uri.replace(str(psk), str(new))],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        kit.terminate()
        kit.wait(10)


# ---------------------------------------------------------------- boot scripts

# The built-in ready template before {{tls_args}}, as it was written to
# stores: under --tls off the new default renders the same bytes.
OLD_READY = """#!ipxe
# nbdroot: node {{node}} is ready: it boots its root {{image}}@{{generation}} over NBD.
# This file is a template (templates/ready.ipxe); the server fills in the names in double braces.
echo nbdroot: node {{node}} boots {{image}}@{{generation}} from {{nbd}}
kernel {{kernel}} initrd=initrd.img {{cmdline}} || goto retry
initrd --name initrd.img {{initrd}} || goto retry
boot || goto retry
:retry
echo nbdroot: booting node {{node}} failed, trying again in 10 s
sleep 10
chain --replace --autofree {{url}}
"""


@pytest.fixture
def serve(nbdserver, store):
    def start(*args):
        srv = nbdserver(args=["--store", store, "--http", "127.0.0.1:0", "--threads", "1",
                              *args])
        assert srv.http
        return srv
    return start


def kernel_line(text):
    (line,) = [l for l in text.splitlines() if l.startswith("kernel ")]
    return line


def test_tls_off_scripts_are_byte_identical_and_keys_stay_armed(serve, store):
    hexkey = new_key(store, "--arm")
    srv = serve()  # --tls off is the default
    new = script(srv)
    with open(os.path.join(store, "templates", "ready.ipxe")) as f:
        assert "{{cmdline}}{{tls_args}} ||" in f.read()
    with open(os.path.join(store, "templates", "ready.ipxe"), "w") as f:
        f.write(OLD_READY)
    assert script(srv) == new
    assert "nbdroot.tls" not in new and hexkey not in new
    assert record(store)["armed"] is True  # nothing was delivered
    srv2 = serve("--tls", "off")
    assert "nbdroot.tls" not in script(srv2)


def test_armed_key_is_delivered_once_and_a_second_fetch_is_logged(serve, store):
    line = admin(store, "key", NODE, "--arm").stdout.strip()
    srv = serve("--tls", "require")
    first = script(srv)
    assert kernel_line(first).endswith(
        f"ip=dhcp nbdroot.tls=require nbdroot.key={line} || goto retry"), first
    rec = record(store)
    assert rec["armed"] is False and rec["delivered_at"] > 0
    second = script(srv)
    assert kernel_line(second).endswith(" ip=dhcp nbdroot.tls=require || goto retry"), second
    assert line.split(":")[1] not in second
    log = srv.stderr()
    assert re.search(rf"node {NODE} fetched its boot script again after its key was delivered "
                     r"at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: if that was not the node, rotate "
                     r"its key", log), log
    assert line.split(":")[1] not in log
    details = [l["detail"] for l in audit_lines(store)]
    assert details[-2] == f"{NODE} delivered in the boot script to 127.0.0.1"
    assert details[-1].startswith(f"{NODE} boot script fetched again by 127.0.0.1 after its "
                                  "key was delivered at ")
    assert line.split(":")[1] not in open(os.path.join(store, "audit.log")).read()
    # Arming again delivers the same key once more.
    admin(store, "key", NODE, "--arm")
    assert f"nbdroot.key={line} " in script(srv)


def test_no_key_unless_armed(serve, store):
    srv = serve("--tls", "require")
    text = script(srv)  # no key at all
    assert kernel_line(text).endswith(" ip=dhcp nbdroot.tls=require || goto retry"), text
    hexkey = new_key(store)  # a key, not armed
    text = script(srv)
    assert "nbdroot.key" not in text and hexkey not in text
    assert "fetched its boot script again" not in srv.stderr()
    assert record(store)["delivered_at"] == 0


def test_a_template_without_tls_args_keeps_the_key_armed(serve, store):
    new_key(store, "--arm")
    srv = serve("--tls", "require")
    with open(os.path.join(store, "templates", "ready.ipxe"), "w") as f:
        f.write(OLD_READY)
    text = script(srv)
    assert "nbdroot.key" not in text
    assert record(store)["armed"] is True
    assert "has no {{tls_args}}: the key is not delivered" in srv.stderr()
    # The verification boot does not carry the key either.
    admin(store, "state", NODE, "verify")
    assert "nbdroot.key" not in script(srv)
    assert record(store)["armed"] is True


def test_bad_tls_value_exits_2(tmp_path, store):
    from conftest import NBDSERVER
    for value in ("maybe", "", "REQUIRE", "on"):
        r = subprocess.run([NBDSERVER, "--store", store, "--listen", "127.0.0.1:0", "--tls",
                            value], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (value, r.stderr)
        assert "--tls" in r.stderr and "expected off or require" in r.stderr, r.stderr


# ---- peer keys: the tracker's node answer carries the generation's peer key,
# sealed with the node's own key (tls/seal.hpp), under --tls require only.

def open_peer_key(hexkey, node, gen, sealed):
    """The node's side: AES-256-GCM under its key, bound to node and generation."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    raw = bytes.fromhex(sealed)
    aad = f"nbdroot peer key for {node} on {gen}".encode()
    return AESGCM(bytes.fromhex(hexkey)).decrypt(raw[:12], raw[12:], aad)


def node_answer(srv, node):
    status, _, body = fetch(srv, f"/v1/nodes/lab/{node}")
    assert status == 200, body
    return json.loads(body)


def test_a_nodes_answer_carries_its_generations_peer_key_sealed_with_its_own(serve, store):
    other = "52-54-00-12-34-57"
    for n in (NODE, other, "keyless"):
        admin(store, "create", n, "--image", "lab")
    key_a, key_b = new_key(store), new_key(store, node=other)
    srv = serve("--tls", "require")
    a, b = node_answer(srv, NODE), node_answer(srv, other)
    assert a["peer_identity"] == b["peer_identity"] == "peer/lab@g1"
    pk_a = open_peer_key(key_a, NODE, "lab@g1", a["peer_key_sealed"])
    pk_b = open_peer_key(key_b, other, "lab@g1", b["peer_key_sealed"])
    assert pk_a == pk_b and len(pk_a) == 32  # one key per generation
    from cryptography.exceptions import InvalidTag
    with pytest.raises(InvalidTag):  # B's key does not open A's
        open_peer_key(key_b, NODE, "lab@g1", a["peer_key_sealed"])
    # A node without a key gets no peer key; the secret is private.
    assert "peer_key_sealed" not in node_answer(srv, "keyless")
    st = os.stat(os.path.join(store, "keys", "peer-secret"))
    assert stat.S_IMODE(st.st_mode) == 0o600
    srv.terminate()
    # The same secret after a restart: the same key.
    srv = serve("--tls", "require")
    assert open_peer_key(key_a, NODE, "lab@g1", node_answer(srv, NODE)["peer_key_sealed"]) == pk_a
    srv.terminate()
    # --tls off: no peer key at all.
    assert "peer_key_sealed" not in node_answer(serve(), NODE)


@pytest.mark.parametrize("damage", ["mode", "content"])
def test_a_bad_peer_secret_is_refused_with_its_reason_and_hands_out_no_peer_key(serve, store,
                                                                                damage):
    admin(store, "create", NODE, "--image", "lab")
    new_key(store)
    os.makedirs(os.path.join(store, "keys"), exist_ok=True)
    path = os.path.join(store, "keys", "peer-secret")
    with open(path, "w") as f:
        f.write("ab" * 32 + "\n" if damage == "mode" else "not a secret\n")
    os.chmod(path, 0o644 if damage == "mode" else 0o600)
    before = open(path).read()
    srv = serve("--tls", "require")
    assert "peer_key_sealed" not in node_answer(srv, NODE)
    why = "mode 0644" if damage == "mode" else "not 64 hex digits"
    wait_for(lambda: why in srv.stderr(), f"the log names the bad peer secret ({why})")
    assert open(path).read() == before  # never replaced behind the admin's back
