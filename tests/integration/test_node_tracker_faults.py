"""The node agent against a tracker (the server's HTTP API) that lies:
bad JSON, an error status, a body past the agent's limit, an answer that
never comes, digests that do not load. The agent says why in its log,
turns peers off and serves the node's root from the server.

The server and the agent are the real binaries; the tracker is a fake
(python's http.server): a lying tracker is a fault-injection boundary."""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from test_node_agent import SIZE, Agent, read_all, serve, sockdir, store  # noqa: F401


class FakeTracker:
    def __init__(self, fault):
        self.fault = fault
        self.release = threading.Event()  # ends the "hang" fault's wait
        self.paths = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.paths.append(self.path)
                outer.answer(self)

            do_POST = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.addr = f"127.0.0.1:{self.httpd.server_address[1]}"

    def send(self, h, status, body):
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def answer(self, h):
        f = self.fault
        if f == "bad_json":
            self.send(h, 200, b'{"generation": "lab@g1", "size": ')
        elif f == "status_500":
            self.send(h, 500, b'{"error": "the tracker is on fire"}')
        elif f == "huge_body":
            body = b" " * (4 << 20)
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            try:
                h.wfile.write(body)
            except OSError:
                pass  # the agent hung up at its limit
        elif f == "hang":
            self.release.wait(30)
        elif f == "bad_digests":
            if h.path.startswith("/v1/nodes/"):
                info = {"generation": "lab@g1", "size": SIZE, "chunk_size": 65536}
                self.send(h, 200, json.dumps(info).encode())
            else:
                self.send(h, 200, b"NBDRCHKS but not really a digests file")

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def start_agent(nbdserver, srv, sockdir, tracker):  # noqa: F811
    sock, stats = f"{sockdir}/n1.sock", f"{sockdir}/n1.stats"
    host, port = srv.tcp
    argv = ["node", "--server", f"{host}:{port}", "--export", "lab/n1", "--socket", sock,
            "--stats-file", stats, "--tracker", tracker, "--peer-listen", "127.0.0.1:0"]
    # "hang" costs the agent its 5 s read timeout before it serves.
    return Agent(nbdserver(args=argv, listen=False, ready_timeout=60), sock, stats)


WHY = {
    "bad_json": "bad answer",
    "status_500": "HTTP 500: the tracker is on fire",
    "huge_body": "body limit exceeded",
    "hang": "answer: timed out after 5 s",
    "bad_digests": "peers off",
}


@pytest.mark.parametrize("fault", sorted(WHY))
def test_a_lying_tracker_turns_peers_off_and_the_root_still_works(nbdserver, store, sockdir,  # noqa: F811
                                                                  fault):
    root, base = store
    srv = serve(nbdserver, root, http=False)
    fake = FakeTracker(fault)
    try:
        a = start_agent(nbdserver, srv, sockdir, fake.addr)
        h = a.handle()
        assert read_all(h) == base
        h.pwrite(b"\x5a" * 4096, 8192)
        assert h.pread(4096, 8192) == b"\x5a" * 4096
        h.shutdown()
        log = a.stderr()
        assert "peers off" in log and WHY[fault] in log, log
        assert fake.paths and fake.paths[0] == "/v1/nodes/lab/n1"
        # The agent writes its counters every 250 ms, the first time some
        # time after its ready file.
        deadline = time.monotonic() + 30
        while not os.path.exists(a.stats_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.stats()["gen_peer_bytes"] == 0
    finally:
        fake.close()
