#include "io/ring.hpp"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <sys/syscall.h>
#include <unistd.h>

namespace io {

Ring::~Ring() {
  if (live_) io_uring_queue_exit(&ring_);
}

int Ring::init(unsigned entries, std::string* log) {
  struct Attempt {
    unsigned flags;
    const char* what;
  };
  const Attempt attempts[] = {
      {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, "single issuer, deferred task run"},
      {IORING_SETUP_COOP_TASKRUN, "cooperative task run"},
      {0, "plain"},
  };
  int ret = -EINVAL;
  for (const Attempt& a : attempts) {
    io_uring_params p{};
    // Created disabled: enable() runs on the loop thread, which then becomes
    // the single issuer the kernel expects.
    p.flags = a.flags | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_R_DISABLED | IORING_SETUP_CQSIZE;
    p.cq_entries = kCqEntries;
    ret = io_uring_queue_init_params(entries, &ring_, &p);
    if (ret == -EINVAL) {  // SUBMIT_ALL needs 5.18; try without it
      p = {};
      p.flags = a.flags | IORING_SETUP_R_DISABLED | IORING_SETUP_CQSIZE;
      p.cq_entries = kCqEntries;
      ret = io_uring_queue_init_params(entries, &ring_, &p);
    }
    if (ret == 0) {
      features_.single_issuer = a.flags & IORING_SETUP_SINGLE_ISSUER;
      features_.defer_taskrun = a.flags & IORING_SETUP_DEFER_TASKRUN;
      features_.coop_taskrun = a.flags & IORING_SETUP_COOP_TASKRUN;
      if (a.flags == 0 && log) *log += "io_uring: kernel refused task-run flags, using a plain ring; ";
      break;
    }
    if (log) *log += std::string("io_uring: setup (") + a.what + ") failed: " + strerror(-ret) + "; ";
  }
  if (ret < 0) return ret;
  live_ = true;
  if (io_uring_probe* probe = io_uring_get_probe_ring(&ring_)) {
    features_.fallocate = io_uring_opcode_supported(probe, IORING_OP_FALLOCATE);
    features_.fadvise = io_uring_opcode_supported(probe, IORING_OP_FADVISE);
    io_uring_free_probe(probe);
  }
  return 0;
}

int Ring::enable() {
  // liburing 2.3 has no wrapper for this registration.
  long r = syscall(__NR_io_uring_register, ring_.ring_fd, IORING_REGISTER_ENABLE_RINGS, nullptr, 0);
  return r < 0 ? -errno : 0;
}

io_uring_sqe* Ring::sqe() {
  for (;;) {
    if (io_uring_sqe* s = io_uring_get_sqe(&ring_)) return s;
    int ret = io_uring_submit(&ring_);  // SQ full: flush it and retry
    if (ret < 0 && ret != -EINTR && ret != -EAGAIN) {
      // Nothing can make room any more; spinning here would hang the loop.
      fprintf(stderr, "io_uring_submit failed with a full queue: %s\n", strerror(-ret));
      abort();
    }
  }
}

int Ring::submit_and_wait(unsigned wait_nr) {
  int ret;
  do {
    ret = io_uring_submit_and_wait(&ring_, wait_nr);
  } while (ret == -EINTR);
  return ret;
}

}  // namespace io
