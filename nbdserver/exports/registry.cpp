#include "exports/registry.hpp"

#include <spdlog/spdlog.h>
#include <unistd.h>

namespace exports {

bool parse_export_spec(const std::string& text, ExportSpec* out, std::string* err) {
  auto eq = text.find('=');
  if (eq == std::string::npos || eq == 0) {
    *err = "--export '" + text + "': expected NAME=FILE[,ro][,desc=TEXT]";
    return false;
  }
  ExportSpec s;
  s.name = text.substr(0, eq);
  std::string rest = text.substr(eq + 1);
  // Options follow the path after commas; "desc=" swallows the rest.
  auto comma = rest.find(',');
  s.path = rest.substr(0, comma);
  while (comma != std::string::npos) {
    std::string tail = rest.substr(comma + 1);
    if (tail.starts_with("desc=")) {
      s.description = tail.substr(5);
      break;
    }
    auto next = tail.find(',');
    std::string opt = tail.substr(0, next);
    if (opt == "ro") {
      s.read_only = true;
    } else if (opt == "rw") {
      s.read_only = false;
    } else {
      *err = "--export '" + text + "': unknown option '" + opt + "' (known: ro, rw, desc=TEXT)";
      return false;
    }
    comma = next == std::string::npos ? next : comma + 1 + next;
  }
  if (s.path.empty()) {
    *err = "--export '" + text + "': empty file name";
    return false;
  }
  if (s.name.size() > 4096 || s.name.find('\0') != std::string::npos) {
    *err = "--export '" + text + "': the name is not a valid NBD string";
    return false;
  }
  *out = std::move(s);
  return true;
}

bool Registry::add(const ExportSpec& spec, uint32_t max_block, unsigned loops,
                   std::string* err) {
  if (by_name_.count(spec.name)) {
    *err = "export '" + spec.name + "' is defined twice";
    return false;
  }
  std::string why;
  auto file = storage::ImageFile::open(spec.path, spec.read_only, &why);
  if (!file || !file->open_per_loop(loops, storage::kSyncersPerLoop, &why)) {
    *err = "export '" + spec.name + "': " + why;
    return false;
  }
  auto e = std::make_shared<ServedExport>();
  e->name = spec.name;
  e->description = spec.description;
  e->size = file->size();
  e->max_block = max_block;
  e->flags = nbd::kFlagSendFlush | nbd::kFlagSendFua | nbd::kFlagSendCache |
             nbd::kFlagCanMultiConn;
  if (spec.read_only) {
    e->flags |= nbd::kFlagReadOnly;
  } else {
    e->flags |= nbd::kFlagSendTrim | nbd::kFlagSendWriteZeroes | nbd::kFlagSendFastZero;
  }
  e->contexts = {std::string(nbd::kContextBaseAllocation)};
  e->file = std::move(file);
  e->index = unsigned(order_.size());
  by_name_.emplace(e->name, e);
  order_.push_back(std::move(e));
  return true;
}

bool Registry::set_default(const std::string& name, std::string* err) {
  if (!by_name_.count(name)) {
    *err = "--default-export '" + name + "' names no export";
    return false;
  }
  default_ = name;
  return true;
}

std::shared_ptr<const nbd::ExportInfo> Registry::find(std::string_view name) const {
  std::string why;
  return lookup(name, &why);
}

std::shared_ptr<const nbd::ExportInfo> Registry::lookup(std::string_view name,
                                                        std::string* why) const {
  return resolve(nbd::Client{}, name, false, why);
}

std::shared_ptr<const nbd::ExportInfo> Registry::attach(const nbd::Client& client,
                                                        std::string_view name,
                                                        std::string* why) const {
  return resolve(client, name, tls_required_, why);
}

bool Registry::attach_may_block(const nbd::Client& client, std::string_view name) const {
  (void)client;
  if (!store_ || by_name_.count(name)) return false;
  StoreName sn;
  std::string bad;
  return parse_store_name(std::string(name), &sn, &bad);
}

std::shared_ptr<const nbd::ExportInfo> Registry::resolve(const nbd::Client& client,
                                                         std::string_view name,
                                                         bool authorize, std::string* why) const {
  if (name.empty() && !default_.empty()) name = default_;
  if (authorize && client.identity.empty()) {
    *why = "this server requires TLS";
    return nullptr;
  }
  auto it = by_name_.find(name);
  if (it != by_name_.end()) return it->second;
  StoreName sn;
  std::string bad;
  if (!store_ || !parse_store_name(std::string(name), &sn, &bad)) {
    if (!bad.empty()) *why = "export " + nbd::quoted(name, 32) + ": " + bad;
    return nullptr;
  }
  if (authorize && !own_view(client, name, sn, why)) return nullptr;
  if (access((store_->root() + "/images/" + sn.image).c_str(), F_OK) != 0) return nullptr;
  auto e = std::make_shared<ServedExport>();
  e->name = std::string(name);
  e->max_block = max_block_;
  e->contexts = {std::string(nbd::kContextBaseAllocation)};
  e->flags = nbd::kFlagSendFlush | nbd::kFlagSendFua | nbd::kFlagSendCache |
             nbd::kFlagCanMultiConn;
  std::string err;
  if (!sn.node.empty()) {
    // A node's view: every connection of the node is served by one loop
    // from one in-memory map, and a flush covers the whole diff, so a flush
    // on any connection covers writes acknowledged on all of them.
    e->view = store_->view(sn.image, sn.node, sn.attach, client.address, &e->attachment, &err);
    e->resume = sn.attach.resume;
    if (!e->view) {
      spdlog::error("export {}: {}", nbd::quoted(name), err);
      *why = "export " + nbd::quoted(e->name) + " cannot be served: " + err;
      return nullptr;
    }
    e->store = store_;
    if (stats_) e->counters = stats_->node(sn.node);
    e->size = e->view->overlay().id().size;
    e->description = "node " + sn.node + " on " + sn.image + "@" + e->view->generation().name() +
                     " (" + storage::mode_name(e->view->mode()) + ")";
    e->flags |= nbd::kFlagSendTrim | nbd::kFlagSendWriteZeroes | nbd::kFlagSendFastZero;
    e->contexts.push_back(std::string(kContextDirty));
    return e;
  }
  e->gen = store_->generation(sn.image, sn.generation, &err);
  if (!e->gen) {
    spdlog::error("export {}: {}", nbd::quoted(name), err);
    *why = "export " + nbd::quoted(e->name) + " cannot be served: " + err;
    return nullptr;
  }
  e->size = e->gen->size();
  e->description = sn.image + "@" + e->gen->name();
  e->flags |= nbd::kFlagReadOnly;
  if (e->gen->deltas() == 0) {
    e->file = e->gen->full();
  } else {
    e->view = storage::NodeView::generation_only(e->gen);
  }
  return e;
}

bool Registry::own_view(const nbd::Client& client, std::string_view name, const StoreName& sn,
                        std::string* why) const {
  if (sn.node.empty() || sn.node == client.identity) return true;
  spdlog::warn("export {}: refused to identity {}: a node attaches only its own view",
               nbd::quoted(name, 64), nbd::quoted(client.identity, 64));
  *why = "export " + nbd::quoted(name, 64) + ": authenticated as " +
         nbd::quoted(client.identity, 64) + ", which may attach only its own view";
  return false;
}

std::shared_ptr<const nbd::ExportInfo> Registry::describe(const nbd::Client& client,
                                                          std::string_view name,
                                                          std::string* why) const {
  StoreName sn;
  std::string bad;
  if (!store_ || by_name_.count(name) || name.empty() ||
      !parse_store_name(std::string(name), &sn, &bad) || sn.node.empty())
    return attach(client, name, why);
  if (tls_required_ && !own_view(client, name, sn, why)) return nullptr;
  if (access((store_->root() + "/images/" + sn.image).c_str(), F_OK) != 0) return nullptr;
  NodeRecord rec;
  uint64_t size = 0;
  std::string err;
  if (!store_->describe(sn.image, sn.node, sn.attach, &rec, &size, &err)) {
    spdlog::error("export {}: {}", nbd::quoted(name), err);
    *why = "export " + nbd::quoted(name) + " cannot be served: " + err;
    return nullptr;
  }
  auto e = std::make_shared<nbd::ExportInfo>();
  e->name = std::string(name);
  e->size = size;
  e->max_block = max_block_;
  e->description = "node " + sn.node + " on " + sn.image + "@" + rec.generation + " (" +
                   storage::mode_name(rec.mode) + ")";
  e->flags = nbd::kFlagSendFlush | nbd::kFlagSendFua | nbd::kFlagSendCache |
             nbd::kFlagCanMultiConn | nbd::kFlagSendTrim | nbd::kFlagSendWriteZeroes |
             nbd::kFlagSendFastZero;
  e->contexts = {std::string(nbd::kContextBaseAllocation), std::string(kContextDirty)};
  return e;
}

std::vector<std::shared_ptr<const nbd::ExportInfo>> Registry::list() const {
  std::vector<std::shared_ptr<const nbd::ExportInfo>> out(order_.begin(), order_.end());
  if (store_) {
    // Names and descriptions only: listing opens nothing and creates no node.
    for (auto& [name, desc] : store_->list_exports()) {
      auto e = std::make_shared<nbd::ExportInfo>();
      e->name = name;
      e->description = desc;
      out.push_back(std::move(e));
    }
  }
  return out;
}

}  // namespace exports
