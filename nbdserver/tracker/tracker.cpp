#include "tracker/tracker.hpp"

#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <random>
#include <sstream>

#include "storage/durable_file.hpp"

namespace tracker {

namespace {

constexpr const char* kOrderMagic = "nbdroot.boot-order/1";
// 10 digits and a separator per chunk, for the largest order of a
// generation of 2^32 chunks would be 44 GB: orders past this are refused.
constexpr size_t kOrderFileMax = 64 << 20;

}  // namespace

Tracker::Tracker(SwarmLimits limits, std::string order_dir)
    : limits_(limits), order_dir_(std::move(order_dir)) {
  std::random_device rd;
  const uint64_t r = (uint64_t(rd()) << 32) ^ rd();
  epoch_ = fmt::format("{:016x}", r);
}

Tracker::~Tracker() { stop_saving(); }

std::string Tracker::order_path(const std::string& generation) const {
  return order_dir_ + "/" + generation + ".order";
}

Swarm& Tracker::swarm_locked(const std::string& generation, uint64_t chunks) {
  Entry& e = swarms_[generation];
  if (e.swarm) return *e.swarm;
  e.swarm = std::make_unique<Swarm>(chunks, limits_);
  if (order_dir_.empty()) return *e.swarm;
  const std::string path = order_path(generation);
  std::string text, err;
  int err_no = 0;
  std::vector<uint32_t> order;
  if (!storage::read_small_file(path, kOrderFileMax, &text, &err, &err_no)) {
    if (err_no != ENOENT) spdlog::warn("tracker {}: boot order not read: {}", generation, err);
  } else if (!parse_order(text, chunks, &order, &err)) {
    spdlog::warn("tracker {}: boot order {} ignored: {}", generation, path, err);
  } else {
    e.saved = e.swarm->seed_order(order);
    spdlog::info("tracker {}: boot order of {} chunks read from {}", generation, e.saved, path);
  }
  return *e.swarm;
}

bool Tracker::with_existing(const std::string& generation,
                            const std::function<void(Swarm&, double)>& fn) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = swarms_.find(generation);
  if (it == swarms_.end()) return false;
  fn(*it->second.swarm, now());
  return true;
}

std::map<std::string, SwarmStats> Tracker::stats() {
  std::lock_guard<std::mutex> g(mu_);
  std::map<std::string, SwarmStats> out;
  const double t = now();
  for (const auto& [key, e] : swarms_) out.emplace(key, e.swarm->stats(t));
  return out;
}

std::string Tracker::format_order(uint64_t chunks, const std::vector<uint32_t>& order) {
  std::string s = std::string(kOrderMagic) + " " + std::to_string(chunks) + "\n";
  for (size_t i = 0; i < order.size(); ++i) {
    s += std::to_string(order[i]);
    s += (i % 16 == 15 || i + 1 == order.size()) ? '\n' : ' ';
  }
  return s;
}

bool Tracker::parse_order(const std::string& text, uint64_t chunks, std::vector<uint32_t>* out,
                          std::string* err) {
  std::istringstream in(text);
  std::string magic;
  uint64_t n = 0;
  if (!(in >> magic) || magic != kOrderMagic || !(in >> n)) {
    *err = std::string("not a boot order (no \"") + kOrderMagic + " CHUNKS\" line)";
    return false;
  }
  if (n != chunks) {
    *err = "an order of a generation of " + std::to_string(n) + " chunks, this one has " +
           std::to_string(chunks);
    return false;
  }
  out->clear();
  std::string word;
  while (in >> word) {
    if (word.size() > 10 || word.find_first_not_of("0123456789") != std::string::npos) {
      *err = "'" + word.substr(0, 20) + "' is not a chunk number";
      return false;
    }
    const uint64_t c = std::stoull(word);
    if (c >= chunks) {
      *err = "chunk " + word + " is out of range";
      return false;
    }
    out->push_back(static_cast<uint32_t>(c));
  }
  return true;
}

size_t Tracker::save_orders() {
  if (order_dir_.empty()) return 0;
  std::lock_guard<std::mutex> s(save_mu_);
  struct Todo {
    std::string generation;
    uint64_t chunks;
    std::vector<uint32_t> order;
  };
  std::vector<Todo> todo;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& [gen, e] : swarms_)
      if (e.swarm->order().size() > e.saved)
        todo.push_back({gen, e.swarm->chunks(), e.swarm->order()});
  }
  if (todo.empty()) return 0;
  if (mkdir(order_dir_.c_str(), 0755) != 0 && errno != EEXIST) {
    spdlog::warn("tracker: cannot make {} for boot orders: {}", order_dir_, strerror(errno));
    return 0;
  }
  size_t written = 0;
  for (const Todo& t : todo) {
    std::string err;
    if (!storage::write_file_durable(order_path(t.generation), format_order(t.chunks, t.order),
                                     &err, 0644)) {
      spdlog::warn("tracker {}: boot order not saved: {}", t.generation, err);
      continue;
    }
    ++written;
    std::lock_guard<std::mutex> g(mu_);
    auto it = swarms_.find(t.generation);
    if (it != swarms_.end()) it->second.saved = std::max(it->second.saved, t.order.size());
  }
  return written;
}

void Tracker::start_saving(std::chrono::milliseconds interval) {
  if (order_dir_.empty() || saver_.joinable()) return;
  saver_ = std::thread([this, interval] {
    std::unique_lock<std::mutex> lk(saver_mu_);
    while (!saver_stop_) {
      saver_cv_.wait_for(lk, interval);
      lk.unlock();
      save_orders();
      lk.lock();
    }
  });
}

void Tracker::stop_saving() {
  {
    std::lock_guard<std::mutex> g(saver_mu_);
    saver_stop_ = true;
  }
  saver_cv_.notify_all();
  if (saver_.joinable()) saver_.join();
  save_orders();
}

double Tracker::now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace tracker
