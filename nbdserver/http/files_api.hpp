// Boot files over HTTP (issue 12), read-only:
//   GET|HEAD /files/IMAGE/GEN/NAME   images/IMAGE/generations/GEN/boot/NAME
//   GET|HEAD /files/boot/NAME        boot/NAME (memtest86+ and the like)
//
// Names are checked with valid_store_name before any path is made; the file
// is opened with openat(O_NOFOLLOW) under its directory and must be a
// regular file, so neither ".." nor a symlink leads out of the directory.
//
// How the bytes go out. cpp-httplib (Debian 12: 0.11.4) writes a response
// body only through send() on a user buffer: it has no sendfile() and no
// hook to reach the socket from a content provider. So each file is mapped
// (mmap, PROT_READ) once, and the mapping is handed to send() directly:
// the kernel copies from the page cache into the socket, and no read()
// copy through userspace happens. The process never touches the mapped
// bytes itself, so a file truncated in place makes send() fail with EFAULT
// (the client sees a short reply) instead of a SIGBUS.
//
// The mapping is kept per file (device, inode, size, mtime) and shared by
// every request for it; each request opens and fstat()s the file again
// and maps it anew when it has been replaced. A file replaced by rename
// while a request is in flight: that request holds the old mapping and
// finishes with the old bytes.
//
// Ranges: one range (bytes=A-B, A-, -N) gets 206 with Content-Range; one
// that starts past the end, or a suffix of 0 bytes, gets 416 with
// "Content-Range: bytes */SIZE". A request with several ranges gets the
// whole file with 200 (RFC 9110 lets a server ignore Range); so does a
// Range whose If-Range does not match. ETag and Last-Modified are sent,
// and If-None-Match with the current ETag gets 304.
#pragma once

#include <memory>

#include "exports/store.hpp"
#include "http/server.hpp"

namespace http {

// Adds the endpoints to `svr`. `store` gives the root; nothing is written.
void add_files_api(httplib::Server& svr, std::shared_ptr<exports::Store> store);

}  // namespace http
