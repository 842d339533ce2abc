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

// User 65534, `nobody` (the kernel's overflow uid): a writer that is not root, for
// what is written for callers of more than one user.
inline constexpr uid_t kNobody = 65534;

// AsWriter: for the length of a scope, the calling thread allocates disk space as a
// caller of user `uid` would. A file server acts as root for its callers, and ext4
// lets a writer whose file-system uid is its reserved user (root, by default) or who
// holds CAP_SYS_RESOURCE use the blocks it keeps back (`mkfs.ext4 -m`, 5% by
// default), and CAP_SYS_RESOURCE passes disk quotas: through a passthrough mount a
// process of user 1000 filled a disk whose last half was kept for root (2026-12-07).
// So the thread's file-system uid becomes the caller's and its effective set loses
// CAP_SYS_RESOURCE. Its file-system gid stays: ext4 never lends its reserve to group
// 0, and a file the server makes it gives to the caller's group afterwards (a chown,
// which quotas check).
//
// A change of file-system uid from 0 also takes the file-system capabilities
// (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_LINUX_IMMUTABLE …).
// kData, for a request on a file already open (write, fallocate, copy_file_range),
// which needs none of them, leaves them out, as the caller would be: two changes
// of file-system uid (each checked) and two capget calls, 4.3–5.6 µs a scope here
// (where the thread lacks CAP_SYS_RESOURCE; two capset more where it has it;
// ulsp-parts-bench's BM_AsWriterScope). kFiles, for a request that makes, moves or
// names files, gives them back, so that what the server may do to files stays what
// it was: 5.8–7.0 µs.
//
// Nothing changes for a caller of user 0 (ext4 gives its reserve to user 0, and a
// root caller holds CAP_SYS_RESOURCE as a rule; a group's root lacks it, but its
// requests are still served with it, past quotas), nor in a scope within one for
// the same caller (the outer one's kind holds), nor where the thread may not change
// its file-system uid (no CAP_SETUID): active() says whether it changed. Best effort:
// where a call fails the thread goes on as itself, as before; a scope that cannot
// put the thread back aborts the process rather than let it serve others as the
// caller.
//
// Thread-safety: affects only the calling thread (and threads it starts meanwhile,
// which keep the caller's ids: start none); one at a time per thread.
class AsWriter {
 public:
  enum class Kind { kData, kFiles };
  AsWriter(uid_t uid, Kind kind) noexcept;
  ~AsWriter();
  AsWriter(const AsWriter&) = delete;
  AsWriter& operator=(const AsWriter&) = delete;

  // Whether this scope changed the thread (false for a caller of user 0).
  bool active() const noexcept { return active_; }

 private:
  bool active_ = false;
  uid_t own_fsuid_ = 0;
  uint64_t own_caps_ = 0;
};

}  // namespace ulsp
