#include "node/tracker_client.hpp"

// Plain HTTP/1.1 with Boost.Beast (header-only): the agent goes into
// initrds, where an HTTP library that drags in OpenSSL would not fit.
// Each call runs its asynchronous steps to completion on a private
// io_context, so beast::tcp_stream's timeouts apply. Each call has a
// connection of its own ("Connection: close"): cpp-httplib holds a pool
// thread per open connection and wakes it every ~11 ms while it idles, so
// hundreds of agents keeping theirs alive cost the server a context switch
// per agent every few milliseconds, and those past its pool waited. A
// connection that did stay open (a server that ignores the header) and was
// closed by the server in the meantime is reopened once.

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <nlohmann/json.hpp>
#include <algorithm>
#include <optional>
#include <utility>

#include "tls/seal.hpp"

namespace node {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using nlohmann::json;
using tcp = asio::ip::tcp;

namespace {

constexpr auto kConnectTimeout = std::chrono::seconds(2);
constexpr auto kIoTimeout = std::chrono::seconds(5);
constexpr uint64_t kSmallBody = 1 << 20;    // a JSON answer
constexpr uint64_t kDigestBody = 64 << 20;  // chunks.sha256: 32 bytes per 64 KiB chunk

struct Reply {
  unsigned status = 0;
  std::string body;
};

}  // namespace

struct TrackerClient::Impl {
  std::string host;
  int port;
  std::optional<tls::Key> key;  // set_key()
  uint64_t counter = 0;
  asio::io_context ioc;
  std::optional<beast::tcp_stream> stream;
  beast::flat_buffer buf;  // bytes read past one reply stay for the next

  Impl(std::string h, int p) : host(std::move(h)), port(p) {}

  // Runs one asynchronous step; its error (beast::error::timeout when the
  // stream's deadline passed).
  template <class Start>
  beast::error_code step(Start start) {
    beast::error_code out = asio::error::would_block;
    start([&out](beast::error_code ec, auto&&...) { out = ec; });
    ioc.restart();
    ioc.run();
    return out;
  }

  void close() {
    if (stream) {
      beast::error_code ignored;
      stream->socket().shutdown(tcp::socket::shutdown_both, ignored);
      stream.reset();
    }
    buf.clear();
  }

  bool connect(std::string* err) {
    beast::error_code ec;
    tcp::resolver resolver(ioc);
    auto addrs = resolver.resolve(host, std::to_string(port), ec);
    if (ec) {
      *err = "resolve " + host + ": " + ec.message();
      return false;
    }
    stream.emplace(ioc);
    stream->expires_after(kConnectTimeout);
    ec = step([&](auto h) { stream->async_connect(addrs, h); });
    if (ec) {
      *err = "connect to " + host + ":" + std::to_string(port) + ": " +
             (ec == beast::error::timeout ? "timed out" : ec.message());
      stream.reset();
      return false;
    }
    return true;
  }

  bool exchange(http::request<http::string_body>& req, uint64_t limit, Reply* out,
                std::string* err) {
    stream->expires_after(kIoTimeout);
    beast::error_code ec = step([&](auto h) { http::async_write(*stream, req, h); });
    if (ec) {
      *err = "send: " + (ec == beast::error::timeout ? "timed out" : ec.message());
      return false;
    }
    http::response_parser<http::string_body> parser;
    parser.body_limit(limit);
    ec = step([&](auto h) { http::async_read_header(*stream, buf, parser, h); });
    // Beast 1.74 does not always hold a declared Content-Length to the
    // body limit: check it here, before reading the body.
    if (!ec && parser.content_length() && *parser.content_length() > limit) {
      *err = "answer: a body of " + std::to_string(*parser.content_length()) +
             " bytes, over the limit of " + std::to_string(limit) + " (body limit exceeded)";
      return false;
    }
    if (!ec && !parser.is_done()) ec = step([&](auto h) { http::async_read(*stream, buf, parser, h); });
    if (ec == beast::error::timeout) {
      *err = "answer: timed out after " + std::to_string(kIoTimeout.count()) + " s";
      return false;
    }
    if (ec) {
      *err = "answer: " + ec.message();
      return false;
    }
    out->status = parser.get().result_int();
    out->body = std::move(parser.get().body());
    if (!parser.get().keep_alive()) close();
    return true;
  }

  // Signs a POST (set_key()): the next counter and the MAC.
  void sign(http::request<http::string_body>& req) {
    const uint64_t now_us = uint64_t(std::chrono::duration_cast<std::chrono::microseconds>(
                                         std::chrono::system_clock::now().time_since_epoch())
                                         .count());
    counter = std::max(counter + 1, now_us);
    req.set("X-Nbdroot-Auth",
            std::to_string(counter) + " " +
                tls::request_mac(*key, "POST", std::string(req.target()), counter, req.body()));
  }

  // One request; false with `*err` when no complete answer came. A signed
  // POST refused for a stale counter is signed again past the server's.
  bool call(http::verb verb, const std::string& target, const std::string& body, uint64_t limit,
            Reply* out, std::string* err) {
    if (!call_once(verb, target, body, limit, out, err)) return false;
    if (out->status != 401 || !key || verb != http::verb::post) return true;
    json j = json::parse(out->body, nullptr, false);
    if (!j.is_object() || !j.contains("counter") || !j["counter"].is_number_unsigned() ||
        j["counter"].get<uint64_t>() < counter)
      return true;
    counter = j["counter"].get<uint64_t>();
    return call_once(verb, target, body, limit, out, err);
  }

  bool call_once(http::verb verb, const std::string& target, const std::string& body,
                 uint64_t limit, Reply* out, std::string* err) {
    http::request<http::string_body> req{verb, target, 11};
    req.set(http::field::host, host);
    req.keep_alive(false);
    if (verb == http::verb::post) {
      req.set(http::field::content_type, "application/json");
      req.body() = body;
      if (key) sign(req);
    }
    req.prepare_payload();
    for (int attempt = 0;; ++attempt) {
      const bool reused = stream.has_value();
      if (!reused && !connect(err)) return false;
      if (exchange(req, limit, out, err)) return true;
      close();
      // The server may have closed an idle kept-alive connection: one
      // retry on a fresh one. A timeout is an answer too late, not stale.
      if (!reused || attempt > 0 || err->find("timed out") != std::string::npos) return false;
    }
  }
};

TrackerClient::TrackerClient(std::string host, int port)
    : impl_(std::make_unique<Impl>(std::move(host), port)) {}
TrackerClient::~TrackerClient() = default;

void TrackerClient::set_key(const tls::Key& key) {
  std::lock_guard<std::mutex> g(mu_);
  impl_->key = key;
}

namespace {

bool answered(bool ok, const Reply& res, const std::string& what, std::string* err) {
  if (!ok) {
    *err = what + ": " + *err;
    return false;
  }
  if (res.status != 200) {
    std::string msg = res.body.substr(0, 200);
    try {
      msg = json::parse(res.body).at("error").get<std::string>();
    } catch (const std::exception&) {
    }
    *err = what + ": HTTP " + std::to_string(res.status) + ": " + msg;
    return false;
  }
  return true;
}

}  // namespace

bool TrackerClient::node_info(const std::string& exp, NodeInfo* out, std::string* err) {
  std::lock_guard<std::mutex> g(mu_);
  Reply res;
  bool ok = impl_->call(http::verb::get, "/v1/nodes/" + exp, "", kSmallBody, &res, err);
  if (!answered(ok, res, "node " + exp, err)) return false;
  try {
    json j = json::parse(res.body);
    out->generation = j.at("generation").get<std::string>();
    out->size = j.at("size").get<uint64_t>();
    out->chunk_size = j.at("chunk_size").get<uint32_t>();
    out->peer_identity = j.value("peer_identity", "");
    out->peer_key_sealed = j.value("peer_key_sealed", "");
  } catch (const std::exception& e) {
    *err = std::string("node ") + exp + ": bad answer: " + e.what();
    return false;
  }
  return true;
}

bool TrackerClient::digests(const std::string& gen, std::string* out, std::string* err) {
  std::lock_guard<std::mutex> g(mu_);
  Reply res;
  bool ok = impl_->call(http::verb::get, "/v1/generations/" + gen + "/chunks.sha256", "",
                        kDigestBody, &res, err);
  if (!answered(ok, res, "chunk digests of " + gen, err)) return false;
  *out = std::move(res.body);
  return true;
}

bool TrackerClient::sources(const std::string& gen, const std::string& node, uint16_t peer_port,
                            const std::vector<uint64_t>& chunks, const std::vector<uint64_t>& have,
                            std::vector<int>* slots, std::map<int, std::string>* peers,
                            std::string* err) {
  json body = {{"node", node}, {"peer_port", peer_port}, {"chunks", chunks}};
  if (!have.empty()) body["have"] = have;
  std::lock_guard<std::mutex> g(mu_);
  Reply res;
  bool ok = impl_->call(http::verb::post, "/v1/tracker/" + gen + "/sources", body.dump(),
                        kSmallBody, &res, err);
  if (!answered(ok, res, "tracker sources", err)) return false;
  try {
    json j = json::parse(res.body);
    const json& src = j.at("sources");
    if (src.size() != chunks.size()) throw std::runtime_error("sources: wrong count");
    slots->clear();
    for (const json& s : src) slots->push_back(s.get<int>());
    for (auto& [k, v] : j.at("peers").items()) (*peers)[std::stoi(k)] = v.get<std::string>();
    saw_epoch(j.value("epoch", ""));
  } catch (const std::exception& e) {
    *err = std::string("tracker sources: bad answer: ") + e.what();
    return false;
  }
  return true;
}

bool TrackerClient::order(const std::string& gen, uint64_t max, std::vector<uint64_t>* out,
                          std::string* err) {
  std::lock_guard<std::mutex> g(mu_);
  Reply res;
  bool ok = impl_->call(http::verb::get, "/v1/tracker/" + gen + "/order?max=" + std::to_string(max),
                        "", kSmallBody, &res, err);
  if (!answered(ok, res, "boot order of " + gen, err)) return false;
  try {
    json j = json::parse(res.body);
    out->clear();
    for (const json& c : j.at("chunks")) out->push_back(c.get<uint64_t>());
  } catch (const std::exception& e) {
    *err = "boot order of " + gen + ": bad answer: " + e.what();
    return false;
  }
  return true;
}

bool TrackerClient::report(const std::string& gen, const std::string& node, uint16_t peer_port,
                           const std::vector<uint64_t>& dropped, const std::vector<uint64_t>& held,
                           int bad_slot, bool leaving, std::string* err) {
  json body = {{"node", node},
               {"peer_port", peer_port},
               {"dropped", dropped},
               {"held", held},
               {"bad_peer", bad_slot > 0 ? json(bad_slot) : json(nullptr)},
               {"leaving", leaving}};
  std::lock_guard<std::mutex> g(mu_);
  Reply res;
  bool ok = impl_->call(http::verb::post, "/v1/tracker/" + gen + "/report", body.dump(),
                        kSmallBody, &res, err);
  if (!answered(ok, res, "tracker report", err)) return false;
  json j = json::parse(res.body, nullptr, false);
  if (j.is_object() && j.contains("epoch") && j["epoch"].is_string()) saw_epoch(j["epoch"]);
  return true;
}

void TrackerClient::saw_epoch(const std::string& e) {
  if (e.empty() || e == epoch_) return;
  if (!epoch_.empty()) new_epoch_ = true;
  epoch_ = e;
}

bool TrackerClient::take_new_epoch() {
  std::lock_guard<std::mutex> g(mu_);
  return std::exchange(new_epoch_, false);
}

}  // namespace node
