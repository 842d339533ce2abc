#include "ulsp/net/caller_fs.h"

#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "kernel/msgport/thread_creds.h"

namespace ulsp::net {
namespace {

// The caller's umask and credentials, from /proc/TID/status.
struct Creds {
  mode_t umask = 022;
  pid_t tgid = 0;      // as this process's pid namespace numbers it
  pid_t own_tgid = 0;  // as the caller's own pid namespace numbers it
  uid_t ruid = 0, euid = 0, suid = 0, fsuid = 0;
  gid_t rgid = 0, egid = 0, sgid = 0, fsgid = 0;
  std::vector<gid_t> groups;
  uint64_t cap_effective = 0;
};

Result<Creds> ReadCreds(pid_t tid) {
  std::ifstream in("/proc/" + std::to_string(tid) + "/status");
  if (!in) return Fail(ESRCH);
  Creds c;
  for (std::string line; std::getline(in, line);) {
    std::istringstream f(line.substr(line.find(':') + 1));
    if (line.rfind("Umask:", 0) == 0) {
      std::string octal;
      f >> octal;
      c.umask = static_cast<mode_t>(std::stoul(octal, nullptr, 8));
    } else if (line.rfind("Tgid:", 0) == 0) {
      f >> c.tgid;
    } else if (line.rfind("NStgid:", 0) == 0) {
      for (pid_t p; f >> p;) c.own_tgid = p;  // the innermost namespace's
    } else if (line.rfind("Uid:", 0) == 0) {
      f >> c.ruid >> c.euid >> c.suid >> c.fsuid;
    } else if (line.rfind("Gid:", 0) == 0) {
      f >> c.rgid >> c.egid >> c.sgid >> c.fsgid;
    } else if (line.rfind("CapEff:", 0) == 0) {
      f >> std::hex >> c.cap_effective;
    } else if (line.rfind("Groups:", 0) == 0) {
      for (gid_t g; f >> g;) c.groups.push_back(g);
    }
  }
  return c;
}

// Per-thread credential calls (glibc's wrappers change every thread of the process).
void SetFsIds(uid_t uid, gid_t gid, const std::vector<gid_t>& groups) {
  ::syscall(SYS_setgroups, groups.size(), groups.data());
  ::syscall(SYS_setfsgid, gid);
  ::syscall(SYS_setfsuid, uid);
}

thread_local bool fs_unshared = false;

}  // namespace

Result<CallerFs> CallerFs::Enter(pid_t tid) {
  if (!fs_unshared) {
    if (auto r = Sys([] { return ::unshare(CLONE_FS); }); !r) return std::unexpected(r.error());
    fs_unshared = true;
  }
  auto creds = ReadCreds(tid);
  if (!creds) return std::unexpected(creds.error());
  const std::string proc = "/proc/" + std::to_string(tid);
  auto root = Sys([&] { return ::open((proc + "/root").c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC); });
  if (!root) return std::unexpected(root.error());
  UniqueFd caller_root(*root);
  auto cwd = Sys([&] { return ::open((proc + "/cwd").c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC); });
  if (!cwd) return std::unexpected(cwd.error());
  UniqueFd caller_cwd(*cwd);

  CallerFs c;
  auto own_root = Sys([] { return ::open("/", O_PATH | O_DIRECTORY | O_CLOEXEC); });
  auto own_cwd = Sys([] { return ::open(".", O_PATH | O_DIRECTORY | O_CLOEXEC); });
  if (!own_root || !own_cwd) return Fail(EMFILE);
  c.own_root_.Reset(*own_root);
  c.own_cwd_.Reset(*own_cwd);
  c.own_fsuid_ = static_cast<uid_t>(::syscall(SYS_setfsuid, -1));
  c.own_fsgid_ = static_cast<gid_t>(::syscall(SYS_setfsgid, -1));
  const int n = ::getgroups(0, nullptr);
  c.own_groups_.resize(static_cast<size_t>(std::max(n, 0)));
  if (n > 0) ::getgroups(n, c.own_groups_.data());
  c.own_umask_ = ::umask(creds->umask);
  c.active_ = true;  // from here on, Leave puts things back
  if (::fchdir(caller_root.get()) != 0 || ::chroot(".") != 0 || ::fchdir(caller_cwd.get()) != 0) {
    const int err = errno;
    c.Leave();
    return Fail(err);
  }
  SetFsIds(creds->fsuid, creds->fsgid, creds->groups);
  return c;
}

CallerFs::CallerFs(CallerFs&& other) noexcept
    : active_(std::exchange(other.active_, false)),
      own_root_(std::move(other.own_root_)),
      own_cwd_(std::move(other.own_cwd_)),
      own_umask_(other.own_umask_),
      own_fsuid_(other.own_fsuid_),
      own_fsgid_(other.own_fsgid_),
      own_groups_(std::move(other.own_groups_)) {}

CallerFs::~CallerFs() { Leave(); }

void CallerFs::Leave() noexcept {
  if (!active_) return;
  active_ = false;
  SetFsIds(own_fsuid_, own_fsgid_, own_groups_);
  ::umask(own_umask_);
  // Back to our own root: chroot to the directory the descriptor names.
  if (::fchdir(own_root_.get()) == 0) (void)::chroot(".");
  (void)::fchdir(own_cwd_.get());
}

Result<CallerIds> CallerIds::Enter(pid_t tid, What what) {
  CallerIds c;
  ThreadCaps own;
  if (!own.Get()) return Fail(errno);
  if (what == What::kCapabilities) {
    ThreadCaps theirs;
    if (!theirs.Get(tid)) return Fail(errno);
    const uint64_t effective = theirs.Effective() & own.Permitted();
    if (effective == own.Effective()) return c;
    c.active_ = true;
    c.own_caps_ = own.Effective();
    if (!own.SetEffective(effective)) {
      const int err = errno;
      c.Leave();
      return Fail(err);
    }
    return c;
  }
  auto creds = ReadCreds(tid);
  if (!creds) return std::unexpected(creds.error());
  uid_t saved_uid;
  gid_t saved_gid;
  ::getresuid(&c.own_ruid_, &c.own_euid_, &saved_uid);
  ::getresgid(&c.own_rgid_, &c.own_egid_, &saved_gid);
  const int n = ::getgroups(0, nullptr);
  c.own_groups_.resize(static_cast<size_t>(std::max(n, 0)));
  if (n > 0) ::getgroups(n, c.own_groups_.data());
  // Ids change only where this thread can come back (root, saved uid 0).
  c.ids_ = c.own_euid_ == 0 && saved_uid == 0 &&
           !(creds->ruid == c.own_ruid_ && creds->euid == c.own_euid_ && creds->rgid == c.own_rgid_ &&
             creds->egid == c.own_egid_ && creds->groups == c.own_groups_);
  const uint64_t effective = creds->cap_effective & own.Permitted();
  if (!c.ids_ && effective == own.Effective()) return c;
  c.active_ = true;  // from here on, Leave puts things back
  c.own_caps_ = own.Effective();
  // Groups first, while the thread still holds CAP_SETGID; the user next; then the
  // caller's capabilities (an effective uid other than 0 has cleared them all).
  if ((c.ids_ && (::syscall(SYS_setgroups, creds->groups.size(), creds->groups.data()) != 0 ||
                  ::syscall(SYS_setresgid, creds->rgid, creds->egid, -1) != 0 ||
                  ::syscall(SYS_setresuid, creds->ruid, creds->euid, -1) != 0)) ||
      !own.SetEffective(effective)) {
    const int err = errno;
    c.Leave();
    return Fail(err);
  }
  return c;
}

CallerIds::CallerIds(CallerIds&& other) noexcept
    : active_(std::exchange(other.active_, false)),
      ids_(other.ids_),
      own_ruid_(other.own_ruid_),
      own_euid_(other.own_euid_),
      own_rgid_(other.own_rgid_),
      own_egid_(other.own_egid_),
      own_groups_(std::move(other.own_groups_)),
      own_caps_(other.own_caps_) {}

CallerIds::~CallerIds() { Leave(); }

void CallerIds::Leave() noexcept {
  if (!active_) return;
  active_ = false;
  // The user first: an effective uid of 0 gives the thread its permitted set back;
  // then exactly the effective set it had.
  ThreadCaps caps;
  if ((ids_ && (::syscall(SYS_setresuid, own_ruid_, own_euid_, -1) != 0 ||
                ::syscall(SYS_setresgid, own_rgid_, own_egid_, -1) != 0 ||
                ::syscall(SYS_setgroups, own_groups_.size(), own_groups_.data()) != 0)) ||
      !caps.Get() || !caps.SetEffective(own_caps_)) {
    // This thread would go on serving as the caller: never let it.
    std::abort();
  }
}

Result<CallerCredentials> ReadCallerCredentials(pid_t tid, int pidfd) {
  // struct pidfd_info (linux/pidfd.h, Linux 6.13), its first version.
  struct PidfdInfo {
    uint64_t mask = 0, cgroupid = 0;
    uint32_t pid = 0, tgid = 0, ppid = 0, ruid = 0, rgid = 0, euid = 0, egid = 0, suid = 0, sgid = 0, fsuid = 0,
             fsgid = 0;
    int32_t exit_code = 0;
  };
  constexpr uint64_t kInfoPid = 1, kInfoCreds = 2;
  constexpr unsigned long kGetInfo = _IOWR(0xFF, 11, PidfdInfo);  // PIDFD_GET_INFO
  PidfdInfo info;
  info.mask = kInfoPid | kInfoCreds;
  if (pidfd >= 0 && ::ioctl(pidfd, kGetInfo, &info) == 0 && (info.mask & (kInfoPid | kInfoCreds)) == (kInfoPid | kInfoCreds))
    return CallerCredentials{static_cast<pid_t>(info.tgid), info.ruid, info.fsuid, info.rgid};
  // No such call, or a pidfd kept for a thread that has ended (ESRCH) while `tid`
  // went to another, the caller: its /proc says.
  auto creds = ReadCreds(tid);
  if (!creds) return std::unexpected(creds.error());
  return CallerCredentials{creds->tgid, creds->ruid, creds->fsuid, creds->rgid};
}

bool CredentialsNameCaller(pid_t tid, ucred& c) {
  auto creds = ReadCreds(tid);
  if (!creds || creds->tgid == 0 || c.pid != creds->own_tgid) return false;
  const bool uid_ok = c.uid == creds->ruid || c.uid == creds->euid || c.uid == creds->suid ||
                      (creds->cap_effective >> CAP_SETUID) & 1;
  const bool gid_ok = c.gid == creds->rgid || c.gid == creds->egid || c.gid == creds->sgid ||
                      (creds->cap_effective >> CAP_SETGID) & 1;
  if (!uid_ok || !gid_ok) return false;
  c.pid = creds->tgid;
  return true;
}

std::string CallerFs::Cwd() const {
  char buf[PATH_MAX];
  if (::getcwd(buf, sizeof buf) == nullptr) return "";
  return buf;
}

}  // namespace ulsp::net
