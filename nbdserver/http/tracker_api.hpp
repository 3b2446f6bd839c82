// The tracker's HTTP endpoints (issue 11), JSON in and out:
//   POST /v1/tracker/IMAGE@GEN/sources  where to get chunks; registers the asker
//   POST /v1/tracker/IMAGE@GEN/report   dropped chunks, a bad peer, leaving
//   GET  /v1/tracker/IMAGE@GEN          stats
//   GET  /v1/tracker/IMAGE@GEN/order    the generation's boot order
// A node may speak only for itself, and only on the generation its record
// is on: the node exists in the store with that generation. Under --tls
// require (`tls_required`) a POST must also prove it comes from the node:
// header "X-Nbdroot-Auth: COUNTER MAC", MAC = tls::request_mac(the node's
// key, "POST", target, COUNTER, body), COUNTER above the last one the
// server took from that node (kept in memory; a 401 answer carries it as
// "counter" so a node whose clock went back can move past it). Peer
// addresses are the request's remote address with the peer_port the node
// gives.
#pragma once

#include <memory>

#include "exports/store.hpp"
#include "http/server.hpp"
#include "tracker/tracker.hpp"

namespace http {

inline constexpr size_t kMaxChunksPerRequest = 4096;

void add_tracker_api(httplib::Server& svr, std::shared_ptr<exports::Store> store,
                     std::shared_ptr<tracker::Tracker> tracker, bool tls_required = false);

}  // namespace http
