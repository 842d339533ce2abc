#include "kernel/msgport/fuse_loop.h"

#include <fcntl.h>
#include <fuse3/fuse_lowlevel.h>
#include <linux/fuse.h>
#include <poll.h>
#include <sched.h>
#include <sys/stat.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>
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
  if (options_.per_cpu && (options_.helped == nullptr || options_.replies_due != nullptr)) {
    std::vector<int> cpus;
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    if (::sched_getaffinity(0, sizeof allowed, &allowed) == 0) {
      for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
        if (CPU_ISSET(static_cast<size_t>(cpu), &allowed)) cpus.push_back(cpu);
    }
    if (cpus.size() > 1 && cpus.size() <= kMaxPerCpuReaders) return RunPerCpu(cpus);
  }
  StartWatchdog([this] { return CheckLeader(); });
  {
    std::lock_guard lock(mu_);
    running_ = 1;
    threads_.emplace_back([this] { Worker(0); });
  }
  return Finish();
}

void FuseLoop::StartWatchdog(std::function<bool()> check) {
  watchdog_.emplace(options_.takeover, std::move(check));
  if (!watchdog_->Start()) Logger("fuse")->warn("cannot start the watchdog; a request that blocks stalls the others");
}

int FuseLoop::Finish() {
  {
    std::unique_lock lock(mu_);
    spare_cv_.wait(lock, [this] { return stopping_; });
  }
  watchdog_->Stop();
  // Threads waiting for work wake at once (Options::exit_fd; spares of the leader too); a
  // thread still inside a request (blocked in the layer, say on a hung file system
  // below) is given two.
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
        delivered_.fetch_add(1, std::memory_order_relaxed);
        spin_until = NowNs() + options_.spin.count();  // a reply answered: more may follow
        continue;
      }
      if (++spins % 64 != 0) {
        CpuRelax();
        continue;
      }
      if (helped != nullptr) helped->Helping(true);  // renews the lease
      if (NowNs() < spin_until) continue;
      // Quiet: sleep until the kernel has a request (or an exit is asked). The port's
      // reply thread delivers meanwhile.
      if (helped != nullptr) helped->Helping(false);
      WaitForRequest(fd);
      if (helped != nullptr) helped->Helping(true);
      if (fuse_session_exited(session_)) return false;
      spin_until = NowNs() + options_.spin.count();
    }
    if (res == -EINTR) continue;
    if (res <= 0) {
      if (res < 0) ReadFailed(res);
      return false;
    }
    busy_since_ns_.store(NowNs(), std::memory_order_relaxed);
    watchdog_->Wake();
    ProcessRequest(session_, *buf);
    if (leader_.load() != me) return true;  // the watchdog gave the lead away
    busy_since_ns_.store(0, std::memory_order_relaxed);
  }
  return false;
}

bool FuseLoop::WaitForRequest(int fd, int rest_fd) const noexcept {
  // poll(2) ignores the entries of negative descriptors (no exit_fd, no rest_fd).
  pollfd p[3] = {{fd, POLLIN, 0}, {options_.exit_fd, POLLIN, 0}, {rest_fd, POLLIN, 0}};
  // A request waiting comes first; an ask to rest stays for the next wait.
  return ::poll(p, 3, 1000) > 0 && (p[2].revents & POLLIN) && !(p[0].revents & POLLIN);
}

bool FuseLoop::CheckLeader() {
  std::lock_guard lock(mu_);
  const int64_t since = busy_since_ns_.load(std::memory_order_relaxed);
  if (since == 0) return false;
  if (stopping_ || NowNs() - since < options_.takeover.count() || leader_.load() == -1) return true;
  // The leader is stuck in a request: a spare leads from now on.
  busy_since_ns_.store(0, std::memory_order_relaxed);
  leader_.store(-1);
  if (spares_ == 0 && threads_.size() < options_.max_threads) {
    const unsigned id = static_cast<unsigned>(threads_.size());
    running_.fetch_add(1);
    threads_.emplace_back([this, id] { Worker(id); });
  }
  spare_cv_.notify_one();
  return true;
}

int FuseLoop::RunPerCpu(const std::vector<int>& cpus) {
  for (size_t i = 0; i < cpus.size(); ++i) {
    pinned_.push_back(std::make_unique<Reader>());
    // Without one the reader never rests: every request wakes it.
    if (options_.rest) pinned_.back()->rest_fd.Reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  }
  StartWatchdog([this] { return CheckReaders(); });
  {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < cpus.size(); ++i) {
      running_.fetch_add(1);
      threads_.emplace_back([this, i, cpu = cpus[i]] { Read(*pinned_[i], cpu, i); });
    }
  }
  return Finish();
}

void FuseLoop::ReadFailed(int res) {
  // ECONNABORTED: the connection was aborted (sysfs abort, a forced unmount, a kernel
  // request timeout); the mount is dead for its programs.
  Logger("fuse")->error("reading the kernel's requests failed: {}; serving ends", Errno(-res).Describe());
  std::lock_guard lock(mu_);
  error_ = -res;
}

bool FuseLoop::PinnedReaderIdle() const noexcept {
  for (const auto& r : pinned_)
    if (r->busy_since_ns.load(std::memory_order_relaxed) == 0) return true;
  return false;
}

void FuseLoop::Took(size_t index) noexcept {
  // A saturating count: another reader's request takes kStreak / 4 off it, so a race
  // now and then (an idle CPU's reader is sometimes quicker) keeps the holder, while
  // a program that moved to another CPU hands the streak to that CPU's reader within
  // four requests.
  unsigned streak = streak_.load(std::memory_order_relaxed);
  if (streak_reader_.load(std::memory_order_relaxed) != index) {
    if (streak > kStreak / 4) {
      streak_.store(streak - kStreak / 4, std::memory_order_relaxed);
    } else {
      streak_reader_.store(index, std::memory_order_relaxed);
      streak_.store(1, std::memory_order_relaxed);
    }
    return;
  }
  if (streak < kStreak) {
    streak_.store(streak + 1, std::memory_order_relaxed);
    return;
  }
  // Past the streak every request it takes asks again the readers whose rest ended,
  // once each has been back kGrace: long enough to take a request if its CPU's
  // program is the one that makes them now.
  const int64_t now = NowNs();
  const uint64_t one = 1;
  for (size_t i = 0; i < pinned_.size(); ++i) {
    Reader& other = *pinned_[i];
    if (i == index || !other.rest_fd || other.resting.load(std::memory_order_relaxed) ||
        now - other.back_ns.load(std::memory_order_relaxed) < kGrace.count() ||
        other.resting.exchange(true, std::memory_order_relaxed))
      continue;
    (void)!::write(other.rest_fd.get(), &one, sizeof one);
  }
}

void FuseLoop::Rest(Reader& self) noexcept {
  uint64_t n;
  (void)!::read(self.rest_fd.get(), &n, sizeof n);
  rests_.fetch_add(1, std::memory_order_relaxed);
  // Away from /dev/fuse's wait queue; an exit still ends the rest at once.
  pollfd exit{options_.exit_fd, POLLIN, 0};
  ::poll(&exit, 1, static_cast<int>(kRest.count()));
  self.back_ns.store(NowNs(), std::memory_order_relaxed);
  self.resting.store(false, std::memory_order_relaxed);
}

namespace {
thread_local uint32_t tl_statx_mask = 0;
}  // namespace

uint32_t StatxMask() noexcept { return tl_statx_mask; }

void ProcessRequest(fuse_session* session, fuse_buf& buf) noexcept {
  constexpr uint32_t kTmpfile = 51;  // FUSE_TMPFILE, which libfuse 3.14's header lacks
  constexpr uint32_t kStatx = 52;    // FUSE_STATX, which Debian 12's headers lack
  // struct fuse_statx_in {u32 getattr_flags, reserved; u64 fh; u32 sx_flags, sx_mask;}
  constexpr size_t kStatxInSize = 24, kStatxInMask = 20;
  uint32_t statx_mask = 0;
  if ((buf.flags & FUSE_BUF_IS_FD) == 0 && buf.mem != nullptr && buf.size >= sizeof(fuse_in_header)) {
    auto* opcode = static_cast<char*>(buf.mem) + offsetof(fuse_in_header, opcode);
    uint32_t op;
    std::memcpy(&op, opcode, sizeof op);
    if (op == kTmpfile) {
      op = FUSE_CREATE;
      std::memcpy(opcode, &op, sizeof op);
    } else if (op == kStatx && buf.size >= sizeof(fuse_in_header) + kStatxInSize) {
      std::memcpy(&statx_mask, static_cast<const char*>(buf.mem) + sizeof(fuse_in_header) + kStatxInMask,
                  sizeof statx_mask);
      statx_mask |= STATX_BASIC_STATS;  // nonzero: answered as a statx whatever it asks
      op = FUSE_GETATTR;
      std::memcpy(opcode, &op, sizeof op);
    }
  }
  tl_statx_mask = statx_mask;
  fuse_session_process_buf(session, &buf);
  tl_statx_mask = 0;
}

bool FuseLoop::ProgramWaits(const fuse_buf& buf) noexcept {
  if ((buf.flags & FUSE_BUF_IS_FD) != 0 || buf.mem == nullptr || buf.size < sizeof(fuse_in_header)) return true;
  fuse_in_header in;
  std::memcpy(&in, buf.mem, sizeof in);
  // The kernel sends a release without waiting for its answer, and a forget has none.
  return in.opcode != FUSE_RELEASE && in.opcode != FUSE_RELEASEDIR && in.opcode != FUSE_FORGET &&
         in.opcode != FUSE_BATCH_FORGET && in.opcode != FUSE_INTERRUPT;
}

void FuseLoop::AwaitReplies() noexcept {
  Port* const helped = options_.helped;
  if (options_.replies_due->load(std::memory_order_acquire) == 0) return;
  helped->Helping(true);
  const int64_t until = NowNs() + options_.spin.count();
  // Past a few microseconds each pause is a yield: the server may be waiting for
  // this very CPU (a reader that took a request from another CPU's program spins
  // where the scheduler may have put the server).
  SpinPause pause;
  for (unsigned i = 1; options_.replies_due->load(std::memory_order_acquire) > 0; ++i) {
    if (helped->Poll()) {
      delivered_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    pause();
    if (i % 64 == 0 || pause.yielding()) {
      if (NowNs() >= until) break;
      helped->Helping(true);  // renews the lease
    }
  }
  helped->Helping(false);
}

void FuseLoop::Read(Reader& self, int cpu, size_t index) {
  if (cpu >= 0) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(static_cast<size_t>(cpu), &one);
    (void)::sched_setaffinity(0, sizeof one, &one);  // unpinned if the CPU went away
  }
  const int fd = fuse_session_fd(session_);
  fuse_buf buf{};
  bool ended = false;
  while (!ended && !fuse_session_exited(session_)) {
    const int res = fuse_session_receive_buf(session_, &buf);
    if (res == -EAGAIN) {
      if (cpu < 0 && PinnedReaderIdle()) break;  // a spare is needed no more
      if (WaitForRequest(fd, self.rest_fd.get())) Rest(self);
      continue;
    }
    if (res == -EINTR) continue;
    if (res <= 0) {
      if (res < 0) ReadFailed(res);
      ended = true;
      break;
    }
    self.busy_since_ns.store(NowNs(), std::memory_order_relaxed);
    watchdog_->Wake();
    const bool waits = ProgramWaits(buf);
    ProcessRequest(session_, buf);
    if (options_.replies_due != nullptr) {
      if (waits) {
        AwaitReplies();
      } else {
        options_.helped->Helping(true);
      }
    }
    self.busy_since_ns.store(0, std::memory_order_relaxed);
    // After the reply: an ask costs its program nothing. A request its program does
    // not wait for (a release sent while the program runs on, which another CPU's
    // reader is often first to take) says nothing of where the program is.
    if (cpu >= 0 && waits) Took(index);
    if (cpu < 0 && PinnedReaderIdle()) break;
  }
  std::free(buf.mem);
  if (cpu < 0) self.gone.store(true, std::memory_order_release);  // its last touch of `self`
  if (ended || fuse_session_exited(session_)) {
    std::lock_guard lock(mu_);
    stopping_ = true;
    spare_cv_.notify_all();
  }
  running_.fetch_sub(1);
}

bool FuseLoop::CheckReaders() {
  std::lock_guard lock(mu_);
  // Spares that left are forgotten: a free one would count as serving.
  std::erase_if(spare_readers_, [](const auto& r) { return r->gone.load(std::memory_order_acquire); });
  // Is any reader free, or inside a request younger than `takeover`?
  const int64_t now = NowNs();
  bool serving = false, busy = false;
  auto look = [&](const Reader& r) {
    const int64_t since = r.busy_since_ns.load(std::memory_order_relaxed);
    busy = busy || since != 0;
    serving = serving || since == 0 || now - since < options_.takeover.count();
  };
  for (const auto& r : pinned_) look(*r);
  for (const auto& r : spare_readers_) look(*r);
  if (!busy) return false;
  if (serving || stopping_ || spare_readers_.size() >= options_.max_threads) return true;
  // Every reader is stuck in a request: a spare reads meanwhile. Detached: it says
  // when it is gone, and Finish waits on `running_` for it as for the others.
  spare_readers_.push_back(std::make_unique<Reader>());
  Reader& spare = *spare_readers_.back();
  running_.fetch_add(1);
  std::thread([this, &spare] { Read(spare, -1, 0); }).detach();
  return true;
}

}  // namespace ulsp::msgport
