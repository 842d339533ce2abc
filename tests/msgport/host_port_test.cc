// "ADDR:PORT" both ways, IPv6 in brackets: the agent's log and `ulsp ps` once showed
// "::1:7702" (which reads as an address alone) beside a mount of "[::1]:7702/s".
#include <gtest/gtest.h>

#include "kernel/msgport/host_port.h"

namespace ulsp::msgport {
namespace {

TEST(HostPort, IPv6IsBracketedAndReadBack) {
  EXPECT_EQ(JoinHostPort("::1", 7702), "[::1]:7702");
  EXPECT_EQ(JoinHostPort("10.0.0.2", 7700), "10.0.0.2:7700");
  EXPECT_EQ(JoinHostPort("agent.internal", 80), "agent.internal:80");
  std::string host;
  uint16_t port = 0;
  ASSERT_TRUE(SplitHostPort(JoinHostPort("fd00::6", 65535), host, port));
  EXPECT_EQ(host, "fd00::6");
  EXPECT_EQ(port, 65535);
  ASSERT_TRUE(SplitHostPort("10.0.0.2:7700", host, port));
  EXPECT_EQ(host, "10.0.0.2");
  EXPECT_EQ(port, 7700);
  for (const char* bad : {"10.0.0.2", ":7700", "10.0.0.2:", "10.0.0.2:0", "10.0.0.2:65536", "10.0.0.2:77x"})
    EXPECT_FALSE(SplitHostPort(bad, host, port)) << bad;
}

}  // namespace
}  // namespace ulsp::msgport
