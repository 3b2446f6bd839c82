// The store (--store DIR): images, their generations and the nodes' views.
//
//   images/<image>/generations/<gen>/...    written by imagebuilder
//   images/<image>/current -> generations/<gen>
//   nodes/<node>/node.json                  image, pinned generation, mode, block size,
//                                           created, last seen, connections
//   nodes/<node>/<image>.<gen>.diff/.bitmap the node's layer (layer_file.hpp)
//   nodes/<node>/lock                       flock()ed while a server has the view open,
//                                           and by admin commands that change the node
//   nodes/<node>/pin                        the one address the node attaches from, if
//                                           pinned (admin pin, or --pin-addresses)
//
// Export names: "<image>" is the current generation, read-only;
// "<image>@<gen>" a given generation, read-only; "<image>/<node>" the
// node's view. `current` is read at each lookup, so a newly published
// generation is picked up without a restart; nodes keep the generation they
// were created on (node.json) until an admin resets them onto another.
//
// One writer per view (the lab tier, docs/security.md): while a node's view
// is attached from one client address, attaches from any other address are
// refused, resumes included; more connections from the same address (multi-
// connection, a resume that supersedes them) are not. A pinned node
// (nodes/<node>/pin) is attached from its pinned address only. The pin is
// read at each attach; a pin set while the node is attached elsewhere
// refuses that address's next attach, not the connections it has. Each attach holds an
// Attachment, counted per node under the mutex, so the rule holds whichever
// loop runs the handshake.
//
// Threads: any loop may call the lookups; a mutex guards the caches. Node
// records are changed by this process under the node's flock, so admin
// commands (another process) and the server never change a node at once.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sys/types.h>
#include <string>
#include <unordered_map>
#include <vector>

#include "lifecycle/lifecycle.hpp"
#include "storage/generation.hpp"
#include "storage/node_view.hpp"

namespace exports {

enum class NodePolicy { kAuto, kRegistered };

struct StoreOptions {
  NodePolicy nodes = NodePolicy::kAuto;
  storage::NodeMode mode = storage::NodeMode::kPersistent;  // for nodes created on attach
  uint32_t block_size = 4096;                                // for nodes created on attach
  // --pin-addresses: a node with no pin is pinned to the address of its
  // first successful attach.
  bool pin_addresses = false;
};

// The canonical text of a client address as nbd::Client gives it: IPv4
// dotted quad (also for an IPv4-mapped IPv6 address), IPv6 as inet_ntop
// writes it, or "unix" for Unix-socket clients. False when `text` is none.
bool canonical_address(const std::string& text, std::string* out);

// A node's record, node.json.
struct NodeRecord {
  std::string node, image, generation;
  storage::NodeMode mode = storage::NodeMode::kPersistent;
  uint32_t block_size = 4096;
  std::string created, last_seen;
  unsigned connections = 0;
};

// How a node attaches, from the options after '?' in IMAGE/NODE?OPT&OPT.
struct AttachOptions {
  // "resume": the node is reconnecting within one boot (nbdroot-keeper after
  // a server restart or a network failure), not booting: an ephemeral node
  // keeps its changes, and a node with no layer on disk is refused.
  bool resume = false;
  // "mode=persistent|ephemeral": the node's mode as its command line says
  // (nbdroot.mode=); used when the node is created at attach, and refused
  // when it differs from a registered node's mode.
  bool has_mode = false;
  storage::NodeMode mode = storage::NodeMode::kPersistent;
};

// What an export name asks for.
struct StoreName {
  std::string image, generation, node;  // generation "" = current; node "" = no view
  AttachOptions attach;
};
// Parses an export name. Returns false when it is not a store name; sets
// *err too when it looks like one but its options are wrong.
bool parse_store_name(const std::string& name, StoreName* out, std::string* err);

// The entries of a directory (nodes/) by lower-case name, kept current by
// inotify after one scan, so a node's first attach checks its name against
// 10,000 others without reading the directory. Rescans after an inotify
// overflow or when the directory itself moved; scans every time while it
// cannot watch (no directory yet, no inotify).
class NameIndex {
 public:
  explicit NameIndex(std::string dir) : dir_(std::move(dir)) {}
  ~NameIndex();
  NameIndex(const NameIndex&) = delete;
  NameIndex& operator=(const NameIndex&) = delete;
  // Entries whose lower-case form is `folded` (names of valid_store_name).
  std::vector<std::string> matching(const std::string& folded);

 private:
  void catch_up();
  void scan();
  std::string dir_;
  int fd_ = -1;
  bool current_ = false;
  bool warned_ = false;
  std::unordered_map<std::string, std::set<std::string>> by_folded_;
};

class Store {
 public:
  // A node's view attached from one address: while any of a node's
  // Attachments lives, attaches from other addresses are refused. Owned by
  // the connection's export; may be destroyed on any thread, before the Store.
  class Attachment {
   public:
    ~Attachment();
    Attachment(const Attachment&) = delete;
    Attachment& operator=(const Attachment&) = delete;

   private:
    friend class Store;
    Attachment(Store* store, std::string node) : store_(store), node_(std::move(node)) {}
    Store* store_;
    std::string node_;
  };

  Store(std::string root, StoreOptions opts) : root_(std::move(root)), opts_(opts) {}
  const std::string& root() const { return root_; }
  const StoreOptions& options() const { return opts_; }
  // Checks that the store directory exists and is usable.
  bool check(std::string* err) const;
  // Node states (lifecycle.hpp): with one, view() and describe() refuse a
  // node that may not attach (not ready; unknown under --new-nodes verify or
  // refuse) before anything is created or opened. Set before serving.
  void set_lifecycle(std::shared_ptr<const lifecycle::Lifecycle> l) { life_ = std::move(l); }

  // A generation, opened once and shared while anyone uses it.
  std::shared_ptr<storage::Generation> generation(const std::string& image, const std::string& gen,
                                                  std::string* err);
  // The node's view, opened on first use (creating the node under
  // --nodes auto) and shared by all its connections until the last one goes.
  // `address` is the client's (nbd::Client); *held is set to the attachment
  // that keeps other addresses out. Refused (nullptr, *err naming both
  // addresses) while the node is attached from another address.
  std::shared_ptr<storage::NodeView> view(const std::string& image, const std::string& node,
                                          const AttachOptions& how, const std::string& address,
                                          std::unique_ptr<Attachment>* held, std::string* err);
  // What a node's export would be, without opening its view (no lock, no
  // layer files, no record update): for NBD_OPT_INFO and the meta-context
  // options. Creates the node under --nodes auto, as an attach would.
  // Sets *rec and *size (the generation's size) and returns true, or sets *err.
  bool describe(const std::string& image, const std::string& node, const AttachOptions& how,
                NodeRecord* rec, uint64_t* size, std::string* err);
  // The size of generation IMAGE@GEN (named, not current), cached; false
  // and *err when it does not exist or does not open.
  bool generation_size(const std::string& image, const std::string& gen, uint64_t* size,
                       std::string* err);
  // An existing node's record and its generation's size, with no side
  // effect at all (never creates the node, opens no view, writes nothing):
  // for the HTTP API. False and *err when the node does not exist or
  // belongs to another image.
  bool lookup_node(const std::string& image, const std::string& node, NodeRecord* rec,
                   uint64_t* size, std::string* err);
  // Export names for NBD_OPT_LIST, each with a description: every image
  // with a current generation, every generation, every node.
  std::vector<std::pair<std::string, std::string>> list_exports() const;
  // Connection counts, recorded in node.json for admins.
  void attached(const std::string& node, int delta);

  // Node records and admin operations (also used by `nbdserver admin`).
  std::string node_dir(const std::string& node) const { return root_ + "/nodes/" + node; }
  std::string layer_prefix(const NodeRecord& r) const {
    return node_dir(r.node) + "/" + r.image + "." + r.generation;
  }
  bool read_node(const std::string& node, NodeRecord* r, std::string* err) const;
  // `durable`: fsync before and after the rename (records that admins set);
  // status updates (last seen, connections) skip it.
  bool write_node(const NodeRecord& r, bool durable, std::string* err) const;
  std::vector<std::string> nodes() const;
  // read_node() for listings: node.json as last parsed, while the file has
  // the same inode, size and mtime (records are replaced by rename).
  bool read_node_cached(const std::string& node, NodeRecord* r) const;
  // Creates several nodes alike, opening the generation once. Refuses the
  // whole list, creating none, when a name is bad, repeated or taken; else
  // stops at the first failure, and *created says how many were made.
  bool create_nodes(const std::vector<std::string>& nodes, const std::string& image,
                    const std::string& gen, storage::NodeMode mode, uint32_t block_size,
                    size_t* created, std::string* err);
  // Drops a node's changes, optionally moving it to generation `gen`
  // ("" = keep; "current" = the current one). Refused while attached.
  bool reset_node(const std::string& node, const std::string& gen, std::string* err);
  bool delete_node(const std::string& node, std::string* err);
  // The node's pinned address, "" when it has none; false and *err when the
  // pin file cannot be read or holds no address.
  bool read_pin(const std::string& node, std::string* address, std::string* err) const;
  // Pins an existing node to `address` (canonical_address), replacing any
  // pin; durable. *canonical is the address as stored.
  bool pin_node(const std::string& node, const std::string& address, std::string* canonical,
                std::string* err);
  // Removes the node's pin; *was_pinned says whether there was one.
  bool unpin_node(const std::string& node, bool* was_pinned, std::string* err);
  // Takes the node's lock without waiting; -1 and *err when a server holds it.
  int lock_node(const std::string& node, bool wait, std::string* err) const;

 private:
  std::shared_ptr<storage::Generation> generation_locked(const std::string& image,
                                                         const std::string& gen, std::string* err);
  bool generation_size_locked(const std::string& image, const std::string& gen, uint64_t* size,
                              std::string* err);
  // --pin-addresses: pins the node to `address` unless it has a pin; mu_ held.
  void pin_first(const std::string& node, const std::string& address);
  // view() without the writer check; mu_ held.
  std::shared_ptr<storage::NodeView> open_view(const std::string& image, const std::string& node,
                                               const AttachOptions& how, std::string* err);
  // A node's first attach creates it on the current generation; mu_ held.
  // *gen_out: the generation it is on, opened (cached while held).
  bool create_node_locked(const std::string& node, const std::string& image,
                          storage::NodeMode mode, uint32_t block_size,
                          std::shared_ptr<storage::Generation>* gen_out, std::string* err);
  // The names are valid, new, not repeated and no case variant of another
  // node's (`image` valid too).
  // `index`: where to find existing names (else one read of nodes/).
  bool check_new_names(const std::vector<std::string>& nodes, const std::string& image,
                       std::string* err, NameIndex* index = nullptr) const;
  // Makes the checked nodes' directories and records (durably).
  bool write_new_nodes(const std::vector<std::string>& nodes, const std::string& image,
                       const std::string& gen, storage::NodeMode mode, uint32_t block_size,
                       size_t* created, std::string* err);
  // The node's record, creating the node first if the rules allow; then
  // *created_on (if given) holds the generation it was created on.
  bool existing_record(const std::string& image, const std::string& node,
                       const AttachOptions& how, NodeRecord* rec, std::string* err,
                       std::shared_ptr<storage::Generation>* created_on = nullptr);
  // False and *err when the node's state forbids attaching its view.
  bool may_attach(const std::string& node, std::string* err) const {
    return !life_ || life_->may_attach(node, err);
  }
  std::string root_;
  StoreOptions opts_;
  std::shared_ptr<const lifecycle::Lifecycle> life_;
  std::mutex mu_;
  std::unique_ptr<NameIndex> node_names_;  // mu_ held; made at the first attach that creates
  std::map<std::string, std::weak_ptr<storage::Generation>> gens_;  // "image@gen"
  std::map<std::string, std::weak_ptr<storage::NodeView>> views_;   // node
  struct Writer {  // who has a node attached: one address, how many times
    std::string address;
    unsigned attachments = 0;
  };
  // writers_mu_, never held long: a loop's detach takes it, while mu_ may
  // be held by a creation's fsyncs. Taken inside mu_, never the reverse.
  std::mutex writers_mu_;
  std::map<std::string, Writer> writers_;  // node; writers_mu_ held
  std::mutex attached_mu_;                 // attached(): a record's read-modify-write
  std::map<std::string, uint64_t> gen_sizes_;  // "image@gen"; generations never change
  struct CachedRecord {
    dev_t dev = 0;
    ino_t ino = 0;
    off_t size = 0;
    int64_t mtime_ns = 0;
    NodeRecord rec;
  };
  mutable std::mutex records_mu_;
  mutable std::map<std::string, CachedRecord> records_;
};

std::string now_iso8601();

}  // namespace exports
