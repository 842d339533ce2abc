// FuseLoop: reads kernel requests from a FUSE session and processes them, built for
// machines where waking a sleeping thread is the dominant cost (a virtual CPU that
// halted must be woken by an inter-processor interrupt: ~10-20 µs here).
//
// One thread at a time, the leader, reads the /dev/fuse descriptor without blocking
// and processes what it reads. After each request it keeps polling for `spin` before
// it sleeps in poll(2), so a program that makes request after request (find, tar)
// finds the server awake, and no wake-up is paid to deliver the request. No other
// thread sleeps on the descriptor, so the kernel has nobody to wake.
//
// A request may block (a slow disk, a hung file system below a passthrough). A watchdog thread checks, every
// `takeover` while requests flow, whether the leader has been inside one request
// longer than that; if so it hands leadership to a spare thread (starting one, up to
// `max_threads`), and the old leader becomes a spare when its request completes. So
// requests are never stuck behind a blocked one for long, and many can be in flight.
//
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
#include <mutex>
#include <thread>
#include <vector>

struct fuse_session;

namespace ulsp::msgport {

class Port;

class FuseLoop {
 public:
  struct Options {
    std::chrono::nanoseconds spin{std::chrono::microseconds(50)};
    std::chrono::nanoseconds takeover{std::chrono::milliseconds(2)};
    unsigned max_threads = 16;
    // A port whose replies come from another process (nullptr: none). While the
    // leader polls for kernel requests it also delivers this port's replies, and
    // says so (Port::Helping), so the port's reply thread need not be woken for them.
    Port* helped = nullptr;
  };
  FuseLoop(fuse_session* session, Options options) : session_(session), options_(options) {}

  // Serves until the session exits. Returns 0, or the errno that ended it.
  int Run();

 private:
  void Worker(unsigned id);
  // Reads and processes requests while this thread is the leader. Returns false when
  // the session ended.
  bool Lead(unsigned id, void* buf);
  void Watchdog();
  int64_t NowNs() const noexcept;

  fuse_session* session_;
  const Options options_;

  std::mutex mu_;  // guards the fields below it, and thread start/stop
  std::condition_variable spare_cv_;  // spares wait for leadership
  std::condition_variable watch_cv_;  // the watchdog waits for activity
  bool stopping_ = false;
  bool active_ = false;  // requests are flowing: the watchdog ticks
  unsigned spares_ = 0;
  int error_ = 0;
  std::vector<std::thread> threads_;

  std::atomic<int> leader_{-1};            // the leader's id, -1 when none
  std::atomic<int64_t> busy_since_ns_{0};  // when the leader's request began, 0 if idle
  std::atomic<unsigned> running_{0};       // worker threads not yet finished
};

}  // namespace ulsp::msgport
