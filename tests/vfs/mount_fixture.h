// Helpers for tests that mount for real: a temporary directory that is removed (after
// any mount inside it is detached), shell commands, and a mount served by a child
// `ulsp mount -f` process that is unmounted and killed whatever the test did.
#pragma once

#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "ulsp/core/mount.h"

namespace ulsp::testing {

// Runs `command` with bash; returns its exit status (128+N when killed by signal N).
inline int Shell(const std::string& command) {
  const int rc = std::system(("bash -c '" + [&] {
                                std::string q;
                                for (char c : command) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
                                return q;
                              }() + "'")
                                 .c_str());
  if (rc == -1) return -1;
  if (WIFSIGNALED(rc)) return 128 + WTERMSIG(rc);
  return WEXITSTATUS(rc);
}

// Runs `command` with bash and returns what it printed on stdout (stderr joins it
// when `with_stderr`).
inline std::string Output(const std::string& command, bool with_stderr = false) {
  const std::string full = command + (with_stderr ? " 2>&1" : "");
  FILE* f = ::popen(full.c_str(), "r");
  if (f == nullptr) return "popen failed";
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  ::pclose(f);
  return out;
}

// Detaches every mount at or below `dir` (deepest first).
inline void DetachMountsUnder(const std::string& dir) {
  std::vector<std::string> points;
  for (const auto& line : [] {
         std::vector<std::string> lines;
         FILE* f = std::fopen("/proc/self/mountinfo", "r");
         if (f == nullptr) return lines;
         char buf[4096];
         while (std::fgets(buf, sizeof buf, f) != nullptr) lines.emplace_back(buf);
         std::fclose(f);
         return lines;
       }()) {
    char point[4096];
    if (std::sscanf(line.c_str(), "%*s %*s %*s %*s %4095s", point) == 1 && std::string(point).starts_with(dir))
      points.emplace_back(point);
  }
  for (auto it = points.rbegin(); it != points.rend(); ++it) ::umount2(it->c_str(), MNT_DETACH);
}

// A fresh directory under `base` (/tmp: ext4 here; /dev/shm: tmpfs, where making
// files is 20x faster), removed with everything in it (mounts detached first).
class TempDir {
 public:
  explicit TempDir(const std::string& base = "/tmp") {
    std::string tmpl = base + "/ulsp-test.XXXXXX";
    path_ = ::mkdtemp(tmpl.data());
    ::chmod(path_.c_str(), 0755);
  }
  ~TempDir() {
    DetachMountsUnder(path_);
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Turns the kernel's switch for FUSE over io_uring (the fuse module's enable_uring) on
// or off while it lives, and puts back what it found. Mounts made meanwhile are
// offered io_uring (or not); the switch is read when the kernel takes a mount's INIT
// reply, so it must outlive that (ServedMount returns after it).
class KernelUringSwitch {
 public:
  static constexpr const char* kParam = "/sys/module/fuse/parameters/enable_uring";
  explicit KernelUringSwitch(bool on) {
    if (FILE* f = std::fopen(kParam, "r")) {
      before_ = std::fgetc(f);
      std::fclose(f);
    }
    ok_ = before_ != EOF && Write(on ? 'Y' : 'N');
  }
  ~KernelUringSwitch() {
    if (before_ != EOF) Write(static_cast<char>(before_));
  }
  KernelUringSwitch(const KernelUringSwitch&) = delete;
  KernelUringSwitch& operator=(const KernelUringSwitch&) = delete;
  // False when this kernel has no such switch (or it could not be set).
  bool ok() const { return ok_; }

 private:
  static bool Write(char c) {
    FILE* f = std::fopen(kParam, "w");
    if (f == nullptr) return false;
    const bool ok = std::fputc(c, f) != EOF;
    return std::fclose(f) == 0 && ok;
  }
  int before_ = EOF;
  bool ok_ = false;
};

// A mount served by a child `ulsp mount -f`: mounted by the constructor (check ok()),
// unmounted and the child reaped by the destructor, killed if it will not go.
class ServedMount {
 public:
  // `args` go between `mount -f` and the mount point, e.g. {"--stack", SPEC}.
  ServedMount(std::vector<std::string> args, std::string mountpoint, std::string log_path)
      : mountpoint_(std::move(mountpoint)) {
    std::vector<std::string> argv_s = {ULSP_BIN, "mount", "-f"};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    argv_s.push_back(mountpoint_);
    std::vector<char*> argv;
    for (auto& s : argv_s) argv.push_back(s.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 2, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (::posix_spawn(&pid_, ULSP_BIN, &fa, nullptr, argv.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&fa);
    char resolved[PATH_MAX];
    if (::realpath(mountpoint_.c_str(), resolved) != nullptr) mountpoint_ = resolved;
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (pid_ > 0 && std::chrono::steady_clock::now() < until) {
      std::string fstype;
      if (core::IsMountPoint(mountpoint_, &fstype) && fstype == "fuse.ulsp") {
        ok_ = true;
        break;
      }
      if (::waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  ~ServedMount() { Stop(); }
  ServedMount(const ServedMount&) = delete;
  ServedMount& operator=(const ServedMount&) = delete;

  bool ok() const { return ok_; }
  pid_t pid() const { return pid_; }
  const std::string& path() const { return mountpoint_; }

  // Unmounts and waits for the server to exit (killing it after 10 s). Returns the
  // server's exit status, or -1 when it had to be killed.
  int Stop() {
    if (core::IsMountPoint(mountpoint_)) ::umount2(mountpoint_.c_str(), MNT_DETACH);
    if (pid_ <= 0) return -1;
    int status = 0;
    for (int i = 0; i < 1000; ++i) {
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
    return -1;
  }

 private:
  std::string mountpoint_;
  pid_t pid_ = -1;
  bool ok_ = false;
};

}  // namespace ulsp::testing
