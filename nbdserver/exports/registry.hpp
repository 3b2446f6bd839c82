// The export registry: export names -> what serves them.
//
// Built once at start-up from the command line and config file, before any
// loop thread runs, and read-only afterwards, so loops read it without locks.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "protocol/handshake.hpp"
#include "storage/image_file.hpp"

namespace exports {

// One served export: what the handshake advertises plus the file behind it.
struct ServedExport : nbd::ExportInfo {
  std::shared_ptr<storage::ImageFile> file;
  unsigned index = 0;  // position in the registry, for per-loop tables
};

// A parsed --export NAME=FILE[,ro][,desc=TEXT] argument.
struct ExportSpec {
  std::string name;
  std::string path;
  bool read_only = false;
  std::string description;
};

// Parses one --export value. Returns false and sets *err on bad syntax.
bool parse_export_spec(const std::string& text, ExportSpec* out, std::string* err);

class Registry : public nbd::ExportCatalog {
 public:
  // Opens the file behind `spec` and adds it. Returns false and sets *err
  // when the name is taken or the file cannot be served.
  // `loops` is the number of event loops that will serve it.
  bool add(const ExportSpec& spec, uint32_t max_block, unsigned loops, std::string* err);
  // Which export an empty name selects; must name an added export.
  bool set_default(const std::string& name, std::string* err);

  std::shared_ptr<const nbd::ExportInfo> find(std::string_view name) const override;
  std::vector<std::shared_ptr<const nbd::ExportInfo>> list() const override;
  size_t size() const { return order_.size(); }

  // The ServedExport behind an info this registry handed out.
  static const ServedExport& served(const nbd::ExportInfo& info) {
    return static_cast<const ServedExport&>(info);
  }

 private:
  std::map<std::string, std::shared_ptr<ServedExport>, std::less<>> by_name_;
  std::vector<std::shared_ptr<ServedExport>> order_;
  std::string default_;
};

}  // namespace exports
