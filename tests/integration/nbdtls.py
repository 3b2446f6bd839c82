"""TLS 1.3 with a pre-shared key for the raw client (nbdraw.py), through
GnuTLS's C API with ctypes: Debian 12's Python has no PSK in its ssl module,
and libnbd 1.14 has no nbd_opt_starttls, so nothing else can send options
before and after STARTTLS by hand.

    c = RawClient(addr); c.handshake()
    assert c.opt_starttls().type == REP_ACK
    starttls(c, "node-a", key_hex)   # c.send / c.recv_exact now go through TLS

The socket I/O stays in Python (GnuTLS's push and pull callbacks call the
socket), so the client's timeouts still apply: a server that stalls makes a
test fail, never hang.
"""

import ctypes
import socket

_gnutls = ctypes.CDLL("libgnutls.so.30")

GNUTLS_CLIENT = 1 << 1
GNUTLS_NO_TICKETS = 1 << 10
GNUTLS_CRD_PSK = 4
GNUTLS_PSK_KEY_RAW = 0
GNUTLS_E_AGAIN = -28
GNUTLS_E_INTERRUPTED = -52
GNUTLS_SHUT_WR = 1
EAGAIN = 11
ECONNRESET = 104

PRIORITY = b"NORMAL:-VERS-ALL:+VERS-TLS1.3:-KX-ALL:+ECDHE-PSK:+DHE-PSK"

_PUSH = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_PULL = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class _Datum(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_uint)]


_gnutls.gnutls_strerror.restype = ctypes.c_char_p
_gnutls.gnutls_record_send.restype = ctypes.c_ssize_t
_gnutls.gnutls_record_recv.restype = ctypes.c_ssize_t
_gnutls.gnutls_record_send.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_gnutls.gnutls_record_recv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_gnutls.gnutls_handshake.argtypes = [ctypes.c_void_p]
_gnutls.gnutls_transport_set_errno.argtypes = [ctypes.c_void_p, ctypes.c_int]
_gnutls.gnutls_error_is_fatal.argtypes = [ctypes.c_int]
_gnutls.gnutls_bye.argtypes = [ctypes.c_void_p, ctypes.c_int]
_gnutls.gnutls_deinit.argtypes = [ctypes.c_void_p]
_gnutls.gnutls_psk_free_client_credentials.argtypes = [ctypes.c_void_p]
_gnutls.gnutls_session_get_desc.restype = ctypes.c_void_p
_gnutls.gnutls_session_get_desc.argtypes = [ctypes.c_void_p]


class TlsError(AssertionError):
    """The TLS handshake or a record failed (GnuTLS's message)."""


def _check(rc, what):
    if rc < 0:
        raise TlsError(f"{what}: {_gnutls.gnutls_strerror(rc).decode()}")


class Session:
    """A client TLS session over a connected socket `sock`."""

    def __init__(self, sock, identity, key_hex):
        self.sock = sock
        self.session = ctypes.c_void_p()
        self.cred = ctypes.c_void_p()
        self.closed = False  # the server closed the TCP connection
        _check(_gnutls.gnutls_init(ctypes.byref(self.session), GNUTLS_CLIENT | GNUTLS_NO_TICKETS),
               "gnutls_init")
        _check(_gnutls.gnutls_priority_set_direct(self.session, PRIORITY, None), "priority")
        _check(_gnutls.gnutls_psk_allocate_client_credentials(ctypes.byref(self.cred)), "cred")
        key = ctypes.create_string_buffer(bytes.fromhex(key_hex))
        datum = _Datum(ctypes.cast(key, ctypes.c_void_p), len(key.raw) - 1)
        _check(_gnutls.gnutls_psk_set_client_credentials(self.cred, identity.encode(),
                                                         ctypes.byref(datum),
                                                         GNUTLS_PSK_KEY_RAW), "psk key")
        _check(_gnutls.gnutls_credentials_set(self.session, GNUTLS_CRD_PSK, self.cred),
               "credentials")
        # Kept referenced: GnuTLS holds the function pointers.
        self._push = _PUSH(self._push_cb)
        self._pull = _PULL(self._pull_cb)
        _gnutls.gnutls_transport_set_push_function(self.session, self._push)
        _gnutls.gnutls_transport_set_pull_function(self.session, self._pull)
        self._error = None

    def _push_cb(self, _ptr, data, size):
        try:
            self.sock.sendall(ctypes.string_at(data, size))
            return size
        except OSError as e:
            self._error = e
            _gnutls.gnutls_transport_set_errno(self.session, ECONNRESET)
            return -1

    def _pull_cb(self, _ptr, data, size):
        try:
            part = self.sock.recv(size)
        except socket.timeout as e:
            self._error = e
            _gnutls.gnutls_transport_set_errno(self.session, ECONNRESET)
            return -1
        except OSError as e:
            self._error = e
            self.closed = True
            _gnutls.gnutls_transport_set_errno(self.session, ECONNRESET)
            return -1
        if not part:
            self.closed = True
        ctypes.memmove(data, part, len(part))
        return len(part)

    def _retry(self, call, what):
        while True:
            self._error = None
            rc = call()
            if rc in (GNUTLS_E_AGAIN, GNUTLS_E_INTERRUPTED) and self._error is None:
                continue
            if rc < 0:
                extra = f" ({self._error!r})" if self._error is not None else ""
                raise TlsError(f"{what}: {_gnutls.gnutls_strerror(rc).decode()}{extra}")
            return rc

    def handshake(self):
        self._retry(lambda: _gnutls.gnutls_handshake(self.session), "TLS handshake")

    def description(self):
        p = _gnutls.gnutls_session_get_desc(self.session)
        return ctypes.string_at(p).decode() if p else ""

    def send(self, data):
        view = bytes(data)
        off = 0
        while off < len(view):
            chunk = view[off:off + 16384]
            n = self._retry(lambda: _gnutls.gnutls_record_send(self.session, chunk, len(chunk)),
                            "TLS send")
            off += n

    def recv(self, n):
        """Up to n plaintext bytes; b"" when the server ended the session."""
        buf = ctypes.create_string_buffer(n)
        got = self._retry(lambda: _gnutls.gnutls_record_recv(self.session, buf, n), "TLS recv")
        return buf.raw[:got]

    def close(self):
        if self.session:
            _gnutls.gnutls_deinit(self.session)
            self.session = ctypes.c_void_p()
        if self.cred:
            _gnutls.gnutls_psk_free_client_credentials(self.cred)
            self.cred = ctypes.c_void_p()


def starttls(client, identity, key_hex):
    """Runs the TLS handshake on a RawClient whose STARTTLS was just ACKed,
    then routes its send() and recv_exact() through the session. Returns the
    session (its description() names the protocol and cipher)."""
    from nbdraw import Closed
    session = Session(client.sock, identity, key_hex)
    session.handshake()

    def send(data):
        session.send(data)

    def recv_exact(n):
        buf = bytearray()
        while len(buf) < n:
            try:
                part = session.recv(min(n - len(buf), 1 << 20))
            except TlsError as e:
                if session.closed:
                    raise Closed(f"server closed the connection after {len(buf)}/{n} bytes") from e
                raise
            if not part:
                raise Closed(f"server closed the TLS session after {len(buf)}/{n} bytes")
            buf += part
        return bytes(buf)

    client.send = send
    client.recv_exact = recv_exact
    client.tls = session
    close = client.close

    def close_all():
        try:
            close()
        finally:
            session.close()
    client.close = close_all
    return session
