// EventCount: lets a consumer sleep on a futex only when there is nothing to do, and a
// producer pay for a wake-up only when somebody sleeps. It lives in plain memory or in
// a shared-memory segment (the futex is not FUTEX_PRIVATE), so one process can wake
// another.
//
// Consumer:   auto key = ec.Prepare(); if (work available) { ec.Cancel(); ... }
//             else ec.Wait(key, timeout);
// Producer:   publish work; ec.Notify();
// Prepare/Notify use sequentially consistent operations, so either the consumer sees
// the work or the producer sees the sleeper: no lost wake-up.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <sched.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>

namespace ulsp::msgport {

inline void CpuRelax() noexcept { __builtin_ia32_pause(); }

// How long a thread with nothing to do spins before it sleeps on a futex, everywhere
// in the message ports. It must outlast the other side's futex wake-up, or a side
// that slept once makes its peer sleep too, and every message then costs wake-ups
// (seen at 50 us on a shared 2-vCPU VM, where a wake-up can take that long:
// throughput fell to 0.2 M msg/s and stayed there). The price is a core busy for
// this long after the last message.
constexpr auto kSpinTime = std::chrono::microseconds(200);

// One pause of a thread spinning while it waits for another: a CPU pause for the
// first kPureSpins, then a sched_yield each time. With the CPUs oversubscribed the
// thread being waited for may be preempted, even on this very CPU; yielding lets it
// run instead of burning the timeslice. Measured with a competing busy process
// (ulsp-msgport-bench --hog): without yields the shared-memory port's p99 was 625 us
// and its throughput 0.13 M msg/s; with them 10 us and 0.95 M msg/s. The shorter the
// pure spin the better there (512 pauses: p50 30 us; 64: 9 us), and uncontended
// nothing changes: a round trip is over in about 25 pauses.
class SpinPause {
 public:
  void operator()() noexcept {
    if (spins_ < kPureSpins) {
      ++spins_;
      CpuRelax();
    } else {
      ::sched_yield();
    }
  }
  void Reset() noexcept { spins_ = 0; }
  // Past the pure spins: each pause is a yield, which on a busy CPU can hand it to
  // another task for a whole timeslice (milliseconds), so a loop that looks at the
  // clock only every 64th pause may then look 100 ms late.
  bool yielding() const noexcept { return spins_ >= kPureSpins; }

 private:
  static constexpr int kPureSpins = 64;  // a few microseconds: longer than a round trip
  int spins_ = 0;
};

// futex(2) on a 32-bit word that may be shared between processes.
inline long FutexWait(std::atomic<uint32_t>* word, uint32_t expected, const timespec* timeout) noexcept {
  return ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, timeout, nullptr, 0);
}
inline long FutexWake(std::atomic<uint32_t>* word, int count) noexcept {
  return ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, count, nullptr, nullptr, 0);
}

inline timespec ToTimespec(std::chrono::nanoseconds d) noexcept {
  if (d.count() < 0) d = std::chrono::nanoseconds(0);
  return timespec{static_cast<time_t>(d.count() / 1'000'000'000), static_cast<long>(d.count() % 1'000'000'000)};
}

struct EventCount {
  std::atomic<uint32_t> epoch{0};
  std::atomic<uint32_t> sleepers{0};

  // Announces an intent to sleep; returns the key for Wait.
  uint32_t Prepare() noexcept {
    sleepers.fetch_add(1, std::memory_order_seq_cst);
    return epoch.load(std::memory_order_seq_cst);
  }
  // Work turned up after Prepare: do not sleep.
  void Cancel() noexcept { sleepers.fetch_sub(1, std::memory_order_seq_cst); }
  // Sleeps until a Notify after Prepare, or the timeout (never blocks when one already
  // happened). Spurious returns are possible: the caller re-checks its condition.
  void Wait(uint32_t key, std::chrono::nanoseconds timeout) noexcept {
    timespec ts = ToTimespec(timeout);
    FutexWait(&epoch, key, &ts);
    sleepers.fetch_sub(1, std::memory_order_seq_cst);
  }
  // Wakes every sleeper, if there is one. Costs a fence and a load when nobody sleeps.
  void Notify() noexcept {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    NotifyFenced();
  }
  // Notify, for a caller that has just issued a sequentially consistent fence itself.
  void NotifyFenced() noexcept {
    if (sleepers.load(std::memory_order_relaxed) != 0) NotifyAlways();
  }
  void NotifyAlways() noexcept {
    epoch.fetch_add(1, std::memory_order_seq_cst);
    FutexWake(&epoch, INT_MAX);
  }
};

}  // namespace ulsp::msgport
