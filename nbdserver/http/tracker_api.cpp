#include "http/tracker_api.hpp"

#include <spdlog/spdlog.h>

#include <ctime>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "http/store_api.hpp"
#include "storage/chunk_digests.hpp"
#include "storage/generation.hpp"
#include "storage/node_keys.hpp"
#include "tls/seal.hpp"

namespace http {
namespace {

using nlohmann::json;

constexpr size_t kTrackerBodyMax = 1 << 20;

// What every tracker call is about: a generation and the node asking.
struct Call {
  std::string image, gen, key;  // key "IMAGE@GEN"
  uint64_t chunks = 0;
  std::string node, address;    // address "" = the node does not serve
  json body;
};

// The tls tier's proof that a POST comes from the node it names (see
// tracker_api.hpp), and the last counter taken from each node.
class NodeAuth {
 public:
  explicit NodeAuth(bool required) : required_(required) {}

  // True when not required, or the request carries a good MAC under the
  // node's key with a counter above the last one; then that counter is the
  // last. Else replies 401 (the reason, never key material; "counter") and
  // logs why.
  bool check(exports::Store& store, const httplib::Request& req, const std::string& node,
             httplib::Response& res) {
    if (!required_) return true;
    std::string why;
    const std::string h = req.get_header_value("X-Nbdroot-Auth");
    const size_t sp = h.find(' ');
    uint64_t counter = 0;
    const std::string digits = sp == std::string::npos ? "" : h.substr(0, sp);
    if (digits.empty() || digits.size() > 19 ||
        digits.find_first_not_of("0123456789") != std::string::npos) {
      return refuse(res, node, req, "no X-Nbdroot-Auth: COUNTER MAC header (--tls require)");
    }
    counter = std::stoull(digits);
    std::optional<storage::NodeKey> k =
        storage::load(store.root(), node, int64_t(time(nullptr)), &why);
    if (!k) return refuse(res, node, req, "node '" + node + "' has no usable key: " + why);
    const std::string mac = tls::request_mac(k->key, req.method, req.target, counter, req.body);
    if (mac.empty() || !tls::equal_in_constant_time(mac, h.substr(sp + 1)))
      return refuse(res, node, req, "the request's MAC does not match node '" + node + "''s key");
    std::lock_guard<std::mutex> g(mu_);
    uint64_t& last = last_[node];
    if (counter <= last)
      return refuse(res, node, req,
                    "counter " + std::to_string(counter) + " is not above the last one taken (" +
                        std::to_string(last) + "): a request played again, or a node's clock that went back",
                    last);
    last = counter;
    return true;
  }

 private:
  bool refuse(httplib::Response& res, const std::string& node, const httplib::Request& req,
              const std::string& why, uint64_t last = 0) {
    spdlog::warn("tracker: {} {} from {} for node '{}' refused: {}", req.method, req.path,
                 req.remote_addr, node, why);
    reply_json(res, {{"error", why}, {"counter", last}}, 401);
    return false;
  }

  const bool required_;
  std::mutex mu_;
  std::unordered_map<std::string, uint64_t> last_;
};

// Reads the generation from the path and the node and peer_port from the
// body, and checks the node may speak for that generation (and, under
// --tls require, that it is that node). On failure replies and returns
// false.
bool begin_call(exports::Store& store, NodeAuth& auth, const httplib::Request& req,
                httplib::Response& res, Call* c) {
  // The server takes bodies up to a verification report's size; tracker
  // calls stay within 1 MiB.
  if (req.body.size() > kTrackerBodyMax) {
    reply_error(res, 413, "request body too large (at most 1 MiB)");
    return false;
  }
  std::string err;
  if (!parse_generation(req.matches[1], &c->image, &c->gen, &err)) {
    reply_error(res, 400, err);
    return false;
  }
  c->key = c->image + "@" + c->gen;
  uint64_t size = 0;
  if (!store.generation_size(c->image, c->gen, &size, &err)) {
    reply_error(res, 404, err);
    return false;
  }
  c->chunks = storage::chunk_count(size);
  c->body = json::parse(req.body, nullptr, false);
  if (c->body.is_discarded() || !c->body.is_object()) {
    reply_error(res, 400, "the body is not a JSON object");
    return false;
  }
  const json& b = c->body;
  if (!b.contains("node") || !b["node"].is_string() ||
      !storage::valid_store_name(b["node"].get<std::string>())) {
    reply_error(res, 400, "\"node\" must be a node name");
    return false;
  }
  c->node = b["node"].get<std::string>();
  if (!auth.check(store, req, c->node, res)) return false;
  if (b.contains("peer_port") && !b["peer_port"].is_null()) {
    const json& p = b["peer_port"];
    if (!p.is_number_unsigned() || p.get<uint64_t>() == 0 || p.get<uint64_t>() > 65535) {
      reply_error(res, 400, "\"peer_port\" must be a port number (1-65535) or null");
      return false;
    }
    const std::string& ip = req.remote_addr;
    c->address = (ip.find(':') != std::string::npos ? "[" + ip + "]" : ip) + ":" +
                 std::to_string(p.get<uint64_t>());
  }
  exports::NodeRecord rec;
  if (!store.lookup_node(c->image, c->node, &rec, &size, &err)) {
    reply_error(res, 403, "node '" + c->node + "' may not use the tracker of " + c->key + ": " +
                              err);
    return false;
  }
  if (rec.generation != c->gen) {
    reply_error(res, 403, "node '" + c->node + "' is on " + c->image + "@" + rec.generation +
                              ", not " + c->key);
    return false;
  }
  return true;
}

// Reads body[name], a list of chunk indexes < chunks, at most `max` long.
// A missing list is empty. On failure sets *err.
bool read_chunks(const json& body, const char* name, uint64_t chunks, size_t max,
                 std::vector<uint32_t>* out, std::string* err) {
  if (!body.contains(name)) return true;
  const json& a = body[name];
  if (!a.is_array()) {
    *err = std::string("\"") + name + "\" must be a list of chunk numbers";
    return false;
  }
  if (a.size() > max) {
    *err = std::string("\"") + name + "\" lists " + std::to_string(a.size()) +
           " chunks; at most " + std::to_string(max) + " per request";
    return false;
  }
  out->reserve(a.size());
  for (const json& v : a) {
    if (!v.is_number_unsigned()) {
      *err = std::string("\"") + name + "\" must hold chunk numbers (integers >= 0)";
      return false;
    }
    const uint64_t c = v.get<uint64_t>();
    if (c >= chunks) {
      *err = "chunk " + std::to_string(c) + " is out of range: the generation has " +
             std::to_string(chunks) + " chunks";
      return false;
    }
    out->push_back(static_cast<uint32_t>(c));
  }
  return true;
}

void post_sources(exports::Store& store, tracker::Tracker& tr, NodeAuth& auth,
                  const httplib::Request& req, httplib::Response& res) {
  Call c;
  if (!begin_call(store, auth, req, res, &c)) return;
  std::vector<uint32_t> want;
  std::string err;
  if (!c.body.contains("chunks")) return reply_error(res, 400, "\"chunks\" is missing");
  std::vector<uint32_t> have;
  if (!read_chunks(c.body, "chunks", c.chunks, kMaxChunksPerRequest, &want, &err) ||
      !read_chunks(c.body, "have", c.chunks, c.chunks, &have, &err))
    return reply_error(res, 400, err);
  tracker::SourcesAnswer a = tr.with(c.key, c.chunks, [&](tracker::Swarm& s, double now) {
    if (!have.empty()) s.have(c.node, c.address, have, now);
    return s.sources(c.node, c.address, want, now);
  });
  json peers = json::object();
  for (const auto& [slot, addr] : a.peers) peers[std::to_string(slot)] = addr;
  reply_json(res, {{"peers", std::move(peers)},
                   {"sources", std::move(a.sources)},
                   {"epoch", tr.epoch()}});
}

void post_report(exports::Store& store, tracker::Tracker& tr, NodeAuth& auth,
                 const httplib::Request& req, httplib::Response& res) {
  Call c;
  if (!begin_call(store, auth, req, res, &c)) return;
  std::vector<uint32_t> dropped, held;
  std::string err;
  if (!read_chunks(c.body, "dropped", c.chunks, c.chunks, &dropped, &err) ||
      !read_chunks(c.body, "held", c.chunks, c.chunks, &held, &err))
    return reply_error(res, 400, err);
  std::optional<uint32_t> bad;
  if (c.body.contains("bad_peer") && !c.body["bad_peer"].is_null()) {
    const json& b = c.body["bad_peer"];
    if (!b.is_number_unsigned() || b.get<uint64_t>() == 0 || b.get<uint64_t>() > UINT32_MAX)
      return reply_error(res, 400, "\"bad_peer\" must be a slot number or null");
    bad = static_cast<uint32_t>(b.get<uint64_t>());
  }
  bool leaving = false;
  if (c.body.contains("leaving")) {
    if (!c.body["leaving"].is_boolean())
      return reply_error(res, 400, "\"leaving\" must be true or false");
    leaving = c.body["leaving"].get<bool>();
  }
  std::string bad_node, bad_addr;
  const bool ok = tr.with(c.key, c.chunks, [&](tracker::Swarm& s, double now) {
    if (bad) bad_node = s.node_of(*bad);
    return s.report(c.node, c.address, dropped, held, bad, leaving, now, &err);
  });
  if (!ok) return reply_error(res, 400, err);
  if (bad)
    spdlog::warn("tracker {}: node '{}' ({}) reports peer slot {} (node '{}') as bad; not handed "
                 "out for {} s",
                 c.key, c.node, req.remote_addr, *bad, bad_node, tr.limits().quarantine);
  if (leaving) spdlog::info("tracker {}: node '{}' leaves", c.key, c.node);
  reply_json(res, {{"ok", true}, {"epoch", tr.epoch()}});
}

void get_stats(exports::Store& store, tracker::Tracker& tr, const httplib::Request& req,
               httplib::Response& res) {
  std::string image, gen, err;
  if (!parse_generation(req.matches[1], &image, &gen, &err)) return reply_error(res, 400, err);
  uint64_t size = 0;
  if (!store.generation_size(image, gen, &size, &err)) return reply_error(res, 404, err);
  tracker::SwarmStats st;
  double now = tracker::Tracker::now();
  if (!tr.with_existing(image + "@" + gen, [&](tracker::Swarm& s, double t) {
        now = t;
        s.expire(t);
        st = s.stats(t);
      }))
    st.chunks = storage::chunk_count(size);
  json peers = json::array();
  uint64_t live = 0;
  for (const tracker::PeerStats& p : st.peers) {
    live += p.live;
    peers.push_back({{"slot", p.slot},
                     {"node", p.node},
                     {"address", p.address.empty() ? json(nullptr) : json(p.address)},
                     {"live", p.live},
                     {"chunks_held", p.chunks_held},
                     {"answers", p.answers},
                     {"load", p.load},
                     {"last_seen_s_ago", now - p.last_seen},
                     {"quarantined_s", p.quarantined_until > now ? p.quarantined_until - now : 0}});
  }
  reply_json(res, {{"generation", image + "@" + gen},
                   {"chunks", st.chunks},
                   {"chunk_size", storage::kChunkSize},
                   {"server_answers", st.server_answers},
                   {"peer_answers", st.peer_answers},
                   {"quarantines", st.quarantines},
                   {"expired", st.expired},
                   {"live_peers", live},
                   {"peers", std::move(peers)}});
}

// The generation's boot order (tracker/swarm.hpp), its first `max` chunks
// (?max=N; all without it).
void get_order(exports::Store& store, tracker::Tracker& tr, const httplib::Request& req,
               httplib::Response& res) {
  std::string image, gen, err;
  if (!parse_generation(req.matches[1], &image, &gen, &err)) return reply_error(res, 400, err);
  uint64_t size = 0;
  if (!store.generation_size(image, gen, &size, &err)) return reply_error(res, 404, err);
  uint64_t max = UINT64_MAX;
  if (req.has_param("max")) {
    const std::string m = req.get_param_value("max");
    if (m.empty() || m.size() > 10 || m.find_first_not_of("0123456789") != std::string::npos)
      return reply_error(res, 400, "max must be a number of chunks");
    max = std::stoull(m);
  }
  const uint64_t chunks = storage::chunk_count(size);
  std::vector<uint32_t> order = tr.with(image + "@" + gen, chunks, [&](tracker::Swarm& s, double) {
    const auto& o = s.order();
    return std::vector<uint32_t>(o.begin(), o.begin() + std::min<uint64_t>(o.size(), max));
  });
  reply_json(res, {{"generation", image + "@" + gen}, {"chunks", std::move(order)}});
}

}  // namespace

void add_tracker_api(httplib::Server& svr, std::shared_ptr<exports::Store> store,
                     std::shared_ptr<tracker::Tracker> tracker, bool tls_required) {
  auto auth = std::make_shared<NodeAuth>(tls_required);
  svr.Post(R"(/v1/tracker/([^/]+)/sources)",
           [store, tracker, auth](const httplib::Request& req, httplib::Response& res) {
             post_sources(*store, *tracker, *auth, req, res);
           });
  svr.Post(R"(/v1/tracker/([^/]+)/report)",
           [store, tracker, auth](const httplib::Request& req, httplib::Response& res) {
             post_report(*store, *tracker, *auth, req, res);
           });
  svr.Get(R"(/v1/tracker/([^/]+)/order)",
          [store, tracker](const httplib::Request& req, httplib::Response& res) {
            get_order(*store, *tracker, req, res);
          });
  svr.Get(R"(/v1/tracker/([^/]+))",
          [store, tracker](const httplib::Request& req, httplib::Response& res) {
            get_stats(*store, *tracker, req, res);
          });
}

}  // namespace http
