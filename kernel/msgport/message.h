// Message: the unit of work on a port, after DragonFly's lwkt_msg.
//
// Ownership rule: a message has exactly one owner at a time — the sender until it is
// sent, the port and then the server while it is served, the sender again after the
// reply — and every message sent gets exactly one reply. In C++ the owner is whoever
// holds the MessagePtr: Send/DoMsg take it, Reply gives it back through the reply port.
// A server cannot lose a message: destroying one that was sent and not yet replied
// replies it with EIO.
//
// Families (VFS, net) may derive from Message to carry typed arguments inside a
// process; across processes only `command`, `error`, `payload` and `fds` travel.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernel/msgport/unique_fd.h"

namespace ulsp::msgport {

class Port;

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;
inline constexpr Deadline kNoDeadline = Deadline::max();
inline Deadline After(std::chrono::nanoseconds d) { return Clock::now() + d; }

// Message flags, as in DragonFly's MSGF_*.
enum MsgFlag : uint32_t {
  kMsgDone = 1u << 0,       // not in flight: never sent, or replied
  kMsgReplied = 1u << 1,    // a reply was made
  kMsgSync = 1u << 2,       // sent by DoMsg; a thread waits for it
  kMsgAbortable = 1u << 3,  // DragonFly's "the sender may abort it": kept across sends for
                            // families that want it; Abort itself does not require it
  kMsgAborted = 1u << 4,    // an abort was requested
  kMsgQueued = 1u << 5,     // sits in a port's queue, not yet taken by the server
};

class Message;
// Deletes a message, or replies it with EIO when it is still in flight (see above).
struct MessageDeleter {
  void operator()(Message* msg) const noexcept;
};
using MessagePtr = std::unique_ptr<Message, MessageDeleter>;

class Message {
 public:
  explicit Message(uint32_t cmd = 0) noexcept : command(cmd) {}
  virtual ~Message() = default;
  Message(const Message&) = delete;
  Message& operator=(const Message&) = delete;

  static MessagePtr Make(uint32_t cmd = 0) { return MessagePtr(new Message(cmd)); }

  uint32_t flags() const noexcept { return flags_.load(std::memory_order_acquire); }
  bool done() const noexcept { return (flags() & kMsgDone) != 0; }
  bool aborted() const noexcept { return (flags() & kMsgAborted) != 0; }

  // What the message asks for; its meaning belongs to the family.
  uint32_t command = 0;
  // The reply's result: 0 or a positive errno. Set by Reply.
  int error = 0;
  // Arguments and results. Reused across sends, so a caller that keeps its message
  // keeps its buffer's capacity.
  std::vector<std::byte> payload;
  // Descriptors carried with the message (across processes: over the port's socket).
  std::vector<UniqueFd> fds;
  // Where the reply goes. Must outlive the message while it is in flight; nullptr
  // discards the reply. DoMsg sets it.
  Port* reply_port = nullptr;
  // When the sender stops caring. Ports that wait for queue room wait until then.
  Deadline deadline = kNoDeadline;

  // Framework state, written by the generic operations and the port kinds.
  std::atomic<uint32_t> flags_{kMsgDone};
  // Atomic, as Abort may run on another thread while the sender writes them (a FUSE
  // interrupt for a request being sent); relaxed is enough: a stale value names a
  // port or an id the message no longer holds, and the port finds nothing to drop.
  std::atomic<Port*> target_port{nullptr};  // the port it was last sent to (for Abort)
  std::atomic<uint64_t> token{0};            // a port kind's own bookkeeping (the shm port's id)
};

}  // namespace ulsp::msgport
