#include "kernel/msgport/seccomp_shim.h"

#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <seccomp.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/pidfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <string>

#include "kernel/msgport/log.h"
#include "kernel/msgport/net_message.h"

// Newer than Debian 12's headers (Linux 6.6 and 6.9).
#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (1UL << 0)
#endif
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif
#ifndef TCP_FASTOPEN_CONNECT
#define TCP_FASTOPEN_CONNECT 30
#endif

namespace ulsp::msgport {

namespace {

// libseccomp returns negative errno values.
Result<void> Check(int rc) {
  if (rc < 0) return Fail(-rc);
  return {};
}

struct FilterCtx {
  scmp_filter_ctx ctx;
  explicit FilterCtx(uint32_t def) : ctx(seccomp_init(def)) {}
  ~FilterCtx() {
    if (ctx != nullptr) seccomp_release(ctx);
  }
};

// Refuses the terminal ioctls that type into the terminal (TIOCSTI) or paste into a
// console (TIOCLINUX): the group's command shares the caller's terminal, and what it
// typed there would be read by the caller's shell once the group ended. The request
// is an int: compared on its low 32 bits, as the kernel reads it.
Result<void> RefuseTerminalInput(scmp_filter_ctx ctx) {
  for (unsigned request : {static_cast<unsigned>(TIOCSTI), static_cast<unsigned>(TIOCLINUX)}) {
    if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(ioctl), 1,
                                        SCMP_A1(SCMP_CMP_MASKED_EQ, 0xffffffffu, request)));
        !r)
      return r;
  }
  return {};
}

// Refuses what Docker's default profile refuses to a container without
// CAP_SYS_ADMIN, where this group could still use it: a user namespace of its own
// (unshare or clone with CLONE_NEWUSER; clone3, whose flags a filter cannot read,
// answers ENOSYS and glibc falls back to clone), which gives every capability inside
// it and the kernel's surface that comes with them; and the kernel's keyrings, which
// root shares with the host's root processes (keyctl, add_key, request_key).
Result<void> RefuseNamespacesAndKeys(scmp_filter_ctx ctx) {
  for (const char* name : {"unshare", "clone"}) {
    const int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;
    if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 1,
                                        SCMP_A0(SCMP_CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)));
        !r)
      return r;
  }
  for (const char* name : {"keyctl", "add_key", "request_key"}) {
    const int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;
    if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0)); !r) return r;
  }
  if (const int nr = seccomp_syscall_resolve_name("clone3"); nr != __NR_SCMP_ERROR) {
    if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), nr, 0)); !r) return r;
  }
  return {};
}

// No set-user-ID or set-group-ID file is made: a group runs as root, and where it
// writes on the host (an overlay's upper directory, a passthrough stack) such a
// program, run by a host user, gave that user root's rights or group. Every call that
// sets a mode is refused (EPERM) when the mode has either bit: chmod, fchmod,
// fchmodat, creat, mknod, mknodat, and open and openat when they create (O_CREAT,
// O_TMPFILE). fchmodat2 and openat2, whose mode libseccomp 2.5.4 cannot name or a
// filter cannot read (a struct), are refused by RefuseModeCallsItCannotRead.
Result<void> RefuseSetIdModes(scmp_filter_ctx ctx) {
  struct Call {
    const char* name;
    unsigned mode_arg;
    int flags_arg;  // -1: it always sets the mode
  };
  for (const Call& c : {Call{"chmod", 1, -1}, Call{"fchmod", 1, -1}, Call{"fchmodat", 2, -1}, Call{"creat", 1, -1},
                        Call{"mknod", 1, -1}, Call{"mknodat", 2, -1}, Call{"open", 2, 1}, Call{"openat", 3, 2}}) {
    const int nr = seccomp_syscall_resolve_name(c.name);
    if (nr == __NR_SCMP_ERROR) continue;
    for (const uint64_t bit : {uint64_t{S_ISUID}, uint64_t{S_ISGID}}) {
      const scmp_arg_cmp mode{c.mode_arg, SCMP_CMP_MASKED_EQ, bit, bit};
      if (c.flags_arg < 0) {
        if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 1, mode)); !r) return r;
        continue;
      }
      for (const uint64_t creates : {uint64_t{O_CREAT}, uint64_t{__O_TMPFILE}}) {
        const scmp_arg_cmp flags{static_cast<unsigned>(c.flags_arg), SCMP_CMP_MASKED_EQ, creates, creates};
        if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 2, mode, flags)); !r) return r;
      }
    }
  }
  return {};
}

// fchmodat2 (452) and openat2 (437), the same numbers in both ABIs: ENOSYS, after
// which the C library uses fchmodat and openat. A filter of its own, in plain BPF,
// since libseccomp 2.5.4 knows no fchmodat2 (it cannot put it in the 32-bit ABI's
// filter).
Result<void> RefuseModeCallsItCannotRead() {
  sock_filter code[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 452, 1, 0),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 437, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog program{static_cast<unsigned short>(std::size(code)), code};
  if (::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0) return Fail(errno);
  return {};
}

Result<void> BuildNative(scmp_filter_ctx ctx) {
  if (auto r = RefuseTerminalInput(ctx); !r) return r;
  if (auto r = RefuseNamespacesAndKeys(ctx); !r) return r;
  for (int nr : {SCMP_SYS(socket), SCMP_SYS(socketpair), SCMP_SYS(connect), SCMP_SYS(bind), SCMP_SYS(listen),
                 SCMP_SYS(accept), SCMP_SYS(accept4), SCMP_SYS(sendmsg), SCMP_SYS(sendmmsg)}) {
    if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, nr, 0)); !r) return r;
  }
  // sendto with an address, or with MSG_FASTOPEN (a connect in disguise). send() is
  // sendto with no address: data on a socket already decided on, not sent here.
  if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, SCMP_SYS(sendto), 1, SCMP_A4(SCMP_CMP_NE, 0))); !r) return r;
  if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, SCMP_SYS(sendto), 1,
                                      SCMP_A3(SCMP_CMP_MASKED_EQ, MSG_FASTOPEN, MSG_FASTOPEN)));
      !r)
    return r;
  // sendto with MSG_DONTROUTE: the kernel would look for a route on a link alone,
  // past the host's routes (the ULSP refuses it).
  if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, SCMP_SYS(sendto), 1,
                                      SCMP_A3(SCMP_CMP_MASKED_EQ, MSG_DONTROUTE, MSG_DONTROUTE)));
      !r)
    return r;
  if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, SCMP_SYS(setsockopt), 2, SCMP_A1(SCMP_CMP_EQ, IPPROTO_TCP),
                                      SCMP_A2(SCMP_CMP_EQ, TCP_FASTOPEN_CONNECT)));
      !r)
    return r;
  // Options refused (EPERM), as the kernel refuses those that need CAP_NET_RAW:
  // - an IPv6 routing header (a sticky one, or RFC 2292's sticky options that may hold
  //   one) sends every packet to its first segment, not to the address the rules
  //   decided on, and needs no capability (one in a sendmsg's control data is refused
  //   by the ULSP);
  // - a device to send on: the kernel binds an unbound socket to one without asking
  //   CAP_NET_RAW (it asks only to change it), and a group's TCP and UDP sockets are
  //   the host's, so an allowed connection could leave by an interface of its choosing
  //   (past a VPN's routes);
  // - SO_DONTROUTE: each datagram then looks for a route on a link alone, so one to an
  //   allowed address left by a link route the host's unreachable route (a VPN's kill
  //   switch) had overruled, as with a device bound (MSG_DONTROUTE, the same per send,
  //   is refused by the ULSP);
  // - the interface a datagram leaves by, chosen with no device bound and no
  //   capability asked: IP_UNICAST_IF, IPV6_UNICAST_IF, and IPv6's sticky packet
  //   information (IPV6_PKTINFO, an interface and a source address; one in a sendmsg's
  //   control data, IPv4's too, is refused by the ULSP). A group's datagrams to an
  //   allowed address left by an interface of its naming, as with a device bound;
  // - joining a multicast group (IPv4's three ways, IPv6's, and an anycast address,
  //   which needs CAP_NET_ADMIN anyway): the kernel then reports the membership out of
  //   the host's interface (IGMP, MLD), carrying the group address the caller chose. A
  //   group whose rules allow nothing sent 28 bits of its choosing a join (112 on
  //   IPv6) to the host's network. Leaving, and source filters, need a membership
  //   first.
  // The arguments are ints: compared on their low 32 bits, as the kernel reads them.
  using Option = std::pair<unsigned, unsigned>;  // level, name
  for (const auto& [level, optname] :
       {Option{IPPROTO_IPV6, IPV6_RTHDR}, Option{IPPROTO_IPV6, IPV6_2292PKTOPTIONS}, Option{SOL_SOCKET, SO_BINDTODEVICE},
        Option{SOL_SOCKET, SO_BINDTOIFINDEX}, Option{SOL_SOCKET, SO_DONTROUTE}, Option{IPPROTO_IP, IP_UNICAST_IF},
        Option{IPPROTO_IPV6, IPV6_UNICAST_IF}, Option{IPPROTO_IPV6, IPV6_PKTINFO}, Option{IPPROTO_IP, IP_ADD_MEMBERSHIP},
        Option{IPPROTO_IP, IP_ADD_SOURCE_MEMBERSHIP}, Option{IPPROTO_IP, MCAST_JOIN_GROUP},
        Option{IPPROTO_IP, MCAST_JOIN_SOURCE_GROUP}, Option{IPPROTO_IPV6, IPV6_ADD_MEMBERSHIP},
        Option{IPPROTO_IPV6, IPV6_JOIN_ANYCAST}, Option{IPPROTO_IPV6, MCAST_JOIN_GROUP},
        Option{IPPROTO_IPV6, MCAST_JOIN_SOURCE_GROUP}}) {
    if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(setsockopt), 2,
                                        SCMP_A1(SCMP_CMP_MASKED_EQ, 0xffffffffu, level),
                                        SCMP_A2(SCMP_CMP_MASKED_EQ, 0xffffffffu, optname)));
        !r)
      return r;
  }
  if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(io_uring_setup), 0)); !r) return r;
  if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(setns), 0)); !r) return r;
  return {};
}

Result<void> BuildX86(scmp_filter_ctx ctx) {
  if (auto r = Check(seccomp_arch_remove(ctx, SCMP_ARCH_NATIVE)); !r) return r;
  if (auto r = Check(seccomp_arch_add(ctx, SCMP_ARCH_X86)); !r) return r;
  // Rules take the native numbers (or libseccomp's pseudo numbers, for socketcall);
  // libseccomp writes them in the 32-bit ABI's own.
  // setsockopt too: through int $0x80, a 64-bit program's socket would take an IPv6
  // routing header past the native filter's refusal.
  const char* refused[] = {"socketcall", "socket",  "socketpair", "connect", "bind",       "listen", "accept",
                           "accept4",    "sendto",  "sendmsg",    "sendmmsg", "setsockopt", "setns"};
  for (const char* name : refused) {
    const int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;
    const int rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EACCES), nr, 0);
    if (rc < 0 && rc != -EEXIST) return Fail(-rc);
  }
  if (auto r = RefuseTerminalInput(ctx); !r) return r;
  if (auto r = RefuseNamespacesAndKeys(ctx); !r) return r;
  if (auto r = Check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(io_uring_setup), 0)); !r) return r;
  return {};
}

// Reads `len` bytes at `addr` of thread `tid`. EFAULT when any of it is unreadable.
int ReadMem(pid_t tid, uint64_t addr, void* out, size_t len) {
  if (len == 0) return 0;
  if (addr == 0) return EFAULT;
  iovec local{out, len};
  iovec remote{reinterpret_cast<void*>(addr), len};  // NOLINT: an address in another process
  auto n = Sys([&] { return ::process_vm_readv(tid, &local, 1, &remote, 1, 0); });
  if (!n) return n.error().value == ESRCH ? ESRCH : EFAULT;
  return static_cast<size_t>(*n) == len ? 0 : EFAULT;
}

int WriteMem(pid_t tid, uint64_t addr, const void* in, size_t len) {
  iovec local{const_cast<void*>(in), len};
  iovec remote{reinterpret_cast<void*>(addr), len};  // NOLINT
  auto n = Sys([&] { return ::process_vm_writev(tid, &local, 1, &remote, 1, 0); });
  if (!n) return EFAULT;
  return static_cast<size_t>(*n) == len ? 0 : EFAULT;
}

uint64_t NetnsCookie(int fd) {
  uint64_t cookie = 0;
  socklen_t len = sizeof cookie;
  if (::getsockopt(fd, SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &len) != 0) return 0;
  return cookie;
}

// Whether descriptor `fd` of thread `tid` has FD_CLOEXEC (fdinfo's flags carry it as
// O_CLOEXEC). Read with plain system calls: this is on a connect's path.
bool CloseOnExec(pid_t tid, int fd) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/fdinfo/%d", tid, fd);
  UniqueFd info(::open(path, O_RDONLY | O_CLOEXEC));
  if (!info) return false;
  char buf[256];
  const ssize_t n = ::read(info.get(), buf, sizeof buf - 1);
  if (n <= 0) return false;
  buf[n] = '\0';
  const char* flags = std::strstr(buf, "flags:");
  return flags != nullptr && (std::strtoul(flags + 6, nullptr, 8) & O_CLOEXEC) != 0;
}

NetCall CallOf(int nr) {
  switch (nr) {
    case SYS_socket: return NetCall::kSocket;
    case SYS_socketpair: return NetCall::kSocketPair;
    case SYS_connect: return NetCall::kConnect;
    case SYS_bind: return NetCall::kBind;
    case SYS_listen: return NetCall::kListen;
    case SYS_accept: return NetCall::kAccept;
    case SYS_accept4: return NetCall::kAccept4;
    case SYS_sendto: return NetCall::kSendTo;
    case SYS_sendmsg: return NetCall::kSendMsg;
    case SYS_sendmmsg: return NetCall::kSendMmsg;
    case SYS_setsockopt: return NetCall::kSetSockOpt;
    default: return NetCall::kCount;
  }
}

constexpr size_t kMaxAddr = sizeof(sockaddr_storage);
constexpr size_t kKeptPidfds = 256;
// Sockets whose kind is kept; past this, all are let go (most are closed by then).
constexpr size_t kKeptKinds = 4096;
constexpr size_t kMaxControl = 64u << 10;
constexpr size_t kMaxIov = 1024;  // UIO_MAXIOV

// Copies one struct msghdr (at `at`) and what it points to. Returns 0 or an errno.
int CopyMsg(pid_t tid, uint64_t at, bool stream, size_t limit, NetDatagram& out) {
  msghdr h{};
  if (int err = ReadMem(tid, at, &h, sizeof h)) return err;
  if (h.msg_name != nullptr && h.msg_namelen > 0) {
    if (h.msg_namelen > kMaxAddr) return EINVAL;
    out.name.resize(h.msg_namelen);
    if (int err = ReadMem(tid, reinterpret_cast<uint64_t>(h.msg_name), out.name.data(), out.name.size())) return err;
  }
  if (h.msg_iovlen > kMaxIov) return EMSGSIZE;
  std::vector<iovec> iov(h.msg_iovlen);
  if (int err = ReadMem(tid, reinterpret_cast<uint64_t>(h.msg_iov), iov.data(), iov.size() * sizeof(iovec))) return err;
  size_t total = 0;
  for (const iovec& v : iov) {
    if (v.iov_len > SSIZE_MAX - total) return EINVAL;
    total += v.iov_len;
  }
  if (total > limit && !stream) return EMSGSIZE;
  out.truncated = total > limit;
  out.data.resize(std::min(total, limit));
  size_t done = 0;
  for (const iovec& v : iov) {
    const size_t n = std::min(v.iov_len, out.data.size() - done);
    if (n == 0) continue;
    if (int err = ReadMem(tid, reinterpret_cast<uint64_t>(v.iov_base), out.data.data() + done, n)) return err;
    done += n;
  }
  if (h.msg_control != nullptr && h.msg_controllen > 0) {
    if (h.msg_controllen > kMaxControl) return ENOBUFS;
    out.control.resize(h.msg_controllen);
    if (int err = ReadMem(tid, reinterpret_cast<uint64_t>(h.msg_control), out.control.data(), out.control.size()))
      return err;
  }
  return 0;
}

}  // namespace

Result<UniqueFd> LoadGroupFilter(bool set_id_files) {
  FilterCtx native(SCMP_ACT_ALLOW);
  FilterCtx x86(SCMP_ACT_ALLOW);
  if (native.ctx == nullptr || x86.ctx == nullptr) return Fail(ENOMEM);
  if (auto r = BuildNative(native.ctx); !r) return std::unexpected(r.error());
  if (auto r = BuildX86(x86.ctx); !r) return std::unexpected(r.error());
  if (!set_id_files) {
    if (auto r = RefuseSetIdModes(native.ctx); !r) return std::unexpected(r.error());
    if (auto r = RefuseSetIdModes(x86.ctx); !r) return std::unexpected(r.error());
  }
  if (auto r = Check(seccomp_merge(native.ctx, x86.ctx)); !r) return std::unexpected(r.error());
  x86.ctx = nullptr;  // merged into `native`, which owns it now
  if (auto r = Sys([] { return ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); }); !r) return std::unexpected(r.error());
  if (!set_id_files) {
    if (auto r = RefuseModeCallsItCannotRead(); !r) return std::unexpected(r.error());
  }
  if (auto r = Check(seccomp_load(native.ctx)); !r) return std::unexpected(r.error());
  const int fd = seccomp_notify_fd(native.ctx);
  if (fd < 0) return Fail(-fd);
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  return UniqueFd(fd);
}

SeccompShim::SeccompShim(UniqueFd listener, Port& port, Options options)
    : listener_(std::move(listener)), port_(port), options_(options) {}

Result<std::unique_ptr<SeccompShim>> SeccompShim::Start(UniqueFd listener, Port& port, Options options) {
  std::unique_ptr<SeccompShim> shim(new SeccompShim(std::move(listener), port, options));
  auto efd = Sys([] { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); });
  if (!efd) return std::unexpected(efd.error());
  shim->stop_fd_.Reset(*efd);
  // The caller sleeps in the kernel until answered; the answer wakes it on this CPU,
  // which keeps the tail of a round trip short here. Older kernels lack the flag.
  (void)::ioctl(shim->listener_.get(), SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP);
  {
    UniqueFd probe(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    if (probe) shim->own_netns_cookie_ = NetnsCookie(probe.get());
  }
  seccomp_notif_sizes sizes{};
  if (::syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sizes) != 0) sizes.seccomp_notif = sizeof(seccomp_notif);
  shim->notif_size_ = std::max<size_t>(sizes.seccomp_notif, sizeof(seccomp_notif));
  if (!shim->watchdog_.Start()) return Fail(EAGAIN);
  try {
    std::lock_guard lock(shim->mu_);
    shim->threads_.emplace_back([s = shim.get()] { s->Work(0); });
  } catch (const std::system_error& e) {
    return Fail(e.code().value());
  }
  shim->counters_.workers.store(1, std::memory_order_relaxed);
  return shim;
}

SeccompShim::~SeccompShim() {
  Stop();
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  watchdog_.Stop();
  // No thread starts once stopping_ is set, so the list is final.
  for (auto& t : threads_) t.join();
}

void SeccompShim::Stop() {
  const uint64_t one = 1;
  if (stop_fd_) (void)!::write(stop_fd_.get(), &one, sizeof one);
}

void SeccompShim::WaitUntilIdle() {
  std::unique_lock lock(mu_);
  done_cv_.wait(lock, [this] { return gone_ || stopping_; });
}

int64_t SeccompShim::NowNs() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int SeccompShim::ReceiveOne(std::vector<char>& buf) {
  for (;;) {
    pollfd p[2] = {{listener_.get(), POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
    // Spin a little first: a program that makes call after call (connect right after
    // socket) finds the leader awake, and no thread has to be woken.
    int n = 0;
    const int64_t spin_until = NowNs() + options_.spin.count();
    do {
      n = ::poll(p, 2, 0);
    } while (n == 0 && NowNs() < spin_until);
    if (n == 0) n = ::poll(p, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (p[1].revents != 0) return 0;
    if (p[0].revents & (POLLHUP | POLLERR | POLLNVAL)) return -1;  // no process uses the filter any more
    if (!(p[0].revents & POLLIN)) continue;
    std::fill(buf.begin(), buf.end(), 0);
    if (::ioctl(listener_.get(), SECCOMP_IOCTL_NOTIF_RECV, buf.data()) != 0) {
      if (errno == EINTR || errno == ENOENT) continue;  // the caller went away meanwhile
      Logger("net")->error("seccomp: receiving a notification failed: {}", std::strerror(errno));
      return -1;
    }
    return 1;
  }
}

void SeccompShim::Work(int id) {
  std::vector<char> buf(notif_size_);
  std::unique_lock lock(mu_);
  for (;;) {
    ++spares_;
    cv_.wait(lock, [this] { return stopping_ || gone_ || leader_.load() == -1; });
    --spares_;
    if (stopping_ || gone_) return;
    leader_.store(id);
    lock.unlock();
    const bool more = Lead(id, buf);
    lock.lock();
    if (!more) {
      cv_.notify_all();
      done_cv_.notify_all();
      return;
    }
  }
}

bool SeccompShim::Lead(int id, std::vector<char>& buf) {
  for (;;) {
    const int got = ReceiveOne(buf);
    if (got <= 0) {
      std::lock_guard lock(mu_);
      if (got < 0) gone_ = true;
      else stopping_ = true;
      return false;
    }
    counters_.notifications.fetch_add(1, std::memory_order_relaxed);
    counters_.in_flight.fetch_add(1, std::memory_order_relaxed);
    busy_since_ns_.store(NowNs(), std::memory_order_relaxed);
    watchdog_.Wake();
    seccomp_notif n;
    std::memcpy(&n, buf.data(), sizeof n);
    Handle(n);
    counters_.in_flight.fetch_sub(1, std::memory_order_relaxed);
    if (leader_.load() != id) return true;  // the watchdog gave the lead away meanwhile
    busy_since_ns_.store(0, std::memory_order_relaxed);
  }
}

bool SeccompShim::CheckHeldUp() {
  std::lock_guard lock(mu_);
  if (stopping_ || gone_) return false;
  const int64_t since = busy_since_ns_.load(std::memory_order_relaxed);
  if (since == 0) return false;
  if (NowNs() - since < options_.takeover.count() || leader_.load() == -1) return true;
  // The leader is held up by one notification (a slow connect, a blocked send): a
  // spare leads from now on.
  busy_since_ns_.store(0, std::memory_order_relaxed);
  leader_.store(-1);
  if (spares_ == 0 && threads_.size() < options_.max_workers) {
    try {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { Work(id); });
      counters_.workers.store(threads_.size(), std::memory_order_relaxed);
    } catch (const std::system_error&) {
      Logger("net")->warn("seccomp: cannot start another worker thread ({} serve)", threads_.size());
    }
  }
  cv_.notify_one();
  return true;
}

std::shared_ptr<const UniqueFd> SeccompShim::KeptPidfd(pid_t tid) {
  std::lock_guard lock(pidfd_mu_);
  auto it = pidfds_.find(tid);
  return it == pidfds_.end() ? nullptr : it->second;
}

std::shared_ptr<const UniqueFd> SeccompShim::OpenPidfd(pid_t tid) {
  auto fd = Sys([&] { return static_cast<int>(::syscall(SYS_pidfd_open, tid, PIDFD_THREAD)); });
  if (!fd) return nullptr;
  UniqueFd owned(*fd);
  auto pidfd = std::make_shared<const UniqueFd>(std::move(owned));
  std::lock_guard lock(pidfd_mu_);
  if (pidfds_.size() >= kKeptPidfds) pidfds_.clear();
  pidfds_.insert_or_assign(tid, pidfd);
  return pidfd;
}

std::optional<SeccompShim::SocketKind> SeccompShim::KnownKind(uint64_t cookie) {
  std::lock_guard lock(kinds_mu_);
  auto it = kinds_.find(cookie);
  if (it == kinds_.end()) return std::nullopt;
  return it->second;
}

void SeccompShim::KeepKind(uint64_t cookie, const SocketKind& kind) {
  std::lock_guard lock(kinds_mu_);
  if (kinds_.size() >= kKeptKinds) kinds_.clear();
  kinds_.insert_or_assign(cookie, kind);
}

void SeccompShim::ReadKind(NetRequest& q) {
  const int s = q.socket.get();
  uint64_t cookie = 0;
  socklen_t len = sizeof cookie;
  if (::getsockopt(s, SOL_SOCKET, SO_COOKIE, &cookie, &len) != 0) {
    q.fd_error = ENOTSOCK;  // (the only error a valid descriptor gets here)
    q.socket.Reset();
    return;
  }
  if (auto kind = KnownKind(cookie)) {
    q.family = kind->family;
    q.type = kind->type;
    q.protocol = kind->protocol;
    q.host_netns = kind->host_netns;
    return;
  }
  len = sizeof(int);
  ::getsockopt(s, SOL_SOCKET, SO_DOMAIN, &q.family, &len);
  len = sizeof(int);
  ::getsockopt(s, SOL_SOCKET, SO_TYPE, &q.type, &len);
  len = sizeof(int);
  ::getsockopt(s, SOL_SOCKET, SO_PROTOCOL, &q.protocol, &len);
  q.host_netns = own_netns_cookie_ != 0 && NetnsCookie(s) == own_netns_cookie_;
  KeepKind(cookie, {q.family, q.type, q.protocol, q.host_netns});
}

void SeccompShim::Handle(const seccomp_notif& n) noexcept {
  const int lfd = listener_.get();
  auto valid = [lfd, id = n.id] {
    uint64_t copy = id;
    return ::ioctl(lfd, SECCOMP_IOCTL_NOTIF_ID_VALID, &copy) == 0;
  };
  seccomp_notif_resp resp{};
  resp.id = n.id;
  auto answer = [&](int64_t value, int error, bool cont) {
    resp.val = value;
    resp.error = -error;  // the kernel's sign
    resp.flags = cont ? SECCOMP_USER_NOTIF_FLAG_CONTINUE : 0;
    if (::ioctl(lfd, SECCOMP_IOCTL_NOTIF_SEND, &resp) != 0) {
      counters_.vanished.fetch_add(1, std::memory_order_relaxed);
    } else if (cont) {
      counters_.continued.fetch_add(1, std::memory_order_relaxed);
    } else {
      counters_.answered.fetch_add(1, std::memory_order_relaxed);
    }
  };
  try {
    const NetCall call = CallOf(n.data.nr);
    if (call == NetCall::kCount) return answer(0, ENOSYS, false);  // not one the filter sends
    auto msg = std::make_unique<NetMessage>(call);
    NetRequest& q = msg->req;
    msg->notif_id = n.id;
    q.tid = static_cast<pid_t>(n.pid);
    std::copy(std::begin(n.data.args), std::end(n.data.args), q.args);
    q.still_waiting = valid;

    // Calls that name a socket (or may carry descriptors) need the caller's thread: a
    // pidfd, shown to be the caller's by the notification being alive after.
    const bool names_socket = call == NetCall::kConnect || call == NetCall::kBind || call == NetCall::kSendTo ||
                              call == NetCall::kSendMsg || call == NetCall::kSendMmsg || call == NetCall::kListen;
    if (names_socket) {
      // No check yet that the pidfd is the caller's: the one below, after everything
      // is read, covers it (had the caller died and its tid been reused before
      // pidfd_open, its notification would be gone by then, and all is thrown away).
      const bool kept = (q.pidfd = KeptPidfd(q.tid)) != nullptr;
      if (!kept && !(q.pidfd = OpenPidfd(q.tid))) return answer(0, EINTR, false);  // gone; the answer goes nowhere
      const int target = static_cast<int>(q.args[0]);
      auto getfd = [&] {
        return Sys([&] { return static_cast<int>(::syscall(SYS_pidfd_getfd, q.pidfd->get(), target, 0)); });
      };
      auto dup = getfd();
      if (!dup && kept) {
        // Most likely the kept pidfd's thread has ended (ESRCH); a fresh pidfd says
        // whether the caller's descriptor is bad.
        if (!(q.pidfd = OpenPidfd(q.tid))) return answer(0, EINTR, false);
        dup = getfd();
      }
      if (!dup) {
        q.fd_error = EBADF;
      } else {
        q.socket.Reset(*dup);
        ReadKind(q);
      }
    }
    if (const int family = static_cast<int>(q.args[0]);  // an int: its low 32 bits, as the kernel reads it
        call == NetCall::kSocket && (family == AF_INET || family == AF_INET6)) {
      // The ULSP makes TCP and UDP sockets itself and gives each the caller's owner,
      // read by the thread's pidfd (kept from its last call, most often). Other
      // families are made by the caller.
      if (!(q.pidfd = KeptPidfd(q.tid)) && !(q.pidfd = OpenPidfd(q.tid))) return answer(0, EINTR, false);
    }
    const bool stream = q.type == SOCK_STREAM || q.type == SOCK_SEQPACKET;
    if (q.fd_error == 0) {
      switch (call) {
        case NetCall::kConnect:
        case NetCall::kBind:
          if (q.args[2] > kMaxAddr) {
            q.copy_error = EINVAL;
          } else {
            q.addr.resize(q.args[2]);
            q.copy_error = ReadMem(q.tid, q.args[1], q.addr.data(), q.addr.size());
          }
          break;
        case NetCall::kSendTo: {
          NetDatagram d;
          if (q.args[4] != 0 && q.args[5] > 0) {
            if (q.args[5] > kMaxAddr) {
              q.copy_error = EINVAL;
              break;
            }
            q.addr.resize(q.args[5]);
            if ((q.copy_error = ReadMem(q.tid, q.args[4], q.addr.data(), q.addr.size())) != 0) break;
          }
          const uint64_t len = q.args[2];
          if (len > options_.copy_limit && !stream) {
            q.copy_error = EMSGSIZE;
            break;
          }
          d.truncated = len > options_.copy_limit;
          d.data.resize(std::min<uint64_t>(len, options_.copy_limit));
          if ((q.copy_error = ReadMem(q.tid, q.args[1], d.data.data(), d.data.size())) != 0) break;
          d.name = q.addr;
          q.msgs.push_back(std::move(d));
          break;
        }
        case NetCall::kSendMsg: {
          NetDatagram d;
          q.copy_error = CopyMsg(q.tid, q.args[1], stream, options_.copy_limit, d);
          q.msgs.push_back(std::move(d));
          break;
        }
        case NetCall::kSendMmsg: {
          const uint64_t vlen = std::min<uint64_t>(q.args[2], kMaxIov);
          size_t budget = options_.copy_limit;
          for (uint64_t i = 0; i < vlen; ++i) {
            NetDatagram d;
            const uint64_t at = q.args[1] + i * sizeof(mmsghdr);
            q.copy_error = CopyMsg(q.tid, at, stream, std::max<size_t>(budget, 1), d);
            if (q.copy_error != 0) {
              if (i > 0) q.copy_error = 0;  // send those copied; the rest fail on a retry
              break;
            }
            d.len_at = at + offsetof(mmsghdr, msg_len);
            budget -= std::min(budget, d.data.size());
            const bool cut = d.truncated;
            q.msgs.push_back(std::move(d));
            if (cut || budget == 0) break;  // a partial send, as a full buffer would make
          }
          break;
        }
        default:
          break;
      }
    }
    // What was read of the caller (its descriptor, its memory) was its own only if
    // its notification is still alive now. The other calls (socket, socketpair,
    // accept, setsockopt) read nothing: an answer to a caller gone meanwhile just
    // goes nowhere, and the check would cost a system call on every socket().
    if (names_socket && !valid()) {
      counters_.vanished.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    MessagePtr sent(msg.release());
    auto replied = DoMsg(port_, std::move(sent));
    if (!replied) return answer(0, EIO, false);
    auto& m = static_cast<NetMessage&>(**replied);
    NetRequest& r = m.req;
    if (m.error != 0) return answer(0, m.error, false);  // the port's own failure
    if (r.verdict == NetVerdict::kContinue &&
        (call == NetCall::kConnect || call == NetCall::kBind || call == NetCall::kSendTo ||
         call == NetCall::kSendMsg || call == NetCall::kSendMmsg)) {
      // Safe only for calls without a pointer argument the ULSP decided on; the net
      // ULSP answers kContinue only for those (socket, socketpair, listen, accept,
      // setsockopt) — checked here again, since this is the security boundary.
      Logger("net")->error("seccomp: the net ULSP answered CONTINUE for {}; refused", NetCallName(call));
      return answer(0, EACCES, false);
    }
    if (r.verdict == NetVerdict::kNewFd && r.install) {
      // Installed and answered in one step: the call returns the new descriptor.
      seccomp_notif_addfd add{};
      add.id = n.id;
      add.flags = SECCOMP_ADDFD_FLAG_SEND;
      add.srcfd = static_cast<uint32_t>(r.install.get());
      add.newfd_flags = r.value == 1 ? O_CLOEXEC : 0;
      if (::ioctl(lfd, SECCOMP_IOCTL_NOTIF_ADDFD, &add) < 0) {
        // Gone, or out of descriptors (EMFILE): then the call fails as it would have.
        if (errno == EMFILE || errno == ENFILE) return answer(0, errno, false);
        counters_.vanished.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      counters_.installed.fetch_add(1, std::memory_order_relaxed);
      counters_.answered.fetch_add(1, std::memory_order_relaxed);
      if (call == NetCall::kSocket && r.family != 0) {
        // A socket the ULSP made: its kind is known now, and its first connect
        // need not ask.
        uint64_t cookie = 0;
        socklen_t len = sizeof cookie;
        if (::getsockopt(r.install.get(), SOL_SOCKET, SO_COOKIE, &cookie, &len) == 0)
          KeepKind(cookie, {r.family, r.type, r.protocol, r.host_netns});
      }
      return;
    }
    if (r.install) {
      seccomp_notif_addfd add{};
      add.id = n.id;
      add.flags = SECCOMP_ADDFD_FLAG_SETFD;
      add.srcfd = static_cast<uint32_t>(r.install.get());
      add.newfd = static_cast<uint32_t>(r.args[0]);
      // The replacement keeps the caller's close-on-exec flag (read only now: it
      // costs a /proc read, and most calls install nothing).
      add.newfd_flags = CloseOnExec(r.tid, static_cast<int>(r.args[0])) ? O_CLOEXEC : 0;
      if (::ioctl(lfd, SECCOMP_IOCTL_NOTIF_ADDFD, &add) < 0) {
        counters_.vanished.fetch_add(1, std::memory_order_relaxed);
        return;  // the caller is gone (or interrupted: its call restarts and comes again)
      }
      counters_.installed.fetch_add(1, std::memory_order_relaxed);
    }
    for (const NetRequest::Write& w : r.writes) (void)WriteMem(r.tid, w.at, w.bytes.data(), w.bytes.size());
    if (r.verdict == NetVerdict::kContinue) return answer(0, 0, true);  // after the install, if any
    if (r.verdict == NetVerdict::kReturn) return answer(r.value, 0, false);
    return answer(0, r.error > 0 ? r.error : EIO, false);
  } catch (const std::bad_alloc&) {
    answer(0, ENOMEM, false);
  } catch (const std::exception& e) {
    Logger("net")->error("seccomp: serving a notification failed: {}", e.what());
    answer(0, EIO, false);
  }
}

}  // namespace ulsp::msgport
