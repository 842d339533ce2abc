// FdChannel: the Unix socket beside a shared-memory port's rings. It carries the
// descriptors of messages (SCM_RIGHTS, one frame per message, tagged with the
// message's id and sent before the message's envelope), the attach handshake, and,
// by its end-of-file, the news that the peer process is gone.
//
// Frames that arrive before anyone asks for them wait in a stash keyed by id. Any
// thread may Send; any thread may Take or Pump, one reading the socket at a time.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/message.h"
#include "kernel/msgport/unique_fd.h"

namespace ulsp::msgport {

class FdChannel {
 public:
  // Most descriptors one message may carry.
  static constexpr size_t kMaxFds = 64;
  // Most frames kept waiting for their envelope. A peer that sends more (frames for
  // ids it never sends envelopes for) has them dropped, descriptors closed, so it
  // cannot pin this process's memory or descriptor table.
  static constexpr size_t kMaxStashed = 4096;

  // Takes ownership of a SOCK_SEQPACKET socket.
  explicit FdChannel(UniqueFd socket) : socket_(std::move(socket)) {}

  // A connected pair (both ends close-on-exec).
  static Result<std::pair<UniqueFd, UniqueFd>> SocketPair();

  // Sends one frame: `id` and the descriptors (the caller keeps its copies). Fails
  // with the socket's errno (EPIPE when the peer is gone), E2BIG past kMaxFds.
  Result<void> Send(uint64_t id, std::span<const UniqueFd> fds);

  // Waits until the frame for `id` has arrived, until `deadline`, reading the socket
  // when no other thread is. The frame must carry exactly `count` descriptors, else
  // they are closed and it fails with EBADMSG. ECONNRESET when the peer is gone,
  // ETIMEDOUT at the deadline.
  Result<std::vector<UniqueFd>> Take(uint64_t id, size_t count, Deadline deadline);

  enum class PumpResult { kFrame, kTimeout, kClosed, kExtraReady };
  // Reads at most one frame into the stash, waiting up to `timeout`; also returns
  // when `extra_fd` (a pidfd, say; -1 for none) becomes readable.
  PumpResult Pump(std::chrono::milliseconds timeout, int extra_fd = -1);

  bool closed() const;
  // Frames dropped: malformed, or beyond kMaxStashed.
  uint64_t dropped() const;
  // Drops stashed frames (their descriptors close) whose id is no longer wanted.
  void Discard(uint64_t id);
  int fd() const noexcept { return socket_.get(); }

 private:
  // Reads one frame (the socket is readable). Called with reading_ held, mu_ not held.
  PumpResult ReadFrame();

  UniqueFd socket_;
  mutable std::mutex mu_;  // guards stash_, reading_, closed_
  std::condition_variable cv_;
  struct Frame {
    bool well_formed = true;
    std::vector<UniqueFd> fds;
  };
  std::unordered_map<uint64_t, Frame> stash_;
  bool reading_ = false;
  bool closed_ = false;
  uint64_t dropped_ = 0;
};

}  // namespace ulsp::msgport
