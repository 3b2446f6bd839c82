"""Boot files over --http (nbdserver/http/files_api.hpp, issue 12):
GET and HEAD /files/IMAGE/GEN/NAME and /files/boot/NAME, against the real
server with curl and python's http.client and raw sockets.

What is checked: whole files and each single Range form (206 with
Content-Range), 416 with "bytes */SIZE", several ranges answered with the
whole file (200), HEAD, ETag/If-None-Match (304), names that try to leave
the directory (encoded dots and slashes, symlinks, non-regular files),
a file replaced by rename while a slow download of it is in flight (that
download ends with the old bytes), one truncated in place (the server
lives on), and many concurrent downloads that must be byte-identical.
"""

import hashlib
import http.client
import os
import socket
import subprocess
import threading
import time

import pytest

from storeutil import make_store

MiB = 1 << 20
KERNEL = 8 * MiB + 123   # not a multiple of any buffer size
INITRD = 5 * MiB + 7


def sha(data):
    return hashlib.sha256(data).hexdigest()


class Files:
    """A store with lab/g1 boot files and boot/ files, and a server on it."""

    def __init__(self, store, srv):
        self.store = store
        self.srv = srv
        self.host, _, port = srv.http.rpartition(":")
        self.port = int(port)
        self.base = "http://" + srv.http

    def gen_path(self, name):
        return os.path.join(self.store, "images", "lab", "generations", "g1", "boot", name)

    def boot_path(self, name):
        return os.path.join(self.store, "boot", name)

    def request(self, method, path, headers=None):
        c = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            c.request(method, path, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def curl(self, *args):
        r = subprocess.run(["curl", "-sS", "--path-as-is", *args], capture_output=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def files(nbdserver, tmp_path):
    store, _ = make_store(tmp_path, size=MiB)
    f = Files.__new__(Files)
    f.store = store
    f.kernel = os.urandom(KERNEL)
    f.initrd = os.urandom(INITRD)
    f.memtest = os.urandom(150000)
    write(Files.gen_path(f, "vmlinuz"), f.kernel)
    write(Files.gen_path(f, "initrd.img"), f.initrd)
    write(Files.boot_path(f, "memtest86+x64.bin"), f.memtest)
    srv = nbdserver(args=["--store", store, "--http", "127.0.0.1:0", "--threads", "2"])
    Files.__init__(f, store, srv)
    return f


# ---------------------------------------------------------------- whole files

def test_whole_files_curl(files):
    assert sha(files.curl(files.base + "/files/lab/g1/vmlinuz")) == sha(files.kernel)
    assert sha(files.curl(files.base + "/files/lab/g1/initrd.img")) == sha(files.initrd)
    assert files.curl(files.base + "/files/boot/memtest86+x64.bin") == files.memtest


def test_whole_file_headers(files):
    status, h, body = files.request("GET", "/files/lab/g1/vmlinuz")
    assert status == 200 and body == files.kernel
    assert h["content-length"] == str(KERNEL)
    assert h["content-type"] == "application/octet-stream"
    assert h["accept-ranges"] == "bytes"
    assert h["etag"].startswith('"') and h["last-modified"].endswith(" GMT")
    assert "content-range" not in h


def test_head(files):
    status, h, body = files.request("HEAD", "/files/lab/g1/initrd.img")
    assert status == 200 and body == b""
    assert h["content-length"] == str(INITRD)
    # curl -I must not wait for a body that never comes.
    out = files.curl("-I", files.base + "/files/boot/memtest86+x64.bin").decode()
    assert out.startswith("HTTP/1.1 200") and f"Content-Length: {len(files.memtest)}" in out


def test_empty_file(files):
    write(files.boot_path("empty"), b"")
    status, h, body = files.request("GET", "/files/boot/empty")
    assert (status, h["content-length"], body) == (200, "0", b"")
    status, h, _ = files.request("GET", "/files/boot/empty", {"Range": "bytes=0-"})
    assert status == 416 and h["content-range"] == "bytes */0"


# ---------------------------------------------------------------- ranges

@pytest.mark.parametrize("spec,first,last", [
    ("0-0", 0, 0),
    ("0-9", 0, 9),
    ("1000-2047", 1000, 2047),
    (f"{KERNEL - 10}-{KERNEL + 100}", KERNEL - 10, KERNEL - 1),   # end clamped
    (f"{KERNEL - 1}-", KERNEL - 1, KERNEL - 1),
    ("4194304-", 4194304, KERNEL - 1),
    ("-1", KERNEL - 1, KERNEL - 1),
    ("-4096", KERNEL - 4096, KERNEL - 1),
    (f"-{KERNEL + 5}", 0, KERNEL - 1),                          # suffix longer than the file
])
def test_single_range(files, spec, first, last):
    status, h, body = files.request("GET", "/files/lab/g1/vmlinuz", {"Range": "bytes=" + spec})
    assert status == 206, (status, body[:200])
    assert h["content-range"] == f"bytes {first}-{last}/{KERNEL}"
    assert h["content-length"] == str(last - first + 1)
    assert body == files.kernel[first:last + 1]


def test_range_curl(files):
    out = files.curl("-r", "100-199", files.base + "/files/lab/g1/vmlinuz")
    assert out == files.kernel[100:200]
    out = files.curl("-r", "-300", files.base + "/files/boot/memtest86+x64.bin")
    assert out == files.memtest[-300:]


@pytest.mark.parametrize("spec", [f"{KERNEL}-", f"{KERNEL}-{KERNEL + 10}", "-0",
                                  f"{KERNEL + 1000}-{KERNEL + 2000}"])
def test_unsatisfiable_range(files, spec):
    status, h, body = files.request("GET", "/files/lab/g1/vmlinuz", {"Range": "bytes=" + spec})
    assert status == 416, (status, body[:200])
    assert h["content-range"] == f"bytes */{KERNEL}"
    assert b"not satisfiable" in body


def test_backwards_range_is_416(files):
    # Rejected by the library's parser before our handler runs.
    status, _, _ = files.request("GET", "/files/lab/g1/vmlinuz", {"Range": "bytes=9-5"})
    assert status == 416


def test_several_ranges_get_the_whole_file(files):
    status, h, body = files.request("GET", "/files/lab/g1/vmlinuz",
                                    {"Range": "bytes=0-9,100-199,0-"})
    assert status == 200 and "content-range" not in h
    assert body == files.kernel


def test_if_range(files):
    _, h, _ = files.request("HEAD", "/files/lab/g1/vmlinuz")
    status, _, body = files.request("GET", "/files/lab/g1/vmlinuz",
                                    {"Range": "bytes=0-9", "If-Range": h["etag"]})
    assert status == 206 and body == files.kernel[:10]
    status, _, body = files.request("GET", "/files/lab/g1/vmlinuz",
                                    {"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert status == 200 and body == files.kernel


def test_etag_304(files):
    _, h, _ = files.request("HEAD", "/files/boot/memtest86+x64.bin")
    status, h2, body = files.request("GET", "/files/boot/memtest86+x64.bin",
                                     {"If-None-Match": h["etag"]})
    assert status == 304 and body == b"" and h2["etag"] == h["etag"]
    status, _, body = files.request("GET", "/files/boot/memtest86+x64.bin",
                                    {"If-None-Match": '"other", ' + h["etag"]})
    assert status == 304
    status, _, body = files.request("GET", "/files/boot/memtest86+x64.bin",
                                    {"If-None-Match": '"other"'})
    assert status == 200 and body == files.memtest


# ---------------------------------------------------------------- names

def test_missing_files_404(files):
    for path in ["/files/lab/g1/nothere", "/files/lab/g9/vmlinuz", "/files/nolab/g1/vmlinuz",
                 "/files/boot/nothere", "/files/lab/g1", "/files/boot"]:
        status, h, body = files.request("GET", path)
        assert status == 404, (path, status, body)
        assert h["content-type"] == "application/json"


SECRET = b"the secret outside the boot directory\n"


@pytest.mark.parametrize("path", [
    "/files/boot/%2e%2e/secret",
    "/files/boot/%2e%2e%2fsecret",
    "/files/boot/..%2Fsecret",
    "/files/boot/%2E%2E%2F%2E%2E%2Fsecret",
    "/files/lab/g1/..%2f..%2f..%2f..%2f..%2fsecret",
    "/files/lab/g1/%2e%2e",
    "/files/lab/%2e%2e/..",
    "/files/%2e%2e/%2e%2e/secret",
    "/files/lab/g1/.hidden",
    "/files/lab/g1/a%00b",
    "/files/boot/../secret",
    "/files/boot/./secret",
])
def test_traversal_refused(files, path):
    write(os.path.join(files.store, "secret"), SECRET)
    write(files.gen_path(".hidden"), SECRET)
    for method in ("GET", "HEAD"):
        status, _, body = files.request(method, path)
        assert status in (400, 404), (method, path, status, body)
        assert SECRET not in body
    out = subprocess.run(["curl", "-s", "--path-as-is", files.base + path],
                         capture_output=True, timeout=60).stdout
    assert SECRET not in out


def test_symlinks_refused(files):
    outside = os.path.join(files.store, "secret")
    write(outside, SECRET)
    os.symlink(outside, files.boot_path("link-out"))
    os.symlink("/etc/passwd", files.gen_path("passwd"))
    os.symlink("vmlinuz", files.gen_path("link-in"))  # even one inside the dir
    for path in ["/files/boot/link-out", "/files/lab/g1/passwd", "/files/lab/g1/link-in"]:
        for headers in ({}, {"Range": "bytes=0-5"}):
            status, _, body = files.request("GET", path, headers)
            assert status == 404 and b"symlink" in body, (path, status, body)
            assert SECRET not in body and b"root:" not in body


def test_non_regular_files_refused(files):
    os.mkdir(files.gen_path("adir"))
    os.mkfifo(files.boot_path("fifo"))  # must not hang the open
    for path in ["/files/lab/g1/adir", "/files/boot/fifo"]:
        status, _, body = files.request("GET", path)
        assert status == 404 and b"not a regular file" in body, (path, status, body)


# ---------------------------------------------------------------- replaced files

def start_slow_get(files, path):
    """Sends GET with a receive buffer far smaller than the file and reads
    the response headers and the first body bytes, then stops reading: the
    server (send buffer at most tcp_wmem's 4 MiB) is mid-file. Returns
    (socket, headers text, first bytes)."""
    s = socket.create_connection((files.host, files.port), timeout=60)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return s, head.decode(), body


def read_rest(s, body):
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        body += chunk
    s.close()
    return body


def test_replaced_by_rename_during_download(files):
    path = files.gen_path("vmlinuz")
    s, head, body = start_slow_get(files, "/files/lab/g1/vmlinuz")
    assert head.startswith("HTTP/1.1 200") and f"Content-Length: {KERNEL}" in head
    # The server mapped the file before it sent the headers: replace it now.
    new = os.urandom(KERNEL // 2)
    write(path + ".tmp", new)
    os.rename(path + ".tmp", path)
    status, _, got_new = files.request("GET", "/files/lab/g1/vmlinuz")
    assert status == 200 and sha(got_new) == sha(new)
    rest = read_rest(s, body)
    assert len(rest) == KERNEL
    assert sha(rest) == sha(files.kernel)   # the old bytes, whole
    # A range on the new file, and a second replacement seen as well.
    status, _, part = files.request("GET", "/files/lab/g1/vmlinuz", {"Range": "bytes=10-19"})
    assert status == 206 and part == new[10:20]
    newer = os.urandom(1000)
    write(path + ".tmp", newer)
    os.rename(path + ".tmp", path)
    assert files.request("GET", "/files/lab/g1/vmlinuz")[2] == newer


def test_truncated_in_place_during_download(files):
    """Not a supported way to update a boot file (rename is), but the server
    must survive it: the download in flight ends short, later ones see the
    new size."""
    path = files.gen_path("vmlinuz")
    s, head, body = start_slow_get(files, "/files/lab/g1/vmlinuz")
    assert head.startswith("HTTP/1.1 200")
    os.truncate(path, 1000)
    got = read_rest(s, body)
    assert len(got) <= KERNEL
    assert got[:len(body)] == files.kernel[:len(body)]
    files.srv.assert_alive()
    status, h, body = files.request("GET", "/files/lab/g1/vmlinuz")
    assert status == 200 and body == files.kernel[:1000]


def test_removed_file_404(files):
    assert files.request("GET", "/files/boot/memtest86+x64.bin")[0] == 200
    os.unlink(files.boot_path("memtest86+x64.bin"))
    assert files.request("GET", "/files/boot/memtest86+x64.bin")[0] == 404


# ---------------------------------------------------------------- many at once

def test_many_concurrent_downloads_identical(files):
    n = 40
    want = {"vmlinuz": sha(files.kernel), "initrd.img": sha(files.initrd)}
    results = []
    lock = threading.Lock()

    def client(i):
        c = http.client.HTTPConnection(files.host, files.port, timeout=120)
        try:
            for name in ("vmlinuz", "initrd.img"):   # one keep-alive connection
                c.request("GET", "/files/lab/g1/" + name)
                r = c.getresponse()
                h = hashlib.sha256()
                while True:
                    b = r.read(1 << 16)
                    if not b:
                        break
                    h.update(b)
                with lock:
                    results.append((name, r.status, h.hexdigest()))
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 * n
    for name, status, digest in results:
        assert status == 200 and digest == want[name], (name, status)


def test_curl_parallel(files, tmp_path):
    urls = []
    for i in range(30):
        urls += ["-o", str(tmp_path / f"k{i}"), files.base + "/files/lab/g1/vmlinuz",
                 "-o", str(tmp_path / f"r{i}"), files.base + "/files/lab/g1/initrd.img"]
    files.curl("--fail", "--parallel", "--parallel-max", "60", *urls)
    for i in range(30):
        assert sha((tmp_path / f"k{i}").read_bytes()) == sha(files.kernel)
        assert sha((tmp_path / f"r{i}").read_bytes()) == sha(files.initrd)


def test_idle_connections_do_not_starve_others(files):
    """A node that boots its kernel leaves its kept-alive connection open.
    cpp-httplib gives each connection a pool thread until it closes or idles
    out (keep-alive timeout, 5 s): 40 such nodes must not hold up the next
    node's download for a keep-alive timeout. (With a pool of 8 it waited
    5 s per 8 idle connections.)"""
    idle = []
    try:
        for _ in range(40):
            c = http.client.HTTPConnection(files.host, files.port, timeout=60)
            c.request("GET", "/files/boot/memtest86+x64.bin")
            assert c.getresponse().read() == files.memtest
            idle.append(c)   # kept open, idle
        t0 = time.monotonic()
        status, _, body = files.request("GET", "/files/boot/memtest86+x64.bin")
        took = time.monotonic() - t0
        assert status == 200 and body == files.memtest
        # Well under the 5 s keep-alive timeout, even on a loaded machine.
        assert took < 2.5, took
    finally:
        for c in idle:
            c.close()
