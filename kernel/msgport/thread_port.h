// ThreadPort: a port served by one server thread it owns, through a bounded lock-free
// queue. The server thread spins briefly when idle, then sleeps on a futex; senders
// wake it only when it sleeps. Messages aborted while queued are replied ECANCELED
// without reaching the server. Destroying the port stops the thread and replies every
// message still queued with ECONNRESET. Put is thread-safe.
#pragma once

#include <atomic>
#include <thread>

#include "kernel/msgport/message_queue.h"
#include "kernel/msgport/port.h"

namespace ulsp::msgport {

class ThreadPort final : public Port {
 public:
  // `server` must outlive the port. When the queue holds `capacity` messages, Put
  // follows `full` (wait until the message's deadline, or EAGAIN).
  ThreadPort(std::string name, Server& server, size_t capacity = 1024, FullPolicy full = FullPolicy::kWait);
  ~ThreadPort() override;

  void Put(MessagePtr msg) override;
  size_t depth() const noexcept { return queue_.depth(); }

 private:
  void Run() noexcept;

  Server& server_;
  MessageQueue queue_;
  const FullPolicy full_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;  // last: starts once everything above exists
};

}  // namespace ulsp::msgport
