#include "kernel/msgport/fd_channel.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>

namespace ulsp::msgport {

namespace {
struct FrameHeader {
  uint64_t id;
  uint32_t count;
  uint32_t reserved;
};
}  // namespace

Result<std::pair<UniqueFd, UniqueFd>> FdChannel::SocketPair() {
  int sv[2];
  if (auto r = Sys([&] { return ::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv); }); !r) {
    return std::unexpected(r.error());
  }
  return std::pair{UniqueFd(sv[0]), UniqueFd(sv[1])};
}

Result<void> FdChannel::Send(uint64_t id, std::span<const UniqueFd> fds) {
  if (fds.size() > kMaxFds) return Fail(E2BIG);
  FrameHeader header{id, static_cast<uint32_t>(fds.size()), 0};
  iovec iov{&header, sizeof header};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  if (!fds.empty()) {
    mh.msg_control = control;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    for (size_t i = 0; i < fds.size(); ++i) {
      int fd = fds[i].get();
      std::memcpy(CMSG_DATA(cm) + i * sizeof(int), &fd, sizeof fd);
    }
  }
  auto r = Sys([&] { return ::sendmsg(socket_.get(), &mh, MSG_NOSIGNAL); });
  if (!r) return std::unexpected(r.error());
  return {};
}

FdChannel::PumpResult FdChannel::ReadFrame() {
  FrameHeader header{};
  iovec iov{&header, sizeof header};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = control;
  mh.msg_controllen = sizeof control;
  auto n = Sys([&] { return ::recvmsg(socket_.get(), &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT); });
  if (!n) {
    if (n.error().value == EAGAIN) return PumpResult::kTimeout;  // nothing there now
    return PumpResult::kClosed;
  }
  if (*n == 0) return PumpResult::kClosed;  // EOF: the peer is gone
  // Own every descriptor that arrived before judging the frame, so none leaks.
  std::vector<UniqueFd> fds;
  for (cmsghdr* cm = CMSG_FIRSTHDR(&mh); cm != nullptr; cm = CMSG_NXTHDR(&mh, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
      fds.emplace_back(fd);
    }
  }
  const bool well_formed = static_cast<size_t>(*n) == sizeof header && (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) == 0 &&
                           header.count == fds.size();
  // A bad frame is kept (without its descriptors, which close here) so the one
  // waiting for its id learns it was bad.
  if (!well_formed) fds.clear();
  std::lock_guard lock(mu_);
  if (!well_formed) ++dropped_;
  if (stash_.size() >= kMaxStashed && !stash_.contains(header.id)) {
    ++dropped_;  // descriptors close here
    return PumpResult::kFrame;
  }
  stash_[header.id] = Frame{well_formed, std::move(fds)};
  return PumpResult::kFrame;
}

FdChannel::PumpResult FdChannel::TryRead(bool* busy) {
  {
    std::lock_guard lock(mu_);
    if (closed_) return PumpResult::kClosed;
    if (reading_) {
      if (busy != nullptr) *busy = true;
      return PumpResult::kTimeout;
    }
    reading_ = true;
  }
  const PumpResult result = ReadFrame();
  {
    std::lock_guard lock(mu_);
    reading_ = false;
    if (result == PumpResult::kClosed) closed_ = true;
  }
  cv_.notify_all();
  return result;
}

FdChannel::PumpResult FdChannel::Pump(std::chrono::milliseconds timeout, int extra_fd, bool frames) {
  {
    std::lock_guard lock(mu_);
    if (closed_) return PumpResult::kClosed;
  }
  // Without `frames` only the peer's end wakes this poll (POLLHUP is reported
  // whatever the events asked for); the frames are read by those who Take them.
  pollfd pfds[2] = {{socket_.get(), static_cast<short>(frames ? POLLIN : POLLRDHUP), 0}, {extra_fd, POLLIN, 0}};
  auto ready = Sys([&] { return ::poll(pfds, extra_fd >= 0 ? 2 : 1, static_cast<int>(timeout.count())); });
  if (!ready) {
    std::lock_guard lock(mu_);
    closed_ = true;
    return PumpResult::kClosed;
  }
  if (*ready == 0) return PumpResult::kTimeout;
  if (pfds[0].revents != 0) {
    // Readable, or the peer's end: frames it sent before it went are still read (they
    // may answer messages it finished), then its end-of-file closes the channel.
    PumpResult result = PumpResult::kTimeout;
    for (PumpResult r; (r = TryRead()) != PumpResult::kTimeout;) {
      result = r;
      if (r == PumpResult::kClosed) break;
    }
    return result;
  }
  if (extra_fd >= 0 && pfds[1].revents != 0) return PumpResult::kExtraReady;
  return PumpResult::kTimeout;
}

Result<std::vector<UniqueFd>> FdChannel::Take(uint64_t id, size_t count, Deadline deadline) {
  // The frame is sent before its message's envelope, so it is nearly always in the
  // socket already: the taker reads it itself rather than wait for a thread that
  // polls the socket to be woken (on another CPU, through the hypervisor).
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (auto it = stash_.find(id); it != stash_.end()) {
        Frame frame = std::move(it->second);
        stash_.erase(it);
        if (!frame.well_formed || frame.fds.size() != count) return Fail(EBADMSG);  // fds close here
        return std::move(frame.fds);
      }
      if (closed_) return Fail(ECONNRESET);
    }
    bool busy = false;
    if (TryRead(&busy) != PumpResult::kTimeout) continue;  // a frame (maybe this one), or the end
    const Deadline now = Clock::now();
    if (now >= deadline) return Fail(ETIMEDOUT);
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - now);
    if (busy) {
      // Another thread is reading a frame (perhaps this one): wait for its news.
      std::unique_lock lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(1), [&] { return !reading_ || closed_; });
      continue;
    }
    // Not sent yet. Another taker may read it meanwhile and stash it, which this poll
    // does not see: it is short, and the stash is looked at again.
    pollfd p{socket_.get(), POLLIN, 0};
    (void)::poll(&p, 1, static_cast<int>(std::min<std::chrono::milliseconds>(left, std::chrono::milliseconds(10)).count()));
  }
}

bool FdChannel::closed() const {
  std::lock_guard lock(mu_);
  return closed_;
}

uint64_t FdChannel::dropped() const {
  std::lock_guard lock(mu_);
  return dropped_;
}

void FdChannel::Discard(uint64_t id) {
  std::lock_guard lock(mu_);
  stash_.erase(id);
}

}  // namespace ulsp::msgport
