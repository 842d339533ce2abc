#include "kernel/msgport/port.h"

#include <memory>
#include <vector>

#include "kernel/msgport/event_count.h"

namespace ulsp::msgport {

void MessageDeleter::operator()(Message* msg) const noexcept {
  if (msg == nullptr) return;
  if ((msg->flags() & kMsgDone) == 0) {
    // In flight and dropped by whoever held it: the sender still gets its one reply.
    Reply(MessagePtr(msg), EIO);
    return;
  }
  delete msg;
}

void Port::PutReply(MessagePtr msg) { msg.reset(); }
void Port::WaitSync(SyncWaiter& waiter, Deadline deadline) { waiter.Wait(deadline); }
void Port::Drop(Message&) {}
bool Port::Poll() { return false; }
void Port::Helping(bool) {}

void Send(Port& port, MessagePtr msg) {
  msg->target_port.store(&port, std::memory_order_relaxed);
  msg->error = 0;
  msg->flags_.store(msg->flags() & kMsgAbortable, std::memory_order_release);
  port.counters().put.fetch_add(1, std::memory_order_relaxed);
  port.Put(std::move(msg));
}

void Reply(MessagePtr msg, int error) {
  msg->error = error;
  // Read-modify-write: the sender may be setting ABORTED at this very moment.
  const uint32_t before = msg->flags_.fetch_or(kMsgReplied | kMsgDone, std::memory_order_acq_rel);
  if (before & kMsgQueued) msg->flags_.fetch_and(~kMsgQueued, std::memory_order_acq_rel);
  Port* reply_port = msg->reply_port;
  if (reply_port != nullptr) {
    reply_port->PutReply(std::move(msg));
  } else {
    msg.reset();
  }
}

void Abort(Message& msg) {
  msg.flags_.fetch_or(kMsgAborted, std::memory_order_acq_rel);
  if (Port* port = msg.target_port.load(std::memory_order_relaxed); port != nullptr) port->Drop(msg);
}

// --- SyncWaiter -------------------------------------------------------------------

namespace {

// Idle waiters of this thread. Abandoned waiters are not here: the late reply owns
// and frees them.
struct WaiterPool {
  std::vector<std::unique_ptr<SyncWaiter>> idle;
  SyncWaiter* Acquire() {
    if (idle.empty()) return new SyncWaiter();
    SyncWaiter* w = idle.back().release();
    idle.pop_back();
    return w;
  }
  void Release(SyncWaiter* w) { idle.emplace_back(w); }
};
thread_local WaiterPool waiter_pool;

}  // namespace

void SyncWaiter::Put(MessagePtr msg) {
  counters().refused.fetch_add(1, std::memory_order_relaxed);
  Reply(std::move(msg), EINVAL);
}

void SyncWaiter::PutReply(MessagePtr msg) {
  // The waiter reads reply_ only after it sees kReplied, and never after it abandoned.
  reply_ = std::move(msg);
  uint32_t s = state_.load(std::memory_order_acquire);
  for (;;) {
    if (s == kAbandoned) {
      reply_.reset();
      delete this;
      return;
    }
    if (state_.compare_exchange_weak(s, kReplied, std::memory_order_acq_rel)) break;
  }
  if (s == kSleeping) FutexWake(&state_, 1);
}

bool SyncWaiter::Wait(Deadline deadline) noexcept {
  const Deadline spin_end = std::min(deadline, Clock::now() + kSpinTime);
  SpinPause pause;
  for (int i = 0; !Ready(); ++i) {
    pause();
    if ((i & 63) == 63 && Clock::now() >= spin_end) break;
  }
  while (!Ready()) {
    uint32_t s = kWaiting;
    if (!state_.compare_exchange_strong(s, kSleeping, std::memory_order_acq_rel) && s == kReplied) return true;
    const Deadline now = Clock::now();
    if (now >= deadline) return Ready();
    // Sleep in slices of at most a second so a far deadline needs no overflow care.
    auto slice = std::min<Clock::duration>(deadline - now, std::chrono::seconds(1));
    timespec ts = ToTimespec(slice);
    FutexWait(&state_, kSleeping, &ts);
  }
  return true;
}

bool SyncWaiter::Abandon() noexcept {
  uint32_t s = state_.load(std::memory_order_acquire);
  for (;;) {
    if (s == kReplied) return false;
    if (state_.compare_exchange_weak(s, kAbandoned, std::memory_order_acq_rel)) return true;
  }
}

Result<MessagePtr> DoMsg(Port& port, MessagePtr msg, Deadline deadline) {
  SyncWaiter* waiter = waiter_pool.Acquire();
  waiter->Arm();
  Message* raw = msg.get();
  msg->reply_port = waiter;
  msg->deadline = deadline;
  msg->target_port.store(&port, std::memory_order_relaxed);
  msg->error = 0;
  msg->flags_.store(kMsgSync | (msg->flags() & kMsgAbortable), std::memory_order_release);
  port.counters().put.fetch_add(1, std::memory_order_relaxed);
  port.Put(std::move(msg));  // DirectPort serves here: the fast path.

  while (!waiter->Ready() && (deadline == kNoDeadline || Clock::now() < deadline)) port.WaitSync(*waiter, deadline);
  if (!waiter->Ready()) {
    // raw is alive: it is either still with the server or already in waiter->reply_.
    Abort(*raw);
    if (waiter->Abandon()) return Fail(ETIMEDOUT);  // the late reply frees both
    // The reply won the race with the deadline: it is the answer.
  }
  MessagePtr reply = waiter->Take();
  waiter_pool.Release(waiter);
  if (!port.CountsReplies()) port.counters().replied.fetch_add(1, std::memory_order_relaxed);
  return reply;
}

}  // namespace ulsp::msgport
