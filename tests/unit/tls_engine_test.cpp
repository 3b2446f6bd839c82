// Tests for tls/engine.{hpp,cpp}: a real GnuTLS client engine against a real
// server engine, the bytes shuttled between them in memory.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "tls/engine.hpp"
#include "tls/seal.hpp"

namespace tls {
namespace {

Key key_of(uint8_t seed) {
  Key k;
  for (size_t i = 0; i < k.size(); ++i) k[i] = uint8_t(seed + i * 7);
  return k;
}

struct Pair {
  std::map<std::string, Key> keys;
  std::vector<std::string> lookups;
  std::unique_ptr<Engine> server, client;

  Pair(const std::string& identity, const Key& client_key) {
    keys["node-a"] = key_of(1);
    keys["node-b"] = key_of(2);
    std::string why;
    server = Engine::server(
        [this](std::string_view id, std::string* reason) -> std::optional<Key> {
          lookups.emplace_back(id);
          auto it = keys.find(std::string(id));
          if (it == keys.end()) {
            *reason = "no key for " + std::string(id);
            return std::nullopt;
          }
          return it->second;
        },
        &why);
    client = Engine::client(identity, client_key, &why);
    EXPECT_TRUE(server && client) << why;
  }

  // Moves every queued byte across until neither side has more to say.
  void shuttle() {
    for (int i = 0; i < 20; ++i) {
      std::string c = std::exchange(client->outbox(), {});
      std::string s = std::exchange(server->outbox(), {});
      if (c.empty() && s.empty()) return;
      if (!c.empty()) server->feed(reinterpret_cast<const uint8_t*>(c.data()), c.size());
      if (!s.empty()) client->feed(reinterpret_cast<const uint8_t*>(s.data()), s.size());
    }
  }

  bool connect() {
    client->start();
    shuttle();
    return server->status() == Engine::Status::kOpen && client->status() == Engine::Status::kOpen;
  }
};

std::string read_all(Engine& e) {
  std::string got;
  uint8_t buf[4096];
  while (size_t n = e.read(buf, sizeof buf)) got.append(reinterpret_cast<char*>(buf), n);
  return got;
}

TEST(TlsEngine, RightKeyOpensWithAesGcmAndTheIdentity) {
  Pair p("node-a", key_of(1));
  ASSERT_TRUE(p.connect()) << p.server->error() << " / " << p.client->error();
  EXPECT_EQ(p.server->identity(), "node-a");
  EXPECT_EQ(p.server->description(), "TLS1.3/AES-128-GCM");
  EXPECT_EQ(p.client->description(), "TLS1.3/AES-128-GCM");
}

TEST(TlsEngine, DataCrossesBothWaysAndCloseNotifyEnds) {
  Pair p("node-b", key_of(2));
  ASSERT_TRUE(p.connect());
  std::string big(1 << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = char(i * 131 + 7);
  ASSERT_TRUE(p.client->write(reinterpret_cast<const uint8_t*>(big.data()), big.size()));
  std::string wire = p.client->outbox();
  EXPECT_EQ(wire.find(big.substr(1000, 64)), std::string::npos) << "plaintext on the wire";
  p.shuttle();
  EXPECT_EQ(read_all(*p.server), big);
  ASSERT_TRUE(p.server->write(reinterpret_cast<const uint8_t*>("pong"), 4));
  p.shuttle();
  EXPECT_EQ(read_all(*p.client), "pong");
  p.client->close();
  p.shuttle();
  EXPECT_EQ(read_all(*p.server), "");
  EXPECT_EQ(p.server->status(), Engine::Status::kClosed);
}

TEST(TlsEngine, CorkedWritesShareRecords) {
  Pair p("node-a", key_of(1));
  ASSERT_TRUE(p.connect());
  p.client->cork();
  for (int i = 0; i < 100; ++i)
    ASSERT_TRUE(p.client->write(reinterpret_cast<const uint8_t*>("0123456789abcdef"), 16));
  ASSERT_TRUE(p.client->uncork());
  // One record: 5 bytes of header, 1600 of data, a content-type byte and a
  // 16-byte tag.
  EXPECT_EQ(p.client->outbox().size(), 5u + 1600 + 1 + 16);
  p.shuttle();
  EXPECT_EQ(read_all(*p.server).size(), 1600u);
}

TEST(TlsEngine, RecordsFedAByteAtATimeStillDecrypt) {
  Pair p("node-a", key_of(1));
  ASSERT_TRUE(p.connect());
  ASSERT_TRUE(p.client->write(reinterpret_cast<const uint8_t*>("hello"), 5));
  std::string wire = std::exchange(p.client->outbox(), {});
  std::string got;
  uint8_t buf[64];
  for (char ch : wire) {
    p.server->feed(reinterpret_cast<const uint8_t*>(&ch), 1);
    while (size_t n = p.server->read(buf, sizeof buf)) got.append(reinterpret_cast<char*>(buf), n);
  }
  EXPECT_EQ(got, "hello");
}

TEST(TlsEngine, WrongKeyFailsAndTheServerSaysWhyOnlyInItsError) {
  Pair p("node-a", key_of(9));
  EXPECT_FALSE(p.connect());
  EXPECT_EQ(p.server->status(), Engine::Status::kFailed);
  EXPECT_NE(p.server->error().find("TLS handshake failed"), std::string::npos) << p.server->error();
  EXPECT_EQ(p.server->identity(), "");
  // The client got an alert, not a silent close.
  EXPECT_EQ(p.client->status(), Engine::Status::kFailed);
  EXPECT_NE(p.client->error().find("alert"), std::string::npos) << p.client->error();
}

TEST(TlsEngine, UnknownIdentityFailsWithTheLookupsReason) {
  Pair p("node-z", key_of(1));
  EXPECT_FALSE(p.connect());
  EXPECT_EQ(p.server->status(), Engine::Status::kFailed);
  EXPECT_NE(p.server->error().find("no key for node-z"), std::string::npos) << p.server->error();
  // The client learns nothing but a failed handshake.
  EXPECT_EQ(p.client->error().find("no key"), std::string::npos) << p.client->error();
}

TEST(TlsEngine, GarbageInsteadOfAClientHelloFails) {
  std::string why;
  auto s =
      Engine::server([](std::string_view, std::string*) { return std::optional<Key>(); }, &why);
  ASSERT_TRUE(s);
  std::string junk = "IHAVEOPT this is plaintext NBD, not a TLS record";
  s->feed(reinterpret_cast<const uint8_t*>(junk.data()), junk.size());
  EXPECT_EQ(s->status(), Engine::Status::kFailed);
  EXPECT_NE(s->error().find("did not start TLS"), std::string::npos) << s->error();
  // The client is told with an alert record (content type 21), at once.
  ASSERT_FALSE(s->outbox().empty());
  EXPECT_EQ(uint8_t(s->outbox()[0]), 21);
}

TEST(TlsEngine, PskLinesAsPsktoolWritesThem) {
  Key k = key_of(3);
  std::string line = format_psk_line("node-a", k);
  EXPECT_EQ(line.size(), 6 + 1 + 64);
  std::string why;
  auto parsed = parse_psk_line(line + "\n", &why);
  ASSERT_TRUE(parsed) << why;
  EXPECT_EQ(parsed->identity, "node-a");
  EXPECT_EQ(parsed->key, k);
  EXPECT_FALSE(parse_psk_line("node-a", &why));
  EXPECT_FALSE(parse_psk_line("node-a:abcd", &why));
  EXPECT_FALSE(parse_psk_line(":" + line.substr(7), &why));
  EXPECT_FALSE(parse_psk_line("node-a:" + std::string(64, 'g'), &why));
  Key a{}, b{};
  ASSERT_TRUE(random_key(&a));
  ASSERT_TRUE(random_key(&b));
  EXPECT_NE(a, b);
}

bool all_zero(const Key& k) {
  for (uint8_t b : k)
    if (b) return false;
  return true;
}

// A key wipes itself when moved from or wipe()d, and ~Key() is wipe(). The
// destructor's own effect is not observed here: reading the bytes of an
// object whose lifetime ended is undefined behaviour, so a test that did
// (placement new into a buffer, ~Key(), read the buffer) would prove
// little. explicit_bzero is what keeps the compiler from dropping that
// last store as dead.
static_assert(!std::is_trivially_destructible_v<Key>, "~Key() must wipe");
static_assert(sizeof(Key) == Key::kSize);

TEST(TlsKey, WipesItselfWhenMovedFromOrWiped) {
  Key a = key_of(9);
  Key b = std::move(a);
  EXPECT_TRUE(all_zero(a)) << "a moved-from key keeps no copy";  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(b, key_of(9));
  Key c = key_of(1);
  c = std::move(b);
  EXPECT_TRUE(all_zero(b));  // NOLINT(bugprone-use-after-move)
  EXPECT_EQ(c, key_of(9));
  c.wipe();
  EXPECT_TRUE(all_zero(c));
  Key copy = key_of(5), original = key_of(5);
  EXPECT_EQ(copy, original);  // a copy is a second, equal secret
  EXPECT_NE(copy, key_of(6));
  std::optional<Key> o = key_of(4);
  Key taken = std::move(*o);
  EXPECT_TRUE(all_zero(*o));
  EXPECT_EQ(taken, key_of(4));
}

TEST(TlsKey, WipeEmptiesAString) {
  std::string hex = key_hex(key_of(2));
  ASSERT_EQ(hex.size(), 64u);
  wipe(hex);
  EXPECT_TRUE(hex.empty());
}

}  // namespace
}  // namespace tls

namespace tls {
namespace {

TEST(TlsSeal, APeerKeyOpensOnlyWithTheNodesKeyAndContext) {
  Key node{}, other{}, secret{};
  ASSERT_TRUE(random_key(&node));
  ASSERT_TRUE(random_key(&other));
  ASSERT_TRUE(random_key(&secret));
  Key pk = peer_key(secret, "lab@g1");
  EXPECT_NE(pk, peer_key(secret, "lab@g2"));
  EXPECT_EQ(pk, peer_key(secret, "lab@g1"));
  const std::string ctx = peer_key_context("n1", "lab@g1");
  std::string sealed = seal(node, ctx, pk);
  ASSERT_EQ(sealed.size(), (12u + 32 + 16) * 2);
  EXPECT_NE(sealed, seal(node, ctx, pk)) << "nonces must differ";
  std::string why;
  auto opened = unseal(node, ctx, sealed, &why);
  ASSERT_TRUE(opened) << why;
  EXPECT_EQ(*opened, pk);
  EXPECT_FALSE(unseal(other, ctx, sealed, &why));
  EXPECT_FALSE(unseal(node, peer_key_context("n2", "lab@g1"), sealed, &why));
  EXPECT_FALSE(unseal(node, peer_key_context("n1", "lab@g2"), sealed, &why));
  std::string flipped = sealed;
  flipped[40] = flipped[40] == '0' ? '1' : '0';
  EXPECT_FALSE(unseal(node, ctx, flipped, &why));
  EXPECT_FALSE(unseal(node, ctx, sealed.substr(2), &why));
  EXPECT_FALSE(unseal(node, ctx, "zz" + sealed.substr(2), &why));
  EXPECT_EQ(peer_identity("lab@g1"), "peer/lab@g1");
}

}  // namespace
}  // namespace tls
