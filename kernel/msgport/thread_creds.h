// Per-thread credentials: the calling thread's capability sets, and a scope in which
// it allocates disk space as a caller would.
//
// Every call here is the raw per-thread system call: glibc's wrappers of setgroups,
// setresuid and the like change every thread of the process.
#pragma once

#include <linux/capability.h>
#include <sys/types.h>

#include <cstdint>

namespace ulsp {

// The calling thread's capability sets (capget and capset; `pid` 0: this thread).
struct ThreadCaps {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};

  // Reads the sets of thread `pid` (0: the calling thread). False: errno says why.
  bool Get(pid_t pid = 0) noexcept;
  // Sets the calling thread's effective set to `effective`, its other sets as read.
  bool SetEffective(uint64_t effective) noexcept;
  uint64_t Effective() const noexcept { return data[0].effective | (uint64_t{data[1].effective} << 32); }
  uint64_t Permitted() const noexcept { return data[0].permitted | (uint64_t{data[1].permitted} << 32); }
};

// User and group 65534, `nobody` and `nogroup` (and the kernel's overflow ids): a
// writer that is not root, for what is written for callers of more than one user.
inline constexpr uid_t kNobody = 65534;

// AsWriter: for the length of a scope, the calling thread allocates disk space as a
// caller of user `uid` and group `gid` would, and keeps every other power it has. A
// file server acts as root for its callers, and root with CAP_SYS_RESOURCE may use
// the blocks ext4 keeps back for root (`mkfs.ext4 -m`, 5% by default) and write past
// disk quotas: through a passthrough mount a process of user 1000 filled a disk whose
// last half was kept for root (2026-12-07). So the thread's file-system ids become
// the caller's (which ext4 compares with its reserved user and group) and its
// effective set loses CAP_SYS_RESOURCE; the file-system capabilities that a change of
// file-system uid takes away (CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_CHOWN …) it gets back,
// so that what it may do to files stays what it was. A file it makes meanwhile is the
// caller's (its file-system ids'), as the server would make it anyway.
//
// Nothing changes for a caller of user 0: ext4 gives its reserved blocks to user 0,
// and a root caller holds CAP_SYS_RESOURCE as a rule (a group's root does not: its
// writes still pass quotas). Best effort: where a call fails the thread goes on as
// itself, as before; a scope that cannot put the thread back aborts the process
// rather than let it serve others as the caller.
//
// Thread-safety: affects only the calling thread (and threads it starts meanwhile,
// which keep the caller's ids: start none); one at a time per thread, or nested for
// the same caller.
class AsWriter {
 public:
  AsWriter(uid_t uid, gid_t gid) noexcept;
  ~AsWriter();
  AsWriter(const AsWriter&) = delete;
  AsWriter& operator=(const AsWriter&) = delete;

  // Whether the thread writes as the caller (false for a caller of user 0).
  bool active() const noexcept { return active_; }

 private:
  bool active_ = false;
  uid_t own_fsuid_ = 0;
  gid_t own_fsgid_ = 0;
  uint64_t own_caps_ = 0;
};

}  // namespace ulsp
