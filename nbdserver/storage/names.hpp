// Names in the store: images, generations, nodes, verification runs. Each
// becomes one path component, so the rule keeps out '/', "..", and hidden
// files.
#pragma once

#include <cstddef>
#include <string>

namespace storage {

// Image, generation and node names: [A-Za-z0-9._-]+, not starting with '.',
// at most kMaxStoreName bytes. No other spelling of a name is accepted: no
// percent-encoding, no empty or dot parts, no slashes (docs/security.md).
inline constexpr size_t kMaxStoreName = 200;
bool valid_store_name(const std::string& s);

}  // namespace storage
