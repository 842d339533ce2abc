#include "ulsp/core/mount.h"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <expected>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "kernel/msgport/direct_port.h"
#include "kernel/msgport/fuse_shim.h"
#include "kernel/msgport/log.h"
#include "kernel/msgport/own_file.h"
#include "ulsp/core/agent.h"
#include "ulsp/core/isolated.h"
#include "ulsp/core/registry.h"
#include "ulsp/core/remote_source.h"
#include "ulsp/core/tls_files.h"
#include "ulsp/vfs/stack.h"

namespace ulsp::core {
namespace {

// /proc/self/mountinfo escapes blanks and backslashes as \ooo.
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      out += static_cast<char>(std::strtol(s.substr(i + 1, 3).c_str(), nullptr, 8));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

// Whether fusermount3 lets a user mount with allow_other: /etc/fuse.conf says
// user_allow_other on a line of its own (blanks and a # comment aside).
bool UsersMayAllowOthers() {
  std::ifstream in("/etc/fuse.conf");
  for (std::string line; std::getline(in, line);) {
    line.erase(std::min(line.find('#'), line.size()));
    std::istringstream words(line);
    std::string word, more;
    if (words >> word && word == "user_allow_other" && !(words >> more)) return true;
  }
  return false;
}

int Error(const std::string& message) {
  std::fprintf(stderr, "ulsp mount: %s\n", message.c_str());
  return 1;
}

// What --remote and its authentication options name, read (files included).
std::expected<msgport::RemoteOptions, std::string> RemoteOptionsOf(const MountArgs& args) {
  msgport::RemoteOptions o;
  const size_t slash = args.remote.find('/');
  if (slash == std::string::npos || slash + 1 == args.remote.size() ||
      !SplitHostPort(args.remote.substr(0, slash), o.host, o.port))
    return std::unexpected("--remote '" + args.remote + "': give ADDR:PORT/NAME (e.g. 10.0.0.2:7700/src)");
  o.name = args.remote.substr(slash + 1);
  if (!args.token_file.empty()) {
    auto token = ReadSecretFile(args.token_file);
    if (!token) return std::unexpected(token.error());
    o.token = std::move(*token);
    while (!o.token.empty() && (o.token.back() == '\n' || o.token.back() == '\r')) o.token.pop_back();
  }
  const bool tls = !args.tls_cert.empty() || !args.tls_key.empty() || !args.tls_ca.empty();
  if (tls) {
    auto files = ReadTlsFiles(args.tls_cert, args.tls_key, args.tls_ca);
    if (!files) return std::unexpected(files.error());
    o.tls_cert = std::move(files->cert);
    o.tls_key = std::move(files->key);
    o.tls_ca = std::move(files->ca);
    o.tls_server_name = args.tls_name;
  } else if (!args.tls_name.empty()) {
    return std::unexpected("--tls-name goes with --tls-cert, --tls-key and --tls-ca");
  }
  // NaN passes a `<= 0` test; infinity overflows the milliseconds below.
  if (!(args.deadline > 0 && args.deadline <= 86400))
    return std::unexpected("--deadline must be more than 0 and at most 86400 seconds");
  o.wait_limit = std::chrono::milliseconds(static_cast<int64_t>(args.deadline * 1000));
  o.connect_timeout = std::min(o.wait_limit, std::chrono::milliseconds(5000));
  return o;
}

// Serves `args` in this process until unmounted. `ready_fd` (or -1) hears "ok\n" once
// the mount is live, or the error (a write to it that fails is let go: its reader
// then sees EOF). Returns the exit status.
int Serve(const MountArgs& args, std::unique_ptr<vfs::Layer> top, const std::string& spec, const std::string& fsname,
          int ready_fd) {
  // In-process: the stack serves in the thread that reads the request (a direct
  // port). Isolated: a supervised server process, through a shared-memory port.
  std::unique_ptr<vfs::StackServer> server;
  std::unique_ptr<msgport::Port> port;
  IsolatedPort* relay = nullptr;
  const RemoteSource* remote = nullptr;
  if (!args.remote.empty()) {
    auto options = RemoteOptionsOf(args);
    if (!options) {
      if (ready_fd >= 0) (void)WriteAll(ready_fd, options.error() + "\n");
      return Error(options.error());
    }
    auto why = std::make_shared<std::string>();
    auto source = std::make_unique<RemoteSource>(*options, why);
    remote = source.get();
    auto connected = IsolatedPort::StartWith(std::move(source));
    if (!connected) {
      const std::string message = args.remote + ": " + *why;
      if (ready_fd >= 0) (void)WriteAll(ready_fd, message + "\n");
      return Error(message);
    }
    relay = connected->get();
    port = std::move(*connected);
  } else if (args.isolated) {
    char self[PATH_MAX];
    const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return Error(std::string("/proc/self/exe: ") + std::strerror(errno));
    self[n] = '\0';
    auto why = std::make_shared<std::string>();
    auto isolated = IsolatedPort::Start({spec, self, why});
    if (!isolated) {
      const std::string message = "the isolated server did not start: " + *why;
      if (ready_fd >= 0) (void)WriteAll(ready_fd, message + "\n");
      return Error(message);
    }
    relay = isolated->get();
    port = std::move(*isolated);
  } else {
    server = std::make_unique<vfs::StackServer>(std::move(top));
    port = std::make_unique<msgport::DirectPort>("vfs:" + args.mountpoint, *server);
  }
  msgport::FuseShim::Options options;
  options.mountpoint = args.mountpoint;
  options.fsname = fsname;
  options.timeout = args.timeout;
  options.debug = args.debug;
  options.read_only = args.read_only;
  options.kernel_passthrough = args.kernel_passthrough;
  options.io_uring = args.io_uring;
  // Other users may use the mount, as they may use the tree beneath, when root mounts
  // it or the system lets users say so; fusermount3 refuses the mount otherwise.
  options.allow_other = ::geteuid() == 0 || UsersMayAllowOthers();
  if (!options.allow_other)
    Logger("vfs")->info("{}: only you may use this mount (user_allow_other is not set in /etc/fuse.conf)",
                        args.mountpoint);
  // Over a network a lookup is a round trip: listings bring their entries' attributes.
  options.readdirplus_always = !args.remote.empty();
  // "ok" once the kernel's INIT is answered and `ulsp ps` can list the mount (its
  // control socket is made after the shim mounts), so that what runs after `ulsp
  // mount` finds both, and a caller that removes the runtime directory after `ulsp
  // umount` does not race the server making its entry there.
  std::atomic<int> steps_left{2};  // outlives the shim, whose reader calls on_ready
  auto step_done = [ready_fd, &steps_left] {
    if (steps_left.fetch_sub(1) == 1 && ready_fd >= 0) (void)WriteAll(ready_fd, "ok\n");
  };
  options.on_ready = step_done;
  const bool inline_stack = server != nullptr;
  auto shim = msgport::FuseShim::Mount(options, *port, /*serves_inline=*/inline_stack);
  if (!shim) {
    std::string message = args.mountpoint + ": mounting failed: " + shim.error().Describe();
    if (::access("/dev/fuse", R_OK | W_OK) != 0)
      message += " (/dev/fuse: " + Errno(errno).Describe() + ": FUSE is root's alone on this machine)";
    if (ready_fd >= 0) (void)WriteAll(ready_fd, message + "\n");
    return Error(message);
  }
  (*shim)->HandleSignals();
  // `ulsp ps` sees the mount while it lives.
  auto made = MakeRunDir();
  if (!made) Logger("vfs")->warn("`ulsp ps` will not list this mount: {}", made.error());
  const std::string run_dir = made ? *made : std::string();  // "": no control socket
  std::error_code ec;
  msgport::FuseShim* shim_ptr = shim->get();
  auto control = ControlServer::Start(run_dir, [&](StatusBuilder& s) {
    s.kind = "mount";
    s.command = "mount " + fsname + " " + args.mountpoint;
    s.mounts.push_back({args.mountpoint, fsname, "", args.isolated, port->counters().put.load(), shim_ptr->InFlight(),
                        server ? server->top().NodeCount() : (relay ? relay->NodeCount() : 0)});
    if (remote != nullptr) {
      s.AddPort(*port, "remote", shim_ptr->InFlight(), remote->peer(), remote->state(), remote->rtt_us());
      s.ulsps.push_back({"vfs " + args.mountpoint, "vfs (remote agent)", 0, relay->restarts(), remote->state()});
    } else if (relay != nullptr) {
      s.AddPort(*port, "shared memory", shim_ptr->InFlight());
      s.ulsps.push_back({"vfs " + args.mountpoint, "vfs (isolated)", relay->server_pid(), relay->restarts(),
                         relay->serving() ? "serving" : "restarting"});
    } else {
      s.AddPort(*port, "direct", shim_ptr->InFlight());
      s.ulsps.push_back({"vfs " + args.mountpoint, "vfs (in-process)", static_cast<pid_t>(::getpid()), 0, "serving"});
    }
  });
  step_done();
  Logger("vfs")->info("serving {} on {}", fsname, args.mountpoint);
  const int rc = (*shim)->Serve();
  if (ready_fd >= 0) ::close(ready_fd);
  if (control) control->reset();
  std::filesystem::remove_all(run_dir, ec);
  shim->reset();
  if (rc != 0) {
    Logger("vfs")->error("{}: serving ended with an error: {}", args.mountpoint, Errno(rc).Describe());
  } else {
    Logger("vfs")->info("{} unmounted", args.mountpoint);
  }
  return rc == 0 ? 0 : 1;
}

}  // namespace

std::vector<MountEntry> Mounts() {
  std::vector<MountEntry> out;
  std::ifstream in("/proc/self/mountinfo");
  for (std::string line; std::getline(in, line);) {
    // id parent major:minor root mountpoint options [optional...] - fstype source super
    std::istringstream fields(line);
    std::string id, parent, devno, root, point, word, source, super;
    fields >> id >> parent >> devno >> root >> point;
    while (fields >> word && word != "-") {
    }
    MountEntry m{Unescape(root), Unescape(point), "", {}};
    fields >> m.fstype >> source >> super;
    std::istringstream options(super);
    for (std::string o; std::getline(options, o, ',');) m.super_options.push_back(o);
    out.push_back(std::move(m));
  }
  return out;
}

bool IsMountPoint(const std::string& path, std::string* fstype) {
  bool found = false;
  for (const MountEntry& m : Mounts()) {
    if (m.point != path) continue;
    found = true;  // the last one listed is the one on top
    if (fstype != nullptr) *fstype = m.fstype;
  }
  return found;
}

int Mount(const MountArgs& in) {
  MountArgs args = in;
  if (args.debug) args.foreground = true;
  const int given = !args.stack.empty() + !args.source.empty() + !args.remote.empty();
  if (given == 0) return Error("give --stack SPEC, a SOURCE directory, or --remote ADDR:PORT/NAME");
  if (given > 1) return Error("give one of --stack SPEC, SOURCE and --remote ADDR:PORT/NAME");
  if (args.remote.empty() && (!args.token_file.empty() || !args.tls_cert.empty()))
    return Error("--token-file and --tls-* are for --remote");
  if (!args.remote.empty()) {
    if (args.isolated) return Error("--remote and --isolated: a remote stack is isolated already");
    // The background server runs in /: files named relative to here must not move.
    for (std::string* path : {&args.token_file, &args.tls_cert, &args.tls_key, &args.tls_ca}) {
      if (!path->empty()) *path = std::filesystem::absolute(*path).string();
    }
    if (auto options = RemoteOptionsOf(args); !options) return Error(options.error());
  }
  if (!(args.timeout >= 0 && std::isfinite(args.timeout))) return Error("--timeout must be 0 or more seconds");
  std::string spec;
  if (args.remote.empty()) {
    auto absolute = vfs::AbsoluteStackSpec(args.stack.empty() ? vfs::ComposeStackSpec({{"passthrough", args.source}})
                                                              : args.stack);
    if (!absolute) return Error(absolute.error());
    spec = *absolute;
  }

  char resolved[PATH_MAX];
  if (::realpath(args.mountpoint.c_str(), resolved) == nullptr)
    return Error(args.mountpoint + ": mount point: " + std::strerror(errno));
  args.mountpoint = resolved;
  struct stat st {};
  if (::stat(resolved, &st) != 0) return Error(args.mountpoint + ": mount point: " + std::strerror(errno));
  if (!S_ISDIR(st.st_mode)) return Error(args.mountpoint + ": mount point is not a directory");
  if (IsMountPoint(args.mountpoint))
    return Error(args.mountpoint + ": mount point is busy (something is already mounted there)");
  // A passthrough directory that holds the mount point would reach the mount through
  // it: its lookups cross into the mount, and the descriptor that takes keeps the
  // mount busy for good (`ulsp umount` then cannot end it).
  // An overlay's upper directory is served by a passthrough layer of its own.
  const auto layers = vfs::ParseStackSpec(spec);  // none for a remote mount
  if (layers) {
    for (const auto& [name, root] : vfs::ServedDirectories(*layers)) {
      if (vfs::IsWithin(args.mountpoint, root))
        return Error(args.mountpoint + ": mount point is inside " + name + ":" + root +
                     ", so the mount would contain itself: mount it outside that directory");
    }
  }

  // What `mount`, `df` and `ulsp ps` show: the source as a path that means something
  // from anywhere (the SOURCE as typed may be relative).
  const std::string fsname = !args.remote.empty()             ? "remote:" + args.remote
                             : args.stack.empty() && layers ? layers->front().argument  // SOURCE, unescaped
                                                            : spec;
  if (args.isolated) {
    // The server process builds the stack; build it here once too, so a bad stack is
    // reported before anything starts (and destroy it before forking).
    auto check = vfs::BuildStack(spec);
    if (!check) return Error(check.error());
  }
  if (args.foreground) {
    std::unique_ptr<vfs::Layer> top;
    if (!args.isolated && args.remote.empty()) {
      auto built = vfs::BuildStack(spec);
      if (!built) return Error(built.error());
      top = std::move(*built);
    }
    return Serve(args, std::move(top), spec, fsname, -1);
  }

  // Background: the child builds the stack (layers may start threads, which a fork
  // would not carry), mounts and serves; the parent returns once the kernel's INIT is
  // answered (the mount is live), or prints the child's error.
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return Error(std::string("pipe: ") + std::strerror(errno));
  const pid_t child = ::fork();
  if (child < 0) return Error(std::string("fork: ") + std::strerror(errno));
  if (child == 0) {
    ::close(pipe_fds[0]);
    ::setsid();
    std::unique_ptr<vfs::Layer> top;
    if (!args.isolated && args.remote.empty()) {
      auto built = vfs::BuildStack(spec);  // relative paths are the caller's
      if (!built) {
        (void)WriteAll(pipe_fds[1], built.error() + "\n");
        _exit(1);
      }
      top = std::move(*built);
    }
    if (::chdir("/") != 0) _exit(1);
    const int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    int log_fd = null_fd;
    if (!args.log_file.empty()) {
      auto log = OpenOwnFile(args.log_file, /*append=*/true);
      if (!log) {
        (void)WriteAll(pipe_fds[1], "the log " + log.error() + "\n");
        _exit(1);
      }
      log_fd = log->release();
    }
    if (null_fd >= 0) {
      ::dup2(null_fd, 0);
      ::dup2(null_fd, 1);
    }
    if (log_fd >= 0) ::dup2(log_fd, 2);
    _exit(Serve(args, std::move(top), spec, fsname, pipe_fds[1]));
  }
  ::close(pipe_fds[1]);
  std::string answer;
  char buf[512];
  for (;;) {
    ssize_t n = ::read(pipe_fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    answer.append(buf, static_cast<size_t>(n));
    if (answer.find('\n') != std::string::npos) break;
  }
  ::close(pipe_fds[0]);
  if (answer == "ok\n") return 0;
  // The server failed and is exiting: wait for it, so that a failed mount leaves no
  // process behind, not even one for init to reap.
  while (::waitpid(child, nullptr, 0) < 0 && errno == EINTR) {
  }
  if (answer.empty()) return Error(args.mountpoint + ": the server exited before the mount was live");
  std::fprintf(stderr, "ulsp mount: %s", answer.c_str());
  return 1;
}

int Umount(const std::string& mountpoint, bool lazy) {
  char resolved[PATH_MAX];
  if (::realpath(mountpoint.c_str(), resolved) == nullptr) {
    // A mount whose server died answers ENOTCONN to stat: use the path as given.
    if (errno != ENOTCONN) {
      std::fprintf(stderr, "ulsp umount: %s: %s\n", mountpoint.c_str(), std::strerror(errno));
      return 1;
    }
    std::snprintf(resolved, sizeof resolved, "%s", mountpoint.c_str());
  }
  std::string fstype;
  if (!IsMountPoint(resolved, &fstype) || fstype != "fuse.ulsp") {
    std::fprintf(stderr, "ulsp umount: %s: not a ulsp mount\n", resolved);
    return 1;
  }
  // The server ends a moment after the kernel lets go of the mount (it writes its
  // trace's last lines, stops its isolated server): wait for it, so that what runs
  // after `ulsp umount` finds it done. Held as a pidfd, its pid cannot be reused.
  const pid_t server = MountServerPid(resolved);
  UniqueFd server_fd(server > 0 ? static_cast<int>(::syscall(SYS_pidfd_open, server, 0)) : -1);
  auto done = [&] {
    pollfd p{server_fd.get(), POLLIN, 0};
    if (server_fd && ::poll(&p, 1, 10'000) == 0)
      std::fprintf(stderr, "ulsp umount: %s: unmounted, but its server (pid %d) is still running after 10 s\n", resolved,
                   static_cast<int>(server));
    return 0;
  };
  if (::umount2(resolved, 0) == 0) return done();
  // Busy, detached: its server goes on serving the programs still in it, and ends
  // after them (not waited for).
  if (errno == EBUSY && lazy) {
    if (::umount2(resolved, MNT_DETACH) == 0) return 0;
  }
  if (errno == EPERM && ::geteuid() != 0) {
    // A user's own mount: fusermount3, set-user-ID root, takes it away (and says why not).
    const char* argv[] = {"fusermount3", lazy ? "-uz" : "-u", "--", resolved, nullptr};
    pid_t pid = -1;
    int status = 0;
    if (::posix_spawnp(&pid, argv[0], nullptr, nullptr, const_cast<char* const*>(argv), environ) != 0 ||
        ::waitpid(pid, &status, 0) != pid) {
      std::fprintf(stderr, "ulsp umount: %s: only root or fusermount3 may unmount it, and fusermount3 did not run\n",
                   resolved);
      return 1;
    }
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? done() : 1;
  }
  std::fprintf(stderr, "ulsp umount: %s: %s\n", resolved,
               errno == EBUSY ? "busy (a program is using it; --lazy detaches it now, served until they let go)"
                              : std::strerror(errno));
  return 1;
}

}  // namespace ulsp::core
