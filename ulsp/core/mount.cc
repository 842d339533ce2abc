#include "ulsp/core/mount.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "kernel/msgport/direct_port.h"
#include "kernel/msgport/fuse_shim.h"
#include "kernel/msgport/log.h"
#include "ulsp/core/isolated.h"
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

int Error(const std::string& message) {
  std::fprintf(stderr, "ulsp mount: %s\n", message.c_str());
  return 1;
}

// Writes everything, retrying short writes; errors are ignored (the reader sees EOF).
void WriteAll(int fd, const std::string& s) {
  size_t done = 0;
  while (done < s.size()) {
    ssize_t n = ::write(fd, s.data() + done, s.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

// Serves `args` in this process until unmounted. `ready_fd` (or -1) hears "ok\n" once
// the mount is live, or the error. Returns the exit status.
int Serve(const MountArgs& args, std::unique_ptr<vfs::Layer> top, const std::string& spec, const std::string& fsname,
          int ready_fd) {
  // In-process: the stack serves in the thread that reads the request (a direct
  // port). Isolated: a supervised server process, through a shared-memory port.
  std::unique_ptr<vfs::StackServer> server;
  std::unique_ptr<msgport::Port> port;
  if (args.isolated) {
    char self[PATH_MAX];
    const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return Error(std::string("/proc/self/exe: ") + std::strerror(errno));
    self[n] = '\0';
    auto isolated = IsolatedPort::Start({spec, self});
    if (!isolated) {
      const std::string message = "the isolated server did not start (its error is above, or in the --log file)";
      if (ready_fd >= 0) WriteAll(ready_fd, message + "\n");
      return Error(message);
    }
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
  options.on_ready = [ready_fd] {
    if (ready_fd >= 0) WriteAll(ready_fd, "ok\n");
  };
  auto shim = msgport::FuseShim::Mount(options, *port, /*serves_inline=*/!args.isolated);
  if (!shim) {
    const std::string message = args.mountpoint + ": mounting failed: " + shim.error().Describe();
    if (ready_fd >= 0) WriteAll(ready_fd, message + "\n");
    return Error(message);
  }
  (*shim)->HandleSignals();
  Logger("vfs")->info("serving {} on {}", fsname, args.mountpoint);
  const int rc = (*shim)->Serve();
  if (ready_fd >= 0) ::close(ready_fd);
  shim->reset();
  Logger("vfs")->info("{} unmounted", args.mountpoint);
  return rc == 0 ? 0 : 1;
}

}  // namespace

bool IsMountPoint(const std::string& path, std::string* fstype) {
  std::ifstream in("/proc/self/mountinfo");
  bool found = false;
  for (std::string line; std::getline(in, line);) {
    // id parent major:minor root mountpoint options [optional...] - fstype source super
    std::istringstream fields(line);
    std::string id, parent, devno, root, point;
    fields >> id >> parent >> devno >> root >> point;
    if (Unescape(point) != path) continue;
    found = true;  // the last one listed is the one on top
    if (fstype != nullptr) {
      std::string word;
      while (fields >> word && word != "-") {
      }
      fields >> *fstype;
    }
  }
  return found;
}

int Mount(const MountArgs& in) {
  MountArgs args = in;
  if (args.debug) args.foreground = true;
  if (args.stack.empty() && args.source.empty()) return Error("give --stack SPEC or a SOURCE directory");
  if (!args.stack.empty() && !args.source.empty()) return Error("give --stack SPEC or SOURCE, not both");
  if (args.timeout < 0) return Error("--timeout must be 0 or more seconds");
  auto absolute = vfs::AbsoluteStackSpec(args.stack.empty() ? "passthrough:" + args.source : args.stack);
  if (!absolute) return Error(absolute.error());
  const std::string spec = *absolute;

  char resolved[PATH_MAX];
  if (::realpath(args.mountpoint.c_str(), resolved) == nullptr)
    return Error(args.mountpoint + ": mount point: " + std::strerror(errno));
  args.mountpoint = resolved;
  struct stat st {};
  if (::stat(resolved, &st) != 0) return Error(args.mountpoint + ": mount point: " + std::strerror(errno));
  if (!S_ISDIR(st.st_mode)) return Error(args.mountpoint + ": mount point is not a directory");
  if (IsMountPoint(args.mountpoint))
    return Error(args.mountpoint + ": mount point is busy (something is already mounted there)");

  const std::string fsname = args.stack.empty() ? args.source : spec;
  if (args.isolated) {
    // The server process builds the stack; build it here once too, so a bad stack is
    // reported before anything starts (and destroy it before forking).
    auto check = vfs::BuildStack(spec);
    if (!check) return Error(check.error());
  }
  if (args.foreground) {
    std::unique_ptr<vfs::Layer> top;
    if (!args.isolated) {
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
    if (!args.isolated) {
      auto built = vfs::BuildStack(spec);  // relative paths are the caller's
      if (!built) {
        WriteAll(pipe_fds[1], built.error() + "\n");
        _exit(1);
      }
      top = std::move(*built);
    }
    if (::chdir("/") != 0) _exit(1);
    const int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    const int log_fd = args.log_file.empty()
                           ? null_fd
                           : ::open(args.log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
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
  if (answer.empty()) return Error(args.mountpoint + ": the server exited before the mount was live");
  std::fprintf(stderr, "ulsp mount: %s", answer.c_str());
  return 1;
}

int Umount(const std::string& mountpoint) {
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
  if (::umount2(resolved, 0) != 0) {
    std::fprintf(stderr, "ulsp umount: %s: %s\n", resolved,
                 errno == EBUSY ? "busy (a program is using it)" : std::strerror(errno));
    return 1;
  }
  return 0;
}

}  // namespace ulsp::core
