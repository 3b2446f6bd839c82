// The pre-shared keys a `--tls require` server accepts: each store node's
// own (nodes/NODE/tls-key.json, `nbdserver admin key NODE`), read at every
// handshake so a rotation or removal takes effect at once, and the fixed
// identities of --tls-psk-file, read once at start.
//
// Thread-safe after load(): find() only reads.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "tls/engine.hpp"

namespace server {

class TlsKeys {
 public:
  // `store` may be empty (no store), `psk_file` too. False and *err when the
  // file cannot be read, is readable by group or others, or has a bad line.
  bool load(const std::string& store, const std::string& psk_file, std::string* err);
  // The key `identity` must prove, or nullopt and *why (for the server's
  // log only: the client learns nothing but a failed handshake).
  std::optional<tls::Key> find(std::string_view identity, std::string* why) const;

 private:
  std::string store_;
  std::map<std::string, tls::Key, std::less<>> fixed_;
};

}  // namespace server
