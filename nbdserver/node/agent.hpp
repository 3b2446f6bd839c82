// The node agent: `nbdserver node`. It sits between a node's kernel
// (/dev/nbd0 attached to a Unix socket with nbd-client -unix) and the
// network:
//
// - writes, flushes and reads of blocks the node changed go to the node's
//   view on the server (IMAGE/NODE), which keeps every durability promise;
//   a write is acknowledged to the kernel only once the server did;
// - reads of blocks the node did not change are reads of its immutable
//   generation (IMAGE@GEN): from the agent's chunk cache, from a peer the
//   tracker (the server's HTTP API) names, checked against the chunk's
//   SHA-256 from the server, or from the server;
// - it reconnects to the server (any of the list) by itself, resuming the
//   node's view, so the kernel's socket never breaks;
// - it serves the chunks it holds to other nodes of the same generation,
//   read-only, over NBD (--peer-listen), within an upload limit;
// - with --tls require, every connection to the server is TLS (STARTTLS,
//   then the node's pre-shared key) or nothing, and so is every peer
//   connection, both ways, with the generation's peer key (its sealed copy
//   in the server's answer for the node opens with the node's key).
//
// See docs/ARCHITECTURE.md, "The node agent".
#pragma once

namespace node {

// `argv[0]` is "node". Returns the process exit status.
int run_agent(int argc, char** argv);

}  // namespace node
