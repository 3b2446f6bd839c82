// files.idx encoding and the change classification of incremental builds.
#include "file_index.hpp"
#include "manifest.hpp"
#include "util.hpp"

#include <gtest/gtest.h>

namespace ib {
namespace {

SourceEntry entry(const std::string& path, unsigned mode, uint64_t ino, uint64_t size = 0,
                  int64_t mtime = 100, unsigned nlink = 1) {
  SourceEntry e;
  e.path = path;
  e.st.st_mode = mode;
  e.st.st_ino = ino;
  e.st.st_size = off_t(size);
  e.st.st_mtim.tv_sec = mtime;
  e.st.st_ctim.tv_sec = mtime;
  e.st.st_nlink = nlink;
  return e;
}

SourceTree tree(std::vector<SourceEntry> entries) {
  SourceTree t;
  t.entries = std::move(entries);
  return t;
}

std::vector<IndexRecord> records(const SourceTree& t) {
  std::vector<IndexRecord> r;
  for (auto& e : t.entries) r.push_back(record_of(e));
  return r;
}

TEST(FileIndex, RoundTripsAwkwardPaths) {
  auto t = tree({entry("", S_IFDIR | 0755, 1), entry("tab\there", S_IFREG | 0644, 2, 5),
                 entry("new\nline\\x41", S_IFREG | 0644, 3), entry("\xff\x01 é", S_IFLNK | 0777, 4)});
  t.entries[3].link_target = "somewhere";
  t.entries[1].xattrs = {{"user.a", std::string("\0b", 2)}};
  auto recs = records(t);
  auto back = decode_index(encode_index(recs), "test");
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(*back, recs);
}

TEST(FileIndex, RejectsGarbage) {
  EXPECT_FALSE(decode_index("path\tnot numbers\n", "x").ok());
  EXPECT_FALSE(decode_index("no newline", "x").ok());
  EXPECT_FALSE(decode_index("bad\\x4\t644 0 0 0 0 0 0 0 1 0 0\n", "x").ok());
}

TEST(Compare, ClassifiesChanges) {
  auto old_t = tree({entry("", S_IFDIR | 0755, 1), entry("a", S_IFREG | 0644, 2, 10),
                     entry("b", S_IFREG | 0644, 3, 10), entry("c", S_IFREG | 0644, 4, 10),
                     entry("d", S_IFDIR | 0755, 5), entry("d/x", S_IFREG | 0644, 6, 1),
                     entry("same", S_IFREG | 0644, 7, 3)});
  auto new_t = tree({entry("", S_IFDIR | 0755, 1), entry("a", S_IFREG | 0600, 2, 10),  // chmod
                     entry("b", S_IFREG | 0644, 3, 20, 200),                           // grown
                     entry("d", S_IFREG | 0644, 5, 1),                                 // dir -> file
                     entry("e", S_IFREG | 0644, 9, 4),                                 // added
                     entry("same", S_IFREG | 0644, 7, 3)});
  ChangeSet cs = compare(records(old_t), new_t);
  EXPECT_EQ(cs.removed, (std::vector<std::string>{"d/x", "d", "c"}));  // children first
  std::map<std::string, Change> got;
  for (auto& [i, k] : cs.updated) got[new_t.entries[i].path] = k;
  EXPECT_EQ(got, (std::map<std::string, Change>{{"a", Change::kMetadata},
                                                 {"b", Change::kContent},
                                                 {"d", Change::kReplaced},
                                                 {"e", Change::kAdded}}));
  EXPECT_EQ(cs.changed_bytes, 20u + 1u + 4u);
}

TEST(Compare, ReplacesWholeHardLinkGroups) {
  auto old_t = tree({entry("", S_IFDIR | 0755, 1), entry("h1", S_IFREG | 0644, 2, 5, 100, 2),
                     entry("h2", S_IFREG | 0644, 2, 5, 100, 2), entry("z", S_IFREG | 0644, 3)});
  // a third link to the group appears: every member is recreated together
  auto new_t = tree({entry("", S_IFDIR | 0755, 1), entry("h1", S_IFREG | 0644, 2, 5, 100, 3),
                     entry("h2", S_IFREG | 0644, 2, 5, 100, 3), entry("h3", S_IFREG | 0644, 2, 5, 100, 3),
                     entry("z", S_IFREG | 0644, 3)});
  ChangeSet cs = compare(records(old_t), new_t);
  EXPECT_EQ(cs.removed, (std::vector<std::string>{"h2", "h1"}));
  std::vector<std::string> updated;
  for (auto& [i, k] : cs.updated) updated.push_back(new_t.entries[i].path);
  EXPECT_EQ(updated, (std::vector<std::string>{"h1", "h2", "h3"}));
}

TEST(Compare, NothingChanged) {
  auto t = tree({entry("", S_IFDIR | 0755, 1), entry("a", S_IFREG | 0644, 2, 10)});
  ChangeSet cs = compare(records(t), t);
  EXPECT_TRUE(cs.removed.empty());
  EXPECT_TRUE(cs.updated.empty());
}

TEST(Manifest, RoundTripAndValidation) {
  Manifest m;
  m.image = "lab";
  m.generation = "20261126T070102Z-01";
  m.parent = "20261126T060102Z-01";
  m.format = "delta";
  m.size = 1 << 30;
  m.depth = 3;
  auto back = manifest_from_json(manifest_to_json(m), "t");
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->parent, m.parent);
  EXPECT_EQ(back->size, m.size);
  EXPECT_EQ(back->depth, 3u);
  EXPECT_FALSE(manifest_from_json(R"({"image":"a","generation":"b","parent":null,"format":"delta","size":4096,"block_size":4096})", "t").ok());
  EXPECT_FALSE(manifest_from_json(R"({"image":"a","generation":"b","parent":null,"format":"full","size":4097,"block_size":4096})", "t").ok());
  EXPECT_FALSE(manifest_from_json("[]", "t").ok());
}

TEST(Names, ValidAndDerived) {
  EXPECT_TRUE(valid_name("lab"));
  EXPECT_TRUE(valid_name("20261126T070102Z-01"));
  EXPECT_FALSE(valid_name(""));
  EXPECT_FALSE(valid_name(".tmp-x"));
  EXPECT_FALSE(valid_name("a/b"));
  EXPECT_FALSE(valid_name("a@b"));
  EXPECT_EQ(derived_uuid("x"), derived_uuid("x"));
  EXPECT_NE(derived_uuid("x"), derived_uuid("y"));
  EXPECT_EQ(derived_uuid("x").size(), 36u);
  EXPECT_EQ(derived_uuid("x")[14], '4');
}

}  // namespace
}  // namespace ib
