// nbdroot-agent: the node agent alone (`nbdserver node` without the server),
// small enough for an initrd. `nbdroot-agent --server ...` is
// `nbdserver node --server ...`; so is `nbdroot-agent node --server ...`.
//
// --systemd-mark (first, as the initrd passes it): argv[0] then starts
// with '@', in place, as nbd-client -systemd-mark does: systemd leaves such
// a root storage daemon alone at shutdown. Any shell can start it so
// (dash has no `exec -a`).
#include <string_view>

#include "node/agent.hpp"

int main(int argc, char** argv) {
  if (argc > 1 && std::string_view(argv[1]) == "--systemd-mark") {
    if (argv[0][0]) argv[0][0] = '@';
    argv[1] = argv[0];
    --argc;
    ++argv;
  }
  if (argc > 1 && std::string_view(argv[1]) == "node") return node::run_agent(argc - 1, argv + 1);
  return node::run_agent(argc, argv);
}
