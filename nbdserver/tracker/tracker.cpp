#include "tracker/tracker.hpp"

namespace tracker {

bool Tracker::with_existing(const std::string& generation,
                            const std::function<void(Swarm&, double)>& fn) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = swarms_.find(generation);
  if (it == swarms_.end()) return false;
  fn(*it->second, now());
  return true;
}

double Tracker::now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace tracker
