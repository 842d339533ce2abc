#include "kernel/msgport/fuse_loop.h"

#include <fcntl.h>
#include <fuse3/fuse_lowlevel.h>
#include <poll.h>

#include <cerrno>
#include <cstdlib>
#include <ctime>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/event_count.h"
#include "kernel/msgport/log.h"
#include "kernel/msgport/port.h"

namespace ulsp::msgport {

int64_t FuseLoop::NowNs() const noexcept {
  struct timespec ts {};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int FuseLoop::Run() {
  const int fd = fuse_session_fd(session_);
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return errno;
  std::thread watchdog([this] { Watchdog(); });
  {
    std::lock_guard lock(mu_);
    running_ = 1;
    threads_.emplace_back([this] { Worker(0); });
  }
  {
    std::unique_lock lock(mu_);
    spare_cv_.wait(lock, [this] { return stopping_; });
  }
  watch_cv_.notify_all();
  watchdog.join();
  // Spares wake and leave at once; a thread still inside a request (blocked in the
  // layer, say on a hung file system below) is given two seconds.
  for (int i = 0; i < 2000 && running_.load() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::lock_guard lock(mu_);
  for (auto& t : threads_) {
    if (running_.load() == 0) {
      t.join();
    } else {
      Logger("fuse")->warn("a request is still being served at exit; leaving its thread behind");
      t.detach();
    }
  }
  return error_;
}

void FuseLoop::Worker(unsigned id) {
  fuse_buf buf{};
  std::unique_lock lock(mu_);
  for (;;) {
    ++spares_;
    spare_cv_.wait(lock, [this] { return stopping_ || leader_.load() == -1; });
    --spares_;
    if (stopping_) break;
    leader_.store(static_cast<int>(id));
    lock.unlock();
    const bool more = Lead(id, &buf);
    lock.lock();
    if (!more) {
      stopping_ = true;
      spare_cv_.notify_all();
      break;
    }
  }
  lock.unlock();
  std::free(buf.mem);
  running_.fetch_sub(1);
}

bool FuseLoop::Lead(unsigned id, void* raw_buf) {
  auto* buf = static_cast<fuse_buf*>(raw_buf);
  const int fd = fuse_session_fd(session_);
  const int me = static_cast<int>(id);
  Port* const helped = options_.helped;
  while (!fuse_session_exited(session_)) {
    int res;
    int64_t spin_until = NowNs() + options_.spin.count();
    unsigned spins = 0;
    if (helped != nullptr) helped->Helping(true);
    for (;;) {
      res = fuse_session_receive_buf(session_, buf);
      if (res != -EAGAIN) break;
      if (helped != nullptr && helped->Poll()) {
        spin_until = NowNs() + options_.spin.count();  // a reply answered: more may follow
        continue;
      }
      if (++spins % 64 != 0) {
        CpuRelax();
        continue;
      }
      if (helped != nullptr) helped->Helping(true);  // renews the lease
      if (NowNs() < spin_until) continue;
      // Quiet: sleep until the kernel has a request (or a second passes, to notice
      // an exit requested from elsewhere). The port's reply thread delivers meanwhile.
      if (helped != nullptr) helped->Helping(false);
      pollfd p{fd, POLLIN, 0};
      ::poll(&p, 1, 1000);
      if (helped != nullptr) helped->Helping(true);
      if (fuse_session_exited(session_)) return false;
      {
        std::lock_guard lock(mu_);
        if (!active_) {
          active_ = true;
          watch_cv_.notify_one();
        }
      }
      spin_until = NowNs() + options_.spin.count();
    }
    if (res == -EINTR) continue;
    if (res <= 0) {
      if (res < 0) {
        // ECONNABORTED: the connection was aborted (sysfs abort, a forced unmount,
        // a kernel request timeout); the mount is dead for its programs.
        Logger("fuse")->error("reading the kernel's requests failed: {}; serving ends", Errno(-res).Describe());
        std::lock_guard lock(mu_);
        error_ = -res;
      }
      return false;
    }
    busy_since_ns_.store(NowNs(), std::memory_order_relaxed);
    fuse_session_process_buf(session_, buf);
    if (leader_.load() != me) return true;  // the watchdog gave the lead away
    busy_since_ns_.store(0, std::memory_order_relaxed);
  }
  return false;
}

void FuseLoop::Watchdog() {
  std::unique_lock lock(mu_);
  unsigned idle_ticks = 0;
  while (!stopping_) {
    if (!active_) {
      watch_cv_.wait(lock, [this] { return stopping_ || active_; });
      idle_ticks = 0;
      continue;
    }
    watch_cv_.wait_for(lock, options_.takeover);
    if (stopping_) break;
    const int64_t since = busy_since_ns_.load(std::memory_order_relaxed);
    if (since == 0) {
      if (++idle_ticks > 50) active_ = false;  // nothing for a while: stop ticking
      continue;
    }
    idle_ticks = 0;
    if (NowNs() - since < options_.takeover.count() || leader_.load() == -1) continue;
    // The leader is stuck in a request: a spare leads from now on.
    busy_since_ns_.store(0, std::memory_order_relaxed);
    leader_.store(-1);
    if (spares_ == 0 && threads_.size() < options_.max_threads) {
      const unsigned id = static_cast<unsigned>(threads_.size());
      running_.fetch_add(1);
      threads_.emplace_back([this, id] { Worker(id); });
    }
    spare_cv_.notify_one();
  }
}

}  // namespace ulsp::msgport
