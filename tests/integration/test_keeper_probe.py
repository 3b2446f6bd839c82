"""nbdroot-keeper --probe: the connect and fixed-newstyle NBD_OPT_GO
handshake that the keeper's reconnects use, without a kernel (its daemon
mode needs /dev/nbd0 and the nbd module: the VM tests in tests/e2e cover
that).

    nbdroot-keeper --probe --export NAME SERVER[:PORT]...

prints `SERVER: export 'NAME': SIZE bytes, transmission flags 0xNNNN` (plus
` (read-only)`) for the first server that works and exits 0; exits 1 with
one stderr line per server and its reason when none does; exits 2 on bad
arguments. The probe asks for exactly NAME (reconnects add ?resume, the
probe does not).

Against nbdserver (node views, generations), nbdkit, qemu-nbd and
nbd-server, and against fake servers written here that break the protocol
in one way each. Every server listens on a free port.
"""

import os
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

import nbdraw as N
from conftest import MiB, NBDSERVER
from storeutil import make_store, node_record, serve_store

KEEPER = os.environ.get("NBDROOT_KEEPER") or os.path.join(
    os.path.dirname(os.path.dirname(NBDSERVER)), "initrd-hooks", "nbdroot-keeper")
if not os.environ.get("NBDROOT_KEEPER") and not os.access(KEEPER, os.X_OK):
    pytest.skip(f"no nbdroot-keeper at {KEEPER} (set NBDROOT_KEEPER)", allow_module_level=True)

SIZE = 16 * MiB
PREFIX = "nbdroot-keeper: "


def probe(name, *servers, args=(), timeout=30):
    """Runs the probe; returns CompletedProcess (text)."""
    argv = [KEEPER, "--probe", *args]
    if name is not None:
        argv += ["--export", name]
    return subprocess.run(argv + list(servers), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def addr(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_addr(srv):
    return addr(*srv.tcp)


def ok_line(server, name, size, flags):
    ro = " (read-only)" if flags & N.TF_READ_ONLY else ""
    return f"{server}: export '{name}': {size} bytes, transmission flags 0x{flags:04x}{ro}\n"


def raw_flags(address, name):
    """(size, transmission flags) of `name` as a raw client without
    structured replies sees them (the keeper negotiates none either)."""
    with N.RawClient(address) as c:
        c.handshake()
        c.opt_go(name, infos=())
        return c.export_size, c.transmission_flags


def stderr_lines(r):
    return [l for l in r.stderr.splitlines() if l]


def assert_fails(r, server, *words):
    """Exit 1, no stdout, exactly one stderr line, for `server`, with `words`."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = stderr_lines(r)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{PREFIX}{server}: "), lines
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path, size=SIZE)


def has_ipv6_loopback():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- nbdserver

def test_probe_a_node_view(nbdserver, store):
    root, _ = store
    srv = serve_store(nbdserver, root)
    a = server_addr(srv)
    r = probe("lab/n1", a)
    size, flags = raw_flags(srv.tcp, "lab/n1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ok_line(a, "lab/n1", SIZE, flags) and size == SIZE
    assert r.stderr == ""
    for f in (N.TF_HAS_FLAGS, N.TF_SEND_FLUSH, N.TF_SEND_FUA, N.TF_SEND_TRIM,
              N.TF_SEND_WRITE_ZEROES, N.TF_CAN_MULTI_CONN):
        assert flags & f, hex(flags)
    assert not flags & (N.TF_READ_ONLY | N.TF_SEND_DF), hex(flags)  # no structured replies
    # It asked for exactly "lab/n1": a fresh node is created (a resume would
    # have been refused), and the server saw no "?resume".
    assert node_record(root, "n1")["mode"] == "persistent"
    assert attached_names(srv) == ["lab/n1", "lab/n1"]  # the probe, then raw_flags


def attached_names(srv):
    """Export names of the connections that reached transmission, in order."""
    return re.findall(r"attached export '([^']*)'", srv.stderr())


def test_probe_sends_the_name_as_given(nbdserver, store):
    """A name with options goes as it is (no '&resume' added); the server's
    refusal of a resume reaches stderr."""
    root, _ = store
    srv = serve_store(nbdserver, root)
    a = server_addr(srv)
    r = probe("lab/ghost?resume", a)
    assert_fails(r, a, "the server refused export 'lab/ghost?resume'", "NBD_REP_ERR_UNKNOWN",
                 "node 'ghost' does not exist, so there is nothing to resume")
    assert not os.path.exists(os.path.join(root, "nodes", "ghost"))
    r = probe("lab/e1?mode=ephemeral", a)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{a}: export 'lab/e1?mode=ephemeral': {SIZE} bytes")
    assert node_record(root, "e1")["mode"] == "ephemeral"
    r = probe("lab/e1?resume", a)
    assert r.returncode == 0, r.stderr
    assert attached_names(srv) == ["lab/e1?mode=ephemeral", "lab/e1?resume"]


@pytest.mark.parametrize("name", ["lab@g1", "lab"])
def test_probe_a_read_only_generation(nbdserver, store, name):
    root, _ = store
    srv = serve_store(nbdserver, root)
    a = server_addr(srv)
    r = probe(name, a)
    size, flags = raw_flags(srv.tcp, name)
    assert r.returncode == 0, r.stderr
    assert flags & N.TF_READ_ONLY
    assert r.stdout == ok_line(a, name, SIZE, flags)
    assert r.stdout.endswith(" (read-only)\n")


def test_probe_an_unknown_export(nbdserver, store):
    root, _ = store
    srv = serve_store(nbdserver, root)
    a = server_addr(srv)
    line = assert_fails(probe("nosuch", a), a)
    assert line == (f"{PREFIX}{a}: the server refused export 'nosuch' (NBD_REP_ERR_UNKNOWN): "
                    "unknown export 'nosuch'")
    assert_fails(probe("lab/n1?foo", a), a, "unknown attach option 'foo'")
    srv.assert_alive()


# ---------------------------------------------------------------- other servers

def socket_activated(cmd, family=socket.AF_INET):
    """Starts `cmd` with a listening socket on a free loopback port passed
    by systemd socket activation (LISTEN_FDS). Returns (Popen, address)."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    s = socket.create_server((host, 0), family=family)
    port = s.getsockname()[1]
    fd = s.fileno()
    p = subprocess.Popen(["bash", "-c", f"exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 "
                          f"exec {cmd}"], pass_fds=(fd,), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    s.close()
    return p, addr(host, port)


def stop(p):
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def parse_addr(a):
    host, _, port = a.rpartition(":")
    return host.strip("[]"), int(port)


@pytest.mark.parametrize("ro", [False, True])
def test_probe_nbdkit(ro):
    p, a = socket_activated(f"nbdkit -f {'-r ' if ro else ''}memory 1M")
    try:
        for name in ("", "anything/at?all"):
            r = probe(name, a)
            size, flags = raw_flags(parse_addr(a), name)
            assert r.returncode == 0, r.stderr
            assert r.stdout == ok_line(a, name, MiB, flags) and size == MiB
            assert bool(flags & N.TF_READ_ONLY) == ro
    finally:
        stop(p)


def test_probe_qemu_nbd(tmp_path):
    img = tmp_path / "q.img"
    with open(img, "wb") as f:
        f.truncate(3 * MiB)
    p, a = socket_activated(f"qemu-nbd --persistent -f raw -x disk {img}")
    try:
        r = probe("disk", a)
        size, flags = raw_flags(parse_addr(a), "disk")
        assert r.returncode == 0, r.stderr
        assert r.stdout == ok_line(a, "disk", 3 * MiB, flags)
        assert_fails(probe("nope", a), a, "the server refused export 'nope' (NBD_REP_ERR_UNKNOWN)",
                     "nope")
    finally:
        stop(p)


def listening(port):
    """Whether something listens on 127.0.0.1:port (from /proc/net/tcp, so
    that a one-shot server's only connection is not used up)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1] == want and parts[3] == "0A":
                return True
    return False


def test_probe_nbd_server(tmp_path):
    """nbd-server -d serves one client and exits. It has no socket
    activation: it gets a port that was free a moment ago (and a retry if
    someone took it meanwhile)."""
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(2 * MiB)
    for attempt in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        conf = tmp_path / "nbd-server.conf"
        conf.write_text(f"[generic]\nport = {port}\nlistenaddr = 127.0.0.1\n"
                        f"[disk]\nexportname = {img}\n")
        p = subprocess.Popen(["nbd-server", "-d", "-C", str(conf)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while not listening(port) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if listening(port):
            break
        stop(p)
    else:
        raise AssertionError(f"nbd-server did not start: {p.stdout.read()}")
    try:
        a = f"127.0.0.1:{port}"
        r = probe("disk", a)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{a}: export 'disk': {2 * MiB} bytes, transmission flags 0x")
        flags = int(r.stdout.split("0x")[1][:4], 16)
        assert flags & N.TF_HAS_FLAGS and not flags & N.TF_READ_ONLY
    finally:
        stop(p)


# ---------------------------------------------------------------- failover

def refusing_port():
    """A bound socket that does not listen: connecting to it is refused.
    The caller keeps it open so that nobody else takes the port."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, f"127.0.0.1:{s.getsockname()[1]}"


def test_probe_fails_over_to_the_next_server(nbdserver, store):
    root, _ = store
    srv = serve_store(nbdserver, root)
    good = server_addr(srv)
    s, dead = refusing_port()
    with s, FakeServer(refuse_export) as fake:
        r = probe("lab@g1", dead, fake.addr, "localhost:1", good)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{good}: export 'lab@g1': {SIZE} bytes")
        assert stderr_lines(r) == [
            f"{PREFIX}skipping server 'localhost:1': 'localhost' is not a numeric IPv4 or IPv6 "
            "address",
            f"{PREFIX}{dead}: connect: Connection refused",
            f"{PREFIX}{fake.addr}: the server refused export 'lab@g1' (NBD_REP_ERR_POLICY): "
            "go away"]
        # The first server that works wins; the rest are not tried.
        r = probe("lab@g1", good, dead)
        assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith(good)
        # None works: one line each, in order, exit 1.
        r = probe("lab@g1", dead, fake.addr, dead)
    assert r.returncode == 1 and r.stdout == ""
    lines = stderr_lines(r)
    assert len(lines) == 3, lines
    assert lines[0] == lines[2] == f"{PREFIX}{dead}: connect: Connection refused"
    assert lines[1].startswith(f"{PREFIX}{fake.addr}: the server refused")


# ---------------------------------------------------------------- fake servers

NBDMAGIC = struct.pack(">Q", N.NBDMAGIC)
IHAVEOPT = struct.pack(">Q", N.IHAVEOPT)
OLDSTYLE = struct.pack(">Q", 0x00420281861253)


class Peer:
    """One accepted connection, from the fake server's side."""

    def __init__(self, sock):
        self.sock = sock

    def send(self, b):
        self.sock.sendall(b)

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise EOFError(f"client closed after {len(buf)}/{n} bytes")
            buf += part
        return buf

    def greet(self, hflags=N.FLAG_FIXED_NEWSTYLE | N.FLAG_NO_ZEROES):
        self.send(NBDMAGIC + IHAVEOPT + struct.pack(">H", hflags))

    def client_flags(self):
        return struct.unpack(">I", self.recv(4))[0]

    def option(self):
        magic, opt, length = struct.unpack(">QII", self.recv(16))
        assert magic == N.IHAVEOPT, hex(magic)
        return opt, self.recv(length)

    def reply(self, opt, rtype, data=b"", length=None, magic=N.OPT_REPLY_MAGIC):
        self.send(struct.pack(">QIII", magic, opt, rtype, len(data) if length is None else length)
                  + data)

    def info_export(self, opt, size=123456789, tflags=N.TF_HAS_FLAGS | N.TF_READ_ONLY):
        self.reply(opt, N.REP_INFO, struct.pack(">HQH", N.INFO_EXPORT, size, tflags))

    def until_closed(self, timeout=30):
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass

    def handshake(self, rec):
        """Greeting, client flags and the NBD_OPT_GO, recorded in `rec`."""
        self.greet()
        rec["client_flags"] = self.client_flags()
        opt, data = self.option()
        rec["opt"] = opt
        (nlen,) = struct.unpack(">I", data[:4])
        rec["name"] = data[4:4 + nlen]
        (ninfo,) = struct.unpack(">H", data[4 + nlen:6 + nlen])
        rec["infos"] = [struct.unpack(">H", data[6 + nlen + 2 * i:8 + nlen + 2 * i])[0]
                        for i in range(ninfo)]
        assert len(data) == 6 + nlen + 2 * ninfo, data
        return opt


class FakeServer:
    """Listens on a free loopback port; runs `script(peer, rec)` for each
    connection, one at a time, in a thread. `records` has one dict per
    connection; an exception in a script is kept in `errors`."""

    def __init__(self, script, host="127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family)
        self.addr = addr(host, self.sock.getsockname()[1])
        self.script = script
        self.records = []
        self.errors = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.sock.settimeout(0.1)
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(30)
            rec = {}
            self.records.append(rec)
            try:
                self.script(Peer(conn), rec)
            except Exception as e:  # noqa: BLE001 (reported by the test)
                self.errors.append(e)
            finally:
                conn.close()

    def close(self):
        self.stopping = True
        self.thread.join(35)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def refuse_export(p, rec):
    opt = p.handshake(rec)
    p.reply(opt, N.REP_ERR_POLICY, b"go away")
    p.until_closed()


def good_server(size=123456789, tflags=N.TF_HAS_FLAGS | N.TF_READ_ONLY,
                hflags=N.FLAG_FIXED_NEWSTYLE | N.FLAG_NO_ZEROES, before=()):
    """A minimal correct server; `before` are extra replies (type, data)
    sent ahead of NBD_INFO_EXPORT."""
    def script(p, rec):
        p.greet(hflags)
        rec["client_flags"] = p.client_flags()
        opt, data = p.option()
        rec["opt"], rec["data"] = opt, data
        for rtype, d in before:
            p.reply(opt, rtype, d)
        p.info_export(opt, size, tflags)
        p.reply(opt, N.REP_ACK)
        p.until_closed()
    return script


@pytest.mark.parametrize("name", ["lab/n1", "", "a?b&resume", "näme/with spaces", "x" * 4096])
def test_probe_asks_for_exactly_the_name(name):
    with FakeServer(good_server()) as fake:
        r = probe(name, fake.addr)
    assert not fake.errors, fake.errors
    assert r.returncode == 0, r.stderr
    assert r.stdout == ok_line(fake.addr, name, 123456789, N.TF_HAS_FLAGS | N.TF_READ_ONLY)
    rec = fake.records[0]
    assert rec["opt"] == N.OPT_GO
    b = name.encode()
    # NBD_OPT_GO with exactly the name and no information requests.
    assert rec["data"] == struct.pack(">I", len(b)) + b + struct.pack(">H", 0)
    assert rec["client_flags"] == N.CLIENT_FIXED_NEWSTYLE | N.CLIENT_NO_ZEROES


def test_probe_export_name_too_long():
    with FakeServer(good_server()) as fake:
        r = probe("x" * 4097, fake.addr)
    assert_fails(r, fake.addr, "export name longer than 4096 bytes")


@pytest.mark.parametrize("hflags, cflags", [
    (N.FLAG_FIXED_NEWSTYLE, N.CLIENT_FIXED_NEWSTYLE),
    (N.FLAG_FIXED_NEWSTYLE | N.FLAG_NO_ZEROES, N.CLIENT_FIXED_NEWSTYLE | N.CLIENT_NO_ZEROES),
    (0xffff, N.CLIENT_FIXED_NEWSTYLE | N.CLIENT_NO_ZEROES)])
def test_probe_client_flags_follow_the_server(hflags, cflags):
    with FakeServer(good_server(hflags=hflags)) as fake:
        r = probe("x", fake.addr)
    assert r.returncode == 0, r.stderr
    assert fake.records[0]["client_flags"] == cflags


def test_probe_accepts_other_replies_and_a_64k_one():
    """Replies it does not need are skipped, up to the 64 KiB limit
    (exactly 65536 bytes is fine); the last NBD_INFO_EXPORT counts."""
    before = [(N.REP_INFO, struct.pack(">H", N.INFO_NAME) + b"x"),
              (N.REP_INFO, struct.pack(">H", 0x4242) + bytes(65534)),
              (N.REP_INFO, struct.pack(">HQH", N.INFO_EXPORT, 5, 0)),
              (N.REP_INFO, struct.pack(">HIII", N.INFO_BLOCK_SIZE, 1, 4096, 1 << 25)),
              (N.REP_SERVER, b"whatever")]
    with FakeServer(good_server(size=4 * MiB, tflags=N.TF_HAS_FLAGS, before=before)) as fake:
        r = probe("x", fake.addr)
    assert not fake.errors, fake.errors
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{fake.addr}: export 'x': {4 * MiB} bytes, transmission flags 0x0001\n"


def bad(greeting=None, reply=None, close_after=None):
    """A fake that sends `greeting` raw (then closes) if given, else does
    the handshake and then `reply(peer, opt)`."""
    def script(p, rec):
        if greeting is not None:
            p.send(greeting)
            return  # and close
        opt = p.handshake(rec)
        reply(p, opt)
        if close_after is None:
            p.until_closed()
    return script


def _hang_up(p, opt):
    pass  # the server closes right after reading the option


def _half_reply(p, opt):
    p.send(struct.pack(">QI", N.OPT_REPLY_MAGIC, opt)[:10])


def _short_data(p, opt):
    p.reply(opt, N.REP_INFO, b"\0" * 50, length=100)


def _too_many(p, opt):
    for _ in range(64):
        p.reply(opt, N.REP_INFO, struct.pack(">H", N.INFO_NAME) + b"x")
    p.info_export(opt)
    p.reply(opt, N.REP_ACK)


BAD_SERVERS = {
    "garbage greeting": (bad(greeting=b"HTTP/1.1 400 Bad Request\r\n\r\n"),
                         ["not an NBD server (bad greeting magic)"]),
    "oldstyle": (bad(greeting=NBDMAGIC + OLDSTYLE + struct.pack(">QI", MiB, 1) + bytes(124)),
                 ["oldstyle NBD server: no export names"]),
    "not newstyle": (bad(greeting=NBDMAGIC + b"IHAVEOPX" + b"\0\1"), ["bad greeting (not newstyle)"]),
    "not fixed newstyle": (bad(greeting=NBDMAGIC + IHAVEOPT + b"\0\2"),
                           ["does not do fixed newstyle"]),
    "greeting cut short": (bad(greeting=NBDMAGIC + IHAVEOPT[:3]), ["no greeting"]),
    "hangs up after the option": (bad(reply=_hang_up, close_after=True),
                                  ["no reply to NBD_OPT_GO"]),
    "hangs up mid-reply": (bad(reply=_half_reply, close_after=True), ["no reply to NBD_OPT_GO"]),
    "short reply data": (bad(reply=_short_data, close_after=True), ["short option reply"]),
    "reply of 64 KiB + 1": (bad(reply=lambda p, o: p.reply(o, N.REP_INFO, length=65537)),
                            ["option reply of 65537 bytes"]),
    "reply of 4 GiB": (bad(reply=lambda p, o: p.reply(o, N.REP_INFO, length=0xFFFFFFFF)),
                       ["option reply of 4294967295 bytes"]),
    "ack without NBD_INFO_EXPORT": (bad(reply=lambda p, o: p.reply(o, N.REP_ACK)),
                                    ["NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"]),
    "NBD_INFO_EXPORT too short": (
        bad(reply=lambda p, o: (p.reply(o, N.REP_INFO, struct.pack(">HQ", 0, MiB)),
                                p.reply(o, N.REP_ACK))),
        ["acknowledged without NBD_INFO_EXPORT"]),
    "bad reply magic": (bad(reply=lambda p, o: p.reply(o, N.REP_ACK, magic=0x1234)),
                        ["bad option reply magic"]),
    "reply for another option": (bad(reply=lambda p, o: p.reply(N.OPT_LIST, N.REP_ACK)),
                                 ["reply for option 3, not NBD_OPT_GO"]),
    "error with control characters": (
        bad(reply=lambda p, o: p.reply(o, N.REP_ERR_POLICY, b"line1\nline2\x01\x7f end")),
        ["the server refused export 'x' (NBD_REP_ERR_POLICY): line1?line2?? end"]),
    "error without a message": (bad(reply=lambda p, o: p.reply(o, N.REP_ERR_UNSUP)),
                                ["the server refused export 'x' (NBD_REP_ERR_UNSUP)"]),
    "unknown error": (bad(reply=lambda p, o: p.reply(o, N.REP_ERR | 100, b"why")),
                      ["(an error): why"]),
    "too many replies": (bad(reply=_too_many), ["too many option replies"]),
}


@pytest.mark.parametrize("case", list(BAD_SERVERS))
def test_probe_refuses_a_bad_server(case):
    script, words = BAD_SERVERS[case]
    with FakeServer(script) as fake:
        t0 = time.monotonic()
        r = probe("x", fake.addr)
        elapsed = time.monotonic() - t0
    assert not fake.errors, fake.errors
    assert_fails(r, fake.addr, *words)
    assert elapsed < 5, f"{elapsed:.1f} s to give up on a server that {case}"


def test_probe_gives_up_on_silent_servers():
    """A server that accepts and then says nothing, before the greeting or
    after the option: the handshake timeout (10 s per read) ends it. Both
    cases run at once, so this costs the timeout only once."""
    def silent(p, rec):
        p.until_closed()

    def silent_after_option(p, rec):
        p.handshake(rec)
        p.until_closed()

    with FakeServer(silent) as a, FakeServer(silent_after_option) as b:
        t0 = time.monotonic()
        procs = [subprocess.Popen([KEEPER, "--probe", "--export", "x", f.addr],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for f in (a, b)]
        outs = [p.communicate(timeout=30) for p in procs]
        elapsed = time.monotonic() - t0
    for p, (out, err), f, words in zip(procs, outs, (a, b),
                                        ("no greeting", "no reply to NBD_OPT_GO")):
        r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        assert_fails(r, f.addr, words, "Resource temporarily unavailable")
    assert 9 < elapsed < 14, f"gave up after {elapsed:.1f} s (the timeout is 10 s)"


# ---------------------------------------------------------------- arguments

@pytest.mark.parametrize("argv, words", [
    (["--probe", "--export", "x", "localhost:10809"],
     ["'localhost' is not a numeric IPv4 or IPv6 address", "at least one usable SERVER"]),
    (["--probe", "--export", "x", "nbd.example.com"], ["not a numeric"]),
    (["--probe", "--export", "x", "--timeout", "0", "127.0.0.1:9"],
     ["--timeout '0': expected seconds, at least 1"]),
    (["--probe", "--export", "x", "--timeout", "5s", "127.0.0.1:9"], ["--timeout '5s'"]),
    (["--probe", "--export", "x", "--dead-timeout", "0", "127.0.0.1:9"], ["--dead-timeout '0'"]),
    (["--probe", "--export", "x", "--timeout", "-1", "127.0.0.1:9"], ["--timeout '-1'"]),
    (["--probe", "127.0.0.1:9"], ["need --export NAME"]),
    (["--probe", "127.0.0.1:9", "--export"], ["unknown option or missing value: --export"]),
    (["--probe", "--export", "x"], ["need --export NAME and at least one SERVER"]),
    (["--probe", "--export", "x", "--bogus", "127.0.0.1:9"], ["unknown option", "--bogus"]),
    (["--probe", "--export", "x", "127.0.0.1:0"], ["bad port '0'"]),
    (["--probe", "--export", "x", "127.0.0.1:65536"], ["bad port '65536'"]),
    (["--probe", "--export", "x", "127.0.0.1:"], ["bad port ''"]),
    (["--probe", "--export", "x", "127.0.0.1:9x"], ["bad port '9x'"]),
    (["--probe", "--export", "x", "[::1"], ["no closing ']'"]),
    (["--probe", "--export", "x", "[::1]x"], ["junk after ']'"]),
    (["--probe", "--export", "x", "1" * 200], ["too long"]),
    (["--probe", "--export", "x"] + [f"127.0.0.{i}:9" for i in range(1, 18)],
     ["more than 16 servers"]),
])
def test_probe_bad_arguments(argv, words):
    r = subprocess.run([KEEPER] + argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    for w in words:
        assert w in r.stderr, r.stderr


def test_probe_help():
    r = subprocess.run([KEEPER, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--probe" in r.stdout and r.stderr == ""


# ---------------------------------------------------------------- IPv6

@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1)")
def test_probe_over_ipv6(nbdserver, store):
    root, _ = store
    srv = nbdserver(listen=False, args=["--listen", "[::1]:0", "--store", root])
    a = server_addr(srv)
    assert a.startswith("[::1]:")
    r = probe("lab@g1", a)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{a}: export 'lab@g1': {SIZE} bytes") and "(read-only)" in r.stdout
    with FakeServer(good_server(), host="::1") as fake:
        s, dead = refusing_port()
        with s:
            r = probe("y", dead, fake.addr)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{fake.addr}: export 'y'")
    assert fake.records[0]["data"] == struct.pack(">I", 1) + b"y\0\0"
