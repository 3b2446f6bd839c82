#include "server/tls_keys.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ctime>
#include <fstream>

#include "protocol/wire.hpp"
#include "storage/names.hpp"
#include "storage/node_keys.hpp"

namespace server {

bool TlsKeys::load(const std::string& store, const std::string& psk_file, std::string* err) {
  store_ = store;
  if (psk_file.empty()) return true;
  struct stat st {};
  if (stat(psk_file.c_str(), &st) != 0) {
    *err = "--tls-psk-file " + psk_file + ": cannot read it";
    return false;
  }
  if (st.st_mode & (S_IRWXG | S_IRWXO)) {
    *err = "--tls-psk-file " + psk_file + ": readable by group or others (chmod 600 it)";
    return false;
  }
  std::ifstream in(psk_file);
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.empty() || line[0] == '#') continue;
    std::string why;
    std::optional<tls::PskLine> l = tls::parse_psk_line(line, &why);
    if (!l) {
      *err = "--tls-psk-file " + psk_file + " line " + std::to_string(n) + ": " + why;
      return false;
    }
    fixed_[l->identity] = l->key;
  }
  tls::wipe(line);
  if (in.bad()) {
    *err = "--tls-psk-file " + psk_file + ": read error";
    return false;
  }
  return true;
}

std::optional<tls::Key> TlsKeys::find(std::string_view identity, std::string* why) const {
  if (auto it = fixed_.find(identity); it != fixed_.end()) return it->second;
  if (store_.empty() || !storage::valid_store_name(std::string(identity))) {
    *why = "unknown identity " + nbd::quoted(identity, 64);
    return std::nullopt;
  }
  std::string reason;
  std::optional<storage::NodeKey> k =
      storage::load(store_, std::string(identity), int64_t(time(nullptr)), &reason);
  if (k) return k->key;
  *why = "node " + std::string(identity) + ": " + reason;
  return std::nullopt;
}

}  // namespace server
