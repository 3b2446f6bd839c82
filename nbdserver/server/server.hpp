// The whole server: exports, listeners, one Loop per thread, signals.
#pragma once

#include "server/config.hpp"

namespace server {

// Runs the server until SIGTERM or SIGINT and every connection has drained.
// Returns the process exit code; start-up problems are logged first.
int run_server(const ServerOptions& opts);

}  // namespace server
