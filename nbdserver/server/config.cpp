#include "server/config.hpp"

#include <boost/program_options.hpp>
#include <fstream>
#include <sstream>
#include <thread>

#include "http/boot_template.hpp"
#include "storage/names.hpp"

namespace po = boost::program_options;

namespace server {
namespace {

constexpr const char* kUsage =
    "Usage: nbdserver [options]\n"
    "Serves files and block devices over NBD, on io_uring.\n\n"
    "Example: nbdserver --listen 127.0.0.1:10809 --export disk=/srv/disk.img,ro\n"
    "         nbdserver --store /srv/nbdroot        (images and node views)\n"
    "         nbdserver admin --store DIR list      (node administration; admin --help)\n";

struct StoreFlags {
  std::string nodes = "auto", mode = "persistent";
  uint32_t block_size = 4096;
  std::string new_nodes = "ready";
  std::string tls = "off";
};

po::options_description describe(ServerOptions* o, std::vector<std::string>* exports,
                                 std::string* config, StoreFlags* sf) {
  po::options_description d("Options");
  d.add_options()
      ("help,h", "show this help")
      ("version", "show the version")
      ("config", po::value(config), "read options from FILE (same names, INI syntax)")
      ("listen", po::value(&o->listen)->composing(),
       "listen on HOST:PORT (repeatable; default 0.0.0.0:10809); port 0 picks a free one")
      ("socket", po::value(&o->socket), "listen on a Unix socket at PATH")
      ("export", po::value(exports)->composing(),
       "serve NAME=FILE[,ro][,desc=TEXT] (repeatable)")
      ("default-export", po::value(&o->default_export),
       "the export that the empty name selects (default: none)")
      ("log-level", po::value(&o->log_level)->default_value("info"),
       "trace, debug, info, warn or error")
      ("threads", po::value(&o->threads)->default_value(0),
       "event loops to run (default: one per core)")
      ("max-connections", po::value(&o->max_connections)->default_value(4096),
       "connections served at once; more are refused")
      ("max-block", po::value(&o->max_block)->default_value(32 * 1024 * 1024),
       "largest READ or WRITE in bytes (advertised as the maximum block size)")
      ("max-inflight", po::value(&o->max_inflight)->default_value(256),
       "requests in flight per connection before reading pauses")
      ("poll-us", po::value(&o->poll_us)->default_value(50),
       "after activity, poll for this many microseconds before sleeping (0: never)")
      ("handshake-timeout", po::value(&o->handshake_timeout)->default_value(10),
       "seconds a client in the handshake may take to finish its next option")
      ("request-timeout", po::value(&o->request_timeout)->default_value(60),
       "seconds a half-received request may stall before the connection is closed")
      ("shutdown-timeout", po::value(&o->shutdown_timeout)->default_value(30),
       "seconds to let in-flight requests finish after SIGTERM")
      ("bind-retry", po::value(&o->bind_retry)->default_value(5),
       "seconds to keep trying a --listen address that is in use (the socket of a killed "
       "server lingers briefly) before giving up")
      ("ready-file", po::value(&o->ready_file),
       "once listening, write the bound addresses to PATH, one per line")
      ("store", po::value(&o->store),
       "serve the store at DIR: exports IMAGE, IMAGE@GEN (read-only) and IMAGE/NODE (the "
       "node's copy-on-write view)")
      ("nodes", po::value(&sf->nodes)->default_value("auto"),
       "auto: a node is created at its first attach; registered: only nodes an admin created")
      ("node-mode", po::value(&sf->mode)->default_value("persistent"),
       "mode of nodes created at attach: persistent (changes kept) or ephemeral (dropped at "
       "each new attach)")
      ("block-size", po::value(&sf->block_size)->default_value(4096),
       "copy-on-write block size of nodes created at attach (512 to 1048576, a power of two)")
      ("pin-addresses", po::bool_switch(&o->store_opts.pin_addresses),
       "pin each node without a pin to the address of its first attach (nodes/NODE/pin); "
       "see `nbdserver admin pin`")
      ("http", po::value(&o->http_listen),
       "serve the HTTP API (node info, chunk digests, the peer tracker) on HOST:PORT; port 0 "
       "picks a free one; needs --store")
      ("peer-timeout", po::value(&o->peer_timeout)->default_value(60),
       "seconds after which a peer that has not called the tracker is forgotten")
      ("advertise", po::value(&o->advertise),
       "the server's name in boot scripts, HOST or HOST:PORT (default: the Host header each "
       "node sent); the NBD address in them is this host and the first --listen port")
      ("boot-image", po::value(&o->boot_image),
       "the image that nodes without a node.json boot (default: the store's only image)")
      ("boot-cmdline", po::value(&o->boot_cmdline),
       "extra kernel arguments for every node's boot, e.g. console=ttyS0 (nodes/NODE/cmdline "
       "adds the node's own)")
      ("new-nodes", po::value(&sf->new_nodes)->default_value("ready"),
       "what an unknown node's first boot-script fetch makes of it: ready (boots its root), "
       "verify (runs the verification first) or refuse; with verify or refuse, a node the "
       "store does not know is also refused at NBD attach")
      ("verify-timeout", po::value(&o->deadlines.verify_s)->default_value(3600),
       "seconds a whole verification run may take, from its first boot-script fetch")
      ("heartbeat-timeout", po::value(&o->deadlines.heartbeat_s)->default_value(300),
       "seconds of silence allowed between a verifying node's heartbeats")
      ("memtest-timeout", po::value(&o->deadlines.memtest_s)->default_value(0),
       "time box in seconds of the memtest86+ step of a verification (0: no memtest86+ step)")
      ("tls", po::value(&sf->tls)->default_value("off"),
       "off: the lab tier, no cryptography (logged loudly at start); require: every client "
       "must STARTTLS and authenticate with a pre-shared key (TLS 1.3), and IMAGE/NODE opens "
       "only for the identity NODE")
      ("tls-psk-file", po::value(&o->tls_psk_file),
       "with --tls require: more identities, as lines IDENTITY:HEX (psktool's format); they "
       "read generations and --export exports, and attach no node's view but their own");
  return d;
}

ParseResult fail(std::string msg) { return {false, 2, "nbdserver: " + msg}; }

ParseResult check(ServerOptions* o, const std::vector<std::string>& exports,
                  const StoreFlags& sf) {
  static const char* levels[] = {"trace", "debug", "info", "warn", "error"};
  if (std::find(std::begin(levels), std::end(levels), o->log_level) == std::end(levels))
    return fail("--log-level '" + o->log_level + "': expected trace, debug, info, warn or error");
  if (o->max_block < 512 || o->max_block > (1u << 30))
    return fail("--max-block must be between 512 and 1073741824");
  if (o->max_connections == 0) return fail("--max-connections must be at least 1");
  if (o->max_inflight == 0 || o->max_inflight > 65536)
    return fail("--max-inflight must be between 1 and 65536");
  if (o->threads > 256) return fail("--threads must be at most 256");
  if (o->poll_us > 10000) return fail("--poll-us must be at most 10000");
  if (!(o->handshake_timeout > 0) || !(o->request_timeout > 0) || !(o->shutdown_timeout >= 0))
    return fail("timeouts must be positive numbers of seconds");
  if (!(o->bind_retry >= 0 && o->bind_retry <= 3600))
    return fail("--bind-retry must be from 0 to 3600 seconds");
  for (const std::string& e : exports) {
    exports::ExportSpec spec;
    std::string err;
    if (!exports::parse_export_spec(e, &spec, &err)) return fail(err);
    o->exports.push_back(std::move(spec));
  }
  if (sf.nodes == "auto") {
    o->store_opts.nodes = exports::NodePolicy::kAuto;
  } else if (sf.nodes == "registered") {
    o->store_opts.nodes = exports::NodePolicy::kRegistered;
  } else {
    return fail("--nodes '" + sf.nodes + "': expected auto or registered");
  }
  if (!storage::parse_mode(sf.mode, &o->store_opts.mode))
    return fail("--node-mode '" + sf.mode + "': expected persistent or ephemeral");
  if (sf.block_size < 512 || sf.block_size > (1u << 20) || (sf.block_size & (sf.block_size - 1)))
    return fail("--block-size must be a power of two from 512 to 1048576");
  o->store_opts.block_size = sf.block_size;
  if (o->exports.empty() && o->store.empty())
    return fail("nothing to serve: give --store DIR or at least one --export NAME=FILE");
  if (!o->http_listen.empty() && o->store.empty())
    return fail("--http needs --store (the API describes the store)");
  if (!(o->peer_timeout > 0 && o->peer_timeout <= 86400))
    return fail("--peer-timeout must be more than 0 and at most 86400 seconds");
  if (!lifecycle::parse_new_nodes(sf.new_nodes, &o->new_nodes))
    return fail("--new-nodes '" + sf.new_nodes + "': expected ready, verify or refuse");
  const lifecycle::Deadlines& dl = o->deadlines;
  if (dl.verify_s < 1 || dl.verify_s > 7 * 86400)
    return fail("--verify-timeout must be from 1 to 604800 seconds");
  if (dl.heartbeat_s < 1 || dl.heartbeat_s > dl.verify_s)
    return fail("--heartbeat-timeout must be from 1 second to --verify-timeout");
  if (dl.memtest_s < 0 || dl.memtest_s >= dl.verify_s)
    return fail("--memtest-timeout must be from 0 (no memtest86+ step) to less than "
                "--verify-timeout");
  if (!o->advertise.empty()) {
    std::string host, port;
    if (!http::parse_host_header(o->advertise, &host, &port))
      return fail("--advertise '" + o->advertise + "': expected HOST or HOST:PORT");
  }
  if (!o->boot_image.empty() && !storage::valid_store_name(o->boot_image))
    return fail("--boot-image '" + o->boot_image + "': not an image name (allowed: "
                "[A-Za-z0-9._-], not starting with '.')");
  {
    std::string norm, err;
    if (!http::normalize_cmdline(o->boot_cmdline, &norm, &err))
      return fail("--boot-cmdline: " + err);
    o->boot_cmdline = norm;
  }
  if (sf.tls == "require") {
    o->tls_required = true;
  } else if (sf.tls != "off") {
    return fail("--tls '" + sf.tls + "': expected off or require");
  }
  if (!o->tls_psk_file.empty() && !o->tls_required)
    return fail("--tls-psk-file needs --tls require");
  if (o->tls_required && o->store.empty() && o->tls_psk_file.empty())
    return fail("--tls require needs keys: --store (nodes' keys, see `nbdserver admin key`) "
                "or --tls-psk-file");
  if (o->threads == 0) o->threads = std::max(1u, std::thread::hardware_concurrency());
  if (o->listen.empty() && o->socket.empty()) o->listen.push_back("0.0.0.0:10809");
  return {true, 0, {}};
}

}  // namespace

ParseResult parse_options(int argc, const char* const* argv, ServerOptions* out) {
  ServerOptions o;
  std::vector<std::string> exports;
  std::string config;
  StoreFlags sf;
  po::options_description d = describe(&o, &exports, &config, &sf);
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, d), vm);
    if (vm.count("config")) {
      std::ifstream in(vm["config"].as<std::string>());
      if (!in) return fail("cannot read config file '" + vm["config"].as<std::string>() + "'");
      po::store(po::parse_config_file(in, d), vm);
    }
    if (vm.count("help")) {
      std::ostringstream s;
      s << kUsage << "\n" << d;
      return {false, 0, s.str()};
    }
    if (vm.count("version")) return {false, 0, "nbdserver 0.1.0"};
    po::notify(vm);
  } catch (const po::error& e) {
    return fail(std::string(e.what()) + " (see --help)");
  }
  ParseResult r = check(&o, exports, sf);
  if (r.run) *out = std::move(o);
  return r;
}

}  // namespace server
