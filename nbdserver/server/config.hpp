// nbdserver's options: command line and config file (Boost.Program_options).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "exports/registry.hpp"
#include "lifecycle/lifecycle.hpp"

namespace server {

struct ServerOptions {
  std::vector<std::string> listen;  // HOST:PORT, [V6]:PORT
  std::string socket;               // Unix socket path
  std::vector<exports::ExportSpec> exports;
  std::string default_export;
  std::string log_level = "info";
  unsigned threads = 0;  // 0: one loop per core
  unsigned max_connections = 4096;
  uint32_t max_block = 32 * 1024 * 1024;
  unsigned max_inflight = 256;  // requests in flight per connection
  unsigned poll_us = 50;  // busy-poll after activity before sleeping
  double handshake_timeout = 10;
  double request_timeout = 60;
  double shutdown_timeout = 30;
  double bind_retry = 5;  // seconds to retry a TCP address in use (a killed server's lingers)
  std::string ready_file;
  std::string store;  // --store DIR: serve images and node views from it
  exports::StoreOptions store_opts;
  std::string http_listen;  // --http HOST:PORT: the HTTP API (needs --store)
  double peer_timeout = 60;  // seconds before a silent peer leaves the tracker
  // Node lifecycles (lifecycle.hpp): what an unknown node's first boot makes
  // of it, and the deadlines of verification runs.
  lifecycle::NewNodes new_nodes = lifecycle::NewNodes::kReady;
  lifecycle::Deadlines deadlines;
  // Boot scripts (http/boot_api.hpp): the server's name in them ("" = the
  // Host header each node sent), what nodes without a node.json boot ("" =
  // the store's only image), and kernel arguments for every node
  // (normalised, checked for iPXE syntax).
  std::string advertise;
  std::string boot_image;
  std::string boot_cmdline;
  // The security tier (docs/security.md): lab (tls_required false; no
  // cryptography) or tls (--tls require: every client must STARTTLS and
  // authenticate with a pre-shared key, a node's own from the store's
  // nodes/NODE/tls-key.json (storage/node_keys.hpp) or one of
  // --tls-psk-file's identities; boot scripts may carry an armed key).
  bool tls_required = false;
  std::string tls_psk_file;
};

struct ParseResult {
  bool run = false;   // false: exit with `exit_code` after printing `message`
  int exit_code = 0;
  std::string message;
};

// Parses the command line, then the --config file if one is named (command
// line values win). Validates every value; never throws.
ParseResult parse_options(int argc, const char* const* argv, ServerOptions* out);

}  // namespace server
