#include "http/boot_template.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>

namespace http {
namespace {

// The defaults. Every one starts with #!ipxe; the variables are those of
// docs/nbdserver.md ("Boot scripts"). ${...} is iPXE's own.
constexpr const char* kReady = R"(#!ipxe
# nbdroot: node {{node}} is ready: it boots its root {{image}}@{{generation}} over NBD.
# This file is a template (templates/ready.ipxe); the server fills in the names in double braces.
echo nbdroot: node {{node}} boots {{image}}@{{generation}} from {{nbd}}
kernel {{kernel}} initrd=initrd.img {{cmdline}}{{tls_args}} || goto retry
initrd --name initrd.img {{initrd}} || goto retry
boot || goto retry
:retry
echo nbdroot: booting node {{node}} failed, trying again in 10 s
sleep 10
chain --replace --autofree {{url}}
)";

constexpr const char* kVerify = R"(#!ipxe
# nbdroot: node {{node}} verifies its hardware (run {{run}}) before it boots a root.
# This file is a template (templates/verify.ipxe); the server fills in the names in double braces.
echo nbdroot: node {{node}}: verification run {{run}}, step {{step}}
iseq x{{step}} xmemtest86 && goto memtest86 ||
kernel {{kernel}} initrd=verify.img {{verify_cmdline}} || goto retry
initrd --name verify.img {{verify_initrd}} || goto retry
boot || goto retry
:memtest86
iseq ${platform} efi && goto memtest_efi ||
kernel {{memtest_bin}} console=ttyS0,115200 nopause || goto retry
boot || goto retry
:memtest_efi
kernel {{memtest_efi}} console=ttyS0,115200 nopause || goto retry
boot || goto retry
:retry
echo nbdroot: the verification boot of node {{node}} failed, trying again in 10 s
sleep 10
chain --replace --autofree {{url}}
)";

constexpr const char* kFailed = R"(#!ipxe
# nbdroot: node {{node}} failed its verification; it boots nothing.
# This file is a template (templates/failed.ipxe); the server fills in the names in double braces.
echo nbdroot: node {{node}} is {{state}}: {{reason}}
echo nbdroot: it boots nothing until an admin moves it: nbdserver admin state {{node}} verify
echo nbdroot: asking again in 60 s
sleep 60
chain --replace --autofree {{url}}
)";

constexpr const char* kNew = R"(#!ipxe
# nbdroot: node {{node}} is new and waits for an admin.
# This file is a template (templates/new.ipxe); the server fills in the names in double braces.
echo nbdroot: node {{node}} is {{state}}: {{reason}}
echo nbdroot: it waits for an admin: nbdserver admin state {{node}} verify
echo nbdroot: asking again in 60 s
sleep 60
chain --replace --autofree {{url}}
)";

constexpr const char* kRetired = R"(#!ipxe
# nbdroot: node {{node}} is retired; it boots nothing.
# This file is a template (templates/retired.ipxe); the server fills in the names in double braces.
echo nbdroot: node {{node}} is {{state}}: {{reason}}
exit
)";

bool in_set(char c, const char* extra) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         (c != '\0' && std::strchr(extra, c) != nullptr);
}

bool all_in(const std::string& s, size_t max, const char* extra) {
  if (s.empty() || s.size() > max) return false;
  for (char c : s)
    if (!in_set(c, extra)) return false;
  return true;
}

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

}  // namespace

RenderResult render_template(const std::string& tmpl, const TemplateVars& vars,
                             const std::string& file) {
  RenderResult r;
  std::string& out = r.text;
  out.reserve(tmpl.size() + 512);
  size_t line = 1, pos = 0;
  for (;;) {
    const size_t open = tmpl.find("{{", pos);
    const size_t stop = open == std::string::npos ? tmpl.size() : open;
    for (size_t i = pos; i < stop; ++i) line += tmpl[i] == '\n';
    out.append(tmpl, pos, stop - pos);
    if (open == std::string::npos) break;
    const size_t eol = tmpl.find('\n', open);
    const size_t close = tmpl.find("}}", open + 2);
    const std::string where = file + ":" + std::to_string(line) + ": ";
    if (close == std::string::npos || (eol != std::string::npos && close > eol)) {
      r.error = where + "'{{' without '}}' on its line";
      return r;
    }
    const std::string name = trim(tmpl.substr(open + 2, close - open - 2));
    auto it = vars.find(name);
    if (name.empty() || it == vars.end()) {
      r.error = where + "unknown variable {{" + name + "}}";
      return r;
    }
    if (!it->second.unavailable.empty()) {
      r.unavailable = true;
      r.error = where + "{{" + name + "}}: " + it->second.unavailable;
      return r;
    }
    out += it->second.text;
    r.used.insert(name);
    pos = close + 2;
  }
  r.ok = true;
  return r;
}

bool safe_hint(const std::string& s) { return all_in(s, 64, "._:-"); }

bool safe_token(const std::string& s) { return all_in(s, 128, "._:@-"); }

std::string display_text(const std::string& s) {
  std::string out = s.substr(0, 200);
  for (char& c : out)
    if (!in_set(c, " .,:()/%+=@_-")) c = '_';
  return out;
}

bool normalize_cmdline(const std::string& in, std::string* out, std::string* err) {
  std::string r;
  bool space = false;
  for (char c : in) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      space = !r.empty();
      continue;
    }
    const unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x21 || u > 0x7e || std::strchr("$|&;`\"'\\{}<>#", c) != nullptr) {
      *err = u >= 0x21 && u <= 0x7e ? std::string("the character '") + c + "' is not allowed"
                                    : "only printable ASCII is allowed";
      *err += " (iPXE syntax or shell quoting; allowed: printable ASCII but $|&;`\"'\\{}<>#)";
      return false;
    }
    if (space) r += ' ';
    space = false;
    r += c;
  }
  *out = std::move(r);
  return true;
}

bool parse_host_header(const std::string& s, std::string* host, std::string* port) {
  if (s.empty() || s.size() > 255) return false;
  size_t end;
  if (s[0] == '[') {
    end = s.find(']');
    if (end == std::string::npos || end < 3 || !all_in(s.substr(1, end - 1), 64, ":.")) return false;
    for (char c : s.substr(1, end - 1))
      if (!(std::isxdigit(static_cast<unsigned char>(c)) || c == ':' || c == '.')) return false;
    ++end;
  } else {
    end = s.find(':');
    if (end == std::string::npos) end = s.size();
    const std::string h = s.substr(0, end);
    if (!all_in(h, 253, ".-") || h.front() == '.' || h.front() == '-') return false;
  }
  *host = s.substr(0, end);
  port->clear();
  if (end == s.size()) return true;
  if (s[end] != ':') return false;
  const std::string p = s.substr(end + 1);
  if (p.empty() || p.size() > 5 || p.find_first_not_of("0123456789") != std::string::npos ||
      std::stoi(p) > 65535 || std::stoi(p) == 0)
    return false;
  *port = p;
  return true;
}

const std::vector<std::string>& template_states() {
  static const std::vector<std::string> states = {"new", "verify", "ready", "failed", "retired"};
  return states;
}

std::optional<std::string> default_template(const std::string& state) {
  if (state == "ready") return kReady;
  if (state == "verify") return kVerify;
  if (state == "failed") return kFailed;
  if (state == "new") return kNew;
  if (state == "retired") return kRetired;
  return std::nullopt;
}

bool install_default_templates(const std::string& store_root, std::vector<std::string>* written,
                               std::string* err) {
  const std::string dir = store_root + "/templates";
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    *err = dir + ": cannot create: " + strerror(errno);
    return false;
  }
  for (const std::string& state : template_states()) {
    const std::string path = dir + "/" + state + ".ipxe";
    const std::string text = *default_template(state);
    // Written under a temporary name and linked into place: the final name
    // appears whole or not at all, and link() fails on an existing file.
    const std::string tmp = dir + "/." + state + ".ipxe.tmp";
    unlink(tmp.c_str());
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
      *err = tmp + ": cannot create: " + strerror(errno);
      return false;
    }
    const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) &&
                    fsync(fd) == 0;
    const int e = errno;
    ::close(fd);
    if (!ok) {
      unlink(tmp.c_str());
      *err = tmp + ": cannot write: " + strerror(e);
      return false;
    }
    const int rc = link(tmp.c_str(), path.c_str());
    const int le = errno;
    unlink(tmp.c_str());
    if (rc == 0) {
      written->push_back(path);
    } else if (le != EEXIST) {
      *err = path + ": cannot create: " + strerror(le);
      return false;
    }
  }
  return true;
}

}  // namespace http
