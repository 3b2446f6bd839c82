// nbdclient-probe: drives node::NbdClient from the command line, for the
// integration tests (tests/integration/test_nbd_client.py). Not installed.
//
//   nbdclient-probe [--timeout MS] [--context NAME]... [--tls-key-file FILE]
//                   ENDPOINT EXPORT OP...
//
// --tls-key-file: STARTTLS and TLS with the key in FILE (NODE:HEX, mode 0600).
//
// OPs, run in order, each printing one JSON line {"op", "result", ...} where
// result is "ok", "nbd-error", "broken" or "timeout" (with "why"):
//   info                       size, flags, context ids and "tls" (the cipher or "")
//   timeout MS                 the timeout of the ops that follow
//   read OFF LEN               "data": the bytes in hex
//   write OFF HEX | writefua OFF HEX
//   flush | trim OFF LEN | zero OFF LEN
//   status CONTEXT OFF LEN     "extents": [[length, flags], ...]
//   stress THREADS OPS SEED REGION MODEL
//       THREADS threads do OPS random reads and writes each at once over the
//       first REGION bytes (thread t owns every 64 KiB block b with
//       b % THREADS == t), checking every read against what they wrote; the
//       expected contents of the region are written to the file MODEL.
// Exit status: 0 when every op succeeded, 1 when one did not, 2 on bad
// usage, 3 when connect() failed (printed as op "connect").
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <string>
#include <thread>
#include <vector>

#include "node/nbd_client.hpp"

namespace {

using nlohmann::json;

const char* kind_name(node::Result::Kind k) {
  switch (k) {
    case node::Result::kOk: return "ok";
    case node::Result::kNbdError: return "nbd-error";
    case node::Result::kBroken: return "broken";
    case node::Result::kTimeout: return "timeout";
  }
  return "?";
}

[[noreturn]] void usage(const std::string& msg) {
  std::cerr << "nbdclient-probe: " << msg << "\n";
  std::exit(2);
}

uint64_t num(const std::vector<std::string>& a, size_t i) {
  if (i >= a.size()) usage("missing argument");
  char* end = nullptr;
  uint64_t v = std::strtoull(a[i].c_str(), &end, 0);
  if (a[i].empty() || *end) usage("not a number: " + a[i]);
  return v;
}

std::string to_hex(const std::vector<uint8_t>& b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (uint8_t c : b) s += {d[c >> 4], d[c & 15]};
  return s;
}

std::vector<uint8_t> from_hex(const std::string& s) {
  if (s.size() % 2) usage("odd hex string");
  std::vector<uint8_t> b;
  for (size_t i = 0; i < s.size(); i += 2) b.push_back(uint8_t(std::stoul(s.substr(i, 2), nullptr, 16)));
  return b;
}

json result(const char* op, const node::Result& r) {
  json j = {{"op", op}, {"result", kind_name(r.kind)}};
  if (!r.ok()) j["why"] = r.why;
  if (r.kind == node::Result::kNbdError) j["error"] = r.nbd_error;
  return j;
}

constexpr uint64_t kBlock = 64 * 1024;

// One stress thread: random reads and writes in its own blocks, every read
// checked against `model`.
std::string stress_thread(node::NbdClient& c, int t, int threads, uint64_t ops, uint64_t seed,
                          uint64_t region, std::vector<uint8_t>& model, int timeout) {
  std::mt19937_64 rnd(seed * 1000003 + uint64_t(t));
  std::vector<uint64_t> mine;
  for (uint64_t b = uint64_t(t); b * kBlock < region; b += uint64_t(threads)) mine.push_back(b);
  if (mine.empty()) return "";
  std::vector<uint8_t> buf(kBlock);
  for (uint64_t i = 0; i < ops; ++i) {
    const uint64_t block = mine[rnd() % mine.size()];
    const uint64_t len = 1 + rnd() % kBlock;
    const uint64_t off = block * kBlock + rnd() % (kBlock - len + 1);
    node::Result r;
    if (rnd() % 2) {
      for (uint64_t k = 0; k < len; k += 8) {
        const uint64_t v = rnd();
        std::memcpy(buf.data() + k, &v, std::min<uint64_t>(8, len - k));
      }
      r = c.pwrite(buf.data(), uint32_t(len), off, false, timeout);
      if (r.ok()) std::copy(buf.begin(), buf.begin() + long(len), model.begin() + long(off));
    } else {
      r = c.pread(buf.data(), uint32_t(len), off, timeout);
      if (r.ok() && !std::equal(buf.begin(), buf.begin() + long(len), model.begin() + long(off)))
        return "read of " + std::to_string(len) + " at " + std::to_string(off) + " mismatched";
    }
    if (!r.ok()) return std::string(kind_name(r.kind)) + ": " + r.why;
  }
  return "";
}

json stress(node::NbdClient& c, const std::vector<std::string>& a, size_t i, int timeout) {
  const int threads = int(num(a, i));
  const uint64_t ops = num(a, i + 1), seed = num(a, i + 2), region = num(a, i + 3);
  if (i + 4 >= a.size()) usage("stress needs a MODEL file");
  std::vector<uint8_t> model(region);
  for (uint64_t off = 0; off < region; off += kBlock) {
    node::Result r = c.pread(model.data() + off, uint32_t(std::min(kBlock, region - off)), off, timeout);
    if (!r.ok()) return result("stress", r);
  }
  auto start = std::chrono::steady_clock::now();
  std::vector<std::string> errors(static_cast<size_t>(threads));
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] { errors[size_t(t)] = stress_thread(c, t, threads, ops, seed, region, model, timeout); });
  for (auto& th : ts) th.join();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::ofstream(a[i + 4], std::ios::binary).write(reinterpret_cast<char*>(model.data()), long(region));
  json j = {{"op", "stress"}, {"result", "ok"}, {"seconds", secs}, {"ops", ops * uint64_t(threads)}};
  for (const auto& e : errors)
    if (!e.empty()) j = {{"op", "stress"}, {"result", "failed"}, {"why", e}};
  return j;
}

// Runs the op at a[i]; returns its JSON and advances *i past its arguments.
json run_op(node::NbdClient& c, const std::vector<std::string>& a, size_t* i, int* timeout_ms) {
  const std::string op = a[(*i)++];
  const size_t p = *i;
  if (op == "timeout") {
    *i += 1;
    *timeout_ms = int(num(a, p));
    return {{"op", "timeout"}, {"result", "ok"}};
  }
  const int timeout = *timeout_ms;
  if (op == "info") {
    json ctx = json::object();
    for (const char* n : {"base:allocation", "nbdroot:dirty"}) ctx[n] = c.context_id(n);
    return {{"op", "info"}, {"result", "ok"}, {"size", c.size()}, {"flags", c.flags()},
            {"read_only", c.read_only()}, {"contexts", ctx}, {"tls", c.tls_description()}};
  }
  if (op == "read") {
    *i += 2;
    std::vector<uint8_t> buf(num(a, p + 1));
    json j = result("read", c.pread(buf.data(), uint32_t(buf.size()), num(a, p), timeout));
    if (j["result"] == "ok") j["data"] = to_hex(buf);
    return j;
  }
  if (op == "write" || op == "writefua") {
    *i += 2;
    if (p + 1 >= a.size()) usage("write needs OFF HEX");
    auto data = from_hex(a[p + 1]);
    return result(op.c_str(), c.pwrite(data.data(), uint32_t(data.size()), num(a, p), op == "writefua", timeout));
  }
  if (op == "flush") return result("flush", c.flush(timeout));
  if (op == "trim" || op == "zero") {
    *i += 2;
    uint32_t len = uint32_t(num(a, p + 1));
    return result(op.c_str(), op == "trim" ? c.trim(len, num(a, p), timeout) : c.zero(len, num(a, p), timeout));
  }
  if (op == "status") {
    *i += 3;
    if (p >= a.size()) usage("status needs CONTEXT OFF LEN");
    std::vector<nbd::Extent> ext;
    json j = result("status", c.block_status(uint32_t(num(a, p + 2)), num(a, p + 1), c.context_id(a[p]), &ext, timeout));
    if (j["result"] == "ok") {
      j["extents"] = json::array();
      for (const auto& x : ext) j["extents"].push_back({x.length, x.flags});
    }
    return j;
  }
  if (op == "stress") {
    *i += 5;
    return stress(c, a, p, timeout);
  }
  usage("unknown op " + op);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> a(argv + 1, argv + argc);
  spdlog::set_default_logger(spdlog::stderr_color_st("probe"));  // stdout is JSON
  int timeout = 10000;
  std::vector<std::string> contexts;
  std::optional<node::Psk> psk;
  std::string err;
  size_t i = 0;
  for (; i < a.size() && a[i].starts_with("--"); i += 2) {
    if (i + 1 >= a.size()) usage("missing value for " + a[i]);
    if (a[i] == "--timeout") {
      timeout = int(num(a, i + 1));
    } else if (a[i] == "--context") {
      contexts.push_back(a[i + 1]);
    } else if (a[i] == "--tls-key-file") {
      psk = node::read_psk_file(a[i + 1], &err);
      if (!psk) usage(a[i + 1] + ": " + err);
    } else {
      usage("unknown option " + a[i]);
    }
  }
  if (i + 2 > a.size()) usage("usage: nbdclient-probe [--timeout MS] [--context NAME]... [--tls-key-file FILE] ENDPOINT EXPORT OP...");
  node::Endpoint ep;
  if (!node::parse_endpoint(a[i], &ep, &err)) usage(err);
  node::NbdClient c;
  if (psk) c.use_tls(*psk);
  if (!c.connect(ep, a[i + 1], contexts, timeout, &err)) {
    std::cout << json{{"op", "connect"}, {"result", "failed"}, {"why", err}, {"tls_failed", c.tls_failed()}}.dump()
              << std::endl;
    return 3;
  }
  int status = 0;
  for (i += 2; i < a.size();) {
    json j = run_op(c, a, &i, &timeout);
    if (j["result"] != "ok") status = 1;
    std::cout << j.dump() << std::endl;
  }
  c.close();
  return status;
}
