// The shared-memory port between two real processes: round trips, descriptors both
// ways, the death of the server (kill -9) with many messages outstanding, hostile
// frames in the rings, stale segments, and many threads and processes at once.
#include "kernel/msgport/shm_port.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <atomic>
#include <boost/interprocess/shared_memory_object.hpp>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "kernel/msgport/reply_queue.h"
#include "tests/msgport/spawned_server.h"
#include "tests/msgport/test_commands.h"

namespace ulsp::msgport {
namespace {

using namespace std::chrono_literals;
using namespace testing;

MessagePtr Make(uint32_t cmd, std::vector<std::byte> payload = {}) {
  MessagePtr m = Message::Make(cmd);
  m->payload = std::move(payload);
  return m;
}

int Answer(Port& port, MessagePtr m, Deadline deadline = After(10s)) {
  auto r = DoMsg(port, std::move(m), deadline);
  return r ? (*r)->error : -r.error().value;
}

TEST(ShmPort, EchoRoundTripsPayloadsOfEverySize) {
  auto s = SpawnServer({.slots = 16, .slot_bytes = 4096});
  ASSERT_TRUE(s.port);
  for (size_t size : {0uz, 1uz, 7uz, 8uz, 63uz, 1000uz, 3000uz, 3900uz}) {
    std::vector<std::byte> payload(size);
    for (size_t i = 0; i < size; ++i) payload[i] = static_cast<std::byte>(i * 31 + size);
    auto r = DoMsg(*s.port, Make(kEcho, payload), After(10s));
    ASSERT_TRUE(r.has_value()) << size;
    EXPECT_EQ((*r)->error, 0) << size;
    EXPECT_EQ((*r)->payload, payload) << size;
    EXPECT_EQ((*r)->command, kEcho);
  }
  EXPECT_EQ(s.port->outstanding(), 0u);
}

TEST(ShmPort, TooLargeForACellIsRefused_EMSGSIZE_BothWays) {
  auto s = SpawnServer({.slots = 16, .slot_bytes = 1024});
  ASSERT_TRUE(s.port);
  EXPECT_EQ(Answer(*s.port, Make(kEcho, std::vector<std::byte>(2000))), EMSGSIZE);
  EXPECT_EQ(Answer(*s.port, Make(kBigReply, Bytes(uint32_t{5000}))), EMSGSIZE);
  EXPECT_EQ(Answer(*s.port, Make(kBigReply, Bytes(uint32_t{500}))), 0);
  EXPECT_EQ(Answer(*s.port, Make(kEcho)), 0) << "the port keeps serving";
}

TEST(ShmPort, ServerErrnoReachesTheSender) {
  auto s = SpawnServer();
  ASSERT_TRUE(s.port);
  EXPECT_EQ(Answer(*s.port, Make(kErrno, Bytes(uint32_t{ENOENT}))), ENOENT);
  EXPECT_EQ(Answer(*s.port, Make(kErrno, Bytes(uint32_t{EACCES}))), EACCES);
  EXPECT_EQ(Answer(*s.port, Make(999)), ENOSYS);
}

TEST(ShmPort, DescriptorsTravelToTheServer) {
  auto s = SpawnServer();
  ASSERT_TRUE(s.port);
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  UniqueFd read_end(p[0]);
  std::string text = "written by the server through a passed descriptor";
  MessagePtr m = Make(kWriteToFd, std::vector<std::byte>(reinterpret_cast<const std::byte*>(text.data()),
                                                          reinterpret_cast<const std::byte*>(text.data()) + text.size()));
  m->fds.emplace_back(p[1]);
  auto r = DoMsg(*s.port, std::move(m), After(10s));
  ASSERT_TRUE(r.has_value());
  ASSERT_EQ((*r)->error, 0);
  EXPECT_TRUE((*r)->fds.empty());
  char buf[256] = {};
  ASSERT_EQ(::read(read_end.get(), buf, sizeof buf), static_cast<ssize_t>(text.size()));
  EXPECT_EQ(std::string(buf), text);
}

TEST(ShmPort, DescriptorsTravelBackInReplies) {
  auto s = SpawnServer();
  ASSERT_TRUE(s.port);
  auto path = std::filesystem::temp_directory_path() / ("ulsp-fd-test-" + std::to_string(::getpid()));
  std::ofstream(path) << "contents seen through the server's descriptor";
  std::string p = path.string();
  for (int i = 0; i < 50; ++i) {  // many, so descriptor frames and envelopes interleave
    auto r = DoMsg(*s.port, Make(kOpenFile, std::vector<std::byte>(reinterpret_cast<const std::byte*>(p.data()),
                                                                    reinterpret_cast<const std::byte*>(p.data()) + p.size())),
                   After(10s));
    ASSERT_TRUE(r.has_value());
    ASSERT_EQ((*r)->error, 0);
    ASSERT_EQ((*r)->fds.size(), 1u);
    char buf[128] = {};
    ASSERT_GT(::pread((*r)->fds[0].get(), buf, sizeof buf, 0), 0);
    EXPECT_EQ(std::string(buf), "contents seen through the server's descriptor");
    EXPECT_EQ(::fcntl((*r)->fds[0].get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC) << "received fds are close-on-exec";
  }
  EXPECT_EQ(Answer(*s.port, Make(kOpenFile, Bytes(uint64_t{0}))), ENOENT);
  std::filesystem::remove(path);
}

TEST(ShmPort, KillingTheServerRepliesEveryOutstandingMessage_ECONNRESET_Within100ms) {
  auto s = SpawnServer({.slots = 512, .slot_bytes = 256});
  ASSERT_TRUE(s.port);
  ReplyQueue replies("replies", 1024);
  replies.Help(*s.port);
  constexpr int kCount = 400;
  for (int i = 0; i < kCount; ++i) {
    SendTo(*s.port, Make(kSleepUs, Bytes(uint32_t{2000})), replies);
  }
  // A synchronous caller waiting too, from another thread.
  std::atomic<int> sync_error{-1};
  std::thread sync_caller([&] { sync_error = Answer(*s.port, Make(kSleepUs, Bytes(uint32_t{2000}))); });
  std::this_thread::sleep_for(30ms);  // some served, most still outstanding
  ASSERT_GT(s.port->outstanding(), 100u);
  const auto killed_at = Clock::now();
  s.Kill();
  int ok = 0, reset = 0;
  Deadline last_reply;
  for (int i = 0; i < kCount; ++i) {
    MessagePtr r = replies.Wait(After(5s));
    ASSERT_TRUE(r) << "a message got no reply after the server died";
    last_reply = Clock::now();
    if (r->error == 0) ++ok;
    else if (r->error == ECONNRESET) ++reset;
    else ADD_FAILURE() << "unexpected error " << r->error;
  }
  sync_caller.join();
  const auto took = std::chrono::duration_cast<std::chrono::microseconds>(
      std::max(last_reply, Clock::now()) - killed_at);
  RecordProperty("us_from_kill_to_last_reply", static_cast<int>(took.count()));
  std::printf("from kill -9 to the last of %d replies: %lld us (%d answered, %d ECONNRESET)\n", kCount,
              static_cast<long long>(took.count()), ok, reset);
  EXPECT_EQ(sync_error.load(), ECONNRESET);
  EXPECT_EQ(ok + reset, kCount);
  EXPECT_GT(reset, 100);
  EXPECT_LE(took.count(), 100'000) << "outstanding messages must fail within 100 ms of the death";
  EXPECT_FALSE(replies.TryTake()) << "a message got two replies";
  EXPECT_FALSE(s.port->peer_alive());
  EXPECT_EQ(s.port->outstanding(), 0u);
  // Later sends fail at once (the bug would wait for the 10 s deadline; the bound
  // leaves room for a loaded machine).
  const auto start = Clock::now();
  EXPECT_EQ(Answer(*s.port, Make(kEcho)), ECONNRESET);
  EXPECT_LT(Clock::now() - start, 1s);
}

TEST(ShmPort, ServerThatExitsInTheMiddleOfAMessage) {
  auto s = SpawnServer();
  ASSERT_TRUE(s.port);
  EXPECT_EQ(Answer(*s.port, Make(kEcho)), 0);
  const auto start = Clock::now();
  EXPECT_EQ(Answer(*s.port, Make(kCrash)), ECONNRESET);
  EXPECT_LT(Clock::now() - start, 100ms);
}

TEST(ShmPort, CorruptOrTruncatedRequestIsRefused_EBADMSG_AndThePortKeepsServing) {
  auto s = SpawnServer({.slots = 16, .slot_bytes = 512});
  ASSERT_TRUE(s.port);
  ReplyQueue replies("replies");
  replies.Help(*s.port);
  std::vector<std::byte> garbage(128);
  for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<std::byte>(i * 37 + 11);
  // A valid envelope, to truncate.
  struct Case {
    const char* what;
    std::vector<std::byte> bytes;
    uint32_t claimed;
  };
  std::vector<Case> cases = {
      {"random bytes", garbage, 128},
      {"length beyond the cell", garbage, 100000},
      {"length not a whole word", garbage, 61},
      {"empty", {}, 0},
      {"segment table claims more than the frame", {std::byte{0}, std::byte{0}, std::byte{0}, std::byte{0},
                                                    std::byte{0xff}, std::byte{0xff}, std::byte{0}, std::byte{0},
                                                    std::byte{0}, std::byte{0}, std::byte{0}, std::byte{0},
                                                    std::byte{0}, std::byte{0}, std::byte{0}, std::byte{0}}, 16},
      {"all zeros (a null root, so the id does not match)", std::vector<std::byte>(64), 64},
  };
  for (auto& c : cases) {
    MessagePtr m = Make(kEcho);
    m->reply_port = &replies;
    s.port->PutRawForTest(std::move(m), c.bytes, c.claimed);
    MessagePtr r = replies.Wait(After(10s));
    ASSERT_TRUE(r) << c.what;
    EXPECT_EQ(r->error, EBADMSG) << c.what;
    EXPECT_EQ(Answer(*s.port, Make(kEcho, Bytes(uint64_t{42}))), 0) << "after " << c.what;
  }
  EXPECT_EQ(s.port->outstanding(), 0u);
}

TEST(ShmPort, CorruptReplyIsRefused_EBADMSG_AndThePortKeepsServing) {
  auto s = SpawnServer();
  ASSERT_TRUE(s.port);
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(Answer(*s.port, Make(kCorruptReply)), EBADMSG);
    EXPECT_EQ(Answer(*s.port, Make(kEcho)), 0);
  }
  EXPECT_EQ(s.port->counters().bad_input.load(), 20u);
}

TEST(ShmPort, AServerThatScribblesOnTheSegmentCannotHurtTheClient) {
  // The header and the rings are writable by both processes. The client checked the
  // layout once and keeps it: a server that rewrites the slot size cannot make it read
  // past a cell (the reply below claims 64 MiB), and a scribbled ring index cannot
  // keep it spinning. It gets errors, and it stays up.
  auto s = SpawnServer({.slots = 16, .slot_bytes = 512});
  ASSERT_TRUE(s.port);
  EXPECT_EQ(Answer(*s.port, Make(kScribble)), EBADMSG);
  for (int i = 0; i < 5; ++i) {
    const auto start = Clock::now();
    int e = Answer(*s.port, Make(kEcho), After(5s));
    EXPECT_TRUE(e == EAGAIN || e == EBADMSG || e == -ETIMEDOUT || e == 0) << e;
    EXPECT_LT(Clock::now() - start, 6s);
  }
  s.Kill();
  const auto deadline = Clock::now() + 1s;  // the death is noticed from the socket
  while (s.port->peer_alive() && Clock::now() < deadline) std::this_thread::sleep_for(1ms);
  EXPECT_FALSE(s.port->peer_alive());
  EXPECT_EQ(Answer(*s.port, Make(kEcho)), ECONNRESET);
}

TEST(ShmPort, FullPolicyFailRepliesEAGAIN) {
  auto s = SpawnServer({.slots = 4, .slot_bytes = 256, .full = FullPolicy::kFail});
  ASSERT_TRUE(s.port);
  ReplyQueue replies("replies");
  for (int i = 0; i < 12; ++i) {
    SendTo(*s.port, Make(kSleepUs, Bytes(uint32_t{20000})), replies);
  }
  int again = 0, ok = 0;
  for (int i = 0; i < 12; ++i) {
    MessagePtr r = replies.Wait(After(10s));
    ASSERT_TRUE(r);
    r->error == EAGAIN ? ++again : (r->error == 0 ? ++ok : 0);
  }
  EXPECT_EQ(ok, 4);
  EXPECT_EQ(again, 8);
}

TEST(ShmPort, FullPolicyWaitTimesOutAtTheMessagesDeadline) {
  auto s = SpawnServer({.slots = 2, .slot_bytes = 256, .full = FullPolicy::kWait});
  ASSERT_TRUE(s.port);
  ReplyQueue replies("replies");
  for (int i = 0; i < 2; ++i) {
    SendTo(*s.port, Make(kSleepUs, Bytes(uint32_t{300000})), replies);
  }
  const auto start = Clock::now();
  auto r = DoMsg(*s.port, Make(kEcho), After(50ms));
  EXPECT_GE(Clock::now() - start, 50ms);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ((*r)->error, ETIMEDOUT);
  EXPECT_EQ(Answer(*s.port, Make(kEcho), After(10s)), 0) << "waits for room, then is served";
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(replies.Wait(After(10s)));
}

TEST(ShmPort, DeadlineExpiresWhileTheServerLaterReplies) {
  auto s = SpawnServer();
  ASSERT_TRUE(s.port);
  auto r = DoMsg(*s.port, Make(kSleepUs, Bytes(uint32_t{100000})), After(20ms));
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errno(ETIMEDOUT));
  std::this_thread::sleep_for(150ms);  // the late reply arrives and frees the message
  EXPECT_EQ(s.port->outstanding(), 0u);
  EXPECT_EQ(Answer(*s.port, Make(kEcho)), 0);
}

// A ReplyQueue that helps the port takes a lease (the server stops waking the client's
// reply thread) and keeps it when its owner goes off to other work. A reply meant for
// someone else that lands while the lease still runs is not announced when it is
// pushed: the server must announce it once the lease runs out (1 ms), not leave it
// waiting for a next reply that may never come.
void RepliesArriveAfterALapsedLease() {
  auto s = SpawnServer();
  ASSERT_TRUE(s.port);
  ReplyQueue helper("helper");
  helper.Help(*s.port);
  ReplyQueue other("other");  // helps nobody: depends on the reply thread
  Clock::duration worst{};
  for (int round = 0; round < 20; ++round) {
    for (int i = 0; i < 64; ++i) {  // a burst that renews the lease
      SendTo(*s.port, Make(kEcho), helper);
      ASSERT_TRUE(helper.Wait(After(5s)));
    }
    // At once, while the lease runs: a message whose reply nobody polls for.
    MessagePtr m = Make(kEcho);
    m->reply_port = &other;
    const auto start = Clock::now();
    Send(*s.port, std::move(m));
    MessagePtr r = other.Wait(After(5s));
    ASSERT_TRUE(r) << "a reply waited for nobody (round " << round << ")";
    EXPECT_EQ(r->error, 0);
    worst = std::max(worst, Clock::now() - start);
  }
  ::testing::Test::RecordProperty("worst_us", static_cast<int>(std::chrono::duration_cast<std::chrono::microseconds>(worst).count()));
  // The bound is the lease (1 ms). 50 ms leaves room for a loaded machine and
  // sanitizer builds, and still fails the bug this guards against: the reply thread
  // in its 100 ms idle sleep while a reply waited for nobody.
  EXPECT_LT(worst, 50ms);
}

TEST(ShmPort, RepliesArriveWhenTheLeaseHolderStopsPolling) { RepliesArriveAfterALapsedLease(); }

// Processes that keep every CPU busy while they live (killed and reaped on the way out).
struct BusyCpus {
  std::vector<pid_t> pids;
  BusyCpus() {
    const unsigned n = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned i = 0; i < n; ++i) {
      char* argv[] = {const_cast<char*>("/bin/sh"), const_cast<char*>("-c"), const_cast<char*>("while :; do :; done"), nullptr};
      pid_t pid = -1;
      if (::posix_spawn(&pid, "/bin/sh", nullptr, nullptr, argv, environ) == 0) pids.push_back(pid);
    }
  }
  ~BusyCpus() {
    for (pid_t pid : pids) ::kill(pid, SIGKILL);
    for (pid_t pid : pids) ::waitpid(pid, nullptr, 0);
  }
};

// The same with every CPU kept busy: the server's idle spin then yields, and each yield
// can last a timeslice. Looking for lapsed leases only every 64th pause, it announced
// such a reply 92 ms late, every time, with two busy processes on two CPUs (8 ms once
// it looked after every yield).
TEST(ShmPort, RepliesArriveWhenTheLeaseHolderStopsPollingOnBusyCpus) {
  BusyCpus busy;
  ASSERT_FALSE(busy.pids.empty());
  RepliesArriveAfterALapsedLease();
}

TEST(ShmPort, AnAbortReachesTheServerProcess) {
  auto s = SpawnServer();
  ASSERT_TRUE(s.port);
  ReplyQueue replies("replies");
  MessagePtr m = Make(kWaitForAbort);
  Message* raw = m.get();
  SendTo(*s.port, std::move(m), replies);
  std::this_thread::sleep_for(20ms);  // with the server's handler by now
  const auto start = Clock::now();
  Abort(*raw);  // not replied yet: the handler waits up to 5 s
  MessagePtr r = replies.Wait(After(10s));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, ECANCELED) << "the server never saw the abort";
  EXPECT_LT(Clock::now() - start, 2s);
  EXPECT_EQ(Answer(*s.port, Make(kEcho)), 0);
}

// With answer_aborted_after, an aborted message the server does not answer in time
// is answered EINTR by the port, and the server's late answer is dropped quietly (no
// bad input, no second reply). An isolated VFS server that stopped without dying held
// a program for good otherwise. Without the option the port waits, as before.
TEST(ShmPort, AnUnansweredAbortIsAnsweredEintrByThePortWhenAsked) {
  ShmPortOptions options;
  options.answer_aborted_after = 300ms;
  auto s = SpawnServer(options);
  ASSERT_TRUE(s.port);
  ReplyQueue replies("replies");
  MessagePtr m = Make(kSleepUs, Bytes(uint32_t{1500000}));  // ignores the abort: 1.5 s
  Message* raw = m.get();
  SendTo(*s.port, std::move(m), replies);
  std::this_thread::sleep_for(20ms);
  const auto start = Clock::now();
  Abort(*raw);
  MessagePtr r = replies.Wait(After(10s));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, EINTR);
  EXPECT_GE(Clock::now() - start, 300ms);
  EXPECT_LT(Clock::now() - start, 1200ms);  // the answer the server gives at 1.5 s is not waited for
  r.reset();
  std::this_thread::sleep_for(1500ms);  // the late answer comes, and is dropped
  EXPECT_FALSE(replies.Wait(After(10ms))) << "a second reply";
  EXPECT_EQ(s.port->counters().bad_input.load(), 0u);
  EXPECT_EQ(s.port->outstanding(), 0u);
  EXPECT_EQ(Answer(*s.port, Make(kEcho)), 0);

  // Without the option, the server's answer is waited for.
  auto plain = SpawnServer();
  ASSERT_TRUE(plain.port);
  m = Make(kSleepUs, Bytes(uint32_t{800000}));
  raw = m.get();
  SendTo(*plain.port, std::move(m), replies);
  std::this_thread::sleep_for(20ms);
  Abort(*raw);
  r = replies.Wait(After(10s));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, 0);
}

// An abort racing its message's send, as when the kernel interrupts a FUSE request the
// shim is still sending: Abort reads the port and the id the sender is writing. Each
// message still gets one reply, and the port goes on serving. (Those were plain
// fields, a data race ThreadSanitizer caught once in a full run of the suite.)
TEST(ShmPort, AnAbortRacingTheSendGivesOneReplyAndNoRace) {
  auto s = SpawnServer();
  ASSERT_TRUE(s.port);
  constexpr int kCount = 2000;
  ReplyQueue replies("replies", kCount);
  std::atomic<Message*> next{nullptr};
  std::atomic<int> aborts{0};
  std::atomic<bool> stop{false};
  std::thread aborter([&] {
    while (!stop.load(std::memory_order_acquire)) {
      if (Message* m = next.exchange(nullptr, std::memory_order_acq_rel)) {
        Abort(*m);
        aborts.fetch_add(1, std::memory_order_release);
      }
    }
  });
  int cancelled = 0;
  for (int i = 0; i < kCount; ++i) {
    MessagePtr m = Make(kEcho);
    next.store(m.get(), std::memory_order_release);
    SendTo(*s.port, std::move(m), replies);
    while (aborts.load(std::memory_order_acquire) != i + 1) std::this_thread::yield();  // done with it
    MessagePtr r = replies.Wait(After(10s));
    ASSERT_TRUE(r) << i;
    EXPECT_TRUE(r->error == 0 || r->error == ECANCELED) << r->error;
    cancelled += r->error == ECANCELED;
  }
  stop.store(true, std::memory_order_release);
  aborter.join();
  EXPECT_FALSE(replies.TryTake()) << "a second reply";
  EXPECT_EQ(Answer(*s.port, Make(kEcho)), 0);
  std::cout << cancelled << " of " << kCount << " echoes were cancelled by their abort\n";
}

TEST(ShmPort, ADoMsgThatTimesOutAbortsTheServersWork) {
  auto s = SpawnServer();
  ASSERT_TRUE(s.port);
  auto r = DoMsg(*s.port, Make(kWaitForAbort), After(50ms));
  // ETIMEDOUT; or, if this thread was preempted between forwarding the abort and
  // giving up, the server's ECANCELED won the race and is the answer.
  if (r.has_value()) {
    EXPECT_EQ((*r)->error, ECANCELED);
  } else {
    EXPECT_EQ(r.error(), Errno(ETIMEDOUT));
  }
  // The server gives up at once on the abort (not after its 5 s), and the late reply
  // frees the slot.
  const auto deadline = Clock::now() + 2s;
  while (s.port->outstanding() != 0 && Clock::now() < deadline) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(s.port->outstanding(), 0u);
}

TEST(ShmPort, MixedSyncAndAsyncTrafficLosesNoWakeUp) {
  // Every hand-off between spinning, polling under a lease, and sleeping on a futex,
  // on both sides, at random: synchronous callers that pause (so their waits sleep
  // and end leases), an asynchronous sender whose ReplyQueue helps the port and one
  // whose does not (served by the reply thread), and a server whose work takes a
  // random 0-300 us (so it goes idle and sleeps). A lost wake-up shows as a message
  // answered late (the sleeps are 100 ms) or never.
  auto s = SpawnServer({.slots = 64, .slot_bytes = 256});
  ASSERT_TRUE(s.port);
  std::atomic<int> late{0}, failed{0}, done{0};
  constexpr auto kLate = 90ms;
  const auto until = Clock::now() + 1500ms;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      while (Clock::now() < until) {
        const auto start = Clock::now();
        int e = Answer(*s.port, Make(kSleepUs, Bytes(static_cast<uint32_t>(rng() % 300))), After(5s));
        if (e != 0) failed.fetch_add(1);
        if (Clock::now() - start > kLate) late.fetch_add(1);
        done.fetch_add(1);
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 400));
      }
    });
  }
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(100 + t));
      ReplyQueue replies("async");
      if (t == 0) replies.Help(*s.port);
      while (Clock::now() < until) {
        const int burst = 1 + static_cast<int>(rng() % 8);
        const auto start = Clock::now();
        for (int i = 0; i < burst; ++i) SendTo(*s.port, Make(kSleepUs, Bytes(static_cast<uint32_t>(rng() % 300))), replies);
        for (int i = 0; i < burst; ++i) {
          MessagePtr r = replies.Wait(After(5s));
          if (!r || r->error != 0) failed.fetch_add(1);
          done.fetch_add(1);
        }
        // The burst's replies come one after another from a server doing 0-300 us of
        // work each, behind the other threads' messages: allow for that.
        if (Clock::now() - start > kLate + std::chrono::milliseconds(burst * 3)) late.fetch_add(1);
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
      }
    });
  }
  for (auto& t : threads) t.join();
  RecordProperty("messages", done.load());
  EXPECT_GT(done.load(), 500);
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(late.load(), 0) << "answers that took a sleep's length: a wake-up was lost";
  EXPECT_EQ(s.port->outstanding(), 0u);
}

TEST(ShmPort, StopEndsTheServersLoop) {
  // Client and server in one process: Serve on a thread, then Stop from another.
  class Echo final : public Server {
    void Serve(MessagePtr msg) noexcept override { Reply(std::move(msg), 0); }
  } echo;
  auto client = ShmClientPort::Create("in-process");
  ASSERT_TRUE(client.has_value());
  auto server = ShmServerPort::Attach((*client)->segment_name(), (*client)->TakeServerSocket());
  ASSERT_TRUE(server.has_value());
  ASSERT_TRUE((*client)->WaitForServer(After(5s)).has_value());
  std::atomic<bool> returned{false};
  std::thread loop([&] {
    (*server)->Serve(echo);
    returned.store(true);
  });
  EXPECT_EQ(Answer(**client, Make(kEcho, Bytes(uint64_t{7}))), 0);
  std::this_thread::sleep_for(5ms);  // let it go idle, and to sleep
  const auto start = Clock::now();
  (*server)->Stop();
  loop.join();
  EXPECT_TRUE(returned.load());
  // The loop sleeps up to 100 ms when idle: Stop must wake it, not wait that out.
  EXPECT_LT(Clock::now() - start, 50ms);
}

TEST(ShmPort, SegmentNameIsGoneOnceTheServerAttached) {
  auto port = ShmClientPort::Create("x");
  ASSERT_TRUE(port.has_value());
  std::string name = (*port)->segment_name();
  EXPECT_TRUE(std::filesystem::exists("/dev/shm/" + name));
  port->reset();  // never attached: the destructor removes it
  EXPECT_FALSE(std::filesystem::exists("/dev/shm/" + name));
  auto s = SpawnServer();
  ASSERT_TRUE(s.port);
  EXPECT_FALSE(std::filesystem::exists("/dev/shm/" + s.port->segment_name()));
}

TEST(ShmPort, StaleSegmentsOfKilledProcessesAreRemoved) {
  // One of a live process (this one) must stay. Created first, so this process's
  // once-per-process clean-up in Create has run before the stale segment exists.
  auto mine = ShmClientPort::Create("mine");
  ASSERT_TRUE(mine.has_value());
  // A process that creates a segment and is killed before any server attaches.
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto port = ShmClientPort::Create("doomed");
    if (!port) ::_exit(1);
    ::kill(::getpid(), SIGKILL);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status));
  std::string stale;
  for (auto& e : std::filesystem::directory_iterator("/dev/shm")) {
    if (e.path().filename().string().starts_with("ulsp." + std::to_string(child) + ".")) stale = e.path();
  }
  ASSERT_FALSE(stale.empty()) << "the killed process should have left its segment behind";
  EXPECT_GE(RemoveStaleSegments(), 1);
  EXPECT_FALSE(std::filesystem::exists(stale));
  EXPECT_TRUE(std::filesystem::exists("/dev/shm/" + (*mine)->segment_name()));
}

TEST(ShmPort, AttachRefusesWhatIsNotAPort) {
  auto missing = ShmServerPort::Attach("ulsp.no-such-segment", UniqueFd());
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error(), Errno(ENOENT));
  namespace bip = boost::interprocess;
  std::string name = "ulsp-test-notaport-" + std::to_string(::getpid());
  {
    bip::shared_memory_object obj(bip::create_only, name.c_str(), bip::read_write);
    obj.truncate(65536);
  }
  auto bad = ShmServerPort::Attach(name, UniqueFd());
  bip::shared_memory_object::remove(name.c_str());
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error(), Errno(EINVAL));
}

TEST(ShmPort, ManyThreadsAndProcessesAtOnce) {
  std::vector<SpawnedServer> servers;
  for (int i = 0; i < 3; ++i) {
    servers.push_back(SpawnServer({.slots = 64, .slot_bytes = 512}));
    ASSERT_TRUE(servers.back().port);
  }
  std::vector<int32_t> pids;
  for (auto& s : servers) {
    auto r = DoMsg(*s.port, Make(kPid), After(10s));
    ASSERT_TRUE(r.has_value());
    pids.push_back(From<int32_t>((*r)->payload));
    EXPECT_EQ(pids.back(), s.pid);
  }
  std::atomic<int> ok{0}, wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t i = 0; i < 3000; ++i) {
        auto& s = servers[(static_cast<size_t>(t) + i) % servers.size()];
        uint64_t tag = (static_cast<uint64_t>(t) << 32) | i;
        auto r = DoMsg(*s.port, Make(kEcho, Bytes(tag)), After(20s));
        if (r && (*r)->error == 0 && From<uint64_t>((*r)->payload) == tag) {
          ok.fetch_add(1);
        } else {
          wrong.fetch_add(1);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 6 * 3000);
  EXPECT_EQ(wrong.load(), 0);
}

}  // namespace
}  // namespace ulsp::msgport
