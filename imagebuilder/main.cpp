// imagebuilder: a directory becomes ext4 image generations in an nbdroot
// store. See docs/imagebuilder.md.
//
//   imagebuilder --store DIR build IMAGE --from SRCDIR [--size BYTES|auto] [--headroom PCT]
//                                        [--full] [--parent GEN] [--max-depth N]
//   imagebuilder --store DIR publish IMAGE [GEN]
//   imagebuilder --store DIR list IMAGE | rollback IMAGE | gc IMAGE
//   imagebuilder --store DIR diff [--index] IMAGE GEN1 GEN2
//   imagebuilder --store DIR flatten IMAGE GEN
//   imagebuilder --store DIR verify IMAGE [GEN]
//   imagebuilder --store DIR boot IMAGE --out DIR --server HOST:PORT [--generation GEN]
//   imagebuilder --store DIR boot IMAGE [--http-server HOST:PORT] [--generation GEN]
//
// Exit status: 0 success, 1 failure (message on stderr), 2 usage error.
#include "boot.hpp"
#include "build.hpp"
#include "digests.hpp"
#include "lifecycle.hpp"
#include "progress.hpp"
#include "store.hpp"
#include "util.hpp"

#include <boost/program_options.hpp>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

namespace po = boost::program_options;

namespace {

constexpr int kUsage = 2;

const char* kUsageText =
    "usage: imagebuilder --store DIR COMMAND ...\n"
    "  build IMAGE --from SRCDIR [--size BYTES|auto] [--headroom PCT] [--full]\n"
    "        [--parent GEN] [--max-depth N]   prints the new generation id last\n"
    "  publish IMAGE [GEN]                    default: the newest generation\n"
    "  rollback IMAGE                         publish the generation before current\n"
    "  list IMAGE                             generations, sizes, sharing, nodes\n"
    "  gc IMAGE                               remove generations nothing uses\n"
    "  diff [--index] IMAGE GEN1 GEN2         changed paths (+ added, - removed, M modified)\n"
    "  flatten [--wait] IMAGE GEN             make a delta generation full (builds do it\n"
    "                                         in the background past --max-depth)\n"
    "  verify IMAGE [GEN]                     check every chunk against chunks.sha256\n"
    "                                         (default: current, else the newest)\n"
    "  boot IMAGE --out DIR --server HOST:PORT [--generation GEN] [--mkinitrd SCRIPT]\n"
    "  boot IMAGE [--http-server HOST:PORT] [--generation GEN] [--mkinitrd SCRIPT]\n"
    "       [--mkverify SCRIPT] [--memtest-dir DIR]   into the store, for nbdserver --http\n"
    "global options: --store DIR (or $NBDROOT_STORE), --quiet\n";

int fail(const ib::Status& s) {
  fprintf(stderr, "imagebuilder: %s\n", s.message().c_str());
  return 1;
}

int usage(const std::string& why) {
  fprintf(stderr, "imagebuilder: %s\n%s", why.c_str(), kUsageText);
  return kUsage;
}

std::optional<uint64_t> parse_size(const std::string& s, bool* ok) {
  *ok = true;
  if (s.empty() || s == "auto") return std::nullopt;
  size_t pos = 0;
  unsigned long long v = 0;
  try {
    v = std::stoull(s, &pos);
  } catch (const std::exception&) {
    *ok = false;
    return std::nullopt;
  }
  std::string suffix = s.substr(pos);
  uint64_t mult = 1;
  if (suffix == "K" || suffix == "KiB") mult = 1ull << 10;
  else if (suffix == "M" || suffix == "MiB") mult = 1ull << 20;
  else if (suffix == "G" || suffix == "GiB") mult = 1ull << 30;
  else if (suffix == "T" || suffix == "TiB") mult = 1ull << 40;
  else if (!suffix.empty()) *ok = false;
  return v * mult;
}

int cmd_build(const ib::Store& store, const std::vector<std::string>& args, bool quiet) {
  po::options_description d("build");
  std::string from, size = "auto", parent;
  unsigned headroom = 25, max_depth = 8;
  bool full = false;
  d.add_options()("from", po::value(&from)->required(), "source directory")(
      "size", po::value(&size), "bytes (K/M/G suffixes) or auto")(
      "headroom", po::value(&headroom), "free space for nodes, % of the tree (auto size)")(
      "full", po::bool_switch(&full), "never build a delta")(
      "parent", po::value(&parent), "base the delta on this generation")(
      "max-depth", po::value(&max_depth), "flatten when a chain gets longer")(
      "image", po::value<std::string>()->required(), "image name");
  po::positional_options_description pos;
  pos.add("image", 1);
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(d).positional(pos).run(), vm);
  po::notify(vm);
  bool ok;
  ib::BuildOptions opt;
  opt.image = vm["image"].as<std::string>();
  opt.source = from;
  opt.size = parse_size(size, &ok);
  if (!ok) return usage("bad --size \"" + size + "\"");
  opt.headroom_pct = headroom;
  opt.full = full;
  if (!parent.empty()) opt.parent = parent;
  opt.max_depth = max_depth;
  ib::Progress progress(quiet);
  auto gen = ib::build(store, opt, &progress);
  if (!gen) return fail(gen.status());
  printf("%s\n", gen->c_str());
  return 0;
}

int cmd_boot(const ib::Store& store, const std::vector<std::string>& args) {
  po::options_description d("boot");
  ib::BootOptions opt;
  d.add_options()("out", po::value(&opt.out), "output directory (default: the store)")(
      "server", po::value(&opt.server), "HOST:PORT of nbdserver (with --out)")(
      "http-server", po::value(&opt.http_server), "HOST:PORT of nbdserver --http (store/boot/chain.ipxe)")(
      "mkverify", po::value(&opt.mkverify), "verification initrd script (TREE OUT)")(
      "memtest-dir", po::value(&opt.memtest_dir), "where memtest86+x64.{bin,efi} are (default /boot)")(
      "generation", po::value(&opt.generation), "default: current")(
      "mkinitrd", po::value(&opt.mkinitrd), "initrd script (TREE OUT)")(
      "cmdline", po::value(&opt.extra_cmdline), "extra kernel arguments")(
      "image", po::value(&opt.image)->required(), "image name");
  po::positional_options_description pos;
  pos.add("image", 1);
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(d).positional(pos).run(), vm);
  po::notify(vm);
  if (vm.count("out") && !vm.count("server"))
    return usage("boot --out DIR needs --server HOST:PORT (the NBD server its boot.ipxe names)");
  if (vm.count("out") && opt.out.empty()) return usage("boot: --out needs a directory");
  std::string summary;
  ib::Status s = ib::write_boot_files(store, opt, &summary);
  if (!s) return fail(s);
  printf("%s", summary.c_str());
  return 0;
}

// Prints each bad chunk and a summary; exit 1 when any chunk is bad.
int cmd_verify(const ib::Store& store, const std::vector<std::string>& a, bool quiet) {
  ib::Progress progress(quiet);
  auto r = ib::verify(store, a[0], a.size() > 1 ? std::optional(a[1]) : std::nullopt, &progress);
  if (!r) return fail(r.status());
  for (uint64_t c : r->bad)
    printf("bad chunk %llu at offset %llu\n", (unsigned long long)c,
           (unsigned long long)(c * r->chunk_size));
  printf("%s@%s: %llu chunks of %llu bytes checked, %zu bad\n", a[0].c_str(), r->gen.c_str(),
         (unsigned long long)r->checked, (unsigned long long)r->chunk_size, r->bad.size());
  if (r->bad.empty()) return 0;
  return fail(ib::Status::fail(a[0] + "@" + r->gen + ": " + std::to_string(r->bad.size()) +
                               " chunks do not match their digests"));
}

int run(const ib::Store& store, const std::string& cmd, const std::vector<std::string>& a,
        bool quiet) {
  auto need = [&](size_t lo, size_t hi) { return a.size() >= lo && a.size() <= hi; };
  if (cmd == "build") return cmd_build(store, a, quiet);
  if (cmd == "boot") return cmd_boot(store, a);
  if (cmd == "publish" && need(1, 2)) {
    std::string published;
    auto s = ib::publish(store, a[0], a.size() > 1 ? std::optional(a[1]) : std::nullopt, &published);
    if (!s) return fail(s);
    printf("%s\n", published.c_str());
    return 0;
  }
  if (cmd == "rollback" && need(1, 1)) {
    std::string published;
    auto s = ib::rollback(store, a[0], &published);
    if (!s) return fail(s);
    printf("%s\n", published.c_str());
    return 0;
  }
  if (cmd == "list" && need(1, 1)) {
    auto lines = ib::list_generations(store, a[0]);
    if (!lines) return fail(lines.status());
    for (auto& l : *lines) printf("%s\n", l.c_str());
    return 0;
  }
  if (cmd == "gc" && need(1, 1)) {
    auto removed = ib::gc(store, a[0]);
    if (!removed) return fail(removed.status());
    for (auto& g : *removed) printf("removed %s\n", g.c_str());
    return 0;
  }
  if (cmd == "diff" && (need(3, 3) || (need(4, 4) && a[0] == "--index"))) {
    bool index = a[0] == "--index";
    size_t o = index ? 1 : 0;
    auto lines = ib::diff(store, a[o], a[o + 1], a[o + 2], index);
    if (!lines) return fail(lines.status());
    for (auto& l : *lines) printf("%s\n", l.c_str());
    return 0;
  }
  if (cmd == "flatten" && (need(2, 2) || (need(3, 3) && a[0] == "--wait"))) {
    ib::Progress progress(quiet);
    const bool wait = a[0] == "--wait";
    const size_t o = wait ? 1 : 0;
    auto s = ib::flatten(store, a[o], a[o + 1], wait, &progress);
    if (!s) return fail(s);
    printf("%s\n", a[o + 1].c_str());
    return 0;
  }
  if (cmd == "verify" && need(1, 2)) return cmd_verify(store, a, quiet);
  return usage("unknown command or wrong arguments: " + cmd);
}

}  // namespace

int main(int argc, char** argv) {
  po::options_description global("global");
  std::string store_dir;
  bool quiet = false;
  global.add_options()("store", po::value(&store_dir), "store directory")(
      "quiet,q", po::bool_switch(&quiet), "no progress output")("help,h", "usage")(
      "command", po::value<std::string>(), "")("args", po::value<std::vector<std::string>>(), "");
  po::positional_options_description pos;
  pos.add("command", 1).add("args", -1);
  try {
    po::parsed_options parsed =
        po::command_line_parser(argc, argv).options(global).positional(pos).allow_unregistered().run();
    po::variables_map vm;
    po::store(parsed, vm);
    po::notify(vm);
    if (vm.count("help") || !vm.count("command")) {
      fputs(kUsageText, vm.count("help") ? stdout : stderr);
      return vm.count("help") ? 0 : kUsage;
    }
    if (store_dir.empty()) {
      const char* env = getenv("NBDROOT_STORE");
      if (!env || !*env) return usage("--store DIR is required");
      store_dir = env;
    }
    std::string cmd = vm["command"].as<std::string>();
    std::vector<std::string> rest = po::collect_unrecognized(parsed.options, po::include_positional);
    rest.erase(rest.begin());  // the command itself
    while (store_dir.size() > 1 && store_dir.back() == '/') store_dir.pop_back();
    return run(ib::Store(store_dir), cmd, rest, quiet);
  } catch (const po::error& e) {
    return usage(e.what());
  }
}
