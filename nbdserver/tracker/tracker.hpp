// The tracker: one Swarm per generation that nodes ask about, made on
// first use, behind one mutex (any HTTP thread may call). No HTTP here.
//
// Boot orders outlive the process: with an `order_dir`, each swarm's
// order is read from `<order_dir>/IMAGE@GEN.order` when the swarm is made,
// and save_orders() writes the orders that grew since (durably: a crash
// leaves the old file or the new one). A file that cannot be read or does
// not parse is logged and ignored: the order is a hint, and the next boot
// records a new one. Format: a line "nbdroot.boot-order/1 CHUNKS", then
// chunk numbers separated by white space.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tracker/swarm.hpp"

namespace tracker {

class Tracker {
 public:
  // `order_dir` "": boot orders are kept in memory only.
  explicit Tracker(SwarmLimits limits, std::string order_dir = "");
  ~Tracker();
  const SwarmLimits& limits() const { return limits_; }
  // Names this tracker's life: random, made at construction. Answers carry
  // it, so that a node sees when the tracker restarted (and forgot what
  // the node holds) and reports its holdings again.
  const std::string& epoch() const { return epoch_; }

  // Runs fn on the swarm of `generation` ("IMAGE@GEN", `chunks` chunks
  // long), creating it if needed, under the lock, with the current time.
  template <typename Fn>
  auto with(const std::string& generation, uint64_t chunks, Fn&& fn) {
    std::lock_guard<std::mutex> g(mu_);
    return fn(swarm_locked(generation, chunks), now());
  }
  // Runs fn on the swarm of `generation` if there is one; false if not.
  bool with_existing(const std::string& generation,
                     const std::function<void(Swarm&, double)>& fn);

  // Every swarm's stats, by generation ("IMAGE@GEN").
  std::map<std::string, SwarmStats> stats();

  // Writes the boot order of every swarm whose order grew since it was
  // last read or written. Returns how many files were written; failures
  // are logged (and tried again next time).
  size_t save_orders();
  // Calls save_orders() every `interval` on a thread of its own, and once
  // more at stop_saving() (or destruction).
  void start_saving(std::chrono::milliseconds interval);
  void stop_saving();

  // The order file's text, and its parse: false with *err when `text` is
  // not an order of a generation of `chunks` chunks.
  static std::string format_order(uint64_t chunks, const std::vector<uint32_t>& order);
  static bool parse_order(const std::string& text, uint64_t chunks, std::vector<uint32_t>* out,
                          std::string* err);

  // Seconds on the monotonic clock.
  static double now();

 private:
  struct Entry {
    std::unique_ptr<Swarm> swarm;
    size_t saved = 0;  // order length on disk
  };
  Swarm& swarm_locked(const std::string& generation, uint64_t chunks);
  std::string order_path(const std::string& generation) const;

  SwarmLimits limits_;
  std::string epoch_;
  std::string order_dir_;
  std::mutex mu_;
  std::map<std::string, Entry> swarms_;

  std::mutex save_mu_;  // one save_orders() at a time; taken before mu_
  std::mutex saver_mu_;
  std::condition_variable saver_cv_;
  bool saver_stop_ = false;
  std::thread saver_;
};

}  // namespace tracker
