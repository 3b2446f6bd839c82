"""Small socket pieces for the fake servers and relays of the integration
tests: exact reads, and a loopback listener that runs a session per
connection on a thread of its own."""

import socket
import threading


def recv_exact(s, n):
    """n bytes from socket s; ConnectionError when it closes first."""
    buf = b""
    while len(buf) < n:
        b = s.recv(n - len(buf))
        if not b:
            raise ConnectionError("closed")
        buf += b
    return buf


class Listener:
    """Listens on 127.0.0.1 (a free port) and calls self._session(conn) on
    a daemon thread for each connection; subclasses write _session.
    `port` and `address` ("127.0.0.1:PORT") say where; close() stops
    accepting."""

    def __init__(self):
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(c,), daemon=True).start()

    def _session(self, c):
        raise NotImplementedError

    def close(self):
        self.lsock.close()
