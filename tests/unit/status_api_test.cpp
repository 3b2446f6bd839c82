// The exposition and JSON of http/status_api.hpp from a made-up snapshot:
// label escaping, every family's HELP and TYPE, the states counted.
#include "http/status_api.hpp"

#include <gtest/gtest.h>

#include <set>
#include <sstream>

namespace {

http::StatusSnapshot snapshot() {
  http::StatusSnapshot s;
  s.now = 1000;
  http::NodeStatus a;
  a.node = "n1";
  a.state = "ready";
  a.read_bytes = 8192;
  a.last_seen = 990;
  a.verified = true;
  a.status = "passed";
  http::NodeStatus b;
  b.node = "we\"ird\\no\nde";  // not a store name, but whatever comes must be escaped
  b.state = "failed";
  s.nodes = {a, b};
  s.verifications = {{"failed", 0}, {"passed", 3}};
  return s;
}

TEST(StatusApi, LabelValuesAreEscaped) {
  EXPECT_EQ(http::prometheus_label("plain-1.x"), "plain-1.x");
  EXPECT_EQ(http::prometheus_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
}

TEST(StatusApi, EveryFamilyHasHelpAndTypeFirst) {
  exports::ServerCounters server;
  server.error_replies = 4;
  const std::string text = http::render_metrics(snapshot(), server, 900);
  std::istringstream in(text);
  std::string line;
  std::set<std::string> help, type;
  size_t samples = 0;
  while (std::getline(in, line)) {
    ASSERT_FALSE(line.empty());
    if (line.rfind("# HELP ", 0) == 0) {
      help.insert(line.substr(7, line.find(' ', 7) - 7));
    } else if (line.rfind("# TYPE ", 0) == 0) {
      type.insert(line.substr(7, line.find(' ', 7) - 7));
    } else {
      const std::string name = line.substr(0, line.find_first_of("{ "));
      EXPECT_EQ(name.rfind("nbdroot_", 0), 0u) << line;
      EXPECT_TRUE(help.count(name) && type.count(name)) << line;
      ++samples;
    }
  }
  EXPECT_GT(samples, 20u);
  EXPECT_NE(text.find("nbdroot_node_state{node=\"we\\\"ird\\\\no\\nde\",state=\"failed\"} 1\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("nbdroot_nodes{state=\"failed\"} 1\n"), std::string::npos);
  EXPECT_NE(text.find("nbdroot_nodes{state=\"new\"} 0\n"), std::string::npos);
  EXPECT_NE(text.find("nbdroot_node_read_bytes_total{node=\"n1\"} 8192\n"), std::string::npos);
  EXPECT_NE(text.find("nbdroot_errors_total{kind=\"reply\"} 4\n"), std::string::npos);
  EXPECT_NE(text.find("nbdroot_verification_last_status{node=\"n1\",status=\"passed\"} 1\n"),
            std::string::npos);
  EXPECT_NE(text.find("nbdroot_verification_last_status{node=\"n1\",status=\"failed\"} 0\n"),
            std::string::npos);
  // A node never seen has no last-seen sample; one without a report no status.
  EXPECT_EQ(text.find("nbdroot_node_last_seen_timestamp_seconds{node=\"we"), std::string::npos);
  EXPECT_EQ(text.find("nbdroot_verification_last_status{node=\"we"), std::string::npos);
}

TEST(StatusApi, StatusJson) {
  exports::ServerCounters server;
  const nlohmann::json j = http::render_status(snapshot(), server, 900);
  EXPECT_EQ(j["server"]["nodes_by_state"]["ready"], 1);
  EXPECT_EQ(j["server"]["nodes_by_state"]["failed"], 1);
  EXPECT_EQ(j["server"]["nodes_by_state"]["verify"], 0);
  ASSERT_EQ(j["nodes"].size(), 2u);
  EXPECT_EQ(j["nodes"][0]["last_seen"], 990);
  EXPECT_TRUE(j["nodes"][1]["last_seen"].is_null());
  EXPECT_EQ(j["nodes"][0]["last_verification"]["status"], "passed");
  EXPECT_TRUE(j["nodes"][1]["last_verification"].is_null());
}

}  // namespace
