// Listening sockets: TCP from --listen, Unix from --socket, or inherited
// from systemd socket activation (LISTEN_FDS).
#pragma once

#include <string>
#include <vector>

#include "server/config.hpp"

namespace server {

struct Listener {
  int fd = -1;
  std::string address;  // bound address as "HOST:PORT" or the socket path
  std::string unlink_path;  // Unix socket we created and remove at exit
};

// Opens every listener the options ask for. When systemd passed sockets,
// those are used instead. Returns false and sets *err on the first failure.
bool open_listeners(const ServerOptions& o, std::vector<Listener>* out, std::string* err);

// Closes the sockets and removes Unix socket files this process created.
void close_listeners(std::vector<Listener>* ls);

// Splits "HOST:PORT" or "[V6]:PORT". Returns false on bad syntax.
bool split_host_port(const std::string& s, std::string* host, std::string* port);

}  // namespace server
