#include "ulsp/net/net_server.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <optional>
#include <tuple>

#include "kernel/msgport/host_port.h"
#include "kernel/msgport/log.h"
#include "ulsp/net/caller_fs.h"

namespace ulsp::net {

using msgport::NetCall;
using msgport::NetDatagram;
using msgport::NetRequest;
using msgport::NetVerdict;

namespace {

// An INET or INET6 socket this ULSP decides and may make on the host's side: TCP or
// UDP. Others (raw, ICMP, UDP-Lite) are made by the kernel in the group's namespace,
// where socket() leaves them, and stay there: moved out, a raw socket made by this
// ULSP (root) would let a group that may send UDP somewhere write any IP packet.
bool TcpOrUdp(const NetRequest& q) {
  return (q.type == SOCK_STREAM && (q.protocol == 0 || q.protocol == IPPROTO_TCP)) ||
         (q.type == SOCK_DGRAM && (q.protocol == 0 || q.protocol == IPPROTO_UDP));
}

// What the log calls such a socket.
std::string OtherInetName(const NetRequest& q) {
  if (q.protocol == IPPROTO_ICMP || q.protocol == IPPROTO_ICMPV6) return q.type == SOCK_RAW ? "raw icmp" : "icmp";
  return (q.type == SOCK_RAW ? "raw protocol " : "protocol ") + std::to_string(q.protocol);
}

// The owner of the sockets this ULSP binds on the host for its group: a uid of the
// group's own (from this ULSP's pid, in a range no account uses), not root. The
// kernel lets a socket share a port by SO_REUSEPORT only with sockets of the same
// owner, so a group that may bind a port cannot join a host service's reuseport group
// there (root's, or anyone's) and take its connections, nor another group's. (Only an
// explicit bind can share a port: the kernel's own choice of one, for a connect, a
// send or a listen, never does.)
uid_t GroupSocketOwner() {
  static const uid_t owner = 0x7f000000u + static_cast<uid_t>(::getpid());
  return owner;
}

// socket(2), owned by the group (GroupSocketOwner): the kernel takes a socket's owner
// from the file-system uid of the thread that makes it. setfsuid is per thread (the
// system call; glibc's wrapper would change every thread), and a pair of them costs
// 3.1 µs here (each makes a new set of credentials): for binds, not for every socket.
int GroupSocket(int family, int type, int protocol) {
  const auto own = static_cast<uid_t>(::syscall(SYS_setfsuid, GroupSocketOwner()));
  const int fd = ::socket(family, type | SOCK_CLOEXEC, protocol);
  const int err = errno;
  ::syscall(SYS_setfsuid, own);
  errno = err;
  return fd;
}

// The errno to answer when reading the caller failed with `err`: one gone (ESRCH) is
// answered EINTR, which goes nowhere.
int CallerErrno(int err) { return err == ESRCH ? EINTR : err; }

// Makes socket `fd`, made for the caller, the caller's: the kernel takes a socket's
// owner from the file-system user of the thread that makes it, this process's, root.
// Firewall rules match it (nftables' `meta skuid`, iptables' `owner`), and so do
// routing rules (`ip rule ... uidrange`): a group's process of user 1000 sent as root,
// past a rule on user 1000. Changing the owner of a socket's inode changes the
// socket's (sockfs). 0, or the errno.
int OwnAsCaller(int fd, const NetRequest& q) {
  auto caller = ReadCallerCredentials(q.tid, q.pidfd ? q.pidfd->get() : -1);
  if (!caller) return CallerErrno(caller.error().value);
  if (caller->fsuid == ::geteuid()) return 0;
  return ::fchown(fd, caller->fsuid, static_cast<gid_t>(-1)) == 0 ? 0 : errno;
}

void Return(NetRequest& q, int64_t value) {
  q.verdict = NetVerdict::kReturn;
  q.value = value;
}
void Error(NetRequest& q, int error) {
  q.verdict = NetVerdict::kError;
  q.error = error;
}
void Continue(NetRequest& q) { q.verdict = NetVerdict::kContinue; }

bool Nonblocking(int fd) {
  const int fl = ::fcntl(fd, F_GETFL);
  return fl >= 0 && (fl & O_NONBLOCK) != 0;
}

sa_family_t FamilyOf(const std::vector<char>& addr) {
  sa_family_t f = AF_UNSPEC;
  if (addr.size() >= sizeof f) std::memcpy(&f, addr.data(), sizeof f);
  return f;
}

const sockaddr* AsSockaddr(const std::vector<char>& addr) {
  return reinterpret_cast<const sockaddr*>(addr.data());  // NOLINT: bytes of a sockaddr
}

// Binds `fd` to the caller's address with the caller's capabilities (CallerIds): the
// kernel asks CAP_NET_BIND_SERVICE of whoever binds a port below 1024 (and
// CAP_NET_ADMIN of a netlink socket joining most multicast groups), and a group's
// process of user 1000 bound port 80, on the host by a bind rule as inside the group,
// with the ULSP's. 0, or the errno.
int BindAsCaller(int fd, const NetRequest& q) {
  auto ids = CallerIds::Enter(q.tid, CallerIds::What::kCapabilities);
  if (!ids) return CallerErrno(ids.error().value);
  return ::bind(fd, AsSockaddr(q.addr), static_cast<socklen_t>(q.addr.size())) == 0 ? 0 : errno;
}

bool IsResolver(const Endpoint& e) {
  auto v4 = e.V4();
  return v4 && std::equal(v4->begin(), v4->end(), kResolverV4) && e.port == kResolverPort;
}

// Waits until `fd` is writable, asking now and then whether the caller still waits.
// 0 when writable; EINTR when the caller is gone; ETIMEDOUT after `limit` (0: none).
int WaitWritable(int fd, const NetRequest& q, std::chrono::milliseconds limit) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    pollfd p{fd, POLLOUT, 0};
    const int r = ::poll(&p, 1, 100);
    if (r > 0) return 0;
    if (r < 0 && errno != EINTR) return errno;
    if (q.still_waiting && !q.still_waiting()) return EINTR;
    if (limit.count() > 0 && std::chrono::steady_clock::now() - start >= limit) return ETIMEDOUT;
  }
}

// The caller's SO_SNDTIMEO as it is (zero, none, when it cannot be read).
timeval SendTimeoutOf(int fd) {
  timeval tv{};
  socklen_t len = sizeof tv;
  if (::getsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, &len) != 0) return timeval{};
  return tv;
}

// The same in milliseconds (0: none): how long its blocking connect or send waits.
std::chrono::milliseconds SendTimeout(int fd) {
  const timeval tv = SendTimeoutOf(fd);
  return std::chrono::milliseconds(tv.tv_sec * 1000 + tv.tv_usec / 1000);
}

// Connects `fd` as a caller's connect would, `caller` being the caller's SO_SNDTIMEO
// (zero: none) and fd's O_NONBLOCK the caller's: a non-blocking one answers at once
// (EINPROGRESS); a blocking one waits here at most 100 ms (SO_SNDTIMEO bounds it,
// and is `caller` again right after), where a loopback or LAN handshake ends, in
// three system calls besides the connect's own; a slower one then waits in a poll
// loop that notices when the caller is gone, up to `caller`. Past it the answer is
// EINPROGRESS, as the kernel's. Returns 0, EINPROGRESS or an errno.
int ConnectAsCaller(int fd, const std::vector<char>& addr, const NetRequest& q, const timeval& caller) {
  using std::chrono::microseconds;
  const microseconds limit = std::chrono::seconds(caller.tv_sec) + microseconds(caller.tv_usec);  // 0: none
  const microseconds first = limit.count() > 0 ? std::min<microseconds>(limit, std::chrono::milliseconds(100))
                                               : std::chrono::milliseconds(100);
  const timeval bound{static_cast<time_t>(first.count() / 1000000), static_cast<suseconds_t>(first.count() % 1000000)};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &bound, sizeof bound);
  const int r = ::connect(fd, AsSockaddr(addr), static_cast<socklen_t>(addr.size())) == 0 ? 0 : errno;
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &caller, sizeof caller);
  // EINPROGRESS: the file is non-blocking (that is the answer), or the bound passed;
  // EINTR: a signal to this thread cut the wait short.
  if (r != EINPROGRESS && r != EINTR) return r;
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return errno;
  if (flags & O_NONBLOCK) return EINPROGRESS;
  if (limit.count() > 0 && limit <= first) return EINPROGRESS;  // the caller's own timeout passed
  const auto rest = limit.count() > 0
                        ? std::max(std::chrono::duration_cast<std::chrono::milliseconds>(limit - first), std::chrono::milliseconds(1))
                        : std::chrono::milliseconds(0);
  const int w = WaitWritable(fd, q, rest);
  if (w == ETIMEDOUT) return EINPROGRESS;
  if (w != 0) return w;
  int err = 0;
  socklen_t len = sizeof err;
  return ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 ? errno : err;
}

// Connects the ULSP's socket `fd`, made to take the place of the caller's `caller_fd`,
// as the caller's connect would (its O_NONBLOCK and SO_SNDTIMEO carried over).
int ConnectOn(int fd, const std::vector<char>& addr, const NetRequest& q, int caller_fd) {
  if (Nonblocking(caller_fd)) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  return ConnectAsCaller(fd, addr, q, SendTimeoutOf(caller_fd));
}

// Connects the caller's own socket (shared with the caller through a duplicate).
int ConnectShared(int fd, const NetRequest& q) { return ConnectAsCaller(fd, q.addr, q, SendTimeoutOf(fd)); }

// The socket options a connection carries over to the ULSP's socket: those programs
// set before they connect. Each is read from the caller's socket and set on ours
// only when it differs from a fresh socket's value (cached per kind of socket), so a
// connect pays about one getsockopt per option.
struct Option {
  int level, name;
  enum { kAll, kStream, kDatagram } applies;
};
constexpr Option kOptions[] = {
    {SOL_SOCKET, SO_REUSEADDR, Option::kAll},      {SOL_SOCKET, SO_REUSEPORT, Option::kAll},
    {SOL_SOCKET, SO_KEEPALIVE, Option::kStream},   {SOL_SOCKET, SO_BROADCAST, Option::kDatagram},
    {SOL_SOCKET, SO_TIMESTAMP, Option::kDatagram}, {SOL_SOCKET, SO_RCVBUF, Option::kAll},
    {SOL_SOCKET, SO_SNDBUF, Option::kAll},         {IPPROTO_TCP, TCP_NODELAY, Option::kStream},
};
constexpr Option kV4Options[] = {{IPPROTO_IP, IP_RECVERR, Option::kDatagram}, {IPPROTO_IP, IP_PKTINFO, Option::kDatagram}};
constexpr Option kV6Options[] = {{IPPROTO_IPV6, IPV6_V6ONLY, Option::kAll},
                                 {IPPROTO_IPV6, IPV6_RECVERR, Option::kDatagram},
                                 {IPPROTO_IPV6, IPV6_RECVPKTINFO, Option::kDatagram}};
// Set only when SO_KEEPALIVE is on.
constexpr Option kKeepAlive[] = {{IPPROTO_TCP, TCP_KEEPIDLE, Option::kStream},
                                 {IPPROTO_TCP, TCP_KEEPINTVL, Option::kStream},
                                 {IPPROTO_TCP, TCP_KEEPCNT, Option::kStream}};

// A fresh socket's value of each option, per (family, type, protocol).
class FreshValues {
 public:
  int Get(int family, int type, int protocol, const Option& o) {
    const Key key{family, type, protocol, o.level, o.name};
    {
      std::lock_guard lock(mu_);
      if (auto it = values_.find(key); it != values_.end()) return it->second;
    }
    int v = -1;
    UniqueFd s(::socket(family, type | SOCK_CLOEXEC, protocol));
    socklen_t len = sizeof v;
    if (s) (void)::getsockopt(s.get(), o.level, o.name, &v, &len);
    std::lock_guard lock(mu_);
    values_[key] = v;
    return v;
  }

 private:
  using Key = std::tuple<int, int, int, int, int>;
  std::mutex mu_;
  std::map<Key, int> values_;
};

FreshValues& Fresh() {
  static FreshValues values;
  return values;
}

void CopyOptions(const NetRequest& q, int to) {
  const int from = q.socket.get();
  const bool stream = q.type == SOCK_STREAM;
  bool keepalive = false;
  auto copy = [&](const Option& o) {
    if ((o.applies == Option::kStream && !stream) || (o.applies == Option::kDatagram && stream)) return;
    int v = 0;
    socklen_t len = sizeof v;
    if (::getsockopt(from, o.level, o.name, &v, &len) != 0) return;
    if (o.level == SOL_SOCKET && o.name == SO_KEEPALIVE) keepalive = v != 0;
    if (v == Fresh().Get(q.family, q.type, q.protocol, o)) return;
    if (o.level == SOL_SOCKET && (o.name == SO_RCVBUF || o.name == SO_SNDBUF)) v /= 2;  // Linux reports double
    (void)::setsockopt(to, o.level, o.name, &v, sizeof v);
  };
  for (const auto& o : kOptions) copy(o);
  if (q.family == AF_INET) {
    for (const auto& o : kV4Options) copy(o);
  } else {
    for (const auto& o : kV6Options) copy(o);
  }
  if (keepalive) {
    for (const auto& o : kKeepAlive) copy(o);
  }
  timeval tv{};
  socklen_t len = sizeof tv;
  if (::getsockopt(from, SOL_SOCKET, SO_RCVTIMEO, &tv, &len) == 0 && (tv.tv_sec != 0 || tv.tv_usec != 0))
    (void)::setsockopt(to, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  linger l{};
  len = sizeof l;
  if (::getsockopt(from, SOL_SOCKET, SO_LINGER, &l, &len) == 0 && l.l_onoff != 0)
    (void)::setsockopt(to, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

// Calls `fn` on each control message of `control` while it returns true. False when
// one is cut short or runs past the end, which the kernel refuses (EINVAL).
template <typename Fn>
bool ForEachCmsg(std::vector<char>& control, Fn fn) {
  if (control.empty()) return true;
  msghdr h{};
  h.msg_control = control.data();
  h.msg_controllen = control.size();
  for (cmsghdr* c = CMSG_FIRSTHDR(&h); c != nullptr; c = CMSG_NXTHDR(&h, c)) {
    if (c->cmsg_len < CMSG_LEN(0) || c->cmsg_len > control.size()) return false;
    if (!fn(c)) break;
  }
  return true;
}

constexpr int kScmTsOptId = 81;        // SCM_TS_OPT_ID (Linux 6.13), newer than our headers
constexpr int kTlsSetRecordType = 1;   // TLS_SET_RECORD_TYPE (linux/tls.h)

// Why `control` may not be sent for the caller, as the rule its refusal is logged
// with; nullptr when it may (SCM_CREDENTIALS then renumbered: CredentialsNameCaller).
// The ULSP sends with its own privileges, so only control data whose effect needs
// none, or that is checked here as the kernel would check the caller, is sent:
// descriptors (SCM_RIGHTS, translated later), credentials, timestamping and transmit
// times, a priority of 0-6, IPv4's TTL and TOS, IPv6's hop limit, traffic class and
// don't-fragment, UDP segmentation, a kTLS record type, and packet information of
// zeros. Anything else is refused, among it:
// - an IPv6 routing header (IPV6_RTHDR, or RFC 2292's): a segment routing header sends
//   the datagram to its first segment, not to the address the rules decided on, and
//   needs no capability;
// - packet information (IP_PKTINFO, IPV6_PKTINFO) naming an interface or a source
//   address: the datagram would leave by an interface of the group's choosing (as with
//   a device bound, which the filter refuses), or from a host address it was not
//   allowed to bind;
// - what the kernel allows only with a capability a group lacks: IPv4 options
//   (IP_RETOPTS; a loose source route sent a group's datagram to an address no rule
//   allowed), IPv6 hop-by-hop and destination options, a next hop, a mark (SO_MARK,
//   which policy routing reads: a VPN exempts its own packets by one) and a priority
//   above 6.
const char* RefusedControl(std::vector<char>& control, pid_t tid) {
  auto zeros = [](const cmsghdr* c, size_t size) {
    const auto* data = reinterpret_cast<const char*>(CMSG_DATA(c));  // NOLINT: the cmsg's payload
    return c->cmsg_len < CMSG_LEN(size) || std::all_of(data, data + size, [](char b) { return b == 0; });
  };
  constexpr const char* kPrivileged = "control data that needs a privilege";
  // Why one message may not be sent; nullptr when it may.
  auto refused = [&](cmsghdr* c) -> const char* {
    const int type = c->cmsg_type;
    switch (c->cmsg_level) {
      case SOL_SOCKET:
        if (type == SCM_CREDENTIALS && c->cmsg_len >= CMSG_LEN(sizeof(ucred))) {
          ucred cred;
          std::memcpy(&cred, CMSG_DATA(c), sizeof cred);
          if (!CredentialsNameCaller(tid, cred)) return "credentials not the caller's";
          std::memcpy(CMSG_DATA(c), &cred, sizeof cred);
          return nullptr;
        }
        if (type == SO_PRIORITY && c->cmsg_len >= CMSG_LEN(sizeof(uint32_t))) {
          uint32_t priority;
          std::memcpy(&priority, CMSG_DATA(c), sizeof priority);
          if (priority <= 6) return nullptr;  // TC_PRIO_BESTEFFORT to TC_PRIO_INTERACTIVE: anyone's
          return kPrivileged;
        }
        if (type == SCM_RIGHTS || type == SCM_CREDENTIALS || type == SO_TIMESTAMPING_OLD ||
            type == SO_TIMESTAMPING_NEW || type == SCM_TXTIME || type == kScmTsOptId)
          return nullptr;
        return kPrivileged;
      case IPPROTO_IP:
        if (type == IP_TTL || type == IP_TOS) return nullptr;
        if (type == IP_PKTINFO) {
          if (zeros(c, sizeof(in_pktinfo))) return nullptr;
          return "an interface or source address per datagram";
        }
        return kPrivileged;
      case IPPROTO_IPV6:
        if (type == IPV6_HOPLIMIT || type == IPV6_2292HOPLIMIT || type == IPV6_TCLASS || type == IPV6_DONTFRAG)
          return nullptr;
        if (type == IPV6_RTHDR || type == IPV6_2292RTHDR) return "IPv6 routing headers";
        if (type == IPV6_PKTINFO || type == IPV6_2292PKTINFO) {
          if (zeros(c, sizeof(in6_pktinfo))) return nullptr;
          return "an interface or source address per datagram";
        }
        return kPrivileged;
      case IPPROTO_UDP:
        if (type == UDP_SEGMENT) return nullptr;
        return kPrivileged;
      case SOL_TLS:
        if (type == kTlsSetRecordType) return nullptr;
        return kPrivileged;
      default:
        return kPrivileged;
    }
  };
  const char* why = nullptr;
  ForEachCmsg(control, [&](cmsghdr* c) { return (why = refused(c)) == nullptr; });
  return why;  // one cut short is left for the kernel to refuse (EINVAL)
}

// Whether a datagram for a UNIX socket must be given its sender's credentials: its
// control data carries none (and is well formed: the kernel refuses one that is
// not). Without them the kernel would tell a receiver that asks (SO_PASSCRED) this
// process and its user, root, instead of the caller.
bool LacksCredentials(std::vector<char>& control) {
  bool given = false;
  return ForEachCmsg(control, [&](cmsghdr* c) {
           given = c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS;
           return !given;
         }) &&
         !given;
}

// Appends `caller`'s credentials (SCM_CREDENTIALS) to `control`.
void AddCredentials(std::vector<char>& control, const CallerCredentials& caller) {
  const ucred cred{caller.tgid, caller.ruid, caller.rgid};
  const size_t at = CMSG_ALIGN(control.size());
  control.resize(at + CMSG_SPACE(sizeof(ucred)), 0);
  cmsghdr c{};
  c.cmsg_len = CMSG_LEN(sizeof(ucred));
  c.cmsg_level = SOL_SOCKET;
  c.cmsg_type = SCM_CREDENTIALS;
  std::memcpy(control.data() + at, &c, sizeof c);
  std::memcpy(control.data() + at + CMSG_LEN(0), &cred, sizeof cred);
}

// Rewrites SCM_RIGHTS descriptors (the caller's numbers) into ours, kept in `held`.
int TranslateRights(std::vector<char>& control, int pidfd, std::vector<UniqueFd>& held) {
  int err = 0;
  if (!ForEachCmsg(control, [&](cmsghdr* c) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) return true;
        const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        auto* fds = reinterpret_cast<int*>(CMSG_DATA(c));  // NOLINT: the cmsg's payload
        for (size_t i = 0; i < count; ++i) {
          int theirs;
          std::memcpy(&theirs, fds + i, sizeof theirs);
          const long ours = ::syscall(SYS_pidfd_getfd, pidfd, theirs, 0);
          if (ours < 0) {
            err = EBADF;
            return false;
          }
          held.emplace_back(static_cast<int>(ours));
          const int v = static_cast<int>(ours);
          std::memcpy(fds + i, &v, sizeof v);
        }
        return true;
      }))
    return EINVAL;
  return err;
}

// Sends one datagram (or stream chunk) on `fd`, with `name` (or none), as the caller's
// call would: waiting when its socket blocks, raising SIGPIPE in it when the kernel
// would have. Returns the bytes sent, or -errno.
int64_t SendOn(int fd, const NetDatagram& d, const std::vector<char>* name, int flags, bool stream,
               const NetRequest& q, std::vector<char>& control) {
  std::vector<UniqueFd> held;
  if (int err = TranslateRights(control, q.pidfd ? q.pidfd->get() : -1, held)) return -err;
  const bool wait = !(flags & MSG_DONTWAIT) && !Nonblocking(fd);
  const auto timeout = wait ? SendTimeout(fd) : std::chrono::milliseconds(0);
  size_t sent = 0;
  for (;;) {
    iovec iov{const_cast<char*>(d.data.data()) + sent, d.data.size() - sent};
    msghdr h{};
    if (name != nullptr && !name->empty()) {
      h.msg_name = const_cast<char*>(name->data());
      h.msg_namelen = static_cast<socklen_t>(name->size());
    }
    h.msg_iov = &iov;
    h.msg_iovlen = 1;
    if (sent == 0 && !control.empty()) {
      h.msg_control = control.data();
      h.msg_controllen = control.size();
    }
    const ssize_t n = ::sendmsg(fd, &h, (flags & ~MSG_FASTOPEN) | MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n >= 0) {
      sent += static_cast<size_t>(n);
      if (!stream || !wait || sent >= d.data.size()) return static_cast<int64_t>(sent);
      continue;  // a blocking stream send sends everything
    }
    const int err = errno;
    if (err == EINTR) continue;
    if ((err == EAGAIN || err == EWOULDBLOCK) && wait) {
      const int w = WaitWritable(fd, q, timeout);
      if (w == 0) continue;
      if (sent > 0) return static_cast<int64_t>(sent);
      return -(w == ETIMEDOUT ? EAGAIN : w);
    }
    if (sent > 0) return static_cast<int64_t>(sent);
    if (err == EPIPE && !(flags & MSG_NOSIGNAL)) ::syscall(SYS_tgkill, q.Process(), q.tid, SIGPIPE);
    return -err;
  }
}

std::string UnixPath(const std::vector<char>& addr) {
  const size_t off = offsetof(sockaddr_un, sun_path);
  if (addr.size() <= off) return "";
  std::string p(addr.data() + off, addr.size() - off);
  if (const size_t nul = p.find('\0'); nul != std::string::npos && !p.empty() && p[0] != '\0') p.resize(nul);
  return p;
}

// Where `fd` is bound: its address (`len` bytes of `local`) and port in host order,
// 0 when it is not bound yet or cannot be read (`len` 0 then).
uint16_t BoundPort(int fd, sockaddr_storage& local, socklen_t& len) {
  len = sizeof local;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) != 0) {
    len = 0;
    return 0;
  }
  if (local.ss_family == AF_INET) return ntohs(reinterpret_cast<sockaddr_in*>(&local)->sin_port);
  if (local.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&local)->sin6_port);
  return 0;
}

// `s` takes the place of the caller's socket (SETFD), non-blocking if that one is.
void Install(NetRequest& q, UniqueFd s) {
  if (Nonblocking(q.socket.get())) ::fcntl(s.get(), F_SETFL, ::fcntl(s.get(), F_GETFL) | O_NONBLOCK);
  q.install = std::move(s);
}

}  // namespace

NetServer::NetServer(NetConfig config, ConnLog& log, NameMemory& names, Askers& askers)
    : config_(std::move(config)), log_(log), names_(names), askers_(askers) {}

void NetServer::Serve(msgport::MessagePtr msg) noexcept {
  auto& m = static_cast<msgport::NetMessage&>(*msg);
  try {
    ServeRequest(m.req);
  } catch (const std::bad_alloc&) {
    Error(m.req, ENOMEM);
  } catch (const std::exception& e) {
    Logger("net")->error("{}: serving {} failed: {}", config_.group, msgport::NetCallName(m.req.call), e.what());
    Error(m.req, EIO);
  }
  counters_.served.fetch_add(1, std::memory_order_relaxed);
  msgport::Reply(std::move(msg), 0);
}

void NetServer::Note(const NetRequest& q, LogEntry e) {
  if (log_.enabled()) e.pid = q.Process();  // a /proc read: only for the log
  if (e.call.empty()) e.call = std::string(msgport::NetCallName(q.call));
  if (e.verdict == "deny") {
    counters_.denied.fetch_add(1, std::memory_order_relaxed);
  } else if (e.verdict == "log") {
    counters_.logged.fetch_add(1, std::memory_order_relaxed);
  } else if (e.verdict == "group") {
    counters_.kept.fetch_add(1, std::memory_order_relaxed);
  } else {
    counters_.allowed.fetch_add(1, std::memory_order_relaxed);
  }
  if (e.verdict == "deny" || e.verdict == "log") {
    // "denied udp connect [::1]:53 (localhost) by net_default": the protocol, since a
    // rule may admit TCP to an address and not UDP (glibc probes with UDP connects).
    const std::string where = e.path.empty() ? msgport::JoinHostPort(e.address, e.port) : e.path;
    Logger("net")->info("group {}: {} {}{}{} {}{} by {}", config_.group, e.verdict == "deny" ? "denied" : "logged", e.proto,
                        e.proto.empty() ? "" : " ", e.call, where, e.name.empty() ? "" : " (" + e.name + ")", e.rule);
  }
  log_.Write(e);
}

void NetServer::NoteAsker(const NetRequest& q, int fd) {
  if (!log_.enabled()) return;
  sockaddr_storage local{};
  socklen_t len = 0;
  uint16_t port = BoundPort(fd, local, len);
  if (port == 0 && len != 0) {  // a send would bind it: bound here, as that would, to know the port
    sockaddr_storage any{};
    any.ss_family = local.ss_family;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&any), len) != 0) return;
    port = BoundPort(fd, local, len);
  }
  if (port != 0) askers_.Note(port, q.Process());
}

void NetServer::ServeRequest(NetRequest& q) {
  if (q.fd_error != 0) return Error(q, q.fd_error);
  if (q.copy_error != 0) return Error(q, q.copy_error);
  switch (q.call) {
    case NetCall::kSocket: {
      const int family = static_cast<int>(q.args[0]);
      const int protocol = static_cast<int>(q.args[2]);
      if (family != AF_UNIX && family != AF_INET && family != AF_INET6 && family != AF_NETLINK) {
        // AF_VSOCK would reach the hypervisor, AF_PACKET and others the wire.
        Note(q, {.call = "socket", .proto = "family " + std::to_string(family), .verdict = "deny", .rule = "families"});
        return Error(q, EAFNOSUPPORT);
      }
      if ((family == AF_INET || family == AF_INET6) && (protocol == IPPROTO_SCTP || protocol == IPPROTO_MPTCP)) {
        // SCTP carries addresses in its sends and options, MPTCP opens subflows to the
        // addresses its peer announces: both past this ULSP's checks. (Programs that
        // ask for MPTCP fall back to TCP on this error.)
        Note(q, {.call = "socket", .proto = protocol == IPPROTO_SCTP ? "sctp" : "mptcp", .verdict = "deny",
                 .rule = "protocols"});
        return Error(q, EPROTONOSUPPORT);
      }
      const int base_type = static_cast<int>(q.args[1]) & 0xf;  // SOCK_TYPE_MASK
      const bool tcp = base_type == SOCK_STREAM && (protocol == 0 || protocol == IPPROTO_TCP);
      const bool udp = base_type == SOCK_DGRAM && (protocol == 0 || protocol == IPPROTO_UDP);
      if ((family == AF_INET || family == AF_INET6) && (tcp || udp)) {
        // TCP and UDP sockets are made here, in the ULSP's namespace, and handed over:
        // every way out of them (connect, addressed sends, bind, listen) comes back
        // here to be decided, and an allowed connect then needs no socket swapped in.
        const int type = static_cast<int>(q.args[1]);
        const int fd = ::socket(family, type | SOCK_CLOEXEC, protocol);
        if (fd < 0) return Error(q, errno);  // what the kernel says of these arguments
        q.install.Reset(fd);
        if (const int err = OwnAsCaller(fd, q); err != 0) return Error(q, err);
        // What SO_DOMAIN, SO_TYPE and SO_PROTOCOL say of it, for the shim to keep.
        q.family = family;
        q.type = base_type;
        q.protocol = tcp ? IPPROTO_TCP : IPPROTO_UDP;
        q.host_netns = true;
        q.verdict = NetVerdict::kNewFd;
        q.value = (type & SOCK_CLOEXEC) ? 1 : 0;
        return;
      }
      return Continue(q);  // UNIX, NETLINK, raw and ICMP sockets: inside the group
    }
    case NetCall::kListen:
      return Listen(q);
    case NetCall::kSocketPair:
    case NetCall::kAccept:
    case NetCall::kAccept4:
    case NetCall::kSetSockOpt:
      return Continue(q);  // no pointer argument carries a decision
    case NetCall::kConnect:
      return Connect(q);
    case NetCall::kBind:
      return Bind(q);
    case NetCall::kSendTo:
    case NetCall::kSendMsg:
    case NetCall::kSendMmsg:
      return Send(q);
    case NetCall::kCount:
      break;
  }
  Error(q, ENOSYS);
}

Result<UniqueFd> NetServer::SocketLike(const NetRequest& q, bool in_group, bool group_owned) {
  UniqueFd own_ns;
  if (in_group) {
    auto self = Sys([] { return ::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC); });
    if (!self) return std::unexpected(self.error());
    own_ns.Reset(*self);
    if (auto r = Sys([&] { return ::setns(config_.group_netns.get(), CLONE_NEWNET); }); !r) return std::unexpected(r.error());
  }
  // A port the caller bound goes with it (best effort: it may be taken on this side).
  // On the host it is bound as a bind rule's would be: by a socket the group owns.
  sockaddr_storage local{};
  socklen_t len = 0;
  const uint16_t port = BoundPort(q.socket.get(), local, len);
  const bool owned = !in_group && (group_owned || port != 0);
  const int fd = owned ? GroupSocket(q.family, q.type, q.protocol) : ::socket(q.family, q.type | SOCK_CLOEXEC, q.protocol);
  const int err = errno;
  if (in_group && ::setns(own_ns.get(), CLONE_NEWNET) != 0) {
    // This thread would stay in the group's namespace: never let it serve again.
    Logger("net")->critical("cannot return to the ULSP's network namespace: {}", std::strerror(errno));
    std::abort();
  }
  if (fd < 0) return Fail(err);
  UniqueFd s(fd);
  if (!owned) {
    if (const int e = OwnAsCaller(s.get(), q); e != 0) return Fail(e);
  }
  CopyOptions(q, s.get());
  // A UDP socket with SO_REUSEADDR shares its port with any other that has it, whoever
  // owns it, and takes datagrams meant for it: one the group binds on the host does not.
  const int no = 0;
  if (owned && q.type == SOCK_DGRAM) (void)::setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &no, sizeof no);
  if (port != 0) {
    sockaddr_storage any{};
    any.ss_family = local.ss_family;
    if (local.ss_family == AF_INET) reinterpret_cast<sockaddr_in*>(&any)->sin_port = htons(port);
    if (local.ss_family == AF_INET6) reinterpret_cast<sockaddr_in6*>(&any)->sin6_port = htons(port);
    if (::bind(s.get(), reinterpret_cast<sockaddr*>(&any), len) != 0)
      Logger("net")->debug("group {}: could not keep local port {}: {}", config_.group, port, std::strerror(errno));
  }
  return s;
}

void NetServer::NoteKeptInGroup(const NetRequest& q, const Endpoint& to, bool in_group) {
  Note(q, {.proto = OtherInetName(q), .address = to.AddressString(), .port = to.port,
           .verdict = in_group ? "group" : "deny", .rule = "raw and ICMP sockets stay in the group"});
}

bool NetServer::BoundByGroup(dev_t dev, ino_t ino) {
  std::lock_guard lock(bound_mu_);
  return bound_.contains({dev, ino});
}

void NetServer::Connect(NetRequest& q) {
  if (q.family == AF_UNIX) return ConnectUnix(q);
  const int dup = q.socket.get();
  auto on_dup = [&] {
    const int r = ::connect(dup, AsSockaddr(q.addr), static_cast<socklen_t>(q.addr.size()));
    if (r == 0) return Return(q, 0);
    Error(q, errno);
  };
  if (q.family != AF_INET && q.family != AF_INET6) {
    // Netlink and the like: inside the group they reach nothing outside it; what the
    // kernel allows there is what it allows the caller (a netlink group to listen to).
    if (q.host_netns) {
      Note(q, {.proto = "family " + std::to_string(q.family), .verdict = "deny", .rule = "a socket from outside the group"});
      return Error(q, EACCES);
    }
    return ConnectAsCallerIds(q, q.addr, CallerIds::What::kCapabilities);
  }
  if (FamilyOf(q.addr) == AF_UNSPEC && q.addr.size() >= sizeof(sa_family_t)) return on_dup();  // dissolves
  auto ep = Endpoint::FromSockaddr(q.addr.data(), q.addr.size());
  if (!ep) return Error(q, ep.error());
  if (!TcpOrUdp(q)) {  // raw and ICMP: where the socket is, in the group's namespace
    NoteKeptInGroup(q, *ep, !q.host_netns);
    return q.host_netns ? Error(q, EACCES) : on_dup();
  }
  const bool stream = q.type == SOCK_STREAM;
  const std::string proto = stream ? "tcp" : "udp";
  LogEntry e{.proto = proto, .address = ep->AddressString(), .port = ep->port};
  *ep = ep->Reached();  // 0.0.0.0 and :: mean the loopback: decided as 127.0.0.1 and ::1

  const bool resolver = IsResolver(*ep);
  if (resolver || (config_.loopback_group && ep->IsLoopback())) {
    if (!resolver) Note(q, [&] { auto x = e; x.verdict = "group"; x.rule = "loopback = \"group\""; return x; }());
    if (!q.host_netns) {
      on_dup();
      if (resolver && !stream && q.verdict == NetVerdict::kReturn) NoteAsker(q, dup);
      return;
    }
    auto s = SocketLike(q, /*in_group=*/true);  // a host socket: one of the group's replaces it
    if (!s) return Error(q, s.error().value);
    const int r = ConnectOn(s->get(), q.addr, q, dup);
    if (r != 0 && r != EINPROGRESS) return Error(q, r);
    if (resolver && !stream) NoteAsker(q, s->get());
    q.install = std::move(*s);
    return r == 0 ? Return(q, 0) : Error(q, r);
  }

  const Decision d = config_.rules.Decide(Call::kConnect, stream ? Proto::kTcp : Proto::kUdp, *ep, names_.NamesOf(*ep));
  e.name = d.name;
  e.verdict = std::string(ActionName(d.action));
  e.rule = config_.rules.Describe(d.rule);
  Note(q, e);
  if (!d.allowed()) return Error(q, EACCES);
  if (q.host_netns) {
    // The usual case: the socket is already the ULSP's (made at socket()). Connect it
    // where it is, as the caller's own connect would.
    const int r = ConnectShared(dup, q);
    return r == 0 ? Return(q, 0) : Error(q, r);
  }
  // A socket of the group's (bound inside it): one of the ULSP's takes its place.
  if (stream) {
    sockaddr_storage peer{};
    socklen_t len = sizeof peer;
    if (::getpeername(dup, reinterpret_cast<sockaddr*>(&peer), &len) == 0) return Error(q, EISCONN);
  }
  auto s = SocketLike(q, /*in_group=*/false);
  if (!s) return Error(q, s.error().value);
  const int r = ConnectOn(s->get(), q.addr, q, dup);
  if (r != 0 && r != EINPROGRESS) return Error(q, r);
  q.install = std::move(*s);
  return r == 0 ? Return(q, 0) : Error(q, r);
}

void NetServer::Listen(NetRequest& q) {
  // An unbound TCP socket of the ULSP's would listen on an ephemeral port of the
  // host: it listens inside the group instead (only a bind rule opens a host port).
  if ((q.family == AF_INET || q.family == AF_INET6) && q.host_netns) {
    sockaddr_storage local{};
    socklen_t len = 0;
    if (BoundPort(q.socket.get(), local, len) == 0) {
      auto s = SocketLike(q, /*in_group=*/true);
      if (!s) return Error(q, s.error().value);
      Install(q, std::move(*s));
    }
  }
  Continue(q);
}

NetServer::UnixTarget NetServer::OpenUnixTarget(const NetRequest& q, const std::string& path) {
  UnixTarget t;
  struct stat st {};
  {
    auto ctx = CallerFs::Enter(q.tid);
    if (!ctx) {
      t.error = CallerErrno(ctx.error().value);
      return t;
    }
    t.shown = path[0] == '/' ? path : ctx->Cwd() + "/" + path;
    const int fd = ::open(path.c_str(), O_PATH | O_CLOEXEC);  // follows links, as connect does
    if (fd < 0) {
      t.error = errno;
      return t;
    }
    t.fd.Reset(fd);
    if (::fstat(fd, &st) != 0) {
      t.error = errno;
      return t;
    }
    t.is_socket = S_ISSOCK(st.st_mode);
    // connect needs write permission on the socket file, checked as the caller.
    if (t.is_socket && ::syscall(SYS_faccessat2, fd, "", W_OK, AT_EACCESS | AT_EMPTY_PATH) != 0) {
      t.error = errno;
      return t;
    }
  }  // back in our own root: /proc/thread-self is ours again
  t.bound = t.is_socket && BoundByGroup(st.st_dev, st.st_ino);
  // The inode found is the one reached: through our descriptor, not the path again.
  const std::string pinned = "/proc/thread-self/fd/" + std::to_string(t.fd.get());
  // Rules are about where the path leads (links followed), read off the pinned
  // inode: the path as the group's mount namespace names it.
  char where[PATH_MAX];
  const ssize_t n = ::readlink(pinned.c_str(), where, sizeof where - 1);
  if (n > 0 && where[0] == '/') t.shown.assign(where, static_cast<size_t>(n));
  sockaddr_un un{};
  un.sun_family = AF_UNIX;
  std::memcpy(un.sun_path, pinned.c_str(), pinned.size() + 1);
  const auto* bytes = reinterpret_cast<const char*>(&un);
  t.name.assign(bytes, bytes + offsetof(sockaddr_un, sun_path) + pinned.size() + 1);
  return t;
}

LogEntry NetServer::DecideUnix(const UnixTarget& t) {
  LogEntry e{.proto = "unix", .path = t.shown};
  if (t.bound) {
    e.verdict = "group";
    e.rule = "bound by the group";
  } else {
    const Decision d = config_.rules.DecidePath(t.shown);
    e.verdict = std::string(ActionName(d.action));
    e.rule = config_.rules.Describe(d.rule);
  }
  return e;
}

void NetServer::ConnectUnix(NetRequest& q) {
  const std::string path = UnixPath(q.addr);
  if (path.empty() || path[0] == '\0') {
    // Abstract (or unnamed): the names of the socket's own network namespace.
    if (q.host_netns && !path.empty()) {
      Note(q, {.proto = "unix", .path = "@" + path.substr(1), .verdict = "deny", .rule = "a socket from outside the group"});
      return Error(q, EACCES);
    }
    return ConnectAsCallerIds(q, q.addr);
  }
  const UnixTarget t = OpenUnixTarget(q, path);
  if (t.error != 0) return Error(q, t.error);  // as the caller's own connect would fail
  if (!t.is_socket) return Error(q, ECONNREFUSED);
  const LogEntry e = DecideUnix(t);
  Note(q, e);
  if (e.verdict == "deny") return Error(q, EACCES);
  ConnectAsCallerIds(q, t.name);
}

// Connects the caller's socket as the caller (CallerIds): a UNIX peer is told the
// credentials of the thread that connects (SO_PEERCRED), the caller's user, group and
// groups (its process is this one's), and a netlink socket joins only the multicast
// groups the caller may.
void NetServer::ConnectAsCallerIds(NetRequest& q, const std::vector<char>& name, CallerIds::What what) {
  auto ids = CallerIds::Enter(q.tid, what);
  if (!ids) return Error(q, CallerErrno(ids.error().value));
  if (::connect(q.socket.get(), AsSockaddr(name), static_cast<socklen_t>(name.size())) == 0) return Return(q, 0);
  Error(q, errno);
}

void NetServer::BindUnix(NetRequest& q) {
  const int dup = q.socket.get();
  const std::string path = UnixPath(q.addr);
  if (path.empty() || path[0] == '\0') {
    if (q.host_netns && !path.empty()) {
      Note(q, {.proto = "unix", .path = "@" + path.substr(1), .verdict = "deny", .rule = "a socket from outside the group"});
      return Error(q, EACCES);
    }
    if (::bind(dup, AsSockaddr(q.addr), static_cast<socklen_t>(q.addr.size())) == 0) return Return(q, 0);
    return Error(q, errno);
  }
  // A socket file is a file: the group's view decides where it may make one.
  auto ctx = CallerFs::Enter(q.tid);
  if (!ctx) return Error(q, CallerErrno(ctx.error().value));
  if (::bind(dup, AsSockaddr(q.addr), static_cast<socklen_t>(q.addr.size())) != 0) return Error(q, errno);
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    std::lock_guard lock(bound_mu_);
    bound_.insert({st.st_dev, st.st_ino});
  }
  Return(q, 0);
}

void NetServer::Bind(NetRequest& q) {
  if (q.family == AF_UNIX) return BindUnix(q);
  const int dup = q.socket.get();
  auto on_dup = [&] {
    if (const int err = BindAsCaller(dup, q); err != 0) return Error(q, err);
    Return(q, 0);
  };
  if (q.family != AF_INET && q.family != AF_INET6) {
    if (q.host_netns) return Error(q, EACCES);
    return on_dup();
  }
  auto ep = Endpoint::FromSockaddr(q.addr.data(), q.addr.size());
  if (!ep) return Error(q, ep.error());
  if (!TcpOrUdp(q)) {  // raw and ICMP: where the socket is, in the group's namespace
    NoteKeptInGroup(q, *ep, !q.host_netns);
    return q.host_netns ? Error(q, EACCES) : on_dup();
  }
  // Binding a bound socket is EINVAL, as natively (the swaps below would bind a fresh one).
  sockaddr_storage bound{};
  socklen_t bound_len = 0;
  if (BoundPort(dup, bound, bound_len) != 0) return Error(q, EINVAL);
  const bool stream = q.type == SOCK_STREAM;
  LogEntry e{.proto = stream ? "tcp" : "udp", .address = ep->AddressString(), .port = ep->port};
  const Decision d = config_.rules.Decide(Call::kBind, stream ? Proto::kTcp : Proto::kUdp, *ep, {});
  if (d.rule < 0) {
    // No bind rule: the socket is bound inside the group's namespace, reachable from
    // the group only (a socket of the ULSP's is swapped for one made there).
    e.rule = "no bind rule";
    e.verdict = "group";
    Note(q, e);
    if (!q.host_netns) return on_dup();
    auto s = SocketLike(q, /*in_group=*/true);
    if (!s) return Error(q, s.error().value);
    if (const int err = BindAsCaller(s->get(), q); err != 0) return Error(q, err);
    Install(q, std::move(*s));
    return Return(q, 0);
  }
  e.verdict = std::string(ActionName(d.action));
  e.rule = config_.rules.Describe(d.rule);
  Note(q, e);
  if (!d.allowed()) return Error(q, EACCES);
  // Bound on the host by a socket the group owns (GroupSocketOwner), made for it.
  auto s = SocketLike(q, /*in_group=*/false, /*group_owned=*/true);
  if (!s) return Error(q, s.error().value);
  if (const int err = BindAsCaller(s->get(), q); err != 0) return Error(q, err);
  Install(q, std::move(*s));
  Return(q, 0);
}

void NetServer::Send(NetRequest& q) {
  const int flags = static_cast<int>(q.call == NetCall::kSendMsg ? q.args[2] : q.args[3]);
  const bool stream = q.type == SOCK_STREAM || q.type == SOCK_SEQPACKET;
  const bool inet = q.family == AF_INET || q.family == AF_INET6;
  int target = q.socket.get();  // where the data goes: the caller's socket, or ours
  bool target_in_group = !q.host_netns;
  int64_t sent_msgs = 0;
  int64_t last = 0;
  // From now on the caller's socket is one made in the ULSP's namespace or, for the
  // group's loopback and resolver, in the group's (it replaces the caller's: SETFD).
  // 0, or the errno of making it.
  auto move_target = [&](bool in_group) {
    auto s = SocketLike(q, in_group);
    if (!s) return s.error().value;
    Install(q, std::move(*s));
    target = q.install.get();
    target_in_group = in_group;
    return 0;
  };

  // Logs a datagram refused by `rule`, with the address it was for (`name`, if any).
  auto note_refused = [&](const std::vector<char>& name, const char* rule) {
    LogEntry e{.proto = inet ? (stream ? "tcp" : "udp") : "unix", .verdict = "deny", .rule = rule};
    if (auto ep = Endpoint::FromSockaddr(name.data(), name.size()); ep && inet) {
      e.address = ep->AddressString();
      e.port = ep->port;
    }
    Note(q, e);
  };
  // MSG_DONTROUTE looks for a route on a link alone: a datagram to an allowed address
  // left by a link route that the host's unreachable route (a VPN's kill switch)
  // overruled. The filter refuses SO_DONTROUTE, the same for every send.
  if (inet && (flags & MSG_DONTROUTE)) {
    note_refused(q.msgs.empty() ? std::vector<char>() : q.msgs[0].name, "a send past the host's routes");
    return Error(q, EPERM);
  }
  // The kernel allows a netlink request by its sender's capabilities: with this
  // process's, a group without CAP_NET_ADMIN changed its namespace's addresses and
  // routes, and could make links in other namespaces. All of a request's datagrams
  // are sent with the caller's.
  std::optional<CallerIds> as_caller;
  if (q.family == AF_NETLINK) {
    auto ids = CallerIds::Enter(q.tid, CallerIds::What::kCapabilities);
    if (!ids) return Error(q, CallerErrno(ids.error().value));
    as_caller.emplace(std::move(*ids));
  }
  // A UNIX datagram's sender, read once for all the request's datagrams that need it.
  std::optional<Result<CallerCredentials>> sender;
  for (size_t i = 0; i < q.msgs.size(); ++i) {
    NetDatagram& d = q.msgs[i];
    if (const char* why = RefusedControl(d.control, q.tid)) {
      note_refused(d.name, why);
      if (sent_msgs > 0) break;
      return Error(q, EPERM);
    }
    const std::vector<char>* name = d.name.empty() ? nullptr : &d.name;
    int64_t n = 0;
    UnixTarget unix_target;  // a UNIX path, pinned
    if (stream && inet && (flags & MSG_FASTOPEN) && name != nullptr) {
      // A connect that carries data: decide and connect as connect() would, then send.
      NetRequest c;
      c.call = NetCall::kConnect;
      c.tid = q.tid;
      c.args[0] = q.args[0];
      c.socket.Reset(::dup(q.socket.get()));
      c.family = q.family;
      c.type = q.type;
      c.protocol = q.protocol;
      c.host_netns = q.host_netns;
      c.addr = d.name;
      c.still_waiting = q.still_waiting;
      Connect(c);
      if (c.verdict == NetVerdict::kError && c.error != EINPROGRESS) return Error(q, c.error);
      if (c.install) {
        q.install = std::move(c.install);
        target = q.install.get();
      }
      name = nullptr;
    } else if (!stream && name != nullptr) {
      if (inet) {
        auto ep = Endpoint::FromSockaddr(name->data(), name->size());
        if (!ep) {
          if (sent_msgs > 0) break;
          return Error(q, ep.error());
        }
        const Endpoint given = *ep;  // the log shows the address as the caller gave it
        *ep = ep->Reached();
        const bool resolver = IsResolver(*ep);
        if (!TcpOrUdp(q)) {
          // Raw and ICMP: sent where the socket is, in the group's namespace.
          NoteKeptInGroup(q, given, target_in_group);
          if (!target_in_group) {
            if (sent_msgs > 0) break;
            return Error(q, EACCES);
          }
        } else if (resolver || (config_.loopback_group && ep->IsLoopback())) {
          // The ULSP's socket (made at socket()) or one from outside must not reach
          // the host's loopback: one made in the group takes its place, as for a connect.
          if (!target_in_group) {
            if (const int err = move_target(/*in_group=*/true); err != 0) {
              if (sent_msgs > 0) break;
              return Error(q, err);
            }
          }
          if (resolver) {
            NoteAsker(q, target);
          } else {
            Note(q, {.proto = "udp", .address = given.AddressString(), .port = ep->port, .verdict = "group",
                     .rule = "loopback = \"group\""});
          }
        } else {
          const Decision dec = config_.rules.Decide(Call::kConnect, Proto::kUdp, *ep, names_.NamesOf(*ep));
          Note(q, {.proto = "udp", .address = given.AddressString(), .port = ep->port, .name = dec.name,
                   .verdict = std::string(ActionName(dec.action)), .rule = config_.rules.Describe(dec.rule)});
          if (!dec.allowed()) {
            if (sent_msgs > 0) break;
            return Error(q, EACCES);
          }
          if (target_in_group) {
            if (const int err = move_target(/*in_group=*/false); err != 0) {
              if (sent_msgs > 0) break;
              return Error(q, err);
            }
          }
        }
      } else if (q.family == AF_UNIX) {
        const std::string path = UnixPath(*name);
        if (path.empty() || path[0] == '\0') {
          if (!target_in_group && !path.empty()) return Error(q, EACCES);
        } else {
          unix_target = OpenUnixTarget(q, path);
          int err = unix_target.error;
          if (err == 0 && !unix_target.is_socket) err = ECONNREFUSED;
          if (err == 0) {
            const LogEntry e = DecideUnix(unix_target);
            Note(q, e);
            if (e.verdict == "deny") err = EACCES;
          }
          if (err != 0) {
            if (sent_msgs > 0) break;
            return Error(q, err);
          }
          name = &unix_target.name;
        }
      } else if (!target_in_group) {
        return Error(q, EACCES);
      }
    }
    if (q.family == AF_UNIX && LacksCredentials(d.control)) {
      if (!sender) sender = ReadCallerCredentials(q.tid, q.pidfd ? q.pidfd->get() : -1);
      if (!*sender) {
        if (sent_msgs > 0) break;
        return Error(q, CallerErrno(sender->error().value));
      }
      AddCredentials(d.control, **sender);
    }
    n = SendOn(target, d, name, flags, stream, q, d.control);
    if (n < 0) {
      if (sent_msgs > 0) break;
      return Error(q, static_cast<int>(-n));
    }
    last = n;
    ++sent_msgs;
    if (d.len_at != 0) {
      const uint32_t len = static_cast<uint32_t>(n);
      q.writes.push_back({d.len_at, std::vector<char>(reinterpret_cast<const char*>(&len),
                                                       reinterpret_cast<const char*>(&len) + sizeof len)});
    }
    if (stream && static_cast<size_t>(n) < d.data.size()) break;
  }
  if (q.call == NetCall::kSendMmsg) return Return(q, sent_msgs);
  Return(q, last);
}

}  // namespace ulsp::net
