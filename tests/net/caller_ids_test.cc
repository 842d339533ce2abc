// CallerIds and ReadCallerCredentials against a real process of user 1000: the thread
// takes the caller's ids and gives up its capabilities for the scope, then has both
// back; the credentials read are the caller's, by pidfd and by /proc alike.
#include <gtest/gtest.h>
#include <grp.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "kernel/msgport/thread_creds.h"
#include "ulsp/net/caller_fs.h"

namespace ulsp::net {
namespace {

// A child of user and group 1000 (real, effective, saved), groups {1000, 44}, that
// waits until it is killed; or (`root_with_caps`) one of root's ids that has only
// those effective capabilities.
class UserProcess {
 public:
  explicit UserProcess(uint32_t root_with_caps = 0) {
    int ready[2];
    if (::pipe(ready) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      const gid_t groups[] = {1000, 44};
      if (root_with_caps != 0) {
        ThreadCaps caps;
        if (!caps.Get() || !caps.SetEffective(root_with_caps)) ::_exit(1);
      } else if (::setgroups(2, groups) != 0 || ::setresgid(1000, 1000, 1000) != 0 ||
                 ::setresuid(1000, 1000, 1000) != 0) {
        ::_exit(1);
      }
      (void)!::write(ready[1], "r", 1);
      ::pause();
      ::_exit(0);
    }
    ::close(ready[1]);
    char c;
    ok_ = pid_ > 0 && ::read(ready[0], &c, 1) == 1;
    ::close(ready[0]);
  }
  ~UserProcess() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  UserProcess(const UserProcess&) = delete;
  UserProcess& operator=(const UserProcess&) = delete;
  bool ok() const { return ok_; }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  bool ok_ = false;
};

// This thread's ids, groups and effective capabilities, as one line.
std::string ThreadIds() {
  uid_t r, e, s;
  gid_t gr, ge, gs;
  ::getresuid(&r, &e, &s);
  ::getresgid(&gr, &ge, &gs);
  std::ostringstream out;
  out << r << " " << e << " " << s << " / " << gr << " " << ge << " " << gs << " /";
  gid_t groups[64];
  const int n = ::getgroups(64, groups);
  for (int i = 0; i < n; ++i) out << " " << groups[i];
  std::ifstream status("/proc/thread-self/status");
  for (std::string line; std::getline(status, line);)
    if (line.starts_with("CapEff:")) out << " / " << line.substr(line.find_first_not_of(" \t", 7));
  return out.str();
}

TEST(CallerIds, TheThreadActsAsTheCallerForTheScopeOnly) {
  if (::geteuid() != 0) GTEST_FAIL() << "runs as root";
  UserProcess user;
  ASSERT_TRUE(user.ok());
  std::string before, inside, after;
  // A thread of its own: the ids are per thread, and the test's main thread keeps its.
  const std::string main_before = ThreadIds();
  std::thread([&] {
    before = ThreadIds();
    {
      auto ids = CallerIds::Enter(user.pid());
      ASSERT_TRUE(ids.has_value());
      inside = ThreadIds();
    }
    after = ThreadIds();
  }).join();
  EXPECT_EQ(inside, "1000 1000 0 / 1000 1000 0 / 44 1000 / 0000000000000000");
  EXPECT_EQ(after, before);
  EXPECT_TRUE(before.starts_with("0 0 0 / 0 0 0 /")) << before;
  EXPECT_EQ(ThreadIds(), main_before);
}

// Root without CAP_NET_ADMIN and the others a group lacks: the ids stay, the
// capabilities are the caller's for the scope.
TEST(CallerIds, ARootCallersCapabilitiesAreTakenToo) {
  UserProcess group_root(0x200405fb);
  ASSERT_TRUE(group_root.ok());
  for (auto what : {CallerIds::What::kIdsAndCapabilities, CallerIds::What::kCapabilities}) {
    std::string before, inside, after;
    std::thread([&] {
      before = ThreadIds();
      {
        auto ids = CallerIds::Enter(group_root.pid(), what);
        ASSERT_TRUE(ids.has_value());
        inside = ThreadIds();
      }
      after = ThreadIds();
    }).join();
    EXPECT_TRUE(inside.starts_with("0 0 0 / 0 0 0 /")) << inside;
    EXPECT_TRUE(inside.ends_with("/ 00000000200405fb")) << inside;
    EXPECT_EQ(after, before);
  }
}

TEST(CallerIds, ACallerOfOurOwnIdsChangesNothing) {
  auto ids = CallerIds::Enter(static_cast<pid_t>(::syscall(SYS_gettid)));
  ASSERT_TRUE(ids.has_value());
  EXPECT_TRUE(ThreadIds().starts_with("0 0 0 / 0 0 0 /"));
  EXPECT_EQ(CallerIds::Enter(999999999).error().value, ESRCH);
}

TEST(ReadCallerCredentials, AreTheCallersByPidfdAndByProc) {
  UserProcess user;
  ASSERT_TRUE(user.ok());
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, user.pid(), 0));
  ASSERT_GE(pidfd, 0);
  for (int fd : {pidfd, -1}) {
    auto c = ReadCallerCredentials(user.pid(), fd);
    ASSERT_TRUE(c.has_value()) << fd;
    EXPECT_EQ(c->tgid, user.pid());
    EXPECT_EQ(c->ruid, 1000u);
    EXPECT_EQ(c->rgid, 1000u);
    EXPECT_EQ(c->fsuid, 1000u);
  }
  ::close(pidfd);
  EXPECT_EQ(ReadCallerCredentials(999999999, -1).error().value, ESRCH);
}

}  // namespace
}  // namespace ulsp::net
