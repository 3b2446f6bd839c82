#include "exports/stats.hpp"

namespace exports {

std::shared_ptr<NodeCounters> Stats::node(const std::string& id) {
  std::lock_guard<std::mutex> g(mu_);
  auto& p = nodes_[id];
  if (!p) p = std::make_shared<NodeCounters>();
  return p;
}

std::vector<std::pair<std::string, std::shared_ptr<const NodeCounters>>> Stats::nodes() const {
  std::lock_guard<std::mutex> g(mu_);
  return {nodes_.begin(), nodes_.end()};
}

}  // namespace exports
