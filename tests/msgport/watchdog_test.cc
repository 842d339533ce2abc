// The watchdog that the FUSE loop, FUSE over io_uring, the seccomp shim and isolated
// servers share: it looks while work flows, rests when none does, and an item of work
// wakes it, including one that comes just as it goes to rest.
#include "kernel/msgport/watchdog.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace ulsp::msgport {
namespace {

using namespace std::chrono_literals;

constexpr auto kPeriod = 200us;

// An owner with one thread's worth of work: busy while `busy` is set.
struct Owner {
  std::atomic<bool> busy{false};
  std::atomic<unsigned> looks{0};
  std::atomic<unsigned> busy_looks{0};
  Watchdog watchdog{kPeriod, [this] {
                      looks.fetch_add(1);
                      const bool b = busy.load();
                      if (b) busy_looks.fetch_add(1);
                      return b;
                    }};
};

// Waits up to 5 s for `done`. Polled, not slept for a fixed time: on a loaded machine
// (a sanitizer build beside other tests) the watchdog's thread may be late.
template <class Done>
bool Eventually(Done done) {
  const auto end = std::chrono::steady_clock::now() + 5s;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= end) return false;
    std::this_thread::sleep_for(kPeriod);
  }
  return true;
}

// Waits until the watchdog has stopped looking (no look for 100 periods: longer than
// a late thread's delay, shorter than its quiet spell of kQuietTicks looks).
bool WaitUntilResting(const Owner& o, std::chrono::milliseconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  unsigned seen = o.looks.load();
  auto still_since = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(kPeriod);
    const unsigned now = o.looks.load();
    if (now != seen) {
      seen = now;
      still_since = std::chrono::steady_clock::now();
    } else if (std::chrono::steady_clock::now() - still_since > 100 * kPeriod) {
      return true;
    }
  }
  return false;
}

TEST(Watchdog, LooksWhileWorkFlowsAndRestsAfterAQuietSpell) {
  Owner o;
  ASSERT_TRUE(o.watchdog.Start());
  std::this_thread::sleep_for(20 * kPeriod);
  EXPECT_EQ(o.looks.load(), 0u) << "it looked before any work came";

  o.busy = true;
  o.watchdog.Wake();
  EXPECT_TRUE(Eventually([&] { return o.busy_looks.load() >= 5; })) << "it did not look while work was in progress";

  o.busy = false;
  ASSERT_TRUE(WaitUntilResting(o, 5s)) << "it kept looking with no work";
  // After the quiet spell (kQuietTicks looks, and one more before it rests), nothing.
  const unsigned at_rest = o.looks.load();
  std::this_thread::sleep_for(30 * kPeriod);
  EXPECT_EQ(o.looks.load(), at_rest);

  const unsigned busy_before = o.busy_looks.load();
  o.busy = true;
  o.watchdog.Wake();
  EXPECT_TRUE(Eventually([&] { return o.busy_looks.load() > busy_before; })) << "Wake did not end the rest";
  o.watchdog.Stop();
  o.watchdog.Stop();  // idempotent
}

TEST(Watchdog, WorkThatComesAsItGoesToRestIsSeen) {
  // The owner stamps an item and calls Wake just after the look that ends the quiet
  // spell found nothing, before the watchdog has gone to rest. Wake then finds it
  // still ticking and returns at once; the watchdog must see the item anyway, or a
  // blocked item would have nobody to start a spare.
  std::atomic<bool> busy{false};
  std::atomic<unsigned> busy_looks{0};
  unsigned quiet = 0;
  std::atomic<bool> came{false};
  Watchdog* self = nullptr;
  Watchdog watchdog{kPeriod, [&] {
                      if (busy.load()) {
                        busy_looks.fetch_add(1);
                        quiet = 0;
                        return true;
                      }
                      if (++quiet == Watchdog::kQuietTicks + 1 && !came.load()) {
                        came.store(true);
                        busy.store(true);  // the item, stamped after this look read nothing
                        self->Wake();
                      }
                      return false;
                    }};
  self = &watchdog;
  ASSERT_TRUE(watchdog.Start());
  watchdog.Wake();  // work came and went before the first look
  ASSERT_TRUE(Eventually([&] { return came.load(); })) << "the quiet spell never ended";
  EXPECT_TRUE(Eventually([&] { return busy_looks.load() > 0; }))
      << "the item in progress was never looked at: the watchdog went to rest over it";
  watchdog.Stop();
}

}  // namespace
}  // namespace ulsp::msgport
