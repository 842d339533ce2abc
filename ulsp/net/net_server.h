// NetServer: the networking ULSP of one group. It serves the NetMessages the seccomp
// shim makes of the group's networking calls: it decides each by the group's rules,
// logs the decision, and performs what it allows itself, in its own network
// namespace, so the kernel never re-reads the caller's memory for a decision.
//
// How each call is served (docs/groups.md has the table):
//  - socket (TCP, UDP): the ULSP makes the socket, in its own network namespace, and
//    hands it to the caller (ADDFD with SEND). Everything that leads out of it comes
//    back here: connect, addressed sends, bind, listen.
//  - connect, and sendto/sendmsg with MSG_FASTOPEN: decided; an allowed one is made on
//    the caller's own socket (a pidfd_getfd duplicate), to the address copied once;
//    the data then flows natively. A denied one fails with EACCES.
//  - sendto/sendmsg/sendmmsg with addresses: each datagram is decided and sent by the
//    ULSP from the caller's socket (the bytes were copied out of the caller once).
//  - bind: without a `call = "bind"` rule the socket is swapped (ADDFD with SETFD) for
//    one made in the group's network namespace, reachable from the group only; with
//    an allowing rule it is bound on the host. listen on an unbound socket: swapped
//    the same way first.
//  - UNIX sockets: bind, connect and send act with the caller's root, directory and
//    credentials (caller_fs.h); connecting to a path is allowed when the group bound
//    it or a `proto = "unix"` rule allows it. Abstract names live in the group's own
//    namespace.
//  - socket of other kinds: UNIX, NETLINK, raw and ICMP run inside the group; other
//    families fail with EAFNOSUPPORT, SCTP with EPROTONOSUPPORT. socketpair, accept
//    and setsockopt run as they are (no pointer argument carries a decision).
//  - loopback = "group": 127.0.0.0/8 and ::1 stay in the group's namespace (the socket
//    is swapped for one made there). The group's resolver (127.0.0.53:53,
//    resolver.h) is always reached there.
//
// Thread-safety: Serve runs on many threads at once (one per notification in flight);
// a slow connect blocks only its own thread.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "kernel/msgport/net_message.h"
#include "kernel/msgport/port.h"
#include "ulsp/net/caller_fs.h"
#include "ulsp/net/conn_log.h"
#include "ulsp/net/names.h"
#include "ulsp/net/resolver.h"
#include "ulsp/net/rules.h"

namespace ulsp::net {

struct NetConfig {
  std::string group;
  RuleSet rules;
  bool loopback_group = false;
  UniqueFd group_netns;  // /proc/PID/ns/net of the group, for sockets made inside it
};

class NetServer final : public msgport::Server {
 public:
  struct Counters {
    std::atomic<uint64_t> allowed{0};
    std::atomic<uint64_t> denied{0};
    std::atomic<uint64_t> logged{0};  // allowed by a `log` rule
    std::atomic<uint64_t> kept{0};    // stayed inside the group
    std::atomic<uint64_t> served{0};
  };

  // `log`, `names` and `askers` must outlive the server.
  NetServer(NetConfig config, ConnLog& log, NameMemory& names, Askers& askers);

  void Serve(msgport::MessagePtr msg) noexcept override;

  const Counters& counters() const noexcept { return counters_; }
  const NetConfig& config() const noexcept { return config_; }

 private:
  void ServeRequest(msgport::NetRequest& q);
  void Connect(msgport::NetRequest& q);
  void Bind(msgport::NetRequest& q);
  void Listen(msgport::NetRequest& q);
  void Send(msgport::NetRequest& q);
  void ConnectUnix(msgport::NetRequest& q);
  void ConnectAsCallerIds(msgport::NetRequest& q, const std::vector<char>& name,
                          CallerIds::What what = CallerIds::What::kIdsAndCapabilities);
  void BindUnix(msgport::NetRequest& q);

  // Records a decision (log, counters). `verdict` "allow", "deny", "log" or "group".
  void Note(const msgport::NetRequest& q, LogEntry e);
  // `fd`, connected to or about to send to the group's resolver, asks for the
  // caller's process: noted by its local port (bound now if it is not yet), for the
  // resolver's log lines. Only with a log.
  void NoteAsker(const msgport::NetRequest& q, int fd);
  // Records a raw or ICMP socket's call to `to`: kept in the group (`in_group`), or
  // denied, being from outside it.
  void NoteKeptInGroup(const msgport::NetRequest& q, const Endpoint& to, bool in_group);
  // A socket like the caller's, in the ULSP's namespace (or the group's with
  // `in_group`), with its options and its bound port. One that binds on the host
  // (`group_owned`, for a bind; or to keep the caller's port) is owned by the group's
  // own uid, and a UDP one without SO_REUSEADDR. Errno on failure.
  Result<UniqueFd> SocketLike(const msgport::NetRequest& q, bool in_group, bool group_owned = false);
  // A UNIX socket path as the caller's call would find it (its root, directory and
  // credentials), pinned by a descriptor so nothing can swap it before the call.
  struct UnixTarget {
    int error = 0;           // what the caller's own call would fail with (ENOENT, EACCES)
    UniqueFd fd;             // O_PATH
    std::vector<char> name;  // a sockaddr_un naming the descriptor
    std::string shown;       // the absolute path, for rules and the log
    bool is_socket = false;
    bool bound = false;      // the group bound it
  };
  UnixTarget OpenUnixTarget(const msgport::NetRequest& q, const std::string& path);
  LogEntry DecideUnix(const UnixTarget& t);
  // Whether a UNIX socket inode was bound by the group.
  bool BoundByGroup(dev_t dev, ino_t ino);

  NetConfig config_;
  ConnLog& log_;
  NameMemory& names_;
  Askers& askers_;
  Counters counters_;
  std::mutex bound_mu_;
  std::set<std::pair<dev_t, ino_t>> bound_;  // UNIX socket files the group made
};

}  // namespace ulsp::net
