// What both ends of an agent connection (remote_port.cc, ulsp/core/agent.cc) must
// agree on: the protocol version, the frame limits, and how a kj failure is said.
#pragma once

#include <capnp/message.h>
#include <kj/exception.h>

#include <cstdint>
#include <string>

namespace ulsp::msgport {

inline constexpr uint32_t kAgentProtocolVersion = 1;

// An open of a regular file this small (or smaller) brings its contents (agent.capnp).
inline constexpr int64_t kAgentPrefetchMax = 128 * 1024;
// An opendir brings this much of the listing at most (agent.capnp).
inline constexpr size_t kAgentListingMax = 256 * 1024;

// A frame larger or deeper than this closes its connection (a request or reply is at
// most a 128 KiB read or write and its envelope).
capnp::ReaderOptions AgentFrameLimits();

// "wrong token" or "tlsv1 alert unknown ca" rather than kj's "file:line: type: text".
std::string DescribeKjError(const kj::Exception& e);

}  // namespace ulsp::msgport
