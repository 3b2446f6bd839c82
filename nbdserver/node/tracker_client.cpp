#include "node/tracker_client.hpp"

#include <httplib.h>

#include <nlohmann/json.hpp>

namespace node {

using nlohmann::json;

struct TrackerClient::Impl {
  httplib::Client cli;
  Impl(const std::string& host, int port) : cli(host, port) {
    cli.set_keep_alive(true);
    cli.set_tcp_nodelay(true);
    cli.set_connection_timeout(2, 0);
    cli.set_read_timeout(5, 0);
  }
};

TrackerClient::TrackerClient(std::string host, int port)
    : impl_(std::make_unique<Impl>(host, port)) {}
TrackerClient::~TrackerClient() = default;

namespace {

bool answered(const httplib::Result& res, const std::string& what, std::string* err) {
  if (!res) {
    *err = what + ": " + httplib::to_string(res.error());
    return false;
  }
  if (res->status != 200) {
    std::string msg = res->body;
    try {
      msg = json::parse(res->body).at("error").get<std::string>();
    } catch (const std::exception&) {
    }
    *err = what + ": HTTP " + std::to_string(res->status) + ": " + msg;
    return false;
  }
  return true;
}

}  // namespace

bool TrackerClient::node_info(const std::string& exp, NodeInfo* out, std::string* err) {
  std::lock_guard<std::mutex> g(mu_);
  auto res = impl_->cli.Get(("/v1/nodes/" + exp).c_str());
  if (!answered(res, "node " + exp, err)) return false;
  try {
    json j = json::parse(res->body);
    out->generation = j.at("generation").get<std::string>();
    out->size = j.at("size").get<uint64_t>();
    out->chunk_size = j.at("chunk_size").get<uint32_t>();
  } catch (const std::exception& e) {
    *err = std::string("node ") + exp + ": bad answer: " + e.what();
    return false;
  }
  return true;
}

bool TrackerClient::digests(const std::string& gen, std::string* out, std::string* err) {
  std::lock_guard<std::mutex> g(mu_);
  auto res = impl_->cli.Get(("/v1/generations/" + gen + "/chunks.sha256").c_str());
  if (!answered(res, "chunk digests of " + gen, err)) return false;
  *out = std::move(res->body);
  return true;
}

bool TrackerClient::sources(const std::string& gen, const std::string& node, uint16_t peer_port,
                            const std::vector<uint64_t>& chunks, std::vector<int>* slots,
                            std::map<int, std::string>* peers, std::string* err) {
  json body = {{"node", node}, {"peer_port", peer_port}, {"chunks", chunks}};
  std::lock_guard<std::mutex> g(mu_);
  auto res = impl_->cli.Post(("/v1/tracker/" + gen + "/sources").c_str(), body.dump(),
                             "application/json");
  if (!answered(res, "tracker sources", err)) return false;
  try {
    json j = json::parse(res->body);
    const json& src = j.at("sources");
    if (src.size() != chunks.size()) throw std::runtime_error("sources: wrong count");
    slots->clear();
    for (const json& s : src) slots->push_back(s.get<int>());
    for (auto& [k, v] : j.at("peers").items()) (*peers)[std::stoi(k)] = v.get<std::string>();
  } catch (const std::exception& e) {
    *err = std::string("tracker sources: bad answer: ") + e.what();
    return false;
  }
  return true;
}

bool TrackerClient::report(const std::string& gen, const std::string& node, uint16_t peer_port,
                           const std::vector<uint64_t>& dropped, int bad_slot, bool leaving,
                           std::string* err) {
  json body = {{"node", node},
               {"peer_port", peer_port},
               {"dropped", dropped},
               {"bad_peer", bad_slot > 0 ? json(bad_slot) : json(nullptr)},
               {"leaving", leaving}};
  std::lock_guard<std::mutex> g(mu_);
  auto res = impl_->cli.Post(("/v1/tracker/" + gen + "/report").c_str(), body.dump(),
                             "application/json");
  return answered(res, "tracker report", err);
}

}  // namespace node
