#include "kernel/msgport/watchdog.h"

#include <system_error>

namespace ulsp::msgport {

bool Watchdog::Start() noexcept {
  try {
    thread_ = std::thread([this] { Run(); });
    return true;
  } catch (const std::system_error&) {
    return false;
  }
}

void Watchdog::Wake() noexcept {
  // Orders the owner's busy stamp before this load, against Run's store of false
  // before its last look (see the header).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (ticking_hint_.load(std::memory_order_relaxed)) return;
  std::lock_guard lock(mu_);
  ticking_hint_.store(true, std::memory_order_relaxed);
  if (!ticking_) {
    ticking_ = true;
    cv_.notify_one();
  }
}

void Watchdog::Stop() noexcept {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watchdog::Run() {
  std::unique_lock lock(mu_);
  unsigned quiet = 0;
  while (!stopping_) {
    if (!ticking_) {
      cv_.wait(lock, [this] { return stopping_ || ticking_; });
      quiet = 0;
      continue;
    }
    cv_.wait_for(lock, period_);
    if (stopping_) break;
    lock.unlock();
    bool busy = check_();
    lock.lock();
    if (busy) {
      quiet = 0;
      continue;
    }
    if (++quiet <= kQuietTicks) continue;
    // Quiet for a while: rest. A Wake that read the hint still set did so before this
    // store, and its item was stamped before that, so the last look below sees it; a
    // Wake after the store sets the hint again (under the lock), seen below.
    ticking_hint_.store(false, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    lock.unlock();
    busy = check_();
    lock.lock();
    if (busy || ticking_hint_.load(std::memory_order_relaxed)) {
      ticking_hint_.store(true, std::memory_order_relaxed);
      quiet = 0;
    } else {
      ticking_ = false;
    }
  }
}

}  // namespace ulsp::msgport
