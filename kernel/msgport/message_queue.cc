#include "kernel/msgport/message_queue.h"

#include <algorithm>
#include <bit>

#include "kernel/msgport/port.h"

namespace ulsp::msgport {

namespace {
constexpr auto kMaxSleep = std::chrono::milliseconds(100);
}  // namespace

MessageQueue::MessageQueue(size_t capacity)
    : cells_(std::make_unique<Cell[]>(std::bit_ceil(std::max<size_t>(capacity, 2)))),
      ring_(&index_, reinterpret_cast<std::byte*>(cells_.get()), std::bit_ceil(std::max<size_t>(capacity, 2)),
            sizeof(Cell)) {
  ring_.Initialise();
}

MessageQueue::~MessageQueue() {
  while (MessagePtr msg = TryPop()) Reply(std::move(msg), ECONNRESET);
}

bool MessageQueue::TryPushQuiet(MessagePtr& msg) noexcept {
  Message* raw = msg.get();
  if (!ring_.TryPush([raw](Cell& c) noexcept { c.msg = raw; })) return false;
  (void)msg.release();
  return true;
}

bool MessageQueue::TryPush(MessagePtr& msg) noexcept {
  if (!TryPushQuiet(msg)) return false;
  not_empty_.Notify();
  return true;
}

MessagePtr MessageQueue::TryPopQuiet() noexcept {
  Message* raw = nullptr;
  if (!ring_.TryPop([&raw](Cell& c) noexcept { raw = c.msg; })) return nullptr;
  return MessagePtr(raw);
}

bool MessageQueue::Push(MessagePtr& msg, Deadline deadline) noexcept {
  for (;;) {
    if (TryPush(msg)) return true;
    const Deadline now = Clock::now();
    if (now >= deadline) return false;
    uint32_t key = not_full_.Prepare();
    if (TryPush(msg)) {
      not_full_.Cancel();
      return true;
    }
    not_full_.Wait(key, std::min<Clock::duration>(deadline - now, kMaxSleep));
  }
}

MessagePtr MessageQueue::TryPop() noexcept {
  MessagePtr msg = TryPopQuiet();
  if (msg) not_full_.Notify();
  return msg;
}

MessagePtr MessageQueue::Pop(Deadline deadline, const std::atomic<bool>* stop) noexcept {
  const Deadline spin_end = std::min(deadline, Clock::now() + kSpinTime);
  SpinPause pause;
  for (int i = 0;; ++i) {
    if (MessagePtr m = TryPop()) return m;
    if (stop && stop->load(std::memory_order_acquire)) return nullptr;
    pause();
    if ((i & 63) == 63 && Clock::now() >= spin_end) break;
  }
  for (;;) {
    if (MessagePtr m = TryPop()) return m;
    if (stop && stop->load(std::memory_order_acquire)) return nullptr;
    const Deadline now = Clock::now();
    if (now >= deadline) return nullptr;
    uint32_t key = not_empty_.Prepare();
    if (ring_.HasReady() || (stop && stop->load(std::memory_order_acquire))) {
      not_empty_.Cancel();
      continue;
    }
    not_empty_.Wait(key, std::min<Clock::duration>(deadline - now, kMaxSleep));
  }
}

void MessageQueue::WakeAll() noexcept {
  not_empty_.NotifyAlways();
  not_full_.NotifyAlways();
}

size_t MessageQueue::depth() const noexcept { return static_cast<size_t>(ring_.Depth()); }

}  // namespace ulsp::msgport
