// HTTP endpoints that describe the store, read-only:
//   GET /v1/nodes/IMAGE/NODE                   the generation a node's view is on
//   GET /v1/generations/IMAGE@GEN/chunks.sha256 the generation's chunk digests
// Names are checked with the store's rules (valid_store_name) before any
// path is made from them. Nothing here creates or opens a node's view.
#pragma once

#include <memory>
#include <string>

#include "exports/store.hpp"
#include "http/server.hpp"

namespace http {

// Splits "IMAGE@GEN" and checks both names; false and *err if it is not one.
bool parse_generation(const std::string& s, std::string* image, std::string* gen,
                      std::string* err);

// Adds the endpoints to `svr`. `store` is shared with the NBD side.
// With `tls_required`, a node's answer also carries its generation's peer
// key, sealed with the node's own key (peer_identity, peer_key_sealed).
void add_store_api(httplib::Server& svr, std::shared_ptr<exports::Store> store,
                   bool tls_required = false);

}  // namespace http
