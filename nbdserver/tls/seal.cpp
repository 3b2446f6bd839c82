#include "tls/seal.hpp"

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include <cstring>
#include <vector>

namespace tls {

namespace {

constexpr size_t kNonce = 12;
constexpr size_t kTag = 16;

std::string to_hex(const uint8_t* p, size_t n) {
  gnutls_datum_t in{const_cast<uint8_t*>(p), unsigned(n)};
  gnutls_datum_t hex{};
  if (gnutls_hex_encode2(&in, &hex) != GNUTLS_E_SUCCESS) return "";
  std::string s(reinterpret_cast<const char*>(hex.data), hex.size);
  gnutls_free(hex.data);
  return s;
}

bool from_hex(std::string_view s, std::vector<uint8_t>* out) {
  std::string copy(s);
  gnutls_datum_t in{reinterpret_cast<uint8_t*>(copy.data()), unsigned(copy.size())};
  gnutls_datum_t raw{};
  if (copy.empty() || gnutls_hex_decode2(&in, &raw) != GNUTLS_E_SUCCESS) return false;
  out->assign(raw.data, raw.data + raw.size);
  gnutls_free(raw.data);
  return true;
}

}  // namespace

Key peer_key(const Key& secret, std::string_view generation) {
  std::string msg = "nbdroot peer key " + std::string(generation);
  Key out{};
  gnutls_hmac_fast(GNUTLS_MAC_SHA256, secret.data(), secret.size(), msg.data(), msg.size(),
                   out.data());
  return out;
}

std::string peer_identity(std::string_view generation) {
  return "peer/" + std::string(generation);
}

std::string peer_key_context(std::string_view node, std::string_view generation) {
  return "nbdroot peer key for " + std::string(node) + " on " + std::string(generation);
}

std::string seal(const Key& key, std::string_view context, const Key& payload) {
  gnutls_datum_t k{const_cast<uint8_t*>(key.data()), unsigned(key.size())};
  gnutls_aead_cipher_hd_t h;
  if (gnutls_aead_cipher_init(&h, GNUTLS_CIPHER_AES_256_GCM, &k) != GNUTLS_E_SUCCESS) return "";
  std::vector<uint8_t> out(kNonce + payload.size() + kTag);
  size_t len = out.size() - kNonce;
  bool ok = gnutls_rnd(GNUTLS_RND_NONCE, out.data(), kNonce) == GNUTLS_E_SUCCESS &&
            gnutls_aead_cipher_encrypt(h, out.data(), kNonce, context.data(), context.size(), kTag,
                                       payload.data(), payload.size(), out.data() + kNonce,
                                       &len) == GNUTLS_E_SUCCESS;
  gnutls_aead_cipher_deinit(h);
  return ok ? to_hex(out.data(), kNonce + len) : "";
}

std::optional<Key> unseal(const Key& key, std::string_view context, std::string_view sealed,
                          std::string* why) {
  std::vector<uint8_t> raw;
  Key out{};
  if (!from_hex(sealed, &raw) || raw.size() != kNonce + out.size() + kTag) {
    *why = "a sealed key is " + std::to_string((kNonce + out.size() + kTag) * 2) + " hex digits";
    return std::nullopt;
  }
  gnutls_datum_t k{const_cast<uint8_t*>(key.data()), unsigned(key.size())};
  gnutls_aead_cipher_hd_t h;
  if (gnutls_aead_cipher_init(&h, GNUTLS_CIPHER_AES_256_GCM, &k) != GNUTLS_E_SUCCESS) {
    *why = "AES-256-GCM is not available";
    return std::nullopt;
  }
  size_t len = out.size();
  int rc = gnutls_aead_cipher_decrypt(h, raw.data(), kNonce, context.data(), context.size(), kTag,
                                      raw.data() + kNonce, raw.size() - kNonce, out.data(), &len);
  gnutls_aead_cipher_deinit(h);
  if (rc != GNUTLS_E_SUCCESS || len != out.size()) {
    *why = "the sealed key does not open with this node's key (another key, node or generation)";
    return std::nullopt;
  }
  return out;
}

std::string request_mac(const Key& key, std::string_view method, std::string_view target,
                        uint64_t counter, std::string_view body) {
  std::string msg = "nbdroot request\n" + std::string(method) + "\n" + std::string(target) + "\n" +
                    std::to_string(counter) + "\n";
  msg.append(body);
  uint8_t mac[32];
  if (gnutls_hmac_fast(GNUTLS_MAC_SHA256, key.data(), key.size(), msg.data(), msg.size(), mac) !=
      GNUTLS_E_SUCCESS)
    return "";
  return to_hex(mac, sizeof mac);
}

bool equal_in_constant_time(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char d = 0;
  for (size_t i = 0; i < a.size(); ++i) d |= static_cast<unsigned char>(a[i] ^ b[i]);
  return d == 0;
}

}  // namespace tls
