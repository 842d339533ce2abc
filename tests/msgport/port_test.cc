// The message-port contract on the in-process port kinds: exactly one reply on every
// path, the synchronous fast path, asynchronous replies, abort racing the reply,
// deadlines that expire while the server later replies, full queues.
#include "kernel/msgport/port.h"

#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "kernel/msgport/direct_port.h"
#include "kernel/msgport/thread_port.h"
#include "kernel/msgport/reply_queue.h"
#include "tests/msgport/test_commands.h"

namespace ulsp::msgport {
namespace {

using namespace std::chrono_literals;
using testing::Bytes;
using testing::From;
using testing::SendTo;

// A message that counts live instances, to prove late replies free what they own.
struct CountedMessage : Message {
  static inline std::atomic<int> live{0};
  CountedMessage() { live.fetch_add(1); }
  ~CountedMessage() override { live.fetch_sub(1); }
  static MessagePtr Make(uint64_t n) {
    MessagePtr m(new CountedMessage());
    m->payload = Bytes(n);
    return m;
  }
};

class EchoServer final : public Server {
 public:
  void Serve(MessagePtr msg) noexcept override {
    served.fetch_add(1);
    last_thread.store(std::this_thread::get_id());
    Reply(std::move(msg), 0);
  }
  std::atomic<int> served{0};
  std::atomic<std::thread::id> last_thread;
};

// Keeps every message; the test replies (or drops) them when it likes.
class HoldingServer final : public Server {
 public:
  void Serve(MessagePtr msg) noexcept override {
    std::lock_guard lock(mu);
    held.push_back(std::move(msg));
    cv.notify_all();
  }
  MessagePtr TakeOne(std::chrono::milliseconds timeout = 5s) {
    std::unique_lock lock(mu);
    if (!cv.wait_for(lock, timeout, [&] { return !held.empty(); })) return nullptr;
    MessagePtr m = std::move(held.front());
    held.erase(held.begin());
    return m;
  }
  std::mutex mu;
  std::condition_variable cv;
  std::vector<MessagePtr> held;
};

// A reply port that records how many replies each message got.
class CountingReplyPort final : public Port {
 public:
  CountingReplyPort() : Port("counting") {}
  void Put(MessagePtr msg) override { Reply(std::move(msg), EINVAL); }
  void PutReply(MessagePtr msg) override {
    std::lock_guard lock(mu);
    replies[From<uint64_t>(msg->payload)]++;
    errors.push_back(msg->error);
  }
  std::mutex mu;
  std::map<uint64_t, int> replies;
  std::vector<int> errors;
};

TEST(DirectPort, DoMsgServesInTheCallersThread) {
  EchoServer server;
  DirectPort port("direct", server);
  auto reply = DoMsg(port, Message::Make(7));
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ((*reply)->error, 0);
  EXPECT_EQ((*reply)->command, 7u);
  EXPECT_TRUE((*reply)->done());
  EXPECT_TRUE((*reply)->flags() & kMsgReplied);
  EXPECT_EQ(server.last_thread, std::this_thread::get_id());
}

TEST(DirectPort, ServerThatRepliesLaterFromAnotherThread) {
  HoldingServer server;
  DirectPort port("direct", server);
  std::thread replier([&] {
    MessagePtr m = server.TakeOne();
    ASSERT_TRUE(m);
    std::this_thread::sleep_for(5ms);
    Reply(std::move(m), ENOENT);
  });
  auto reply = DoMsg(port, Message::Make(), After(5s));
  replier.join();
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ((*reply)->error, ENOENT);
}

TEST(DirectPort, MessageReusedAcrossManyCallsKeepsItsBuffer) {
  EchoServer server;
  DirectPort port("direct", server);
  MessagePtr m = Message::Make(1);
  m->payload.resize(100);
  const auto* buffer = m->payload.data();
  for (int i = 0; i < 1000; ++i) {
    auto r = DoMsg(port, std::move(m));
    ASSERT_TRUE(r.has_value());
    m = std::move(*r);
  }
  EXPECT_EQ(m->payload.data(), buffer);
  EXPECT_EQ(server.served.load(), 1000);
}

TEST(ThreadPort, DoMsgIsServedOnTheServerThread) {
  EchoServer server;
  ThreadPort port("thread", server);
  auto reply = DoMsg(port, Message::Make(3), After(5s));
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ((*reply)->error, 0);
  EXPECT_NE(server.last_thread, std::this_thread::get_id());
}

TEST(ThreadPort, AsyncSendsGetExactlyOneReplyEach) {
  EchoServer server;
  ThreadPort port("thread", server, 64);
  ReplyQueue replies("replies", 8192);
  constexpr uint64_t kCount = 5000;
  for (uint64_t i = 0; i < kCount; ++i) {
    SendTo(port, CountedMessage::Make(i), replies);
  }
  std::set<uint64_t> seen;
  for (uint64_t i = 0; i < kCount; ++i) {
    MessagePtr r = replies.Wait(After(5s));
    ASSERT_TRUE(r) << "reply " << i << " never came";
    EXPECT_EQ(r->error, 0);
    EXPECT_TRUE(seen.insert(From<uint64_t>(r->payload)).second) << "two replies for one message";
  }
  EXPECT_EQ(seen.size(), kCount);
  EXPECT_FALSE(replies.TryTake()) << "more replies than messages";
  EXPECT_EQ(port.counters().put.load(), kCount);
}

TEST(Deadline, ExpiresWhileTheServerLaterRepliesWithoutUseAfterFree) {
  // Run under ASan (tools/test --sanitize): the late reply touches the abandoned
  // waiter and message, which must still be alive then and freed after.
  HoldingServer server;
  ThreadPort port("thread", server);
  const int live_before = CountedMessage::live.load();
  auto start = Clock::now();
  auto reply = DoMsg(port, CountedMessage::Make(1), After(30ms));
  auto waited = Clock::now() - start;
  ASSERT_FALSE(reply.has_value());
  EXPECT_EQ(reply.error(), Errno(ETIMEDOUT));
  EXPECT_GE(waited, 30ms);
  EXPECT_LT(waited, 2s);
  MessagePtr late = server.TakeOne();
  ASSERT_TRUE(late);
  EXPECT_TRUE(late->aborted()) << "a timed-out DoMsg asks the server to give up";
  EXPECT_EQ(CountedMessage::live.load(), live_before + 1);
  Reply(std::move(late), 0);  // to an abandoned waiter: frees message and waiter
  EXPECT_EQ(CountedMessage::live.load(), live_before);
  // The thread's next DoMsg works (the abandoned waiter was not reused).
  EchoServer echo;
  DirectPort direct("direct", echo);
  auto ok = DoMsg(direct, Message::Make(), After(1s));
  ASSERT_TRUE(ok.has_value());
  EXPECT_EQ((*ok)->error, 0);
}

TEST(Deadline, ManyExpireAndRaceTheirReplies) {
  // Replies land just before, at and after the deadline, from another thread.
  HoldingServer server;
  DirectPort port("direct", server);
  std::atomic<bool> done{false};
  std::thread replier([&] {
    int i = 0;
    while (!done.load()) {
      if (MessagePtr m = server.TakeOne(10ms)) {
        if (++i % 3 != 0) std::this_thread::sleep_for(std::chrono::microseconds(i % 200));
        Reply(std::move(m), 0);
      }
    }
  });
  const int live_before = CountedMessage::live.load();
  int timed_out = 0, answered = 0;
  for (int i = 0; i < 2000; ++i) {
    auto r = DoMsg(port, CountedMessage::Make(static_cast<uint64_t>(i)), After(std::chrono::microseconds(100)));
    r ? ++answered : ++timed_out;
    if (!r) {
      EXPECT_EQ(r.error(), Errno(ETIMEDOUT));
    }
  }
  done.store(true);
  replier.join();
  while (MessagePtr m = server.TakeOne(0ms)) Reply(std::move(m), 0);
  EXPECT_EQ(answered + timed_out, 2000);
  EXPECT_EQ(CountedMessage::live.load(), live_before) << "a message leaked or was freed twice";
}

// Serves only once the test opens the gate (from any thread): until then the server
// thread blocks on its first message.
class GatedServer final : public Server {
 public:
  void Serve(MessagePtr msg) noexcept override {
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return open_; });
    }
    served.fetch_add(1);
    Reply(std::move(msg), 0);
  }
  void Open() {
    {
      std::lock_guard lock(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }
  std::atomic<int> served{0};

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

TEST(Abort, QueuedMessageIsReplied_ECANCELED_WithoutReachingTheServer) {
  GatedServer server;
  ThreadPort port("thread", server, 64);
  ReplyQueue replies("replies");
  MessagePtr first = Message::Make();
  first->reply_port = &replies;
  Send(port, std::move(first));
  while (port.depth() != 0) std::this_thread::yield();  // the server thread holds it
  std::vector<Message*> queued;
  for (int i = 0; i < 10; ++i) {
    MessagePtr m = Message::Make();
    m->reply_port = &replies;
    queued.push_back(m.get());
    Send(port, std::move(m));
  }
  for (Message* m : queued) Abort(*m);  // still queued: not yet replied
  server.Open();
  int cancelled = 0, served_ok = 0;
  for (int i = 0; i < 11; ++i) {
    MessagePtr r = replies.Wait(After(5s));
    ASSERT_TRUE(r);
    r->error == ECANCELED ? ++cancelled : ++served_ok;
  }
  EXPECT_EQ(cancelled, 10);
  EXPECT_EQ(served_ok, 1);
  EXPECT_EQ(server.served.load(), 1) << "an aborted queued message reached the server";
  EXPECT_FALSE(replies.TryTake());
}

TEST(Abort, RacingTheReplyStillGivesExactlyOneReply) {
  // The sender aborts while the server replies; replies wait in the sender's reply
  // queue (as they would for any sender) until it has finished aborting.
  HoldingServer server;
  DirectPort port("direct", server);
  constexpr uint64_t kCount = 3000;
  ReplyQueue replies("replies", kCount);
  std::vector<Message*> raw(kCount);
  for (uint64_t i = 0; i < kCount; ++i) {
    MessagePtr m = CountedMessage::Make(i);
    m->reply_port = &replies;
    raw[i] = m.get();
    Send(port, std::move(m));
  }
  std::vector<MessagePtr> held = std::move(server.held);
  std::thread aborter([&] {
    for (uint64_t i = 0; i < kCount; ++i) Abort(*raw[i]);
  });
  int cancelled = 0;
  for (uint64_t i = 0; i < kCount; ++i) {
    const bool aborted = held[i]->aborted();
    cancelled += aborted;
    Reply(std::move(held[i]), aborted ? ECANCELED : 0);
  }
  aborter.join();
  std::set<uint64_t> seen;
  int cancelled_replies = 0;
  while (MessagePtr r = replies.TryTake()) {
    EXPECT_TRUE(seen.insert(From<uint64_t>(r->payload)).second) << "two replies for one message";
    cancelled_replies += r->error == ECANCELED;
  }
  EXPECT_EQ(seen.size(), kCount);
  EXPECT_EQ(cancelled_replies, cancelled);
}

TEST(ExactlyOneReply, ServerThatDropsAMessageRepliesEIO) {
  class Dropper final : public Server {
    void Serve(MessagePtr msg) noexcept override { msg.reset(); }
  } dropper;
  ThreadPort port("thread", dropper);
  auto reply = DoMsg(port, Message::Make(), After(5s));
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ((*reply)->error, EIO);
}

TEST(ExactlyOneReply, DestroyingAThreadPortRepliesQueuedMessages_ECONNRESET) {
  CountingReplyPort replies;
  class Slow final : public Server {
    void Serve(MessagePtr msg) noexcept override {
      std::this_thread::sleep_for(2ms);
      Reply(std::move(msg), 0);
    }
  } slow;
  {
    ThreadPort port("thread", slow, 512);
    for (uint64_t i = 0; i < 300; ++i) {
      MessagePtr m = Message::Make();
      m->payload = Bytes(i);
      SendTo(port, std::move(m), replies);
    }
  }
  std::lock_guard lock(replies.mu);
  ASSERT_EQ(replies.replies.size(), 300u);
  int reset = 0;
  for (int e : replies.errors) {
    EXPECT_TRUE(e == 0 || e == ECONNRESET) << e;
    reset += e == ECONNRESET;
  }
  EXPECT_GT(reset, 0) << "some messages should still have been queued";
}

TEST(FullQueue, FailPolicyRepliesEAGAIN) {
  GatedServer gated;  // the server thread blocks on its first message
  CountingReplyPort replies;
  ThreadPort port("thread", gated, 4, FullPolicy::kFail);
  for (uint64_t i = 0; i < 20; ++i) {
    MessagePtr m = Message::Make();
    m->payload = Bytes(i);
    SendTo(port, std::move(m), replies);
  }
  {
    std::lock_guard lock(replies.mu);
    // 4 fit in the queue and 1 is with the server: the others were refused at once.
    EXPECT_GE(replies.errors.size(), 15u);
    for (int e : replies.errors) EXPECT_EQ(e, EAGAIN);
  }
  gated.Open();
  auto deadline = After(5s);
  while (Clock::now() < deadline) {
    std::lock_guard lock(replies.mu);
    if (replies.replies.size() == 20) break;
  }
  std::lock_guard lock(replies.mu);
  EXPECT_EQ(replies.replies.size(), 20u);
  EXPECT_EQ(port.counters().refused.load(), std::count(replies.errors.begin(), replies.errors.end(), EAGAIN));
}

TEST(FullQueue, WaitPolicyWaitsUntilTheDeadlineThenETIMEDOUT) {
  GatedServer gated;
  ThreadPort port("thread", gated, 2, FullPolicy::kWait);
  ReplyQueue replies("replies");
  for (int i = 0; i < 3; ++i) {  // one with the server, two queued
    SendTo(port, Message::Make(), replies);
  }
  std::this_thread::sleep_for(10ms);
  auto start = Clock::now();
  auto r = DoMsg(port, Message::Make(), After(50ms));
  EXPECT_GE(Clock::now() - start, 50ms);
  ASSERT_TRUE(r.has_value()) << "the port itself answers a message it could not queue";
  EXPECT_EQ((*r)->error, ETIMEDOUT);
  // With room coming before the deadline, the send waits and succeeds.
  std::thread opener([&] {
    std::this_thread::sleep_for(20ms);
    gated.Open();
  });
  auto ok = DoMsg(port, Message::Make(), After(5s));
  opener.join();
  ASSERT_TRUE(ok.has_value());
  EXPECT_EQ((*ok)->error, 0);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(replies.Wait(After(5s)));
}

TEST(ManyThreads, DoMsgFromEightThreadsOnEachKind) {
  EchoServer echo;
  DirectPort direct("direct", echo);
  ThreadPort thread("thread", echo, 16);
  for (Port* port : {static_cast<Port*>(&direct), static_cast<Port*>(&thread)}) {
    std::atomic<int> ok{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 8; ++t) {
      threads.emplace_back([&] {
        MessagePtr m = Message::Make();
        for (int i = 0; i < 5000; ++i) {
          auto r = DoMsg(*port, std::move(m), After(10s));
          if (!r || (*r)->error != 0) return;
          m = std::move(*r);
          ok.fetch_add(1);
        }
      });
    }
    for (auto& t : threads) t.join();
    EXPECT_EQ(ok.load(), 8 * 5000) << port->name();
  }
}

TEST(ReplyPortMisuse, SendingARequestToAReplyQueueIsRefused) {
  ReplyQueue queue("replies");
  auto r = DoMsg(queue, Message::Make(), After(1s));
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ((*r)->error, EINVAL);
}

}  // namespace
}  // namespace ulsp::msgport
