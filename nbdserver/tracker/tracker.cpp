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

std::map<std::string, SwarmStats> Tracker::stats() {
  std::lock_guard<std::mutex> g(mu_);
  std::map<std::string, SwarmStats> out;
  const double t = now();
  for (const auto& [key, s] : swarms_) out.emplace(key, s->stats(t));
  return out;
}

double Tracker::now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace tracker
