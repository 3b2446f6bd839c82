// iPXE boot scripts from templates (issue 12): templates/<state>.ipxe in
// the store, edited by admins as plain files, with {{name}} variables
// replaced by the server. The built-in defaults below are written to the
// store at start for any state that has no template yet (never over an
// admin's file).
//
// Injection: a script is a program that the node runs, so no value put into
// one may carry iPXE syntax (newlines, "||", "&&", "${...}", quotes).
// Values a node sends (query parameters) must pass safe_hint() or the
// request is refused; values from the server (names, run ids) are checked
// with safe_token(); free text (a state's reason) goes through
// display_text(), which replaces what is not plainly printable.
#pragma once

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace http {

// A template variable's value, or why it has none for this node (then a
// template that uses it gets that error, e.g. "no image to boot: ...").
struct TemplateValue {
  std::string text;
  std::string unavailable;  // non-empty: no value, and why
};
using TemplateVars = std::map<std::string, TemplateValue>;

// The outcome of render_template(): ok, or an error naming `file` and the
// line ("templates/ready.ipxe:4: unknown variable {{kernal}}").
struct RenderResult {
  bool ok = false;
  bool unavailable = false;  // the error is a known variable without a value
  std::string text, error;
  std::set<std::string> used;  // the variables the template named, when ok
};

// Replaces every {{name}} (spaces inside the braces allowed) with vars'
// value. An unknown name, a "{{" without "}}" on its line, or an empty name
// is an error; "${...}" and single braces are iPXE's and pass through.
RenderResult render_template(const std::string& tmpl, const TemplateVars& vars,
                             const std::string& file);

// Query values from nodes (uuid, serial, platform, mac): 1 to 64 of
// [A-Za-z0-9._:-].
bool safe_hint(const std::string& s);
// Tokens made by the server (run ids, steps): 1 to 128 of [A-Za-z0-9._:@-].
bool safe_token(const std::string& s);
// Free text for an echo line: control characters and anything but
// [A-Za-z0-9 .,:()/%+=@_-] become '_', at most 200 bytes.
std::string display_text(const std::string& s);
// An extra kernel command line (--boot-cmdline, nodes/<node>/cmdline):
// runs of whitespace (newlines included) become one space, ends trimmed.
// False and *err when a character is outside printable ASCII or is one of
// $ | & ; ` " ' \ { } < > # (iPXE syntax, shell quoting).
bool normalize_cmdline(const std::string& in, std::string* out, std::string* err);
// A Host header (or --advertise): "name", "name:port", "1.2.3.4:port",
// "[v6]:port". *host gets the host part as it is (brackets kept), *port ""
// or the digits.
bool parse_host_header(const std::string& s, std::string* host, std::string* port);

// The states that have a template, and the built-in default of each.
const std::vector<std::string>& template_states();
std::optional<std::string> default_template(const std::string& state);

// Writes templates/<state>.ipxe for every state that has none (O_EXCL:
// an admin's file is never replaced). *written lists the files made.
bool install_default_templates(const std::string& store_root, std::vector<std::string>* written,
                               std::string* err);

}  // namespace http
