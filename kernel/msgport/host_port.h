// "ADDR:PORT" as people and URLs write it: an IPv6 address in brackets ("[::1]:7700"),
// so that the port's colon is not read as one of the address's.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace ulsp::msgport {

// host, port -> "host:port", "[::1]:port" for an IPv6 address.
inline std::string JoinHostPort(std::string_view host, int port) {
  const std::string h(host);
  return (h.find(':') != std::string::npos ? "[" + h + "]" : h) + ":" + std::to_string(port);
}

// "ADDR:PORT" (IPv6 in brackets) -> host (without them), port. False for a bad one;
// port 0 (for a listener: "pick one") only with `zero_port`.
bool SplitHostPort(const std::string& text, std::string& host, uint16_t& port, bool zero_port = false);

}  // namespace ulsp::msgport
