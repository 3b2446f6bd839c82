"""A tiny hand-written NBD client for protocol-level tests.

Written from the NBD protocol document (doc/proto.md in the NetworkBlockDevice
repository), independently of the server's sources, so the tests check the
server against the spec and not against itself.

Every socket operation has a timeout: a misbehaving server makes a test fail,
never hang.
"""

import socket
import struct
import time

# ---- Handshake ----
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FIXED_NEWSTYLE = 1 << 0
CLIENT_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9
REP_ERR_EXT_HEADER_REQD = REP_ERR | 10

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# ---- Transmission flags ----
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# ---- Requests and replies ----
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STATE_HOLE = 1
STATE_ZERO = 2

DEFAULT_TIMEOUT = 10.0


class ProtocolError(AssertionError):
    """The server sent something the spec does not allow here."""


class Closed(AssertionError):
    """The server closed the connection when the test did not expect it."""


class OptReply:
    def __init__(self, opt, rtype, data):
        self.opt = opt
        self.type = rtype
        self.data = data

    @property
    def is_error(self):
        return bool(self.type & REP_ERR)

    def __repr__(self):
        return f"OptReply(opt={self.opt}, type={self.type:#x}, len={len(self.data)})"


class Chunk:
    """One reply from the server: a simple reply, or one structured or
    extended chunk. `error` is set for simple replies and error chunks."""

    def __init__(self, kind, cookie, flags=0, rtype=0, error=0, payload=b"",
                 offset=None, message=""):
        self.kind = kind  # "simple", "structured" or "extended"
        self.cookie = cookie
        self.flags = flags
        self.type = rtype
        self.error = error
        self.payload = payload
        self.offset = offset  # only extended headers carry one
        self.message = message

    @property
    def done(self):
        return self.kind == "simple" or bool(self.flags & REPLY_FLAG_DONE)

    def __repr__(self):
        return (f"Chunk({self.kind}, cookie={self.cookie}, flags={self.flags}, "
                f"type={self.type}, error={self.error}, len={len(self.payload)}, "
                f"message={self.message!r})")


class Reply:
    """All chunks of the reply to one request, with the data and extents
    gathered from them."""

    def __init__(self, cookie, chunks):
        self.cookie = cookie
        self.chunks = chunks

    @property
    def error(self):
        for c in self.chunks:
            if c.error:
                return c.error
        return 0

    @property
    def messages(self):
        return [c.message for c in self.chunks if c.message]


def request_bytes(cmd, offset=0, length=0, flags=0, cookie=1, extended=False, magic=None):
    """A compact (28-byte) or extended (32-byte) request header."""
    if extended:
        return struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC if magic is None else magic,
                           flags, cmd, cookie, offset, length)
    return struct.pack(">IHHQQI", REQUEST_MAGIC if magic is None else magic,
                       flags, cmd, cookie, offset, length)


def option_bytes(opt, data=b"", length=None, magic=IHAVEOPT):
    return struct.pack(">QII", magic, opt, len(data) if length is None else length) + data


class RawClient:
    """A raw NBD connection. The methods follow the protocol steps; the
    tests combine them, so they can also send things a real client never
    would."""

    def __init__(self, address, timeout=DEFAULT_TIMEOUT, connect=True, source=None):
        self.address = address
        self.source = source  # a local address to connect from (TCP only)
        self.timeout = timeout
        self.sock = None
        self.structured = False
        self.extended = False
        self.handshake_flags = None
        self.export_size = None
        self.transmission_flags = None
        self.block_size = None
        self.meta_contexts = {}
        self._cookie = 0
        if connect:
            self.connect()

    # ---- socket plumbing ----
    def connect(self):
        if isinstance(self.address, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            s.connect(self.address)
        else:
            s = socket.create_connection(
                self.address, timeout=self.timeout,
                source_address=(self.source, 0) if self.source else None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(self.timeout)
        self.sock = s
        return self

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                part = self.sock.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError as e:
                raise Closed(f"connection reset after {len(buf)}/{n} bytes") from e
            if not part:
                raise Closed(f"server closed the connection after {len(buf)}/{n} bytes")
            buf += part
        return bytes(buf)

    def wait_closed(self, timeout=5.0):
        """Reads and discards until the server closes the connection.
        Returns the seconds it took; fails if the connection is still open
        after `timeout` seconds."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"server did not close the connection within {timeout} s")
            self.sock.settimeout(left)
            try:
                part = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
            if not part:
                break
        self.sock.settimeout(self.timeout)
        return time.monotonic() - start

    def assert_open(self, wait=0.3):
        """Asserts that the server has neither closed the connection nor sent
        anything within `wait` seconds."""
        self.sock.settimeout(wait)
        try:
            part = self.sock.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            part = None
        except ConnectionResetError:
            part = b""
        finally:
            self.sock.settimeout(self.timeout)
        assert part is None, ("server closed the connection" if part == b""
                              else f"unexpected data from server: {part!r}")

    # ---- handshake ----
    def greeting(self):
        """Reads the server's newstyle greeting; returns the handshake flags."""
        magic, optmagic, hflags = struct.unpack(">QQH", self.recv_exact(18))
        if magic != NBDMAGIC:
            raise ProtocolError(f"bad NBDMAGIC {magic:#x}")
        if optmagic != IHAVEOPT:
            raise ProtocolError(f"server is not newstyle (magic {optmagic:#x})")
        self.handshake_flags = hflags
        return hflags

    def send_client_flags(self, flags=CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES):
        self.client_flags = flags
        self.send(struct.pack(">I", flags))

    def handshake(self, flags=CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES):
        hflags = self.greeting()
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("server does not offer fixed newstyle")
        self.send_client_flags(flags)
        return hflags

    def send_option(self, opt, data=b"", length=None, magic=IHAVEOPT):
        self.send(option_bytes(opt, data, length, magic))

    def recv_option_reply(self, expect_opt=None):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != OPT_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        if expect_opt is not None and opt != expect_opt:
            raise ProtocolError(f"option reply for {opt}, expected {expect_opt}")
        data = self.recv_exact(length) if length else b""
        return OptReply(opt, rtype, data)

    def option(self, opt, data=b""):
        """Sends an option that gets exactly one reply; returns it."""
        self.send_option(opt, data)
        return self.recv_option_reply(opt)

    def option_replies(self, opt, data=b""):
        """Sends an option and collects replies up to the final one (an ACK
        or an error). Returns the list, the final one last."""
        self.send_option(opt, data)
        replies = []
        while True:
            r = self.recv_option_reply(opt)
            replies.append(r)
            if r.type == REP_ACK or r.is_error:
                return replies

    def opt_structured_reply(self):
        r = self.option(OPT_STRUCTURED_REPLY)
        if r.type == REP_ACK:
            self.structured = True
        return r

    def opt_extended_headers(self):
        r = self.option(OPT_EXTENDED_HEADERS)
        if r.type == REP_ACK:
            self.extended = True
            self.structured = True
        return r

    def opt_set_meta_context(self, name, contexts=("base:allocation",),
                             opt=OPT_SET_META_CONTEXT):
        data = struct.pack(">I", len(name)) + name.encode()
        data += struct.pack(">I", len(contexts))
        for c in contexts:
            data += struct.pack(">I", len(c)) + c.encode()
        replies = self.option_replies(opt, data)
        found = {}
        for r in replies:
            if r.type == REP_META_CONTEXT:
                (cid,) = struct.unpack(">I", r.data[:4])
                found[r.data[4:].decode()] = cid
        if opt == OPT_SET_META_CONTEXT and replies[-1].type == REP_ACK:
            self.meta_contexts = found
        return replies, found

    @staticmethod
    def go_data(name, infos=(INFO_BLOCK_SIZE,)):
        name_b = name.encode() if isinstance(name, str) else name
        data = struct.pack(">I", len(name_b)) + name_b
        data += struct.pack(">H", len(infos))
        for i in infos:
            data += struct.pack(">H", i)
        return data

    def opt_go(self, name, infos=(INFO_BLOCK_SIZE,), opt=OPT_GO, check=True):
        """NBD_OPT_GO (or INFO). Returns the list of replies. With check, fails
        unless it ended in ACK, and records size/flags/block sizes."""
        replies = self.option_replies(opt, self.go_data(name, infos))
        for r in replies:
            if r.type == REP_INFO:
                (itype,) = struct.unpack(">H", r.data[:2])
                if itype == INFO_EXPORT:
                    self.export_size, self.transmission_flags = struct.unpack(">QH", r.data[2:12])
                elif itype == INFO_BLOCK_SIZE:
                    self.block_size = struct.unpack(">III", r.data[2:14])
        if check:
            final = replies[-1]
            assert final.type == REP_ACK, f"GO/INFO for {name!r} failed: {final!r} {final.data!r}"
            assert self.export_size is not None, "server did not send NBD_INFO_EXPORT"
        return replies

    def opt_starttls(self, data=b"", then=b""):
        """NBD_OPT_STARTTLS, with `then` appended in the same send() (bytes a
        client would wrongly send in plaintext after it). Returns the reply;
        after an ACK everything on the socket is the TLS stream."""
        self.send(option_bytes(OPT_STARTTLS, data) + then)
        return self.recv_option_reply(OPT_STARTTLS)

    def recv_some(self, timeout=5.0):
        """The next bytes the server sends (up to 64 KiB), or b"" once it has
        closed (or reset) the connection."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        finally:
            self.sock.settimeout(self.timeout)

    def opt_export_name(self, name):
        """NBD_OPT_EXPORT_NAME: no reply on failure, the server closes."""
        self.send_option(OPT_EXPORT_NAME, name.encode())
        self.export_size, self.transmission_flags = struct.unpack(">QH", self.recv_exact(10))
        if not self.client_flags & CLIENT_NO_ZEROES:
            self.recv_exact(124)

    def connect_export(self, name, structured=True, extended=False, meta=False):
        """Handshake, optional structured/extended/meta context, then GO."""
        self.handshake()
        if extended:
            r = self.opt_extended_headers()
            assert r.type == REP_ACK, f"extended headers refused: {r!r}"
        elif structured:
            r = self.opt_structured_reply()
            assert r.type == REP_ACK, f"structured replies refused: {r!r}"
        if meta:
            replies, found = self.opt_set_meta_context(name)
            assert "base:allocation" in found, f"no base:allocation: {replies!r}"
        self.opt_go(name)
        return self

    # ---- transmission ----
    def next_cookie(self):
        self._cookie += 1
        return self._cookie

    def request_bytes(self, cmd, offset=0, length=0, flags=0, cookie=None,
                      extended=None, magic=None):
        if cookie is None:
            cookie = self.next_cookie()
        if extended is None:
            extended = self.extended
        return request_bytes(cmd, offset, length, flags, cookie, extended, magic)

    def send_request(self, cmd, offset=0, length=0, flags=0, payload=b"",
                     cookie=None, extended=None, magic=None):
        """Sends one request (with its payload); returns its cookie."""
        if cookie is None:
            cookie = self.next_cookie()
        self.send(self.request_bytes(cmd, offset, length, flags, cookie, extended, magic) + payload)
        return cookie

    def recv_chunk(self, read_lengths=None):
        """Reads one reply or chunk. For a simple reply to a successful read
        the data length is not on the wire: `read_lengths` maps cookies of
        outstanding reads to their lengths."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            if self.structured:
                # Allowed for non-read commands only; the caller checks.
                pass
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            payload = b""
            if error == 0 and read_lengths and cookie in read_lengths:
                payload = self.recv_exact(read_lengths[cookie])
            return Chunk("simple", cookie, error=error, payload=payload)
        if magic == STRUCTURED_REPLY_MAGIC:
            if self.extended:
                raise ProtocolError("compact structured reply after extended headers")
            if not self.structured:
                raise ProtocolError("structured reply that was not negotiated")
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            offset = None
            kind = "structured"
        elif magic == EXT_REPLY_MAGIC:
            if not self.extended:
                raise ProtocolError("extended reply that was not negotiated")
            flags, rtype, cookie, offset, length = struct.unpack(">HHQQQ", self.recv_exact(28))
            kind = "extended"
        else:
            raise ProtocolError(f"bad reply magic {magic:#x}")
        if length > 64 << 20:
            raise ProtocolError(f"reply payload of {length} bytes")
        payload = self.recv_exact(length) if length else b""
        chunk = Chunk(kind, cookie, flags=flags, rtype=rtype, payload=payload, offset=offset)
        if rtype in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET):
            if len(payload) < 6:
                raise ProtocolError(f"short error chunk {payload!r}")
            chunk.error, mlen = struct.unpack(">IH", payload[:6])
            chunk.message = payload[6:6 + mlen].decode(errors="replace")
            if chunk.error == 0:
                raise ProtocolError("error chunk with error 0")
        elif rtype & (1 << 15):
            raise ProtocolError(f"unknown error chunk type {rtype:#x}")
        return chunk

    def recv_reply(self, cookie=None, read_lengths=None):
        """Reads chunks until one with DONE (or a simple reply). All chunks
        must belong to `cookie` when given (one request in flight)."""
        chunks = []
        while True:
            c = self.recv_chunk(read_lengths)
            if cookie is not None and c.cookie != cookie:
                raise ProtocolError(f"reply for cookie {c.cookie}, expected {cookie}")
            chunks.append(c)
            if c.done:
                return Reply(c.cookie, chunks)

    def command(self, cmd, offset=0, length=0, flags=0, payload=b""):
        cookie = self.send_request(cmd, offset, length, flags, payload)
        lengths = {cookie: length} if cmd == CMD_READ else None
        return self.recv_reply(cookie, lengths)

    def read(self, offset, length, flags=0):
        """Returns (error, data, reply). Data is assembled from OFFSET_DATA and
        OFFSET_HOLE chunks and checked to lie inside the request."""
        cookie = self.send_request(CMD_READ, offset, length, flags)
        reply = self.recv_reply(cookie, {cookie: length})
        if reply.chunks[0].kind == "simple" and self.structured:
            # proto.md: with structured replies the server MUST NOT use a
            # simple reply for NBD_CMD_READ, not even for an early EINVAL.
            raise ProtocolError("simple reply to a read with structured replies negotiated")
        if reply.error:
            return reply.error, None, reply
        if reply.chunks[0].kind == "simple":
            return 0, reply.chunks[0].payload, reply
        buf = bytearray(length)
        covered = 0
        for c in reply.chunks:
            if c.type == REPLY_TYPE_OFFSET_DATA:
                (off,) = struct.unpack(">Q", c.payload[:8])
                data = c.payload[8:]
            elif c.type == REPLY_TYPE_OFFSET_HOLE:
                off, hlen = struct.unpack(">QI", c.payload[:12])
                data = bytes(hlen)
            elif c.type == REPLY_TYPE_NONE and c.done and not c.payload:
                continue
            else:
                raise ProtocolError(f"unexpected chunk in read reply: {c!r}")
            if off < offset or off + len(data) > offset + length:
                raise ProtocolError(f"chunk {off}+{len(data)} outside request {offset}+{length}")
            buf[off - offset:off - offset + len(data)] = data
            covered += len(data)
        if covered != length:
            raise ProtocolError(f"read reply covered {covered} of {length} bytes")
        return 0, bytes(buf), reply

    def write(self, offset, data, flags=0):
        return self.command(CMD_WRITE, offset, len(data), flags, data).error

    def block_status(self, offset, length, flags=0):
        """Returns (error, {context_id: [(length, flags), ...]})."""
        reply = self.command(CMD_BLOCK_STATUS, offset, length, flags)
        if reply.error:
            return reply.error, None
        result = {}
        for c in reply.chunks:
            if c.type == REPLY_TYPE_BLOCK_STATUS:
                if self.extended:
                    raise ProtocolError("32-bit BLOCK_STATUS chunk with extended headers")
                (cid,) = struct.unpack(">I", c.payload[:4])
                body = c.payload[4:]
                assert len(body) % 8 == 0 and body, f"bad BLOCK_STATUS payload length {len(c.payload)}"
                result[cid] = [struct.unpack(">II", body[i:i + 8]) for i in range(0, len(body), 8)]
            elif c.type == REPLY_TYPE_BLOCK_STATUS_EXT:
                if not self.extended:
                    raise ProtocolError("BLOCK_STATUS_EXT chunk without extended headers")
                cid, count = struct.unpack(">II", c.payload[:8])
                body = c.payload[8:]
                assert len(body) == 16 * count and count > 0, (
                    f"BLOCK_STATUS_EXT count {count} but {len(body)} bytes of descriptors")
                result[cid] = [struct.unpack(">QQ", body[i:i + 16]) for i in range(0, len(body), 16)]
            elif c.type == REPLY_TYPE_NONE and c.done:
                continue
            else:
                raise ProtocolError(f"unexpected chunk in block status reply: {c!r}")
        return 0, result

    def disconnect(self):
        self.send_request(CMD_DISC)


def connect_export(address, name, **kw):
    """A RawClient already in transmission on export `name`."""
    timeout = kw.pop("timeout", DEFAULT_TIMEOUT)
    return RawClient(address, timeout=timeout).connect_export(name, **kw)
