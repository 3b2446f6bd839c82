#include "http/store_api.hpp"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ctime>
#include <mutex>
#include <optional>
#include <set>

#include "storage/chunk_digests.hpp"
#include "storage/node_keys.hpp"
#include "tls/seal.hpp"
#include "storage/generation.hpp"
#include "storage/layer_file.hpp"

namespace http {
namespace {

using storage::valid_store_name;

// Under --tls require, the key peers of the node's generation authenticate
// with, sealed with the node's own key (tls/seal.hpp): only that node opens
// it. Nothing when the node has no key.
void add_peer_key(exports::Store& store, const exports::NodeRecord& rec, nlohmann::json* j) {
  std::string why;
  std::optional<storage::NodeKey> k =
      storage::load(store.root(), rec.node, int64_t(time(nullptr)), &why);
  tls::Key secret;
  if (!k) return;
  if (!storage::peer_secret(store.root(), &secret, &why)) {
    spdlog::error("peer keys: {}", why);
    return;
  }
  const std::string gen = rec.image + "@" + rec.generation;
  const std::string sealed =
      tls::seal(k->key, tls::peer_key_context(rec.node, gen), tls::peer_key(secret, gen));
  if (sealed.empty()) return;
  (*j)["peer_identity"] = tls::peer_identity(gen);
  (*j)["peer_key_sealed"] = sealed;
}

void get_node(exports::Store& store, bool tls_required, const httplib::Request& req,
              httplib::Response& res) {
  const std::string image = req.matches[1], node = req.matches[2];
  if (!valid_store_name(image) || !valid_store_name(node))
    return reply_error(res, 400, "bad image or node name (allowed: [A-Za-z0-9._-], not "
                                 "starting with '.')");
  exports::NodeRecord rec;
  uint64_t size = 0;
  std::string err;
  if (!store.lookup_node(image, node, &rec, &size, &err)) return reply_error(res, 404, err);
  nlohmann::json j = {{"image", rec.image},
                      {"node", rec.node},
                      {"generation", rec.image + "@" + rec.generation},
                      {"size", size},
                      {"block_size", rec.block_size},
                      {"chunk_size", storage::kChunkSize},
                      {"mode", storage::mode_name(rec.mode)}};
  if (tls_required) add_peer_key(store, rec, &j);
  reply_json(res, j);
}

// Digest files already validated (they never change once written).
struct Validated {
  std::mutex mu;
  std::set<std::string> generations;
};

void get_chunk_digests(exports::Store& store, Validated& validated, const httplib::Request& req,
                       httplib::Response& res) {
  std::string image, gen, err;
  if (!parse_generation(req.matches[1], &image, &gen, &err)) return reply_error(res, 400, err);
  uint64_t size = 0;
  if (!store.generation_size(image, gen, &size, &err))
    return reply_error(res, 404, "no generation " + image + "@" + gen);
  const std::string path = store.root() + "/images/" + image + "/generations/" + gen + "/" +
                           storage::kChunkDigestsFile;
  const uint64_t tag = storage::generation_tag(image, gen);
  const std::string key = image + "@" + gen;
  bool known;
  {
    std::lock_guard<std::mutex> g(validated.mu);
    known = validated.generations.count(key) != 0;
  }
  if (!known) {
    bool missing = false;
    if (!storage::ChunkDigests::open(path, {size, tag}, &err, &missing)) {
      if (missing)
        return reply_error(res, 404, "generation " + key + " has no chunks.sha256 (built "
                                     "before digests existed; rebuild it)");
      spdlog::error("http: {}", err);
      return reply_error(res, 500, "the chunk digests of " + key + " are damaged: " + err);
    }
    std::lock_guard<std::mutex> g(validated.mu);
    validated.generations.insert(key);
  }
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  struct stat st;
  if (fd < 0 || fstat(fd, &st) != 0) {
    if (fd >= 0) ::close(fd);
    return reply_error(res, 500, "cannot open the chunk digests of " + key);
  }
  char etag[64];
  snprintf(etag, sizeof etag, "\"%016llx-%llx\"", static_cast<unsigned long long>(tag),
           static_cast<unsigned long long>(st.st_size));
  res.set_header("ETag", etag);
  if (req.get_header_value("If-None-Match") == etag) {
    ::close(fd);
    res.status = 304;
    return;
  }
  auto file = std::shared_ptr<int>(new int(fd), [](int* p) {
    ::close(*p);
    delete p;
  });
  res.set_content_provider(
      static_cast<size_t>(st.st_size), "application/octet-stream",
      [file](size_t offset, size_t length, httplib::DataSink& sink) {
        char buf[64 * 1024];
        while (length > 0) {
          const ssize_t n = pread(*file, buf, std::min(length, sizeof buf), offset);
          if (n <= 0) return false;
          if (!sink.write(buf, n)) return false;
          offset += n;
          length -= n;
        }
        return true;
      });
}

}  // namespace

bool parse_generation(const std::string& s, std::string* image, std::string* gen,
                      std::string* err) {
  const size_t at = s.find('@');
  if (at == std::string::npos) {
    *err = "'" + s + "' is not IMAGE@GEN";
    return false;
  }
  *image = s.substr(0, at);
  *gen = s.substr(at + 1);
  if (!valid_store_name(*image) || !valid_store_name(*gen)) {
    *err = "bad image or generation name in '" + s + "' (allowed: [A-Za-z0-9._-], not "
           "starting with '.')";
    return false;
  }
  return true;
}

void add_store_api(httplib::Server& svr, std::shared_ptr<exports::Store> store,
                   bool tls_required) {
  auto validated = std::make_shared<Validated>();
  svr.Get(R"(/v1/nodes/([^/]+)/([^/]+))",
          [store, tls_required](const httplib::Request& req, httplib::Response& res) {
            get_node(*store, tls_required, req, res);
          });
  svr.Get(R"(/v1/generations/([^/]+)/chunks\.sha256)",
          [store, validated](const httplib::Request& req, httplib::Response& res) {
            get_chunk_digests(*store, *validated, req, res);
          });
}

}  // namespace http
