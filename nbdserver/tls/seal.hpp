// Keys for the tls tier's peer-to-peer serving.
//
// Node agents serving each other a generation's chunks authenticate with a
// key per generation, derived by the server from its store secret
// (peer_key) and handed to each node sealed with that node's own key
// (seal): the tracker's answer travels over plain HTTP, but only the node
// that holds its key can open it. So only authenticated nodes can read
// from peers, and a generation's key opens nothing else.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "tls/engine.hpp"

namespace tls {

// HMAC-SHA256(secret, "nbdroot peer key " + generation), generation being
// "IMAGE@GEN".
Key peer_key(const Key& secret, std::string_view generation);

// The PSK identity peers use for `generation`.
std::string peer_identity(std::string_view generation);

// AES-256-GCM of `payload` under `key` with a random nonce, bound to
// `context` (authenticated, not sent): hex of nonce || ciphertext || tag.
// "" on a GnuTLS failure.
std::string seal(const Key& key, std::string_view context, const Key& payload);

// Opens what seal() made with the same key and context; nullopt and *why
// when it is malformed or was sealed with another key or context.
std::optional<Key> unseal(const Key& key, std::string_view context, std::string_view sealed,
                          std::string* why);

// The context a node's sealed peer key is bound to.
std::string peer_key_context(std::string_view node, std::string_view generation);

// Binds an HTTP request to a node (the tls tier's tracker calls): hex of
// HMAC-SHA256 under the node's key of "nbdroot request\n" METHOD "\n"
// TARGET "\n" COUNTER "\n" BODY. COUNTER only grows per node, so a
// recorded request cannot be played again.
std::string request_mac(const Key& key, std::string_view method, std::string_view target,
                        uint64_t counter, std::string_view body);

// a == b, in time that depends only on the lengths.
bool equal_in_constant_time(std::string_view a, std::string_view b);

}  // namespace tls
