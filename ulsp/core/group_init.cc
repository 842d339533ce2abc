#include "ulsp/core/group_init.h"

#include <fcntl.h>
#include <linux/close_range.h>
#include <linux/capability.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "kernel/msgport/seccomp_shim.h"
#include "ulsp/core/mount.h"

namespace ulsp::core {
namespace {

int g_sock = -1;

void Say(const std::string& text, int fd_to_pass = -1) {
  msghdr h{};
  iovec iov{const_cast<char*>(text.data()), text.size()};
  h.msg_iov = &iov;
  h.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  if (fd_to_pass >= 0) {
    h.msg_control = control;
    h.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&h);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &fd_to_pass, sizeof(int));
  }
  // write(2), not send: once the seccomp filter is loaded, sendmsg would wait for the
  // very supervisor it is talking to.
  if (fd_to_pass < 0) {
    while (::write(g_sock, text.data(), text.size()) < 0 && errno == EINTR) {
    }
    return;
  }
  while (::sendmsg(g_sock, &h, MSG_NOSIGNAL) < 0 && errno == EINTR) {
  }
}

[[noreturn]] void Die(const std::string& what) {
  Say("error " + what);
  _exit(125);
}

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

// Waits for the supervisor's answer to a step; dies unless it is "ok".
void Expect(const std::string& step) {
  char buf[4096];
  ssize_t n;
  while ((n = ::read(g_sock, buf, sizeof buf)) < 0 && errno == EINTR) {
  }
  if (n <= 0) _exit(125);  // the supervisor is gone; it says why
  const std::string answer(buf, static_cast<size_t>(n));
  if (answer != "ok") Die(step + ": " + answer);
}

bool Exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

void BindOver(const std::string& source, const std::string& target, bool recursive) {
  if (!Exists(target)) return;  // nothing there to cover: the view does not have it
  if (::mount(source.c_str(), target.c_str(), nullptr, MS_BIND | (recursive ? MS_REC : 0), nullptr) != 0)
    Die(Errno("binding " + source + " on " + target));
}

// The host's devices a group gets, in a /dev of its own (MinimalDev).
constexpr const char* kDevices[] = {"null", "zero", "full", "random", "urandom", "tty"};

// Each of kDevices in the host's /dev, opened O_PATH (the device itself is not
// opened) before any mount of the group's can cover it; -1 for one the host lacks
// (a container's /dev may have no tty), which the group then lacks too.
std::vector<int> OpenHostDevices() {
  std::vector<int> fds;
  for (const char* name : kDevices) {
    const std::string path = std::string("/dev/") + name;
    const int fd = ::open(path.c_str(), O_PATH | O_CLOEXEC);
    if (fd < 0 && errno != ENOENT) Die(Errno(path));
    fds.push_back(fd);
  }
  return fds;
}

// A /dev of the group's own at `dev`, as Docker gives a container: a tmpfs with the
// host's kDevices bound in, a pseudo-terminal instance of its own (devpts, ptmx), a
// /dev/shm, and the usual links. The host's /dev held its disks (root, with
// CAP_DAC_OVERRIDE, could open /dev/sda and write past every stack), /dev/kvm,
// loop devices and consoles. Closes `host`.
void MinimalDev(const std::string& dev, std::vector<int>& host) {
  if (Exists(dev)) {
    if (::mount("tmpfs", dev.c_str(), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755,size=65536") != 0)
      Die(Errno("mounting the group's /dev"));
    for (size_t i = 0; i < host.size(); ++i) {
      if (host[i] < 0) continue;
      const std::string path = dev + "/" + kDevices[i];
      const int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0666);
      if (fd < 0) Die(Errno(path));
      ::close(fd);
      BindOver("/proc/self/fd/" + std::to_string(host[i]), path, false);
    }
    const std::string pts = dev + "/pts", shm = dev + "/shm";
    if (::mkdir(pts.c_str(), 0755) != 0 ||
        ::mount("devpts", pts.c_str(), "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5") != 0)
      Die(Errno("mounting the group's /dev/pts"));
    if (::mkdir(shm.c_str(), 01777) != 0 ||
        ::mount("tmpfs", shm.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") != 0)
      Die(Errno("mounting the group's /dev/shm"));
    for (const auto& [link, to] : {std::pair{"ptmx", "pts/ptmx"}, std::pair{"fd", "/proc/self/fd"},
                                   std::pair{"stdin", "/proc/self/fd/0"}, std::pair{"stdout", "/proc/self/fd/1"},
                                   std::pair{"stderr", "/proc/self/fd/2"}}) {
      if (::symlink(to, (dev + "/" + link).c_str()) != 0) Die(Errno(dev + "/" + link));
    }
  }
  for (int fd : host)
    if (fd >= 0) ::close(fd);
  host.clear();
}

void LoopbackUp() {
  const int s = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) Die(Errno("socket"));
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
  if (::ioctl(s, SIOCGIFFLAGS, &ifr) != 0) Die(Errno("lo"));
  ifr.ifr_flags = static_cast<short>(ifr.ifr_flags | IFF_UP | IFF_RUNNING);
  if (::ioctl(s, SIOCSIFFLAGS, &ifr) != 0) Die(Errno("bringing lo up"));
  ::close(s);
}

// Docker's default capabilities but CAP_NET_RAW. A group's TCP and UDP sockets are the
// host's (the net ULSP makes them there), and on them CAP_NET_RAW is IP_TRANSPARENT (a
// spoofed source address on an allowed send), SO_MARK (past the host's mark-based
// routing and firewall) and IPv4 source routing; its raw and ICMP sockets could reach
// only the group's own loopback. Not CAP_DAC_READ_SEARCH either (Docker drops it too):
// with it, open_by_handle_at on any descriptor of the host's file system (a stdout
// redirected to a file) opens the host's root directory, past the group's root stack.
// CAP_DAC_OVERRIDE lets root read and search as before. Nor CAP_MKNOD: a device node
// made anywhere the group may write (the host's own tree, through a root stack) would
// open a host device past the group's /dev (MinimalDev); FIFOs need no capability.
constexpr int kKeptCaps[] = {CAP_CHOWN,  CAP_DAC_OVERRIDE, CAP_FOWNER,  CAP_FSETID,      CAP_KILL,
                             CAP_SETGID, CAP_SETUID,       CAP_SETPCAP, CAP_NET_BIND_SERVICE, CAP_SYS_CHROOT,
                             CAP_AUDIT_WRITE, CAP_SETFCAP};

// Without set_id_files, CAP_SETFCAP goes too: file capabilities (setcap) on a file the
// group leaves on the host give whoever runs it those rights, as a set-user-ID bit
// does (which the filter refuses).
void DropCapabilities(bool set_id_files) {
  int last = CAP_LAST_CAP;
  if (std::ifstream f("/proc/sys/kernel/cap_last_cap"); f) f >> last;
  uint64_t keep = 0;
  for (int c : kKeptCaps) keep |= 1ull << c;
  if (!set_id_files) keep &= ~(1ull << CAP_SETFCAP);
  for (int c = 0; c <= last; ++c) {
    if ((keep >> c) & 1) continue;
    if (::prctl(PR_CAPBSET_DROP, c, 0, 0, 0) != 0 && errno != EINVAL) Die(Errno("dropping capability " + std::to_string(c)));
  }
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  if (::syscall(SYS_capget, &header, data) != 0) Die(Errno("capget"));
  for (int i = 0; i < 2; ++i) {
    const uint32_t mask = static_cast<uint32_t>(keep >> (32 * i));
    data[i].effective &= mask;
    data[i].permitted &= mask;
    data[i].inheritable &= mask;
  }
  if (::syscall(SYS_capset, &header, data) != 0) Die(Errno("capset"));
  ::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
}

// Sets a policy's limit, soft and hard. One above the hard limit that this process
// may not raise (without CAP_SYS_RESOURCE, as in some containers) becomes that hard
// limit, with a warning: a lower ceiling still limits, and the policy stays usable.
void Limit(int resource, const std::optional<uint64_t>& value, const char* name, const std::string& who) {
  if (!value) return;
  rlimit r{static_cast<rlim_t>(*value), static_cast<rlim_t>(*value)};
  if (::setrlimit(resource, &r) == 0) return;
  rlimit now{};
  if (errno == EPERM && ::getrlimit(resource, &now) == 0 && now.rlim_max < r.rlim_max) {
    const auto hard = static_cast<unsigned long long>(now.rlim_max);
    std::fprintf(stderr,
                 "%s: limit %s = %llu is above the hard limit %llu, which this process may not raise "
                 "(it lacks CAP_SYS_RESOURCE): the group gets %llu\n",
                 who.c_str(), name, static_cast<unsigned long long>(*value), hard, hard);
    r = {now.rlim_max, now.rlim_max};
    if (::setrlimit(resource, &r) == 0) return;
  }
  Die(Errno(std::string("limit ") + name));
}

// Mount `point` read-only in the group's mount namespace.
void RemountReadOnly(const std::string& point) {
  struct statvfs st{};
  if (::statvfs(point.c_str(), &st) != 0) Die(Errno("the mount " + point));
  unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY;
  // A remount must keep what it does not change, or the kernel refuses it.
  if (st.f_flag & ST_NOSUID) flags |= MS_NOSUID;
  if (st.f_flag & ST_NODEV) flags |= MS_NODEV;
  if (st.f_flag & ST_NOEXEC) flags |= MS_NOEXEC;
  if (st.f_flag & ST_NOATIME) flags |= MS_NOATIME;
  if (st.f_flag & ST_NODIRATIME) flags |= MS_NODIRATIME;
  if (st.f_flag & ST_RELATIME) flags |= MS_RELATIME;
  if (::mount(nullptr, point.c_str(), nullptr, flags, nullptr) != 0)
    Die(Errno("making the mount " + point + " read-only in the group"));
}

// Every cgroup file system the group sees, read-only in its mount namespace (as
// Docker mounts them): the command keeps CAP_DAC_OVERRIDE, and a cgroup's files are
// root's, so it could otherwise write its own pid into another cgroup's
// cgroup.procs and leave its process limit. It cannot remount (no CAP_SYS_ADMIN).
void SealCgroups() {
  for (const MountEntry& m : Mounts())
    if (m.fstype == "cgroup" || m.fstype == "cgroup2") RemountReadOnly(m.point);
}

// The kernel's settings for the whole host, read-only in the group's mount namespace
// as Docker mounts them: /proc/sys (root, even without capabilities, may write most
// of it, and kernel.core_pattern = "|PROGRAM" has the host's kernel run PROGRAM as
// root at the next crash), /proc/sysrq-trigger, /proc/irq, /proc/bus, /proc/fs, and
// /sys with every mount beneath it; and what Docker hides, hidden. The command cannot
// remount them (no CAP_SYS_ADMIN).
void SealKernelSettings() {
  for (const char* path : {"/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs"}) {
    if (!Exists(path)) continue;
    if (::mount(path, path, nullptr, MS_BIND | MS_REC, nullptr) != 0) Die(Errno(std::string("binding ") + path));
    RemountReadOnly(path);
  }
  // What Docker hides too: the keys of the host's users (/proc/keys names them), the
  // host's timers, its firmware's tables and memory map, and the energy counters a
  // power side channel reads (Platypus). Files read as /dev/null, directories as empty.
  for (const char* path : {"/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/latency_stats",
                           "/proc/timer_stats", "/proc/kcore"}) {
    if (Exists(path) && Exists("/dev/null") && ::mount("/dev/null", path, nullptr, MS_BIND, nullptr) != 0)
      Die(Errno(std::string("hiding ") + path));
  }
  for (const char* path : {"/proc/acpi", "/proc/scsi", "/proc/asound", "/sys/firmware", "/sys/devices/virtual/powercap"}) {
    if (Exists(path) && ::mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0") != 0)
      Die(Errno(std::string("hiding ") + path));
  }
  for (const MountEntry& m : Mounts())
    if (m.point == "/sys" || m.point.starts_with("/sys/")) RemountReadOnly(m.point);
}

// Device nodes open only in the group's /dev: every other mount the group sees is made
// nodev. Without a root stack the group sees the host's own tree, and a node left on
// it (a chroot's /dev, one made by hand) opened the host's device past the group's
// /dev, whatever its mode (CAP_DAC_OVERRIDE). The stacks' mounts are nodev already.
// Then the devices MinimalDev bound in, and the group's devpts, may be opened again.
void NoDevicesButTheGroups() {
  mount_attr nodev{};
  nodev.attr_set = MOUNT_ATTR_NODEV;
  if (::mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, &nodev, sizeof nodev) != 0) Die(Errno("making the group's mounts nodev"));
  mount_attr dev{};
  dev.attr_clr = MOUNT_ATTR_NODEV;
  std::vector<std::string> ours{"/dev/pts"};
  for (const char* name : kDevices) ours.push_back(std::string("/dev/") + name);
  for (const std::string& path : ours) {
    // Only a mount of its own: not the mount a missing device's path falls in.
    struct statx st {};
    if (::statx(AT_FDCWD, path.c_str(), AT_SYMLINK_NOFOLLOW, 0, &st) != 0 || !(st.stx_attributes & STATX_ATTR_MOUNT_ROOT))
      continue;
    if (::mount_setattr(AT_FDCWD, path.c_str(), 0, &dev, sizeof dev) != 0) Die(Errno("letting the group open " + path));
  }
}

constexpr int kForwarded[] = {SIGINT, SIGQUIT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGCONT};

int StatusOf(int wait_status) {
  if (WIFEXITED(wait_status)) return WEXITSTATUS(wait_status);
  if (WIFSIGNALED(wait_status)) return 128 + WTERMSIG(wait_status);
  return 125;
}

// Without a pid namespace: kill what the command left behind (this process is their
// subreaper, so orphans come to it), until nothing is left.
void KillLeftovers() {
  const std::string children = "/proc/self/task/" + std::to_string(::getpid()) + "/children";
  for (int round = 0; round < 1000; ++round) {
    std::ifstream in(children);
    std::vector<pid_t> pids;
    for (pid_t p; in >> p;) pids.push_back(p);
    if (pids.empty()) return;
    for (pid_t p : pids) ::kill(p, SIGKILL);
    while (::waitpid(-1, nullptr, 0) > 0) {
    }
  }
}

}  // namespace

void GroupMain(const GroupPlan& plan, int sock) {
  g_sock = sock;
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) _exit(125);
  if (plan.pid_namespace) {
    if (::unshare(CLONE_NEWPID) != 0) Die(Errno("unshare(CLONE_NEWPID)"));
    const pid_t init = ::fork();
    if (init < 0) Die(Errno("fork"));
    if (init > 0) {
      // The process between the supervisor and the group's pid 1: it only waits.
      for (int sig : kForwarded) ::signal(sig, SIG_IGN);
      ::close(g_sock);
      int status = 0;
      while (::waitpid(init, &status, 0) < 0 && errno == EINTR) {
      }
      _exit(StatusOf(status));
    }
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) _exit(125);
  }
  // The cgroup the command joins itself (group_memory's, in cgroup v1), reached
  // through the host's mount of it: the group's is made read-only.
  const int command_cgroup = plan.command_cgroup.empty() ? -1 : ::open(plan.command_cgroup.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (!plan.command_cgroup.empty() && command_cgroup < 0) Die(Errno("the group's cgroup " + plan.command_cgroup));
  if (::unshare(CLONE_NEWNS | CLONE_NEWNET) != 0) Die(Errno("unshare(CLONE_NEWNS | CLONE_NEWNET)"));
  // Loopback first: the supervisor starts the group's resolver (127.0.0.53) on hello.
  LoopbackUp();
  // The supervisor reads this process's host pid off the message and opens the new
  // network namespace by it, so this process waits until it has: a step that fails
  // later must not take the namespace with it first.
  Say("hello");
  Expect("hello");
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) Die(Errno("making / private"));
  // Without a root stack the group sees the host's own tree, and root in the group
  // may change it (its /etc, its users' files). With read_only_host every mount of it
  // the group sees is made read-only here, before the group's own mounts go on: its
  // stacks, /dev, /proc and a private /tmp stay writable. (mount_setattr changes this
  // namespace's mounts only; the host's stay as they are.)
  if (plan.read_only_host && plan.staging.empty()) {
    mount_attr ro{};
    ro.attr_set = MOUNT_ATTR_RDONLY;
    if (::mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, &ro, sizeof ro) != 0) Die(Errno("making the host's tree read-only"));
    // The host's /proc, seen without a pid namespace: its per-process files take
    // writes (oom_score_adj, comm); the kernel's settings are sealed read-only below.
    mount_attr rw{};
    rw.attr_clr = MOUNT_ATTR_RDONLY;
    if (!plan.pid_namespace && ::mount_setattr(AT_FDCWD, "/proc", 0, &rw, sizeof rw) != 0)
      Die(Errno("letting the group write /proc"));
  }

  // The files bound over /etc/resolv.conf and /etc/hosts are opened now: a mount of
  // the group's may cover where they are.
  const int resolv_fd = ::open(plan.resolv_conf.c_str(), O_PATH | O_CLOEXEC);
  const int hosts_fd = ::open(plan.hosts.c_str(), O_PATH | O_CLOEXEC);
  if (resolv_fd < 0 || hosts_fd < 0) Die(Errno("opening " + plan.resolv_conf));
  std::vector<int> host_devices = OpenHostDevices();
  const std::string& prefix = plan.staging;
  // The private /tmp goes on after the mount that holds /tmp (the root stack's) and
  // before any mount beneath it, which it would otherwise hide; the mount points
  // beneath it are made in it (it is the group's own, empty).
  bool tmp_done = !plan.private_tmp;
  auto private_tmp = [&] {
    tmp_done = true;
    if (!Exists(prefix + "/tmp")) return;
    if (::mount("tmpfs", (prefix + "/tmp").c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") != 0)
      Die(Errno("mounting a private /tmp"));
  };
  for (size_t i = 0; i < plan.mounts.size(); ++i) {
    const GroupPlan::Mount& m = plan.mounts[i];
    const std::string target = m.path == "/" ? prefix : prefix + m.path;
    const bool in_tmp = m.path.starts_with("/tmp/");
    if (!tmp_done && in_tmp) {
      private_tmp();
      std::error_code error;
      std::filesystem::create_directories(target, error);
      if (error) Die(m.where + ": making the mount point " + m.path + " in the private /tmp: " + error.message());
    }
    if (!Exists(target)) Die(m.where + ": mount point " + m.path + " does not exist");
    const int fd = ::open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fd < 0) Die(Errno("/dev/fuse"));
    std::string opts = "fd=" + std::to_string(fd) + ",rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other";
    if (m.isolated) opts += ",max_read=131072";
    // nodev: a device node a stack serves (a passthrough of a tree that holds some)
    // opens nothing; the group's devices are its /dev's.
    if (::mount(m.fsname.c_str(), target.c_str(), "fuse.ulsp", MS_NOSUID | MS_NODEV | (m.read_only ? MS_RDONLY : 0),
                opts.c_str()) != 0)
      Die(Errno("mounting the stack on " + m.path));
    Say("mount " + std::to_string(i), fd);
    ::close(fd);
    Expect("mount " + m.path);
  }
  MinimalDev(prefix + "/dev", host_devices);
  if (!prefix.empty()) {
    BindOver("/sys", prefix + "/sys", true);
    if (!plan.pid_namespace) BindOver("/proc", prefix + "/proc", true);
  }
  if (plan.pid_namespace && Exists(prefix + "/proc")) {
    if (::mount("proc", (prefix + "/proc").c_str(), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0)
      Die(Errno("mounting /proc"));
  }
  if (!tmp_done) private_tmp();
  BindOver("/proc/self/fd/" + std::to_string(resolv_fd), prefix + "/etc/resolv.conf", false);
  BindOver("/proc/self/fd/" + std::to_string(hosts_fd), prefix + "/etc/hosts", false);
  ::close(resolv_fd);
  ::close(hosts_fd);
  if (!prefix.empty()) {
    if (::chdir(prefix.c_str()) != 0) Die(Errno("chdir " + prefix));
    if (::syscall(SYS_pivot_root, ".", ".") != 0) Die(Errno("pivot_root"));
    if (::umount2(".", MNT_DETACH) != 0) Die(Errno("detaching the old root"));
  }
  // Where the command was started, or nowhere: run from "/" instead, its relative
  // paths would name other files (for a root stack over "/", the host's own).
  if (::chdir(plan.cwd.c_str()) != 0) {
    const bool in_tmp = plan.private_tmp && (plan.cwd == "/tmp" || plan.cwd.starts_with("/tmp/"));
    Die(Errno("the current directory " + plan.cwd + " is not in the group" +
              (in_tmp ? " (its /tmp is a private one)" : "")) +
        ": start it from a directory the group sees");
  }

  NoDevicesButTheGroups();
  if (plan.seal_cgroups) SealCgroups();
  SealKernelSettings();

  if (plan.files_hard != 0) {  // the caller's, not the one a passthrough layer raised
    const rlimit files{plan.files_soft, plan.files_hard};
    ::setrlimit(RLIMIT_NOFILE, &files);
  }
  Limit(RLIMIT_CPU, plan.cpu_seconds, "cpu_seconds", plan.who);
  Limit(RLIMIT_AS, plan.memory_bytes, "memory", plan.who);
  Limit(RLIMIT_NOFILE, plan.open_files, "open_files", plan.who);
  Limit(RLIMIT_FSIZE, plan.file_size_bytes, "file_size", plan.who);
  if (!plan.pid_namespace) ::prctl(PR_SET_CHILD_SUBREAPER, 1);
  DropCapabilities(plan.set_id_files);

  // Signals are taken through a signalfd, not handlers: the init waits for them and
  // for its children in one place, and nothing runs in a signal handler.
  ::signal(SIGPIPE, SIG_DFL);
  sigset_t taken;
  sigemptyset(&taken);
  for (int sig : kForwarded) sigaddset(&taken, sig);
  sigaddset(&taken, SIGCHLD);
  ::sigprocmask(SIG_BLOCK, &taken, nullptr);
  const int sigfd = ::signalfd(-1, &taken, SFD_CLOEXEC);
  if (sigfd < 0) Die(Errno("signalfd"));

  auto listener = msgport::LoadGroupFilter(plan.set_id_files);
  if (!listener) Die("loading the seccomp filter: " + listener.error().Describe());
  Say("listener " + std::to_string(listener->get()));
  Expect("seccomp");
  listener->Reset();
  ::close(g_sock);

  std::vector<char*> argv;
  for (const std::string& a : plan.command) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const pid_t command = ::fork();
  if (command < 0) {
    std::fprintf(stderr, "%s: fork: %s\n", plan.who.c_str(), std::strerror(errno));
    _exit(125);
  }
  if (command == 0) {
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::umask(plan.umask);
    if (command_cgroup >= 0) {  // "0": the writer itself
      const int procs = ::openat(command_cgroup, "cgroup.procs", O_WRONLY | O_CLOEXEC);
      if (procs < 0 || ::write(procs, "0", 1) != 1) {
        std::fprintf(stderr, "%s: joining the group's cgroup %s: %s\n", plan.who.c_str(), plan.command_cgroup.c_str(), std::strerror(errno));
        _exit(125);
      }
      ::close(procs);
    }
    // Only standard input, output and error go in: a socket inherited from outside
    // the group (opened before `ulsp run`) would be a way around its rules.
    ::syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC);
    ::execvp(argv[0], argv.data());
    const int err = errno;
    std::fprintf(stderr, "%s: %s: %s\n", plan.who.c_str(), argv[0], std::strerror(err));
    _exit(err == ENOENT ? 127 : 126);
  }
  int code = 125;
  for (bool running = true; running;) {
    signalfd_siginfo si{};
    const ssize_t n = ::read(sigfd, &si, sizeof si);
    if (n != sizeof si) {
      if (n < 0 && errno == EINTR) continue;
      break;
    }
    const int sig = static_cast<int>(si.ssi_signo);
    if (sig == SIGCHLD) {
      int status = 0;
      for (pid_t p; (p = ::waitpid(-1, &status, WNOHANG)) > 0;) {
        if (p == command) {
          code = StatusOf(status);
          running = false;
        }
      }
      continue;
    }
    // Keyboard signals reach the command from the terminal itself: pass on only
    // those another process sent (the supervisor, passing on its own).
    if ((sig == SIGINT || sig == SIGQUIT) && si.ssi_code != SI_USER) continue;
    ::kill(command, sig);
  }
  if (!plan.pid_namespace) KillLeftovers();
  _exit(code);
}

}  // namespace ulsp::core
