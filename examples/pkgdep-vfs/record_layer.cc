#include "examples/pkgdep-vfs/record_layer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <new>

namespace pkgdep {

using ulsp::vfs::IsTmpfile;
using ulsp::vfs::JoinPath;
using ulsp::vfs::VfsOp;
using ulsp::vfs::VfsRequest;

namespace {
constexpr int kExecFlag = 0x20;  // __FMODE_EXEC: the kernel opens an executable with it

// A /proc/.../cmdline, its arguments joined by spaces ("" if it cannot be read).
std::string ReadArgv(int dir_fd, const std::string& path) {
  std::string argv;
  const int fd = ::openat(dir_fd, path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return argv;
  char buf[512];
  const ssize_t n = ::read(fd, buf, sizeof buf);
  ::close(fd);
  for (ssize_t i = 0; i < n; ++i) argv += buf[i] == '\0' ? ' ' : buf[i];
  while (!argv.empty() && argv.back() == ' ') argv.pop_back();
  return argv;
}
}  // namespace

std::string_view UseName(Use u) noexcept {
  switch (u) {
    case Use::kMissing: return "not found";
    case Use::kProbe: return "probed";
    case Use::kListed: return "listed";
    case Use::kReadLink: return "link read";
    case Use::kOpened: return "opened";
    case Use::kWritten: return "written";
    case Use::kExecuted: return "executed";
  }
  return "?";
}

Recording::Recording() : own_argv_(ReadArgv(AT_FDCWD, "/proc/self/cmdline")) {}

void Recording::SetCommand(std::string command) {
  std::lock_guard lock(mu_);
  command_ = std::move(command);
}

std::string Recording::Shown(const std::string& argv, pid_t pid) const {
  // The group's init (pid 1) has this program's argv too, but it is not the command.
  if (pid != 1 && !command_.empty() && !argv.empty() && argv == own_argv_) return command_ + " (before its exec)";
  return argv;
}

Recording::~Recording() {
  if (const int fd = proc_fd_.load(); fd >= 0) ::close(fd);
}

void Recording::OpenGroupProc(pid_t init) {
  const std::string path = "/proc/" + std::to_string(init) + "/root/proc";
  const int fd = ::open(path.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // a group without /proc: no argv, as before it was built
  if (const int old = proc_fd_.exchange(fd); old >= 0) ::close(old);
}

std::string Recording::ArgvOf(pid_t pid) {
  // Read now, from the group's /proc. (Note keeps it per process, and reads it again
  // around an exec.)
  const int proc = proc_fd_.load();
  if (proc < 0 || pid <= 0) return {};
  return ReadArgv(proc, std::to_string(pid) + "/cmdline");
}

void Recording::Note(const std::string& path, Use use, bool dir, pid_t pid) {
  if (path.empty()) return;
  std::lock_guard lock(mu_);
  Proc& proc = procs_[pid];
  // A process's argv is read once and kept (a read is three system calls, and a
  // compiler's first touches run into thousands), except around an exec. A program
  // being executed is opened before its process has its new argv: those entries get
  // it at the process's next access (or keep the old one if none comes). The kernel
  // looks up and opens the program's interpreter before the exec is done, with the
  // old argv still in place: only a changed argv is the new one. The old one may be
  // unknown, "", when the group's /proc was opened just after the exec began: then
  // this program's own argv, that of the command's process before its exec, is not
  // the new one either.
  std::string argv;
  if (use == Use::kExecuted) {
    if (!proc.execing) {
      proc.execing = true;
      proc.before = proc.argv.empty() ? ArgvOf(pid) : proc.argv;
    }
    argv = proc.before;
  } else if (proc.execing) {
    argv = ArgvOf(pid);
    if (!argv.empty() && argv != proc.before && argv != own_argv_) {
      for (const std::string& p : proc.executed) {
        auto t = touched_.find(p);
        if (t != touched_.end() && t->second.pid == pid) t->second.argv = argv;
      }
      proc.executed.clear();
      proc.execing = false;
      proc.argv = argv;
    }
  } else {
    if (proc.argv.empty()) proc.argv = ArgvOf(pid);
    argv = proc.argv;
  }
  auto [it, fresh] = touched_.try_emplace(path);
  Touch& t = it->second;
  t.written = t.written || use == Use::kWritten;
  if (!fresh && use <= t.use) return;
  t.use = use;
  t.dir = t.dir || dir;
  t.pid = pid;
  t.argv = Shown(argv, pid);
  if (use == Use::kExecuted) proc.executed.push_back(path);
}

void Recording::NoteUnlisted(const std::string& dir, std::string path, pid_t pid) {
  std::lock_guard lock(mu_);
  auto [it, fresh] = unlisted_.try_emplace(dir);
  if (fresh) {
    it->second.pid = pid;
    Proc& proc = procs_[pid];
    it->second.argv = Shown(proc.argv.empty() ? ArgvOf(pid) : proc.argv, pid);
  }
  it->second.paths.insert(std::move(path));
}

std::map<std::string, Unlisted> Recording::UnlistedSnapshot() const {
  std::lock_guard lock(mu_);
  return unlisted_;
}

int RecordLayer::Serve(VfsRequest& req) noexcept try {
  const pid_t pid = req.ctx.pid;
  switch (req.op) {
    case VfsOp::kLookup: {
      const std::string path = JoinPath(PathOf(req.node), req.name);
      const int err = Down(req);
      if (err == 0) {
        Note(path, Use::kProbe, S_ISDIR(req.entry.attr.st_mode), pid);
      } else if (err == ENOENT) {
        Note(path, Use::kMissing, false, pid);
      }
      return err;
    }
    case VfsOp::kGetAttr:
    case VfsOp::kAccess:
    case VfsOp::kGetXattr:
    case VfsOp::kListXattr: {
      const int err = Down(req);
      if (err == 0) Note(PathOf(req.node), Use::kProbe, req.op == VfsOp::kGetAttr && S_ISDIR(req.out_attr.st_mode), pid);
      return err;
    }
    case VfsOp::kOpenDir: {
      const int err = Down(req);
      // ENOSYS to a handleless opendir: the kernel lists this mount's directories
      // from now on with no opendir at all (the readdirs below note those).
      if (err == 0 || (err == ENOSYS && req.handleless_ok)) Note(PathOf(req.node), Use::kListed, true, pid);
      return err;
    }
    case VfsOp::kReadDir:
    case VfsOp::kReadDirPlus: {
      if (hidden_) {  // the view below filters as this admits: see what it will leave out
        req.admit = [this, dir = PathOf(req.node), pid, outer = std::move(req.admit)](std::string_view name) {
          if (outer && !outer(name)) return false;
          if (name != "." && name != "..") {
            std::string path = JoinPath(dir, name);
            if (hidden_(path)) rec_->NoteUnlisted(dir, std::move(path), pid);
          }
          return true;
        };
      }
      const int err = Down(req);
      if (err == 0) Note(PathOf(req.node), Use::kListed, true, pid);
      return err;
    }
    case VfsOp::kReadLink: {
      const int err = Down(req);
      if (err == 0) Note(PathOf(req.node), Use::kReadLink, false, pid);
      return err;
    }
    case VfsOp::kOpen: {
      // Opened for writing, the file is written by its first write (below), not by
      // the open; truncating it writes it at once.
      const bool writable = (req.flags & O_ACCMODE) != O_RDONLY && !(req.flags & O_TRUNC);
      if (writable) req.kernel_io_ok = false;
      const int err = Down(req);
      if (err != 0) return err;
      Use use = Use::kOpened;
      if (req.flags & kExecFlag) {
        use = Use::kExecuted;
      } else if (req.flags & O_TRUNC) {
        use = Use::kWritten;
      }
      std::string path = PathOf(req.node);
      Note(path, use, false, pid);
      if (writable) {
        std::lock_guard lock(unwritten_mu_);
        unwritten_.insert_or_assign(req.open.fh, Opener{std::move(path), pid});
      }
      return 0;
    }
    case VfsOp::kWrite:
    case VfsOp::kFallocate: {
      const int err = Down(req);
      if (err == 0) Wrote(req.fh);
      return err;
    }
    case VfsOp::kCopyFileRange: {
      const int err = Down(req);
      if (err == 0) Wrote(req.fh2);
      return err;
    }
    case VfsOp::kRelease: {
      {
        std::lock_guard lock(unwritten_mu_);
        unwritten_.erase(req.fh);
      }
      return Down(req);
    }
    case VfsOp::kCreate:
    case VfsOp::kMkNod:
    case VfsOp::kMkDir:
    case VfsOp::kSymlink:
    case VfsOp::kUnlink:
    case VfsOp::kRmDir: {
      if (IsTmpfile(req)) return Down(req);  // no path yet: a link names what it wrote
      const std::string path = JoinPath(PathOf(req.node), req.name);
      const int err = Down(req);
      if (err == 0) Note(path, Use::kWritten, req.op == VfsOp::kMkDir || req.op == VfsOp::kRmDir, pid);
      return err;
    }
    case VfsOp::kRename:
    case VfsOp::kLink: {
      const std::string from = req.op == VfsOp::kRename ? JoinPath(PathOf(req.node), req.name) : PathOf(req.node);
      const std::string to = JoinPath(PathOf(req.node2), req.name2);
      const int err = Down(req);
      if (err == 0) {
        if (!from.empty()) Note(from, Use::kWritten, false, pid);  // "" for an O_TMPFILE file
        Note(to, Use::kWritten, false, pid);
      }
      return err;
    }
    case VfsOp::kSetAttr:
    case VfsOp::kSetXattr:
    case VfsOp::kRemoveXattr: {
      const int err = Down(req);
      if (err == 0) Note(PathOf(req.node), Use::kWritten, false, pid);
      return err;
    }
    default:
      return Down(req);
  }
} catch (const std::bad_alloc&) {
  return ENOMEM;
}

void RecordLayer::Wrote(uint64_t fh) {
  std::lock_guard lock(unwritten_mu_);
  const auto it = unwritten_.find(fh);
  if (it == unwritten_.end()) return;  // written already, or made by this command
  Note(it->second.path, Use::kWritten, false, it->second.pid);
  unwritten_.erase(it);
}

std::map<std::string, Touch> Recording::Snapshot() const {
  std::lock_guard lock(mu_);
  return {touched_.begin(), touched_.end()};
}

size_t Recording::size() const {
  std::lock_guard lock(mu_);
  return touched_.size();
}

size_t Recording::processes() const {
  std::lock_guard lock(mu_);
  return procs_.size();
}

}  // namespace pkgdep
