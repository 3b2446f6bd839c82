#include "exports/registry.hpp"

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
  if (!file || !file->open_per_loop(loops, &why)) {
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
  if (name.empty() && !default_.empty()) name = default_;
  auto it = by_name_.find(name);
  if (it == by_name_.end()) return nullptr;
  return it->second;
}

std::vector<std::shared_ptr<const nbd::ExportInfo>> Registry::list() const {
  return {order_.begin(), order_.end()};
}

}  // namespace exports
