// Resolver: the group's name server. It listens on 127.0.0.53:53 (UDP) inside the
// group's network namespace — the group's /etc/resolv.conf names it — and answers A
// and AAAA queries by resolving on the host's side (getaddrinfo: the host's
// /etc/hosts and DNS), after the policy's `hosts` table. It remembers which addresses
// each name gave (NameMemory), so rules on names admit exactly those addresses, and
// logs each lookup. A name a rule denies does not exist (NXDOMAIN). Other query types
// get an empty answer. TCP queries are not served (answers always fit 512 bytes).
//
// Owned by the group's supervisor; its threads stop when it is destroyed.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <optional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <sys/socket.h>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/unique_fd.h"
#include "ulsp/net/conn_log.h"
#include "ulsp/net/names.h"
#include "ulsp/net/rules.h"

namespace ulsp::net {

// Where the group's resolver listens, inside its network namespace.
inline constexpr uint8_t kResolverV4[4] = {127, 0, 0, 53};
inline constexpr uint16_t kResolverPort = 53;

// One DNS query in, one answer out: the wire format, without the network (tested
// on its own). `lookup(name, qtype)` gives addresses (4 or 16 bytes each) and an
// rcode (0 found or no data, 2 failure, 3 no such name).
struct DnsAnswer {
  int rcode = 0;
  std::vector<std::vector<uint8_t>> addresses;
};
// Parses `query` and builds the response. nullopt for a packet not worth an answer
// (too short to carry an id); a malformed question gets FORMERR.
std::optional<std::vector<uint8_t>> AnswerDnsQuery(
    const std::vector<uint8_t>& query,
    const std::function<DnsAnswer(const std::string& name, uint16_t qtype)>& lookup);

class Resolver {
 public:
  struct Counters {
    std::atomic<uint64_t> queries{0};
    std::atomic<uint64_t> refused{0};
  };
  // Binds inside the namespace `group_netns` and starts serving. The references must
  // outlive the resolver. Fails with the errno of the bind or the namespace switch.
  static Result<std::unique_ptr<Resolver>> Start(int group_netns, std::string group, const RuleSet& rules,
                                                 std::map<std::string, std::vector<std::string>> hosts,
                                                 NameMemory& names, const Askers& askers, ConnLog& log);
  ~Resolver();
  // Asks the receiving thread to end, without waiting (the destructor waits).
  void Stop() noexcept;
  const Counters& counters() const noexcept { return counters_; }

 private:
  Resolver(std::string group, const RuleSet& rules, std::map<std::string, std::vector<std::string>> hosts,
           NameMemory& names, const Askers& askers, ConnLog& log);
  void Receive();
  void Work();
  DnsAnswer Lookup(const std::string& name, uint16_t qtype, pid_t asker);

  std::string group_;
  const RuleSet& rules_;
  std::map<std::string, std::vector<std::string>> hosts_;
  NameMemory& names_;
  const Askers& askers_;
  ConnLog& log_;
  Counters counters_;
  UniqueFd sock_, stop_;

  struct Query {
    std::vector<uint8_t> packet;
    sockaddr_storage from;
    socklen_t from_len;
  };
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Query> queue_;
  bool stopping_ = false;
  static constexpr int kWorkers = 4;  // lookups at once (getaddrinfo blocks)
  std::thread receiver_;
  std::vector<std::thread> workers_;  // started by the receiver, at the first query
};

}  // namespace ulsp::net
