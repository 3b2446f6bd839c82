// `diff`: changed paths between two generations, read from the images
// themselves (libext2fs through each generation's layer chain), not from
// what the builder recorded.
//
// Both trees are walked; a path is "+" (only in the second), "-" (only in
// the first) or "M" when type, mode, owner, size, mtime, xattrs, symlink
// target, device number or contents differ. atime and ctime are ignored.
// Contents are compared without reading when both files map the same
// physical blocks and every one of them resolves to the same stored bytes
// (same level and offset) in both chains, which is the case for files a
// delta did not touch; otherwise both are read and compared.
#pragma once

#include "status.hpp"
#include "store.hpp"

#include <string>
#include <vector>

namespace ib {

Result<std::vector<std::string>> diff_generations(const Store& store, const std::string& image,
                                                  const std::string& a, const std::string& b);

}  // namespace ib
