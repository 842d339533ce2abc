#include "kernel/msgport/thread_creds.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>

namespace ulsp {

bool ThreadCaps::Get(pid_t pid) noexcept {
  header = {_LINUX_CAPABILITY_VERSION_3, pid};
  return ::syscall(SYS_capget, &header, data) == 0;
}

bool ThreadCaps::SetEffective(uint64_t effective) noexcept {
  __user_cap_header_struct h{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct d[2] = {data[0], data[1]};
  d[0].effective = static_cast<uint32_t>(effective);
  d[1].effective = static_cast<uint32_t>(effective >> 32);
  return ::syscall(SYS_capset, &h, d) == 0;
}

namespace {

// The capabilities a change of file-system uid from 0 takes from the effective set,
// and one back to 0 gives back from the permitted set (the kernel's CAP_FS_MASK).
constexpr uint64_t Bit(int cap) { return uint64_t{1} << cap; }
constexpr uint64_t kFsCaps = Bit(CAP_CHOWN) | Bit(CAP_DAC_OVERRIDE) | Bit(CAP_DAC_READ_SEARCH) | Bit(CAP_FOWNER) |
                             Bit(CAP_FSETID) | Bit(CAP_LINUX_IMMUTABLE) | Bit(CAP_MKNOD) | Bit(CAP_MAC_OVERRIDE);

}  // namespace

AsWriter::AsWriter(uid_t uid, Kind kind) noexcept {
  if (uid == 0) return;
  ThreadCaps caps;
  if (!caps.Get()) return;
  own_caps_ = caps.Effective();
  // setfsuid answers the file-system uid the thread had.
  own_fsuid_ = static_cast<uid_t>(::syscall(SYS_setfsuid, uid));
  if (own_fsuid_ == uid) return;  // within a scope for this caller: nothing changed
  // Refused (a thread without CAP_SETUID) without a word: the thread is as it was.
  if (static_cast<uid_t>(::syscall(SYS_setfsuid, -1)) != uid) return;
  active_ = true;  // from here on, the destructor puts things back
  const uint64_t now = own_fsuid_ == 0 ? own_caps_ & ~kFsCaps : own_caps_;
  const uint64_t want = (kind == Kind::kFiles ? own_caps_ : now) & ~Bit(CAP_SYS_RESOURCE);
  if (want != now) (void)caps.SetEffective(want);
}

AsWriter::~AsWriter() {
  if (!active_) return;
  ::syscall(SYS_setfsuid, own_fsuid_);
  ThreadCaps caps;
  if (!caps.Get() || (caps.Effective() != own_caps_ && !caps.SetEffective(own_caps_)) ||
      static_cast<uid_t>(::syscall(SYS_setfsuid, -1)) != own_fsuid_) {
    // This thread would go on serving others with the caller's ids: never let it.
    std::abort();
  }
}

}  // namespace ulsp
