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

#include <sys/types.h>

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

}  // namespace ulsp::net
