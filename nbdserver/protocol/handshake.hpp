// Fixed-newstyle handshake as a sans-I/O state machine.
//
// The connection feeds it the bytes it receives and sends whatever it appends
// to out(). It never reads a socket or a file, so unit tests and the fuzzer
// drive it with plain byte strings. One Handshake object per connection, used
// from the connection's loop thread only.
//
// States: kGreeting (server magic sent, waiting for 4 bytes of client flags)
//      -> kOptions (a loop of option headers and option data)
//      -> kSkipping (discarding the data of an option too large to buffer)
//      -> kTransmission (export chosen; session() is valid) or kClosed.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "protocol/wire.hpp"

namespace nbd {

// What the handshake needs to know about one export. Owned by the catalog.
struct ExportInfo {
  std::string name;
  std::string description;
  uint64_t size = 0;
  // Transmission flags the export supports (kFlagReadOnly, kFlagSendTrim, ...).
  // kFlagHasFlags and kFlagSendDf are added by the handshake.
  uint16_t flags = 0;
  uint32_t min_block = 1;
  uint32_t preferred_block = 4096;
  uint32_t max_block = 32 * 1024 * 1024;
  // Metadata contexts this export can report, e.g. "base:allocation".
  std::vector<std::string> contexts;
};

// Who is asking. Catalogs whose answer depends on the client (a node's view
// is attached from one address at a time) read it; others ignore it.
struct Client {
  // The peer's address without its port ("10.0.0.5", "fd00::5"), "unix" for
  // a Unix-socket client, "" when unknown (unit tests, the fuzzer).
  std::string address;
};

// The exports a handshake may offer. Implementations must outlive every
// Handshake that uses them and be safe to call from any loop thread.
class ExportCatalog {
 public:
  virtual ~ExportCatalog() = default;
  // nullptr when no export answers to `name`. The returned info, and the
  // shared_ptr keeping it alive, stay valid for the connection's lifetime.
  virtual std::shared_ptr<const ExportInfo> find(std::string_view name) const = 0;
  // find(), and when it finds nothing, *why may say why (for the client).
  virtual std::shared_ptr<const ExportInfo> lookup(std::string_view name, std::string* why) const {
    (void)why;
    return find(name);
  }
  // What NBD_OPT_GO and NBD_OPT_EXPORT_NAME use: lookup() on behalf of
  // `client`, which may be refused what another client would get.
  virtual std::shared_ptr<const ExportInfo> attach(const Client& client, std::string_view name,
                                                   std::string* why) const {
    (void)client;
    return lookup(name, why);
  }
  // What NBD_OPT_INFO and NBD_OPT_*_META_CONTEXT report: the export as
  // lookup() would serve it, but without attaching anything (a store node's
  // view is not opened). NBD_OPT_GO and NBD_OPT_EXPORT_NAME use attach().
  virtual std::shared_ptr<const ExportInfo> describe(std::string_view name,
                                                     std::string* why) const {
    return lookup(name, why);
  }
  // Every export, in listing order.
  virtual std::vector<std::shared_ptr<const ExportInfo>> list() const = 0;
};

struct MetaContext {
  uint32_t id;
  std::string name;
};

// What a finished handshake agreed on.
struct Session {
  std::shared_ptr<const ExportInfo> exp;
  uint16_t flags = 0;  // transmission flags exactly as sent to the client
  bool structured = false;
  bool extended = false;
  std::vector<MetaContext> contexts;  // selected with NBD_OPT_SET_META_CONTEXT
};

struct HandshakeLimits {
  // Option data up to this size is buffered and parsed.
  uint32_t max_option = 64 * 1024;
  // Larger option data up to this size is discarded and answered with
  // NBD_REP_ERR_TOO_BIG; beyond it the client is cut off as abusive.
  uint32_t max_skip = 16 * 1024 * 1024;
  // Options per connection before the client is cut off as abusive, plus
  // options_per_listed for each export of the longest NBD_OPT_LIST reply
  // sent: a client that asks about every export it was told of (nbdinfo
  // --list: NBD_OPT_INFO and NBD_OPT_LIST_META_CONTEXT each) is not abuse.
  uint32_t max_options = 4096;
  uint32_t options_per_listed = 4;
};

class Handshake {
 public:
  enum class Status { kContinue, kTransmission, kClosed };

  // Appends the server greeting to out() at once. `catalog` must outlive this.
  Handshake(const ExportCatalog& catalog, HandshakeLimits limits = {});

  // Consumes a prefix of data[0, len) and returns how much it used. Bytes after
  // the handshake ends are left unconsumed: they belong to transmission.
  size_t feed(const uint8_t* data, size_t len);

  Status status() const { return status_; }
  // Bytes to send to the client; the caller sends and clears them.
  std::string& out() { return out_; }
  // Valid once status() == kTransmission.
  const Session& session() const { return session_; }
  // Why the handshake closed (for the log); empty when it did not.
  const std::string& close_reason() const { return close_reason_; }
  // True when the client ended the handshake with NBD_OPT_ABORT.
  bool aborted() const { return aborted_; }
  // Who the client is, for the catalog's attach(). Call before feeding.
  void set_client(Client client) { client_ = std::move(client); }
  // After this, options other than NBD_OPT_ABORT get NBD_REP_ERR_SHUTDOWN.
  void set_shutting_down() { shutting_down_ = true; }
  // How many bytes the state machine waits for before it can move on.
  size_t wanted() const;
  // Client messages handled so far (the client flags, then each option,
  // answered or refused). The connection times the handshake by the gaps
  // between them, so a client that keeps finishing options is not cut off
  // and one that trickles bytes of an option never finishing is.
  uint64_t progress() const { return progress_; }
  // Option errors sent since the last call, one line each, for the log.
  std::vector<std::string> take_errors() { return std::exchange(errors_, {}); }

 private:
  enum class State { kGreeting, kOptionHeader, kOptionData, kSkipping, kDone };

  void on_client_flags(const uint8_t* p);
  void on_option_header(const uint8_t* p);
  void on_option(uint32_t opt, std::string_view data);
  void opt_export_name(std::string_view data);
  void opt_abort();
  void opt_list(std::string_view data);
  void opt_info_or_go(uint32_t opt, std::string_view data);
  void opt_structured_reply(std::string_view data);
  void opt_extended_headers(std::string_view data);
  void opt_meta_context(uint32_t opt, std::string_view data);

  uint16_t transmission_flags(const ExportInfo& e) const;
  void reply(uint32_t opt, uint32_t type, std::string_view data = {});
  void reply_error(uint32_t opt, uint32_t type, std::string_view message);
  void close(std::string reason);
  void enter_transmission(std::shared_ptr<const ExportInfo> e);

  const ExportCatalog& catalog_;
  HandshakeLimits limits_;
  Client client_;
  State state_ = State::kGreeting;
  Status status_ = Status::kContinue;
  std::string in_;  // partial message being collected
  std::string out_;
  std::string close_reason_;
  uint32_t cur_opt_ = 0;
  uint64_t cur_len_ = 0;
  uint64_t skip_left_ = 0;
  uint32_t options_seen_ = 0;
  uint64_t options_allowed_ = 0;  // max_options, raised by NBD_OPT_LIST replies
  uint64_t progress_ = 0;
  bool no_zeroes_ = false;
  bool aborted_ = false;
  bool shutting_down_ = false;
  Session session_;
  std::string meta_export_;  // export the selected contexts were set for
  std::vector<std::string> errors_;
};

}  // namespace nbd
