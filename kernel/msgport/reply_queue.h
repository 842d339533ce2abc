#pragma once

#include <atomic>

#include "kernel/msgport/message_queue.h"
#include "kernel/msgport/port.h"

namespace ulsp::msgport {

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
