// The net rules on their own: addresses, CIDRs, ports, names, first match wins, and
// the DNS answers the group's resolver builds.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tests/temp_dir.h"
#include "ulsp/net/conn_log.h"
#include "ulsp/net/names.h"
#include "ulsp/net/resolver.h"
#include "ulsp/net/rules.h"

namespace ulsp::net {
namespace {

Endpoint V4(const char* text, uint16_t port) {
  sockaddr_in in{};
  in.sin_family = AF_INET;
  in.sin_port = htons(port);
  ::inet_pton(AF_INET, text, &in.sin_addr);
  return *Endpoint::FromSockaddr(&in, sizeof in);
}
Endpoint V6(const char* text, uint16_t port) {
  sockaddr_in6 in{};
  in.sin6_family = AF_INET6;
  in.sin6_port = htons(port);
  ::inet_pton(AF_INET6, text, &in.sin6_addr);
  return *Endpoint::FromSockaddr(&in, sizeof in);
}
Rule MakeRule(Action a, Proto p, const char* to, const char* ports, Call call = Call::kConnect) {
  Rule r;
  r.action = a;
  r.proto = p;
  r.call = call;
  EXPECT_TRUE(r.SetTo(to).has_value()) << to;
  EXPECT_TRUE(r.SetPorts(ports).has_value()) << ports;
  r.where = "test";
  return r;
}

TEST(Endpoint, ReadsSockaddrsAndRefusesShortOrForeignOnes) {
  const Endpoint e = V4("10.1.2.3", 443);
  EXPECT_EQ(e.AddressString(), "10.1.2.3");
  EXPECT_EQ(e.port, 443);
  sockaddr_in in{};
  in.sin_family = AF_INET;
  EXPECT_EQ(Endpoint::FromSockaddr(&in, 8).error(), EINVAL);  // shorter than sockaddr_in
  EXPECT_EQ(Endpoint::FromSockaddr(&in, 1).error(), EINVAL);
  in.sin_family = AF_UNIX;
  EXPECT_EQ(Endpoint::FromSockaddr(&in, sizeof in).error(), EAFNOSUPPORT);
  sockaddr_in6 in6{};
  in6.sin6_family = AF_INET6;
  EXPECT_TRUE(Endpoint::FromSockaddr(&in6, 24).has_value());  // RFC 2133 size, as the kernel takes it
  EXPECT_EQ(Endpoint::FromSockaddr(&in6, 20).error(), EINVAL);
}

TEST(Endpoint, KnowsLoopbackAndMappedAddresses) {
  EXPECT_TRUE(V4("127.0.0.1", 1).IsLoopback());
  EXPECT_TRUE(V4("127.9.9.9", 1).IsLoopback());
  EXPECT_FALSE(V4("128.0.0.1", 1).IsLoopback());
  EXPECT_TRUE(V6("::1", 1).IsLoopback());
  EXPECT_TRUE(V6("::ffff:127.0.0.1", 1).IsLoopback());
  EXPECT_FALSE(V6("::2", 1).IsLoopback());
}

TEST(Endpoint, TheUnspecifiedAddressReachesTheLoopback) {
  EXPECT_EQ(V4("0.0.0.0", 7).Reached().AddressString(), "127.0.0.1");
  EXPECT_EQ(V4("0.0.0.0", 7).Reached().port, 7);
  EXPECT_EQ(V6("::", 7).Reached().AddressString(), "::1");
  EXPECT_EQ(V6("::ffff:0.0.0.0", 7).Reached().AddressString(), "::ffff:127.0.0.1");
  EXPECT_EQ(V4("10.0.0.1", 7).Reached().AddressString(), "10.0.0.1");
  EXPECT_EQ(V6("::2", 7).Reached().AddressString(), "::2");
  EXPECT_EQ(V6("::ffff:10.0.0.1", 7).Reached().AddressString(), "::ffff:10.0.0.1");
}

TEST(Cidr, ParsesAndContains) {
  auto c = Cidr::Parse("10.0.0.0/8");
  ASSERT_TRUE(c.has_value());
  EXPECT_TRUE(c->Contains(V4("10.200.0.1", 1)));
  EXPECT_FALSE(c->Contains(V4("11.0.0.1", 1)));
  EXPECT_TRUE(c->Contains(V6("::ffff:10.0.0.1", 1)));  // a mapped IPv4 address is that address
  EXPECT_FALSE(c->Contains(V6("::1", 1)));
  auto host = Cidr::Parse("192.168.1.7");
  ASSERT_TRUE(host.has_value());
  EXPECT_TRUE(host->Contains(V4("192.168.1.7", 9)));
  EXPECT_FALSE(host->Contains(V4("192.168.1.8", 9)));
  auto v6 = Cidr::Parse("fd00::/8");
  ASSERT_TRUE(v6.has_value());
  EXPECT_TRUE(v6->Contains(V6("fd12::1", 1)));
  EXPECT_FALSE(v6->Contains(V6("fe80::1", 1)));
  EXPECT_FALSE(v6->Contains(V4("10.0.0.1", 1)));
  auto odd = Cidr::Parse("10.0.0.0/12");
  EXPECT_TRUE(odd->Contains(V4("10.15.255.255", 1)));
  EXPECT_FALSE(odd->Contains(V4("10.16.0.0", 1)));
  auto all = Cidr::Parse("0.0.0.0/0");
  EXPECT_TRUE(all->Contains(V4("8.8.8.8", 1)));
}

TEST(Cidr, RefusesWhatIsNotOne) {
  EXPECT_EQ(Cidr::Parse("10.0.0.0/33").error(), "'10.0.0.0/33': the prefix length must be 0 to 32");
  EXPECT_EQ(Cidr::Parse("::/129").error(), "'::/129': the prefix length must be 0 to 128");
  EXPECT_EQ(Cidr::Parse("10.0.0/8").error(), "'10.0.0/8' is not an IPv4 or IPv6 address or CIDR");
  EXPECT_EQ(Cidr::Parse("10.0.0.0/").error(), "'10.0.0.0/': the prefix length must be 0 to 32");
  EXPECT_EQ(Cidr::Parse("10.0.0.0/x").error(), "'10.0.0.0/x': the prefix length must be 0 to 32");
}

TEST(Rule, ParsesTargetsAndPorts) {
  Rule r;
  r.proto = Proto::kTcp;
  EXPECT_TRUE(r.SetTo("example.internal").has_value());
  EXPECT_EQ(r.host, "example.internal");
  EXPECT_TRUE(r.SetTo("*.Example.COM.").has_value());
  EXPECT_EQ(r.host, "*.example.com");
  EXPECT_EQ(r.SetTo("bad name!").error(), "'bad name!' is neither a CIDR nor a host name");
  EXPECT_EQ(r.SetTo("/run/x.sock").error(), "'/run/x.sock' is a path: a UNIX socket rule needs proto = \"unix\"");
  EXPECT_EQ(r.SetTo("").error(), "`to` is empty: give a CIDR, a host name, a socket path or \"any\"");
  EXPECT_EQ(r.SetPorts("").error(), "ports '': give a port (80), a range (8000-8099) or \"any\"");
  EXPECT_TRUE(r.SetPorts("8000-8099").has_value());
  EXPECT_EQ(r.port_lo, 8000);
  EXPECT_EQ(r.port_hi, 8099);
  EXPECT_TRUE(r.SetPorts("443").has_value());
  EXPECT_EQ(r.port_lo, 443);
  EXPECT_EQ(r.port_hi, 443);
  EXPECT_EQ(r.SetPorts("99-10").error(), "ports '99-10': give a port (80), a range (8000-8099) or \"any\"");
  EXPECT_EQ(r.SetPorts("70000").error(), "ports '70000': give a port (80), a range (8000-8099) or \"any\"");
  Rule u;
  u.proto = Proto::kUnix;
  EXPECT_TRUE(u.SetTo("/run/dbus/").has_value());
  EXPECT_EQ(u.SetTo("10.0.0.1").error(), "a rule with proto = \"unix\" takes an absolute socket path in `to`, not '10.0.0.1'");
}

TEST(RuleSet, FirstMatchDecidesThenTheDefault) {
  RuleSet rules({MakeRule(Action::kDeny, Proto::kTcp, "10.0.0.66", "any"),
                 MakeRule(Action::kAllow, Proto::kTcp, "10.0.0.0/8", "80"),
                 MakeRule(Action::kLog, Proto::kUdp, "any", "53"),
                 MakeRule(Action::kAllow, Proto::kAny, "example.internal", "8000-8099"),
                 MakeRule(Action::kAllow, Proto::kTcp, "0.0.0.0/0", "9000", Call::kBind)},
                /*default_allow=*/false);
  auto d = rules.Decide(Call::kConnect, Proto::kTcp, V4("10.0.0.66", 80), {});
  EXPECT_EQ(d.action, Action::kDeny);
  EXPECT_EQ(d.rule, 0);
  d = rules.Decide(Call::kConnect, Proto::kTcp, V4("10.0.0.7", 80), {});
  EXPECT_EQ(d.action, Action::kAllow);
  EXPECT_EQ(d.rule, 1);
  d = rules.Decide(Call::kConnect, Proto::kTcp, V4("10.0.0.7", 81), {});
  EXPECT_EQ(d.action, Action::kDeny);
  EXPECT_EQ(d.rule, -1);
  EXPECT_EQ(rules.Describe(d.rule), "net_default");
  d = rules.Decide(Call::kConnect, Proto::kUdp, V4("1.1.1.1", 53), {});
  EXPECT_EQ(d.action, Action::kLog);
  EXPECT_TRUE(d.allowed());
  // A name admits the addresses the resolver gave for it, and only those.
  d = rules.Decide(Call::kConnect, Proto::kTcp, V4("192.0.2.5", 8001), {"example.internal"});
  EXPECT_EQ(d.rule, 3);
  EXPECT_EQ(d.name, "example.internal");
  d = rules.Decide(Call::kConnect, Proto::kTcp, V4("192.0.2.5", 8001), {"other.internal"});
  EXPECT_EQ(d.rule, -1);
  // Bind rules are only about binds, and connect rules only about connects.
  d = rules.Decide(Call::kBind, Proto::kTcp, V4("0.0.0.0", 9000), {});
  EXPECT_EQ(d.rule, 4);
  d = rules.Decide(Call::kBind, Proto::kTcp, V4("0.0.0.0", 80), {});
  EXPECT_EQ(d.rule, -1);
  EXPECT_EQ(rules.Describe(1), "rule 2 (test)");
  RuleSet open({}, /*default_allow=*/true);
  EXPECT_EQ(open.Decide(Call::kConnect, Proto::kUdp, V4("8.8.8.8", 53), {}).action, Action::kAllow);
}

TEST(RuleSet, WildcardNamesAndPaths) {
  RuleSet rules({MakeRule(Action::kDeny, Proto::kAny, "*.ads.example", "any"),
                 MakeRule(Action::kAllow, Proto::kAny, "*.example", "443"),
                 MakeRule(Action::kAllow, Proto::kUnix, "/run/dbus/", "any"),
                 MakeRule(Action::kAllow, Proto::kUnix, "/tmp/exact.sock", "any")},
                false);
  EXPECT_EQ(rules.Decide(Call::kConnect, Proto::kTcp, V4("192.0.2.1", 443), {"cdn.example"}).rule, 1);
  EXPECT_EQ(rules.Decide(Call::kConnect, Proto::kTcp, V4("192.0.2.1", 443), {"x.ads.example"}).rule, 0);
  EXPECT_EQ(rules.Decide(Call::kConnect, Proto::kTcp, V4("192.0.2.1", 443), {"example"}).rule, -1);
  EXPECT_FALSE(rules.DecideName("tracker.ads.example").allowed());
  EXPECT_TRUE(rules.DecideName("cdn.example").allowed());
  EXPECT_TRUE(rules.DecideName("unrelated.org").allowed());  // decided when it connects
  // ... were an address reachable: here only names are (the resolver refuses others).
  EXPECT_FALSE(rules.ReachesAddresses());
  EXPECT_TRUE(RuleSet({MakeRule(Action::kLog, Proto::kTcp, "10.0.0.0/8", "443")}, false).ReachesAddresses());
  EXPECT_TRUE(RuleSet({MakeRule(Action::kAllow, Proto::kUdp, "any", "53")}, false).ReachesAddresses());
  EXPECT_FALSE(RuleSet({MakeRule(Action::kDeny, Proto::kTcp, "10.0.0.0/8", "any")}, false).ReachesAddresses());
  EXPECT_FALSE(RuleSet({MakeRule(Action::kAllow, Proto::kTcp, "0.0.0.0/0", "8080", Call::kBind)}, false).ReachesAddresses());
  EXPECT_TRUE(RuleSet({}, /*default_allow=*/true).ReachesAddresses());
  EXPECT_EQ(rules.DecidePath("/run/dbus/system_bus_socket").rule, 2);
  EXPECT_EQ(rules.DecidePath("/tmp/exact.sock").rule, 3);
  EXPECT_EQ(rules.DecidePath("/tmp/exact.sock2").rule, -1);
  EXPECT_FALSE(rules.DecidePath("/var/run/nscd/socket").allowed());
}

TEST(NameMemory, RemembersNamesPerAddressMostRecentFirst) {
  NameMemory m;
  m.Remember("a.internal", V4("10.0.0.1", 0));
  m.Remember("b.internal", V4("10.0.0.1", 0));
  m.Remember("a.internal", V4("10.0.0.1", 0));
  EXPECT_EQ(m.NamesOf(V4("10.0.0.1", 443)), (std::vector<std::string>{"a.internal", "b.internal"}));
  EXPECT_EQ(m.NamesOf(V6("::ffff:10.0.0.1", 443)), (std::vector<std::string>{"a.internal", "b.internal"}));
  EXPECT_TRUE(m.NamesOf(V4("10.0.0.2", 443)).empty());
}

// --- the resolver's wire format ---

std::vector<uint8_t> Query(const std::string& name, uint16_t type, uint16_t id = 0x1234) {
  std::vector<uint8_t> q = {static_cast<uint8_t>(id >> 8), static_cast<uint8_t>(id), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0};
  size_t start = 0;
  while (start <= name.size()) {
    const size_t dot = std::min(name.find('.', start), name.size());
    q.push_back(static_cast<uint8_t>(dot - start));
    q.insert(q.end(), name.begin() + static_cast<long>(start), name.begin() + static_cast<long>(dot));
    start = dot + 1;
  }
  q.push_back(0);
  q.push_back(static_cast<uint8_t>(type >> 8));
  q.push_back(static_cast<uint8_t>(type));
  q.push_back(0);
  q.push_back(1);
  return q;
}

TEST(Dns, AnswersWithTheAddressesLookupGives) {
  std::string asked;
  auto answer = AnswerDnsQuery(Query("Example.Internal", 1), [&](const std::string& name, uint16_t type) {
    asked = name + "/" + std::to_string(type);
    return DnsAnswer{0, {{127, 0, 0, 1}, {10, 0, 0, 2}}};
  });
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(asked, "example.internal/1");
  const auto& r = *answer;
  ASSERT_GE(r.size(), 12u);
  EXPECT_EQ(r[0], 0x12);
  EXPECT_EQ(r[1], 0x34);
  EXPECT_EQ(r[2] & 0x80, 0x80);  // a response
  EXPECT_EQ(r[3] & 0x0f, 0);     // NOERROR
  EXPECT_EQ((r[6] << 8) | r[7], 2);  // two answers
  // The last answer's data is the second address.
  EXPECT_EQ(std::vector<uint8_t>(r.end() - 4, r.end()), (std::vector<uint8_t>{10, 0, 0, 2}));
}

TEST(Dns, NoSuchNameAndMalformedQueries) {
  auto nx = AnswerDnsQuery(Query("gone.internal", 28), [](const std::string&, uint16_t) { return DnsAnswer{3, {}}; });
  ASSERT_TRUE(nx.has_value());
  EXPECT_EQ((*nx)[3] & 0x0f, 3);
  auto never = [](const std::string&, uint16_t) -> DnsAnswer {
    ADD_FAILURE() << "a malformed query reached the lookup";
    return {};
  };
  EXPECT_FALSE(AnswerDnsQuery({0x12}, never).has_value());  // not even an id
  std::vector<uint8_t> truncated = Query("example.internal", 1);
  truncated.resize(20);
  auto formerr = AnswerDnsQuery(truncated, never);
  ASSERT_TRUE(formerr.has_value());
  EXPECT_EQ((*formerr)[3] & 0x0f, 1);
  std::vector<uint8_t> looping = Query("a", 1);
  looping[12] = 0xc0;  // a compression pointer where a label belongs
  EXPECT_EQ((*AnswerDnsQuery(looping, never))[3] & 0x0f, 1);
}

TEST(Dns, NeverMoreThan512BytesAndNoDataForOtherTypes) {
  std::vector<std::vector<uint8_t>> many(100, std::vector<uint8_t>{10, 0, 0, 1});
  auto big = AnswerDnsQuery(Query("many.internal", 1), [&](const std::string&, uint16_t) { return DnsAnswer{0, many}; });
  ASSERT_TRUE(big.has_value());
  EXPECT_LE(big->size(), 512u);
  EXPECT_EQ((*big)[2] & 0x02, 0);  // not marked truncated: fewer records instead
  auto mx = AnswerDnsQuery(Query("mail.internal", 15), [](const std::string&, uint16_t) { return DnsAnswer{0, {{1, 2, 3, 4}}}; });
  EXPECT_EQ(((*mx)[6] << 8) | (*mx)[7], 0);
}

// The connection log on a full disk: the decisions go on, no line is left cut in
// half, and the first line written once there is room says how many were lost.
TEST(ConnLog, AFullDiskCutsNoLineAndTheLogSaysHowManyWereLost) {
  char dir_template[] = "/tmp/ulsp-connlog.XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  ASSERT_EQ(::mount("ulsp-test", dir.c_str(), "tmpfs", 0, "size=64k"), 0) << std::strerror(errno);
  struct Cleanup {
    std::string dir;
    ~Cleanup() {
      ::umount2(dir.c_str(), MNT_DETACH);
      ::rmdir(dir.c_str());
    }
  } cleanup{dir};
  // Full but for one page: the log's first lines fit, then one is stopped inside.
  ASSERT_EQ(std::system(("dd if=/dev/zero of=" + dir + "/fill bs=4k 2>/dev/null; truncate -s -4096 " + dir + "/fill").c_str()), 0);
  auto log = ConnLog::Open(dir + "/conn.jsonl", "g");
  ASSERT_TRUE(log.has_value()) << log.error();
  LogEntry e{.pid = ::getpid(), .call = "connect", .proto = "tcp", .address = "192.0.2.7", .port = 443,
             .verdict = "deny", .rule = "net_default"};
  for (int i = 0; i < 40; ++i) (*log)->Write(e);
  const uint64_t lost = (*log)->failures();
  EXPECT_GT(lost, 0u);
  EXPECT_GT((*log)->lines(), 0u);
  ASSERT_EQ(::unlink((dir + "/fill").c_str()), 0);
  e.port = 80;
  (*log)->Write(e);
  const std::string text = ulsp::testing::ReadAll(dir + "/conn.jsonl");
  ASSERT_FALSE(text.empty());
  EXPECT_EQ(text.back(), '\n');
  std::vector<nlohmann::json> lines;
  std::istringstream split(text);
  for (std::string line; std::getline(split, line);) lines.push_back(nlohmann::json::parse(line));  // throws on a cut line
  // Where the page ran out decides how many times writing stopped and started again;
  // each restart's line says how many were lost since the last, and a line follows it.
  uint64_t counted = 0;
  size_t gaps = 0;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i]["call"] != "lost") continue;
    ++gaps;
    counted += lines[i]["count"].get<uint64_t>();
    EXPECT_EQ(lines[i]["error"], "ENOSPC");
    ASSERT_LT(i + 1, lines.size());
    EXPECT_EQ(lines[i + 1]["call"], "connect");
  }
  EXPECT_GE(gaps, 1u);
  EXPECT_EQ(counted, lost);
  EXPECT_EQ(lines.size() - gaps, 41 - lost);
  EXPECT_EQ(lines.back()["port"], 80);
}

}  // namespace
}  // namespace ulsp::net
