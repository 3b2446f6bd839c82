// Small files replaced whole and durably: written to a temporary name in
// the same directory, fsynced, renamed over the old one, and the directory
// fsynced, so that after a crash a reader finds the old text or the new
// one, never a torn or empty file.
#pragma once

#include <sys/types.h>

#include <string>

namespace storage {

// Replaces `path` with `text` as above. The temporary file is created
// afresh (O_EXCL) with `mode` (less the umask), so the new file never had
// a wider one: 0600 for secrets. False and *err ("PATH: cannot write:
// ...") on any failure; the temporary file is removed then.
bool write_file_durable(const std::string& path, const std::string& text, std::string* err,
                        mode_t mode = 0640);

// fsync() of a directory, after entries in it were created or renamed.
bool sync_dir(const std::string& dir, std::string* err);

// Reads a whole file, refusing one over `max` bytes. False and *err (with
// *err_no = errno, or EFBIG when too large) on failure.
bool read_small_file(const std::string& path, size_t max, std::string* out, std::string* err,
                     int* err_no = nullptr);

// A lock file, created with `mode` if missing (never through a symbolic
// link), flock()ed exclusively for the object's lifetime. When it cannot be
// opened or locked, ok() is false with *err (and *err_no = errno).
class FileLock {
 public:
  FileLock(const std::string& path, mode_t mode, std::string* err, int* err_no = nullptr);
  ~FileLock();
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  bool ok() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

}  // namespace storage
