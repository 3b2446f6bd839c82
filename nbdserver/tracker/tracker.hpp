// The tracker: one Swarm per generation that nodes ask about, made on
// first use, behind one mutex (any HTTP thread may call). No HTTP here.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "tracker/swarm.hpp"

namespace tracker {

class Tracker {
 public:
  explicit Tracker(SwarmLimits limits) : limits_(limits) {}
  const SwarmLimits& limits() const { return limits_; }

  // Runs fn on the swarm of `generation` ("IMAGE@GEN", `chunks` chunks
  // long), creating it if needed, under the lock, with the current time.
  template <typename Fn>
  auto with(const std::string& generation, uint64_t chunks, Fn&& fn) {
    std::lock_guard<std::mutex> g(mu_);
    auto& s = swarms_[generation];
    if (!s) s = std::make_unique<Swarm>(chunks, limits_);
    return fn(*s, now());
  }
  // Runs fn on the swarm of `generation` if there is one; false if not.
  bool with_existing(const std::string& generation,
                     const std::function<void(Swarm&, double)>& fn);

  // Every swarm's stats, by generation ("IMAGE@GEN").
  std::map<std::string, SwarmStats> stats();

  // Seconds on the monotonic clock.
  static double now();

 private:
  SwarmLimits limits_;
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<Swarm>> swarms_;
};

}  // namespace tracker
