#include "storage/names.hpp"

#include <cctype>

namespace storage {

bool valid_store_name(const std::string& s) {
  if (s.empty() || s.size() > kMaxStoreName || s[0] == '.') return false;
  for (char c : s)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'))
      return false;
  return true;
}

}  // namespace storage
