// nbdserver: serves image files over NBD. See --help and docs/ARCHITECTURE.md.
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <iostream>

#include "node/agent.hpp"
#include "server/admin.hpp"
#include "server/config.hpp"
#include "server/server.hpp"

int main(int argc, char** argv) {
  if (argc > 1 && std::string_view(argv[1]) == "admin") return server::run_admin(argc - 1, argv + 1);
  if (argc > 1 && std::string_view(argv[1]) == "node") return node::run_agent(argc - 1, argv + 1);
  server::ServerOptions opts;
  server::ParseResult r = server::parse_options(argc, argv, &opts);
  if (!r.run) {
    (r.exit_code ? std::cerr : std::cout) << r.message << "\n";
    return r.exit_code;
  }
  auto logger = spdlog::stderr_color_mt("nbdserver");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");
  spdlog::set_level(spdlog::level::from_str(opts.log_level));
  return server::run_server(opts);
}
