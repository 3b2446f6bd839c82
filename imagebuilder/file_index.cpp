#include "file_index.hpp"

#include "util.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <sstream>

namespace ib {
namespace {

int64_t ns(const struct timespec& t) { return int64_t(t.tv_sec) * 1000000000 + t.tv_nsec; }

std::string escape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\\' || c < 0x20 || c > 0x7e) {
      char buf[8];
      snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  return out;
}

bool unescape(const std::string& s, std::string* out) {
  out->clear();
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\') {
      *out += s[i];
      continue;
    }
    if (i + 3 >= s.size() || s[i + 1] != 'x') return false;
    *out += char(strtoul(s.substr(i + 2, 2).c_str(), nullptr, 16));
    i += 3;
  }
  return true;
}

bool is_linked(const IndexRecord& r) { return !S_ISDIR(r.mode) && r.nlink > 1; }

}  // namespace

IndexRecord record_of(const SourceEntry& e) {
  IndexRecord r;
  r.path = e.path;
  r.mode = e.st.st_mode;
  r.uid = e.st.st_uid;
  r.gid = e.st.st_gid;
  r.size = S_ISDIR(e.st.st_mode) ? 0 : uint64_t(e.st.st_size);
  r.mtime_ns = ns(e.st.st_mtim);
  r.ctime_ns = ns(e.st.st_ctim);
  r.rdev = e.st.st_rdev;
  r.ino = e.st.st_ino;
  r.nlink = uint32_t(e.st.st_nlink);
  r.xattr_hash = xattr_hash(e);
  r.link_hash = S_ISLNK(e.st.st_mode) ? fnv1a(e.link_target) : 0;
  return r;
}

std::string encode_index(const std::vector<IndexRecord>& records) {
  std::string out;
  out.reserve(records.size() * 96);
  char buf[320];
  for (auto& r : records) {
    out += escape(r.path);
    snprintf(buf, sizeof buf, "\t%o %u %u %llu %lld %lld %llu %llu %u %016llx %016llx\n", r.mode,
             r.uid, r.gid, (unsigned long long)r.size, (long long)r.mtime_ns,
             (long long)r.ctime_ns, (unsigned long long)r.rdev, (unsigned long long)r.ino,
             r.nlink, (unsigned long long)r.xattr_hash, (unsigned long long)r.link_hash);
    out += buf;
  }
  return out;
}

Result<std::vector<IndexRecord>> decode_index(const std::string& text, const std::string& where) {
  std::vector<IndexRecord> out;
  size_t line_no = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) return Status::fail(where + ": truncated");
    std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    size_t tab = line.find('\t');
    IndexRecord r;
    unsigned long long size, rdev, ino, xh, lh;
    long long mt, ct;
    if (tab == std::string::npos || !unescape(line.substr(0, tab), &r.path) ||
        sscanf(line.c_str() + tab + 1, "%o %u %u %llu %lld %lld %llu %llu %u %llx %llx", &r.mode,
               &r.uid, &r.gid, &size, &mt, &ct, &rdev, &ino, &r.nlink, &xh, &lh) != 11)
      return Status::fail(where + ": line " + std::to_string(line_no) + " is malformed");
    r.size = size;
    r.mtime_ns = mt;
    r.ctime_ns = ct;
    r.rdev = rdev;
    r.ino = ino;
    r.xattr_hash = xh;
    r.link_hash = lh;
    out.push_back(std::move(r));
  }
  return out;
}

namespace {

Change classify(const IndexRecord& o, const IndexRecord& n) {
  if (o == n) return Change::kNone;
  if ((o.mode & S_IFMT) != (n.mode & S_IFMT)) return Change::kReplaced;
  if (is_linked(o) || is_linked(n)) return Change::kReplaced;
  if (S_ISLNK(n.mode) && o.link_hash != n.link_hash) return Change::kReplaced;
  if ((S_ISCHR(n.mode) || S_ISBLK(n.mode)) && o.rdev != n.rdev) return Change::kReplaced;
  if (S_ISREG(n.mode) && (o.ino != n.ino || o.size != n.size || o.mtime_ns != n.mtime_ns))
    return Change::kContent;
  return Change::kMetadata;
}

// Every path of a hard-link group that changed must be recreated together:
// grows `replaced` (paths) to cover whole groups, old and new.
void close_link_groups(const std::vector<IndexRecord>& old_records,
                       const std::vector<IndexRecord>& new_records, std::set<std::string>* replaced) {
  std::unordered_map<uint64_t, std::vector<std::string>> old_groups, new_groups;
  std::unordered_map<std::string, uint64_t> old_ino, new_ino;
  for (auto& r : old_records)
    if (is_linked(r)) old_groups[r.ino].push_back(r.path), old_ino[r.path] = r.ino;
  for (auto& r : new_records)
    if (is_linked(r)) new_groups[r.ino].push_back(r.path), new_ino[r.path] = r.ino;
  std::vector<std::string> todo(replaced->begin(), replaced->end());
  auto add = [&](const std::string& p) {
    if (replaced->insert(p).second) todo.push_back(p);
  };
  while (!todo.empty()) {
    std::string p = todo.back();
    todo.pop_back();
    if (auto it = old_ino.find(p); it != old_ino.end())
      for (auto& q : old_groups[it->second]) add(q);
    if (auto it = new_ino.find(p); it != new_ino.end())
      for (auto& q : new_groups[it->second]) add(q);
  }
}

}  // namespace

ChangeSet compare(const std::vector<IndexRecord>& old_records, const SourceTree& scan) {
  std::unordered_map<std::string, size_t> old_pos;
  for (size_t i = 0; i < old_records.size(); ++i) old_pos[old_records[i].path] = i;
  std::vector<IndexRecord> new_records;
  new_records.reserve(scan.entries.size());
  for (auto& e : scan.entries) new_records.push_back(record_of(e));

  std::vector<Change> kinds(new_records.size(), Change::kAdded);
  std::set<std::string> replaced;
  std::unordered_map<std::string, bool> in_new;
  for (size_t i = 0; i < new_records.size(); ++i) {
    in_new[new_records[i].path] = true;
    auto it = old_pos.find(new_records[i].path);
    if (it == old_pos.end()) {
      if (is_linked(new_records[i])) replaced.insert(new_records[i].path);
      continue;
    }
    kinds[i] = classify(old_records[it->second], new_records[i]);
    if (kinds[i] == Change::kReplaced) replaced.insert(new_records[i].path);
  }
  for (auto& r : old_records)
    if (!in_new.count(r.path) && is_linked(r)) replaced.insert(r.path);
  close_link_groups(old_records, new_records, &replaced);

  ChangeSet cs;
  std::vector<size_t> removed_pos;
  for (size_t i = 0; i < old_records.size(); ++i) {
    const auto& p = old_records[i].path;
    if (!in_new.count(p) || replaced.count(p)) removed_pos.push_back(i);
  }
  std::sort(removed_pos.rbegin(), removed_pos.rend());  // children before parents
  for (size_t i : removed_pos) cs.removed.push_back(old_records[i].path);
  for (size_t i = 0; i < new_records.size(); ++i) {
    Change k = kinds[i];
    if (replaced.count(new_records[i].path))
      k = old_pos.count(new_records[i].path) ? Change::kReplaced : Change::kAdded;
    if (k == Change::kNone) continue;
    cs.updated.emplace_back(i, k);
    if (S_ISREG(new_records[i].mode) && k != Change::kMetadata) cs.changed_bytes += new_records[i].size;
  }
  return cs;
}

std::vector<std::string> diff_indices(const std::vector<IndexRecord>& a,
                                      const std::vector<IndexRecord>& b) {
  std::unordered_map<std::string, const IndexRecord*> in_a;
  for (auto& r : a) in_a[r.path] = &r;
  std::set<std::string> in_b;
  std::vector<std::string> out;
  for (auto& r : b) {
    in_b.insert(r.path);
    auto it = in_a.find(r.path);
    if (it == in_a.end()) out.push_back("+ /" + r.path);
    else if (!(*it->second == r)) out.push_back("M /" + r.path);
  }
  for (auto& r : a)
    if (!in_b.count(r.path)) out.push_back("- /" + r.path);
  return out;
}

}  // namespace ib
