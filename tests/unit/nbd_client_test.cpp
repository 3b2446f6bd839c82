// Tests for node/nbd_client.{hpp,cpp} that need no server: endpoints. The
// connection itself is tested against nbdserver and lying fake servers in
// tests/integration/test_nbd_client.py.
#include "node/nbd_client.hpp"

#include <gtest/gtest.h>

namespace node {
namespace {

TEST(Endpoint, ParsesTheThreeForms) {
  Endpoint e;
  std::string err;
  ASSERT_TRUE(parse_endpoint("server.lab:10809", &e, &err)) << err;
  EXPECT_EQ(e.host, "server.lab");
  EXPECT_EQ(e.port, 10809);
  EXPECT_EQ(e.text(), "server.lab:10809");
  ASSERT_TRUE(parse_endpoint("[fd00::1]:1", &e, &err)) << err;
  EXPECT_EQ(e.host, "fd00::1");
  EXPECT_EQ(e.port, 1);
  EXPECT_EQ(e.text(), "[fd00::1]:1");
  ASSERT_TRUE(parse_endpoint("unix:/run/nbd.sock", &e, &err)) << err;
  EXPECT_EQ(e.unix_path, "/run/nbd.sock");
  EXPECT_TRUE(e.host.empty());
  EXPECT_EQ(e.text(), "unix:/run/nbd.sock");
}

TEST(Endpoint, RefusesMalformedOnesWithAReason) {
  const std::pair<const char*, const char*> bad[] = {
      {"server", "expected HOST:PORT"},
      {"server:", "bad port"},
      {"server:0", "bad port"},
      {"server:65536", "bad port"},
      {"server:12x", "bad port"},
      {":10809", "empty host"},
      {"fd00::1:10809", "need brackets"},
      {"[fd00::1]10809", "expected [ADDRESS]:PORT"},
      {"[fd00::1", "expected [ADDRESS]:PORT"},
      {"unix:", "empty Unix socket path"},
  };
  for (auto [text, why] : bad) {
    Endpoint e;
    std::string err;
    EXPECT_FALSE(parse_endpoint(text, &e, &err)) << text;
    EXPECT_NE(err.find(why), std::string::npos) << text << ": " << err;
  }
  Endpoint e;
  std::string err;
  EXPECT_FALSE(parse_endpoint("unix:/" + std::string(200, 'x'), &e, &err));
  EXPECT_NE(err.find("too long"), std::string::npos) << err;
}

TEST(NbdClient, RequestsBeforeConnectAreBroken) {
  NbdClient c;
  Result r = c.flush(100);
  EXPECT_EQ(r.kind, Result::kBroken);
  EXPECT_EQ(r.why, "not connected");
  c.close();
}

TEST(NbdClient, ConnectFailureSaysWhy) {
  NbdClient c;
  Endpoint e;
  std::string err;
  ASSERT_TRUE(parse_endpoint("unix:/nonexistent/nbdroot-test.sock", &e, &err));
  EXPECT_FALSE(c.connect(e, "disk", {}, 1000, &err));
  EXPECT_NE(err.find("unix:/nonexistent/nbdroot-test.sock: connect: No such file"),
            std::string::npos)
      << err;
  EXPECT_TRUE(c.broken());
  EXPECT_EQ(c.pread(nullptr, 0, 0, 100).kind, Result::kBroken);
}

}  // namespace
}  // namespace node
