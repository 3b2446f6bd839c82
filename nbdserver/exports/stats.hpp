// Counters of the NBD side, for GET /metrics and GET /status
// (http/status_api.hpp): per node, and for the whole server.
//
// Writers are the event loops; readers are the HTTP threads. Every counter
// is a relaxed atomic: a loop's cost is one atomic add where it counts (a
// request's reply, an attach, a connection), never a lock. A node's
// counters are made at its first attach in this process (Registry::lookup
// of IMAGE/NODE) and live until the process exits, so a pointer to them
// stays valid; they start at zero with each server start.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace exports {

struct NodeCounters {
  std::atomic<uint64_t> read_bytes{0};     // READ replies sent with data
  std::atomic<uint64_t> written_bytes{0};  // WRITE payloads acknowledged
  std::atomic<uint64_t> errors{0};         // error replies to the node's requests
  // Attaches without ?resume that found no other connection of the node
  // attached: the node (re)booted.
  std::atomic<uint64_t> boots{0};
  std::atomic<int64_t> connections{0};  // attached now
  // Bytes in the node's layer (dirty blocks * block size), published by
  // the loop that owns the view at attach and every tick while attached;
  // -1 when not attached (read the disk then).
  std::atomic<int64_t> dirty_bytes{-1};
  std::atomic<int64_t> last_attach{0};  // unix seconds of the last attach or detach
};

struct ServerCounters {
  std::atomic<uint64_t> connections_total{0};   // accepted (not refused)
  std::atomic<int64_t> connections_open{0};
  std::atomic<uint64_t> refused{0};             // over --max-connections
  std::atomic<uint64_t> handshake_failures{0};  // refused or timed-out handshakes
  std::atomic<uint64_t> option_errors{0};       // option error replies (unknown export, ...)
  std::atomic<uint64_t> error_replies{0};       // every export, node views included
  std::atomic<uint64_t> connection_errors{0};   // connections closed on an error
};

class Stats {
 public:
  // The node's counters, made on first use. Any thread.
  std::shared_ptr<NodeCounters> node(const std::string& id);
  // Every node with counters, sorted by id. Any thread.
  std::vector<std::pair<std::string, std::shared_ptr<const NodeCounters>>> nodes() const;
  ServerCounters& server() { return server_; }
  const ServerCounters& server() const { return server_; }

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<NodeCounters>> nodes_;
  ServerCounters server_;
};

// Adds relaxed, the way every writer of these counters does.
template <typename T>
inline void bump(std::atomic<T>& c, std::type_identity_t<T> n = 1) {
  c.fetch_add(n, std::memory_order_relaxed);
}

}  // namespace exports
