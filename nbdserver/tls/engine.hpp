// TLS 1.3 with pre-shared keys, as a sans-I/O engine over GnuTLS.
//
// The engine never touches a socket. The owner feeds it the bytes received
// from the peer (ciphertext) and sends whatever it appends to outbox(); in
// between it drives the handshake, decrypts records into plaintext and
// encrypts plaintext into records. So the server's io_uring loop, the node
// agent's blocking sockets and the unit tests all use the same code, and
// GnuTLS does every piece of cryptography and record framing.
//
// Policy (docs/security.md): TLS 1.3 only, PSK with (EC)DHE, AES-GCM first
// (GnuTLS's default order put ChaCha20 first, 8x slower here with AES-NI),
// no session tickets and so no resumption and no 0-RTT data.
//
// Threads: an Engine is not thread-safe; one owner at a time.
#pragma once

#include <string.h>  // explicit_bzero

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace tls {

// A 256-bit pre-shared key. Its bytes are wiped (explicit_bzero, which the
// compiler may not drop as a dead store) when it is destroyed, moved from
// or wipe()d, so a key leaves no copy in freed memory or on a dead stack
// frame. A copy is a second secret that wipes itself in turn.
class Key {
 public:
  static constexpr size_t kSize = 32;

  Key() = default;  // all zero
  Key(const Key&) = default;
  Key& operator=(const Key&) = default;
  Key(Key&& o) noexcept : bytes_(o.bytes_) { o.wipe(); }
  Key& operator=(Key&& o) noexcept {
    if (this != &o) {
      bytes_ = o.bytes_;
      o.wipe();
    }
    return *this;
  }
  ~Key() { wipe(); }

  // Sets every byte to zero.
  void wipe() { explicit_bzero(bytes_.data(), bytes_.size()); }

  uint8_t* data() { return bytes_.data(); }
  const uint8_t* data() const { return bytes_.data(); }
  static constexpr size_t size() { return kSize; }
  uint8_t& operator[](size_t i) { return bytes_[i]; }
  uint8_t operator[](size_t i) const { return bytes_[i]; }
  uint8_t* begin() { return bytes_.data(); }
  uint8_t* end() { return bytes_.data() + kSize; }
  const uint8_t* begin() const { return bytes_.data(); }
  const uint8_t* end() const { return bytes_.data() + kSize; }
  // In time independent of where the keys differ.
  friend bool operator==(const Key& a, const Key& b) {
    uint8_t diff = 0;
    for (size_t i = 0; i < kSize; ++i) diff |= uint8_t(a.bytes_[i] ^ b.bytes_[i]);
    return diff == 0;
  }

 private:
  std::array<uint8_t, kSize> bytes_{};
};

// Wipes all of s's buffer (its capacity, not only its size), then empties
// it: for hex text and file contents that held a key.
void wipe(std::string& s);

// Server side: the key of `identity`, or nullopt with *why saying why not
// (unknown identity, removed or expired key). Called during the handshake,
// on the engine owner's thread; *why is for the log and never reaches the
// peer (the peer sees a failed handshake only).
using KeyLookup = std::function<std::optional<Key>(std::string_view identity, std::string* why)>;

class Engine {
 public:
  enum class Status {
    kHandshaking,  // more bytes from the peer are needed (see outbox())
    kOpen,         // handshake done: read() and write() work
    kClosed,       // the peer sent close_notify
    kFailed,       // handshake or record error; error() says what
  };

  // A server engine that authenticates clients with `lookup`. nullptr and
  // *why on a GnuTLS setup failure.
  static std::unique_ptr<Engine> server(KeyLookup lookup, std::string* why);
  // A client engine that authenticates as `identity` with `key`.
  static std::unique_ptr<Engine> client(std::string identity, const Key& key, std::string* why);

  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Appends bytes received from the peer, then advances the handshake if it
  // is still running. Returns status().
  Status feed(const uint8_t* data, size_t len);
  // Starts the handshake (a client's ClientHello lands in outbox()). Servers
  // need not call it: feed() starts theirs.
  Status start();
  Status status() const { return status_; }

  // Decrypts into dst up to `cap` bytes of plaintext from the records fed so
  // far. Returns the bytes written; 0 when no whole record is buffered (or
  // the peer closed: see status()). Only when status() == kOpen.
  size_t read(uint8_t* dst, size_t cap);
  // Encrypts `len` bytes into outbox(). Only when status() == kOpen; on a
  // GnuTLS error status() becomes kFailed and false is returned.
  bool write(const uint8_t* data, size_t len);
  // Between cork() and uncork(), write()s are gathered into full records
  // (a reply's header and payload share one record, not one each).
  void cork();
  bool uncork();
  // Sends close_notify (into outbox()).
  void close();

  // Ciphertext to send to the peer, in order; the owner sends a prefix and
  // erases it (or swaps the string out).
  std::string& outbox() { return out_; }
  // The identity the peer authenticated as (server), or ours (client).
  const std::string& identity() const { return identity_; }
  // Why status() is kFailed; for the log.
  const std::string& error() const { return error_; }
  // "TLS1.3/AES-128-GCM", once open; for the log.
  std::string description() const;

 private:
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  void step_handshake();
  void fail(std::string why);

  std::unique_ptr<Impl> impl_;
  Status status_ = Status::kHandshaking;
  std::string out_;
  std::string identity_;
  std::string error_;
  friend struct Callbacks;
};

// "NODE:HEX" as psktool writes it; nullopt on a malformed line.
struct PskLine {
  std::string identity;
  Key key;
};
std::optional<PskLine> parse_psk_line(std::string_view line, std::string* why);
std::string format_psk_line(std::string_view identity, const Key& key);
// A key as 64 lower-case hex digits, and back (false unless exactly that).
std::string key_hex(const Key& key);
bool key_from_hex(std::string_view hex, Key* key);
// 256 bits from the kernel's random source (getrandom); false on failure.
bool random_key(Key* key);

}  // namespace tls
