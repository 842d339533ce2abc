// NameMemory: which host names the group's resolver answered with which addresses,
// so a rule on a name admits exactly the addresses the group was told for it, and the
// connection log can say which name an address came from.
//
// Thread-safe: the resolver writes, the net ULSP's workers read.
#pragma once

#include <array>
#include <map>
#include <shared_mutex>
#include <string>
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

}  // namespace ulsp::net
