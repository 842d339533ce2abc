// FdChannel: the Unix socket beside a shared-memory port's rings. It carries the
// descriptors of messages (SCM_RIGHTS, one frame per message, tagged with the
// message's id and sent before the message's envelope), the attach handshake, and,
// by its end-of-file, the news that the peer process is gone.
//
// Frames that arrive before anyone asks for them wait in a stash keyed by id. Any
// thread may Send; any thread may Take or Pump. One thread at a time reads a frame
// (a non-blocking recvmsg and its stashing); none holds that role while it waits.
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
  // itself (when no other thread is reading a frame at that moment: then it waits
  // for that one). The frame must carry exactly `count` descriptors, else
  // they are closed and it fails with EBADMSG. ECONNRESET when the peer is gone,
  // ETIMEDOUT at the deadline.
  Result<std::vector<UniqueFd>> Take(uint64_t id, size_t count, Deadline deadline);

  enum class PumpResult { kFrame, kTimeout, kClosed, kExtraReady };
  // Waits up to `timeout` for the socket, then reads the frames there into the
  // stash (kFrame); also returns when `extra_fd` (a pidfd, say; -1 for none) becomes
  // readable. With `frames` false it wakes only for the peer's end (kClosed, after
  // the frames sent before it are read): a thread that watches for that is not woken
  // for every frame that others Take.
  PumpResult Pump(std::chrono::milliseconds timeout, int extra_fd = -1, bool frames = true);

  bool closed() const;
  // Frames dropped: malformed, or beyond kMaxStashed.
  uint64_t dropped() const;
  // Drops stashed frames (their descriptors close) whose id is no longer wanted.
  void Discard(uint64_t id);
  int fd() const noexcept { return socket_.get(); }

 private:
  // Reads one frame, without waiting: kTimeout when none is there. Called with
  // reading_ held, mu_ not held.
  PumpResult ReadFrame();
  // ReadFrame unless another thread is reading (then kTimeout, and *busy if given).
  PumpResult TryRead(bool* busy = nullptr);

  UniqueFd socket_;
  mutable std::mutex mu_;  // guards stash_, reading_, closed_, dropped_
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
