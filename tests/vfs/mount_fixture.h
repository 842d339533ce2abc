// Helpers for tests that mount for real: those of tests/temp_dir.h, a mount served by a
// child `ulsp mount -f` process, and a stack mounted and served in the test's own
// process; each unmounted (and its server gone) whatever the test did.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernel/msgport/direct_port.h"
#include "kernel/msgport/fuse_shim.h"
#include "tests/temp_dir.h"
#include "ulsp/core/mount.h"
#include "ulsp/vfs/passthrough.h"
#include "ulsp/vfs/stack.h"

namespace ulsp::testing {

// A test that serves a passthrough layer in its own process leaves the process's umask
// at 0 (PassthroughLayer::Open: the kernel applies the callers'). Each test starts
// with a shell's 022 again, as when CTest runs it alone, so that running many in one
// process (vfs_test by hand) means the same: a directory a later test makes is not
// left writable by all.
struct UmaskPerTest final : ::testing::EmptyTestEventListener {
  void OnTestStart(const ::testing::TestInfo&) override { ::umask(022); }
};
inline const bool kUmaskPerTest = [] {
  ::testing::UnitTest::GetInstance()->listeners().Append(new UmaskPerTest);
  return true;
}();

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
  // server's exit status, or -1 when it had to be killed. Once stopped, it leaves the
  // mount point alone: a mount made there since is another's.
  int Stop() {
    if (!stopped_ && core::IsMountPoint(mountpoint_)) ::umount2(mountpoint_.c_str(), MNT_DETACH);
    stopped_ = true;
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
  bool stopped_ = false;  // unmounted once: what is mounted there since is not its own
};

// A test's layer `L` (made with its lower layer, then `args`) on passthrough of `src`,
// to be mounted with InProcessMount; nullptr when `src` cannot be opened.
template <class L, class... Args>
std::unique_ptr<L> OnPassthrough(const std::string& src, Args&&... args) {
  auto passthrough = vfs::PassthroughLayer::Open(src);
  if (!passthrough) return nullptr;
  return std::make_unique<L>(std::move(*passthrough), std::forward<Args>(args)...);
}

// A layer stack mounted on `mnt` and served by this process (so a test can reach into
// its layers); unmounted whatever the test did. `timeout`: the kernel's entry and
// attribute caches, in seconds.
class InProcessMount {
 public:
  InProcessMount(std::unique_ptr<vfs::Layer> top, const std::string& mnt, double timeout) : mnt_(mnt) {
    if (!top) {
      error_ = "no layer";
      return;
    }
    server_ = std::make_unique<vfs::StackServer>(std::move(top));
    port_ = std::make_unique<msgport::DirectPort>("vfs", *server_);
    msgport::FuseShim::Options options;
    options.mountpoint = mnt;
    options.timeout = timeout;
    auto shim = msgport::FuseShim::Mount(options, *port_, /*serves_inline=*/true);
    if (!shim) {
      error_ = shim.error().Describe();
      return;
    }
    shim_ = std::move(*shim);
    loop_ = std::thread([this] { shim_->Serve(); });
  }
  ~InProcessMount() {
    if (!loop_.joinable()) return;
    ::umount2(mnt_.c_str(), MNT_DETACH);
    loop_.join();
  }
  InProcessMount(const InProcessMount&) = delete;
  InProcessMount& operator=(const InProcessMount&) = delete;

  // Empty when mounted; else why not.
  const std::string& error() const { return error_; }
  const msgport::FuseShim& shim() const { return *shim_; }

 private:
  std::string mnt_, error_;
  std::unique_ptr<vfs::StackServer> server_;
  std::unique_ptr<msgport::DirectPort> port_;
  std::unique_ptr<msgport::FuseShim> shim_;
  std::thread loop_;
};

}  // namespace ulsp::testing
