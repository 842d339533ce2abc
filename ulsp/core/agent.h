// `ulsp agent serve`: a translation agent. It exports named layer stacks to other
// hosts on Cap'n Proto RPC over TCP (kernel/msgport/agent.capnp): a client (`ulsp mount
// --remote ADDR:PORT/NAME`, kernel/msgport/remote_port.h) attaches to an export and
// gets a stack of its own for its connection, which serves its VFS requests.
//
// Authentication: a shared token (--token-file; compared in constant time), or mutual
// TLS (--tls-cert, --tls-key: the agent's; --tls-ca: the CA every client's
// certificate must be signed by), or both. A peer that fails is refused with a clear
// error on both sides (the agent logs it) and gets no stack.
//
// Robustness: a malformed or oversized frame (over 32 MiB), a failed handshake, a
// peer that vanishes: that connection closes (its stacks are dropped, open files
// closed, but for files held for the mount's next connection: docs/agents.md) and
// the agent keeps serving the others. Requests are served on worker
// threads, so one that blocks (a FIFO) holds up no other.
//
// Runs in the foreground until SIGINT or SIGTERM.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "kernel/msgport/host_port.h"

namespace ulsp::core {

struct AgentOptions {
  std::string listen_host;  // "0.0.0.0", "10.0.0.2", "::"
  uint16_t listen_port = 0;
  std::map<std::string, std::string> exports;  // name -> SPEC
  std::string token_file;
  std::string tls_cert, tls_key, tls_ca;  // files
  unsigned workers = 8;                   // threads serving requests
};

// Returns the exit status (1 with a one-line error on stderr when it cannot start).
int ServeAgent(const AgentOptions& options);

using msgport::SplitHostPort;  // kernel/msgport/host_port.h

}  // namespace ulsp::core
