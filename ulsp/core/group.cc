#include "ulsp/core/group.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <thread>

#include "kernel/msgport/direct_port.h"
#include "kernel/msgport/fuse_shim.h"
#include "kernel/msgport/log.h"
#include "kernel/msgport/own_file.h"
#include "kernel/msgport/seccomp_shim.h"
#include "ulsp/core/cgroup.h"
#include "ulsp/core/group_init.h"
#include "ulsp/core/isolated.h"
#include "ulsp/core/policy.h"
#include "ulsp/core/registry.h"
#include "ulsp/net/conn_log.h"
#include "ulsp/net/names.h"
#include "ulsp/net/net_server.h"
#include "ulsp/net/resolver.h"
#include "ulsp/vfs/stack.h"

namespace ulsp::core {
namespace {

constexpr int kUlspFailed = 125;
constexpr int kTimedOut = 124;

int Error(const std::string& message) {
  std::fprintf(stderr, "ulsp run: %s\n", message.c_str());
  return kUlspFailed;
}

// One of the group's mounts, served in this process (or by an isolated server).
struct MountServer {
  MountPolicy policy;
  std::unique_ptr<vfs::StackServer> server;  // in-process stacks
  std::unique_ptr<msgport::Port> port;       // DirectPort, or IsolatedPort
  IsolatedPort* isolated = nullptr;
  std::unique_ptr<msgport::FuseShim> shim;
  std::thread thread;
  std::mutex mu;
  std::condition_variable cv;
  bool ready = false;
};

// A message of the group's init, with the descriptor and the sender's host pid.
struct Said {
  std::string text;
  UniqueFd fd;
  pid_t pid = 0;
};

// Waits for the next message of the group's init. Empty text: it is gone.
Said Hear(int sock) {
  Said s;
  char buf[4096];
  iovec iov{buf, sizeof buf};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int)) + CMSG_SPACE(sizeof(ucred))];
  msghdr h{};
  h.msg_iov = &iov;
  h.msg_iovlen = 1;
  h.msg_control = control;
  h.msg_controllen = sizeof control;
  ssize_t n;
  while ((n = ::recvmsg(sock, &h, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR) {
  }
  if (n <= 0) return s;
  s.text.assign(buf, static_cast<size_t>(n));
  for (cmsghdr* c = CMSG_FIRSTHDR(&h); c != nullptr; c = CMSG_NXTHDR(&h, c)) {
    if (c->cmsg_level != SOL_SOCKET) continue;
    if (c->cmsg_type == SCM_RIGHTS && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c), sizeof fd);
      s.fd.Reset(fd);
    } else if (c->cmsg_type == SCM_CREDENTIALS) {
      ucred cred;
      std::memcpy(&cred, CMSG_DATA(c), sizeof cred);
      s.pid = cred.pid;
    }
  }
  return s;
}

void Answer(int sock, const std::string& text) { (void)::send(sock, text.data(), text.size(), MSG_NOSIGNAL); }

// A size as a policy would write it: "64M", "3G", or bytes.
std::string Bytes(uint64_t n) {
  for (const auto& [unit, size] : {std::pair{"T", 1ull << 40}, {"G", 1ull << 30}, {"M", 1ull << 20}, {"K", 1ull << 10}})
    if (n % size == 0) return std::to_string(n / size) + unit;
  return std::to_string(n) + " bytes";
}

}  // namespace

std::string JoinCommand(const std::vector<std::string>& words) {
  std::string s;
  for (const auto& w : words) s += (s.empty() ? "" : " ") + w;
  return s;
}

int CheckPolicy(const std::string& file) {
  auto policy = LoadPolicy(file);
  if (!policy) {
    std::fprintf(stderr, "ulsp policy check: %s\n", policy.error().c_str());
    return 1;
  }
  auto count = [](size_t n, const char* what) { return std::to_string(n) + " " + what + (n == 1 ? "" : "s"); };
  std::string names;
  for (const auto& [name, g] : policy->groups) {
    names += (names.empty() ? "" : ", ") + name + " (" + count(g.mounts.size(), "mount") + ", " +
             count(g.net.rules().size(), "net rule") + ", net_default " + (g.net.default_allow() ? "allow" : "deny") + ")";
  }
  std::printf("%s: ok: %s\n", file.c_str(), names.c_str());
  return 0;
}

int Run(const RunArgs& args) {
  if (args.command.empty()) return Error("give the command to run after --");
  auto policy = LoadPolicy(args.policy);
  if (!policy) return Error(policy.error());
  auto chosen = policy->Group(args.group);
  if (!chosen) return Error(chosen.error());
  GroupRun run;
  run.policy = *chosen;
  run.policy_file = std::filesystem::absolute(policy->file).string();
  run.command = args.command;
  return RunGroup(run);
}

namespace {
// The umask and open-file limit this program was started with, taken before main: a
// passthrough layer, which may be built before RunGroup (pkgdep-vfs builds its stack
// first), sets the process's umask to 0 and its open-file limit as high as it may go
// (a million with root's hard limit), and the group's command must inherit neither.
struct Start {
  mode_t umask = 022;
  rlimit files{};
};
const Start kStart = [] {
  Start s;
  s.umask = ::umask(022);
  ::umask(s.umask);
  if (::getrlimit(RLIMIT_NOFILE, &s.files) != 0) s.files = {};
  return s;
}();
}  // namespace

int RunGroup(GroupRun& run) {
  const std::string prefix = run.who;
  auto Error = [&prefix](const std::string& message) {
    std::fprintf(stderr, "%s: %s\n", prefix.c_str(), message.c_str());
    return kUlspFailed;
  };
  const GroupPolicy& group = *run.policy;
  if (run.command.empty()) return Error("give the command to run after --");
  if (run.command.front().empty()) return Error("the command after -- is an empty string");
  if (::geteuid() != 0) return Error("needs root (it makes namespaces and mounts, and serves seccomp notifications)");
  // A standard stream that is a directory (`< /`) would let the group past its mounts:
  // /proc/self/fd/0/etc/... walks the host's tree from it.
  for (int fd = 0; fd <= 2; ++fd) {
    struct stat st {};
    if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
      static constexpr const char* kNames[] = {"stdin", "stdout", "stderr"};
      return Error(std::string(kNames[fd]) +
                   " is a directory, which would let the group past its mounts: redirect it from a file or /dev/null");
    }
  }
  ::signal(SIGPIPE, SIG_IGN);  // the net ULSP writes to sockets the group may close

  // The stacks, before anything starts: a bad one is reported and nothing runs.
  std::vector<std::unique_ptr<MountServer>> mounts;
  for (size_t i = 0; i < group.mounts.size(); ++i) {
    const MountPolicy& mp = group.mounts[i];
    auto m = std::make_unique<MountServer>();
    m->policy = mp;
    std::unique_ptr<vfs::Layer> top = i < run.stacks.size() ? std::move(run.stacks[i]) : nullptr;
    if (!top) {
      auto built = vfs::BuildStack(mp.stack);
      if (!built) return Error(mp.where + ": " + built.error());
      top = std::move(*built);
    }
    if (!mp.isolated) {
      m->server = std::make_unique<vfs::StackServer>(std::move(top));
      m->port = std::make_unique<msgport::DirectPort>("vfs:" + group.name + ":" + mp.path, *m->server);
    }
    mounts.push_back(std::move(m));
  }
  auto log = net::ConnLog::Open(group.log, group.name);
  if (!log) return Error(log.error());
  // The cgroup of the process and memory limits, which the group's init joins before
  // it starts anything.
  std::optional<GroupCgroup> cgroup;
  const Limits& limits = group.limits;
  if (limits.processes || limits.group_memory_bytes) {
    GroupCgroup::Want want;
    want.pids = limits.processes.has_value();
    want.pids_what = limits.processes_where + ": limit processes = " + (limits.processes ? std::to_string(*limits.processes) : "");
    want.memory = limits.group_memory_bytes.has_value();
    want.memory_what = limits.group_memory_where + ": limit group_memory = " + (limits.group_memory_bytes ? Bytes(*limits.group_memory_bytes) : "");
    auto made = GroupCgroup::Make(group.name, want);
    if (!made) return Error(made.error());
    cgroup.emplace(std::move(*made));
    // The process limit is set once the init is in: its own tasks are not counted.
    if (want.memory) {
      if (auto set = cgroup->SetMemoryMax(*limits.group_memory_bytes); !set) return Error(set.error());
    }
  }

  // What the group sees of the network's configuration, and where its root is built.
  auto made = MakeRunDir();
  if (!made) return Error(made.error());
  const std::string run_dir = *made;
  std::error_code ec;
  struct Cleanup {
    std::string dir;
    ~Cleanup() {
      std::error_code e;
      std::filesystem::remove_all(dir, e);
    }
  } cleanup{run_dir};
  char host[HOST_NAME_MAX + 1] = "localhost";
  ::gethostname(host, sizeof host);
  // The group's /etc/hosts: address, then its names.
  const std::vector<std::vector<std::string>> local_hosts = {
      {"127.0.0.1", "localhost"}, {"::1", "localhost", "ip6-localhost", "ip6-loopback"}, {"127.0.1.1", host}};
  std::string hosts_file;
  for (const auto& line : local_hosts) {
    for (size_t i = 0; i < line.size(); ++i) hosts_file += line[i] + (i == 0 ? "\t" : i + 1 < line.size() ? " " : "\n");
  }
  // 0644 whatever the umask (a passthrough layer sets 0), as OpenOwnFile makes them.
  for (const auto& [name, content] :
       {std::pair<std::string, std::string>{"resolv.conf", "# the group's resolver: ulsp's net ULSP\nnameserver 127.0.0.53\n"},
        {"hosts", hosts_file}}) {
    if (auto w = WriteOwnFile(run_dir + "/" + name, content); !w) return Error("the group's " + name + ": " + w.error());
  }

  GroupPlan plan;
  for (const auto& m : mounts) plan.mounts.push_back({m->policy.path, m->policy.stack, m->policy.isolated, m->policy.read_only, m->policy.where});
  if (!group.mounts.empty() && group.mounts.front().path == "/") {
    plan.staging = run_dir + "/root";
    ::mkdir(plan.staging.c_str(), 0755);  // 0755 whatever the umask (a passthrough layer sets 0)
  }
  plan.resolv_conf = run_dir + "/resolv.conf";
  plan.hosts = run_dir + "/hosts";
  plan.pid_namespace = group.pid_namespace;
  plan.private_tmp = group.private_tmp;
  plan.read_only_host = group.read_only_host;
  plan.set_id_files = group.set_id_files;
  char cwd[PATH_MAX];
  plan.cwd = ::getcwd(cwd, sizeof cwd) != nullptr ? cwd : "/";
  plan.umask = kStart.umask;
  plan.files_soft = kStart.files.rlim_cur;
  plan.files_hard = kStart.files.rlim_max;
  plan.command = run.command;
  plan.who = run.who;
  plan.cpu_seconds = group.limits.cpu_seconds;
  plan.memory_bytes = group.limits.memory_bytes;
  plan.open_files = group.limits.open_files;
  plan.file_size_bytes = group.limits.file_size_bytes;
  plan.seal_cgroups = cgroup.has_value();
  if (cgroup) plan.command_cgroup = cgroup->CommandOnlyDir();

  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return Error(std::string("socketpair: ") + std::strerror(errno));
  UniqueFd sock(sv[0]);
  const int on = 1;
  ::setsockopt(sock.get(), SOL_SOCKET, SO_PASSCRED, &on, sizeof on);

  // Signals for the command are taken here (signalfd) and passed on; every thread
  // started from now on inherits the mask.
  sigset_t forwarded;
  sigemptyset(&forwarded);
  for (int sig : {SIGINT, SIGQUIT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGCONT}) sigaddset(&forwarded, sig);
  ::pthread_sigmask(SIG_BLOCK, &forwarded, nullptr);

  const pid_t child = ::fork();
  if (child < 0) return Error(std::string("fork: ") + std::strerror(errno));
  if (child == 0) {
    sock.Reset();
    GroupMain(plan, sv[1]);
  }
  ::close(sv[1]);
  auto reap = [child]() {
    int status = 0;
    while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : kUlspFailed;
  };

  // The group's init builds its world one step at a time; each step that needs this
  // side waits for its answer.
  pid_t init_pid = 0;
  uint64_t init_tasks = 0;  // the init's own, in the process limit's cgroup
  UniqueFd netns;
  net::NameMemory names;
  net::Askers askers;  // who asks the resolver, for its log
  // Programs find these names in the group's /etc/hosts (curl knows localhost by
  // itself), never asking the resolver: they are remembered as if resolved, so a rule
  // on localhost admits 127.0.0.1 and ::1.
  for (const auto& line : local_hosts) {
    const auto address = net::Cidr::Parse(line[0]);
    if (!address) continue;
    for (size_t i = 1; i < line.size(); ++i) names.Remember(line[i], {address->family, address->addr, 0});
  }
  std::unique_ptr<net::NetServer> net_server;
  std::unique_ptr<msgport::DirectPort> net_port;
  std::unique_ptr<msgport::SeccompShim> seccomp;
  std::unique_ptr<net::Resolver> resolver;
  std::string failure, resolver_error;
  char self[PATH_MAX];
  const ssize_t self_len = ::readlink("/proc/self/exe", self, sizeof self - 1);
  self[self_len > 0 ? self_len : 0] = '\0';

  auto stop_mounts = [&] {
    for (auto& m : mounts) {
      if (m->shim) m->shim->Exit();
    }
    for (auto& m : mounts) {
      if (m->thread.joinable()) m->thread.join();
    }
  };

  UniqueFd sigfd(::signalfd(-1, &forwarded, SFD_CLOEXEC));
  for (bool ready = false; !ready;) {
    // A signal while the group is being built ends it: nothing has started yet.
    pollfd wait[2] = {{sock.get(), POLLIN, 0}, {sigfd.get(), POLLIN, 0}};
    if (::poll(wait, 2, -1) < 0 && errno != EINTR) break;
    if (wait[1].revents & POLLIN) {
      signalfd_siginfo si{};
      (void)!::read(sigfd.get(), &si, sizeof si);
      failure = std::string("interrupted by ") + strsignal(static_cast<int>(si.ssi_signo)) + " while the group was being built";
      break;
    }
    if (!(wait[0].revents & (POLLIN | POLLHUP))) continue;
    Said said = Hear(sock.get());
    if (said.text.empty()) break;  // the group's init is gone: its status says why
    if (said.text == "hello") {
      init_pid = said.pid;
      if (run.on_started) run.on_started(init_pid);
      if (cgroup) {
        auto added = cgroup->Join(init_pid);
        // (A sanitizer's runtime gives the init a thread of its own.)
        init_tasks = cgroup->Pids();
        if (added && limits.processes) added = cgroup->SetPidsMax(*limits.processes + init_tasks);
        if (!added) {
          failure = "putting the group's init in its cgroup: " + added.error();
          break;
        }
      }
      auto ns = Sys([&] { return ::open(("/proc/" + std::to_string(init_pid) + "/ns/net").c_str(), O_RDONLY | O_CLOEXEC); });
      if (!ns) {
        failure = "the group's network namespace: " + ns.error().Describe();
        break;
      }
      netns.Reset(*ns);
      Answer(sock.get(), "ok");
      // The resolver starts while the init builds the rest of its world; a failure is
      // the answer to the last step.
      auto res = net::Resolver::Start(netns.get(), group.name, group.net, group.hosts, names, askers, **log);
      if (res) {
        resolver = std::move(*res);
      } else {
        resolver_error = "starting the group's resolver on 127.0.0.53:53: " + res.error().Describe();
      }
    } else if (said.text.rfind("mount ", 0) == 0) {
      const size_t i = std::stoul(said.text.substr(6));
      if (i >= mounts.size() || !said.fd) {
        failure = "a malformed mount step";
        break;
      }
      MountServer& m = *mounts[i];
      if (m.policy.isolated) {
        auto why = std::make_shared<std::string>();
        auto iso = IsolatedPort::Start({m.policy.stack, self, why});
        if (!iso) {
          Answer(sock.get(), "the isolated server did not start: " + *why);
          continue;
        }
        m.isolated = iso->get();
        m.port = std::move(*iso);
      }
      msgport::FuseShim::Options options;
      options.mountpoint = m.policy.path;
      options.fsname = m.policy.stack;
      options.timeout = m.policy.timeout;
      options.premounted_fd = said.fd.release();
      options.callers_may_admin = false;  // the group's bounding set lacks it (group_init.cc)
      options.on_ready = [&m] {
        std::lock_guard lock(m.mu);
        m.ready = true;
        m.cv.notify_all();
      };
      auto shim = msgport::FuseShim::Mount(options, *m.port, !m.policy.isolated);
      if (!shim) {
        Answer(sock.get(), "serving the mount failed: " + shim.error().Describe());
        continue;
      }
      m.shim = std::move(*shim);
      m.thread = std::thread([&m] { m.shim->Serve(); });
      std::unique_lock lock(m.mu);
      if (!m.cv.wait_for(lock, std::chrono::seconds(20), [&m] { return m.ready; })) {
        Answer(sock.get(), "the kernel never sent FUSE INIT");
        continue;
      }
      Answer(sock.get(), "ok");
    } else if (said.text.rfind("listener ", 0) == 0) {
      const int number = std::stoi(said.text.substr(9));
      auto pidfd = Sys([&] { return static_cast<int>(::syscall(SYS_pidfd_open, init_pid, 0)); });
      auto listener = pidfd ? Sys([&] { return static_cast<int>(::syscall(SYS_pidfd_getfd, *pidfd, number, 0)); })
                            : Result<int>(std::unexpected(pidfd.error()));
      if (pidfd) ::close(*pidfd);
      if (!listener || !netns) {
        Answer(sock.get(), "taking the seccomp listener failed");
        continue;
      }
      net::NetConfig config;
      config.group = group.name;
      config.rules = group.net;
      config.loopback_group = group.loopback_group;
      config.group_netns.Reset(::dup(netns.get()));
      net_server = std::make_unique<net::NetServer>(std::move(config), **log, names, askers);
      net_port = std::make_unique<msgport::DirectPort>("net:" + group.name, *net_server);
      auto shim = msgport::SeccompShim::Start(UniqueFd(*listener), *net_port, {});
      if (!shim) {
        Answer(sock.get(), "starting the seccomp shim: " + shim.error().Describe());
        continue;
      }
      seccomp = std::move(*shim);
      if (!resolver) {
        Answer(sock.get(), resolver_error);
        continue;
      }
      if (run.on_built) run.on_built(init_pid);
      Answer(sock.get(), "ok");
      ready = true;
    } else if (said.text.rfind("error ", 0) == 0) {
      failure = said.text.substr(6);
    }
  }
  sock.Reset();

  // The registry entry `ulsp ps` reads, while the group lives.
  std::unique_ptr<ControlServer> control;
  if (failure.empty()) {
    auto c = ControlServer::Start(run_dir, [&](StatusBuilder& s) {
      s.kind = "run";
      s.command = JoinCommand(run.command);
      StatusBuilder::Group g;
      g.name = group.name;
      g.policy = run.policy_file;
      g.init_pid = init_pid;
      g.net_default = group.net.default_allow() ? "allow" : "deny";
      if (cgroup && limits.processes) {
        const uint64_t now = cgroup->Pids();
        g.processes = now > init_tasks ? now - init_tasks : 0;  // the init's are not the command's
        g.processes_max = *group.limits.processes;
      }
      if (net_server) {
        const auto& nc = net_server->counters();
        g.allowed = nc.allowed.load();
        g.denied = nc.denied.load();
        g.logged = nc.logged.load();
        g.kept = nc.kept.load();
      }
      if (seccomp) {
        const auto& sc = seccomp->counters();
        g.notifications = sc.notifications.load();
        g.in_flight = sc.in_flight.load();
        g.workers = sc.workers.load();
      }
      s.groups.push_back(g);
      for (const auto& m : mounts) {
        s.mounts.push_back({m->policy.path, m->policy.stack, group.name, m->policy.isolated,
                            m->port ? m->port->counters().put.load() : 0, m->shim ? m->shim->InFlight() : 0,
                            m->server ? m->server->top().NodeCount() : (m->isolated ? m->isolated->NodeCount() : 0)});
        if (m->port) s.AddPort(*m->port, m->isolated ? "shared memory" : "direct", m->shim ? m->shim->InFlight() : 0);
        if (m->isolated)
          s.ulsps.push_back({"vfs " + m->policy.path, "vfs (isolated)", m->isolated->server_pid(), m->isolated->restarts(), "serving"});
      }
      for (const auto& m : mounts) {
        if (m->server) s.ulsps.push_back({"vfs " + m->policy.path, "vfs (in-process)", static_cast<pid_t>(::getpid()), 0, "serving"});
      }
      s.ulsps.push_back({"net " + group.name, "net", static_cast<pid_t>(::getpid()), 0, net_server ? "serving" : "starting"});
      if (net_port) s.AddPort(*net_port, "direct", seccomp ? seccomp->counters().in_flight.load() : 0);
    });
    if (c) control = std::move(*c);
  }

  // Wait for the command, passing signals on, with the wall-time limit.
  int status = kUlspFailed;
  {
    UniqueFd child_fd(static_cast<int>(::syscall(SYS_pidfd_open, child, 0)));
    UniqueFd timer;
    if (group.limits.wall_seconds && failure.empty()) {
      timer.Reset(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC));
      itimerspec t{};
      t.it_value.tv_sec = static_cast<time_t>(*group.limits.wall_seconds);
      ::timerfd_settime(timer.get(), 0, &t, nullptr);
    }
    bool timed_out = false;
    if (!failure.empty()) {
      if (init_pid > 0) ::kill(init_pid, SIGKILL);
      ::kill(child, SIGKILL);
    }
    for (;;) {
      pollfd p[3] = {{child_fd.get(), POLLIN, 0}, {sigfd.get(), POLLIN, 0}, {timer.get(), POLLIN, 0}};
      const int n = ::poll(p, timer ? 3 : 2, -1);
      if (n < 0 && errno != EINTR) break;
      if (p[0].revents != 0) break;
      if (p[1].revents & POLLIN) {
        signalfd_siginfo si{};
        if (::read(sigfd.get(), &si, sizeof si) == sizeof si && init_pid > 0) {
          const int sig = static_cast<int>(si.ssi_signo);
          if (sig == SIGINT || sig == SIGQUIT || sig == SIGTERM || sig == SIGHUP) run.interrupted_by = sig;
          // Keyboard signals already reached the command from the terminal.
          if ((sig != SIGINT && sig != SIGQUIT) || si.ssi_code == SI_USER) ::kill(init_pid, sig);
        }
      }
      if (timer && (p[2].revents & POLLIN)) {
        timed_out = true;
        std::fprintf(stderr, "%s: group %s ran past its wall_seconds limit (%llu s): killed\n", prefix.c_str(), group.name.c_str(),
                     static_cast<unsigned long long>(*group.limits.wall_seconds));
        if (init_pid > 0) ::kill(init_pid, SIGKILL);
        timer.Reset();
      }
    }
    status = reap();
    if (timed_out) status = kTimedOut;
    if (const uint64_t killed = cgroup ? cgroup->OomKills() : 0; killed > 0)
      std::fprintf(stderr, "%s: group %s reached its group_memory limit (%s): the kernel's OOM killer ended %llu of its processes\n",
                   prefix.c_str(), group.name.c_str(), Bytes(*limits.group_memory_bytes).c_str(), static_cast<unsigned long long>(killed));
  }
  // The group is gone: its namespaces with it. Its mounts went with its mount
  // namespace (the FUSE loops end), and its seccomp filter has no process left.
  // Every thread is told first and waited for after: on a virtual machine each
  // wake-up of an idle CPU may take milliseconds, and these then overlap.
  if (control) control->Stop();
  if (resolver) resolver->Stop();
  if (seccomp) seccomp->Stop();
  control.reset();
  resolver.reset();
  seccomp.reset();
  for (auto& m : mounts) {
    if (!m->thread.joinable()) continue;
    for (int i = 0; i < 500 && m->shim && m->shim->InFlight() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  stop_mounts();
  mounts.clear();
  if (!failure.empty()) {
    run.failure = failure;
    Error(failure);
    return kUlspFailed;
  }
  return status;
}

}  // namespace ulsp::core
