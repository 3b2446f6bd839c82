// manifest.json of one generation (the contract shared with nbdserver):
//   image, generation, parent (data base of a delta, else null),
//   format "full" | "delta", size, block_size, source, built, files, bytes,
// plus what imagebuilder adds: uuid, depth (layers down to a full image),
// blocks_stored / blocks_shared (against the parent), build_seconds, and
// flattened_from (the former parent of a flattened delta).
#pragma once

#include "status.hpp"

#include <cstdint>
#include <optional>
#include <string>

namespace ib {

struct Manifest {
  std::string image;
  std::string generation;
  std::optional<std::string> parent;  // set iff format == "delta"
  std::string format = "full";
  uint64_t size = 0;
  uint32_t block_size = 4096;
  std::string source;
  std::string built;
  uint64_t files = 0;
  uint64_t bytes = 0;
  std::string uuid;
  uint32_t depth = 0;            // 0 for a full generation
  uint64_t blocks_stored = 0;    // blocks this generation holds itself (delta: dirty+zero)
  uint64_t blocks_shared = 0;    // blocks equal to the parent's (delta only)
  double build_seconds = 0;
  std::optional<std::string> flattened_from;
  std::optional<std::string> derived_from;  // the generation the build started from

  bool is_delta() const { return format == "delta"; }
  uint64_t blocks() const { return size / block_size; }
};

std::string manifest_to_json(const Manifest& m);
Result<Manifest> manifest_from_json(const std::string& text, const std::string& where);

}  // namespace ib
