// FuseLoop: reads kernel requests from a FUSE session and processes them, built for
// machines where waking a sleeping thread on another CPU is the dominant cost (on
// this VM an inter-processor interrupt goes through the hypervisor: ~10-15 µs).
//
// Per-CPU readers (the default). A
// program that makes a request blocks in the kernel for its answer, so its CPU is
// free: a thread waiting there is woken without an interrupt, and so is the program
// when that thread answers. One reader is pinned to each CPU the process may use,
// each sleeping in poll(2) on the descriptor: poll wakes every sleeper, the one on
// the program's CPU runs first and takes the request, the others find nothing and
// sleep again. A bare round trip (bench/fuse_rtt.py, unpinned) costs 11.5 µs this
// way against 28 µs with the spinning leader below. With one CPU, or more than
// kMaxPerCpuReaders (whose sleepers would all be woken for every request), the
// leader serves instead. A request that blocks (a slow disk, a hung file system
// below a passthrough) holds only its reader, and the others serve its CPU's
// programs; when every reader has been inside a request for longer than `takeover`,
// a watchdog starts a spare reader, unpinned (up to `max_threads`), which leaves
// once a pinned reader is free.
//
// Resting readers (Options::rest). poll(2) wakes every sleeping reader for each
// request, and on this VM waking a reader whose CPU is idle costs the program that
// made the request an interrupt through the hypervisor: an `ioctl(TCGETS)` made every
// 20 µs took 15 µs a round trip with a reader on each CPU, 4 µs with the program's
// reader alone. So once one reader has taken kStreak requests more than the others
// (one program making request after request on its CPU; only requests a program
// waits for count, since a release comes while its program runs on and another
// CPU's reader is often first to it), it asks the other pinned
// readers to rest: each leaves the kernel's wait queue for kRest, and is asked again
// once it has been back kGrace without taking a request. A program on a resting
// reader's CPU is served from another CPU meanwhile (a dearer round trip), until the
// rest ends and its own reader takes the streak over, within four requests. Two
// programs making requests on two CPUs at like rates seldom let a streak build; a
// light one beside a busy one waits longer (bench/RESULTS.md has the figures).
//
// Replies from another process (Options::helped with Options::replies_due: an
// isolated server). A reader that passed on a request its program waits for polls
// the helped port for up to `spin`, delivering its replies, so the answer goes to the
// kernel from the program's CPU and the port's reply thread is not woken. Past a few
// microseconds each look is a sched_yield: the server may be queued on this very CPU
// (the scheduler puts it where the reader woke it), and a reader spinning there held
// it off for the whole spin. A release, which the kernel does not wait for, is
// passed on without polling, the lease kept: its reply is delivered by the next
// request's reader, or by the reply thread once the lease runs out.
//
// The spinning leader (one CPU, more than kMaxPerCpuReaders, or per_cpu off). One
// thread at a time, the leader, reads the descriptor without blocking and processes
// what it reads. After
// each request it keeps polling for `spin` before it sleeps in poll(2), so a program
// that makes request after request finds the server awake. A watchdog checks, every
// `takeover` while requests flow, whether the leader has been inside one request
// longer than that; if so it hands leadership to a spare thread (starting one, up to
// `max_threads`), and the old leader becomes a spare when its request completes.
// A request whose reply comes from another process (an isolated server) is sent on,
// and the leader, spinning for the next request, delivers the reply itself when it
// comes (Options::helped): a program that waits for the reply, then makes its next
// request, finds the leader awake on both ends, and no reply thread is woken.
//
// Thread-safety: Run is called once, from one thread; it returns when the session
// exits (unmount, fuse_session_exit, a signal handler).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "kernel/msgport/unique_fd.h"
#include "kernel/msgport/watchdog.h"

struct fuse_session;
struct fuse_buf;

namespace ulsp::msgport {

// Hands a request read from the kernel into `buf` to libfuse (fuse_session_process_buf),
// which every reader (the loop's and io_uring's) does through here. FUSE_TMPFILE (an
// open(2) with O_TMPFILE; Linux 6.1) is a FUSE_CREATE in all but its opcode: the same
// fuse_create_in, then the name "/", which no create can carry, and the same reply.
// libfuse 3.14 knows no TMPFILE and would answer ENOSYS (the kernel then answers
// EOPNOTSUPP for the mount's life), so it goes to libfuse as a create, and FuseShim
// serves a create of "/" as a tmpfile.
//
// FUSE_STATX (Linux 6.6; the kernel sends it for a statx(2) that asks for the birth
// time) is likewise unknown to libfuse 3.14, whose ENOSYS would make the kernel stop
// asking, and its fuse_statx_in begins as fuse_getattr_in does (flags, then the
// handle). So it goes to libfuse as a getattr, and while libfuse hands that to
// FuseShim (on this thread) StatxMask() says which fields the kernel asked for;
// FuseShim answers with a fuse_statx_out.
void ProcessRequest(fuse_session* session, fuse_buf& buf) noexcept;
// The statx mask of the FUSE_STATX this thread is handing to libfuse as a getattr
// (0: it is handing none).
uint32_t StatxMask() noexcept;

class Port;

class FuseLoop {
 public:
  struct Options {
    std::chrono::nanoseconds spin{std::chrono::microseconds(50)};
    std::chrono::nanoseconds takeover{std::chrono::milliseconds(2)};
    unsigned max_threads = 16;
    // A port whose replies come from another process (nullptr: none). While the
    // leader polls for kernel requests (or a per-CPU reader for its request's reply,
    // with replies_due) it also delivers this port's replies, and says so
    // (Port::Helping), so the port's reply thread need not be woken for them.
    Port* helped = nullptr;
    // Per-CPU readers instead of the leader (see above); with `helped`, only when
    // replies_due is given too.
    bool per_cpu = true;
    // Readable when the session has been told to exit (fuse_session_exit wakes no
    // one): threads waiting for requests wake at once. -1: they notice within a second.
    int exit_fd = -1;
    // Per-CPU readers rest while another CPU's program makes the requests (see above).
    bool rest = true;
    // With `helped`: the count of requests whose replies are still due (the shim's).
    // Per-CPU readers then deliver the helped port's replies themselves, polling for
    // up to `spin` after each request while one is due.
    const std::atomic<uint64_t>* replies_due = nullptr;
  };
  static constexpr unsigned kMaxPerCpuReaders = 8;
  static constexpr unsigned kStreak = 8;
  static constexpr std::chrono::milliseconds kRest{2};
  static constexpr std::chrono::nanoseconds kGrace = std::chrono::microseconds(200);
  FuseLoop(fuse_session* session, Options options) : session_(session), options_(options) {}

  // Serves until the session exits. Returns 0, or the errno that ended it.
  int Run();
  // How many times a per-CPU reader rested.
  uint64_t Rests() const noexcept { return rests_.load(std::memory_order_relaxed); }
  // How many times polling the helped port delivered replies (Options::helped).
  uint64_t Delivered() const noexcept { return delivered_.load(std::memory_order_relaxed); }

 private:
  void Worker(unsigned id);
  // Reads and processes requests while this thread is the leader. Returns false when
  // the session ended.
  bool Lead(unsigned id, void* buf);
  // The watchdog's looks (leader; per-CPU readers): hand the lead to a spare, or start
  // a spare reader, when every thread reading is held up in one request. Return
  // whether one is inside a request.
  bool CheckLeader();
  bool CheckReaders();
  void StartWatchdog(std::function<bool()> check);
  // Sleeps until the kernel has a request, the session is told to exit, a second
  // passes, or (a pinned reader's `rest_fd`) it is asked to rest: returns true for
  // that last, when no request waits.
  bool WaitForRequest(int fd, int rest_fd = -1) const noexcept;
  // Waits until serving stops, then for the threads (two seconds at most for one
  // inside a request); returns the errno that ended it, or 0.
  int Finish();
  int64_t NowNs() const noexcept;

  // Per-CPU readers.
  struct Reader {
    std::atomic<int64_t> busy_since_ns{0};  // when its request began, 0 if idle
    std::atomic<bool> gone{false};          // a spare that left (it touches this no more)
    // Pinned readers: asked to rest (see above), and the eventfd that asks.
    std::atomic<bool> resting{false};
    std::atomic<int64_t> back_ns{0};  // when its last rest ended
    UniqueFd rest_fd;
  };
  int RunPerCpu(const std::vector<int>& cpus);
  // Reads and processes requests; `cpu` < 0: a spare, which returns once a pinned
  // reader is idle. `index`: a pinned reader's place in pinned_.
  void Read(Reader& self, int cpu, size_t index);
  bool PinnedReaderIdle() const noexcept;
  // After a request sent to the helped port: delivers its replies while one is due,
  // for `spin` at most.
  void AwaitReplies() noexcept;
  // Whether the program that made the request in `buf` waits for its answer.
  static bool ProgramWaits(const fuse_buf& buf) noexcept;
  // A pinned reader took (and answered) a request: counts the streak, and past
  // kStreak asks the other pinned readers to rest.
  void Took(size_t index) noexcept;
  // A pinned reader asked to rest: out of the kernel's wait queue for kRest.
  void Rest(Reader& self) noexcept;
  // Logs a failed read of the device and keeps its errno as the loop's result.
  void ReadFailed(int res);
  std::vector<std::unique_ptr<Reader>> pinned_;  // fixed once the readers start
  std::atomic<size_t> streak_reader_{SIZE_MAX};  // the pinned reader whose streak it is
  std::atomic<unsigned> streak_{0};              // its count, up to kStreak
  std::atomic<uint64_t> rests_{0};
  std::atomic<uint64_t> delivered_{0};
  std::vector<std::unique_ptr<Reader>> spare_readers_;  // live spares (detached threads); guarded by mu_

  fuse_session* session_;
  const Options options_;

  std::mutex mu_;  // guards the fields below it, and thread start/stop
  std::condition_variable spare_cv_;  // spares wait for leadership
  bool stopping_ = false;
  unsigned spares_ = 0;
  int error_ = 0;
  std::vector<std::thread> threads_;

  std::atomic<int> leader_{-1};            // the leader's id, -1 when none
  std::atomic<int64_t> busy_since_ns_{0};  // when the leader's request began, 0 if idle
  std::atomic<unsigned> running_{0};       // worker threads not yet finished
  std::optional<Watchdog> watchdog_;       // set by Run
};

}  // namespace ulsp::msgport
