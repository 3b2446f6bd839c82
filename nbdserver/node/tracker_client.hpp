// The node agent's side of the server's HTTP API (--http): the
// node's generation, the generation's chunk digests, and the tracker.
// Calls take turns on one kept-alive connection. Thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tls/engine.hpp"

namespace node {

struct NodeInfo {
  std::string generation;  // IMAGE@GEN
  uint64_t size = 0;
  uint32_t chunk_size = 0;
  // Under --tls require, for a node with a key: the PSK identity peers of
  // the generation use, and its key sealed with the node's own key
  // (tls/seal.hpp). Empty otherwise.
  std::string peer_identity;
  std::string peer_key_sealed;
};

class TrackerClient {
 public:
  // `host_port`: HOST:PORT of the server's HTTP API.
  TrackerClient(std::string host, int port);
  ~TrackerClient();

  // The tls tier: every POST then carries "X-Nbdroot-Auth: COUNTER MAC"
  // (http/tracker_api.hpp) under this node's key; the counter starts at
  // the clock in microseconds, grows by at least 1 per request, and moves
  // past the server's when a 401 names a higher one (a clock that went
  // back), once per request.
  void set_key(const tls::Key& key);

  // GET /v1/nodes/IMAGE/NODE.
  bool node_info(const std::string& exp, NodeInfo* out, std::string* err);
  // GET /v1/generations/IMAGE@GEN/chunks.sha256: the file's bytes.
  bool digests(const std::string& gen, std::string* out, std::string* err);
  // POST /v1/tracker/IMAGE@GEN/sources: a slot per chunk (0: the server),
  // and the addresses of the slots named. False when the tracker did not
  // answer (then ask the server).
  // `have`: chunks fetched since the last call, which peers may now be
  // sent to without waiting.
  bool sources(const std::string& gen, const std::string& node, uint16_t peer_port,
               const std::vector<uint64_t>& chunks, const std::vector<uint64_t>& have,
               std::vector<int>* slots,
               std::map<int, std::string>* peers, std::string* err);
  // GET /v1/tracker/IMAGE@GEN/order?max=N: the generation's recorded boot
  // order, its first `max` chunks (empty when none is recorded yet).
  bool order(const std::string& gen, uint64_t max, std::vector<uint64_t>* out, std::string* err);
  // POST /v1/tracker/IMAGE@GEN/report.
  bool report(const std::string& gen, const std::string& node, uint16_t peer_port,
              const std::vector<uint64_t>& dropped, const std::vector<uint64_t>& held,
              int bad_slot, bool leaving, std::string* err);
  // True once after an answer named another tracker epoch than the ones
  // before it: the server restarted, and its tracker forgot what this node
  // holds.
  bool take_new_epoch();

 private:
  struct Impl;
  // The epoch in an answer (tracker/tracker.hpp); mu_ held.
  void saw_epoch(const std::string& e);

  std::mutex mu_;
  std::unique_ptr<Impl> impl_;
  std::string epoch_;
  bool new_epoch_ = false;
};

}  // namespace node
