// The store's audit log: one JSON line per admin change, appended to
// <store>/audit.log.
//
//   {"time":"2026-12-04T20:14:36Z","uid":0,"pid":1234,"action":"pin","detail":"n1 10.0.0.5"}
//
// Each line is written with one write() on a file opened with O_APPEND, so
// lines from concurrent writers (several admin commands, on one host) never
// interleave, then fsync()ed: the line is on disk before the command reports
// success. A line is appended after the change it records succeeded.
#pragma once

#include <string>

namespace exports {

// Appends one line for `action` (e.g. "create") with `detail` (e.g. the
// node and its image). False and *err when the log cannot be written.
bool audit(const std::string& store_root, const std::string& action, const std::string& detail,
           std::string* err);

}  // namespace exports
