// Names in the store: images, generations, nodes, verification runs. Each
// becomes one path component, so the rule keeps out '/', "..", and hidden
// files.
#pragma once

#include <string>

namespace storage {

// Image, generation and node names: [A-Za-z0-9._-]+, not starting with '.'.
bool valid_store_name(const std::string& s);

}  // namespace storage
