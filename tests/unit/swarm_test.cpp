// tracker::Swarm against a trivial model: per-slot std::set of chunks, and
// the rules written out plainly (holders, coalescing, load, quarantine,
// expiry, leaving).
#include "tracker/swarm.hpp"
#include "tracker/tracker.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>

namespace tracker {
namespace {

SwarmLimits limits() {
  SwarmLimits l;
  l.peer_timeout = 60;
  l.quarantine = 300;
  l.load_half_life = 10;
  return l;
}

uint32_t slot_of(const Swarm& s, const std::string& node) {
  for (const PeerStats& p : s.stats(0).peers)
    if (p.node == node) return p.slot;
  return 0;
}

TEST(Swarm, FirstAskerGetsTheServerThenIsTheSource) {
  Swarm s(100, limits());
  auto a = s.sources("a", "10.0.0.1:1", {0, 1, 2}, 0);
  EXPECT_EQ(a.sources, (std::vector<uint32_t>{0, 0, 0}));
  EXPECT_TRUE(a.peers.empty());
  auto b = s.sources("b", "10.0.0.2:1", {2, 1, 0, 3}, 1);
  const uint32_t sa = slot_of(s, "a");
  EXPECT_EQ(b.sources, (std::vector<uint32_t>{sa, sa, sa, 0}));
  EXPECT_EQ(b.peers, (std::map<uint32_t, std::string>{{sa, "10.0.0.1:1"}}));
  SwarmStats st = s.stats(1);
  EXPECT_EQ(st.server_answers, 4u);
  EXPECT_EQ(st.peer_answers, 3u);
  EXPECT_EQ(st.peers[sa - 1].answers, 3u);
  EXPECT_EQ(st.peers[slot_of(s, "b") - 1].chunks_held, 4u);
}

TEST(Swarm, LeastLoadedHolderWins) {
  Swarm s(100, limits());
  s.sources("a", "a:1", {0, 1, 2, 3}, 0);
  s.sources("b", "b:1", {0, 1, 2, 3}, 0);  // a: load 4
  s.have("a", "a:1", {0, 1, 2, 3}, 0);
  s.have("b", "b:1", {0, 1, 2, 3}, 0);
  const uint32_t sa = slot_of(s, "a"), sb = slot_of(s, "b");
  // b is idle: it takes chunks until its load passes a's.
  auto c = s.sources("c", "c:1", {0, 1, 2, 3, 0, 1}, 0);
  EXPECT_EQ(c.sources, (std::vector<uint32_t>{sb, sb, sb, sb, sa, sb}));
}

TEST(Swarm, LoadDecays) {
  Swarm s(10, limits());
  s.sources("a", "a:1", {0}, 0);
  s.sources("b", "b:1", {0}, 0);
  s.have("a", "a:1", {0}, 0);
  s.have("b", "b:1", {0}, 0);
  for (int i = 0; i < 7; ++i) s.sources("x" + std::to_string(i), "", {0}, 0);
  const uint32_t sa = slot_of(s, "a");
  EXPECT_NEAR(s.stats(0).peers[sa - 1].load, 4, 1e-9);  // a, b alternated
  EXPECT_NEAR(s.stats(20).peers[sa - 1].load, 1, 1e-9);  // two half-lives
}

TEST(Swarm, NeverTheAskerNorANonServingNode) {
  Swarm s(10, limits());
  s.sources("a", "", {0, 1}, 0);  // does not serve
  EXPECT_EQ(s.sources("b", "b:1", {0, 1}, 0).sources, (std::vector<uint32_t>{0, 0}));
  EXPECT_EQ(s.sources("b", "b:1", {0, 1}, 0).sources, (std::vector<uint32_t>{0, 0}));
  EXPECT_EQ(s.stats(0).peers[slot_of(s, "a") - 1].chunks_held, 0u);
}

TEST(Swarm, AMovedPeerHoldsNothingAtItsNewAddress) {
  Swarm s(10, limits());
  s.sources("a", "a:1", {0, 1}, 0);
  s.report("a", "a:2", {}, {}, std::nullopt, false, 1, nullptr);
  EXPECT_EQ(s.sources("b", "b:1", {0}, 1).sources, (std::vector<uint32_t>{0}));
}

TEST(Swarm, QuarantineLastsItsTime) {
  Swarm s(10, limits());
  s.sources("a", "a:1", {0}, 0);
  const uint32_t sa = slot_of(s, "a");
  std::string err;
  ASSERT_TRUE(s.report("b", "b:1", {}, {}, sa, false, 1, &err));
  EXPECT_EQ(s.sources("c", "c:1", {0}, 2).sources, (std::vector<uint32_t>{0}));
  // a fetches chunk 5 again while quarantined: not handed out until 301.
  s.sources("a", "a:1", {5}, 100);
  EXPECT_EQ(s.sources("d", "d:1", {5}, 200).sources, (std::vector<uint32_t>{0}));
  s.sources("a", "a:1", {6}, 250);
  EXPECT_EQ(s.sources("e", "e:1", {6}, 302).sources, (std::vector<uint32_t>{sa}));
  EXPECT_EQ(s.stats(302).quarantines, 1u);
}

TEST(Swarm, BadPeerMustBeAnotherNodesSlot) {
  Swarm s(10, limits());
  s.sources("a", "a:1", {0}, 0);
  std::string err;
  EXPECT_FALSE(s.report("a", "a:1", {}, {}, slot_of(s, "a"), false, 0, &err));
  EXPECT_FALSE(s.report("a", "a:1", {}, {}, 0u, false, 0, &err));
  EXPECT_FALSE(s.report("a", "a:1", {}, {}, 7u, false, 0, &err));
  EXPECT_EQ(s.stats(0).quarantines, 0u);
  EXPECT_EQ(s.stats(0).peers.size(), 1u);  // a refused report registers nobody
}

TEST(Swarm, ExpiryAndLeavingKeepTheSlot) {
  Swarm s(10, limits());
  s.sources("a", "a:1", {0}, 0);
  s.sources("b", "b:1", {1}, 30);
  const uint32_t sa = slot_of(s, "a");
  s.expire(61);
  SwarmStats st = s.stats(61);
  EXPECT_FALSE(st.peers[sa - 1].live);
  EXPECT_EQ(st.peers[sa - 1].chunks_held, 0u);
  EXPECT_EQ(st.expired, 1u);
  EXPECT_EQ(s.sources("c", "c:1", {0, 1}, 61).sources,
            (std::vector<uint32_t>{0, slot_of(s, "b")}));
  s.report("b", "b:1", {}, {}, std::nullopt, true, 62, nullptr);
  EXPECT_EQ(s.sources("d", "d:1", {1}, 62).sources, (std::vector<uint32_t>{slot_of(s, "c")}));
  s.sources("a", "a:1", {2}, 63);
  EXPECT_EQ(slot_of(s, "a"), sa);
}

TEST(Swarm, BoundedScanStillSpreadsLoad) {
  SwarmLimits l = limits();
  l.max_candidates = 4;
  Swarm s(1, l);
  for (int i = 0; i < 50; ++i) s.have("h" + std::to_string(i), "h:" + std::to_string(i), {0}, 0);
  // 50 holders, 4 looked at per answer: 500 answers reach every holder.
  for (int i = 0; i < 500; ++i) s.sources("x", "", {0}, 0);
  uint64_t most = 0, fewest = UINT64_MAX;
  for (const PeerStats& p : s.stats(0).peers) {
    if (p.node == "x") continue;
    most = std::max(most, p.answers);
    fewest = std::min(fewest, p.answers);
  }
  EXPECT_GE(fewest, 1u);
  EXPECT_LE(most, 60u);
}

TEST(Swarm, WhileNobodyHasAChunkItsAskersFormATree) {
  SwarmLimits l = limits();
  l.fanout = 2;
  Swarm s(4, l);
  std::vector<uint32_t> got;
  for (int i = 0; i < 7; ++i) {
    const std::string n = "n" + std::to_string(i);
    got.push_back(s.sources(n, n + ":1", {0}, 0).sources[0]);
  }
  auto slot = [&](int i) { return slot_of(s, "n" + std::to_string(i)); };
  // n0 the server; n1, n2 -> n0; n3, n4 -> n1; n5, n6 -> n2.
  EXPECT_EQ(got, (std::vector<uint32_t>{0, slot(0), slot(0), slot(1), slot(1), slot(2), slot(2)}));
  // Once a node has it, askers go to the holders that have it.
  s.have("n5", "n5:1", {0}, 1);
  EXPECT_EQ(s.sources("n7", "n7:1", {0}, 1).sources[0], slot(5));
  // A parent that left is skipped: the least loaded holder instead.
  ASSERT_TRUE(s.report("n5", "n5:1", {}, {}, std::nullopt, true, 1, nullptr));
  uint32_t src = s.sources("n8", "n8:1", {0}, 1).sources[0];
  EXPECT_NE(src, 0u);
  EXPECT_NE(src, slot(5));
  // Asking again keeps a node's place in the tree.
  EXPECT_EQ(s.sources("n4", "n4:1", {0}, 1).sources[0], slot(1));
}

TEST(Swarm, AReportOfHeldChunksMakesAHolder) {
  Swarm s(100, limits());
  std::string err;
  ASSERT_TRUE(s.report("a", "10.0.0.1:1", {}, {4, 5}, std::nullopt, false, 0, &err));
  const uint32_t sa = slot_of(s, "a");
  EXPECT_EQ(s.sources("b", "10.0.0.2:1", {4, 5, 6}, 1).sources, (std::vector<uint32_t>{sa, sa, 0}));
  // A node that does not serve holds nothing, whatever it says.
  ASSERT_TRUE(s.report("c", "", {}, {7}, std::nullopt, false, 1, &err));
  EXPECT_EQ(s.sources("d", "10.0.0.4:1", {7}, 1).sources, (std::vector<uint32_t>{0}));
}

TEST(Swarm, BootOrderIsFirstAsksWithinTheWindow) {
  SwarmLimits l = limits();
  l.order_window = 100;
  Swarm s(100, l);
  s.sources("a", "10.0.0.1:1", {5, 3}, 0);
  s.sources("b", "", {3, 9, 5, 1}, 10);  // a node that does not serve counts too
  EXPECT_EQ(s.order(), (std::vector<uint32_t>{5, 3, 9, 1}));
  s.sources("a", "10.0.0.1:1", {7}, 99);   // within a's window
  s.sources("a", "10.0.0.1:1", {8}, 100);  // after it: a is no longer booting
  s.sources("c", "10.0.0.3:1", {2}, 150);  // c's first call starts its window
  EXPECT_EQ(s.order(), (std::vector<uint32_t>{5, 3, 9, 1, 7, 2}));
  // A saved order is taken only before anything is recorded.
  EXPECT_EQ(s.seed_order({40, 41}), 0u);
  Swarm t(10, l);
  EXPECT_EQ(t.seed_order({4, 4, 12, 3, 9}), 3u);  // repeats and chunks out of range skipped
  EXPECT_EQ(t.order(), (std::vector<uint32_t>{4, 3, 9}));
  t.sources("a", "10.0.0.1:1", {3, 0}, 0);
  EXPECT_EQ(t.order(), (std::vector<uint32_t>{4, 3, 9, 0}));
}

TEST(Tracker, BootOrderOutlivesTheTracker) {
  char tmpl[] = "/tmp/nbdroot-order-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = std::string(tmpl) + "/tracker";  // made by the first save
  {
    Tracker t(limits(), dir);
    t.with("lab@g1", 50, [](Swarm& s, double now) { return s.sources("a", "", {7, 2, 40}, now); });
    EXPECT_EQ(t.save_orders(), 1u);
    EXPECT_EQ(t.save_orders(), 0u);  // nothing new
    t.with("lab@g1", 50, [](Swarm& s, double now) { return s.sources("b", "", {2, 3}, now); });
  }  // the destructor saves what grew
  Tracker t(limits(), dir);
  auto order = t.with("lab@g1", 50, [](Swarm& s, double) { return s.order(); });
  EXPECT_EQ(order, (std::vector<uint32_t>{7, 2, 40, 3}));
  // The order of another size of generation, or a damaged file, is ignored.
  Tracker u(limits(), dir);
  EXPECT_TRUE(u.with("lab@g1", 40, [](Swarm& s, double) { return s.order().empty(); }));
  std::ofstream(dir + "/lab@g2.order") << "nbdroot.boot-order/1 50\n1 2 x3\n";
  EXPECT_TRUE(u.with("lab@g2", 50, [](Swarm& s, double) { return s.order().empty(); }));
  std::filesystem::remove_all(tmpl);
}

TEST(Tracker, AnOrderThatCannotBeSavedIsKeptAndTriedAgain) {
  char tmpl[] = "/tmp/nbdroot-order-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = std::string(tmpl) + "/tracker";
  std::ofstream(dir) << "a file where the directory should be\n";
  Tracker t(limits(), dir);
  t.with("lab@g1", 50, [](Swarm& s, double now) { return s.sources("a", "", {7, 2}, now); });
  EXPECT_EQ(t.save_orders(), 0u);  // logged, nothing lost
  EXPECT_EQ(t.with("lab@g1", 50, [](Swarm& s, double) { return s.order().size(); }), 2u);
  std::filesystem::remove(dir);
  EXPECT_EQ(t.save_orders(), 1u);  // the next try writes it
  std::filesystem::remove_all(tmpl);
}

TEST(Tracker, ParseOrder) {
  std::vector<uint32_t> o;
  std::string err;
  EXPECT_TRUE(Tracker::parse_order(Tracker::format_order(9, {8, 0, 3}), 9, &o, &err)) << err;
  EXPECT_EQ(o, (std::vector<uint32_t>{8, 0, 3}));
  EXPECT_TRUE(Tracker::parse_order("nbdroot.boot-order/1 9\n", 9, &o, &err));
  EXPECT_TRUE(o.empty());
  EXPECT_FALSE(Tracker::parse_order("", 9, &o, &err));
  EXPECT_FALSE(Tracker::parse_order("nbdroot.boot-order/1 9\n9\n", 9, &o, &err));
  EXPECT_NE(err.find("out of range"), std::string::npos);
  EXPECT_FALSE(Tracker::parse_order("nbdroot.boot-order/1 9\n-1\n", 9, &o, &err));
  EXPECT_FALSE(Tracker::parse_order("nbdroot.boot-order/1 9\n99999999999\n", 9, &o, &err));
}

// Random operations against a model of who holds what.
TEST(Swarm, MatchesAModel) {
  std::mt19937 rng(7);
  const uint32_t chunks = 64;
  Swarm s(chunks, limits());
  std::map<std::string, std::set<uint32_t>> held;  // live serving nodes only
  std::map<std::string, double> seen;
  double now = 0;
  for (int step = 0; step < 5000; ++step) {
    now += std::uniform_real_distribution<double>(0, 0.05)(rng);
    const std::string node = "n" + std::to_string(rng() % 12);
    for (auto it = held.begin(); it != held.end();)  // the model's expiry
      it = now - seen[it->first] >= 60 ? held.erase(it) : std::next(it);
    const int op = rng() % 10;
    std::vector<uint32_t> cs;
    for (unsigned i = rng() % 8; i > 0; --i) cs.push_back(rng() % chunks);
    seen[node] = now;
    if (op < 6) {
      SourcesAnswer a = s.sources(node, node + ":1", cs, now);
      ASSERT_EQ(a.sources.size(), cs.size());
      for (size_t i = 0; i < cs.size(); ++i) {
        bool anyone = false;
        for (const auto& [n, set] : held) anyone |= n != node && set.count(cs[i]);
        if (a.sources[i] == 0) {
          EXPECT_FALSE(anyone) << "chunk " << cs[i] << " has a holder";
        } else {
          const std::string h = s.node_of(a.sources[i]);
          EXPECT_NE(h, node);
          EXPECT_TRUE(held[h].count(cs[i])) << h << " does not hold " << cs[i];
        }
      }
      held[node].insert(cs.begin(), cs.end());
    } else if (op < 8) {
      s.have(node, node + ":1", cs, now);
      held[node].insert(cs.begin(), cs.end());
    } else if (op < 9) {
      ASSERT_TRUE(s.report(node, node + ":1", cs, {}, std::nullopt, false, now, nullptr));
      for (uint32_t c : cs) held[node].erase(c);
    } else {
      ASSERT_TRUE(s.report(node, node + ":1", {}, {}, std::nullopt, true, now, nullptr));
      held.erase(node);
    }
    for (const PeerStats& p : s.stats(now).peers) {
      auto it = held.find(p.node);
      ASSERT_EQ(p.chunks_held, it == held.end() ? 0u : it->second.size()) << p.node;
    }
  }
}

}  // namespace
}  // namespace tracker
