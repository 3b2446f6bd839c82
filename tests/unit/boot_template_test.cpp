// Boot script templates (http/boot_template): rendering, its errors, the
// checks that keep node-sent values out of iPXE syntax, and the built-in
// defaults (each renders with the variables the server provides).
#include "http/boot_template.hpp"

#include <gtest/gtest.h>

#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace http {
namespace {

TemplateVars vars() {
  TemplateVars v;
  for (const char* name :
       {"node", "state", "reason", "image", "generation", "run", "step", "base", "nbd", "url",
        "kernel", "initrd", "verify_initrd", "memtest_bin", "memtest_efi", "cmdline",
        "verify_cmdline", "extra", "mac", "uuid", "serial", "platform", "tls_args"})
    v[name] = {std::string("<") + name + ">", ""};
  return v;
}

TEST(BootTemplate, ReplacesVariablesAndLeavesIpxeSyntax) {
  const RenderResult r =
      render_template("#!ipxe\nkernel {{kernel}} {{ cmdline }}\necho ${platform} {x}\n", vars(),
                      "t.ipxe");
  ASSERT_TRUE(r.ok) << r.error;
  EXPECT_EQ(r.text, "#!ipxe\nkernel <kernel> <cmdline>\necho ${platform} {x}\n");
  // What the template used: the boot API delivers a key only where
  // {{tls_args}} is.
  EXPECT_EQ(r.used, (std::set<std::string>{"kernel", "cmdline"}));
}

TEST(BootTemplate, UnknownVariableNamesFileAndLine) {
  const RenderResult r = render_template("#!ipxe\n\necho {{node}} {{kernal}}\n", vars(),
                                         "templates/ready.ipxe");
  EXPECT_FALSE(r.ok);
  EXPECT_FALSE(r.unavailable);
  EXPECT_EQ(r.error, "templates/ready.ipxe:3: unknown variable {{kernal}}");
}

TEST(BootTemplate, UnclosedAndEmptyNamesAreErrors) {
  RenderResult r = render_template("a\n{{node\n}}\n", vars(), "f");
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.error, "f:2: '{{' without '}}' on its line");
  r = render_template("{{}}", vars(), "f");
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.error, "f:1: unknown variable {{}}");
}

TEST(BootTemplate, UnavailableVariableGivesItsReason) {
  TemplateVars v = vars();
  v["kernel"] = {"", "no image to boot"};
  const RenderResult r = render_template("x {{node}}\nkernel {{kernel}}\n", v, "f");
  EXPECT_FALSE(r.ok);
  EXPECT_TRUE(r.unavailable);
  EXPECT_EQ(r.error, "f:2: {{kernel}}: no image to boot");
}

TEST(BootTemplate, HintsAreRestricted) {
  EXPECT_TRUE(safe_hint("52-54-00-12-34-56"));
  EXPECT_TRUE(safe_hint("a0b1c2d3-0000-4000-8000-1234567890ab"));
  EXPECT_TRUE(safe_hint("efi"));
  EXPECT_TRUE(safe_hint("52:54:00:12:34:56"));
  for (const char* bad : {"", "a b", "x\nshell", "${net0/mac}", "a||b", "a&&b", "a;b", "\"q\"",
                          "a#b", "a\\b"})
    EXPECT_FALSE(safe_hint(bad)) << bad;
  EXPECT_FALSE(safe_hint(std::string(65, 'a')));
}

TEST(BootTemplate, DisplayTextKeepsNoSyntax) {
  EXPECT_EQ(display_text("timed out in memtester (run 3)"), "timed out in memtester (run 3)");
  EXPECT_EQ(display_text("a\nshell || ${x} && y; #z"), "a_shell __ __x_ __ y_ _z");
  EXPECT_EQ(display_text(std::string(300, 'a')).size(), 200u);
}

TEST(BootTemplate, CmdlineIsNormalisedAndChecked) {
  std::string out, err;
  ASSERT_TRUE(normalize_cmdline("  console=ttyS0,115200\n  quiet \n", &out, &err));
  EXPECT_EQ(out, "console=ttyS0,115200 quiet");
  ASSERT_TRUE(normalize_cmdline("", &out, &err));
  EXPECT_EQ(out, "");
  for (const char* bad : {"a ${x}", "a || b", "a;b", "a&b", "a\"b", "a\x01", "a\xc3\xa9"})
    EXPECT_FALSE(normalize_cmdline(bad, &out, &err)) << bad;
}

TEST(BootTemplate, HostHeaders) {
  std::string h, p;
  ASSERT_TRUE(parse_host_header("10.0.2.2:8080", &h, &p));
  EXPECT_EQ(h, "10.0.2.2");
  EXPECT_EQ(p, "8080");
  ASSERT_TRUE(parse_host_header("boot.example", &h, &p));
  EXPECT_EQ(h, "boot.example");
  EXPECT_EQ(p, "");
  ASSERT_TRUE(parse_host_header("[fe80::1]:80", &h, &p));
  EXPECT_EQ(h, "[fe80::1]");
  EXPECT_EQ(p, "80");
  for (const char* bad : {"", "a b", "x:", "x:0", "x:70000", "x:1:2", "[zz::1]:1", "evil\n#",
                          "a${x}", "-a", "[::1"})
    EXPECT_FALSE(parse_host_header(bad, &h, &p)) << bad;
}

TEST(BootTemplate, DefaultsRenderWithTheServersVariables) {
  for (const std::string& state : template_states()) {
    const std::optional<std::string> t = default_template(state);
    ASSERT_TRUE(t);
    EXPECT_EQ(t->rfind("#!ipxe\n", 0), 0u) << state;
    const RenderResult r = render_template(*t, vars(), state);
    EXPECT_TRUE(r.ok) << state << ": " << r.error;
    EXPECT_EQ(r.text.find("{{"), std::string::npos) << state;
  }
  EXPECT_FALSE(default_template("bogus"));
}

TEST(BootTemplate, InstallNeverOverwrites) {
  char tmpl[] = "/tmp/boot_template_test.XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string root = tmpl;
  mkdir((root + "/templates").c_str(), 0755);
  { std::ofstream(root + "/templates/ready.ipxe") << "#!ipxe\nmine\n"; }
  std::vector<std::string> written;
  std::string err;
  ASSERT_TRUE(install_default_templates(root, &written, &err)) << err;
  EXPECT_EQ(written.size(), template_states().size() - 1);
  std::stringstream s;
  s << std::ifstream(root + "/templates/ready.ipxe").rdbuf();
  EXPECT_EQ(s.str(), "#!ipxe\nmine\n");
  written.clear();
  ASSERT_TRUE(install_default_templates(root, &written, &err)) << err;
  EXPECT_TRUE(written.empty());
  size_t files = 0;
  for (const auto& e : std::filesystem::directory_iterator(root + "/templates")) {
    (void)e;
    ++files;
  }
  EXPECT_EQ(files, template_states().size());  // no temporary file left
  std::filesystem::remove_all(root);
}

}  // namespace
}  // namespace http
