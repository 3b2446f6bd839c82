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
//      -> kStartTls (NBD_OPT_STARTTLS acknowledged; nothing is read until the
//         caller has run TLS and called tls_established(), then kOptions)
//      -> kTransmission (export chosen; session() is valid) or kClosed.
//
// TLS (the spec's "TLS support"): with TlsMode::kRequire the server is in
// FORCEDTLS mode. Before TLS, every option but STARTTLS and ABORT is answered
// with NBD_REP_ERR_TLS_REQD after its data has been read (or skipped), so the
// stream stays in sync; NBD_OPT_EXPORT_NAME, which has no error reply, ends
// the session; and the catalog is never called, so nothing costly (opening a
// view) happens for an unauthenticated client. feed() stops right after the
// STARTTLS reply: the bytes behind it are the TLS stream, never NBD. Nothing
// negotiated before STARTTLS survives it (nbdkit's CVE-2021-3716 kept a
// plaintext NBD_OPT_STRUCTURED_REPLY); only the greeting's client flags do.
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
  // The identity TLS authenticated (a PSK identity, a certificate's name);
  // empty without TLS. Set by Handshake::tls_established().
  std::string identity;
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
  // True when attach(client, name) or describe(client, name) may block on
  // I/O (opening or creating a node's view, creating its record): a
  // Handshake with deferred attaches then leaves the call to its caller
  // (Handshake::set_defer_attach).
  virtual bool attach_may_block(const Client& client, std::string_view name) const {
    (void)client;
    (void)name;
    return false;
  }
  // What NBD_OPT_INFO and NBD_OPT_*_META_CONTEXT report: the export as
  // lookup() would serve it, but without attaching anything (a store node's
  // view is not opened), or nothing when `client` may not attach it.
  // NBD_OPT_GO and NBD_OPT_EXPORT_NAME use attach().
  virtual std::shared_ptr<const ExportInfo> describe(const Client& client, std::string_view name,
                                                     std::string* why) const {
    (void)client;
    return lookup(name, why);
  }
  // Every export, in listing order.
  virtual std::vector<std::shared_ptr<const ExportInfo>> list() const = 0;
};

// The catalog call a deferred option waits for (Handshake::deferred_call):
// who asks, for which name, and whether it is attach() (NBD_OPT_GO,
// NBD_OPT_EXPORT_NAME) or describe() (NBD_OPT_INFO, the meta-context
// options). A copy, for the thread that makes the call.
struct CatalogCall {
  Client client;
  std::string name;
  bool describe = false;
  std::shared_ptr<const ExportInfo> run(const ExportCatalog& catalog, std::string* why) const {
    return describe ? catalog.describe(client, name, why) : catalog.attach(client, name, why);
  }
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

// kOff: the spec's NOTLS mode (NBD_OPT_STARTTLS gets NBD_REP_ERR_UNSUP).
// kRequire: FORCEDTLS, every option but STARTTLS and ABORT needs TLS first.
enum class TlsMode { kOff, kRequire };

class Handshake {
 public:
  // kStartTls: out() ends with the ACK to NBD_OPT_STARTTLS. The caller sends
  // it, runs TLS over the connection, then calls tls_established().
  // kAttaching: an option naming an export waits for the caller's catalog
  // call (set_defer_attach); feed() consumes nothing until attach_done().
  enum class Status { kContinue, kStartTls, kAttaching, kTransmission, kClosed };

  // Appends the server greeting to out() at once. `catalog` must outlive this.
  Handshake(const ExportCatalog& catalog, HandshakeLimits limits = {},
            TlsMode tls = TlsMode::kOff);

  // Consumes a prefix of data[0, len) and returns how much it used. Bytes after
  // the handshake ends are left unconsumed: they belong to transmission. So are
  // bytes after an acknowledged NBD_OPT_STARTTLS: they are the TLS stream, and
  // feed() consumes nothing until tls_established().
  size_t feed(const uint8_t* data, size_t len);
  // Call once TLS is up after status() == kStartTls, with the identity TLS
  // authenticated (empty when none). Options are read again, now the ones the
  // client sends over TLS; everything negotiated before (structured replies,
  // extended headers, metadata contexts, partial input) is forgotten. Called
  // in any other state, it closes the handshake (a caller's bug never passes
  // as a TLS session).
  void tls_established(std::string identity);
  // True once tls_established() was called.
  bool tls_active() const { return tls_active_; }
  // Deferred attaches: with this on, the options that name an export
  // (NBD_OPT_GO, NBD_OPT_EXPORT_NAME, NBD_OPT_INFO and the meta-context
  // options) do not call the catalog for a name its attach_may_block()
  // names. status() becomes kAttaching; the caller runs
  // deferred_call().run(catalog, &why) where blocking harms nobody (a
  // worker thread), then gives the result to attach_done(), which answers
  // the option as a synchronous call would have.
  void set_defer_attach(bool on) { defer_attach_ = on; }
  const CatalogCall& deferred_call() const { return pending_.call; }
  // The result of the deferred attach (nullptr and why when refused).
  // Called in any other state, it closes the handshake.
  void attach_done(std::shared_ptr<const ExportInfo> e, std::string why);

  Status status() const { return status_; }
  // Bytes to send to the client; the caller sends and clears them.
  std::string& out() { return out_; }
  // Valid once status() == kTransmission.
  const Session& session() const { return session_; }
  // Why the handshake closed (for the log); empty when it did not.
  const std::string& close_reason() const { return close_reason_; }
  // True when the client ended the handshake with NBD_OPT_ABORT.
  bool aborted() const { return aborted_; }
  // Who the client is, for the catalog's attach(). Call before feeding. Its
  // identity is ignored: only tls_established() sets one.
  void set_client(Client client) {
    client.identity = std::move(client_.identity);
    client_ = std::move(client);
  }
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
  enum class State { kGreeting, kOptionHeader, kOptionData, kSkipping, kStartTls, kDone };

  void on_client_flags(const uint8_t* p);
  void on_option_header(const uint8_t* p);
  void on_option(uint32_t opt, std::string_view data);
  void on_skipped();
  bool needs_tls(uint32_t opt) const;
  void opt_starttls(std::string_view data);
  void opt_export_name(std::string_view data);
  void opt_abort();
  void opt_list(std::string_view data);
  void opt_info_or_go(uint32_t opt, std::string_view data);
  // The answers once the export is known (attached, described or refused).
  void answer_export_name(std::string_view name, std::shared_ptr<const ExportInfo> e,
                          const std::string& why);
  void answer_info_or_go(uint32_t opt, std::string_view name, std::shared_ptr<const ExportInfo> e,
                         const std::string& why, bool want_name, bool want_desc);
  void answer_meta_context(uint32_t opt, std::string_view name,
                           const std::vector<std::string>& queries,
                           std::shared_ptr<const ExportInfo> e, const std::string& why);
  // Defers the attach (or description) of `name` for option `opt` when
  // set_defer_attach() is on and the catalog says it may block; true if so
  // (then *queries, a meta-context option's, moved into the pending state).
  bool defer(uint32_t opt, std::string_view name, bool want_name, bool want_desc,
             std::vector<std::string>* queries = nullptr);
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
  TlsMode tls_mode_;
  bool tls_active_ = false;
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
  bool defer_attach_ = false;
  // The call option `opt` makes: attach() for GO and EXPORT_NAME, else describe().
  CatalogCall call(uint32_t opt, std::string_view name) const {
    return {client_, std::string(name), opt != kOptGo && opt != kOptExportName};
  }
  struct PendingAttach {
    uint32_t opt = 0;
    CatalogCall call;
    bool want_name = false, want_desc = false;
    std::vector<std::string> queries;  // the meta-context options'
  } pending_;
  Session session_;
  std::string meta_export_;  // export the selected contexts were set for
  std::vector<std::string> errors_;
};

}  // namespace nbd
