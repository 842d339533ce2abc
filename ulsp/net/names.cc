#include "ulsp/net/names.h"

#include <algorithm>
#include <mutex>

namespace ulsp::net {

NameMemory::Key NameMemory::KeyOf(const Endpoint& e) {
  Key k{};
  if (auto v4 = e.V4()) {  // an IPv4 address and its IPv4-mapped IPv6 form are one
    k[10] = k[11] = 0xff;
    std::copy(v4->begin(), v4->end(), k.begin() + 12);
    return k;
  }
  return e.addr;
}

void NameMemory::Remember(const std::string& name, const Endpoint& e) {
  std::unique_lock lock(mu_);
  auto& list = names_[KeyOf(e)];
  std::vector<std::string> fresh{name};
  for (std::string& n : list)
    if (n != name && fresh.size() < 8) fresh.push_back(std::move(n));
  list = std::move(fresh);
}

std::vector<std::string> NameMemory::NamesOf(const Endpoint& e) const {
  std::shared_lock lock(mu_);
  auto it = names_.find(KeyOf(e));
  return it == names_.end() ? std::vector<std::string>{} : it->second;
}

void Askers::Note(uint16_t port, pid_t pid) {
  std::lock_guard lock(mu_);
  by_port_[port] = pid;
}

pid_t Askers::Find(uint16_t port) const {
  std::lock_guard lock(mu_);
  auto it = by_port_.find(port);
  return it == by_port_.end() ? 0 : it->second;
}

}  // namespace ulsp::net
