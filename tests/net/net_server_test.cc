// The net ULSP served directly, without a group: requests a group cannot make any
// more (it has no CAP_NET_RAW) but that the server must still answer safely.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstring>
#include <memory>

#include "kernel/msgport/direct_port.h"
#include "kernel/msgport/net_message.h"
#include "tests/temp_dir.h"
#include "ulsp/net/net_server.h"

namespace ulsp::net {
namespace {

using msgport::MessagePtr;
using msgport::NetCall;
using msgport::NetMessage;

std::vector<char> Inet(const char* address, uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  ::inet_pton(AF_INET, address, &a.sin_addr);
  const char* p = reinterpret_cast<const char*>(&a);
  return {p, p + sizeof a};
}

// A raw socket of the group's (made in its namespace, here the test's own) that
// connects, binds or sends to an address every rule allows is left where it is: once
// it was decided as UDP and swapped for a raw socket the ULSP made on the host, so a
// group allowed one UDP peer could write any IP packet there. One from outside the
// group is refused.
TEST(NetServer, ARawSocketIsNeverSwappedForOneOfTheUlsps) {
  testing::TempDir dir;
  auto log = ConnLog::Open(dir / "conn.jsonl", "t");
  ASSERT_TRUE(log) << log.error();
  NameMemory names;
  Askers askers;
  NetConfig config;
  config.group = "t";
  config.rules = RuleSet({}, /*default_allow=*/true);
  config.group_netns.Reset(::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC));
  NetServer server(std::move(config), **log, names, askers);
  msgport::DirectPort port("net:t", server);

  for (NetCall call : {NetCall::kConnect, NetCall::kBind, NetCall::kSendTo}) {
    for (bool from_outside : {false, true}) {
      SCOPED_TRACE(std::to_string(static_cast<int>(call)) + (from_outside ? " from outside" : " in the group"));
      const int raw = ::socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_ICMP);
      ASSERT_GE(raw, 0) << std::strerror(errno);
      auto m = std::make_unique<NetMessage>(call);
      m->req.socket.Reset(raw);
      m->req.family = AF_INET;
      m->req.type = SOCK_RAW;
      m->req.protocol = IPPROTO_ICMP;
      m->req.host_netns = from_outside;
      const std::vector<char> to = Inet(call == NetCall::kBind ? "127.0.0.1" : "10.255.255.1", 0);
      if (call == NetCall::kSendTo) {
        m->req.msgs.push_back({});
        m->req.msgs.back().name = to;
        m->req.msgs.back().data = {'\x08', 0, '\xf7', '\xff', 0, 0, 0, 0};
      } else {
        m->req.addr = to;
      }
      auto reply = msgport::DoMsg(port, MessagePtr(m.release()));
      ASSERT_TRUE(reply);
      auto& q = static_cast<NetMessage&>(**reply).req;
      EXPECT_FALSE(q.install) << "a socket of the ULSP's took the raw socket's place";
      if (from_outside) {
        EXPECT_EQ(q.verdict, msgport::NetVerdict::kError);
        EXPECT_EQ(q.error, EACCES);
      }
    }
  }
  const std::string logged = testing::ReadAll(dir / "conn.jsonl");
  EXPECT_NE(logged.find(R"("proto":"raw icmp","address":"10.255.255.1","port":0,"verdict":"group")"), std::string::npos)
      << logged;
  EXPECT_EQ(logged.find(R"("proto":"udp")"), std::string::npos) << logged;
}

}  // namespace
}  // namespace ulsp::net
