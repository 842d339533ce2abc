#include "ulsp/net/rules.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstring>

#include <fmt/core.h>

namespace ulsp::net {

std::string_view ActionName(Action a) noexcept {
  switch (a) {
    case Action::kAllow:
      return "allow";
    case Action::kDeny:
      return "deny";
    case Action::kLog:
      return "log";
  }
  return "?";
}

std::string_view ProtoName(Proto p) noexcept {
  switch (p) {
    case Proto::kTcp:
      return "tcp";
    case Proto::kUdp:
      return "udp";
    case Proto::kUnix:
      return "unix";
    case Proto::kAny:
      return "any";
  }
  return "?";
}

std::expected<Endpoint, int> Endpoint::FromSockaddr(const void* sa, size_t len) {
  if (len < sizeof(sa_family_t)) return std::unexpected(EINVAL);
  sa_family_t family;
  std::memcpy(&family, sa, sizeof family);
  Endpoint e;
  if (family == AF_INET) {
    if (len < sizeof(sockaddr_in)) return std::unexpected(EINVAL);
    sockaddr_in in;
    std::memcpy(&in, sa, sizeof in);
    e.family = AF_INET;
    std::memcpy(e.addr.data(), &in.sin_addr, 4);
    e.port = ntohs(in.sin_port);
    return e;
  }
  if (family == AF_INET6) {
    // The kernel accepts the RFC 2133 size (without sin6_scope_id), 24 bytes.
    if (len < 24) return std::unexpected(EINVAL);
    sockaddr_in6 in6{};
    std::memcpy(&in6, sa, std::min(len, sizeof in6));
    e.family = AF_INET6;
    std::memcpy(e.addr.data(), &in6.sin6_addr, 16);
    e.port = ntohs(in6.sin6_port);
    return e;
  }
  return std::unexpected(EAFNOSUPPORT);
}

std::optional<std::array<uint8_t, 4>> Endpoint::V4() const noexcept {
  std::array<uint8_t, 4> v4{};
  if (family == AF_INET) {
    std::copy_n(addr.begin(), 4, v4.begin());
    return v4;
  }
  static constexpr uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (family == AF_INET6 && std::equal(kMapped, kMapped + 12, addr.begin())) {
    std::copy_n(addr.begin() + 12, 4, v4.begin());
    return v4;
  }
  return std::nullopt;
}

std::string Endpoint::AddressString() const {
  char buf[INET6_ADDRSTRLEN] = "";
  if (family == AF_INET) {
    ::inet_ntop(AF_INET, addr.data(), buf, sizeof buf);
  } else if (family == AF_INET6) {
    ::inet_ntop(AF_INET6, addr.data(), buf, sizeof buf);
  }
  return buf;
}

bool Endpoint::IsLoopback() const noexcept {
  if (auto v4 = V4()) return (*v4)[0] == 127;
  if (family != AF_INET6) return false;
  for (int i = 0; i < 15; ++i)
    if (addr[static_cast<size_t>(i)] != 0) return false;
  return addr[15] == 1;
}

Endpoint Endpoint::Reached() const noexcept {
  Endpoint e = *this;
  const size_t v4_at = family == AF_INET ? 0 : 12;  // where the IPv4 address sits
  if (auto v4 = V4(); v4 && *v4 == std::array<uint8_t, 4>{}) {
    e.addr[v4_at] = 127;
    e.addr[v4_at + 3] = 1;
  } else if (family == AF_INET6 && addr == std::array<uint8_t, 16>{}) {
    e.addr[15] = 1;
  }
  return e;
}

std::expected<Cidr, std::string> Cidr::Parse(std::string_view text) {
  const size_t slash = text.find('/');
  const std::string address(text.substr(0, slash));
  Cidr c;
  if (::inet_pton(AF_INET, address.c_str(), c.addr.data()) == 1) {
    c.family = AF_INET;
    c.prefix = 32;
  } else if (::inet_pton(AF_INET6, address.c_str(), c.addr.data()) == 1) {
    c.family = AF_INET6;
    c.prefix = 128;
  } else {
    return std::unexpected(fmt::format("'{}' is not an IPv4 or IPv6 address or CIDR", text));
  }
  if (slash != std::string_view::npos) {
    const std::string_view bits = text.substr(slash + 1);
    int prefix = -1;
    auto [end, ec] = std::from_chars(bits.data(), bits.data() + bits.size(), prefix);
    const int max = c.family == AF_INET ? 32 : 128;
    if (bits.empty() || ec != std::errc() || end != bits.data() + bits.size() || prefix < 0 || prefix > max)
      return std::unexpected(fmt::format("'{}': the prefix length must be 0 to {}", text, max));
    c.prefix = prefix;
  }
  return c;
}

bool Cidr::Contains(const Endpoint& e) const noexcept {
  std::array<uint8_t, 16> a{};
  if (family == AF_INET) {
    auto v4 = e.V4();
    if (!v4) return false;
    std::copy(v4->begin(), v4->end(), a.begin());
  } else {
    if (e.family != AF_INET6) return false;
    a = e.addr;
  }
  int bits = prefix;
  for (size_t i = 0; bits > 0; ++i, bits -= 8) {
    const auto mask = static_cast<uint8_t>(bits >= 8 ? 0xff : (0xff << (8 - bits)) & 0xff);
    if ((a[i] & mask) != (addr[i] & mask)) return false;
  }
  return true;
}

bool IsHostName(std::string_view name) noexcept {
  if (name.starts_with("*.")) name.remove_prefix(2);
  if (name.ends_with('.')) name.remove_suffix(1);
  if (name.empty() || name.size() > 253) return false;
  size_t label = 0;
  for (char c : name) {
    if (c == '.') {
      if (label == 0) return false;
      label = 0;
      continue;
    }
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') return false;
    if (++label > 63) return false;
  }
  return label > 0;
}

std::string NormalizeName(std::string_view name) {
  std::string n(name);
  if (!n.empty() && n.back() == '.') n.pop_back();
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return n;
}

std::expected<void, std::string> Rule::SetTo(std::string_view to) {
  cidr.reset();
  host.clear();
  path.clear();
  any_address = false;
  if (to == "any") {
    any_address = true;
    return {};
  }
  if (to.empty()) return std::unexpected(std::string("`to` is empty: give a CIDR, a host name, a socket path or \"any\""));
  if (to.front() == '/') {
    if (proto != Proto::kUnix)
      return std::unexpected(fmt::format("'{}' is a path: a UNIX socket rule needs proto = \"unix\"", to));
    path = to;
    return {};
  }
  if (proto == Proto::kUnix)
    return std::unexpected(fmt::format("a rule with proto = \"unix\" takes an absolute socket path in `to`, not '{}'", to));
  const bool looks_numeric = to.find(':') != std::string_view::npos || to.find('/') != std::string_view::npos ||
                             std::all_of(to.begin(), to.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)) || c == '.'; });
  if (looks_numeric) {
    auto c = Cidr::Parse(to);
    if (!c) return std::unexpected(c.error());
    cidr = *c;
    return {};
  }
  if (!IsHostName(to)) return std::unexpected(fmt::format("'{}' is neither a CIDR nor a host name", to));
  host = NormalizeName(to);
  return {};
}

std::expected<void, std::string> Rule::SetPorts(std::string_view ports) {
  if (ports == "any") {
    port_lo = 0;
    port_hi = 65535;
    return {};
  }
  auto number = [](std::string_view s) -> std::optional<uint16_t> {
    unsigned v = 0;
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (s.empty() || ec != std::errc() || end != s.data() + s.size() || v > 65535) return std::nullopt;
    return static_cast<uint16_t>(v);
  };
  const size_t dash = ports.find('-');
  auto lo = number(ports.substr(0, dash));
  auto hi = dash == std::string_view::npos ? lo : number(ports.substr(dash + 1));
  if (!lo || !hi || *lo > *hi)
    return std::unexpected(fmt::format("ports '{}': give a port (80), a range (8000-8099) or \"any\"", ports));
  port_lo = *lo;
  port_hi = *hi;
  return {};
}

namespace {

bool NameMatches(const std::string& pattern, const std::string& name) {
  if (pattern.starts_with("*.")) {
    const std::string_view suffix = std::string_view(pattern).substr(1);  // ".example.com"
    return name.size() > suffix.size() && std::string_view(name).ends_with(suffix);
  }
  return name == pattern;
}

}  // namespace

Decision RuleSet::Decide(Call call, Proto proto, const Endpoint& to, const std::vector<std::string>& names) const {
  Decision d;
  if (!names.empty()) d.name = names.front();
  for (size_t i = 0; i < rules_.size(); ++i) {
    const Rule& r = rules_[i];
    if (r.call != call) continue;
    if (r.proto == Proto::kUnix) continue;
    if (r.proto != Proto::kAny && r.proto != proto) continue;
    if (to.port < r.port_lo || to.port > r.port_hi) continue;
    if (r.cidr && !r.cidr->Contains(to)) continue;
    if (!r.path.empty()) continue;
    if (!r.host.empty()) {
      auto it = std::find_if(names.begin(), names.end(), [&](const std::string& n) { return NameMatches(r.host, n); });
      if (it == names.end()) continue;
      d.name = *it;
    }
    d.action = r.action;
    d.rule = static_cast<int>(i);
    return d;
  }
  d.action = default_allow_ ? Action::kAllow : Action::kDeny;
  return d;
}

Decision RuleSet::DecidePath(std::string_view path) const {
  Decision d;
  for (size_t i = 0; i < rules_.size(); ++i) {
    const Rule& r = rules_[i];
    if (r.call != Call::kConnect) continue;
    if (r.proto != Proto::kUnix && r.proto != Proto::kAny) continue;
    if (r.proto == Proto::kAny && !r.any_address) continue;  // an address rule says nothing of paths
    if (!r.path.empty() && (r.path.back() == '/' ? !path.starts_with(r.path) : path != r.path)) continue;
    d.action = r.action;
    d.rule = static_cast<int>(i);
    return d;
  }
  d.action = default_allow_ ? Action::kAllow : Action::kDeny;
  return d;
}

Decision RuleSet::DecideName(std::string_view name) const {
  const std::string n = NormalizeName(name);
  Decision d;
  d.name = n;
  for (size_t i = 0; i < rules_.size(); ++i) {
    const Rule& r = rules_[i];
    if (r.host.empty() || !NameMatches(r.host, n)) continue;
    d.action = r.action;
    d.rule = static_cast<int>(i);
    return d;
  }
  d.action = Action::kAllow;  // the connection to what it resolves to is decided then
  return d;
}

bool RuleSet::ReachesAddresses() const noexcept {
  return default_allow_ || std::ranges::any_of(rules_, [](const Rule& r) {
           return r.action != Action::kDeny && r.call == Call::kConnect && r.proto != Proto::kUnix &&
                  (r.cidr.has_value() || r.any_address);
         });
}

std::string RuleSet::Describe(int rule) const {
  if (rule < 0 || static_cast<size_t>(rule) >= rules_.size()) return "net_default";
  return fmt::format("rule {} ({})", rule + 1, rules_[static_cast<size_t>(rule)].where);
}

}  // namespace ulsp::net
