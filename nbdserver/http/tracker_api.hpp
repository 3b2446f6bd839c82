// The tracker's HTTP endpoints (issue 11), JSON in and out:
//   POST /v1/tracker/IMAGE@GEN/sources  where to get chunks; registers the asker
//   POST /v1/tracker/IMAGE@GEN/report   dropped chunks, a bad peer, leaving
//   GET  /v1/tracker/IMAGE@GEN          stats
// A node may speak only for itself, and only on the generation its record
// is on; today that means the node exists in the store with that
// generation (issue 13 adds authentication). Peer addresses are the
// request's remote address with the peer_port the node gives.
#pragma once

#include <memory>

#include "exports/store.hpp"
#include "http/server.hpp"
#include "tracker/tracker.hpp"

namespace http {

inline constexpr size_t kMaxChunksPerRequest = 4096;

void add_tracker_api(httplib::Server& svr, std::shared_ptr<exports::Store> store,
                     std::shared_ptr<tracker::Tracker> tracker);

}  // namespace http
