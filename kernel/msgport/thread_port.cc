#include "kernel/msgport/thread_port.h"

namespace ulsp::msgport {

ThreadPort::ThreadPort(std::string name, Server& server, size_t capacity, FullPolicy full)
    : Port(std::move(name)), server_(server), queue_(capacity), full_(full), thread_([this] { Run(); }) {}

ThreadPort::~ThreadPort() {
  stopping_.store(true, std::memory_order_release);
  queue_.WakeAll();
  thread_.join();
  // queue_'s destructor replies what is left with ECONNRESET.
}

void ThreadPort::Put(MessagePtr msg) {
  if (stopping_.load(std::memory_order_acquire)) {
    counters().refused.fetch_add(1, std::memory_order_relaxed);
    Reply(std::move(msg), ECONNRESET);
    return;
  }
  msg->flags_.fetch_or(kMsgQueued, std::memory_order_relaxed);
  if (queue_.TryPush(msg)) return;
  int error = EAGAIN;
  if (full_ == FullPolicy::kWait) {
    if (queue_.Push(msg, msg->deadline)) return;
    error = ETIMEDOUT;
  }
  counters().refused.fetch_add(1, std::memory_order_relaxed);
  Reply(std::move(msg), error);
}

void ThreadPort::Run() noexcept {
  while (!stopping_.load(std::memory_order_acquire)) {
    MessagePtr msg = queue_.Pop(kNoDeadline, &stopping_);
    if (!msg) continue;
    msg->flags_.fetch_and(~kMsgQueued, std::memory_order_acq_rel);
    if (msg->aborted()) {
      Reply(std::move(msg), ECANCELED);
      continue;
    }
    server_.Serve(std::move(msg));
  }
}

}  // namespace ulsp::msgport
