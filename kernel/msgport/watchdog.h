// Watchdog: a thread that looks every `period`, while work flows, at whether the
// threads serving it are held up (a request blocked in a hung file system below, a
// slow connect), so its owner can start a spare thread. The FUSE loop, FUSE over
// io_uring, the seccomp shim and an isolated server each keep one.
//
// It costs nothing while idle: after kQuietTicks looks in a row that found no work in
// progress it rests, and the owner's next item of work wakes it (Wake: a fence and a
// load while it ticks). Owner, per item:
//
//   busy_since.store(now);   // what `check` reads
//   watchdog.Wake();
//   ... serve ...
//   busy_since.store(0);
//
// Stamped before Wake, an item is never missed by a watchdog about to rest: either
// Wake sees it ticking, or its last look (after it stopped ticking) sees the stamp.
//
// Thread-safety: Wake from any thread; Start and Stop from the owner. `check` runs on
// the watchdog's thread without its lock: it takes the owner's locks itself.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

namespace ulsp::msgport {

class Watchdog {
 public:
  // `check` returns whether any work was in progress (it may start a spare thread).
  Watchdog(std::chrono::nanoseconds period, std::function<bool()> check)
      : period_(period), check_(std::move(check)) {}
  ~Watchdog() { Stop(); }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Starts its thread; false when none could be started.
  bool Start() noexcept;
  // Work arrived: tick, if resting.
  void Wake() noexcept;
  // Ends the thread and waits for it (a `check` in progress finishes). Idempotent.
  void Stop() noexcept;

  static constexpr unsigned kQuietTicks = 50;

 private:
  void Run();

  const std::chrono::nanoseconds period_;
  const std::function<bool()> check_;
  std::atomic<bool> ticking_hint_{false};  // ticking_, read without the lock
  std::mutex mu_;
  std::condition_variable cv_;
  bool ticking_ = false;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace ulsp::msgport
