// Node keys of the `tls` tier (issue 13; docs/security.md "Node keys"): one
// 256-bit TLS pre-shared key per node, kept in the store:
//
//   nodes/<node>/tls-key.json   {"node", "key": 64 hex digits, "created", "expires"
//                               (0: never), "generation" (times rotated), "armed",
//                               "armed_at", "delivered_at" (0: never)}; unix seconds
//   nodes/<node>/tls-key.lock   flock()ed around every read-modify-write, by the
//                               server and by `nbdserver admin`
//
// The key file is mode 0600 from its creation (storage/durable_file.hpp with
// mode 0600) and replaced whole by rename, so a reader without the lock
// (load(), the TLS handshake's lookup) sees the old record or the new one.
// A file that is not a regular file of ours with mode 0600 or narrower, or
// whose contents are not exactly such a record, is refused as corrupt.
//
// Rotation writes a new key over the old one: the old value stops working
// at once. Arming lets one boot-script fetch take the key (take_armed());
// the fetch disarms it and records delivered_at.
//
// Threads: every function may be called from any thread and process; the
// lock file orders changes. Time comes in as an argument (unix seconds).
// No server, HTTP or io_uring dependency: admin, HTTP and tests share it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "tls/engine.hpp"

namespace storage {

inline constexpr const char* kNodeKeyFile = "tls-key.json";

struct NodeKey {
  std::string node;
  tls::Key key;  // wipes itself
  int64_t created = 0;
  int64_t expires = 0;      // 0: never
  uint64_t generation = 0;  // 0 for the first key, +1 per rotation
  bool armed = false;       // the next boot-script fetch may take it
  int64_t armed_at = 0;
  int64_t delivered_at = 0;  // the last take_armed(); 0: never
};

// Why a key was not returned.
enum class KeyStatus {
  kOk,
  kMissing,           // "no key"
  kExpired,           // "key expired at ..."
  kCorrupt,           // "corrupt key file: ..." (also a bad node name)
  kIoError,           // the store could not be read or written
  kNotArmed,          // take_armed(): "not armed"
  kAlreadyDelivered,  // take_armed(): "already delivered at ... (second fetch)"
};

// Makes a new key for `node` (getrandom), replacing any key it had, valid
// for `expires_in_s` seconds from `now` (0: never). *rotated tells whether
// there was one (its generation is carried on +1; a corrupt file counts as
// none). The new key is not armed. Creates nodes/ and nodes/<node>/ if
// missing. False and *err on a bad node name or an I/O failure.
bool create_or_rotate(const std::string& store_dir, const std::string& node,
                      int64_t expires_in_s, int64_t now, NodeKey* out, bool* rotated,
                      std::string* err);

// The node's key if it has one that is valid at `now`; else nullopt, *why
// ("no key", "key expired at 2027-01-01T00:00:00Z", "corrupt key file:
// PATH: ...") and *status. Never changes the store. `node` may come from the
// network (a PSK identity): a bad name is refused before any path is made.
std::optional<NodeKey> load(const std::string& store_dir, const std::string& node, int64_t now,
                            std::string* why, KeyStatus* status = nullptr);

// Deletes the node's key (its lock file stays: another process may be
// waiting on it). *existed tells whether it had
// one. False and *err on a bad node name or an I/O failure.
bool remove(const std::string& store_dir, const std::string& node, bool* existed,
            std::string* err);

// Arms the node's valid key for one delivery. False, *err and *status as
// load() when there is none (or it expired).
bool arm(const std::string& store_dir, const std::string& node, int64_t now, NodeKey* out,
         std::string* err, KeyStatus* status = nullptr);

// The boot script's delivery: the key if it is armed and valid (it is then
// disarmed and delivered_at = now, durably, before it is returned); else
// nullopt, *why ("not armed", "already delivered at ... (second fetch)",
// or load()'s reasons) and *status.
std::optional<NodeKey> take_armed(const std::string& store_dir, const std::string& node,
                                  int64_t now, std::string* why, KeyStatus* status = nullptr);

// "NODE:HEX" with lower-case hex, as `psktool -u NODE -p FILE` writes it.
// The caller holds a copy of the key: tls::wipe() it once used.
std::string psk_line(const NodeKey& k);

// A key lifetime for --expires: "30d", "12h", "90m", "3600s", or "0" for
// never; at most 100 years. False on anything else.
bool parse_key_lifetime(const std::string& s, int64_t* seconds);

// The store's secret that peer keys are derived from (tls/seal.hpp):
// keys/peer-secret (mode 0600), made from getrandom at first use. False and
// *err when it cannot be read or made, or is not a private 64-hex-digit file.
// Thread-safe within a process.
bool peer_secret(const std::string& store_dir, tls::Key* out, std::string* err);

// "2027-01-01T00:00:00Z".
std::string utc_time(int64_t unix_seconds);

}  // namespace storage
