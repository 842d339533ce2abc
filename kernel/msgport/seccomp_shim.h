// The kernel end of a sandboxed group's networking: a seccomp filter that sends the
// group's networking system calls to a listener descriptor (SECCOMP_RET_USER_NOTIF),
// and SeccompShim, which reads those notifications, turns each into a NetMessage
// (net_message.h) for the group's net ULSP, and turns the reply into the kernel's
// answer.
//
// What the filter sends (x86-64): socket, socketpair, connect, bind, listen, accept,
// accept4, sendto with an address or MSG_FASTOPEN, sendmsg, sendmmsg, and
// setsockopt(TCP_FASTOPEN_CONNECT). What it refuses outright: io_uring_setup (ENOSYS:
// io_uring's socket and connect operations never pass through seccomp), setns
// (EPERM), and every networking entry of the 32-bit ABI, socketcall included
// (EACCES): this kernel runs `int $0x80` from any process. Other architectures' calls
// kill the process (libseccomp's default).
//
// Safety (seccomp_unotify(2)): a pointer argument is copied out of the caller once,
// the notification is checked to be still alive after the copy, and the ULSP decides
// on the copy. The shim never answers CONTINUE for a call whose pointer argument the
// ULSP decided on (the ULSP performs those calls itself).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/port.h"
#include "kernel/msgport/unique_fd.h"
#include "kernel/msgport/watchdog.h"

struct seccomp_notif;

namespace ulsp::msgport {

struct NetRequest;

// Loads the group filter into the calling process, which must be single-threaded
// (it applies to this thread and everything it starts afterwards; no_new_privs is
// set first). Returns the listener descriptor. Fails with the errno libseccomp
// reports. Unless `set_id_files`, it also refuses to make a file set-user-ID or
// set-group-ID (chmod, open, mknod ... with S_ISUID or S_ISGID: EPERM), as systemd's
// RestrictSUIDSGID does.
Result<UniqueFd> LoadGroupFilter(bool set_id_files);

class SeccompShim {
 public:
  struct Options {
    unsigned max_workers = 64;            // notifications served at once, at most
    size_t copy_limit = 1u << 20;         // bytes of data copied from one send (a
                                          // stream send is cut there; a datagram
                                          // larger than it fails with EMSGSIZE)
    std::chrono::nanoseconds spin{std::chrono::microseconds(50)};  // polling after a
                                          // notification before sleeping
    std::chrono::nanoseconds takeover{std::chrono::milliseconds(2)};  // a notification
                                          // served longer than this hands the lead on
  };
  struct Counters {
    std::atomic<uint64_t> notifications{0};
    std::atomic<uint64_t> continued{0};
    std::atomic<uint64_t> answered{0};   // a value or an errno
    std::atomic<uint64_t> installed{0};  // a ULSP socket put in place of the caller's
    std::atomic<uint64_t> vanished{0};   // the caller was gone before the answer
    std::atomic<uint64_t> in_flight{0};
    std::atomic<uint64_t> workers{0};
  };

  // Serves `listener` with `port` (the net ULSP's), which must outlive the shim.
  // Starts its threads; fails with the errno of thread creation.
  static Result<std::unique_ptr<SeccompShim>> Start(UniqueFd listener, Port& port, Options options);
  ~SeccompShim();  // Stop(), then joins
  SeccompShim(const SeccompShim&) = delete;
  SeccompShim& operator=(const SeccompShim&) = delete;

  // Stops reading notifications; those being served finish first. Any thread.
  void Stop();
  // Blocks until the filter has no more processes (the group is gone) or Stop.
  void WaitUntilIdle();

  const Counters& counters() const noexcept { return counters_; }

 private:
  SeccompShim(UniqueFd listener, Port& port, Options options);
  // One thread at a time, the leader, receives notifications and serves each itself,
  // spinning for `spin` after each before it sleeps in poll(2): a notification never
  // waits for a thread to be woken, and a program making call after call finds the
  // leader awake. A watchdog checks, every `takeover` while notifications flow,
  // whether the leader has been inside one notification longer than that; if so a
  // spare (started if none waits, up to max_workers) leads from then on, and the old
  // leader joins the spares when it is done. So a slow connect holds the others up
  // for `takeover` at most. (The FUSE side does the same: fuse_loop.h.)
  void Work(int id);
  // Receives and serves while this thread leads. False when the shim stops or the
  // filter has no process left.
  bool Lead(int id, std::vector<char>& buf);
  // The watchdog's look: hands the lead to a spare when the leader is held up;
  // returns whether a notification is being served.
  bool CheckHeldUp();
  // Waits for one notification into `buf`. 1: got one; 0: Stop; -1: the filter has
  // no process left (or the listener failed).
  int ReceiveOne(std::vector<char>& buf);
  void Handle(const seccomp_notif& n) noexcept;
  static int64_t NowNs() noexcept;
  // Thread `tid`'s pidfd kept from an earlier call (empty if none). Opening and
  // closing a pidfd costs about 2.5 µs here, as much as the rest of a connect's
  // bookkeeping, and a program's calls come from few threads, so pidfds are kept.
  // A kept one may be of a thread that has died since (its tid now another's): the
  // kernel then refuses it, and the caller opens a fresh one.
  std::shared_ptr<const UniqueFd> KeptPidfd(pid_t tid);
  // Opens `tid`'s pidfd and keeps it (all kept ones are let go when there are a few
  // hundred: those of threads that have ended are never asked for again).
  // Empty when the thread is gone.
  std::shared_ptr<const UniqueFd> OpenPidfd(pid_t tid);
  // What a socket is (SO_DOMAIN, SO_TYPE, SO_PROTOCOL, and whether it lives in the
  // ULSP's network namespace), kept by its SO_COOKIE: read once, when the ULSP makes
  // the socket or a call first names it, so a connect reads one option instead of
  // four (each a system call of about 1 µs here). None of these ever changes for a
  // socket, and a cookie is never given to another socket.
  struct SocketKind {
    int family = 0, type = 0, protocol = 0;
    bool host_netns = false;
  };
  std::optional<SocketKind> KnownKind(uint64_t cookie);
  void KeepKind(uint64_t cookie, const SocketKind& kind);
  // Fills q's family, type, protocol and host_netns from q.socket (kept, or read and
  // then kept); ENOTSOCK in q.fd_error, and no socket, when it is not one.
  void ReadKind(NetRequest& q);

  UniqueFd listener_;
  UniqueFd stop_fd_;  // eventfd: stays readable once Stop wrote it
  Port& port_;
  const Options options_;
  Counters counters_;
  uint64_t own_netns_cookie_ = 0;
  size_t notif_size_ = 0;

  std::mutex pidfd_mu_;  // guards pidfds_
  std::unordered_map<pid_t, std::shared_ptr<const UniqueFd>> pidfds_;
  std::mutex kinds_mu_;  // guards kinds_
  std::unordered_map<uint64_t, SocketKind> kinds_;  // by SO_COOKIE

  std::mutex mu_;  // guards what follows, up to the atomics
  std::condition_variable cv_;        // spares wait for the lead
  std::condition_variable done_cv_;   // WaitUntilIdle
  unsigned spares_ = 0;
  bool stopping_ = false;
  bool gone_ = false;    // the filter lost its last process
  std::vector<std::thread> threads_;

  std::atomic<int> leader_{-1};            // the leading thread's id, -1 when none
  std::atomic<int64_t> busy_since_ns_{0};  // when the leader's notification began, 0 if idle
  Watchdog watchdog_{options_.takeover, [this] { return CheckHeldUp(); }};
};

}  // namespace ulsp::msgport
