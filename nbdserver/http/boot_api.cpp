#include "http/boot_api.hpp"

#include <dirent.h>
#include <unistd.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <sstream>

#include "exports/audit.hpp"
#include "http/boot_template.hpp"
#include "lifecycle/report.hpp"
#include "storage/chunk_digests.hpp"
#include "storage/generation.hpp"
#include "storage/node_keys.hpp"
#include "tls/engine.hpp"
#include "tls/seal.hpp"

namespace http {
namespace {

using storage::valid_store_name;

constexpr size_t kTemplateMax = 64 * 1024;
constexpr size_t kCmdlineMax = 4096;
constexpr size_t kHeartbeatMax = 4096;
constexpr const char* kNameRule = "(allowed: [A-Za-z0-9._-], not starting with '.')";
// The kernel's own early memory test (memtest=N passes) in verification
// boots; an admin's extra command line comes after it, and the kernel takes
// the last memtest= it sees.
constexpr const char* kKernelMemtest = "memtest=1";

int64_t now_s() { return static_cast<int64_t>(time(nullptr)); }

struct Api {
  std::shared_ptr<exports::Store> store;
  std::shared_ptr<lifecycle::Lifecycle> life;
  BootOptions opts;
  std::mutex locks_mu;
  std::map<std::string, std::shared_ptr<std::mutex>> node_locks;

  // The mutex that orders reports and heartbeats of one node.
  std::shared_ptr<std::mutex> node_lock(const std::string& node) {
    std::lock_guard<std::mutex> g(locks_mu);
    auto& m = node_locks[node];
    if (!m) m = std::make_shared<std::mutex>();
    return m;
  }
  const std::string& root() const { return store->root(); }
};

// Reads a whole small file. *missing when it does not exist.
bool read_file(const std::string& path, size_t max, std::string* out, bool* missing,
               std::string* err) {
  *missing = false;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *missing = errno == ENOENT;
    *err = path + ": cannot open: " + strerror(errno);
    return false;
  }
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) {
    *err = path + ": cannot read";
    return false;
  }
  *out = s.str();
  if (out->size() > max) {
    *err = path + ": larger than " + std::to_string(max) + " bytes";
    return false;
  }
  return true;
}

void reply_text(httplib::Response& res, int status, const std::string& text) {
  res.status = status;
  res.set_header("Cache-Control", "no-store");
  res.set_content(text, "text/plain; charset=utf-8");
}

// "application/json", "application/json; charset=utf-8".
bool is_json_type(const std::string& content_type) {
  std::string t = content_type.substr(0, content_type.find(';'));
  t.erase(std::remove_if(t.begin(), t.end(), [](unsigned char c) { return std::isspace(c); }),
          t.end());
  std::transform(t.begin(), t.end(), t.begin(), [](unsigned char c) { return std::tolower(c); });
  return t == "application/json";
}

// What a node without node.json boots: --boot-image, else the store's only
// image; at the image's current generation.
bool pick_image(const Api& api, const std::string& node, std::string* image, std::string* gen,
                std::string* why) {
  const std::string record = api.store->node_dir(node) + "/node.json";
  if (access(record.c_str(), F_OK) == 0) {
    exports::NodeRecord r;
    if (!api.store->read_node(node, &r, why)) return false;
    *image = r.image;
    *gen = r.generation;
    return true;
  }
  if (!api.opts.boot_image.empty()) {
    *image = api.opts.boot_image;
  } else {
    std::vector<std::string> images;
    if (DIR* d = opendir((api.root() + "/images").c_str())) {
      while (dirent* e = readdir(d))
        if (valid_store_name(e->d_name)) images.push_back(e->d_name);
      closedir(d);
    }
    std::sort(images.begin(), images.end());
    if (images.empty()) {
      *why = "no image to boot: the store has no image (build one with imagebuilder)";
      return false;
    }
    if (images.size() > 1) {
      std::string names;
      for (const std::string& i : images) names += (names.empty() ? "" : ", ") + i;
      *why = "no image to boot: the store has several (" + names + "); start the server with "
             "--boot-image IMAGE, or create the node on one (nbdserver admin create NODE "
             "--image IMAGE)";
      return false;
    }
    *image = images[0];
  }
  std::string err;
  *gen = storage::current_generation(api.root(), *image, &err);
  if (gen->empty()) {
    *why = "no image to boot: image " + *image + " has no current generation: " + err;
    return false;
  }
  return true;
}

// --boot-cmdline, then nodes/<node>/cmdline. False and *err (naming the
// file) when the node's file is unreadable or has characters refused.
bool extra_cmdline(const Api& api, const std::string& node, std::string* out, std::string* err) {
  *out = api.opts.boot_cmdline;
  const std::string path = api.store->node_dir(node) + "/cmdline";
  std::string text, norm;
  bool missing = false;
  if (!read_file(path, kCmdlineMax, &text, &missing, err)) return missing;
  if (!normalize_cmdline(text, &norm, err)) {
    *err = path + ": " + *err;
    return false;
  }
  if (!norm.empty()) *out += (out->empty() ? "" : " ") + norm;
  return true;
}

TemplateValue value(std::string s) { return {std::move(s), {}}; }
TemplateValue none(std::string why) { return {{}, std::move(why)}; }
std::string joined(const std::string& a, const std::string& b) {
  return b.empty() ? a : a + " " + b;
}

struct Script {
  std::string base, nbd_host, url, extra;
};

TemplateVars make_vars(const Api& api, const lifecycle::NodeLife& l, const Script& s) {
  TemplateVars v;
  v["node"] = value(l.node);
  v["state"] = value(lifecycle::to_string(l.state));
  v["reason"] = value(display_text(l.reason));
  for (const auto& [name, text] : {std::pair{"run", &l.run}, std::pair{"step", &l.step}})
    v[name] = text->empty() || safe_token(*text)
                  ? value(*text)
                  : none("the lifecycle's " + std::string(name) + " has unsafe characters");
  v["base"] = value(s.base);
  v["url"] = value(s.url);
  v["extra"] = value(s.extra);
  v["mac"] = value(l.hints.mac);
  v["uuid"] = value(l.hints.uuid);
  v["serial"] = value(l.hints.serial);
  v["platform"] = value(l.hints.platform);
  v["memtest_bin"] = value(s.base + "/files/boot/memtest86+x64.bin");
  v["memtest_efi"] = value(s.base + "/files/boot/memtest86+x64.efi");
  const std::string nbd = api.opts.nbd_port.empty() ? "" : s.nbd_host + ":" + api.opts.nbd_port;
  v["nbd"] = nbd.empty() ? none("the server has no TCP --listen address") : value(nbd);
  std::string image, gen, why;
  if (pick_image(api, l.node, &image, &gen, &why)) {
    const std::string files = s.base + "/files/" + image + "/" + gen + "/";
    v["image"] = value(image);
    v["generation"] = value(gen);
    v["kernel"] = value(files + "vmlinuz");
    v["initrd"] = value(files + "initrd.img");
    v["verify_initrd"] = value(files + "verify.img");
    v["cmdline"] = nbd.empty() ? v["nbd"]
                               : value(joined("nbdroot=" + nbd + "/" + image + "/" + l.node +
                                                  " ip=dhcp",
                                              s.extra));
  } else {
    for (const char* name : {"image", "generation", "kernel", "initrd", "verify_initrd", "cmdline"})
      v[name] = none(why);
  }
  v["verify_cmdline"] = value(joined("nbdroot.verify=" + s.base + "/nodes/" + l.node +
                                         " nbdroot.node=" + l.node + " nbdroot.run=" + l.run +
                                         " ip=dhcp " + kKernelMemtest,
                                     s.extra));
  if (!v["run"].unavailable.empty()) v["verify_cmdline"] = v["run"];
  // With a leading space, so that `{{cmdline}}{{tls_args}}` renders as it
  // did before TLS under --tls off. deliver_key() may add the key.
  v["tls_args"] = value(api.opts.tls_require ? " nbdroot.tls=require" : "");
  return v;
}

// An audit line from the HTTP side; a failure is logged, not the fetch's.
void audit_key(const Api& api, const std::string& detail) {
  std::string err;
  if (!exports::audit(api.root(), "key", detail, &err))
    spdlog::error("http: not recorded in the audit log ({}): {}", detail, err);
}

// Renders `tmpl` again with variable `name` set to `text`, which holds a
// secret: the variable's copy is wiped once rendered (the caller wipes
// `text` and, once sent, r->text).
void render_with_secret(const std::string& tmpl, const std::string& rel, const char* name,
                        const std::string& text, TemplateVars* vars, RenderResult* r) {
  (*vars)[name] = value(text);
  *r = render_template(tmpl, *vars, rel);
  tls::wipe((*vars)[name].text);
}

// Under --tls require, after `r` rendered: when the template carries
// {{tls_args}} and the node's key is armed, takes it (disarming it) and
// renders again with nbdroot.key=NODE:HEX. A fetch after the key was
// delivered is logged and audited: whoever fetched first has the key.
void deliver_key(Api& api, const httplib::Request& req, const std::string& node,
                 const std::string& tmpl, const std::string& rel, TemplateVars* vars,
                 RenderResult* r) {
  const int64_t now = now_s();
  std::string why;
  storage::KeyStatus st;
  if (!r->used.count("tls_args")) {
    const std::optional<storage::NodeKey> k = storage::load(api.root(), node, now, &why);
    if (k && k->armed)
      spdlog::warn("http: node {} has an armed key, but {} has no {{{{tls_args}}}}: the key is "
                   "not delivered (add {{{{tls_args}}}} to its kernel line)", node, rel);
    return;
  }
  const std::optional<storage::NodeKey> k = storage::take_armed(api.root(), node, now, &why, &st);
  if (k) {
    std::string psk = storage::psk_line(*k);
    std::string line = " nbdroot.tls=require nbdroot.key=" + psk;
    tls::wipe(psk);
    render_with_secret(tmpl, rel, "tls_args", line, vars, r);
    tls::wipe(line);
    spdlog::info("http: node {}: its armed key (generation {}) was delivered in its boot script "
                 "to {}", node, k->generation, req.remote_addr);
    audit_key(api, node + " delivered in the boot script to " + req.remote_addr);
    return;
  }
  switch (st) {
    case storage::KeyStatus::kAlreadyDelivered: {
      const std::optional<storage::NodeKey> d = storage::load(api.root(), node, now, &why);
      const std::string at = d ? storage::utc_time(d->delivered_at) : "?";
      spdlog::warn("http: node {} fetched its boot script again after its key was delivered at {}: "
                   "if that was not the node, rotate its key (fetched by {})",
                   node, at, req.remote_addr);
      audit_key(api, node + " boot script fetched again by " + req.remote_addr +
                         " after its key was delivered at " + at);
      break;
    }
    case storage::KeyStatus::kMissing:
    case storage::KeyStatus::kNotArmed:
      spdlog::info("http: node {}: no key in its boot script ({})", node, why);
      break;
    case storage::KeyStatus::kExpired:
      spdlog::warn("http: node {}: no key in its boot script: its {}", node, why);
      break;
    default:
      spdlog::error("http: node {}: no key in its boot script: {}", node, why);
  }
}

// The report token's header, and what the server keeps of a token.
constexpr const char* kReportTokenHeader = "X-Nbdroot-Report-Token";
std::string token_digest(std::string_view token) {
  return storage::to_hex(storage::sha256(token.data(), token.size()));
}

// Under --tls require, after `r` rendered the Linux step of a verification
// run with {{verify_cmdline}}: makes the run's report token (256 bits from
// getrandom), keeps its digest in the node's state and renders again with
// nbdroot.report_token=HEX. Reports and heartbeats of the run must carry it
// (check_report_token), so that in this tier only the machine that booted
// the run's script can move the node to ready. One fetch per run enters the
// Linux step (a second one fails the run), so there is one token per run.
// False and *err (the fetch fails) when the token cannot be kept.
bool deliver_report_token(Api& api, const httplib::Request& req,
                          const lifecycle::NodeLife& l, const std::string& tmpl,
                          const std::string& rel, TemplateVars* vars, RenderResult* r,
                          std::string* err) {
  if (l.state != lifecycle::State::kVerify || l.step != "linux" || l.run.empty()) return true;
  if (!r->used.count("verify_cmdline")) {
    spdlog::warn("http: node {} runs verification {}, but {} has no {{{{verify_cmdline}}}}: it "
                 "gets no report token, and under --tls require its report will be refused",
                 l.node, l.run, rel);
    return true;
  }
  tls::Key k;
  if (!tls::random_key(&k)) {
    *err = "no random bytes for the report token of run " + l.run;
    return false;
  }
  std::string token = tls::key_hex(k);
  if (!api.life->set_report_token(l.node, l.run, token_digest(token), now_s(), err)) {
    tls::wipe(token);
    return false;
  }
  std::string line = (*vars)["verify_cmdline"].text + " nbdroot.report_token=" + token;
  tls::wipe(token);
  render_with_secret(tmpl, rel, "verify_cmdline", line, vars, r);
  tls::wipe(line);
  spdlog::info("http: node {}: the report token of run {} was delivered in its boot script to {}",
               l.node, l.run, req.remote_addr);
  audit_key(api, l.node + " report token of run " + l.run + " delivered in the boot script to " +
                     req.remote_addr);
  return true;
}

// Under --tls require: true when the request carries the report token of
// the node's current run `l`; else replies 401 (the reason also logged).
bool check_report_token(const Api& api, const httplib::Request& req, const lifecycle::NodeLife& l,
                        const char* what, httplib::Response& res) {
  if (!api.opts.tls_require) return true;
  const std::string token = req.get_header_value(kReportTokenHeader);
  std::string why;
  if (l.report_token.empty())
    why = "run " + (l.run.empty() ? std::string("(none)") : l.run) +
          " has no report token (none was delivered: its Linux step's boot script had no "
          "{{verify_cmdline}}, or the run is not in that step)";
  else if (token.empty())
    why = std::string("no ") + kReportTokenHeader +
          " header: under --tls require a verification run reports with the token its boot "
          "script gave (nbdroot.report_token=)";
  else if (!tls::equal_in_constant_time(token_digest(token), l.report_token))
    why = std::string("the ") + kReportTokenHeader + " does not match run " + l.run + "'s token";
  if (why.empty()) return true;
  spdlog::warn("http: {} of node {} from {} refused: {}", what, l.node, req.remote_addr, why);
  reply_error(res, 401, why);
  return false;
}

// The query parameters a node may send, checked; false and *err when one
// is repeated or not safe_hint().
bool read_hints(const httplib::Request& req, lifecycle::Hints* h, std::string* query,
                std::string* err) {
  for (const auto& [key, field] :
       {std::pair{"uuid", &h->uuid}, std::pair{"serial", &h->serial},
        std::pair{"platform", &h->platform}, std::pair{"mac", &h->mac}}) {
    if (!req.has_param(key)) continue;
    const std::string v = req.get_param_value(key);
    if (req.get_param_value_count(key) > 1 || !safe_hint(v)) {
      *err = std::string("query parameter ") + key +
             ": expected one value of 1 to 64 characters [A-Za-z0-9._:-]";
      return false;
    }
    *field = v;
    *query += (query->empty() ? "?" : "&") + std::string(key) + "=" + v;
  }
  return true;
}

// The server's address as the node should use it: --advertise, else the
// Host header the node sent.
bool server_address(const Api& api, const httplib::Request& req, Script* s, std::string* err) {
  const bool adv = !api.opts.advertise.empty();
  const std::string name = adv ? api.opts.advertise : req.get_header_value("Host");
  std::string host, port;
  if (!parse_host_header(name, &host, &port)) {
    *err = name.empty() ? "no Host header (needed to name the server in the script; or start "
                          "the server with --advertise HOST)"
                        : "bad Host header (expected HOST[:PORT])";
    return false;
  }
  if (port.empty() && adv && req.local_port > 0) port = std::to_string(req.local_port);
  s->base = "http://" + host + (port.empty() ? "" : ":" + port);
  s->nbd_host = host;
  return true;
}

void get_boot(Api& api, const httplib::Request& req, httplib::Response& res) {
  const std::string node = req.matches[1];
  if (!valid_store_name(node))
    return reply_error(res, 400, "bad node id '" + node + "' " + kNameRule);
  lifecycle::Hints hints;
  Script s;
  std::string query, err;
  if (!read_hints(req, &hints, &query, &err) || !server_address(api, req, &s, &err)) {
    spdlog::warn("http: boot script of node {} refused: {}", node, err);
    return reply_error(res, 400, err);
  }
  s.url = s.base + "/boot/" + node + ".ipxe" + query;
  const std::optional<lifecycle::NodeLife> known = api.life->get(node, &err);
  if (!known && !err.empty()) {
    spdlog::error("http: boot script of node {}: {}", node, err);
    return reply_error(res, 500, err);
  }
  if (!known && api.life->policy() == lifecycle::NewNodes::kRefuse) {
    spdlog::info("http: boot script for unknown node {} refused (--new-nodes refuse)", node);
    return reply_text(res, 403, "nbdroot: node " + node + " is unknown and this server takes "
                                "no new nodes (--new-nodes refuse); an admin can create it\n");
  }
  lifecycle::BootDecision d;
  if (!api.life->on_boot_script(node, hints, now_s(), &d, &err)) {
    spdlog::error("http: boot script of node {}: {}", node, err);
    return reply_error(res, 500, err);
  }
  if (d.created)
    spdlog::info("http: new node {} ({}), state {}", node, hints.mac.empty() ? "-" : hints.mac,
                 lifecycle::to_string(d.life.state));
  bool missing = false;
  std::string text;
  const std::string own = api.store->node_dir(node) + "/boot.ipxe";
  if (read_file(own, kTemplateMax, &text, &missing, &err)) return reply_text(res, 200, text);
  if (!missing) {
    spdlog::error("http: boot script of node {}: {}", node, err);
    return reply_error(res, 500, err);
  }
  if (!extra_cmdline(api, node, &s.extra, &err)) {
    spdlog::error("http: boot script of node {}: {}", node, err);
    return reply_error(res, 500, err);
  }
  const std::string state = lifecycle::to_string(d.life.state);
  const std::string rel = "templates/" + state + ".ipxe";
  if (!read_file(api.root() + "/" + rel, kTemplateMax, &text, &missing, &err)) {
    if (!missing) {
      spdlog::error("http: boot script of node {}: {}", node, err);
      return reply_error(res, 500, err);
    }
    spdlog::warn("http: {} is missing: the built-in default is used (restart the server to "
                 "write it again)", rel);
    text = default_template(state).value_or("");
  }
  TemplateVars vars = make_vars(api, d.life, s);
  RenderResult r = render_template(text, vars, rel);
  if (!r.ok) {
    spdlog::error("http: boot script of node {}: {}", node, r.error);
    return reply_error(res, r.unavailable ? 409 : 500, r.error);
  }
  if (api.opts.tls_require) {
    deliver_key(api, req, node, text, rel, &vars, &r);
    if (!deliver_report_token(api, req, d.life, text, rel, &vars, &r, &err)) {
      tls::wipe(r.text);
      spdlog::error("http: boot script of node {}: {}", node, err);
      return reply_error(res, 500, err);
    }
  }
  reply_text(res, 200, r.text);
  tls::wipe(r.text);  // it may carry the key; httplib's copy is the one sent
}

// Checks the common parts of a POST from a node; false once it replied.
bool check_post(const httplib::Request& req, httplib::Response& res, size_t max) {
  const std::string node = req.matches[1];
  if (!valid_store_name(node)) {
    reply_error(res, 400, "bad node id '" + node + "' " + kNameRule);
    return false;
  }
  if (req.body.size() > max) {
    reply_error(res, 413, "request body too large (at most " + std::to_string(max) + " bytes)");
    return false;
  }
  if (!is_json_type(req.get_header_value("Content-Type"))) {
    reply_error(res, 415, "expected Content-Type: application/json");
    return false;
  }
  return true;
}

// The node's record, or a 404 (unknown) or 500 reply.
std::optional<lifecycle::NodeLife> known_node(Api& api, const std::string& node,
                                              httplib::Response& res) {
  std::string err;
  std::optional<lifecycle::NodeLife> l = api.life->get(node, &err);
  if (!l) {
    if (err.empty()) {
      reply_error(res, 404, "unknown node " + node);
    } else {
      spdlog::error("http: node {}: {}", node, err);
      reply_error(res, 500, err);
    }
  }
  return l;
}

void post_report(Api& api, const httplib::Request& req, httplib::Response& res) {
  if (!check_post(req, res, lifecycle::kReportMaxBytes)) return;
  const std::string node = req.matches[1];
  const std::shared_ptr<std::mutex> lock = api.node_lock(node);
  std::lock_guard<std::mutex> g(*lock);
  const std::optional<lifecycle::NodeLife> l = known_node(api, node, res);
  if (!l) return;
  lifecycle::Report rep;
  std::string err;
  if (!lifecycle::validate_report(req.body, node, &rep, &err)) {
    spdlog::warn("http: report of node {} refused: {}", node, err);
    return reply_error(res, 400, err);
  }
  if (l->state != lifecycle::State::kVerify || l->run != rep.run) {
    err = "node " + node + " is not running verification run " + rep.run + " (state " +
          lifecycle::to_string(l->state) +
          (l->run.empty() ? std::string(", no run") : ", run " + l->run) + ")";
    spdlog::warn("http: report refused: {}", err);
    return reply_error(res, 409, err);
  }
  if (!check_report_token(api, req, *l, "report", res)) return;
  if (!lifecycle::store_report(api.root(), rep, &err)) {
    spdlog::error("http: report of node {}: {}", node, err);
    return reply_error(res, 500, err);
  }
  if (!api.life->on_report(node, rep.run, rep.status, rep.summary, now_s(), &err)) {
    spdlog::warn("http: report of node {} stored, but the node did not change: {}", node, err);
    return reply_error(res, 409, err);
  }
  const std::optional<lifecycle::NodeLife> after = api.life->get(node, &err);
  const std::string state = after ? lifecycle::to_string(after->state) : "unknown";
  spdlog::info("http: node {} reported run {}: {}; now {}", node, rep.run, rep.summary, state);
  reply_json(res, {{"status", rep.status}, {"state", state}}, 201);
}

void post_heartbeat(Api& api, const httplib::Request& req, httplib::Response& res) {
  if (!check_post(req, res, kHeartbeatMax)) return;
  const std::string node = req.matches[1];
  const nlohmann::json j = nlohmann::json::parse(req.body, nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return reply_error(res, 400, "the body is not a JSON object");
  for (const char* key : {"run", "step"})
    if (!j.contains(key) || !j[key].is_string())
      return reply_error(res, 400, std::string(key) + ": expected a string");
  if (j.contains("progress") && !j["progress"].is_number())
    return reply_error(res, 400, "progress: expected a number");
  const std::string run = j["run"], step = j["step"];
  if (!safe_token(run)) return reply_error(res, 400, "run: not a run id");
  if (!step.empty() && !safe_token(step))
    return reply_error(res, 400, "step: expected 1 to 128 characters [A-Za-z0-9._:@-]");
  const std::shared_ptr<std::mutex> lock = api.node_lock(node);
  std::lock_guard<std::mutex> g(*lock);
  const std::optional<lifecycle::NodeLife> l = known_node(api, node, res);
  if (!l) return;
  if (l->run == run && !check_report_token(api, req, *l, "heartbeat", res)) return;
  std::string err;
  if (!api.life->on_heartbeat(node, run, step, now_s(), &err)) {
    spdlog::info("http: heartbeat of node {} refused: {}", node, err);
    return reply_error(res, 409, err);
  }
  res.status = 204;
}

}  // namespace

void add_boot_api(httplib::Server& svr, std::shared_ptr<exports::Store> store,
                  std::shared_ptr<lifecycle::Lifecycle> life, BootOptions opts) {
  auto api = std::make_shared<Api>();
  api->store = std::move(store);
  api->life = std::move(life);
  api->opts = std::move(opts);
  svr.Get(R"(/boot/([^/]+)\.ipxe)", [api](const httplib::Request& req, httplib::Response& res) {
    get_boot(*api, req, res);
  });
  svr.Post(R"(/nodes/([^/]+)/report)", [api](const httplib::Request& req, httplib::Response& res) {
    post_report(*api, req, res);
  });
  svr.Post(R"(/nodes/([^/]+)/heartbeat)",
           [api](const httplib::Request& req, httplib::Response& res) {
             post_heartbeat(*api, req, res);
           });
}

DeadlineSweeper::DeadlineSweeper(std::shared_ptr<lifecycle::Lifecycle> life, int interval_ms)
    : life_(std::move(life)), interval_ms_(interval_ms) {}

DeadlineSweeper::~DeadlineSweeper() { stop(); }

void DeadlineSweeper::start() {
  stopping_ = false;
  thread_ = std::thread([this] { run(); });
}

void DeadlineSweeper::stop() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void DeadlineSweeper::run() {
  std::unique_lock<std::mutex> lk(mu_);
  while (!stopping_) {
    lk.unlock();
    try {
      for (const std::string& node : life_->sweep(now_s())) {
        std::string err;
        const std::optional<lifecycle::NodeLife> l = life_->get(node, &err);
        spdlog::warn("node {} is {}: {}", node, l ? lifecycle::to_string(l->state) : "failed",
                     l ? l->reason : "timed out");
      }
    } catch (const std::exception& e) {
      spdlog::error("deadline sweep: {}", e.what());
    }
    lk.lock();
    cv_.wait_for(lk, std::chrono::milliseconds(interval_ms_), [this] { return stopping_; });
  }
}

}  // namespace http
