// Shared-memory ports: a message port between two processes.
//
// The client process (the shim, which owns the kernel endpoint) creates a segment
// (Boost.Interprocess, named /dev/shm/ulsp.<pid>.<n>) holding two rings of fixed-size
// cells — requests and replies — and a SOCK_SEQPACKET socket pair beside it. The
// server process (a ULSP) attaches with the segment's name and its end of the socket.
// Each message crosses as a Cap'n Proto Envelope written in place into a cell; its
// descriptors go over the socket. Neither side makes a system call per message while
// the other is awake: each spins briefly when idle and wakes the other through a futex
// only when it sleeps.
//
// Failure: the client learns of the server's death from the kernel (socket end-of-file,
// optionally a pidfd) and replies every message outstanding to it with ECONNRESET at
// once; later sends get ECONNRESET too. Every frame read from the segment is
// validated: a corrupt or truncated one is refused (its message replied EBADMSG when
// its id is known) and the port keeps serving. A segment's name is unlinked as soon as
// the server has attached; names left by killed processes are removed by the next
// Create in any process.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "kernel/msgport/fd_channel.h"
#include "kernel/msgport/message_queue.h"
#include "kernel/msgport/ring.h"
#include "kernel/msgport/port.h"
#include "kernel/msgport/watchdog.h"

namespace ulsp::msgport {

struct ShmPortOptions {
  uint32_t slots = 256;        // messages in flight at most; a power of two
  uint32_t slot_bytes = 4096;  // the largest encoded envelope (payload plus ~64 bytes)
  FullPolicy full = FullPolicy::kWait;  // when `slots` messages are in flight
  // A message aborted (Drop) and not answered this long after is answered EINTR by
  // the port itself, and the server's late answer is dropped: a stopped or wedged
  // server then holds no sender for good. Zero: never (the server replies, as ever).
  std::chrono::milliseconds answer_aborted_after{0};
};

namespace shm {
struct Segment;  // the mapping and its layout (shm_port.cc)
}

// The sending side. Put and the generic operations are thread-safe.
class ShmClientPort final : public Port {
 public:
  // Creates the segment and the socket pair. Fails with the errno of shm_open,
  // ftruncate or mmap (ENOSPC when /dev/shm is full), or EINVAL for bad options.
  static Result<std::unique_ptr<ShmClientPort>> Create(std::string name, const ShmPortOptions& options = {});
  // Replies every outstanding message with ECONNRESET; the server sees end-of-file.
  ~ShmClientPort() override;

  // The name the server attaches to (valid until WaitForServer returns).
  const std::string& segment_name() const noexcept { return segment_name_; }
  // The server's end of the socket, to be inherited by the server process (it is
  // close-on-exec: clear that, or dup2 it, in the child).
  UniqueFd TakeServerSocket() noexcept { return std::move(server_socket_); }

  // Waits for the server's hello, then unlinks the segment's name and starts watching
  // the server. With a pid, its pidfd is watched too (for a server whose children keep
  // the socket open). Fails with ETIMEDOUT, or ECONNRESET when the server went away.
  // Call it once. Messages put before it returns wait in the ring.
  Result<void> WaitForServer(Deadline deadline, pid_t server_pid = 0);

  bool peer_alive() const noexcept { return !dead_.load(std::memory_order_acquire); }
  size_t outstanding() const;

  void Put(MessagePtr msg) override;
  void WaitSync(SyncWaiter& waiter, Deadline deadline) override;
  // Forwards the abort to the server (an abort envelope with the message's id), if the
  // message is still in flight and the request ring has room: best effort, as an abort
  // is. The server marks the message ABORTED; it still replies exactly once, unless
  // `answer_aborted_after` passes first (see ShmPortOptions).
  void Drop(Message& msg) override;
  bool Poll() override;
  void Helping(bool on) override;
  bool Pollable() const noexcept override { return true; }

  // Test hook for hostile input: sends `msg` like Put, but puts `bytes` in the cell
  // in place of its encoded envelope, with `claimed_len` as the cell's length.
  void PutRawForTest(MessagePtr msg, std::span<const std::byte> bytes, uint32_t claimed_len);

 private:
  ShmClientPort(std::string name, std::unique_ptr<shm::Segment> segment, UniqueFd mine, UniqueFd theirs,
                const ShmPortOptions& options);
  // Reserves a slot for msg and pushes it; `encode` writes the cell. Replies msg with
  // an errno when it cannot be sent.
  template <class Encode>
  void Enqueue(MessagePtr msg, Encode&& encode);
  // Takes the message in flight with this id (nullptr when none: stale or forged).
  MessagePtr TakePending(uint64_t id) noexcept;
  bool Drain();  // drain_mu_ held
  // Ends this client's reply-polling lease (see Header::reply_poll_until_ns) and makes
  // sure a reply that came meanwhile reaches the reply thread.
  void EndLease();
  void RenewLease(int64_t now_ns);
  void WatchPeer() noexcept;
  // Answers EINTR the aborted messages whose `answer_aborted_after` has passed (the
  // watcher, every 100 ms).
  void AnswerOverdueAborts() noexcept;
  // Whether `id` was answered by the port (its late reply is no bad input); forgets it.
  bool AnsweredHere(uint64_t id) noexcept;
  void DispatchReplies() noexcept;
  void OnPeerDeath() noexcept;

  std::string segment_name_;
  std::unique_ptr<shm::Segment> segment_;
  FdChannel fds_;
  UniqueFd server_socket_;
  UniqueFd pidfd_;
  const FullPolicy full_;
  bool name_unlinked_ = false;

  // Messages in flight, one slot each. A slot's `owner` holds the id of the message
  // in it (0: free); whoever moves it from that id to 0 — the reply, the server's
  // death, the destructor — owns the message, so exactly one of them replies it.
  struct Slot {
    std::atomic<uint64_t> owner{0};
    Message* msg = nullptr;   // written before owner is set, read after it is taken
    uint32_t generation = 0;  // by the thread that took the slot from free_slots_ only
  };
  struct FreeCell {
    std::atomic<uint64_t> seq;
    uint32_t index;
  };
  std::optional<uint32_t> TakeFreeSlot() noexcept;
  void ReturnSlot(uint32_t index) noexcept;
  // Waits (FullPolicy::kWait) for a free slot until msg's deadline; 0 or an errno.
  int WaitForSlot(const Message& msg, std::optional<uint32_t>& index);
  std::vector<MessagePtr> TakeAllPending();

  const uint32_t slot_count_;
  std::unique_ptr<Slot[]> slots_;
  RingIndex free_index_;
  std::unique_ptr<FreeCell[]> free_cells_;
  Ring<FreeCell> free_slots_;  // indices of free slots, each at most once: lock-free
  std::mutex room_mu_;         // only for senders waiting for a free slot
  std::condition_variable room_cv_;
  std::atomic<uint32_t> room_waiters_{0};
  std::atomic<uint32_t> in_flight_{0};  // slots in use

  std::mutex drain_mu_;  // the right to pop the reply ring
  std::atomic<bool> dead_{false};
  std::atomic<bool> stopping_{false};

  const std::chrono::milliseconds answer_aborted_after_;
  std::mutex aborted_mu_;
  std::vector<std::pair<uint64_t, Deadline>> aborted_;  // id, when to answer it here
  std::vector<uint64_t> answered_here_;                 // ids whose late reply is expected

  std::thread watcher_;
  std::thread dispatcher_;
};

// The serving side, in the ULSP's process. Serve runs the loop in the calling
// thread; PutReply (called through Reply) is thread-safe, so a server may reply from
// any thread. The port must outlive every message it delivered: a server that keeps
// messages to reply later replies them (or drops them) before the port goes.
class ShmServerPort final : public Port {
 public:
  // Maps the segment, checks its layout, and says hello on `socket`. EINVAL for a
  // segment that is not a valid port (wrong magic, version or size).
  static Result<std::unique_ptr<ShmServerPort>> Attach(const std::string& segment_name, UniqueFd socket);
  ~ShmServerPort() override;

  // Serves requests with `server` on the calling thread until the client goes away
  // or Stop is called. With `max_helpers` > 0, a request that blocks in the server (a
  // hung file system below) does not stall the others: when every thread serving has
  // been inside one request for `takeover` while more wait, a helper thread starts
  // (up to max_helpers) and serves them, and leaves again once a thread started
  // before it is free and nothing waits. Server::Serve is then called on several
  // threads at once. Serve returns once its helpers have (a request blocked for good
  // keeps it, as it keeps a server without helpers).
  void Serve(Server& server, size_t max_helpers = 0,
             std::chrono::nanoseconds takeover = std::chrono::milliseconds(2));
  // Makes Serve return soon. Callable from any thread, and from a signal handler (it
  // is an atomic store and a futex wake).
  void Stop() noexcept;

  void Put(MessagePtr msg) override;       // not a request port on this side: EINVAL
  void PutReply(MessagePtr msg) override;  // encodes the reply into the reply ring

  // Test hook: replies `msg` with raw bytes in place of its encoded envelope.
  void ReplyRawForTest(MessagePtr msg, std::span<const std::byte> bytes, uint32_t claimed_len);
  // Test hook for a hostile or broken server: overwrites the shared header's layout
  // fields and the request ring's producer index with garbage.
  void ScribbleForTest() noexcept;

 private:
  ShmServerPort(std::unique_ptr<shm::Segment> segment, UniqueFd socket);
  // Takes one request, if one is there, and serves it; `busy_since` holds when it
  // began while it is served (0 otherwise), for the watchdog.
  bool ServeOne(Server& server, std::atomic<int64_t>& busy_since);
  // A helper's loop, in serving slot `slot` (1..serving_count_ - 1).
  void Help(Server& server, size_t slot);
  // The watchdog's look: starts a helper when every serving thread is held up (see
  // Serve); returns whether any serves.
  bool CheckHeldUp(Server& server);
  template <class Encode>
  void PushReply(Encode&& encode);

  void MarkAborted(uint64_t id) noexcept;
  // Wakes the client's reply thread if replies wait unread after the client's lease
  // ran out; returns how long the server may sleep before looking again.
  std::chrono::nanoseconds AnnounceUnreadReplies() noexcept;
  // The same for every turn of a spin that yields, once a lease has been over for a
  // lease's time: it reads the lease first (its line is written once per half lease)
  // and the reply ring's indices (which move with every reply) only after that.
  void AnnounceIfLeaseRanOut() noexcept;
  // How long the client's reply-polling lease still runs (0: none, or run out).
  int64_t LeaseLeftNs() const noexcept;
  // Takes a message out of service and keeps it for reuse (see spare_).
  void Recycle(MessagePtr msg) noexcept;

  std::unique_ptr<shm::Segment> segment_;
  FdChannel fds_;
  std::atomic<bool> stop_{false};
  // Messages being served, by the client's slot index (the low half of the id), so an
  // abort envelope can find its message. Written on delivery, cleared by PutReply.
  const size_t slot_count_;
  std::unique_ptr<std::atomic<Message*>[]> in_service_;
  // Replied messages kept for reuse, so serving allocates nothing in the steady state.
  // Room for every message this port can ever have made (at most one per slot in
  // service, plus one being prepared), so none is freed while the port lives: an
  // abort that races a reply may touch a message just replied, never a freed one.
  // (Only the thread holding take_mu_, which also marks aborts, takes messages out.)
  static constexpr size_t kMaxSparePayload = 64 * 1024;
  MessageQueue spare_;

  // The right to take requests out (the request ring's one consumer), to reuse spare
  // messages and to mark aborts: held by one serving thread at a time, never while
  // it serves.
  std::mutex take_mu_;
  // Serving threads by slot (0: Serve's caller; then helpers): when each began the
  // request it serves (0: none), and whether a helper runs in the slot.
  struct Serving {
    std::atomic<int64_t> busy_since{0};
    std::atomic<bool> running{false};
    std::thread thread;  // a helper's (joined before the slot is used again)
  };
  std::unique_ptr<Serving[]> serving_;
  size_t serving_count_ = 1;  // 1 + max_helpers, for this Serve
  std::chrono::nanoseconds takeover_{};
  std::optional<Watchdog> watchdog_;  // with helpers, while Serve runs
};

// Removes /dev/shm/ulsp.<pid>.* names whose creating process no longer exists.
// Returns how many it removed. Create calls it once per process.
int RemoveStaleSegments();

}  // namespace ulsp::msgport
