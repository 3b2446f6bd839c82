#include "tracker/swarm.hpp"

#include <algorithm>
#include <cassert>
#include <cmath>

namespace tracker {

Swarm::Swarm(uint64_t chunks, SwarmLimits limits) : chunks_(chunks), limits_(limits) {}

uint32_t Swarm::touch(const std::string& node, const std::string& address, double now) {
  auto [it, added] = slots_.emplace(node, static_cast<uint32_t>(peers_.size() + 1));
  if (added) {
    peers_.emplace_back();
    peers_.back().node = node;
    peers_.back().first_seen = now;
  }
  const uint32_t slot = it->second;
  Peer& p = peers_[slot - 1];
  if (p.address != address) {
    drop_all(p, slot);  // a peer that moved or stopped serving holds nothing there
    p.address = address;
  }
  p.live = true;
  p.last_seen = now;
  return slot;
}

void Swarm::drop_all(Peer& p, uint32_t slot) {
  for (uint32_t c : p.chunks) drop(p, slot, c);
  p.chunks = Roaring();
  p.ready = Roaring();
}

// Forgets that slot holds chunk in the indexes (not in p.chunks: the
// caller does that).
void Swarm::drop(Peer& p, uint32_t slot, uint32_t chunk) {
  for (auto* index : {&holders_, &ready_}) {
    auto h = index->find(chunk);
    if (h == index->end()) continue;
    h->second.remove(slot);
    if (h->second.isEmpty()) index->erase(h);
  }
  p.ready.remove(chunk);
}

void Swarm::hold(Peer& p, uint32_t slot, uint32_t chunk) {
  if (p.address.empty()) return;
  p.chunks.add(chunk);
  holders_[chunk].add(slot);
}

void Swarm::mark_ready(Peer& p, uint32_t slot, uint32_t chunk) {
  if (p.address.empty()) return;
  hold(p, slot, chunk);
  if (p.ready.addChecked(chunk)) ready_[chunk].add(slot);
}

double Swarm::load_of(const Peer& p, double now) const {
  const double age = now - p.load_at;
  return age <= 0 ? p.load : p.load * std::exp2(-age / limits_.load_half_life);
}

bool Swarm::eligible(const Peer& p, double now) const {
  return p.live && !p.address.empty() && now >= p.quarantined_until;
}

uint32_t Swarm::least_loaded(const Roaring& slots, uint32_t asker, double now) {
  uint32_t best = 0;
  double best_load = 0;
  unsigned seen = 0;
  // Two passes: from the cursor to the end, then from the start.
  for (int pass = 0; pass < 2 && seen < limits_.max_candidates; ++pass) {
    auto it = slots.begin();
    if (pass == 0) it.equalorlarger(cursor_);
    for (; it != slots.end() && seen < limits_.max_candidates; ++it) {
      const uint32_t s = *it;
      if (pass == 1 && s >= cursor_) break;
      if (s == asker) continue;
      const Peer& p = peers_[s - 1];
      if (!eligible(p, now)) continue;
      ++seen;
      const double l = load_of(p, now);
      if (best == 0 || l < best_load) {
        best = s;
        best_load = l;
      }
    }
  }
  if (slots.cardinality() > limits_.max_candidates) cursor_ = best + 1;
  return best;
}

uint32_t Swarm::pick(uint32_t chunk, uint32_t asker, double now) {
  auto h = holders_.find(chunk);
  if (h == holders_.end()) return 0;
  if (auto r = ready_.find(chunk); r != ready_.end())
    if (uint32_t s = least_loaded(r->second, asker, now)) return s;
  if (auto a = askers_.find(chunk); a != askers_.end() && !a->second.empty()) {
    const std::vector<uint32_t>& v = a->second;
    auto self = std::find(v.begin(), v.end(), asker);
    const size_t k = self != v.end() ? size_t(self - v.begin()) : v.size();
    if (k >= 1) {
      const uint32_t parent = v[(k - 1) / std::max(1u, limits_.fanout)];
      if (parent != asker && h->second.contains(parent) && eligible(peers_[parent - 1], now))
        return parent;
    }
  }
  return least_loaded(h->second, asker, now);
}

SourcesAnswer Swarm::sources(const std::string& node, const std::string& address,
                             const std::vector<uint32_t>& want, double now) {
  expire(now);
  const uint32_t asker = touch(node, address, now);
  SourcesAnswer a;
  a.sources.reserve(want.size());
  for (uint32_t c : want) {
    assert(c < chunks_);
    const uint32_t s = pick(c, asker, now);
    a.sources.push_back(s);
    if (s == 0) {
      ++server_answers_;
      continue;
    }
    Peer& p = peers_[s - 1];
    p.load = load_of(p, now) + 1;
    p.load_at = now;
    ++p.answers;
    ++peer_answers_;
    a.peers.emplace(s, p.address);
  }
  Peer& me = peers_[asker - 1];
  const bool booting = now - me.first_seen < limits_.order_window;
  for (uint32_t c : want) {
    hold(me, asker, c);
    if (!me.address.empty()) {
      std::vector<uint32_t>& v = askers_[c];
      if (v.size() < limits_.tree_askers && std::find(v.begin(), v.end(), asker) == v.end())
        v.push_back(asker);
    }
    if (booting && in_order_.addChecked(c)) order_.push_back(c);
  }
  return a;
}

void Swarm::have(const std::string& node, const std::string& address,
                 const std::vector<uint32_t>& chunks, double now) {
  expire(now);
  const uint32_t slot = touch(node, address, now);
  Peer& me = peers_[slot - 1];
  for (uint32_t c : chunks) {
    assert(c < chunks_);
    mark_ready(me, slot, c);
  }
}

size_t Swarm::seed_order(const std::vector<uint32_t>& recorded) {
  if (!order_.empty()) return 0;
  for (uint32_t c : recorded)
    if (c < chunks_ && in_order_.addChecked(c)) order_.push_back(c);
  return order_.size();
}

bool Swarm::report(const std::string& node, const std::string& address,
                   const std::vector<uint32_t>& dropped, const std::vector<uint32_t>& held,
                   std::optional<uint32_t> bad_peer, bool leaving, double now, std::string* err) {
  auto mine = slots_.find(node);
  if (bad_peer && (*bad_peer == 0 || *bad_peer > peers_.size() ||
                   (mine != slots_.end() && mine->second == *bad_peer))) {
    *err = "bad_peer " + std::to_string(*bad_peer) + " is not another node's slot";
    return false;
  }
  expire(now);
  const uint32_t slot = touch(node, address, now);
  Peer& me = peers_[slot - 1];
  for (uint32_t c : dropped) {
    assert(c < chunks_);
    if (me.chunks.removeChecked(c)) drop(me, slot, c);
  }
  for (uint32_t c : held) {
    assert(c < chunks_);
    mark_ready(me, slot, c);
  }
  if (bad_peer) {
    Peer& bad = peers_[*bad_peer - 1];
    bad.quarantined_until = now + limits_.quarantine;
    drop_all(bad, *bad_peer);  // it said it held them; none of it is trusted now
    ++quarantines_;
  }
  if (leaving) {
    drop_all(me, slot);
    me.live = false;
  }
  return true;
}

std::string Swarm::node_of(uint32_t slot) const {
  return slot >= 1 && slot <= peers_.size() ? peers_[slot - 1].node : std::string();
}

void Swarm::expire(double now) {
  for (size_t i = 0; i < peers_.size(); ++i) {
    Peer& p = peers_[i];
    if (!p.live || now - p.last_seen < limits_.peer_timeout) continue;
    drop_all(p, static_cast<uint32_t>(i + 1));
    p.live = false;
    ++expired_;
  }
}

SwarmStats Swarm::stats(double now) const {
  SwarmStats s;
  s.chunks = chunks_;
  s.server_answers = server_answers_;
  s.peer_answers = peer_answers_;
  s.quarantines = quarantines_;
  s.expired = expired_;
  for (size_t i = 0; i < peers_.size(); ++i) {
    const Peer& p = peers_[i];
    s.peers.push_back({static_cast<uint32_t>(i + 1), p.node, p.address, p.live,
                       p.chunks.cardinality(), p.answers, load_of(p, now), p.last_seen,
                       p.quarantined_until});
  }
  return s;
}

}  // namespace tracker
