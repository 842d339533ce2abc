// MessageQueue: a bounded multi-producer multi-consumer queue of messages inside one
// process, on a Ring with futex wake-ups only when a side sleeps. Holds ownership of
// the queued messages; destroying the queue replies each with ECONNRESET.
// Thread-safe.
#pragma once

#include <atomic>
#include <memory>

#include "kernel/msgport/event_count.h"
#include "kernel/msgport/message.h"
#include "kernel/msgport/ring.h"

namespace ulsp::msgport {

class MessageQueue {
 public:
  // capacity is rounded up to a power of two.
  explicit MessageQueue(size_t capacity);
  ~MessageQueue();
  MessageQueue(const MessageQueue&) = delete;
  MessageQueue& operator=(const MessageQueue&) = delete;

  // Adds msg; returns false, leaving msg with the caller, when full.
  bool TryPush(MessagePtr& msg) noexcept;
  // TryPush and TryPop for a queue nobody ever waits on (a pool): no wake-ups, so no
  // fence per call.
  bool TryPushQuiet(MessagePtr& msg) noexcept;
  MessagePtr TryPopQuiet() noexcept;
  // Adds msg, waiting for room until deadline; false (msg left with the caller) if
  // none came.
  bool Push(MessagePtr& msg, Deadline deadline) noexcept;
  MessagePtr TryPop() noexcept;
  // Spins briefly, then sleeps, until a message, the deadline, or `*stop` (checked on
  // every wake-up; WakeAll wakes sleepers to see it). nullptr when none came.
  MessagePtr Pop(Deadline deadline, const std::atomic<bool>* stop = nullptr) noexcept;
  void WakeAll() noexcept;

  size_t capacity() const noexcept { return ring_.capacity(); }
  // Messages in the queue now (a snapshot).
  size_t depth() const noexcept;

 private:
  struct Cell {
    std::atomic<uint64_t> seq;
    Message* msg;
  };
  RingIndex index_;
  std::unique_ptr<Cell[]> cells_;
  Ring<Cell> ring_;
  EventCount not_empty_;
  EventCount not_full_;
};

}  // namespace ulsp::msgport
