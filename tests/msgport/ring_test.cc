// The lock-free ring under contention: every value pushed is popped exactly once,
// in order per producer, by any number of producers and consumers.
#include "kernel/msgport/ring.h"

#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

namespace ulsp::msgport {
namespace {

struct Cell {
  std::atomic<uint64_t> seq;
  uint64_t value;
};

TEST(Ring, FullAndEmptyAreReported) {
  RingIndex index;
  auto cells = std::make_unique<Cell[]>(4);
  Ring<Cell> ring(&index, reinterpret_cast<std::byte*>(cells.get()), 4, sizeof(Cell));
  ring.Initialise();
  EXPECT_FALSE(ring.TryPop([](Cell&) {}));
  EXPECT_FALSE(ring.HasReady());
  for (uint64_t i = 0; i < 4; ++i) EXPECT_TRUE(ring.TryPush([i](Cell& c) { c.value = i; }));
  EXPECT_FALSE(ring.TryPush([](Cell&) { ADD_FAILURE() << "fill called on a full ring"; }));
  for (uint64_t i = 0; i < 4; ++i) {
    uint64_t v = 99;
    EXPECT_TRUE(ring.TryPop([&](Cell& c) { v = c.value; }));
    EXPECT_EQ(v, i);
  }
  EXPECT_FALSE(ring.TryPop([](Cell&) { ADD_FAILURE() << "take called on an empty ring"; }));
}

TEST(Ring, ManyProducersManyConsumersLoseAndDuplicateNothing) {
  RingIndex index;
  auto cells = std::make_unique<Cell[]>(64);
  Ring<Cell> ring(&index, reinterpret_cast<std::byte*>(cells.get()), 64, sizeof(Cell));
  ring.Initialise();
  constexpr uint64_t kProducers = 4, kPerProducer = 200000;
  std::vector<std::atomic<uint8_t>> seen(kProducers * kPerProducer);
  std::atomic<uint64_t> popped{0};
  std::atomic<bool> order_ok{true};
  std::vector<std::thread> threads;
  for (uint64_t p = 0; p < kProducers; ++p) {
    threads.emplace_back([&, p] {
      for (uint64_t i = 0; i < kPerProducer; ++i) {
        uint64_t v = p * kPerProducer + i;
        while (!ring.TryPush([v](Cell& c) { c.value = v; })) std::this_thread::yield();
      }
    });
  }
  for (int c = 0; c < 3; ++c) {
    threads.emplace_back([&] {
      std::vector<uint64_t> last(kProducers, UINT64_MAX);
      while (popped.load() < kProducers * kPerProducer) {
        uint64_t v = 0;
        if (!ring.TryPop([&](Cell& cell) { v = cell.value; })) {
          std::this_thread::yield();
          continue;
        }
        popped.fetch_add(1);
        seen[v].fetch_add(1);
        uint64_t p = v / kPerProducer, i = v % kPerProducer;
        if (last[p] != UINT64_MAX && i <= last[p]) order_ok = false;  // per consumer, per producer: FIFO
        last[p] = i;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_TRUE(order_ok.load());
  for (size_t v = 0; v < seen.size(); ++v) ASSERT_EQ(seen[v].load(), 1) << "value " << v;
}

}  // namespace
}  // namespace ulsp::msgport
