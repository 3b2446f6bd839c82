// Generation life cycle: publish, rollback, list, gc, flatten, diff.
//
// Locks: build, gc and flatten hold images/<image>/.lock (exclusive, fail
// at once when busy); publish, rollback and gc hold .publish.lock (waiting),
// so gc never removes a generation that is being published.
//
// Rules (see docs/imagebuilder.md):
//  - publish swaps `current` atomically; nbdserver reads `current` at each
//    new attach, so nodes already attached keep their generation.
//  - rollback publishes the newest generation older than `current`.
//  - gc keeps `current`, the newest generation, every generation some
//    nodes/*/node.json names, and every delta's parent (transitively) of a
//    kept one; it removes the rest, and stale temporaries.
//  - flatten writes image.ext4 for a delta (temporary name, fsync, rename),
//    rewrites the manifest as full (parent null, flattened_from), and only
//    then removes layer.*.
#pragma once

#include "progress.hpp"
#include "status.hpp"
#include "store.hpp"

#include <optional>
#include <string>
#include <vector>

namespace ib {

Status publish(const Store& store, const std::string& image, std::optional<std::string> gen,
               std::string* published);
Status rollback(const Store& store, const std::string& image, std::string* published);
// One line per generation, oldest first, with a header.
Result<std::vector<std::string>> list_generations(const Store& store, const std::string& image);
// Removed generation ids.
Result<std::vector<std::string>> gc(const Store& store, const std::string& image);
// `wait`: block on the image lock instead of failing when a build holds it.
Status flatten(const Store& store, const std::string& image, const std::string& gen, bool wait,
               Progress* progress);
// flatten() for a caller that already holds the image lock.
Status flatten_locked(const Store& store, const std::string& image, const std::string& gen,
                      Progress* progress);
// Changed paths between two generations: "+ /path", "- /path", "M /path",
// read from the images (fs_diff.hpp), or, with `from_index`, from the
// files.idx the builds recorded (fast; source metadata incl. ctime).
Result<std::vector<std::string>> diff(const Store& store, const std::string& image,
                                      const std::string& a, const std::string& b, bool from_index);

}  // namespace ib
