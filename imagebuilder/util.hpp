// Small helpers shared by the imagebuilder modules: names, hashes, time,
// and synchronous file operations with errors as values.
#pragma once

#include "status.hpp"

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ib {

// Image names and generation ids: 1-128 chars of [A-Za-z0-9._-], not "."
// or "..", never starting with '.' (those are reserved for temporaries).
bool valid_name(std::string_view s);

// 64-bit FNV-1a, optionally continuing from `h`.
uint64_t fnv1a(std::string_view data, uint64_t h = 1469598103934665603ull);

// A UUID string derived from `seed` (stable, version-4 shaped).
std::string derived_uuid(std::string_view seed);

// "20261126T070102Z" for `t` (UTC).
std::string compact_utc(int64_t t);
// "2026-11-26T07:01:02Z".
std::string iso8601_utc(int64_t t);

// "12.3 MiB"
std::string human_bytes(uint64_t n);

// Reads a whole file.
Result<std::string> read_file(const std::string& path);
// Writes `data` to path.tmp, fsyncs, renames over `path`, fsyncs the
// directory: readers see the old or the new contents, never a mix.
Status write_file_atomic(const std::string& path, std::string_view data, unsigned mode = 0644);
Status fsync_dir(const std::string& dir);
// rm -rf; a missing path is not an error.
Status remove_tree(const std::string& path);
// Names in a directory (no "." or ".."), sorted; missing directory -> empty.
std::vector<std::string> list_dir(const std::string& dir);
bool is_dir(const std::string& path);
// mkdir -p `path` (mode 0755 less umask); appends each directory it made,
// outermost first, to `made`.
Status make_dirs(const std::string& path, std::vector<std::string>* made);
bool exists(const std::string& path);
// Bytes the file occupies on disk (st_blocks * 512); 0 if missing.
uint64_t disk_usage(const std::string& path);

// Fault-injection point for tests: when $NBDROOT_IB_PAUSE_AT equals
// `stage`, the process stops itself (SIGSTOP) here, so a test can wait for
// the stop (waitpid WUNTRACED) and kill it at a known point. Otherwise, and
// after a SIGCONT, it returns at once. The stages: build.hpp.
void pause_point(const char* stage);

}  // namespace ib
