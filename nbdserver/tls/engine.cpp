#include "tls/engine.hpp"

#include <gnutls/gnutls.h>
#include <sys/random.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace tls {

namespace {

// TLS 1.3 only; AES-GCM before ChaCha20 (with AES-NI, GCM is several times
// faster); PSK always combined with an ephemeral (EC)DH exchange, so a
// stolen key does not decrypt recorded sessions. GnuTLS's TLS 1.3 PSK modes
// map to the ECDHE-PSK and DHE-PSK key exchanges. The server's order wins
// (%SERVER_PRECEDENCE): libnbd's client asks for ChaCha20 first.
constexpr const char* kPriority =
    "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:"
    "+CHACHA20-POLY1305:-KX-ALL:+ECDHE-PSK:+DHE-PSK:%SERVER_PRECEDENCE";

// GNUTLS_NO_TICKETS: no session tickets, hence no resumption and no 0-RTT
// (which also needs GNUTLS_ENABLE_EARLY_DATA, never set).
constexpr unsigned kFlags = GNUTLS_NONBLOCK | GNUTLS_NO_TICKETS;

std::string gnutls_text(int rc) { return gnutls_strerror(rc); }

}  // namespace

struct Engine::Impl {
  gnutls_session_t session = nullptr;
  gnutls_psk_server_credentials_t server_cred = nullptr;
  gnutls_psk_client_credentials_t client_cred = nullptr;
  KeyLookup lookup;
  std::string lookup_why;  // why the last lookup refused an identity
  std::string found;       // the identity whose key the last lookup found
  bool started = false;    // bytes were fed
  std::string in;          // ciphertext fed and not yet pulled by GnuTLS
  size_t in_pos = 0;
  std::string* out = nullptr;

  ~Impl() {
    if (session) gnutls_deinit(session);
    if (server_cred) gnutls_psk_free_server_credentials(server_cred);
    if (client_cred) gnutls_psk_free_client_credentials(client_cred);
  }
};

// GnuTLS's transport and key callbacks; the session's pointer is the Impl.
struct Callbacks {
  static ssize_t push(gnutls_transport_ptr_t p, const void* data, size_t len) {
    static_cast<Engine::Impl*>(p)->out->append(static_cast<const char*>(data), len);
    return ssize_t(len);
  }

  static ssize_t pull(gnutls_transport_ptr_t p, void* data, size_t len) {
    auto* im = static_cast<Engine::Impl*>(p);
    size_t have = im->in.size() - im->in_pos;
    if (have == 0) {
      gnutls_transport_set_errno(im->session, EAGAIN);
      return -1;
    }
    size_t n = std::min(have, len);
    std::memcpy(data, im->in.data() + im->in_pos, n);
    im->in_pos += n;
    if (im->in_pos == im->in.size()) {
      im->in.clear();
      im->in_pos = 0;
    }
    return ssize_t(n);
  }

  static int server_key(gnutls_session_t s, const char* username, gnutls_datum_t* key) {
    auto* im = static_cast<Engine::Impl*>(gnutls_session_get_ptr(s));
    std::string why;
    std::optional<Key> k = im->lookup(username ? username : "", &why);
    if (!k) {
      im->lookup_why = why.empty() ? "unknown identity" : why;
      return -1;
    }
    im->found = username ? username : "";
    key->data = static_cast<unsigned char*>(gnutls_malloc(k->size()));
    if (!key->data) return -1;
    std::memcpy(key->data, k->data(), k->size());
    key->size = unsigned(k->size());
    return 0;
  }

  // Creates the session with our policy; false and *why on failure.
  static bool init_session(Engine::Impl& im, unsigned role, std::string* why) {
    int rc = gnutls_init(&im.session, role | kFlags);
    const char* where = nullptr;
    if (rc == GNUTLS_E_SUCCESS) rc = gnutls_priority_set_direct(im.session, kPriority, &where);
    if (rc != GNUTLS_E_SUCCESS) {
      *why = "TLS setup: " + gnutls_text(rc);
      return false;
    }
    gnutls_transport_set_ptr(im.session, &im);
    gnutls_session_set_ptr(im.session, &im);
    gnutls_transport_set_push_function(im.session, &Callbacks::push);
    gnutls_transport_set_pull_function(im.session, &Callbacks::pull);
    return true;
  }
};

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) { impl_->out = &out_; }

Engine::~Engine() = default;

std::unique_ptr<Engine> Engine::server(KeyLookup lookup, std::string* why) {
  auto im = std::make_unique<Impl>();
  im->lookup = std::move(lookup);
  int rc = gnutls_psk_allocate_server_credentials(&im->server_cred);
  if (rc != GNUTLS_E_SUCCESS) {
    *why = "TLS setup: " + gnutls_text(rc);
    return nullptr;
  }
  gnutls_psk_set_server_credentials_function(im->server_cred, &Callbacks::server_key);
  if (!Callbacks::init_session(*im, GNUTLS_SERVER, why)) return nullptr;
  rc = gnutls_credentials_set(im->session, GNUTLS_CRD_PSK, im->server_cred);
  if (rc != GNUTLS_E_SUCCESS) {
    *why = "TLS setup: " + gnutls_text(rc);
    return nullptr;
  }
  return std::unique_ptr<Engine>(new Engine(std::move(im)));
}

std::unique_ptr<Engine> Engine::client(std::string identity, const Key& key, std::string* why) {
  auto im = std::make_unique<Impl>();
  int rc = gnutls_psk_allocate_client_credentials(&im->client_cred);
  gnutls_datum_t k{const_cast<unsigned char*>(key.data()), unsigned(key.size())};
  if (rc == GNUTLS_E_SUCCESS)
    rc = gnutls_psk_set_client_credentials(im->client_cred, identity.c_str(), &k,
                                           GNUTLS_PSK_KEY_RAW);
  if (rc != GNUTLS_E_SUCCESS) {
    *why = "TLS setup: " + gnutls_text(rc);
    return nullptr;
  }
  if (!Callbacks::init_session(*im, GNUTLS_CLIENT, why)) return nullptr;
  rc = gnutls_credentials_set(im->session, GNUTLS_CRD_PSK, im->client_cred);
  if (rc != GNUTLS_E_SUCCESS) {
    *why = "TLS setup: " + gnutls_text(rc);
    return nullptr;
  }
  auto e = std::unique_ptr<Engine>(new Engine(std::move(im)));
  e->identity_ = std::move(identity);
  return e;
}

void Engine::fail(std::string why) {
  if (status_ == Status::kFailed) return;
  status_ = Status::kFailed;
  error_ = std::move(why);
}

void Engine::step_handshake() {
  int rc;
  do {
    rc = gnutls_handshake(impl_->session);
  } while (rc < 0 && !gnutls_error_is_fatal(rc) && rc != GNUTLS_E_AGAIN);
  if (rc == GNUTLS_E_AGAIN) return;
  if (rc < 0) {
    // The peer learns that, not why (RFC 8446 6.2: send the alert).
    gnutls_alert_send_appropriate(impl_->session, rc);
    std::string why = "TLS handshake failed: " + gnutls_text(rc);
    if (!impl_->lookup_why.empty()) {
      why += " (" + impl_->lookup_why + ")";
    } else if (!impl_->found.empty()) {
      why += " (identity " + impl_->found +
             " has a key here: the client's did not match it, or the client broke off)";
    }
    fail(std::move(why));
    return;
  }
  if (impl_->server_cred) {
    const char* user = gnutls_psk_server_get_username(impl_->session);
    identity_ = user ? user : "";
  }
  status_ = Status::kOpen;
}

Engine::Status Engine::start() {
  if (status_ == Status::kHandshaking) step_handshake();
  return status_;
}

Engine::Status Engine::feed(const uint8_t* data, size_t len) {
  if (status_ == Status::kFailed || status_ == Status::kClosed) return status_;
  // A client's stream starts with a handshake record (content type 22).
  // Anything else (plaintext NBD after STARTTLS) is refused at once, rather
  // than read as the header of a record GnuTLS would wait for.
  if (impl_->server_cred && !impl_->started && len > 0 && data[0] != 22) {
    gnutls_alert_send(impl_->session, GNUTLS_AL_FATAL, GNUTLS_A_UNEXPECTED_MESSAGE);
    fail("TLS handshake failed: the client did not start TLS (its first byte is " +
         std::to_string(data[0]) + ", not a TLS handshake record)");
    return status_;
  }
  if (len > 0) impl_->started = true;
  impl_->in.append(reinterpret_cast<const char*>(data), len);
  if (status_ == Status::kHandshaking) step_handshake();
  return status_;
}

size_t Engine::read(uint8_t* dst, size_t cap) {
  while (status_ == Status::kOpen && cap > 0) {
    ssize_t n = gnutls_record_recv(impl_->session, dst, cap);
    if (n > 0) return size_t(n);
    if (n == 0) {
      status_ = Status::kClosed;
      return 0;
    }
    if (n == GNUTLS_E_AGAIN) return 0;
    if (gnutls_error_is_fatal(int(n))) {
      fail("TLS record error: " + gnutls_text(int(n)));
      return 0;
    }
    // A non-fatal alert or interrupted call: try again.
  }
  return 0;
}

bool Engine::write(const uint8_t* data, size_t len) {
  while (len > 0) {
    if (status_ != Status::kOpen) return false;
    ssize_t n = gnutls_record_send(impl_->session, data, len);
    if (n < 0) {
      if (!gnutls_error_is_fatal(int(n))) continue;
      fail("TLS record error: " + gnutls_text(int(n)));
      return false;
    }
    data += n;
    len -= size_t(n);
  }
  return true;
}

void Engine::cork() {
  if (status_ == Status::kOpen) gnutls_record_cork(impl_->session);
}

bool Engine::uncork() {
  if (status_ != Status::kOpen) return false;
  int rc;
  do {
    rc = gnutls_record_uncork(impl_->session, 0);
  } while (rc < 0 && !gnutls_error_is_fatal(rc));
  if (rc < 0) {
    fail("TLS record error: " + gnutls_text(rc));
    return false;
  }
  return true;
}

void Engine::close() {
  if (status_ == Status::kOpen) gnutls_bye(impl_->session, GNUTLS_SHUT_WR);
}

std::string Engine::description() const {
  if (status_ != Status::kOpen) return "";
  std::string d = gnutls_protocol_get_name(gnutls_protocol_get_version(impl_->session));
  d += "/";
  d += gnutls_cipher_get_name(gnutls_cipher_get(impl_->session));
  return d;
}

void wipe(std::string& s) {
  s.resize(s.capacity());
  explicit_bzero(s.data(), s.size());
  s.clear();
}

std::string key_hex(const Key& key) {
  gnutls_datum_t in{const_cast<unsigned char*>(key.data()), unsigned(key.size())};
  gnutls_datum_t hex{};
  if (gnutls_hex_encode2(&in, &hex) != GNUTLS_E_SUCCESS) return "";
  std::string s(reinterpret_cast<const char*>(hex.data), hex.size);
  gnutls_memset(hex.data, 0, hex.size);
  gnutls_free(hex.data);
  return s;
}

bool key_from_hex(std::string_view hex, Key* key) {
  if (hex.size() != key->size() * 2) return false;
  std::string copy(hex);
  gnutls_datum_t in{reinterpret_cast<unsigned char*>(copy.data()), unsigned(copy.size())};
  gnutls_datum_t raw{};
  const bool ok = gnutls_hex_decode2(&in, &raw) == GNUTLS_E_SUCCESS && raw.size == key->size();
  if (ok) std::memcpy(key->data(), raw.data, key->size());
  if (raw.data) gnutls_memset(raw.data, 0, raw.size);
  gnutls_free(raw.data);
  wipe(copy);
  return ok;
}

std::optional<PskLine> parse_psk_line(std::string_view line, std::string* why) {
  while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.remove_suffix(1);
  size_t colon = line.rfind(':');
  if (colon == std::string_view::npos || colon == 0) {
    *why = "not IDENTITY:HEX (psktool format)";
    return std::nullopt;
  }
  PskLine out;
  out.identity = std::string(line.substr(0, colon));
  if (!key_from_hex(line.substr(colon + 1), &out.key)) {
    *why = "the key is not 64 hex digits (256 bits)";
    return std::nullopt;
  }
  return out;
}

std::string format_psk_line(std::string_view identity, const Key& key) {
  return std::string(identity) + ":" + key_hex(key);
}

bool random_key(Key* key) {
  size_t got = 0;
  while (got < key->size()) {
    ssize_t n = ::getrandom(key->data() + got, key->size() - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    got += size_t(n);
  }
  return true;
}

}  // namespace tls
