#include "kernel/msgport/reply_queue.h"

namespace ulsp::msgport {

void ReplyQueue::Put(MessagePtr msg) {
  counters().refused.fetch_add(1, std::memory_order_relaxed);
  Reply(std::move(msg), EINVAL);
}

void ReplyQueue::PutReply(MessagePtr msg) {
  counters().replied.fetch_add(1, std::memory_order_relaxed);
  if (!queue_.TryPush(msg)) (void)queue_.Push(msg, kNoDeadline);
}

MessagePtr ReplyQueue::Wait(Deadline deadline) noexcept {
  // A helper renews the port's lease on every path, the quick one included: were it
  // renewed only when this queue is empty, a queue kept full by the port's own reply
  // thread would let the lease lapse, the server would wake that thread for every
  // reply, and the queue would stay full — a stable slow mode (seen: 0.3 M msg/s).
  // Once per 64 waits: it reads the clock. (A plain load and store: a lost count
  // among threads sharing the queue costs nothing.)
  if (helped_ != nullptr) {
    const uint32_t w = waits_.load(std::memory_order_relaxed);
    waits_.store(w + 1, std::memory_order_relaxed);
    if ((w & 63) == 0) helped_->Helping(true);
  }
  if (MessagePtr m = queue_.TryPop()) return m;
  if (helped_ != nullptr) {
    // Deliver our own replies while they come quickly, then let the port's thread.
    // The clock is read (and the lease renewed) once per 64 polls, not per message.
    Deadline spin_end = kNoDeadline;
    SpinPause pause;
    bool progressed_recently = false;
    for (int i = 0;; ++i) {
      bool progressed = helped_->Poll();
      progressed_recently |= progressed;
      // Returning keeps the lease: the caller is likely to wait again soon, and the
      // port bounds what a lease left running can delay.
      if (MessagePtr m = queue_.TryPop()) return m;
      if (progressed) {
        pause.Reset();
      } else {
        pause();
      }
      if ((i & 63) == 63) {
        helped_->Helping(true);
        const Deadline now = Clock::now();
        if (progressed_recently || spin_end == kNoDeadline) spin_end = std::min(deadline, now + kSpinTime);
        progressed_recently = false;
        if (now >= spin_end) break;
      }
    }
    helped_->Helping(false);
  }
  return queue_.Pop(deadline);
}

}  // namespace ulsp::msgport
