#include "kernel/msgport/shm_port.h"

#include <dirent.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <boost/interprocess/shared_memory_object.hpp>

#include "kernel/msgport/event_count.h"
#include "kernel/msgport/log.h"
#include "kernel/msgport/shm_segment.h"

namespace ulsp::msgport {

namespace bip = boost::interprocess;

namespace shm {

// How long a reply-polling lease lasts (renewed at half-life while a thread polls).
constexpr int64_t kLeaseNs = 1'000'000;
constexpr auto kIdleSleep = std::chrono::milliseconds(100);
constexpr auto kFdWait = std::chrono::seconds(1);  // descriptors are sent before the envelope

int64_t NowNs() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

}  // namespace shm

using shm::Cell;

namespace {

std::atomic<uint32_t> segment_counter{0};
std::once_flag stale_once;

bool ProcessExists(pid_t pid) { return ::kill(pid, 0) == 0 || errno != ESRCH; }

}  // namespace

int RemoveStaleSegments() {
  int removed = 0;
  DIR* dir = ::opendir("/dev/shm");
  if (dir == nullptr) return 0;
  while (dirent* e = ::readdir(dir)) {
    unsigned pid = 0, n = 0;
    char tail = 0;
    if (std::sscanf(e->d_name, "ulsp.%u.%u%c", &pid, &n, &tail) != 2 || pid == 0) continue;
    if (ProcessExists(static_cast<pid_t>(pid))) continue;
    if (bip::shared_memory_object::remove(e->d_name)) {
      ++removed;
      Logger("msgport")->info("removed stale segment /dev/shm/{} (process {} is gone)", e->d_name, pid);
    }
  }
  ::closedir(dir);
  return removed;
}

// --- client -----------------------------------------------------------------------

Result<std::unique_ptr<ShmClientPort>> ShmClientPort::Create(std::string name, const ShmPortOptions& options) {
  if (options.slots == 0 || !std::has_single_bit(options.slots) || options.slots > (1u << 20) ||
      options.slot_bytes < 128 || options.slot_bytes % 8 != 0 || options.slot_bytes > (64u << 20)) {
    return Fail(EINVAL);
  }
  std::call_once(stale_once, [] { RemoveStaleSegments(); });
  std::string segment_name = "ulsp." + std::to_string(::getpid()) + "." + std::to_string(segment_counter.fetch_add(1));
  auto segment = shm::CreateSegment(segment_name, options.slots, options.slot_bytes);
  if (!segment) return std::unexpected(segment.error());
  auto pair = FdChannel::SocketPair();
  if (!pair) {
    bip::shared_memory_object::remove(segment_name.c_str());
    return std::unexpected(pair.error());
  }
  return std::unique_ptr<ShmClientPort>(new ShmClientPort(std::move(name), std::move(*segment),
                                                          std::move(pair->first), std::move(pair->second), options));
}

ShmClientPort::ShmClientPort(std::string name, std::unique_ptr<shm::Segment> segment, UniqueFd mine,
                             UniqueFd theirs, const ShmPortOptions& options)
    : Port(std::move(name)),
      segment_name_(segment->object.get_name()),
      segment_(std::move(segment)),
      fds_(std::move(mine)),
      server_socket_(std::move(theirs)),
      full_(options.full),
      slot_count_(options.slots),
      slots_(std::make_unique<Slot[]>(options.slots)),
      free_cells_(std::make_unique<FreeCell[]>(options.slots)),
      free_slots_(&free_index_, reinterpret_cast<std::byte*>(free_cells_.get()), options.slots, sizeof(FreeCell)),
      answer_aborted_after_(options.answer_aborted_after) {
  free_slots_.Initialise();
  for (uint32_t i = 0; i < slot_count_; ++i) (void)free_slots_.TryPush([i](FreeCell& c) { c.index = i; });
}

ShmClientPort::~ShmClientPort() {
  stopping_.store(true, std::memory_order_release);
  segment_->header->replies_ec.NotifyAlways();
  if (dispatcher_.joinable()) dispatcher_.join();
  if (watcher_.joinable()) watcher_.join();
  if (!name_unlinked_) bip::shared_memory_object::remove(segment_name_.c_str());
  dead_.store(true, std::memory_order_seq_cst);
  for (auto& m : TakeAllPending()) Reply(std::move(m), ECONNRESET);
}

Result<void> ShmClientPort::WaitForServer(Deadline deadline, pid_t server_pid) {
  if (auto hello = fds_.Take(0, 0, deadline); !hello) return std::unexpected(hello.error());
  bip::shared_memory_object::remove(segment_name_.c_str());
  name_unlinked_ = true;
  if (server_pid > 0) {
    if (auto fd = Sys([&] { return static_cast<int>(::syscall(SYS_pidfd_open, server_pid, 0)); }); fd) {
      pidfd_.Reset(*fd);
    } else {
      return std::unexpected(fd.error());
    }
  }
  watcher_ = std::thread([this] { WatchPeer(); });
  dispatcher_ = std::thread([this] { DispatchReplies(); });
  return {};
}

size_t ShmClientPort::outstanding() const { return in_flight_.load(std::memory_order_relaxed); }

std::optional<uint32_t> ShmClientPort::TakeFreeSlot() noexcept {
  uint32_t index = 0;
  if (!free_slots_.TryPop([&index](FreeCell& c) noexcept { index = c.index; })) return std::nullopt;
  return index;
}

void ShmClientPort::ReturnSlot(uint32_t index) noexcept {
  // Room for every slot: the push cannot fail.
  (void)free_slots_.TryPush([index](FreeCell& c) noexcept { c.index = index; });
  if (room_waiters_.load(std::memory_order_relaxed) != 0) {
    std::lock_guard lock(room_mu_);
    room_cv_.notify_one();
  }
}

int ShmClientPort::WaitForSlot(const Message& msg, std::optional<uint32_t>& index) {
  if (full_ == FullPolicy::kFail) return EAGAIN;
  // The slow path: look again at least every millisecond, so a notification that
  // crossed the registration costs at most that.
  room_waiters_.fetch_add(1, std::memory_order_seq_cst);
  int error = 0;
  {
    std::unique_lock lock(room_mu_);
    while (!(index = TakeFreeSlot())) {
      if (dead_.load(std::memory_order_acquire)) {
        error = ECONNRESET;
        break;
      }
      const Deadline now = Clock::now();
      if (now >= msg.deadline) {
        error = ETIMEDOUT;
        break;
      }
      room_cv_.wait_until(lock, std::min<Deadline>(msg.deadline, now + std::chrono::milliseconds(1)));
    }
  }
  room_waiters_.fetch_sub(1, std::memory_order_relaxed);
  return error;
}

std::vector<MessagePtr> ShmClientPort::TakeAllPending() {
  std::vector<MessagePtr> taken;
  for (uint32_t i = 0; i < slot_count_; ++i) {
    const uint64_t id = slots_[i].owner.load(std::memory_order_seq_cst);
    if (id == 0) continue;
    if (MessagePtr m = TakePending(id)) taken.push_back(std::move(m));
  }
  return taken;
}

template <class Encode>
void ShmClientPort::Enqueue(MessagePtr msg, Encode&& encode) {
  int error = dead_.load(std::memory_order_acquire) ? ECONNRESET : 0;
  std::optional<uint32_t> index;
  if (error == 0 && !(index = TakeFreeSlot())) error = WaitForSlot(*msg, index);
  uint64_t id = 0;
  if (error == 0) {
    Slot& slot = slots_[*index];
    if (++slot.generation == 0) slot.generation = 1;  // id 0 is the hello
    id = (uint64_t{slot.generation} << 32) | *index;
    msg->token.store(id, std::memory_order_relaxed);
    // Descriptors go first, so they are there when the server reads the envelope.
    if (!msg->fds.empty()) {
      if (auto sent = fds_.Send(id, msg->fds); !sent) {
        error = sent.error().value == EPIPE ? ECONNRESET : sent.error().value;
      }
    }
    const auto fd_count = static_cast<uint16_t>(msg->fds.size());
    // The ring has a cell for every slot, so a push finds room unless a misbehaving
    // peer stopped taking requests. The message passes to its slot inside the push,
    // after it is encoded and before the cell is published.
    if (error == 0 && !segment_->requests.TryPush([&](Cell& c) {
          encode(c, *msg, id, fd_count);
          msg->fds.clear();  // they travelled; the server has its copies
          in_flight_.fetch_add(1, std::memory_order_relaxed);
          slot.msg = msg.release();
          slot.owner.store(id, std::memory_order_release);
        })) {
      error = EAGAIN;
    }
    if (error != 0) ReturnSlot(*index);
  }
  if (error != 0) {
    counters().refused.fetch_add(1, std::memory_order_relaxed);
    Reply(std::move(msg), error);
    return;
  }
  segment_->header->requests_ec.Notify();  // a full fence, then: is the server asleep?
  // The server may have died while we sent, after OnPeerDeath looked at our slot:
  // either it saw the slot taken, or (the fence above orders it) we see dead_.
  if (dead_.load(std::memory_order_relaxed)) {
    if (MessagePtr lost = TakePending(id)) Reply(std::move(lost), ECONNRESET);
  }
}

void ShmClientPort::Put(MessagePtr msg) {
  const uint32_t slot_bytes = segment_->slot_bytes();
  if (!shm::Fits(slot_bytes, msg->payload.size())) {
    counters().refused.fetch_add(1, std::memory_order_relaxed);
    Reply(std::move(msg), EMSGSIZE);
    return;
  }
  Enqueue(std::move(msg), [slot_bytes](Cell& c, const Message& m, uint64_t id, uint16_t fd_count) {
    // Fits (checked above); were it not so, an empty cell makes the server answer EBADMSG.
    if (!shm::EncodeCell(c, slot_bytes, m, id, 0, fd_count)) c.len = 0;
  });
}

void ShmClientPort::Drop(Message& msg) {
  const uint64_t id = msg.token.load(std::memory_order_relaxed);  // written when it was sent, by the sender
  const auto index = static_cast<uint32_t>(id & 0xffffffffu);
  if (id == 0 || index >= slot_count_ || dead_.load(std::memory_order_acquire)) return;
  if (slots_[index].owner.load(std::memory_order_acquire) != id) return;  // already answered
  if (answer_aborted_after_.count() > 0) {
    try {
      std::lock_guard lock(aborted_mu_);
      aborted_.emplace_back(id, Clock::now() + answer_aborted_after_);
    } catch (...) {
      // Out of memory: the server's answer is waited for, as without the option.
    }
  }
  Message abort(shm::kAbortCommand);
  abort.flags_.store(kMsgAborted, std::memory_order_relaxed);
  const uint32_t slot_bytes = segment_->slot_bytes();
  // An envelope without payload always fits (slot_bytes >= 128 was checked).
  if (segment_->requests.TryPush([&](Cell& c) noexcept { (void)shm::EncodeCell(c, slot_bytes, abort, id, 0, 0); })) {
    segment_->header->requests_ec.Notify();
  }
}

void ShmClientPort::PutRawForTest(MessagePtr msg, std::span<const std::byte> bytes, uint32_t claimed_len) {
  const uint32_t slot_bytes = segment_->slot_bytes();
  Enqueue(std::move(msg), [&](Cell& c, const Message&, uint64_t id, uint16_t) {
    shm::WriteRawCell(c, id, bytes, claimed_len, slot_bytes);
  });
}

MessagePtr ShmClientPort::TakePending(uint64_t id) noexcept {
  const auto index = static_cast<uint32_t>(id & 0xffffffffu);
  if (id == 0 || index >= slot_count_) return nullptr;
  Slot& slot = slots_[index];
  uint64_t expected = id;
  if (!slot.owner.compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) return nullptr;
  MessagePtr msg(std::exchange(slot.msg, nullptr));
  in_flight_.fetch_sub(1, std::memory_order_relaxed);
  ReturnSlot(index);
  return msg;
}

bool ShmClientPort::Drain() {
  bool delivered = false;
  const uint32_t slot_bytes = segment_->slot_bytes();
  for (;;) {
    MessagePtr msg;
    int error = 0;
    uint64_t id = 0;
    uint16_t fd_count = 0;
    std::string why;
    bool late = false;
    const bool popped = segment_->replies.TryPopSingleConsumer([&](Cell& c) noexcept {
      id = c.id;
      msg = TakePending(id);
      if (!msg) {  // a stale or forged id: nobody waits for it
        late = AnsweredHere(id);
        if (late) {
          auto d = shm::DecodeCell(c, slot_bytes, nullptr, &why);
          if (d) fd_count = d->fd_count;
        }
        return;
      }
      auto d = shm::DecodeCell(c, slot_bytes, &msg->payload, &why);
      if (!d) {
        error = d.error().value;
        return;
      }
      error = d->error;
      fd_count = d->fd_count;
    });
    if (!popped) break;
    if (!msg && late) {
      // Answered EINTR here already: dropped, with the descriptors it carried.
      if (fd_count != 0) (void)fds_.Take(id, fd_count, Clock::now() + shm::kFdWait);
      Logger("msgport")->debug("{}: the late reply to message id {:#x}, answered EINTR here, dropped", name(), id);
      continue;
    }
    if (!msg) {
      counters().bad_input.fetch_add(1, std::memory_order_relaxed);
      Logger("msgport")->warn("{}: reply for unknown message id {:#x} ignored", name(), id);
      continue;
    }
    if (!why.empty()) {
      counters().bad_input.fetch_add(1, std::memory_order_relaxed);
      Logger("msgport")->warn("{}: malformed reply (id {:#x}) refused: {}", name(), id, why);
    }
    if (fd_count != 0) {
      auto fds = fds_.Take(id, fd_count, Clock::now() + shm::kFdWait);
      if (fds) {
        msg->fds = std::move(*fds);
      } else {
        error = fds.error().value;
      }
    }
    counters().replied.fetch_add(1, std::memory_order_relaxed);
    delivered = true;
    Reply(std::move(msg), error);
  }
  return delivered;
}

bool ShmClientPort::Poll() {
  if (!segment_->replies.HasReady()) return false;
  std::unique_lock role(drain_mu_, std::try_to_lock);
  if (!role.owns_lock()) return false;
  return Drain();
}

void ShmClientPort::Helping(bool on) {
  if (on) {
    RenewLease(shm::NowNs());
  } else {
    EndLease();
  }
}

void ShmClientPort::RenewLease(int64_t now_ns) {
  auto& lease = segment_->header->reply_poll_until_ns;
  // Written at most once per half lease: the server reads this line after every reply.
  if (lease.load(std::memory_order_relaxed) < now_ns + shm::kLeaseNs / 2) {
    lease.store(now_ns + shm::kLeaseNs, std::memory_order_seq_cst);
  }
}

void ShmClientPort::EndLease() {
  auto& h = *segment_->header;
  if (h.reply_poll_until_ns.load(std::memory_order_relaxed) == 0) return;
  h.reply_poll_until_ns.store(0, std::memory_order_seq_cst);
  // A reply pushed while the server still saw the lease, and not yet drained, must not
  // be left without a thread to deliver it: wake the reply thread. (Either the server
  // sees the lease ended and wakes it, or this check sees the reply.)
  if (segment_->replies.HasReady()) h.replies_ec.NotifyAlways();
}

void ShmClientPort::WaitSync(SyncWaiter& waiter, Deadline deadline) {
  // Deliver replies ourselves while they come quickly (no futex on either side),
  // holding a lease that tells the server not to wake the reply thread; then sleep and
  // let the reply thread deliver.
  const Deadline now = Clock::now();
  const Deadline spin_end = std::min(deadline, now + kSpinTime);
  RenewLease(std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()).count());
  SpinPause pause;
  for (int i = 0; !waiter.Ready(); ++i) {
    if (!Poll()) pause();
    if ((i & 63) == 63 && Clock::now() >= spin_end) break;
  }
  // Keep the lease while nothing else is in flight: the next DoMsg of this thread
  // extends it without a write. Messages of others need the reply thread: end it.
  if (!waiter.Ready() || in_flight_.load(std::memory_order_relaxed) != 0) EndLease();
  if (!waiter.Ready()) waiter.Wait(deadline);
}

void ShmClientPort::DispatchReplies() noexcept {
  // Sleeps until the server announces a reply: one that nobody polls for. While a
  // lease runs the server does not announce; should the lease's holder stop polling
  // without ending it, the server sees the lease run out with its replies still
  // unread, and announces then (ShmServerPort::Serve).
  auto& ec = segment_->header->replies_ec;
  while (!stopping_.load(std::memory_order_acquire) && !dead_.load(std::memory_order_acquire)) {
    uint32_t key = ec.Prepare();
    if (segment_->replies.HasReady()) {
      ec.Cancel();
      std::lock_guard role(drain_mu_);
      Drain();
      continue;
    }
    ec.Wait(key, shm::kIdleSleep);
  }
}

void ShmClientPort::WatchPeer() noexcept {
  while (!stopping_.load(std::memory_order_acquire)) {
    auto r = fds_.Pump(std::chrono::milliseconds(100), pidfd_.get(), /*frames=*/false);
    if (r == FdChannel::PumpResult::kClosed || r == FdChannel::PumpResult::kExtraReady) {
      OnPeerDeath();
      return;
    }
    if (answer_aborted_after_.count() > 0) AnswerOverdueAborts();
  }
}

void ShmClientPort::AnswerOverdueAborts() noexcept {
  std::vector<uint64_t> due;
  try {
    std::lock_guard lock(aborted_mu_);
    if (aborted_.empty()) return;
    const Deadline now = Clock::now();
    std::erase_if(aborted_, [&](const auto& a) {
      if (a.second > now) return false;
      due.push_back(a.first);
      return true;
    });
  } catch (...) {
    return;  // out of memory: tried again in 100 ms
  }
  for (uint64_t id : due) {
    // Noted before it is taken: its late reply may be drained the moment it is.
    try {
      std::lock_guard lock(aborted_mu_);
      // A server that never answers leaves its ids here: at most a few thousand.
      if (answered_here_.size() >= 4096) answered_here_.erase(answered_here_.begin());
      answered_here_.push_back(id);
    } catch (...) {
      // Its late reply, if it comes, is then counted as bad input.
    }
    MessagePtr msg = TakePending(id);
    if (!msg) {  // answered meanwhile
      (void)AnsweredHere(id);
      continue;
    }
    counters().refused.fetch_add(1, std::memory_order_relaxed);
    Logger("msgport")->warn("{}: an aborted message (id {:#x}) had no answer from the server after {} ms: answered EINTR",
                            name(), id, answer_aborted_after_.count());
    Reply(std::move(msg), EINTR);
  }
}

bool ShmClientPort::AnsweredHere(uint64_t id) noexcept {
  std::lock_guard lock(aborted_mu_);
  auto it = std::find(answered_here_.begin(), answered_here_.end(), id);
  if (it == answered_here_.end()) return false;
  answered_here_.erase(it);
  return true;
}

void ShmClientPort::OnPeerDeath() noexcept {
  dead_.store(true, std::memory_order_seq_cst);  // before looking at the slots: see Enqueue
  segment_->header->replies_ec.NotifyAlways();  // the reply thread exits
  size_t lost_count = 0;
  try {
    {
      // Replies the server finished before it died are real answers: deliver them.
      std::lock_guard role(drain_mu_);
      Drain();
    }
    std::vector<MessagePtr> lost = TakeAllPending();
    lost_count = lost.size();
    for (auto& m : lost) {
      counters().refused.fetch_add(1, std::memory_order_relaxed);
      Reply(std::move(m), ECONNRESET);
    }
  } catch (const std::exception& e) {
    Logger("msgport")->error("{}: while failing outstanding messages: {}", name(), e.what());
  }
  // A server stopped on purpose leaves nothing outstanding; one that died says so
  // through whoever supervises it.
  if (lost_count > 0) {
    Logger("msgport")->warn("{}: server gone; {} outstanding message(s) replied ECONNRESET", name(), lost_count);
  } else {
    Logger("msgport")->debug("{}: server gone; nothing was outstanding", name());
  }
}

// --- server -----------------------------------------------------------------------

Result<std::unique_ptr<ShmServerPort>> ShmServerPort::Attach(const std::string& segment_name, UniqueFd socket) {
  auto segment = shm::OpenSegment(segment_name);
  if (!segment) return std::unexpected(segment.error());
  std::unique_ptr<ShmServerPort> port(new ShmServerPort(std::move(*segment), std::move(socket)));
  if (auto hello = port->fds_.Send(0, {}); !hello) return std::unexpected(hello.error());
  return port;
}

ShmServerPort::ShmServerPort(std::unique_ptr<shm::Segment> segment, UniqueFd socket)
    : Port("shm-server:" + std::string(segment->object.get_name())),
      segment_(std::move(segment)),
      fds_(std::move(socket)),
      slot_count_(segment_->requests.capacity()),
      in_service_(std::make_unique<std::atomic<Message*>[]>(slot_count_)),
      spare_(2 * slot_count_ + 2) {}

ShmServerPort::~ShmServerPort() = default;

void ShmServerPort::Stop() noexcept {
  stop_.store(true, std::memory_order_release);
  segment_->header->requests_ec.NotifyAlways();
}

void ShmServerPort::Put(MessagePtr msg) {
  counters().refused.fetch_add(1, std::memory_order_relaxed);
  Reply(std::move(msg), EINVAL);
}

bool ShmServerPort::ServeOne(Server& server, std::atomic<int64_t>& busy_since) {
  if (!segment_->requests.HasReady()) return false;
  std::unique_lock take(take_mu_);
  // Everything that may throw happens before the pop: a cell taken and never
  // released would stall the ring.
  MessagePtr msg = spare_.TryPopQuiet();  // a replied message, kept with its buffer
  if (!msg) msg = Message::Make();
  shm::Decoded decoded;
  int decode_error = 0;
  uint64_t cell_id = 0;
  std::string why;
  const uint32_t slot_bytes = segment_->slot_bytes();
  const bool popped = segment_->requests.TryPopSingleConsumer([&](Cell& c) noexcept {
    cell_id = c.id;
    auto d = shm::DecodeCell(c, slot_bytes, &msg->payload, &why);
    if (d) {
      decoded = *d;
    } else {
      decode_error = d.error().value;
    }
  });
  if (!popped) {
    Recycle(std::move(msg));
    return false;
  }
  counters().put.fetch_add(1, std::memory_order_relaxed);
  msg->token.store(cell_id, std::memory_order_relaxed);
  msg->reply_port = this;
  msg->target_port.store(this, std::memory_order_relaxed);
  msg->error = 0;
  msg->deadline = kNoDeadline;
  msg->fds.clear();
  msg->flags_.store(0, std::memory_order_release);  // in flight: it must be replied
  if (decode_error != 0) {
    counters().bad_input.fetch_add(1, std::memory_order_relaxed);
    Logger("msgport")->warn("{}: malformed request (id {:#x}) refused: {}", name(), cell_id, why);
    Reply(std::move(msg), decode_error);
    return true;
  }
  if (decoded.command == shm::kAbortCommand) {
    MarkAborted(cell_id);
    Recycle(std::move(msg));  // no message, no reply
    return true;
  }
  msg->command = decoded.command;
  if (decoded.flags & kMsgAborted) msg->flags_.fetch_or(kMsgAborted, std::memory_order_relaxed);
  if (decoded.deadline_ns != 0) msg->deadline = Deadline(std::chrono::nanoseconds(decoded.deadline_ns));
  if (decoded.fd_count != 0) {
    auto fds = fds_.Take(cell_id, decoded.fd_count, Clock::now() + shm::kFdWait);
    if (!fds) {
      counters().bad_input.fetch_add(1, std::memory_order_relaxed);
      Reply(std::move(msg), fds.error().value == ETIMEDOUT ? EBADMSG : fds.error().value);
      return true;
    }
    msg->fds = std::move(*fds);
  }
  const size_t slot = cell_id & 0xffffffffu;
  if (slot < slot_count_) in_service_[slot].store(msg.get(), std::memory_order_release);
  take.unlock();
  if (serving_count_ == 1) {  // no helpers: nobody looks at busy_since
    server.Serve(std::move(msg));
    return true;
  }
  busy_since.store(shm::NowNs(), std::memory_order_relaxed);
  watchdog_->Wake();
  server.Serve(std::move(msg));
  busy_since.store(0, std::memory_order_relaxed);
  return true;
}

void ShmServerPort::MarkAborted(uint64_t id) noexcept {
  const size_t slot = id & 0xffffffffu;
  if (slot >= slot_count_) return;
  // The message may be being replied on another thread right now; replied messages
  // are pooled, never freed, while the port lives (see spare_), and are reused only
  // under take_mu_, which the caller holds: the worst is a mark on a message just
  // replied, which its next use clears.
  Message* m = in_service_[slot].load(std::memory_order_acquire);
  if (m != nullptr && m->token.load(std::memory_order_relaxed) == id) m->flags_.fetch_or(kMsgAborted, std::memory_order_acq_rel);
}

void ShmServerPort::Serve(Server& server, size_t max_helpers, std::chrono::nanoseconds takeover) {
  serving_count_ = 1 + max_helpers;
  takeover_ = takeover;
  serving_ = std::make_unique<Serving[]>(serving_count_);
  if (max_helpers > 0) {
    watchdog_.emplace(takeover, [this, &server] { return CheckHeldUp(server); });
    if (!watchdog_->Start()) {
      Logger("msgport")->warn("{}: cannot start the watchdog; a request held up in the server stalls the others", name());
      serving_count_ = 1;
    }
  }
  auto& h = *segment_->header;
  std::atomic<int64_t>& busy_since = serving_[0].busy_since;
  while (!stop_.load(std::memory_order_acquire)) {
    if (ServeOne(server, busy_since)) continue;
    const Deadline spin_end = Clock::now() + kSpinTime;
    bool got = false;
    SpinPause pause;
    for (int i = 0; !got; ++i) {
      got = segment_->requests.HasReady() || stop_.load(std::memory_order_relaxed);
      pause();
      // Past the pure spins every pause is a yield, and with the CPUs busy each can
      // take a timeslice: replies left unread by a lease that ran out are then looked
      // for after every yield, not every 64th (which, with two busy processes on this
      // 2-vCPU machine, announced them 90 ms late instead of 8).
      if ((i & 63) == 63) {
        AnnounceUnreadReplies();
        if (Clock::now() >= spin_end) break;
      } else if (pause.yielding()) {
        AnnounceIfLeaseRanOut();
      }
    }
    if (got) continue;
    uint32_t key = h.requests_ec.Prepare();
    if (segment_->requests.HasReady() || stop_.load(std::memory_order_acquire)) {
      h.requests_ec.Cancel();
      continue;
    }
    h.requests_ec.Wait(key, AnnounceUnreadReplies());
    // Idle: is the client still there? (Reads any descriptor frames into the stash.)
    if (!segment_->requests.HasReady() &&
        fds_.Pump(std::chrono::milliseconds(0)) == FdChannel::PumpResult::kClosed) {
      Logger("msgport")->info("{}: client gone, serving stops", name());
      break;
    }
  }
  if (!watchdog_) return;
  watchdog_.reset();  // stopped: it starts no helper now
  // Helpers stop too (a helper inside a request finishes it first).
  stop_.store(true, std::memory_order_release);
  h.requests_ec.NotifyAlways();
  for (size_t i = 1; i < serving_count_; ++i) {
    if (serving_[i].thread.joinable()) serving_[i].thread.join();
  }
}

void ShmServerPort::Help(Server& server, size_t slot) {
  auto& ec = segment_->header->requests_ec;
  Serving& me = serving_[slot];
  // Needed no more once a thread started before this one is free: then it serves
  // what comes (a free thread spins or sleeps on the ring, as this one would).
  auto earlier_free = [&] {
    for (size_t i = 0; i < slot; ++i) {
      if ((i == 0 || serving_[i].running.load(std::memory_order_acquire)) &&
          serving_[i].busy_since.load(std::memory_order_relaxed) == 0)
        return true;
    }
    return false;
  };
  while (!stop_.load(std::memory_order_acquire)) {
    if (ServeOne(server, me.busy_since)) continue;
    if (earlier_free()) break;
    const uint32_t key = ec.Prepare();
    if (segment_->requests.HasReady() || stop_.load(std::memory_order_acquire)) {
      ec.Cancel();
      continue;
    }
    ec.Wait(key, takeover_);
  }
  me.running.store(false, std::memory_order_release);
}

bool ShmServerPort::CheckHeldUp(Server& server) {
  // Held up: every thread serving is inside a request begun at least takeover_ ago.
  const int64_t now = shm::NowNs();
  bool any_busy = false, all_held = true;
  for (size_t i = 0; i < serving_count_; ++i) {
    if (i > 0 && !serving_[i].running.load(std::memory_order_acquire)) continue;
    const int64_t since = serving_[i].busy_since.load(std::memory_order_relaxed);
    any_busy = any_busy || since != 0;
    if (since == 0 || now - since < takeover_.count()) all_held = false;
  }
  if (!any_busy) return false;
  if (!all_held || !segment_->requests.HasReady()) return true;
  for (size_t i = 1; i < serving_count_; ++i) {
    Serving& s = serving_[i];
    if (s.running.load(std::memory_order_acquire)) continue;
    if (s.thread.joinable()) s.thread.join();  // one that left
    s.busy_since.store(0, std::memory_order_relaxed);
    s.running.store(true, std::memory_order_release);
    try {
      s.thread = std::thread([this, &server, i] { Help(server, i); });
      Logger("msgport")->debug("{}: every serving thread is held up; helper {} serves", name(), i);
    } catch (const std::system_error&) {
      s.running.store(false, std::memory_order_release);
      Logger("msgport")->warn("{}: cannot start a helper thread", name());
    }
    break;
  }
  return true;
}

std::chrono::nanoseconds ShmServerPort::AnnounceUnreadReplies() noexcept {
  // Replies pushed while the client's lease ran were not announced. If they are still
  // unread and the lease has run out, its holder stopped polling: wake the client's
  // reply thread. While the lease still runs, sleep no longer than it does.
  if (segment_->replies.Depth() == 0) return shm::kIdleSleep;
  const int64_t left = LeaseLeftNs();
  if (left == 0) {
    segment_->header->replies_ec.Notify();
    return shm::kIdleSleep;
  }
  return std::min<std::chrono::nanoseconds>(shm::kIdleSleep, std::chrono::nanoseconds(left));
}

void ShmServerPort::AnnounceIfLeaseRanOut() noexcept {
  // A lease of 0 was never taken or was ended, and its replies were announced when
  // pushed (or by EndLease). A lease is given one lease's grace past its end here:
  // announcing the moment it ends woke the client's reply thread while its helper was
  // still about to renew, and cost 10% of the port's throughput through a ReplyQueue
  // (ulsp-msgport-bench --only shm-throughput: 3.52-3.58 against 3.90-4.03 M msg/s).
  const int64_t lease = segment_->header->reply_poll_until_ns.load(std::memory_order_acquire);
  if (lease == 0 || lease + shm::kLeaseNs > shm::NowNs()) return;
  if (segment_->replies.Depth() != 0) segment_->header->replies_ec.Notify();
}

int64_t ShmServerPort::LeaseLeftNs() const noexcept {
  const int64_t lease = segment_->header->reply_poll_until_ns.load(std::memory_order_acquire);
  if (lease == 0) return 0;
  const int64_t now = shm::NowNs();
  return lease > now ? lease - now : 0;
}

template <class Encode>
void ShmServerPort::PushReply(Encode&& encode) {
  // The client keeps at most one message per cell in flight, so room comes unless it
  // misbehaves or is gone: then the reply is dropped, not waited for forever.
  for (int i = 0; !segment_->replies.TryPush(encode); ++i) {
    if (fds_.closed() || i > 1'000'000) return;
    if (i > 1000) std::this_thread::yield();
  }
  std::atomic_thread_fence(std::memory_order_seq_cst);  // the push before the lease read
  if (LeaseLeftNs() == 0) segment_->header->replies_ec.NotifyFenced();
}

void ShmServerPort::PutReply(MessagePtr msg) {
  const uint64_t id = msg->token.load(std::memory_order_relaxed);
  counters().replied.fetch_add(1, std::memory_order_relaxed);
  int error = msg->error;
  if (!msg->fds.empty()) {
    if (auto sent = fds_.Send(id, msg->fds); !sent) {
      error = EIO;
      msg->fds.clear();
    }
  }
  const auto fd_count = static_cast<uint16_t>(msg->fds.size());
  const uint32_t slot_bytes = segment_->slot_bytes();
  PushReply([&](Cell& c) {
    if (shm::EncodeCell(c, slot_bytes, *msg, id, error, fd_count)) return;
    // Too large for a cell: the answer becomes EMSGSIZE, without payload.
    msg->payload.clear();
    if (fd_count != 0) fds_.Discard(id);
    (void)shm::EncodeCell(c, slot_bytes, *msg, id, EMSGSIZE, 0);
  });
  Recycle(std::move(msg));
}

void ShmServerPort::Recycle(MessagePtr msg) noexcept {
  // Out of service first: an abort for its id must no longer find it.
  if (const size_t slot = msg->token.load(std::memory_order_relaxed) & 0xffffffffu; slot < slot_count_) {
    Message* expected = msg.get();
    in_service_[slot].compare_exchange_strong(expected, nullptr, std::memory_order_acq_rel);
  }
  // Kept with (up to a size) its payload's capacity for the next request. With no
  // reply port, it is simply deleted when the pool goes with the port.
  msg->reply_port = nullptr;
  msg->fds.clear();
  if (msg->payload.capacity() > kMaxSparePayload) std::vector<std::byte>().swap(msg->payload);
  (void)spare_.TryPushQuiet(msg);  // room for all: see spare_
}

void ShmServerPort::ScribbleForTest() noexcept {
  auto& h = *segment_->header;
  h.slot_bytes = 1u << 30;
  h.slots = 3;
  h.requests.tail.store(0x5eed5eed5eed5eedULL, std::memory_order_relaxed);
}

void ShmServerPort::ReplyRawForTest(MessagePtr msg, std::span<const std::byte> bytes, uint32_t claimed_len) {
  const uint64_t id = msg->token.load(std::memory_order_relaxed);
  const uint32_t slot_bytes = segment_->slot_bytes();
  msg->flags_.fetch_or(kMsgReplied | kMsgDone, std::memory_order_acq_rel);  // answered by hand below
  Recycle(std::move(msg));
  PushReply([&](Cell& c) { shm::WriteRawCell(c, id, bytes, claimed_len, slot_bytes); });
}

}  // namespace ulsp::msgport
