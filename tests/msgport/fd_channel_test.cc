// The descriptor channel beside a shared-memory port: frames reach the one who asks
// for their id whatever the order, malformed frames and floods are refused without
// leaking a descriptor, and a closed peer is reported.
#include "kernel/msgport/fd_channel.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <thread>

namespace ulsp::msgport {
namespace {

using namespace std::chrono_literals;

size_t OpenFds() {
  size_t n = 0;
  for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

struct Pair {
  std::unique_ptr<FdChannel> a, b;
  Pair() {
    auto p = FdChannel::SocketPair();
    EXPECT_TRUE(p.has_value());
    a = std::make_unique<FdChannel>(std::move(p->first));
    b = std::make_unique<FdChannel>(std::move(p->second));
  }
};

UniqueFd DevNull() { return UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC)); }

TEST(FdChannel, FramesReachTheirIdWhateverTheOrder) {
  Pair p;
  for (uint64_t id = 1; id <= 5; ++id) {
    std::vector<UniqueFd> fds;
    for (uint64_t k = 0; k < id; ++k) fds.push_back(DevNull());
    ASSERT_TRUE(p.a->Send(id, fds).has_value());
  }
  for (uint64_t id = 5; id >= 1; --id) {  // asked for in the reverse order
    auto got = p.b->Take(id, id, After(2s));
    ASSERT_TRUE(got.has_value()) << id;
    EXPECT_EQ(got->size(), id);
    for (auto& fd : *got) EXPECT_EQ(::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
  }
}

TEST(FdChannel, ACountThatDoesNotMatchIsRefusedAndItsDescriptorsClosed) {
  Pair p;
  const size_t before = OpenFds();
  std::vector<UniqueFd> two;
  two.push_back(DevNull());
  two.push_back(DevNull());
  ASSERT_TRUE(p.a->Send(7, two).has_value());
  two.clear();
  auto got = p.b->Take(7, 1, After(2s));  // the envelope said one
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error(), Errno(EBADMSG));
  EXPECT_EQ(OpenFds(), before) << "a refused frame's descriptors must be closed";
}

TEST(FdChannel, AMalformedFrameIsRefused) {
  auto pair = FdChannel::SocketPair();
  ASSERT_TRUE(pair.has_value());
  UniqueFd raw = std::move(pair->first);
  FdChannel b(std::move(pair->second));
  const char junk[5] = {1, 2, 3, 4, 5};  // not a frame header
  ASSERT_EQ(::send(raw.get(), junk, sizeof junk, 0), 5);
  EXPECT_EQ(b.Pump(1s), FdChannel::PumpResult::kFrame);
  EXPECT_EQ(b.dropped(), 1u);
}

TEST(FdChannel, AFloodOfUnwantedFramesIsCappedWithoutLeaking) {
  Pair p;
  const size_t before = OpenFds();
  const size_t flood = FdChannel::kMaxStashed + 100;
  size_t sent = 0;
  while (sent < flood) {
    // Send in batches the socket buffer holds, reading them on the other side.
    for (int k = 0; k < 64 && sent < flood; ++k, ++sent) {
      std::vector<UniqueFd> one;
      one.push_back(DevNull());
      ASSERT_TRUE(p.a->Send(1000 + sent, one).has_value());
    }
    while (p.b->Pump(0ms) == FdChannel::PumpResult::kFrame) {
    }
  }
  EXPECT_EQ(p.b->dropped(), 100u);
  EXPECT_LE(OpenFds(), before + FdChannel::kMaxStashed);
  p.b.reset();  // its socket closes too
  EXPECT_EQ(OpenFds(), before - 1) << "stashed descriptors close with the channel";
}

TEST(FdChannel, AClosedPeerIsReported) {
  Pair p;
  p.a.reset();
  auto got = p.b->Take(1, 0, After(2s));
  ASSERT_FALSE(got.has_value());
  EXPECT_EQ(got.error(), Errno(ECONNRESET));
  EXPECT_TRUE(p.b->closed());
}

// A thread that watches only for the peer's end (as a client port's peer watcher
// does) leaves the frames to their takers: a taker reads its own frame at once
// rather than wait for a watcher to be woken for it.
TEST(FdChannel, AWatcherForThePeersEndLeavesTheFramesToTheirTakers) {
  Pair p;
  std::atomic<bool> stop{false};
  std::atomic<int> frames_seen{0};
  std::thread watcher([&] {
    while (!stop.load()) {
      if (p.b->Pump(20ms, -1, /*frames=*/false) == FdChannel::PumpResult::kFrame) frames_seen.fetch_add(1);
    }
  });
  for (uint64_t id = 1; id <= 50; ++id) {
    std::vector<UniqueFd> one;
    one.push_back(DevNull());
    ASSERT_TRUE(p.a->Send(id, one).has_value());
    auto got = p.b->Take(id, 1, After(2s));
    ASSERT_TRUE(got.has_value()) << id;
  }
  stop.store(true);
  watcher.join();
  EXPECT_EQ(frames_seen.load(), 0);
  EXPECT_FALSE(p.b->closed());
}

// When the peer goes, the watcher learns it, and the frames it sent before it went
// are still there for their takers.
TEST(FdChannel, AWatcherSeesThePeersEndAfterItsLastFrames) {
  Pair p;
  std::vector<UniqueFd> one;
  one.push_back(DevNull());
  ASSERT_TRUE(p.a->Send(9, one).has_value());
  p.a.reset();
  EXPECT_EQ(p.b->Pump(1s, -1, /*frames=*/false), FdChannel::PumpResult::kClosed);
  EXPECT_TRUE(p.b->closed());
  auto got = p.b->Take(9, 1, After(2s));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->size(), 1u);
  auto gone = p.b->Take(10, 0, After(2s));
  ASSERT_FALSE(gone.has_value());
  EXPECT_EQ(gone.error(), Errno(ECONNRESET));
}

}  // namespace
}  // namespace ulsp::msgport
