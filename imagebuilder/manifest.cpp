#include "manifest.hpp"

#include <nlohmann/json.hpp>

namespace ib {

using nlohmann::json;

std::string manifest_to_json(const Manifest& m) {
  json j;
  j["image"] = m.image;
  j["generation"] = m.generation;
  j["parent"] = m.parent ? json(*m.parent) : json(nullptr);
  j["format"] = m.format;
  j["size"] = m.size;
  j["block_size"] = m.block_size;
  j["source"] = m.source;
  j["built"] = m.built;
  j["files"] = m.files;
  j["bytes"] = m.bytes;
  j["uuid"] = m.uuid;
  j["depth"] = m.depth;
  j["blocks_stored"] = m.blocks_stored;
  j["blocks_shared"] = m.blocks_shared;
  j["build_seconds"] = m.build_seconds;
  if (m.flattened_from) j["flattened_from"] = *m.flattened_from;
  if (m.derived_from) j["derived_from"] = *m.derived_from;
  return j.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
}

Result<Manifest> manifest_from_json(const std::string& text, const std::string& where) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return Status::fail(where + ": not a JSON object");
  Manifest m;
  try {
    m.image = j.at("image").get<std::string>();
    m.generation = j.at("generation").get<std::string>();
    if (j.contains("parent") && !j["parent"].is_null()) m.parent = j["parent"].get<std::string>();
    m.format = j.at("format").get<std::string>();
    m.size = j.at("size").get<uint64_t>();
    m.block_size = j.at("block_size").get<uint32_t>();
    m.source = j.value("source", "");
    m.built = j.value("built", "");
    m.files = j.value("files", uint64_t(0));
    m.bytes = j.value("bytes", uint64_t(0));
    m.uuid = j.value("uuid", "");
    m.depth = j.value("depth", uint32_t(0));
    m.blocks_stored = j.value("blocks_stored", uint64_t(0));
    m.blocks_shared = j.value("blocks_shared", uint64_t(0));
    m.build_seconds = j.value("build_seconds", 0.0);
    if (j.contains("flattened_from")) m.flattened_from = j["flattened_from"].get<std::string>();
    if (j.contains("derived_from")) m.derived_from = j["derived_from"].get<std::string>();
  } catch (const json::exception& e) {
    return Status::fail(where + ": " + e.what());
  }
  if (m.format != "full" && m.format != "delta")
    return Status::fail(where + ": unknown format \"" + m.format + "\"");
  if (m.is_delta() != m.parent.has_value())
    return Status::fail(where + ": a delta needs a parent, a full generation has none");
  if (m.block_size == 0 || m.size % m.block_size != 0)
    return Status::fail(where + ": size is not a multiple of the block size");
  return m;
}

}  // namespace ib
