// CallerFs: for the length of a scope, the calling thread resolves paths as a
// sandboxed caller does — the caller's root directory (and so its mount namespace's
// view), its current directory, its umask, and its file-system credentials (fsuid,
// fsgid, supplementary groups) — so a UNIX socket path given to bind, connect or
// sendto means to the net ULSP exactly what it means to the caller, symlinks, relative
// paths, permission checks and all.
//
// How: the thread gets a private copy of its file-system attributes once
// (unshare(CLONE_FS), per thread), then chroots into /proc/TID/root and changes to
// /proc/TID/cwd; credentials are set with the raw per-thread system calls. The
// destructor puts everything back. Needs CAP_SYS_CHROOT and CAP_SETUID/SETGID.
//
// Thread-safety: affects only the calling thread; one at a time per thread.
#pragma once

#include <sys/socket.h>
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/unique_fd.h"

namespace ulsp::net {

class CallerFs {
 public:
  // Enters the context of thread `tid`. Fails with ESRCH (gone) or the errno of the
  // step that failed; the thread is then as it was.
  static Result<CallerFs> Enter(pid_t tid);
  CallerFs(CallerFs&& other) noexcept;
  CallerFs& operator=(CallerFs&&) = delete;
  ~CallerFs();

  // The caller's current directory, as the caller sees it (from its root).
  std::string Cwd() const;

 private:
  CallerFs() = default;
  void Leave() noexcept;

  bool active_ = false;
  UniqueFd own_root_, own_cwd_;
  mode_t own_umask_ = 0;
  uid_t own_fsuid_ = 0;
  gid_t own_fsgid_ = 0;
  std::vector<gid_t> own_groups_;
};

// CallerIds: for the length of a scope, the calling thread has the caller's real and
// effective user and group ids, supplementary groups and effective capabilities (as
// far as this thread's permitted set holds them), so that what the kernel checks or
// records of whoever makes a call is the caller's, as if the caller made it. The net
// ULSP connects, binds and sends for its callers: a UNIX socket's peer credentials
// (SO_PEERCRED, SO_PEERGROUPS) are taken at connect from the thread that connects, a
// port below 1024 needs CAP_NET_BIND_SERVICE of whoever binds it, and a netlink
// request is allowed by the sender's CAP_NET_ADMIN. Without it a group's process of
// user 1000 reached its peer as user 0, and a group without CAP_NET_ADMIN changed its
// namespace's addresses and routes. The saved ids stay this process's, to return to.
// Nothing changes when the caller's ids and capabilities are this thread's; ids
// change only where this thread is root.
//
// Thread-safety: affects only the calling thread (and threads it starts meanwhile);
// one at a time per thread.
class CallerIds {
 public:
  // kCapabilities: the capabilities alone (one capget of the caller's; /proc is not
  // read), where the ids make no difference.
  enum class What { kIdsAndCapabilities, kCapabilities };
  static Result<CallerIds> Enter(pid_t tid, What what = What::kIdsAndCapabilities);
  CallerIds(CallerIds&& other) noexcept;
  CallerIds& operator=(CallerIds&&) = delete;
  ~CallerIds();

 private:
  CallerIds() = default;
  void Leave() noexcept;

  bool active_ = false;
  bool ids_ = false;  // the ids were changed, not only the capabilities
  uid_t own_ruid_ = 0, own_euid_ = 0;
  gid_t own_rgid_ = 0, own_egid_ = 0;
  std::vector<gid_t> own_groups_;
  uint64_t own_caps_ = 0;  // the effective set
};

// What the kernel records of thread `tid` when it makes a call: its process (as this
// process's pid namespace numbers it), its real user and group (told to a UNIX
// socket's receiver, SCM_CREDENTIALS), and its file-system user (a new socket's
// owner, which the host's firewall and routing rules may match). `pidfd` is the
// thread's (PIDFD_GET_INFO, one system call), or -1; /proc is read where there is
// none, where the kernel has no such call (before 6.13), and where the pidfd's thread
// has ended (a pidfd kept for a tid the kernel has since given to another). ESRCH:
// `tid` is gone.
struct CallerCredentials {
  pid_t tgid = 0;
  uid_t ruid = 0, fsuid = 0;
  gid_t rgid = 0;
};
Result<CallerCredentials> ReadCallerCredentials(pid_t tid, int pidfd);

// Whether SCM_CREDENTIALS `c` name thread `tid`, as the kernel checks them for a
// sender: its own process (numbered as its pid namespace numbers it), one of its user
// ids unless it holds CAP_SETUID, one of its group ids unless it holds CAP_SETGID. If
// so, the process is renumbered as this process's namespace numbers it, so that a
// receiver is told who sent. The net ULSP, which sends for the caller, holds
// CAP_SYS_ADMIN, CAP_SETUID and CAP_SETGID, so the kernel would let it name anyone: a
// group's process of user 1000 told a receiver it was process 1, user 0.
bool CredentialsNameCaller(pid_t tid, ucred& c);

}  // namespace ulsp::net
