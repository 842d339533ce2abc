// The networking rules of a group: what its connections may reach. A policy file's
// `[[group.NAME.net]]` tables become Rules (ulsp/core/policy.h parses them); the net
// ULSP asks Decide for every connect, bind and addressed send.
//
// Rules are tried in order and the first that matches decides; when none does, the
// group's default (allow or deny) decides. A rule names a protocol (tcp, udp, unix or
// any), what the call reaches (`to`: a CIDR, a host name, `*.suffix`, a UNIX socket
// path or path prefix ending in `/`), ports (one, a range, or any) and which call it is
// about (`connect`, the default, covers connect and addressed sends; `bind` covers
// binding a socket that accepts connections from outside the group).
//
// A host name matches an address when the group resolved that name, through the
// ULSP's resolver, to that address: the resolver remembers (NameMemory), so a rule on
// `example.internal` admits exactly the addresses the group was told for it.
//
// Immutable after parsing; Decide is thread-safe.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <array>
#include <cstdint>
#include <expected>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ulsp::net {

enum class Action { kAllow, kDeny, kLog };
enum class Proto { kTcp, kUdp, kUnix, kAny };
enum class Call { kConnect, kBind };

std::string_view ActionName(Action a) noexcept;  // "allow", "deny", "log"
std::string_view ProtoName(Proto p) noexcept;    // "tcp", "udp", "unix", "any"

// An IPv4 or IPv6 address and port, in host terms. IPv4-mapped IPv6 addresses
// (::ffff:a.b.c.d) are kept as IPv6 but match IPv4 rules as the IPv4 address.
struct Endpoint {
  int family = AF_UNSPEC;       // AF_INET or AF_INET6
  std::array<uint8_t, 16> addr{};  // 4 bytes used for AF_INET
  uint16_t port = 0;

  // Reads a sockaddr_in or sockaddr_in6 (`len` bytes). Fails with EINVAL (too short),
  // or EAFNOSUPPORT (another family).
  static std::expected<Endpoint, int> FromSockaddr(const void* sa, size_t len);
  // "10.0.0.1", "::1" (no port).
  std::string AddressString() const;
  // Whether it is 127.0.0.0/8, ::1, or ::ffff:127.x.y.z.
  bool IsLoopback() const noexcept;
  // Where a connect or send to this address lands: Linux takes the unspecified
  // address (0.0.0.0, ::, ::ffff:0.0.0.0) to mean the loopback (127.0.0.1, ::1,
  // ::ffff:127.0.0.1); any other address is itself.
  Endpoint Reached() const noexcept;
  // The IPv4 address of an AF_INET endpoint or of an IPv4-mapped IPv6 one.
  std::optional<std::array<uint8_t, 4>> V4() const noexcept;
};

struct Cidr {
  int family = AF_INET;
  std::array<uint8_t, 16> addr{};
  int prefix = 32;

  // "10.0.0.0/8", "::1/128", "192.168.1.7" (a host). Fails with a reason.
  static std::expected<Cidr, std::string> Parse(std::string_view text);
  bool Contains(const Endpoint& e) const noexcept;
};

struct Rule {
  Action action = Action::kAllow;
  Proto proto = Proto::kAny;
  Call call = Call::kConnect;
  std::optional<Cidr> cidr;  // `to` is a CIDR
  std::string host;          // `to` is a host name ("*.example.com" matches below it)
  std::string path;          // `to` is a UNIX socket path (a prefix when it ends in '/')
  bool any_address = false;  // `to` is "any" (or missing)
  uint16_t port_lo = 0, port_hi = 65535;
  std::string where;         // "FILE:LINE", for logs and errors

  // Parses `to` and `ports` into this rule. Fails with a reason naming the value.
  std::expected<void, std::string> SetTo(std::string_view to);
  std::expected<void, std::string> SetPorts(std::string_view ports);
};

// What Decide answers.
struct Decision {
  Action action = Action::kDeny;
  int rule = -1;             // index into the rule list, -1 for the default
  std::string name;          // the host name that matched (or that the address had)
  bool allowed() const noexcept { return action != Action::kDeny; }
};

class RuleSet {
 public:
  RuleSet() = default;
  RuleSet(std::vector<Rule> rules, bool default_allow) : rules_(std::move(rules)), default_allow_(default_allow) {}

  // Decides a call reaching an INET endpoint. `names`: the names the address was
  // resolved from by the group's resolver (most recent first).
  Decision Decide(Call call, Proto proto, const Endpoint& to, const std::vector<std::string>& names) const;
  // Decides a connect or send to a UNIX socket path (bind is always allowed: it makes
  // a file, which the file-system view governs).
  Decision DecidePath(std::string_view path) const;
  // Decides a name lookup: deny when the first rule that names it (or a suffix of
  // it) denies; otherwise allow (the connection is decided when it is made).
  Decision DecideName(std::string_view name) const;
  // Whether a connect or send may reach an address no name stands for: net_default
  // allows, or an allowing (or logging) connect rule names addresses (a CIDR, or
  // any). If not, only the names rules name can lead anywhere, and the resolver
  // looks up no other name on the host.
  bool ReachesAddresses() const noexcept;

  const std::vector<Rule>& rules() const noexcept { return rules_; }
  bool default_allow() const noexcept { return default_allow_; }
  // "rule 2 (policy.toml:14)" or "net_default".
  std::string Describe(int rule) const;

 private:
  std::vector<Rule> rules_;
  bool default_allow_ = false;
};

// Whether `name` is a syntactically valid host name (letters, digits, '-', '.', an
// optional leading "*."), at most 253 characters.
bool IsHostName(std::string_view name) noexcept;
// Lower-case, without a trailing '.'.
std::string NormalizeName(std::string_view name);

}  // namespace ulsp::net
