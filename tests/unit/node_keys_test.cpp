// storage/node_keys on a real store directory: creation with mode 0600,
// rotation, expiry with a clock the test drives, arming and the one-time
// delivery, removal, and every kind of corrupt key file (refused with a
// reason, never a crash).
#include "storage/node_keys.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

namespace storage {
namespace {

namespace fs = std::filesystem;

constexpr const char* kNode = "52-54-00-12-34-56";
constexpr int64_t kT0 = 1'800'000'000;

class NodeKeysTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/node_keys_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { fs::remove_all(root_); }

  std::string path(const std::string& node = kNode) const {
    return root_ + "/nodes/" + node + "/tls-key.json";
  }
  NodeKey create(int64_t expires_in = 0, int64_t now = kT0, const std::string& node = kNode) {
    NodeKey k;
    bool rotated = false;
    std::string err;
    EXPECT_TRUE(create_or_rotate(root_, node, expires_in, now, &k, &rotated, &err)) << err;
    return k;
  }
  nlohmann::json read_json() const {
    std::ifstream in(path());
    std::stringstream ss;
    ss << in.rdbuf();
    return nlohmann::json::parse(ss.str());
  }
  // Replaces the key file with `text`, mode 0600, as a careless edit would.
  void write_raw(const std::string& text) const {
    fs::create_directories(root_ + "/nodes/" + kNode);
    unlink(path().c_str());
    int fd = ::open(path().c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, text.data(), text.size()), ssize_t(text.size()));
    ::close(fd);
  }
  // load() must refuse the file as corrupt, naming `words`.
  void expect_corrupt(const std::string& words) const {
    std::string why;
    KeyStatus st = KeyStatus::kOk;
    EXPECT_FALSE(load(root_, kNode, kT0, &why, &st).has_value());
    EXPECT_EQ(st, KeyStatus::kCorrupt) << why;
    EXPECT_NE(why.find("corrupt key file: " + path() + ": "), std::string::npos) << why;
    EXPECT_NE(why.find(words), std::string::npos) << why;
  }

  std::string root_;
};

TEST_F(NodeKeysTest, CreateWritesA256BitKeyWithMode0600) {
  const mode_t old = umask(0);  // the mode must not depend on the umask
  NodeKey k = create();
  umask(old);
  struct stat st;
  ASSERT_EQ(stat(path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(st.st_uid, geteuid());
  EXPECT_EQ(k.node, kNode);
  EXPECT_EQ(k.created, kT0);
  EXPECT_EQ(k.expires, 0);
  EXPECT_EQ(k.generation, 0u);
  EXPECT_FALSE(k.armed);
  EXPECT_EQ(k.delivered_at, 0);
  EXPECT_NE(k.key, tls::Key{});
  const nlohmann::json j = read_json();
  EXPECT_EQ(j["node"], kNode);
  EXPECT_TRUE(std::regex_match(j["key"].get<std::string>(), std::regex("[0-9a-f]{64}")));
  for (const char* f : {"created", "expires", "generation", "armed", "armed_at", "delivered_at"})
    EXPECT_TRUE(j.contains(f)) << f;
  EXPECT_EQ(psk_line(k), std::string(kNode) + ":" + j["key"].get<std::string>());
  // Nothing else is left in the node's directory but the lock file.
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(root_ + "/nodes/" + kNode))
    names.insert(e.path().filename());
  EXPECT_EQ(names, (std::set<std::string>{"tls-key.json", "tls-key.lock"}));
  std::string why;
  auto back = load(root_, kNode, kT0, &why);
  ASSERT_TRUE(back) << why;
  EXPECT_EQ(back->key, k.key);
}

TEST_F(NodeKeysTest, RotationReplacesTheKeyAtOnce) {
  NodeKey a = create();
  std::string err;
  ASSERT_TRUE(arm(root_, kNode, kT0 + 1, &a, &err)) << err;
  NodeKey b;
  bool rotated = false;
  ASSERT_TRUE(create_or_rotate(root_, kNode, 0, kT0 + 2, &b, &rotated, &err)) << err;
  EXPECT_TRUE(rotated);
  EXPECT_NE(a.key, b.key);
  EXPECT_EQ(b.generation, 1u);
  EXPECT_EQ(b.created, kT0 + 2);
  EXPECT_FALSE(b.armed);  // an arming was for the old key
  auto now = load(root_, kNode, kT0 + 3, &err);
  ASSERT_TRUE(now) << err;
  EXPECT_EQ(now->key, b.key);  // the old value is gone
  NodeKey c = create(0, kT0 + 4);
  EXPECT_EQ(c.generation, 2u);
  EXPECT_NE(c.key, b.key);
  struct stat st;
  ASSERT_EQ(stat(path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
}

TEST_F(NodeKeysTest, KeysOfTwoNodesDiffer) {
  EXPECT_NE(create(0, kT0, "n1").key, create(0, kT0, "n2").key);
}

TEST_F(NodeKeysTest, ExpiryIsCheckedAtEachLoad) {
  create(100);
  std::string why;
  KeyStatus st;
  EXPECT_TRUE(load(root_, kNode, kT0 + 99, &why, &st)) << why;
  EXPECT_EQ(st, KeyStatus::kOk);
  EXPECT_FALSE(load(root_, kNode, kT0 + 100, &why, &st));
  EXPECT_EQ(st, KeyStatus::kExpired);
  EXPECT_EQ(why, "key expired at " + utc_time(kT0 + 100));
  EXPECT_EQ(utc_time(kT0 + 100), "2027-01-15T08:01:40Z");
  // An expired key is neither armed nor delivered.
  NodeKey k;
  EXPECT_FALSE(arm(root_, kNode, kT0 + 200, &k, &why, &st));
  EXPECT_EQ(st, KeyStatus::kExpired);
  EXPECT_FALSE(take_armed(root_, kNode, kT0 + 200, &why, &st));
  EXPECT_EQ(st, KeyStatus::kExpired);
  // Rotating it makes a valid one; 0 is never.
  NodeKey n = create(0, kT0 + 300);
  EXPECT_EQ(n.generation, 1u);
  EXPECT_TRUE(load(root_, kNode, kT0 + 100 * 365 * 86400LL, &why)) << why;
}

TEST_F(NodeKeysTest, MissingKey) {
  std::string why;
  KeyStatus st;
  // No nodes/ at all, then a node directory without a key.
  EXPECT_FALSE(load(root_, kNode, kT0, &why, &st));
  EXPECT_EQ(st, KeyStatus::kMissing);
  EXPECT_EQ(why, "no key");
  fs::create_directories(root_ + "/nodes/" + kNode);
  EXPECT_FALSE(load(root_, kNode, kT0, &why, &st));
  EXPECT_EQ(why, "no key");
  NodeKey k;
  EXPECT_FALSE(arm(root_, kNode, kT0, &k, &why, &st));
  EXPECT_EQ(st, KeyStatus::kMissing);
  EXPECT_EQ(why, "no key");
  EXPECT_FALSE(take_armed(root_, kNode, kT0, &why, &st));
  EXPECT_EQ(st, KeyStatus::kMissing);
  // Neither left a lock file behind.
  EXPECT_FALSE(fs::exists(root_ + "/nodes/" + kNode + "/tls-key.lock"));
  EXPECT_FALSE(fs::exists(root_ + "/nodes/other"));
}

TEST_F(NodeKeysTest, BadNodeNamesAreRefusedBeforeAnyPath) {
  const std::vector<std::string> names = {"",      ".",   "..",    "../x",
                                          "a/b",   ".hidden", "n 1", "n\n1",
                                          std::string(201, 'a'), std::string("n\0x", 3)};
  for (const std::string& node : names) {
    std::string why;
    KeyStatus st = KeyStatus::kOk;
    EXPECT_FALSE(load(root_, node, kT0, &why, &st));
    EXPECT_EQ(st, KeyStatus::kCorrupt);
    EXPECT_NE(why.find("bad node name"), std::string::npos) << why;
    NodeKey k;
    bool rotated;
    EXPECT_FALSE(create_or_rotate(root_, node, 0, kT0, &k, &rotated, &why));
    EXPECT_NE(why.find("bad node name"), std::string::npos) << why;
    EXPECT_FALSE(arm(root_, node, kT0, &k, &why));
    EXPECT_FALSE(take_armed(root_, node, kT0, &why));
    bool existed;
    EXPECT_FALSE(remove(root_, node, &existed, &why));
  }
  EXPECT_FALSE(fs::exists(root_ + "/nodes"));
  EXPECT_FALSE(fs::exists(root_ + "/x"));
}

TEST_F(NodeKeysTest, ArmedKeyIsDeliveredOnce) {
  NodeKey k = create();
  std::string why;
  KeyStatus st;
  EXPECT_FALSE(take_armed(root_, kNode, kT0 + 1, &why, &st));
  EXPECT_EQ(st, KeyStatus::kNotArmed);
  EXPECT_EQ(why, "not armed");
  NodeKey armed;
  ASSERT_TRUE(arm(root_, kNode, kT0 + 2, &armed, &why, &st)) << why;
  EXPECT_TRUE(armed.armed);
  EXPECT_EQ(armed.armed_at, kT0 + 2);
  EXPECT_EQ(armed.key, k.key);  // arming does not rotate
  EXPECT_EQ(read_json()["armed"], true);
  auto got = take_armed(root_, kNode, kT0 + 3, &why, &st);
  ASSERT_TRUE(got) << why;
  EXPECT_EQ(st, KeyStatus::kOk);
  EXPECT_EQ(got->key, k.key);
  EXPECT_FALSE(got->armed);
  EXPECT_EQ(got->delivered_at, kT0 + 3);
  EXPECT_EQ(read_json()["armed"], false);
  EXPECT_EQ(read_json()["delivered_at"], kT0 + 3);
  // The second fetch gets nothing, and is told apart from "never armed".
  EXPECT_FALSE(take_armed(root_, kNode, kT0 + 4, &why, &st));
  EXPECT_EQ(st, KeyStatus::kAlreadyDelivered);
  EXPECT_EQ(why, "already delivered at " + utc_time(kT0 + 3) + " (second fetch)");
  // The key itself still works (load), and a new arming delivers it again.
  EXPECT_TRUE(load(root_, kNode, kT0 + 5, &why)) << why;
  ASSERT_TRUE(arm(root_, kNode, kT0 + 6, &armed, &why)) << why;
  got = take_armed(root_, kNode, kT0 + 7, &why, &st);
  ASSERT_TRUE(got) << why;
  EXPECT_EQ(got->delivered_at, kT0 + 7);
  struct stat s;
  ASSERT_EQ(stat(path().c_str(), &s), 0);
  EXPECT_EQ(s.st_mode & 07777, 0600u);
}

TEST_F(NodeKeysTest, ConcurrentFetchesTakeAnArmedKeyOnce) {
  create();
  std::string why;
  NodeKey k;
  ASSERT_TRUE(arm(root_, kNode, kT0, &k, &why)) << why;
  std::atomic<int> taken{0}, second{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] {
      std::string w;
      KeyStatus st;
      if (take_armed(root_, kNode, kT0 + 1, &w, &st)) ++taken;
      else if (st == KeyStatus::kAlreadyDelivered) ++second;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(taken.load(), 1);
  EXPECT_EQ(second.load(), 7);
}

TEST_F(NodeKeysTest, Remove) {
  create();
  bool existed = false;
  std::string err;
  ASSERT_TRUE(remove(root_, kNode, &existed, &err)) << err;
  EXPECT_TRUE(existed);
  KeyStatus st;
  EXPECT_FALSE(load(root_, kNode, kT0, &err, &st));
  EXPECT_EQ(st, KeyStatus::kMissing);
  ASSERT_TRUE(remove(root_, kNode, &existed, &err)) << err;
  EXPECT_FALSE(existed);
  ASSERT_TRUE(remove(root_, "never-seen", &existed, &err)) << err;
  EXPECT_FALSE(existed);
  EXPECT_FALSE(fs::exists(root_ + "/nodes/never-seen"));
  // A new key after removal starts again at generation 0.
  EXPECT_EQ(create().generation, 0u);
}

TEST_F(NodeKeysTest, CorruptJson) {
  write_raw("{\"node\": \"x\", ");
  expect_corrupt("not valid JSON");
  write_raw("[1, 2]");
  expect_corrupt("not a JSON object");
  write_raw("");
  expect_corrupt("not valid JSON");
}

TEST_F(NodeKeysTest, CorruptFields) {
  create();
  const nlohmann::json good = read_json();
  auto with = [&](const char* field, const nlohmann::json& v) {
    nlohmann::json j = good;
    if (v.is_null()) j.erase(field);
    else j[field] = v;
    write_raw(j.dump());
  };
  const std::string hex = good["key"];
  with("key", hex.substr(0, 62));
  expect_corrupt("key: expected 64 hex digits");
  with("key", hex + "00");
  expect_corrupt("key: expected 64 hex digits");
  with("key", "zz" + hex.substr(2));
  expect_corrupt("key: expected 64 hex digits");
  with("key", " " + hex.substr(1));
  expect_corrupt("key: expected 64 hex digits");
  with("key", 42);
  expect_corrupt("key: expected 64 hex digits");
  with("key", nullptr);
  expect_corrupt("key: expected 64 hex digits");
  with("node", "other");
  expect_corrupt("node: expected");
  with("created", -1);
  expect_corrupt("created: expected a non-negative integer");
  with("expires", "soon");
  expect_corrupt("expires: expected a non-negative integer");
  with("generation", 1.5);
  expect_corrupt("generation: expected a non-negative integer");
  with("delivered_at", nullptr);
  expect_corrupt("delivered_at: expected");
  with("armed", "yes");
  expect_corrupt("armed: expected true or false");
  // Upper-case hex (an admin's edit) is still the same key.
  with("key", [&] {
    std::string u = hex;
    for (char& c : u) c = char(toupper(c));
    return u;
  }());
  std::string why;
  EXPECT_TRUE(load(root_, kNode, kT0, &why)) << why;
}

TEST_F(NodeKeysTest, CorruptModeOrKind) {
  create();
  ASSERT_EQ(chmod(path().c_str(), 0640), 0);
  expect_corrupt("mode 0640: others than its owner may use it (it must be 0600)");
  ASSERT_EQ(chmod(path().c_str(), 0604), 0);
  expect_corrupt("mode 0604");
  ASSERT_EQ(chmod(path().c_str(), 0400), 0);  // narrower is fine
  std::string why;
  EXPECT_TRUE(load(root_, kNode, kT0, &why)) << why;
  ASSERT_EQ(chmod(path().c_str(), 0600), 0);
  // Rotation replaces a file with a wide mode by one with mode 0600.
  ASSERT_EQ(chmod(path().c_str(), 0666), 0);
  NodeKey k;
  bool rotated = true;
  ASSERT_TRUE(create_or_rotate(root_, kNode, 0, kT0, &k, &rotated, &why)) << why;
  EXPECT_FALSE(rotated);  // the corrupt file counted as no key
  struct stat st;
  ASSERT_EQ(stat(path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  // A symbolic link (to a file that is fine), a directory, a FIFO.
  fs::rename(path(), root_ + "/elsewhere.json");
  fs::create_symlink(root_ + "/elsewhere.json", path());
  expect_corrupt("a symbolic link");
  unlink(path().c_str());
  fs::create_directory(path());
  expect_corrupt("not a regular file");
  fs::remove(path());
  ASSERT_EQ(mkfifo(path().c_str(), 0600), 0);
  expect_corrupt("not a regular file");
  unlink(path().c_str());
  write_raw(std::string(5000, ' '));
  expect_corrupt("larger than 4096 bytes");
}

TEST_F(NodeKeysTest, CorruptOwner) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to give the file to another user";
  create();
  ASSERT_EQ(chown(path().c_str(), 65534, 65534), 0);
  expect_corrupt("owned by uid 65534, not by this user (uid 0)");
}

TEST(KeyLifetime, Parse) {
  int64_t s = -1;
  EXPECT_TRUE(parse_key_lifetime("0", &s));
  EXPECT_EQ(s, 0);
  EXPECT_TRUE(parse_key_lifetime("30d", &s));
  EXPECT_EQ(s, 30 * 86400);
  EXPECT_TRUE(parse_key_lifetime("12h", &s));
  EXPECT_EQ(s, 12 * 3600);
  EXPECT_TRUE(parse_key_lifetime("90m", &s));
  EXPECT_EQ(s, 90 * 60);
  EXPECT_TRUE(parse_key_lifetime("3600s", &s));
  EXPECT_EQ(s, 3600);
  EXPECT_TRUE(parse_key_lifetime("36600d", &s));
  for (const char* bad : {"", "30", "d", "30x", "-1d", "1.5h", "0s", "00", "030d", "30D", " 30d",
                          "30d ", "36601d", "99999999999d", "1e3s"})
    EXPECT_FALSE(parse_key_lifetime(bad, &s)) << bad;
}

}  // namespace
}  // namespace storage
