// AsWriter (kernel/msgport/thread_creds.h): inside the scope the thread's file-system
// ids are the caller's and its effective set lacks CAP_SYS_RESOURCE and nothing else;
// afterwards the thread is as it was; other threads never change; a root caller
// changes nothing. The disk-space effect itself is tested through real mounts
// (tests/vfs/mount_test.cc, DiskSpace.*).
#include "kernel/msgport/thread_creds.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <future>
#include <thread>

#include "tests/temp_dir.h"

namespace ulsp {
namespace {

uid_t FsUid() { return static_cast<uid_t>(::syscall(SYS_setfsuid, -1)); }
gid_t FsGid() { return static_cast<gid_t>(::syscall(SYS_setfsgid, -1)); }
uint64_t Effective() {
  ThreadCaps c;
  EXPECT_TRUE(c.Get());
  return c.Effective();
}
constexpr uint64_t Bit(int cap) { return uint64_t{1} << cap; }

TEST(AsWriter, TakesTheCallersFileSystemIdsAndDropsOnlySysResource) {
  ASSERT_EQ(::geteuid(), 0u) << "needs root";
  const uint64_t before = Effective();
  ASSERT_TRUE(before & Bit(CAP_DAC_OVERRIDE));
  testing::TempDir dir;
  // A thread that was there before the scope looks while it lasts.
  std::promise<void> look;
  std::thread other([&, seen = look.get_future()]() mutable {
    seen.wait();
    EXPECT_EQ(FsUid(), 0u);
    EXPECT_EQ(Effective(), before);
  });
  {
    const AsWriter w(1000, 1001);
    EXPECT_TRUE(w.active());
    EXPECT_EQ(FsUid(), 1000u);
    EXPECT_EQ(FsGid(), 1001u);
    // The file-system capabilities that setfsuid took are back: only SYS_RESOURCE is gone.
    EXPECT_EQ(Effective(), before & ~Bit(CAP_SYS_RESOURCE));
    // What the thread makes is the caller's; another thread is still root.
    EXPECT_EQ(::mkdir((dir.path() + "/made").c_str(), 0755), 0);
    look.set_value();
    other.join();
  }
  struct stat st {};
  ASSERT_EQ(::stat((dir.path() + "/made").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 1000u);
  EXPECT_EQ(st.st_gid, 1001u);
  EXPECT_EQ(FsUid(), 0u);
  EXPECT_EQ(FsGid(), 0u);
  EXPECT_EQ(Effective(), before);
}

TEST(AsWriter, ARootCallerChangesNothing) {
  const uint64_t before = Effective();
  const AsWriter w(0, 1001);
  EXPECT_FALSE(w.active());
  EXPECT_EQ(FsUid(), 0u);
  EXPECT_EQ(FsGid(), 0u);
  EXPECT_EQ(Effective(), before);
}

TEST(AsWriter, NestsForTheSameCaller) {
  const uint64_t before = Effective();
  {
    const AsWriter outer(1000, 1000);
    {
      const AsWriter inner(1000, 1000);
      EXPECT_EQ(FsUid(), 1000u);
    }
    EXPECT_EQ(FsUid(), 1000u);
    EXPECT_EQ(Effective(), before & ~Bit(CAP_SYS_RESOURCE));
  }
  EXPECT_EQ(FsUid(), 0u);
  EXPECT_EQ(Effective(), before);
}

}  // namespace
}  // namespace ulsp
