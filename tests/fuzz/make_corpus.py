#!/usr/bin/python3
"""Writes the seed corpora for the fuzz targets into tests/fuzz/corpus/.

Run with /usr/bin/python3 tests/fuzz/make_corpus.py; the output is checked in.
The input layouts are documented at the top of fuzz_handshake.cpp,
fuzz_handshake_tls.cpp, fuzz_transmission.cpp and fuzz_client.cpp.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- Handshake ----
OPT_MAGIC = b"IHAVEOPT"
EXPORT_NAME, ABORT, LIST, PEEK, STARTTLS, INFO, GO = 1, 2, 3, 4, 5, 6, 7
STRUCTURED, LIST_META, SET_META, EXTENDED = 8, 9, 10, 11


def opt(o, data=b""):
    return OPT_MAGIC + struct.pack(">II", o, len(data)) + data


def info(name, reqs=()):
    name = name.encode()
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs)) + b"".join(
        struct.pack(">H", r) for r in reqs)


def meta(name, queries=()):
    name = name.encode()
    d = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        q = q.encode()
        d += struct.pack(">I", len(q)) + q
    return d


def flags(f):
    return struct.pack(">I", f)


def hs(seg, cfg, *parts):
    return bytes([seg, cfg]) + b"".join(parts)


HANDSHAKE = {
    "go_plain": hs(0, 0, flags(1), opt(GO, info("disk"))),
    "go_structured_meta": hs(1, 0, flags(3), opt(STRUCTURED), opt(LIST_META, meta("disk")),
                             opt(LIST_META, meta("disk", ["qemu:"])),
                             opt(SET_META, meta("disk", ["base:allocation"])),
                             opt(INFO, info("disk", [1, 2, 3])), opt(GO, info("disk", [3]))),
    "export_name_no_zeroes": hs(5, 0, flags(3), opt(EXPORT_NAME, b"ro")),
    "export_name_default": hs(0x83, 0, flags(1), opt(EXPORT_NAME)),
    "list_tls_unknown_abort": hs(0x91, 0, flags(1), opt(LIST), opt(STARTTLS), opt(PEEK),
                                 opt(99, b"some data"), opt(ABORT)),
    "extended_then_go": hs(7, 0, flags(1), opt(EXTENDED), opt(STRUCTURED),
                           opt(SET_META, meta("disk", ["qemu:dirty-bitmap:x", "base:allocation"])),
                           opt(GO, info("disk", [1])),
                           struct.pack(">IHHQQQ", 0x21e41c71, 0, 0, 1, 0, 512)),
    "too_big_tiny_limits": hs(3, 2, flags(1), opt(INFO, b"\0" * 100), opt(LIST),
                              OPT_MAGIC + struct.pack(">II", LIST, 300)),
    "shutting_down": hs(2, 1, flags(1), opt(LIST), opt(GO, info("disk")), opt(ABORT)),
    "malformed_info_meta": hs(0x85, 0, flags(1),
                              opt(INFO, struct.pack(">I", 50) + b"disk" + b"\0\0"),
                              opt(INFO, info("disk") + b"\0"),
                              opt(GO, info("di\0sk")),
                              opt(LIST_META, meta("disk") + b"x"),
                              opt(SET_META, meta("disk", ["base:allocation"])),
                              opt(STRUCTURED, b"x"), opt(STRUCTURED), opt(STRUCTURED),
                              opt(GO, info("nope")), opt(GO, info("ro"))),
    "bad_flags": hs(0, 0, flags(0x80)),
    "bad_option_magic": hs(0, 0, flags(1), b"IHAVEOPX" + struct.pack(">II", LIST, 0)),
    # cfg bit 2: the segmented run defers attaches and descriptions.
    "deferred_meta_info_go": hs(3, 4, flags(3), opt(STRUCTURED), opt(LIST_META, meta("disk")),
                                opt(SET_META, meta("disk", ["qemu:dirty-bitmap:x", "base:"])),
                                opt(INFO, info("nope", [1])), opt(INFO, info("disk", [1, 2])),
                                opt(GO, info("disk", [2])),
                                struct.pack(">IHHQI", 0x25609513, 0, 0, 1, 0)),
    "deferred_export_name": hs(1, 4, flags(1), opt(GO, info("nope")), opt(EXPORT_NAME, b"ro"),
                               b"trailing"),
    "deferred_shutting_down": hs(0x82, 5, flags(1), opt(INFO, info("disk")),
                                 opt(GO, info("disk")), opt(EXPORT_NAME, b"disk")),
}

# The same layout, for a server that requires TLS (fuzz_handshake_tls).
TLS_BEFORE = opt(LIST) + opt(INFO, info("disk", [1, 2])) + opt(GO, info("disk")) + opt(STRUCTURED) \
    + opt(EXTENDED) + opt(SET_META, meta("disk", ["base:allocation"])) + opt(99, opt(ABORT))
HANDSHAKE_TLS = {
    "refused_then_tls_go": hs(0x87, 0, flags(3), TLS_BEFORE, opt(STARTTLS), opt(STRUCTURED),
                              opt(SET_META, meta("lab/node-a", ["base:allocation"])),
                              opt(GO, info("lab/node-a", [1]))),
    "starttls_data_twice": hs(3, 0, flags(1), opt(STARTTLS, b"x"), opt(STARTTLS), opt(STARTTLS),
                              opt(LIST), opt(ABORT)),
    "export_name_before_tls": hs(0, 0, flags(3), opt(LIST), opt(EXPORT_NAME, b"disk")),
    "export_name_after_tls": hs(1, 0, flags(3), opt(STARTTLS), opt(EXPORT_NAME, b"lab/node-a")),
    "starttls_trailing_bytes": hs(0, 0, flags(1), opt(STARTTLS) + opt(INFO, info("disk"))[:10],
                                  opt(GO, info("disk"))),
    "tiny_limits_skip": hs(5, 2, flags(1), opt(INFO, b"\0" * 100), opt(STARTTLS, b"s" * 100),
                           opt(STARTTLS), opt(LIST), opt(INFO, b"\0" * 100)),
    "shutting_down": hs(2, 1, flags(1), opt(LIST), opt(STARTTLS), opt(ABORT)),
    "no_fixed_newstyle": hs(0, 0, flags(0), opt(STARTTLS)),
}

# ---- Transmission ----
REQ_MAGIC, EXT_REQ_MAGIC = 0x25609513, 0x21e41c71
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = 1, 2, 4, 8, 16, 32


def req(typ, off, length, fl=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, fl, typ, cookie, off, length) + payload


def ereq(typ, off, length, fl=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQQ", EXT_REQ_MAGIC, fl, typ, cookie, off, length) + payload


SIMPLE, STRUCT, EXT = 0, 1, 2
RO, NO_CTX, HUGE, MINIMAL = 4, 8, 16, 32
MiB = 1 << 20
WRAP = (1 << 64) - 512

TRANSMISSION = {
    "simple_rw": bytes([SIMPLE]) + req(READ, 0, 4096) + req(WRITE, 512, 8, cookie=2, payload=b"A" * 8)
    + req(FLUSH, 0, 0, cookie=3) + req(TRIM, 0, 4096, FUA) + req(WZ, 4096, 4096, NO_HOLE | FAST_ZERO)
    + req(CACHE, 0, MiB) + req(DISC, 0, 0),
    "structured_df_bs": bytes([STRUCT]) + req(READ, 0, 65536, DF) + req(BS, 0, MiB, REQ_ONE)
    + req(BS, 0, 0) + req(READ, MiB - 512, 1024) + req(WRITE, MiB, 4, payload=b"zzzz") + req(9, 0, 0),
    "extended_payload_len": bytes([EXT]) + ereq(WRITE, 0, 16, PAYLOAD_LEN, payload=b"B" * 16)
    + ereq(BS, 0, 1 << 33) + ereq(BS, 0, 4, PAYLOAD_LEN, payload=b"\0\0\0\1") + ereq(READ, 0, 1 << 17)
    + ereq(FLUSH, 1, 0),
    "read_only": bytes([STRUCT | RO]) + req(WRITE, 0, 4, payload=b"1234") + req(TRIM, 0, 1)
    + req(WZ, 0, 1) + req(READ, 0, 1),
    "huge_wraparound": bytes([EXT | HUGE]) + ereq(READ, WRAP, 1024) + ereq(WZ, WRAP, 1024)
    + ereq(TRIM, WRAP, 511) + ereq(CACHE, 1, (1 << 64) - 1),
    "minimal_no_ctx": bytes([STRUCT | NO_CTX | MINIMAL]) + req(FLUSH, 0, 0) + req(TRIM, 0, 1)
    + req(BS, 0, 512) + req(READ, 0, 512, FUA),
    "bad_magic_tail": bytes([SIMPLE]) + req(READ, 0, 512) + b"\x13\x95\x60\x25" + b"\0" * 24,
}

# ---- Client (a server's bytes) ----
OPT_REPLY_MAGIC = struct.pack(">Q", 0x3E889045565A9)
ACK, REP_INFO, REP_META, ERR_UNSUP, ERR_UNKNOWN = 1, 3, 4, 0x80000001, 0x80000006
GREETING = b"NBDMAGIC" + OPT_MAGIC + struct.pack(">H", 3)
CLIENT_HS, CLIENT_READER, CLIENT_STRUCT = 0, 1, 2


def rep(o, typ, data=b""):
    return OPT_REPLY_MAGIC + struct.pack(">III", o, typ, len(data)) + data


def sel(mode, step):
    return bytes([mode | (step - 1) << 2])


def chunk(fl, typ, cookie, payload):
    return struct.pack(">IHHQI", 0x668E33EF, fl, typ, cookie, len(payload)) + payload


def simple(cookie, err=0):
    return struct.pack(">IIQ", 0x67446698, err, cookie)


GO_OK = rep(GO, REP_INFO, struct.pack(">HQH", 0, 1 << 20, 1)) + rep(
    GO, REP_INFO, struct.pack(">HIII", 3, 512, 4096, 1 << 20)) + rep(GO, ACK)
CLIENT = {
    "hs_full": sel(CLIENT_HS | CLIENT_STRUCT, 64) + GREETING + rep(STRUCTURED, ACK)
    + rep(SET_META, REP_META, struct.pack(">I", 1) + b"base:allocation")
    + rep(SET_META, REP_META, struct.pack(">I", 2) + b"nbdroot:dirty") + rep(SET_META, ACK) + GO_OK,
    "hs_unsup": sel(CLIENT_HS | CLIENT_STRUCT, 3) + GREETING + rep(STRUCTURED, ERR_UNSUP) + GO_OK,
    "hs_simple": sel(CLIENT_HS, 1) + GREETING + GO_OK,
    "hs_refused": sel(CLIENT_HS | CLIENT_STRUCT, 20) + GREETING + rep(STRUCTURED, ACK)
    + rep(SET_META, ERR_UNKNOWN, b"unknown export 'disk'"),
    "reader_simple": sel(CLIENT_READER, 7) + simple(6) + simple(5) + simple(2) + b"B" * 16
    + simple(1, 5),
    "reader_structured": sel(CLIENT_READER | CLIENT_STRUCT, 13)
    + chunk(0, 1, 1, struct.pack(">Q", 32) + b"D" * 32) + chunk(0, 2, 1, struct.pack(">QI", 0, 32))
    + chunk(1, 0, 1, b"") + chunk(1, 1, 2, struct.pack(">Q", 4096) + b"E" * 16)
    + chunk(1, 5, 3, struct.pack(">III", 1, 4096, 3))
    + chunk(0, 5, 4, struct.pack(">IIIII", 1, 4096, 0, 8192, 1))
    + chunk(1, 5, 4, struct.pack(">III", 2, 1 << 20, 0))
    + chunk(1, 0x8001, 5, struct.pack(">IH", 5, 4) + b"oops") + simple(6),
}


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in sorted(seeds.items()):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    write("fuzz_handshake", HANDSHAKE)
    write("fuzz_handshake_tls", HANDSHAKE_TLS)
    write("fuzz_transmission", TRANSMISSION)
    write("fuzz_client", CLIENT)
