#include "ulsp/net/resolver.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <system_error>

#include "kernel/msgport/log.h"

namespace ulsp::net {
namespace {

constexpr uint16_t kTypeA = 1;
constexpr uint16_t kTypeAAAA = 28;
constexpr uint32_t kTtl = 60;
constexpr size_t kMaxUdp = 512;

uint16_t Get16(const std::vector<uint8_t>& b, size_t at) {
  return static_cast<uint16_t>((b[at] << 8) | b[at + 1]);
}
void Put16(std::vector<uint8_t>& b, uint16_t v) {
  b.push_back(static_cast<uint8_t>(v >> 8));
  b.push_back(static_cast<uint8_t>(v & 0xff));
}

}  // namespace

std::optional<std::vector<uint8_t>> AnswerDnsQuery(
    const std::vector<uint8_t>& q, const std::function<DnsAnswer(const std::string&, uint16_t)>& lookup) {
  if (q.size() < 2) return std::nullopt;
  std::vector<uint8_t> r;
  auto header = [&](int rcode, uint16_t qd, uint16_t an) {
    r.clear();
    r.push_back(q[0]);
    r.push_back(q[1]);
    const bool rd = q.size() > 2 && (q[2] & 0x01) != 0;
    Put16(r, static_cast<uint16_t>(0x8000 | (rd ? 0x0100 : 0) | 0x0080 | (rcode & 0xf)));  // QR, RD, RA
    Put16(r, qd);
    Put16(r, an);
    Put16(r, 0);
    Put16(r, 0);
  };
  if (q.size() < 12 || (q[2] & 0x80) != 0 || ((q[2] >> 3) & 0xf) != 0 || Get16(q, 4) != 1) {
    header(1, 0, 0);  // FORMERR: not a standard query with one question
    return r;
  }
  // The question: labels, then type and class.
  std::string name;
  size_t at = 12;
  for (;;) {
    if (at >= q.size()) return header(1, 0, 0), r;
    const uint8_t len = q[at++];
    if (len == 0) break;
    if (len > 63 || at + len > q.size() || name.size() + len + 1 > 253) return header(1, 0, 0), r;
    if (!name.empty()) name += '.';
    name.append(reinterpret_cast<const char*>(&q[at]), len);
    at += len;
  }
  if (at + 4 > q.size()) return header(1, 0, 0), r;
  const uint16_t qtype = Get16(q, at);
  const uint16_t qclass = Get16(q, at + 2);
  const std::vector<uint8_t> question(q.begin() + 12, q.begin() + static_cast<long>(at + 4));
  DnsAnswer a;
  if (qclass == 1 && (qtype == kTypeA || qtype == kTypeAAAA)) {
    a = lookup(NormalizeName(name), qtype);
  } else if (qclass == 1) {
    a = lookup(NormalizeName(name), qtype);  // for the name's existence only
    a.addresses.clear();
  }
  const size_t rdlen = qtype == kTypeA ? 4 : 16;
  std::vector<std::vector<uint8_t>> fitting;
  size_t size = 12 + question.size();
  for (auto& addr : a.addresses) {
    if (addr.size() != rdlen) continue;
    if (size + 12 + rdlen > kMaxUdp) break;  // never truncated: fewer records instead
    size += 12 + rdlen;
    fitting.push_back(addr);
  }
  header(a.rcode, 1, static_cast<uint16_t>(fitting.size()));
  r.insert(r.end(), question.begin(), question.end());
  for (auto& addr : fitting) {
    Put16(r, 0xc00c);  // the name: a pointer to the question's
    Put16(r, qtype);
    Put16(r, 1);
    Put16(r, static_cast<uint16_t>(kTtl >> 16));
    Put16(r, static_cast<uint16_t>(kTtl & 0xffff));
    Put16(r, static_cast<uint16_t>(rdlen));
    r.insert(r.end(), addr.begin(), addr.end());
  }
  return r;
}

Resolver::Resolver(std::string group, const RuleSet& rules, std::map<std::string, std::vector<std::string>> hosts,
                   NameMemory& names, const Askers& askers, ConnLog& log)
    : group_(std::move(group)), rules_(rules), hosts_(std::move(hosts)), names_(names), askers_(askers), log_(log) {}

Result<std::unique_ptr<Resolver>> Resolver::Start(int group_netns, std::string group, const RuleSet& rules,
                                                  std::map<std::string, std::vector<std::string>> hosts,
                                                  NameMemory& names, const Askers& askers, ConnLog& log) {
  std::unique_ptr<Resolver> r(new Resolver(std::move(group), rules, std::move(hosts), names, askers, log));
  // The socket is made inside the group's namespace, from a thread that enters it
  // and then ends, so no thread of ours stays there.
  int made = -1, err = 0;
  std::thread([&] {
    if (::setns(group_netns, CLONE_NEWNET) != 0) {
      err = errno;
      return;
    }
    made = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (made < 0) err = errno;
  }).join();
  if (made < 0) return Fail(err);
  r->sock_.Reset(made);
  sockaddr_in at{};
  at.sin_family = AF_INET;
  at.sin_port = htons(kResolverPort);
  std::memcpy(&at.sin_addr, kResolverV4, 4);
  if (auto b = Sys([&] { return ::bind(r->sock_.get(), reinterpret_cast<sockaddr*>(&at), sizeof at); }); !b)
    return std::unexpected(b.error());
  auto efd = Sys([] { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); });
  if (!efd) return std::unexpected(efd.error());
  r->stop_.Reset(*efd);
  r->receiver_ = std::thread([p = r.get()] { p->Receive(); });
  return r;
}

void Resolver::Stop() noexcept {
  const uint64_t one = 1;
  if (stop_) (void)!::write(stop_.get(), &one, sizeof one);
}

Resolver::~Resolver() {
  Stop();
  if (receiver_.joinable()) receiver_.join();
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void Resolver::Receive() {
  for (;;) {
    pollfd p[2] = {{sock_.get(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (p[1].revents != 0) return;
    Query query;
    query.packet.resize(kMaxUdp * 8);
    query.from_len = sizeof query.from;
    const ssize_t n = ::recvfrom(sock_.get(), query.packet.data(), query.packet.size(), MSG_DONTWAIT,
                                 reinterpret_cast<sockaddr*>(&query.from), &query.from_len);
    if (n < 0) continue;
    query.packet.resize(static_cast<size_t>(n));
    counters_.queries.fetch_add(1, std::memory_order_relaxed);
    // The workers start with the first query: most groups never look a name up, and
    // each thread costs the group's start and end a wake-up.
    if (workers_.empty()) {
      try {
        for (int i = 0; i < kWorkers; ++i) workers_.emplace_back([this] { Work(); });
      } catch (const std::system_error& e) {
        Logger("net")->error("group {}: resolver: cannot start its workers: {}", group_, e.what());
        if (workers_.empty()) continue;  // the query goes unanswered; the asker retries
      }
    }
    std::lock_guard lock(mu_);
    if (queue_.size() < 1024) queue_.push_back(std::move(query));  // beyond: dropped, as a busy server would
    cv_.notify_one();
  }
}

void Resolver::Work() {
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (stopping_) return;
    Query query = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    try {
      uint16_t port = 0;  // the asker's, which names its process (the socket is IPv4)
      if (query.from.ss_family == AF_INET) port = ntohs(reinterpret_cast<const sockaddr_in*>(&query.from)->sin_port);
      const pid_t asker = port == 0 ? 0 : askers_.Find(port);
      auto answer = AnswerDnsQuery(query.packet, [this, asker](const std::string& name, uint16_t qtype) {
        return Lookup(name, qtype, asker);
      });
      if (answer) {
        (void)::sendto(sock_.get(), answer->data(), answer->size(), MSG_DONTWAIT,
                       reinterpret_cast<sockaddr*>(&query.from), query.from_len);
      }
    } catch (const std::exception& e) {
      Logger("net")->error("group {}: resolver: {}", group_, e.what());
    }
    lock.lock();
  }
}

DnsAnswer Resolver::Lookup(const std::string& name, uint16_t qtype, pid_t asker) {
  DnsAnswer a;
  const int family = qtype == kTypeAAAA ? AF_INET6 : AF_INET;
  LogEntry e{.pid = asker, .call = "resolve", .name = name};
  // A label may hold any byte on the wire, but the host's lookup reads the name up to
  // a NUL: "target\0.allowed.example" matched a rule on *.allowed.example and looked up
  // `target`, whose addresses that rule then admitted. Only a host name is looked up.
  if (!IsHostName(name)) {
    counters_.refused.fetch_add(1, std::memory_order_relaxed);
    a.rcode = 3;
    if (qtype == kTypeA) {
      e.verdict = "deny";
      e.rule = "not a host name";
      log_.Write(e);
      Logger("net")->info("group {}: denied a name that is no host name ({} bytes)", group_, name.size());
    }
    return a;
  }
  const Decision d = rules_.DecideName(name);
  // A name no rule names, where no rule admits an address by itself, could lead
  // nowhere: it is not looked up on the host, whose query would carry it to the name
  // servers of a domain the group chose (data in the name), past rules that allow
  // nothing. It is refused by net_default.
  const bool leads_nowhere = d.rule < 0 && !hosts_.contains(name) && !rules_.ReachesAddresses();
  if (!d.allowed() || leads_nowhere) {
    counters_.refused.fetch_add(1, std::memory_order_relaxed);
    a.rcode = 3;
    if (qtype == kTypeA) {
      e.verdict = "deny";
      e.rule = rules_.Describe(d.rule);
      log_.Write(e);
      Logger("net")->info("group {}: denied the name {} by {}", group_, name, e.rule);
    }
    return a;
  }
  std::vector<std::string> texts;
  if (auto it = hosts_.find(name); it != hosts_.end()) {
    bool any = false;
    for (const std::string& text : it->second) {
      std::vector<uint8_t> bytes(16);
      const int f = text.find(':') != std::string::npos ? AF_INET6 : AF_INET;
      if (::inet_pton(f, text.c_str(), bytes.data()) != 1) continue;
      any = true;
      if (f != family) continue;
      bytes.resize(f == AF_INET ? 4 : 16);
      a.addresses.push_back(bytes);
      texts.push_back(text);
    }
    if (!any) a.rcode = 3;
  } else if (qtype == kTypeA || qtype == kTypeAAAA) {
    addrinfo hints{};
    hints.ai_family = family;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* list = nullptr;
    const int rc = ::getaddrinfo(name.c_str(), nullptr, &hints, &list);
    if (rc == 0) {
      for (addrinfo* ai = list; ai != nullptr; ai = ai->ai_next) {
        std::vector<uint8_t> bytes;
        char text[INET6_ADDRSTRLEN] = "";
        if (ai->ai_family == AF_INET) {
          auto* in = reinterpret_cast<sockaddr_in*>(ai->ai_addr);
          bytes.assign(reinterpret_cast<uint8_t*>(&in->sin_addr), reinterpret_cast<uint8_t*>(&in->sin_addr) + 4);
          ::inet_ntop(AF_INET, &in->sin_addr, text, sizeof text);
        } else if (ai->ai_family == AF_INET6) {
          auto* in6 = reinterpret_cast<sockaddr_in6*>(ai->ai_addr);
          bytes.assign(reinterpret_cast<uint8_t*>(&in6->sin6_addr), reinterpret_cast<uint8_t*>(&in6->sin6_addr) + 16);
          ::inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
        }
        if (bytes.empty() || std::find(a.addresses.begin(), a.addresses.end(), bytes) != a.addresses.end()) continue;
        a.addresses.push_back(bytes);
        texts.push_back(text);
      }
      ::freeaddrinfo(list);
    } else if (rc == EAI_NONAME) {
      a.rcode = 3;
    } else if (rc != EAI_NODATA && rc != EAI_ADDRFAMILY) {
      a.rcode = 2;
    }
  }
  for (const auto& bytes : a.addresses) {
    Endpoint ep;
    ep.family = bytes.size() == 4 ? AF_INET : AF_INET6;
    std::copy(bytes.begin(), bytes.end(), ep.addr.begin());
    names_.Remember(name, ep);
  }
  // One line per answer worth reading: what a name gave, or (once, for A) that it gave nothing.
  if (!a.addresses.empty() || (qtype == kTypeA && a.rcode != 0)) {
    e.addresses = texts;
    e.verdict = a.rcode == 0 ? std::string(ActionName(d.action)) : (a.rcode == 3 ? "nxdomain" : "servfail");
    e.rule = d.rule >= 0 ? rules_.Describe(d.rule) : (hosts_.contains(name) ? "hosts" : "resolver");
    log_.Write(e);
  }
  return a;
}

}  // namespace ulsp::net
