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

// ReplyQueue: a reply port that collects the replies of asynchronous sends for one
// or more threads to take with Wait. It never refuses a reply: when full, PutReply
// waits for room, so callers bound their messages in flight to its capacity.
class ReplyQueue final : public Port {
 public:
  explicit ReplyQueue(std::string name, size_t capacity = 4096) : Port(std::move(name)), queue_(capacity) {}

  void Put(MessagePtr msg) override;       // not a request port: refuses with EINVAL
  void PutReply(MessagePtr msg) override;  // queues the reply

  // While waiting, poll `port` for replies it owes (a shared-memory port's ring), so
  // a waiting thread delivers its own replies instead of waking another. `port` must
  // outlive this queue. Call before any Wait.
  void Help(Port& port) { helped_ = &port; }

  // The next reply, or nullptr when none came by `deadline`.
  MessagePtr Wait(Deadline deadline = kNoDeadline) noexcept;
  MessagePtr TryTake() noexcept { return queue_.TryPop(); }

 private:
  MessageQueue queue_;
  Port* helped_ = nullptr;
  std::atomic<uint32_t> waits_{0};  // Wait calls, to renew the helped port's lease every 64th
};

}  // namespace ulsp::msgport
