// Port: where messages are delivered, after DragonFly's lwkt_port. A port is an
// interface, not a queue: each kind delivers in its own way (in the caller's thread,
// to a server thread, through shared memory to another process, over the network),
// and the generic operations below are written once on top of the four methods.
//
//   Send(port, msg)             asynchronous; the reply arrives on msg->reply_port
//   DoMsg(port, msg, deadline)  synchronous; served in the caller's thread when the
//                               port can (DirectPort), else waits for the reply
//   Reply(msg, error)           the server's answer, exactly once
//   Abort(msg)                  a request: the server still replies exactly once
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/message.h"

namespace ulsp::msgport {

class SyncWaiter;

// Counters every port keeps; read by `ulsp ps`. Relaxed: they are statistics.
struct PortCounters {
  std::atomic<uint64_t> put{0};       // requests delivered to the port
  std::atomic<uint64_t> replied{0};   // replies that passed through it
  std::atomic<uint64_t> refused{0};   // requests answered with an error by the port itself
  std::atomic<uint64_t> bad_input{0}; // malformed frames or descriptors refused
};

// What a bounded queue does when it is full.
enum class FullPolicy {
  kWait,  // wait for room until the message's deadline, then reply ETIMEDOUT
  kFail,  // reply EAGAIN at once
};

class Port {
 public:
  explicit Port(std::string name) : name_(std::move(name)) {}
  virtual ~Port() = default;
  Port(const Port&) = delete;
  Port& operator=(const Port&) = delete;

  // put: takes a request. Ownership passes to the port; a request the port cannot take
  // (full, closed, peer dead) is replied by the port with an errno, so the sender
  // always gets exactly one reply. May block only under FullPolicy::kWait, until the
  // message's deadline.
  virtual void Put(MessagePtr msg) = 0;

  // reply: a reply arrives (this port is the message's reply port). Takes ownership.
  // Never fails and never blocks for long. Request-only ports discard it.
  virtual void PutReply(MessagePtr msg);

  // wait: blocks until the SYNC message behind `waiter` is replied or `deadline`
  // passes. Ports whose replies need a waiting thread's help (draining a shared-memory
  // ring) override it; the default waits on the waiter alone.
  virtual void WaitSync(SyncWaiter& waiter, Deadline deadline);

  // drop: the sender asked to abort `msg`, which was put here and is not yet replied.
  // A port that can still take it back from its queue does, and replies ECANCELED;
  // otherwise the ABORTED flag (already set) is the server's to honour. Must not
  // block. Default: nothing to do.
  virtual void Drop(Message& msg);

  // Makes what progress the calling thread can on replies owed by this port (drains a
  // reply ring), without blocking; returns true when it delivered something. For
  // threads that wait on replies from several ports. Default: nothing to do.
  virtual bool Poll();

  // A thread is calling Poll in a loop while it waits (on), so a port may skip waking
  // its own reply thread meanwhile; "on" again every few microseconds renews that (it
  // may be a lease that runs out). "off": the thread is about to sleep, so replies
  // need the port's own thread again. Default: nothing to do.
  virtual void Helping(bool on);
  // Whether Poll can deliver anything (a port whose replies are drained by whoever
  // polls); a thread need not wait on Poll for a port that says no.
  virtual bool Pollable() const noexcept { return false; }

  const std::string& name() const noexcept { return name_; }
  PortCounters& counters() noexcept { return counters_; }
  const PortCounters& counters() const noexcept { return counters_; }
  // Whether its replies pass through it, counted as they do. A direct port's go from
  // the server straight to the sender, whose side counts them on it (DoMsg, the FUSE
  // shim's reply port), the port being alive there.
  virtual bool CountsReplies() const noexcept { return true; }

 private:
  std::string name_;
  PortCounters counters_;
};

// Serves the messages of a port. Serve takes ownership of the message and must
// Reply it exactly once, now or later, from any thread (destroying it unreplied
// replies EIO). Called from the port's thread; never throws.
class Server {
 public:
  virtual ~Server() = default;
  virtual void Serve(MessagePtr msg) noexcept = 0;
};

// Sends asynchronously; the reply arrives on msg->reply_port.
void Send(Port& port, MessagePtr msg);

// Sends and waits for the reply until `deadline`. Returns the replied message (its
// `error` is the server's answer, or the port's: ECONNRESET when the server died,
// EAGAIN when a kFail queue was full), or ETIMEDOUT when the deadline passed first: the
// message is then aborted and abandoned, freed when its late reply comes.
[[nodiscard]] Result<MessagePtr> DoMsg(Port& port, MessagePtr msg, Deadline deadline = kNoDeadline);

// Replies: sets msg->error (0 or a positive errno) and hands the message to its reply
// port. Exactly once per message sent.
void Reply(MessagePtr msg, int error);

// Asks the server to give up `msg`, which the caller sent and has not had back. The
// message still gets exactly one reply (ECANCELED if the port could drop it, the
// server's answer otherwise). Must not be called after the reply arrived.
void Abort(Message& msg);

// The one-shot reply port behind DoMsg. Pooled per thread; abandoned on a deadline,
// then freed by the late reply. Public only so ports can override WaitSync.
class SyncWaiter final : public Port {
 public:
  SyncWaiter() : Port("sync") {}
  void Put(MessagePtr msg) override;       // not a request port: refuses with EINVAL
  void PutReply(MessagePtr msg) override;  // completes (or frees, when abandoned)

  // True once the reply has arrived.
  bool Ready() const noexcept { return state_.load(std::memory_order_acquire) == kReplied; }
  // Spins, then sleeps on the futex, until the reply or the deadline. Returns Ready().
  bool Wait(Deadline deadline) noexcept;

 private:
  friend Result<MessagePtr> DoMsg(Port&, MessagePtr, Deadline);
  enum State : uint32_t { kWaiting = 0, kSleeping = 1, kReplied = 2, kAbandoned = 3 };

  void Arm() noexcept { state_.store(kWaiting, std::memory_order_relaxed); }
  MessagePtr Take() noexcept { return std::move(reply_); }
  // Gives up waiting; returns false when the reply already arrived (then Take it).
  bool Abandon() noexcept;

  std::atomic<uint32_t> state_{kWaiting};
  MessagePtr reply_;
};

}  // namespace ulsp::msgport
