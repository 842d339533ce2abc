// Forget works: after a walk of 100k files through a mount and a drop of the
// kernel's caches, the server's node table returns near its starting size. The
// stack serves in this process (so the test can read its table); the walk is a
// real `find` in a child process.
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include "tests/vfs/mount_fixture.h"
#include "ulsp/vfs/passthrough.h"

namespace ulsp::vfs {
namespace {

// A passthrough of `src` mounted on `mnt`, served by this process (so a test can read
// its table and count its descriptors), with long caches: only forget can shrink the
// table.
class PassthroughMount {
 public:
  PassthroughMount(const std::string& src, const std::string& mnt)
      : table_(Open(src)), mount_(std::unique_ptr<Layer>(table_), mnt, /*timeout=*/60) {}
  std::string error() const { return table_ ? mount_.error() : "the passthrough did not open"; }
  PassthroughLayer& table() { return *table_; }

 private:
  static PassthroughLayer* Open(const std::string& src) {
    auto layer = PassthroughLayer::Open(src);
    return layer ? layer->release() : nullptr;
  }
  PassthroughLayer* table_;  // owned by the mount's stack
  testing::InProcessMount mount_;
};

size_t OpenDescriptors() {
  return static_cast<size_t>(std::distance(std::filesystem::directory_iterator("/proc/self/fd"), {}));
}

TEST(NodeTable, ReturnsNearItsStartingSizeAfterAWalkAndACacheDrop) {
  testing::TempDir dir("/dev/shm");
  ASSERT_EQ(testing::Shell("mkdir " + dir / "mnt " + dir / "src && /usr/bin/python3 -c '\n"
                           "import os, sys\n"
                           "for d in range(200):\n"
                           "    p = os.path.join(sys.argv[1], f\"d{d}\")\n"
                           "    os.mkdir(p)\n"
                           "    for f in range(500):\n"
                           "        with open(os.path.join(p, f\"f{f}\"), \"w\") as f:\n"
                           "            f.write(\"x\")\n"
                           "' " + dir / "src"),
            0);
  PassthroughMount mount(dir / "src", dir / "mnt");
  ASSERT_EQ(mount.error(), "");
  PassthroughLayer* table = &mount.table();

  const size_t start = table->NodeCount();
  // The kernel reclaims inodes on its own while the walk goes (this machine keeps
  // little cache), so the peak is sampled during the walk.
  std::atomic<bool> walking{true};
  std::atomic<size_t> peak{0};
  std::thread sampler([&] {
    while (walking) {
      peak = std::max(peak.load(), table->NodeCount());
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  EXPECT_EQ(testing::Output("find " + dir / "mnt" + " -type f | wc -l"), "100000\n");
  walking = false;
  sampler.join();
  EXPECT_GE(peak.load(), 20000u) << "the walk should have grown the table";
  // A listed node takes a descriptor when it is first used: 20000 used nodes are more
  // than this process may keep where the hard limit is 20000 (here), so the later ones
  // keep file handles, and the second pass opens those.
  const std::string some = "find " + dir / "mnt" + " -path '*/d1[0-9][0-9]/*' -type f -print0 | xargs -0 cat | wc -c";
  EXPECT_EQ(testing::Output(some), "50000\n");
  EXPECT_EQ(testing::Output(some), "50000\n");
  ASSERT_EQ(testing::Shell("sync && echo 2 > /proc/sys/vm/drop_caches"), 0);
  // Forgets arrive asynchronously after the drop.
  size_t now = table->NodeCount();
  for (int i = 0; i < 200 && now > start + 1000; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    now = table->NodeCount();
  }
  EXPECT_LE(now, start + 1000) << "start " << start << ", peak " << peak;
  RecordProperty("peak_nodes", static_cast<int>(peak.load()));
  RecordProperty("nodes_after_drop", static_cast<int>(now));
}

// A listing (readdirplus) gives the kernel a node for every entry; the server holds
// each by its name, with no descriptor, until a request needs it. Each is then the
// inode it was listed as, or none: a name replaced behind the mount's back is looked up
// again (as ext4 itself would show it), never served as the file it used to be.
TEST(NodeTable, AListingKeepsNoDescriptorsUntilAnEntryIsUsed) {
  testing::TempDir dir("/dev/shm");
  ASSERT_EQ(testing::Shell("mkdir -p " + dir / "mnt " + dir / "src/many " + dir / "src/e/sub && cd " + dir / "src/many" +
                           " && seq 150 | xargs touch && cd ../e && echo a > a && echo c > c && echo x > x && echo "
                           "f > sub/f && echo h > h && ln h h2 && echo p > p && echo q > q"),
            0);
  PassthroughMount mount(dir / "src", dir / "mnt");
  ASSERT_EQ(mount.error(), "");
  const size_t nodes = mount.table().NodeCount();
  const size_t fds = OpenDescriptors();
  // find lists (its first listing of a directory is a readdirplus) and opens nothing.
  ASSERT_EQ(testing::Output("find " + dir / "mnt/many | wc -l"), "151\n");
  EXPECT_GE(mount.table().NodeCount(), nodes + 150);
  EXPECT_LT(OpenDescriptors(), fds + 10) << "a listed entry took a descriptor";

  // Used: opened (from its parent, then kept), renamed through the mount, linked.
  ASSERT_EQ(testing::Shell("find " + dir / "mnt/e > /dev/null"), 0);
  EXPECT_EQ(testing::Output("cat " + dir / "mnt/e/a " + dir / "mnt/e/sub/f"), "a\nf\n");
  EXPECT_EQ(testing::Output("cd " + dir / "mnt/e && mv x y && mv sub sub2 && cat y sub2/f && ln c c2 && cat c2 h2"),
            "x\nf\nc\nh\n");
  // Behind the mount's back: a listed name moved away, and one replaced by another file.
  ASSERT_EQ(testing::Shell("find " + dir / "mnt/e > /dev/null"), 0);
  ASSERT_EQ(testing::Shell("cd " + dir / "src/e && mv p p2 && rm q && echo Q > q"), 0);
  EXPECT_EQ(testing::Output("cat " + dir / "mnt/e/p 2>&1; cat " + dir / "mnt/e/p2 " + dir / "mnt/e/q"),
            "cat: " + dir / "mnt/e/p" + ": No such file or directory\np\nQ\n");
}

}  // namespace
}  // namespace ulsp::vfs
