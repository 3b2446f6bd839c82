"""Shared fixtures for the nbdserver integration tests.

- `image` / `make_image`: test images with known data and holes.
- `nbdserver`: a factory that starts the server on 127.0.0.1:0 with a ready
  file, waits for it, and on teardown SIGTERMs it and checks it exits 0.
  Its stderr is attached to the report of a failing test.
"""

import ctypes
import faulthandler
import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

NBDSERVER = os.environ.get("NBDSERVER", "/work/main/build/nbdserver/nbdserver")

MiB = 1 << 20
KiB = 1 << 10
GRAIN = 64 * KiB

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0
TEST_TIMEOUT = int(os.environ.get("NBD_TEST_TIMEOUT", "150"))


def pytest_configure(config):
    import importlib.util
    if importlib.util.find_spec("nbd") is None:
        raise pytest.UsageError(
            f"{sys.executable} has no libnbd bindings: run these tests with "
            "/usr/bin/python3 -m pytest (Debian's python3-libnbd)")
    if not os.access(NBDSERVER, os.X_OK):
        raise pytest.UsageError(f"no nbdserver binary at {NBDSERVER} (set NBDSERVER)")


@pytest.fixture(autouse=True)
def watchdog():
    """A test stuck in C code (a libnbd call the server never answers)
    cannot be interrupted from Python: after TEST_TIMEOUT seconds, dump
    every thread's stack and exit, so the hang is reported, not silent."""
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """In the child: get SIGKILLed if the test process dies, so a killed
    test run leaves no server behind."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# ---------------------------------------------------------------- images

class Image:
    """A file with known contents. `layout` is a list of (offset, length,
    kind) with kind "data" or "hole", covering the whole file."""

    def __init__(self, path, layout):
        self.path = str(path)
        self.layout = layout

    @property
    def size(self):
        return os.path.getsize(self.path)

    def read(self, offset=0, length=None):
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(self.size - offset if length is None else length)

    def sha256(self):
        return sha256_file(self.path)

    def holes(self):
        """Merged (offset, length, is_hole) runs as the filesystem reports
        them via SEEK_DATA/SEEK_HOLE: the truth the server must match."""
        return file_extents(self.path)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def file_extents(path):
    """[(offset, length, is_hole)] of a file, merged, from SEEK_DATA/SEEK_HOLE."""
    size = os.path.getsize(path)
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = size
            if data > pos:
                out.append((pos, data - pos, True))
                pos = data
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            out.append((pos, hole - pos, False))
            pos = hole
    finally:
        os.close(fd)
    return merge_extents(out)


def merge_extents(extents):
    """Merges adjacent (offset, length, kind) runs of the same kind."""
    out = []
    for off, length, kind in extents:
        if length == 0:
            continue
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, kind)
        else:
            out.append((off, length, kind))
    return out


def random_layout(size, seed, hole_fraction=0.4, grain=GRAIN):
    """A layout of `grain`-sized runs, some holes, the first and last data."""
    rng = random.Random(seed)
    layout = []
    for off in range(0, size, grain):
        n = min(grain, size - off)
        hole = rng.random() < hole_fraction and 0 < off < size - grain
        layout.append((off, n, "hole" if hole else "data"))
    return merge_extents(layout)


def write_image(path, layout, seed):
    """Writes a sparse file: random data in "data" runs, holes elsewhere."""
    rng = random.Random(seed)
    size = max(off + n for off, n, _ in layout)
    with open(path, "wb") as f:
        os.truncate(f.fileno(), size)
        for off, n, kind in layout:
            if kind == "data":
                f.seek(off)
                f.write(rng.randbytes(n))
    return Image(path, layout)


@pytest.fixture
def make_image(tmp_path):
    """make_image(name, size=4 MiB, seed=..., layout=None) -> Image."""
    counter = [0]

    def make(name="disk.img", size=4 * MiB, seed=None, layout=None, hole_fraction=0.4):
        counter[0] += 1
        if seed is None:
            seed = counter[0] * 7919
        if layout is None:
            layout = random_layout(size, seed, hole_fraction)
        return write_image(tmp_path / name, layout, seed)

    return make


@pytest.fixture
def image(make_image):
    """A 4 MiB image with data and holes at 64 KiB granularity."""
    return make_image("disk.img")


# ---------------------------------------------------------------- server

class Server:
    def __init__(self, proc, workdir, stderr_path, addresses, args):
        self.proc = proc
        self.workdir = workdir
        self.stderr_path = stderr_path
        self.addresses = addresses  # NBD listeners: "HOST:PORT" or a socket path
        self.http = None            # "HOST:PORT" of the HTTP API (--http)
        self.args = args
        self.stopped = False

    @property
    def pid(self):
        return self.proc.pid

    @property
    def tcp(self):
        """(host, port) of the first TCP listener."""
        for a in self.addresses:
            if not a.startswith("/"):
                host, _, port = a.rpartition(":")
                return host.strip("[]"), int(port)
        raise AssertionError(f"no TCP listener in {self.addresses}")

    @property
    def unix(self):
        for a in self.addresses:
            if a.startswith("/"):
                return a
        raise AssertionError(f"no unix listener in {self.addresses}")

    def uri(self, export="disk"):
        host, port = self.tcp
        if ":" in host:
            host = f"[{host}]"
        return f"nbd://{host}:{port}/{export}"

    def unix_uri(self, export="disk"):
        return f"nbd+unix:///{export}?socket={self.unix}"

    def stderr(self):
        try:
            with open(self.stderr_path, "r", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def vmrss_kib(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def num_fds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def alive(self):
        return self.proc.poll() is None

    def assert_alive(self):
        assert self.alive(), (f"nbdserver died with status {self.proc.returncode}\n"
                              f"--- stderr ---\n{self.stderr()[-5000:]}")

    def terminate(self, timeout=STOP_TIMEOUT):
        """SIGTERM; returns the exit status (None if it did not exit in time,
        in which case it has been SIGKILLed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None
        finally:
            self.stopped = True


def spawn(args, workdir, env=None, name="nbdserver"):
    """Starts nbdserver with `args`; stderr goes to a file in workdir."""
    stderr_path = os.path.join(workdir, f"{name}.stderr")
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([NBDSERVER] + list(args), stdin=subprocess.DEVNULL,
                                stdout=err, stderr=err, env=env, preexec_fn=_die_with_parent)
    return proc, stderr_path


def wait_ready(proc, ready_file, stderr_path, timeout=READY_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(ready_file):
            with open(ready_file) as f:
                lines = [l.strip() for l in f if l.strip()]
            if lines:
                return lines
        if proc.poll() is not None:
            with open(stderr_path, errors="replace") as f:
                err = f.read()
            raise AssertionError(f"nbdserver exited with status {proc.returncode} "
                                 f"before it was ready\n--- stderr ---\n{err[-5000:]}")
        time.sleep(0.02)
    proc.kill()
    proc.wait(5)
    with open(stderr_path, errors="replace") as f:
        err = f.read()
    raise AssertionError(f"nbdserver not ready within {timeout} s\n--- stderr ---\n{err[-5000:]}")


def split_ready_lines(lines):
    """A ready file's lines: the NBD listeners, one per line, then
    "http://HOST:PORT" for the HTTP API. Returns (addresses, http or None)."""
    http = [l[len("http://"):] for l in lines if l.startswith("http://")]
    return [l for l in lines if not l.startswith("http://")], (http[0] if http else None)


def export_arg(name, img, ro=False, desc=None):
    s = f"{name}={img.path if isinstance(img, Image) else img}"
    if ro:
        s += ",ro"
    if desc is not None:
        s += f",desc={desc}"
    return s


@pytest.fixture
def nbdserver(request, tmp_path):
    """start(exports={"disk": image} or {"disk": (image, {"ro": True,
    "desc": "..."})}, args=[...], listen=True, env=None) -> Server.

    Teardown SIGTERMs every server still running and asserts it exited 0
    within bounded time. Stderr is attached to a failing test's report."""
    servers = []
    request.node._nbdservers = servers
    count = [0]

    def start(exports=None, args=(), listen=True, env=None, ready_timeout=READY_TIMEOUT):
        count[0] += 1
        workdir = tmp_path / f"server{count[0]}"
        workdir.mkdir()
        ready_file = str(workdir / "ready")
        argv = []
        if listen:
            argv += ["--listen", "127.0.0.1:0"]
        for name, spec in (exports or {}).items():
            if isinstance(spec, tuple):
                img, opts = spec
            else:
                img, opts = spec, {}
            argv += ["--export", export_arg(name, img, **opts)]
        argv += list(args)
        argv += ["--ready-file", ready_file]
        proc, stderr_path = spawn(argv, str(workdir), env=env)
        server = Server(proc, str(workdir), stderr_path, None, argv)
        servers.append(server)
        lines = wait_ready(proc, ready_file, stderr_path, ready_timeout)
        server.addresses, server.http = split_ready_lines(lines)
        return server

    yield start

    problems = []
    for s in servers:
        if s.stopped:
            continue
        if s.proc.poll() is not None:
            problems.append(f"nbdserver (pid {s.pid}) died during the test with status "
                            f"{s.proc.returncode}")
            continue
        rc = s.terminate()
        if rc != 0:
            problems.append(f"nbdserver (pid {s.pid}) exit status after SIGTERM: {rc} "
                            f"(None = did not exit within {STOP_TIMEOUT} s)")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    servers = getattr(item, "_nbdservers", None)
    if report.failed and servers:
        for i, s in enumerate(servers):
            report.sections.append((f"nbdserver {i + 1} stderr (argv: {' '.join(s.args)})",
                                    s.stderr()[-20000:] or "(empty)"))


# ---------------------------------------------------------------- clients

def run(cmd, timeout=120, check=True, **kw):
    """Runs a client tool; on failure the assertion shows its output."""
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, text=True, **kw)
    if check:
        assert p.returncode == 0, (f"{cmd!r} exited {p.returncode}\n"
                                   f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}")
    return p


def nbd_handle(uri, strict=True, structured=True):
    """A connected libnbd handle. `strict=False` turns off libnbd's own
    checks so that bad requests reach the server."""
    import nbd
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if structured:
        h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


@pytest.fixture
def ro_server(nbdserver, image):
    return nbdserver({"disk": (image, {"ro": True})})


@pytest.fixture
def rw_server(nbdserver, image):
    return nbdserver({"disk": image})


def assert_healthy(server, img, export="disk"):
    """The server is alive and a fresh libnbd client reads correct data."""
    server.assert_alive()
    h = nbd_handle(server.uri(export))
    try:
        for off in (0, img.size // 3, img.size - 65536):
            assert h.pread(65536, off) == img.read(off, 65536), f"wrong data at {off}"
    finally:
        h.shutdown()
