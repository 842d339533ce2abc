// FuseUring: FUSE over io_uring (Linux 6.14+), a second way for kernel requests to
// reach the shim beside reading /dev/fuse. libfuse 3.14 has no such transport; this
// one feeds the requests it receives to the same libfuse session, and the shim's
// writer hands it the replies (fuse_shim.cc).
//
// Why: each CPU has its own queue, served by a thread pinned to that CPU. A program's
// request goes to the queue of the CPU it runs on, so the program and its server hand
// that CPU to each other. On a virtual machine whose idle CPUs halt at once, reading
// /dev/fuse costs a wake-up of a halted CPU by an inter-processor interrupt per round
// trip (~20 µs here); handing the CPU over costs a context switch (docs/vfs.md).
//
// The kernel offers it only when the fuse module's `enable_uring` parameter is on
// (KernelOffers); the shim then asks for it in its INIT reply and calls Start once
// the kernel took that reply. Until every queue has registered, and for FORGET and
// INTERRUPT always, requests still come through /dev/fuse.
//
// A request may block in the server (say on a hung file system below a passthrough).
// A watchdog hands a queue whose thread is stuck in one request for `takeover` to a
// spare thread, as FuseLoop does for /dev/fuse. The kernel hands a request to the
// thread that gave it the entry (the one that submitted the entry's last command) and
// a thread stuck in a request cannot take it: the stuck leader had committed most of
// the queue's entries. So every thread that takes the lead registers a fresh batch of
// `depth` entries, which the kernel uses first (it takes the entry freed last); the
// stuck thread's entries serve again once it is free. Up to `max_threads` threads and
// `max_batches` batches per CPU; past that, a new leader serves with the old entries,
// and a request the kernel puts on a stuck thread's entry waits for that thread.
//
// Thread-safety: Reply may be called from any thread; Start once, from the thread
// that wrote the INIT reply. The destructor stops every thread and closes the rings.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/watchdog.h"

struct fuse_session;
struct iovec;
struct io_uring_sqe;

namespace ulsp::msgport {

class Port;

class FuseUring {
 public:
  struct Options {
    unsigned depth = 8;  // ring entries (requests in flight) per CPU
    std::chrono::nanoseconds takeover{std::chrono::milliseconds(2)};
    unsigned max_threads = 8;  // threads per queue, at most (spares for stuck requests)
    unsigned max_batches = 16;  // batches of `depth` entries per queue, at most (one per lead)
    // A port whose replies come from another process (nullptr: none): after sending a
    // request there, the queue's thread polls it for the reply for up to `help_spin`.
    Port* helped = nullptr;
    std::chrono::nanoseconds help_spin{std::chrono::microseconds(50)};
  };

  // Whether this kernel would use it: /sys/module/fuse/parameters/enable_uring is Y.
  static bool KernelOffers() noexcept;

  // Sets up one io_uring per possible CPU for the session's /dev/fuse descriptor;
  // nothing is registered with the kernel yet. Fails with io_uring_setup's errno
  // (ENOSYS, EPERM under a filter, ENOMEM).
  static Result<std::unique_ptr<FuseUring>> Create(fuse_session* session, Options options);
  ~FuseUring();
  FuseUring(const FuseUring&) = delete;
  FuseUring& operator=(const FuseUring&) = delete;

  // The kernel took an INIT reply that asked for io_uring, with these sizes: gives
  // each entry buffers for the largest request and reply, and starts the queues'
  // threads, which register the entries. If the kernel refuses a registration, it
  // goes on with /dev/fuse alone (logged).
  void Start(uint32_t max_write, uint32_t max_pages);

  // If the reply in `iov` (a fuse_out_header, then its arguments) answers a request
  // this transport delivered: writes it into that request's entry, hands the entry
  // back to the kernel, sets `*written` as writev(2) would, and returns true.
  bool Reply(const iovec* iov, int count, ssize_t* written) noexcept;

  // Requests delivered through the rings so far.
  uint64_t Served() const noexcept { return served_.load(std::memory_order_relaxed); }

 private:
  struct Worker;
  struct Queue;

 public:
  struct Entry;  // one request's buffers (fuse_uring.cc)

 private:
  explicit FuseUring(fuse_session* session, Options options);

  // Starts a thread for q (under mu_). False if none could be started.
  bool StartWorker(Queue& q) noexcept;
  void Work(Queue& q, Worker& me);
  // Registers a batch of q's entries (the first also arms q's knock); the calling
  // thread owns their commands.
  bool Register(Queue& q, bool first);
  // Makes the kernel give up io_uring for the connection (it goes on with /dev/fuse).
  void Refuse(Queue& q) noexcept;
  // Serves q's completions while `me` leads it. False: the queue ended.
  bool Lead(Queue& q, Worker& me);
  void Handle(Queue& q, Entry& e);
  void HelpWith(const Entry& e) noexcept;
  void PrepCommand(io_uring_sqe* sqe, const Queue& q, Entry& e, uint32_t op) const noexcept;
  // Hands e back to the kernel: queued for the queue's thread to submit.
  void Commit(Queue& q, Entry& e) noexcept;
  void PrepCommit(Queue& q, Entry& e) noexcept;  // under q.sq_mu
  // The watchdog's look: hands a queue whose leader is held up to a spare; returns
  // whether a request is being served.
  bool CheckHeldUp();

  fuse_session* session_;
  const Options options_;
  int fuse_fd_ = -1;
  std::vector<std::unique_ptr<Queue>> queues_;
  std::atomic<uint64_t> served_{0};

  std::mutex mu_;  // guards the fields below, and every queue's threads
  bool stopping_ = false;
  std::atomic<bool> stop_{false};
  std::atomic<unsigned> running_{0};  // worker threads not yet finished
  Watchdog watchdog_{options_.takeover, [this] { return CheckHeldUp(); }};  // from Start
};

}  // namespace ulsp::msgport
