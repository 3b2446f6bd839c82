// The export registry: export names -> what serves them.
//
// The --export entries are added once at start-up, before any loop thread
// runs, and are read-only afterwards, so loops read them without locks.
// Names that are not --export entries are looked up in the store (if
// --store was given), which opens generations and node views on demand and
// is safe to call from any loop.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "protocol/handshake.hpp"
#include "exports/stats.hpp"
#include "exports/store.hpp"
#include "storage/image_file.hpp"

namespace exports {

// Our metadata context: a node view's changed blocks.
inline constexpr std::string_view kContextDirty = "nbdroot:dirty";

// One served export: what the handshake advertises plus what serves it:
// a file (an --export, or a full generation), or a view (a node's
// copy-on-write view, or a read-only delta generation).
struct ServedExport : nbd::ExportInfo {
  std::shared_ptr<storage::ImageFile> file;
  std::shared_ptr<storage::NodeView> view;
  std::shared_ptr<storage::Generation> gen;  // keeps a generation's files open
  std::shared_ptr<Store> store;              // for a node view's attach counts
  std::shared_ptr<NodeCounters> counters;    // a node view's, when the registry has Stats
  // Holds the node's view for this client's address while the export is in
  // use (declared after `store`, so it goes first).
  std::unique_ptr<Store::Attachment> attachment;
  bool resume = false;  // a node reconnecting within one boot (IMAGE/NODE?resume)
  unsigned index = 0;  // --export: position in the registry, for per-loop tables
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
  void set_max_block(uint32_t max_block) { max_block_ = max_block; }
  // The tls tier: attach() serves nobody without an authenticated identity,
  // and a node's view only to the identity of that node.
  void set_tls_required(bool on) { tls_required_ = on; }
  // Serves the store's images and node views too.
  void set_store(std::shared_ptr<Store> store) { store_ = std::move(store); }
  // Node views get their node's counters from `stats` (GET /metrics).
  void set_stats(std::shared_ptr<Stats> stats) { stats_ = std::move(stats); }
  // Which export an empty name selects; must name an added export.
  bool set_default(const std::string& name, std::string* err);

  std::shared_ptr<const nbd::ExportInfo> find(std::string_view name) const override;
  std::shared_ptr<const nbd::ExportInfo> lookup(std::string_view name,
                                                std::string* why) const override;
  // lookup() for `client`: a node's view is attached from one address at a
  // time (Store::view).
  std::shared_ptr<const nbd::ExportInfo> attach(const nbd::Client& client, std::string_view name,
                                                std::string* why) const override;
  // Any store name: attach() opens a node's view or creates the node, or
  // opens a generation; describe() may create a node's record. All of it
  // under the store's lock, which a creation holds through its fsyncs.
  bool attach_may_block(const nbd::Client& client, std::string_view name) const override;
  // A node's export as GO would serve it, from its record and generation
  // size, without opening its view; other names as lookup().
  std::shared_ptr<const nbd::ExportInfo> describe(const nbd::Client& client,
                                                  std::string_view name,
                                                  std::string* why) const override;
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
  std::shared_ptr<Store> store_;
  std::shared_ptr<Stats> stats_;
  // attach() and lookup(): with `authorize`, refuses what client.identity
  // may not attach (the tls tier).
  std::shared_ptr<const nbd::ExportInfo> resolve(const nbd::Client& client, std::string_view name,
                                                 bool authorize, std::string* why) const;
  // The tls tier's rule: `client` may attach `sn` only if it is no node's
  // view or its own. False and *why (also logged) otherwise.
  bool own_view(const nbd::Client& client, std::string_view name, const StoreName& sn,
                std::string* why) const;
  uint32_t max_block_ = 32 << 20;
  bool tls_required_ = false;
};

}  // namespace exports
