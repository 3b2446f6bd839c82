// Small JSON records of the store (manifest.json, node.json), and byte
// counts for people.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

namespace storage {

// Reads `path` as one JSON object. On failure sets *err ("PATH: cannot
// open: ...", "PATH: not a JSON object") and *err_no (errno, 0 for a parse
// error).
bool read_json_object(const std::string& path, nlohmann::json* out, std::string* err,
                      int* err_no = nullptr);

// "512 B", "1.5 KiB", "17.0 MiB".
std::string human_bytes(uint64_t n);

}  // namespace storage
