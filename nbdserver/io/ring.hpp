// A thin owner of one io_uring instance, used by exactly one loop thread.
//
// Every SQE carries a user_data built by make_tag(): the kind of operation in
// the top byte, a 24-bit generation and a 32-bit slot index. The loop decodes
// it in one place and drops completions whose generation no longer matches
// the slot (a stale completion is detected, never misrouted).
#pragma once

#include <liburing.h>

#include <cstdint>
#include <string>

namespace io {

enum class Kind : uint8_t {
  kAccept = 1,
  kRecv,
  kSend,
  kFile,
  kTimer,
  kWake,
  kCancel,  // completions of cancel requests: ignored
  kFlush,   // an fdatasync shared by several requests; slot = export index, gen = descriptor k
  kSub,     // one piece of a node-view request; slot = Sub index
  kViewFlush,  // a node view's flush; slot = view slot, gen = step
  kViewLog,    // a write of a node view's map log; slot = view slot
};

inline uint64_t make_tag(Kind k, uint32_t slot, uint32_t gen) {
  return uint64_t(k) << 56 | uint64_t(gen & 0xffffff) << 32 | slot;
}
inline Kind tag_kind(uint64_t t) { return Kind(t >> 56); }
inline uint32_t tag_gen(uint64_t t) { return uint32_t(t >> 32) & 0xffffff; }
inline uint32_t tag_slot(uint64_t t) { return uint32_t(t); }

// What the running kernel offers, probed once per ring.
struct Features {
  bool single_issuer = false;
  bool coop_taskrun = false;
  bool defer_taskrun = false;
  bool fallocate = false;
  bool fadvise = false;
};

class Ring {
 public:
  Ring() = default;
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;
  ~Ring();

  // Sets the ring up with the best flags the kernel takes, falling back step
  // by step. Returns 0 or -errno; `log` receives a line per fallback.
  int init(unsigned entries, std::string* log);

  // Starts the ring; call on the thread that will submit, before sqe().
  int enable();

  // An SQE to fill in; when the SQ is full, submits to make room first.
  // Never returns nullptr.
  io_uring_sqe* sqe();

  // Submits everything queued and waits for at least `wait_nr` completions.
  int submit_and_wait(unsigned wait_nr);

  io_uring* raw() { return &ring_; }
  const Features& features() const { return features_; }

 private:
  // Completions can outnumber submissions in flight (one recv and one send
  // per connection plus every request), so the CQ is sized well above the SQ.
  static constexpr unsigned kCqEntries = 65536;
  io_uring ring_{};
  bool live_ = false;
  Features features_;
};

}  // namespace io
