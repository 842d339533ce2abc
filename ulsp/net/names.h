// NameMemory: which host names the group's resolver answered with which addresses,
// so a rule on a name admits exactly the addresses the group was told for it, and the
// connection log can say which name an address came from. Askers: which process
// asked the resolver from which port, for its log lines.
//
// Thread-safe: the resolver writes, the net ULSP's workers read (Askers: the other way).
#pragma once

#include <sys/types.h>

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "ulsp/net/rules.h"

namespace ulsp::net {

class NameMemory {
 public:
  // `name` resolved to `e`'s address (the port is ignored).
  void Remember(const std::string& name, const Endpoint& e);
  // The names `e`'s address was resolved from, most recent first (at most 8).
  std::vector<std::string> NamesOf(const Endpoint& e) const;

 private:
  using Key = std::array<uint8_t, 16>;
  static Key KeyOf(const Endpoint& e);
  mutable std::shared_mutex mu_;
  std::map<Key, std::vector<std::string>> names_;
};

// A UDP query does not say who sent it, but every socket of the group reaches the
// resolver through the filter first (a connect to 127.0.0.53:53, or a send with that
// address), and the net ULSP notes that socket's process by the socket's local port.
// A later process on the port reaches the resolver the same way, and replaces it.
class Askers {
 public:
  void Note(uint16_t port, pid_t pid);
  // The process that last reached the resolver from `port`; 0 if none did.
  pid_t Find(uint16_t port) const;

 private:
  mutable std::mutex mu_;
  std::unordered_map<uint16_t, pid_t> by_port_;  // at most 65536 entries
};

}  // namespace ulsp::net
