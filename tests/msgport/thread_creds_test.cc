// AsWriter (kernel/msgport/thread_creds.h): inside the scope the thread's file-system
// uid is the caller's and its effective set lacks CAP_SYS_RESOURCE (and, for kData,
// the file-system capabilities, as the caller's would); afterwards the thread is as
// it was; other threads never change; a root caller changes nothing. The disk-space
// effect itself is tested through real mounts (tests/vfs/mount_test.cc, DiskSpace.*).
#include "kernel/msgport/thread_creds.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <future>
#include <thread>

#include "tests/temp_dir.h"

namespace ulsp {
namespace {

uid_t FsUid() { return static_cast<uid_t>(::syscall(SYS_setfsuid, -1)); }
uint64_t Effective() {
  ThreadCaps c;
  EXPECT_TRUE(c.Get());
  return c.Effective();
}
constexpr uint64_t Bit(int cap) { return uint64_t{1} << cap; }
constexpr uint64_t kFsCaps = Bit(CAP_CHOWN) | Bit(CAP_DAC_OVERRIDE) | Bit(CAP_DAC_READ_SEARCH) | Bit(CAP_FOWNER) |
                             Bit(CAP_FSETID) | Bit(CAP_LINUX_IMMUTABLE) | Bit(CAP_MKNOD) | Bit(CAP_MAC_OVERRIDE);

// A file-making scope keeps every capability but CAP_SYS_RESOURCE, and what the
// thread makes is the caller's; a thread that was there before is still root.
TEST(AsWriter, KFilesTakesTheCallersFileSystemUidAndDropsOnlySysResource) {
  ASSERT_EQ(::geteuid(), 0u) << "needs root";
  const uint64_t before = Effective();
  ASSERT_TRUE(before & Bit(CAP_DAC_OVERRIDE));
  testing::TempDir dir;
  std::promise<void> look;
  std::thread other([&, seen = look.get_future()]() mutable {
    seen.wait();
    EXPECT_EQ(FsUid(), 0u);
    EXPECT_EQ(Effective(), before);
  });
  {
    const AsWriter w(1000, AsWriter::Kind::kFiles);
    EXPECT_TRUE(w.active());
    EXPECT_EQ(FsUid(), 1000u);
    EXPECT_EQ(Effective(), before & ~Bit(CAP_SYS_RESOURCE));
    EXPECT_EQ(::mkdir((dir.path() + "/made").c_str(), 0755), 0);  // in root's 0755 directory
    look.set_value();
    other.join();
  }
  struct stat st {};
  ASSERT_EQ(::stat((dir.path() + "/made").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 1000u);
  EXPECT_EQ(st.st_gid, 0u);
  EXPECT_EQ(FsUid(), 0u);
  EXPECT_EQ(Effective(), before);
}

// A data scope leaves the file-system capabilities out too, as the caller's would be.
TEST(AsWriter, KDataLeavesOutTheFileSystemCapabilities) {
  const uint64_t before = Effective();
  testing::TempDir dir;
  {
    const AsWriter w(1000, AsWriter::Kind::kData);
    EXPECT_EQ(FsUid(), 1000u);
    EXPECT_EQ(Effective(), before & ~kFsCaps & ~Bit(CAP_SYS_RESOURCE));
    EXPECT_EQ(::mkdir((dir.path() + "/made").c_str(), 0755), -1);
    EXPECT_EQ(errno, EACCES);
  }
  EXPECT_EQ(FsUid(), 0u);
  EXPECT_EQ(Effective(), before);
}

TEST(AsWriter, ARootCallerChangesNothing) {
  const uint64_t before = Effective();
  const AsWriter w(0, AsWriter::Kind::kData);
  EXPECT_FALSE(w.active());
  EXPECT_EQ(FsUid(), 0u);
  EXPECT_EQ(Effective(), before);
}

// setfsuid fails without a word where the thread lacks CAP_SETUID: the scope says it
// changed nothing, and nothing changed.
TEST(AsWriter, AThreadThatMayNotTakeTheCallersIdsIsLeftAsItWas) {
  std::thread([] {
    ThreadCaps caps;
    ASSERT_TRUE(caps.Get());
    ASSERT_TRUE(caps.SetEffective(caps.Effective() & ~Bit(CAP_SETUID)));
    const uint64_t before = Effective();
    {
      const AsWriter w(1000, AsWriter::Kind::kData);
      EXPECT_FALSE(w.active());
      EXPECT_EQ(FsUid(), 0u);
      EXPECT_EQ(Effective(), before);
    }
    EXPECT_EQ(Effective(), before);
  }).join();
}

TEST(AsWriter, NestsForTheSameCaller) {
  const uint64_t before = Effective();
  {
    const AsWriter outer(1000, AsWriter::Kind::kFiles);
    {
      const AsWriter inner(1000, AsWriter::Kind::kData);
      EXPECT_FALSE(inner.active());
      EXPECT_EQ(Effective(), before & ~Bit(CAP_SYS_RESOURCE));  // the outer scope's kind
    }
    EXPECT_EQ(FsUid(), 1000u);
    EXPECT_EQ(Effective(), before & ~Bit(CAP_SYS_RESOURCE));
  }
  EXPECT_EQ(FsUid(), 0u);
  EXPECT_EQ(Effective(), before);
}

}  // namespace
}  // namespace ulsp
