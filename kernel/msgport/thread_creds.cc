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

AsWriter::AsWriter(uid_t uid, gid_t gid) noexcept {
  if (uid == 0) return;
  ThreadCaps caps;
  if (!caps.Get()) return;
  own_caps_ = caps.Effective();
  // setfsuid answers the thread's file-system uid before the call, whether or not
  // it changed it; asking with -1 changes nothing.
  own_fsuid_ = static_cast<uid_t>(::syscall(SYS_setfsuid, -1));
  own_fsgid_ = static_cast<gid_t>(::syscall(SYS_setfsgid, -1));
  active_ = true;  // from here on, the destructor puts things back
  ::syscall(SYS_setfsgid, gid);
  ::syscall(SYS_setfsuid, uid);
  (void)caps.SetEffective(own_caps_ & ~(uint64_t{1} << CAP_SYS_RESOURCE));
}

AsWriter::~AsWriter() {
  if (!active_) return;
  ::syscall(SYS_setfsuid, own_fsuid_);
  ::syscall(SYS_setfsgid, own_fsgid_);
  ThreadCaps caps;
  if (!caps.Get() || !caps.SetEffective(own_caps_) || ::syscall(SYS_setfsuid, -1) != own_fsuid_) {
    // This thread would go on serving others with the caller's ids: never let it.
    std::abort();
  }
}

}  // namespace ulsp
