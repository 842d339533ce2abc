// Forget works: after a walk of 100k files through a mount and a drop of the
// kernel's caches, the server's node table returns near its starting size. The
// stack serves in this process (so the test can read its table); the walk is a
// real `find` in a child process.
#include <gtest/gtest.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "kernel/msgport/direct_port.h"
#include "kernel/msgport/fuse_shim.h"
#include "tests/vfs/mount_fixture.h"
#include "ulsp/vfs/passthrough.h"
#include "ulsp/vfs/stack.h"

namespace ulsp::vfs {
namespace {

TEST(NodeTable, ReturnsNearItsStartingSizeAfterAWalkAndACacheDrop) {
  testing::TempDir dir("/dev/shm");
  ASSERT_EQ(testing::Shell("mkdir " + dir / "mnt " + dir / "src && /usr/bin/python3 -c '\n"
                           "import os, sys\n"
                           "for d in range(200):\n"
                           "    p = os.path.join(sys.argv[1], f\"d{d}\")\n"
                           "    os.mkdir(p)\n"
                           "    for f in range(500):\n"
                           "        open(os.path.join(p, f\"f{f}\"), \"w\").close()\n"
                           "' " + dir / "src"),
            0);
  auto layer = PassthroughLayer::Open(dir / "src");
  ASSERT_TRUE(layer);
  PassthroughLayer* table = layer->get();
  StackServer server(std::move(*layer));
  msgport::DirectPort port("vfs", server);
  msgport::FuseShim::Options options;
  options.mountpoint = dir / "mnt";
  options.timeout = 60;  // long caches: only forget can shrink the table
  auto shim = msgport::FuseShim::Mount(options, port, /*serves_inline=*/true);
  ASSERT_TRUE(shim) << shim.error().Describe();
  std::thread loop([&] { (*shim)->Serve(); });
  struct Unmount {
    std::string path;
    std::thread& loop;
    ~Unmount() {
      ::umount2(path.c_str(), MNT_DETACH);
      loop.join();
    }
  } unmount{dir / "mnt", loop};

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
  // Past 20000 nodes the table holds more nodes than the process may have
  // descriptors (the file-handle path is exercised).
  EXPECT_GE(peak.load(), 20000u) << "the walk should have grown the table";
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

}  // namespace
}  // namespace ulsp::vfs
