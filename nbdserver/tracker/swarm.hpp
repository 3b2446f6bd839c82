// The tracker's state for one generation: which peers hold which chunks.
//
// Nodes booting from IMAGE@GEN ask "where do I get chunks c1..cn"; the
// answer names, per chunk, a peer (a slot) or 0, the server. Every node
// that asks gets a slot: a small integer >= 1, stable for the life of the
// Swarm (a node that leaves and comes back gets its old slot), so a slot
// named in an answer or a report never means another node.
//
// Holdings are kept two ways, both roaring bitmaps:
//   holders_[chunk]  the slots holding the chunk: the index /sources reads,
//                    one lookup per chunk asked for;
//   Peer::chunks     the chunks a slot holds: compact (a booting node holds
//                    runs of chunks), counted for stats, and what is cleared
//                    from holders_ when the peer drops chunks, leaves,
//                    expires or is quarantined.
// Only a live peer with an address (it said it serves) is a holder.
//
// Coalescing: after answering, the asker becomes a holder of every chunk it
// asked for, since it is about to fetch each one from the server or a peer.
// The next asker for a chunk is sent to it, so each chunk leaves the server
// about once in a storm.
//
// Picking a source for a chunk, among live holders other than the asker,
// not quarantined:
//   1. holders that said they have it (have(), or a report's `held`): the
//      least loaded. Load: each answer naming a slot adds 1, decaying by
//      half every `load_half_life` seconds. At most `max_candidates`
//      holders are looked at, from a rotating point, so a chunk held by
//      thousands costs a bounded scan;
//   2. else, while nobody has it yet, a tree in the order nodes asked
//      (the first `tree_askers` askers of each chunk are kept): asker k
//      (k >= 1; asker 0 got the server) is sent to asker (k - 1) / fanout.
//      A storm's first askers of a chunk form a `fanout`-ary tree, so a
//      chunk passes through about log(N) nodes, where always picking the
//      least loaded holder (the newest asker, still waiting) made chains
//      about as long as the swarm and timed out;
//   3. else the least loaded holder, as in 1;
//   4. else the server (0).
//
// Boot order: the chunks of the generation in the order nodes first asked
// for them, each once, counting only what a node asks within `order_window`
// seconds of its first call (its boot, not what it reads days later).
// Agents prefetch in this order ahead of their kernel, as VMTorrent does
// with its recorded access profile; it is a hint only (a wrong order costs
// prefetched bytes, never correctness). The Tracker keeps it on disk.
//
// Time is an argument (seconds on a monotonic clock), so tests drive it.
// Not thread-safe: the owner (Tracker) serialises calls. No HTTP here.
#pragma once

#include <roaring/roaring.hh>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace tracker {

struct SwarmLimits {
  double peer_timeout = 60;       // a peer not heard from for this long expires
  double quarantine = 300;        // a peer reported bad is not handed out for this long
  double load_half_life = 10;     // seconds for a slot's load to halve
  unsigned max_candidates = 8;    // holders looked at per chunk
  double order_window = 120;      // seconds of a node's first asks that make the boot order
  unsigned fanout = 4;            // children per node in a chunk's tree (rule 2)
  unsigned tree_askers = 64;      // askers kept per chunk for the tree
};

struct PeerStats {
  uint32_t slot = 0;
  std::string node, address;  // address "" = not serving
  bool live = false;
  uint64_t chunks_held = 0;
  uint64_t answers = 0;       // times named as a source
  double load = 0;            // decayed, at the time of the query
  double last_seen = 0;
  double quarantined_until = 0;  // 0 = never quarantined
};

struct SwarmStats {
  uint64_t chunks = 0;
  uint64_t server_answers = 0;  // chunks the server was named source for
  uint64_t peer_answers = 0;
  uint64_t quarantines = 0;
  uint64_t expired = 0;
  std::vector<PeerStats> peers;  // by slot
};

struct SourcesAnswer {
  std::map<uint32_t, std::string> peers;  // the slots named in `sources`: address
  std::vector<uint32_t> sources;          // per chunk asked: a slot, or 0 = the server
};

class Swarm {
 public:
  Swarm(uint64_t chunks, SwarmLimits limits);
  uint64_t chunks() const { return chunks_; }

  // Registers or refreshes `node` (address "" = it does not serve; then it
  // holds nothing) and answers where to get each chunk, then records the
  // node as a holder of them. Every chunk must be < chunks().
  SourcesAnswer sources(const std::string& node, const std::string& address,
                        const std::vector<uint32_t>& want, double now);

  // `node` has these chunks now (they are on their way no longer): it
  // becomes a holder of each, preferred by rule 1. Every chunk must be <
  // chunks().
  void have(const std::string& node, const std::string& address,
            const std::vector<uint32_t>& chunks, double now);

  // A node's report: chunks it dropped from its cache, chunks it holds (a
  // node says so after the tracker restarted and forgot), a peer that
  // served it bad data (quarantined), or that it leaves (its holdings go;
  // its slot stays reserved for it). Every chunk must be < chunks().
  // Returns false with *err when bad_peer is not a slot of another node;
  // nothing changes then.
  bool report(const std::string& node, const std::string& address,
              const std::vector<uint32_t>& dropped, const std::vector<uint32_t>& held,
              std::optional<uint32_t> bad_peer, bool leaving, double now, std::string* err);

  // The boot order so far (see above).
  const std::vector<uint32_t>& order() const { return order_; }
  // Starts the order with `recorded` (a saved one) when none is recorded
  // yet; chunks out of range or repeated are skipped. Returns how many
  // were taken.
  size_t seed_order(const std::vector<uint32_t>& recorded);

  // The node holding `slot`, or "" when none.
  std::string node_of(uint32_t slot) const;
  // Expires peers not heard from for peer_timeout (done by every call too).
  void expire(double now);
  SwarmStats stats(double now) const;

 private:
  struct Peer {
    std::string node, address;
    bool live = false;
    Roaring chunks;
    Roaring ready;  // the chunks of `chunks` it said it has
    double load = 0, load_at = 0;
    double last_seen = 0;
    double first_seen = 0;
    double quarantined_until = 0;
    uint64_t answers = 0;
  };
  uint32_t touch(const std::string& node, const std::string& address, double now);
  void drop_all(Peer& p, uint32_t slot);
  void drop(Peer& p, uint32_t slot, uint32_t chunk);
  void hold(Peer& p, uint32_t slot, uint32_t chunk);
  void mark_ready(Peer& p, uint32_t slot, uint32_t chunk);
  double load_of(const Peer& p, double now) const;
  bool eligible(const Peer& p, double now) const;
  uint32_t least_loaded(const Roaring& slots, uint32_t asker, double now);
  uint32_t pick(uint32_t chunk, uint32_t asker, double now);

  uint64_t chunks_;
  SwarmLimits limits_;
  // By chunk, only chunks someone holds (a vector of one bitmap per chunk
  // would cost ~40 bytes per 64 KiB even when nobody is there).
  std::unordered_map<uint32_t, Roaring> holders_;
  std::unordered_map<uint32_t, Roaring> ready_;  // by chunk: holders that have it
  std::unordered_map<uint32_t, std::vector<uint32_t>> askers_;  // by chunk, in order
  std::vector<Peer> peers_;       // by slot - 1
  std::map<std::string, uint32_t> slots_;
  uint32_t cursor_ = 0;  // where the next candidate scan starts
  std::vector<uint32_t> order_;  // the boot order
  Roaring in_order_;             // the chunks in it
  uint64_t server_answers_ = 0, peer_answers_ = 0, quarantines_ = 0, expired_ = 0;
};

}  // namespace tracker
