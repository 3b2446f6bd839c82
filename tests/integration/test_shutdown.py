"""SIGTERM: in-flight requests finish (or fail cleanly), the server exits 0."""

import signal
import subprocess
import time

import nbd

import nbdraw
from conftest import MiB, nbd_handle, sha256_file


def test_sigterm_with_many_outstanding_reads(nbdserver, make_image):
    img = make_image("big.img", size=64 * MiB, seed=51, hole_fraction=0.2)
    data = img.read()
    srv = nbdserver({"disk": (img, {"ro": True})})
    h = nbd_handle(srv.uri("disk"))
    reqs = []
    for i in range(128):
        off = (i * 509 * 1024) % (img.size - MiB)
        buf = nbd.Buffer(MiB)
        reqs.append((h.aio_pread(buf, off), off, buf))
    # Make sure the first requests are on the wire before the signal.
    h.poll(0)
    srv.proc.send_signal(signal.SIGTERM)

    deadline = time.monotonic() + 20
    while h.aio_in_flight() > 0 and time.monotonic() < deadline:
        try:
            h.poll(500)
        except nbd.Error:
            break  # the server hung up: the rest complete with errors
    ok = failed = 0
    for cookie, off, buf in reqs:
        try:
            done = h.aio_command_completed(cookie)
        except nbd.Error:
            failed += 1
            continue
        if done:
            ok += 1
            assert buf.to_bytearray() == data[off:off + MiB], f"wrong data at {off}"
        else:
            failed += 1
    print(f"SIGTERM with 128 reads outstanding: {ok} completed, {failed} failed")
    assert ok + failed == len(reqs)
    rc = srv.terminate(timeout=20)
    assert rc == 0, f"exit status {rc}"


def test_sigterm_during_nbdcopy(nbdserver, make_image, tmp_path):
    img = make_image("big.img", size=96 * MiB, seed=52, hole_fraction=0.3)
    srv = nbdserver({"disk": (img, {"ro": True})})
    out = tmp_path / "out.img"
    copy = subprocess.Popen(["nbdcopy", "--connections=1", "--requests=4",
                             "--request-size=65536", srv.uri("disk"), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.terminate(timeout=20)
        copy_out, _ = copy.communicate(timeout=30)
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait()
    assert rc == 0, f"server exit status {rc}"
    if copy.returncode == 0:
        # It finished before the shutdown: then the copy must be right.
        assert sha256_file(out) == img.sha256()
    else:
        # Otherwise it saw an error, not garbage and not a hang.
        assert copy_out.strip(), "nbdcopy failed without a message"


def test_sigterm_with_idle_clients_exits_promptly(nbdserver, image):
    srv = nbdserver({"disk": image})
    handles = [nbd_handle(srv.uri("disk")) for _ in range(4)]
    raw = nbdraw.RawClient(srv.tcp)
    raw.greeting()  # stuck in the handshake
    t0 = time.monotonic()
    rc = srv.terminate(timeout=15)
    elapsed = time.monotonic() - t0
    assert rc == 0
    assert elapsed < 5, f"took {elapsed:.1f} s to exit with idle clients"
    raw.wait_closed(timeout=2)
    for h in handles:
        try:
            h.pread(512, 0)
        except nbd.Error:
            pass
        else:
            raise AssertionError("a connection served a read after the server exited")


def test_sigterm_with_stalled_request_respects_shutdown_timeout(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--shutdown-timeout", "2"])
    raw = nbdraw.connect_export(srv.tcp, "disk")
    req = raw.request_bytes(nbdraw.CMD_WRITE, 0, 65536)
    raw.send(req + b"\x01" * 1000)  # header and the start of the payload, then nothing
    time.sleep(0.2)
    t0 = time.monotonic()
    rc = srv.terminate(timeout=15)
    elapsed = time.monotonic() - t0
    assert rc == 0
    assert elapsed < 8, f"took {elapsed:.1f} s with --shutdown-timeout 2"
    raw.close()


def test_new_connections_refused_after_shutdown(nbdserver, image):
    srv = nbdserver({"disk": image})
    host, port = srv.tcp
    assert srv.terminate() == 0
    import socket
    s = socket.socket()
    s.settimeout(5)
    try:
        err = s.connect_ex((host, port))
    finally:
        s.close()
    assert err != 0, "the listening socket is still accepting after exit"
