#include "kernel/msgport/fuse_uring.h"

#include <fuse3/fuse_lowlevel.h>
#include <liburing.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <string>
#include <system_error>

#include "kernel/msgport/event_count.h"
#include "kernel/msgport/fuse_loop.h"
#include "kernel/msgport/log.h"
#include "kernel/msgport/port.h"
#include "kernel/msgport/unique_fd.h"

namespace ulsp::msgport {

// --- the kernel's FUSE-over-io_uring ABI (protocol 7.42, Linux 6.14; Debian 12's
// headers predate it).
namespace kabi {
struct InHeader {  // struct fuse_in_header
  uint32_t len;
  uint32_t opcode;
  uint64_t unique;
  uint64_t nodeid;
  uint32_t uid, gid, pid;
  uint16_t total_extlen;
  uint16_t padding;
};
struct OutHeader {  // struct fuse_out_header
  uint32_t len;
  int32_t error;
  uint64_t unique;
};
struct EntInOut {  // struct fuse_uring_ent_in_out
  uint64_t flags;
  uint64_t commit_id;    // the request's unique, echoed by the commit
  uint32_t payload_sz;   // bytes used in the payload buffer, either way
  uint32_t padding;
  uint64_t reserved;
};
constexpr size_t kOpInSize = 128;
struct ReqHeader {  // struct fuse_uring_req_header: iov[0] of a registration
  char in_out[128];     // fuse_in_header on delivery, fuse_out_header on commit
  char op_in[kOpInSize];  // the request's first argument (its fixed struct), if any
  EntInOut ent;
};
struct CmdReq {  // struct fuse_uring_cmd_req, in the SQE's 80-byte command area
  uint64_t flags;
  uint64_t commit_id;
  uint16_t qid;
  uint8_t padding[6];
};
constexpr uint32_t kRegister = 1;        // FUSE_IO_URING_CMD_REGISTER
constexpr uint32_t kCommitAndFetch = 2;  // FUSE_IO_URING_CMD_COMMIT_AND_FETCH
constexpr uint32_t kMinReadBuffer = 8192;  // FUSE_MIN_READ_BUFFER
}  // namespace kabi

namespace {

constexpr size_t kPage = 4096;
// The largest payload: libfuse 3.14 caps max_write at its 1 MiB buffer, and asks for
// as many pages (the kernel wants each entry's payload to hold that much).
constexpr size_t kPayload = size_t{256} * kPage;
// Room before the payload, where a request is reassembled for libfuse: its header and
// first argument go right before its payload, so the payload is never copied.
constexpr size_t kRoom = kPage;
static_assert(kRoom >= sizeof(kabi::InHeader) + kabi::kOpInSize);
constexpr uint64_t kWakeTag = ~uint64_t{0};
constexpr int64_t kTaken = -1;  // a worker's busy_since once the watchdog took its queue

int64_t NowNs() noexcept {
  struct timespec ts {};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// The number of possible CPUs (the kernel makes a queue for each, and uses the ring
// only once all have registered): the highest CPU in /sys/.../possible, plus one.
unsigned PossibleCpus() {
  std::ifstream in("/sys/devices/system/cpu/possible");
  std::string s;
  if (!(in >> s) || s.empty()) return 0;
  const size_t cut = s.find_last_of("-,");
  try {
    return static_cast<unsigned>(std::stoul(cut == std::string::npos ? s : s.substr(cut + 1))) + 1;
  } catch (...) {
    return 0;
  }
}

void* MapAnonymous(size_t size) noexcept {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

}  // namespace

struct FuseUring::Entry {
  unsigned index = 0;
  kabi::ReqHeader* header = nullptr;  // a page of its own
  char* block = nullptr;              // kRoom, then the payload
  char* payload = nullptr;
  iovec iov[2]{};
  uint64_t commit_id = 0;
  uint32_t last_cmd = 0;
  std::atomic<uint64_t> unique{0};  // the request it holds in this process, 0 if none
};

namespace {
bool MapBuffers(FuseUring::Entry& e) noexcept;
}  // namespace

struct FuseUring::Worker {
  std::atomic<int64_t> busy_since{0};  // when its request began; 0 idle; kTaken
  std::thread thread;
};

struct FuseUring::Queue {
  unsigned qid = 0;
  io_uring ring{};
  bool ring_ok = false;
  UniqueFd wake;  // eventfd: the destructor's knock
  std::mutex sq_mu;  // guards the submission queue and `pending`
  std::vector<unsigned> pending;  // entries answered by other threads, to commit
  // Room for `max_batches` batches of entries; the first `used` are registered (a
  // batch each time a thread takes the lead: the kernel delivers a request in the
  // context of the thread that handed it the entry, so the entries a stuck thread
  // committed last are of no use until it is free).
  std::unique_ptr<Entry[]> entries;
  unsigned capacity = 0;
  std::atomic<unsigned> used{0};
  unsigned dead = 0;  // entries the kernel ended (leader only)
  bool full_warned = false;  // under sq_mu
  // Guarded by FuseUring::mu_:
  std::condition_variable cv;  // spares wait for the lead
  Worker* leader = nullptr;
  unsigned spares = 0;
  bool ended = false;
  bool registered = false;
  std::vector<std::unique_ptr<Worker>> workers;
};

namespace {
bool MapBuffers(FuseUring::Entry& e) noexcept {
  if (e.header == nullptr) e.header = static_cast<kabi::ReqHeader*>(MapAnonymous(kPage));
  if (e.block == nullptr) e.block = static_cast<char*>(MapAnonymous(kRoom + kPayload));
  if (e.header == nullptr || e.block == nullptr) return false;
  e.payload = e.block + kRoom;
  e.iov[0] = {e.header, sizeof(kabi::ReqHeader)};
  e.iov[1] = {e.payload, kPayload};
  return true;
}

// The queue whose completion this thread is handling now: a reply made inline only
// queues its commit, which the thread submits before it waits again. And the entry
// (looked at first by Reply, which otherwise searches every entry).
thread_local const void* tl_handling = nullptr;
thread_local FuseUring::Entry* tl_entry = nullptr;
}  // namespace

bool FuseUring::KernelOffers() noexcept {
  std::ifstream in("/sys/module/fuse/parameters/enable_uring");
  char c = 0;
  return static_cast<bool>(in >> c) && (c == 'Y' || c == '1');
}

FuseUring::FuseUring(fuse_session* session, Options options) : session_(session), options_(options) {}

Result<std::unique_ptr<FuseUring>> FuseUring::Create(fuse_session* session, Options options) {
  std::unique_ptr<FuseUring> u(new FuseUring(session, options));
  u->fuse_fd_ = fuse_session_fd(session);
  const unsigned cpus = PossibleCpus();
  if (cpus == 0 || options.depth == 0) return Fail(EINVAL);
  for (unsigned qid = 0; qid < cpus; ++qid) {
    auto q = std::make_unique<Queue>();
    q->qid = qid;
    q->capacity = options.depth * std::max(1u, options.max_batches);
    q->wake.Reset(::eventfd(0, EFD_CLOEXEC));
    if (!q->wake) return Fail(errno);
    io_uring_params params{};
    params.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;  // the command needs 128-byte SQEs
    params.cq_entries = 2 * (q->capacity + 2);
    if (const int rc = io_uring_queue_init_params(q->capacity + 2, &q->ring, &params); rc < 0) return Fail(-rc);
    q->ring_ok = true;
    q->entries = std::make_unique<Entry[]>(q->capacity);
    for (unsigned i = 0; i < q->capacity; ++i) q->entries[i].index = i;
    // The first batch's buffers now, so that starting cannot run out of memory.
    for (unsigned i = 0; i < options.depth; ++i)
      if (!MapBuffers(q->entries[i])) return Fail(ENOMEM);
    u->queues_.push_back(std::move(q));
  }
  return u;
}

FuseUring::~FuseUring() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  stop_.store(true);
  for (auto& q : queues_) {
    const uint64_t one = 1;
    if (q->wake) (void)!::write(q->wake.get(), &one, sizeof one);
    q->cv.notify_all();
  }
  watchdog_.Stop();
  // A thread still inside a request (blocked in the layer) is given two seconds.
  for (int i = 0; i < 2000 && running_.load() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  bool left_behind = false;
  {
    std::lock_guard lock(mu_);
    for (auto& q : queues_) {
      for (auto& w : q->workers) {
        if (!w->thread.joinable()) continue;
        if (running_.load() == 0) {
          w->thread.join();
        } else {
          w->thread.detach();
          left_behind = true;
        }
      }
    }
  }
  if (left_behind) {
    // Its reply may still come: the rings and buffers stay for it.
    Logger("fuse")->warn("io_uring: a request is still being served at exit; leaving its thread behind");
    for (auto& q : queues_) (void)q.release();
    return;
  }
  for (auto& q : queues_) {
    // Closing the ring cancels the entries the kernel holds.
    if (q->ring_ok) io_uring_queue_exit(&q->ring);
    if (!q->entries) continue;
    for (unsigned i = 0; i < q->capacity; ++i) {
      if (q->entries[i].header != nullptr) ::munmap(q->entries[i].header, kPage);
      if (q->entries[i].block != nullptr) ::munmap(q->entries[i].block, kRoom + kPayload);
    }
  }
}

void FuseUring::Start(uint32_t max_write, uint32_t max_pages) {
  // What the kernel will want of each payload buffer (fuse_uring_create).
  const size_t wanted = std::max<size_t>({kabi::kMinReadBuffer, max_write, size_t{max_pages == 0 ? 32u : max_pages} * kPage});
  if (wanted > kPayload)
    Logger("fuse")->warn("io_uring: requests of {} bytes exceed the {}-byte buffers; the kernel will keep /dev/fuse",
                         wanted, kPayload);
  std::lock_guard lock(mu_);
  for (auto& q : queues_) {
    if (!StartWorker(*q)) {
      // The kernel now waits for every queue to register: a queue without a thread
      // would stall the mount. A refused registration sends it back to /dev/fuse.
      Logger("fuse")->error("io_uring: cannot start a thread for queue {}; the kernel keeps /dev/fuse", q->qid);
      Refuse(*q);
    }
  }
  if (!watchdog_.Start()) {
    Logger("fuse")->warn("io_uring: cannot start the watchdog; a blocked request stalls its CPU's queue");
  }
  Logger("fuse")->info("io_uring: {} queues of {} entries", queues_.size(), options_.depth);
}

bool FuseUring::StartWorker(Queue& q) noexcept try {
  q.workers.push_back(std::make_unique<Worker>());
  Worker* w = q.workers.back().get();
  running_.fetch_add(1);
  try {
    w->thread = std::thread([this, &q, w] { Work(q, *w); });
  } catch (...) {
    running_.fetch_sub(1);
    q.workers.pop_back();
    return false;
  }
  return true;
} catch (...) {
  return false;
}

void FuseUring::Refuse(Queue& q) noexcept {
  // The kernel checks a registration's iovec count first: -EINVAL, and it turns
  // io_uring off for the connection and wakes the requests waiting for the rings.
  std::lock_guard lock(q.sq_mu);
  if (io_uring_sqe* sqe = io_uring_get_sqe(&q.ring)) {
    std::memset(sqe, 0, 2 * sizeof(io_uring_sqe));
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fuse_fd_;
    sqe->cmd_op = kabi::kRegister;
    io_uring_sqe_set_data64(sqe, kWakeTag - 1);
    io_uring_submit(&q.ring);
  }
}

void FuseUring::Work(Queue& q, Worker& me) {
  // The thread serves the programs on its CPU; if the CPU is not there (offline, or
  // outside this process's set), the scheduler places it.
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(q.qid, &set);
  (void)::sched_setaffinity(0, sizeof set, &set);
  std::unique_lock lock(mu_);
  for (;;) {
    ++q.spares;
    q.cv.wait(lock, [&] { return stopping_ || q.ended || q.leader == nullptr; });
    --q.spares;
    if (stopping_ || q.ended) break;
    q.leader = &me;
    const bool first = !q.registered;
    q.registered = true;
    lock.unlock();
    // A fresh batch for each lead: after a takeover, the entries the kernel would
    // use first are the stuck thread's (it committed them), and a request put on one
    // waits until that thread is free.
    bool more = Register(q, first);
    if (!more && first) Refuse(q);
    if (more) more = Lead(q, me);
    lock.lock();
    if (!more) {
      q.ended = true;
      q.cv.notify_all();
      break;
    }
  }
  lock.unlock();
  running_.fetch_sub(1);
}

void FuseUring::PrepCommand(io_uring_sqe* sqe, const Queue& q, Entry& e, uint32_t op) const noexcept {
  std::memset(sqe, 0, 2 * sizeof(io_uring_sqe));  // a 128-byte slot
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = fuse_fd_;
  sqe->cmd_op = op;
  if (op == kabi::kRegister) {
    sqe->addr = reinterpret_cast<uint64_t>(e.iov);
    sqe->len = 2;
  }
  kabi::CmdReq req{};
  req.qid = static_cast<uint16_t>(q.qid);
  req.commit_id = op == kabi::kCommitAndFetch ? e.commit_id : 0;
  std::memcpy(sqe->cmd, &req, sizeof req);
  io_uring_sqe_set_data64(sqe, e.index);
  e.last_cmd = op;
}

bool FuseUring::Register(Queue& q, bool first) {
  std::lock_guard lock(q.sq_mu);
  const unsigned begin = q.used.load(std::memory_order_relaxed);
  const unsigned last = std::min(q.capacity, begin + options_.depth);
  if (begin == last) {  // no room for another batch: the old ones serve
    if (!q.full_warned)
      Logger("fuse")->warn("io_uring: queue {} has registered its {} entries; from now on a request may wait "
                           "for a thread stuck in another",
                           q.qid, q.capacity);
    q.full_warned = true;
    return !first;
  }
  // Buffers first: the batch is the entries that have them. And `used` covers the
  // batch before any of it is submitted, or a request delivered on an entry beyond
  // it would be taken for a stray completion and never answered.
  unsigned end = begin;
  while (end < last && MapBuffers(q.entries[end])) ++end;
  if (end < last) Logger("fuse")->warn("io_uring: no memory for more entries on queue {}", q.qid);
  if (end == begin) return !first;
  q.used.store(end, std::memory_order_release);
  for (unsigned i = begin; i < end; ++i) {
    io_uring_sqe* sqe = io_uring_get_sqe(&q.ring);
    if (sqe == nullptr) {
      io_uring_submit(&q.ring);
      sqe = io_uring_get_sqe(&q.ring);
    }
    if (sqe == nullptr) return false;  // cannot happen: the ring has a slot per entry
    PrepCommand(sqe, q, q.entries[i], kabi::kRegister);
  }
  if (first) {
    io_uring_sqe* sqe = io_uring_get_sqe(&q.ring);
    if (sqe == nullptr) return false;
    io_uring_prep_poll_add(sqe, q.wake.get(), POLLIN);
    io_uring_sqe_set_data64(sqe, kWakeTag);
  }
  const int rc = io_uring_submit(&q.ring);
  if (rc < 0) {
    Logger("fuse")->error("io_uring: registering on queue {} failed: {}", q.qid, Errno(-rc).Describe());
    return false;
  }
  return true;
}

bool FuseUring::Lead(Queue& q, Worker& me) {
  for (;;) {
    {
      std::lock_guard lock(q.sq_mu);
      io_uring_submit(&q.ring);  // commits made inline, queued by Commit
    }
    io_uring_cqe* cqe = nullptr;
    const int rc = io_uring_wait_cqe(&q.ring, &cqe);
    if (rc == -EINTR || rc == -EAGAIN) continue;
    if (rc < 0) {
      Logger("fuse")->error("io_uring: waiting on queue {} failed: {}", q.qid, Errno(-rc).Describe());
      return false;
    }
    const uint64_t tag = io_uring_cqe_get_data64(cqe);
    const int res = cqe->res;
    io_uring_cqe_seen(&q.ring, cqe);
    if (tag == kWakeTag) {
      if (stop_.load()) return false;
      uint64_t count;
      (void)!::read(q.wake.get(), &count, sizeof count);
      std::lock_guard lock(q.sq_mu);
      for (unsigned i : q.pending) PrepCommit(q, q.entries[i]);
      q.pending.clear();
      if (io_uring_sqe* sqe = io_uring_get_sqe(&q.ring)) {  // the knock again
        io_uring_prep_poll_add(sqe, q.wake.get(), POLLIN);
        io_uring_sqe_set_data64(sqe, kWakeTag);
      }
      continue;
    }
    if (tag >= q.used.load(std::memory_order_relaxed)) continue;  // Refuse's registration
    Entry& e = q.entries[tag];
    if (res < 0) {
      if (res == -EINTR || res == -EAGAIN) {  // not taken: again
        std::lock_guard lock(q.sq_mu);
        if (io_uring_sqe* sqe = io_uring_get_sqe(&q.ring)) PrepCommand(sqe, q, e, e.last_cmd);
        continue;
      }
      // ENOTCONN: the connection ended (unmount). Anything else: the kernel refused
      // this transport, and goes on with /dev/fuse.
      if (res != -ENOTCONN && res != -ECANCELED && q.dead == 0)
        Logger("fuse")->warn("io_uring: queue {} refused by the kernel ({}); requests come through /dev/fuse", q.qid,
                             Errno(-res).Describe());
      if (++q.dead == q.used.load(std::memory_order_relaxed)) return false;
      continue;
    }
    // Release: a watchdog that takes the queue over (reading this with its CAS) hands
    // the completion ring, as this thread left it, to the spare.
    me.busy_since.store(NowNs(), std::memory_order_release);
    watchdog_.Wake();
    tl_handling = &q;
    tl_entry = &e;
    Handle(q, e);
    if (options_.helped != nullptr && e.unique.load(std::memory_order_acquire) != 0) HelpWith(e);
    tl_handling = nullptr;
    tl_entry = nullptr;
    if (me.busy_since.exchange(0) == kTaken) {
      // The watchdog gave the queue to a spare while this request blocked.
      std::lock_guard lock(q.sq_mu);
      io_uring_submit(&q.ring);
      return true;
    }
  }
}

void FuseUring::HelpWith(const Entry& e) noexcept {
  // The request went to a server in another process, which answers in microseconds
  // while it is busy: this thread polls for the answer and delivers it itself, so the
  // answer needs no thread woken on another CPU, and the program that waits on this
  // CPU is woken by a thread on it.
  Port& port = *options_.helped;
  port.Helping(true);
  const int64_t until = NowNs() + options_.help_spin.count();
  unsigned spins = 0;
  while (e.unique.load(std::memory_order_acquire) != 0) {
    if (port.Poll()) continue;
    CpuRelax();
    if (++spins % 64 == 0) {
      if (NowNs() >= until) break;
      port.Helping(true);  // renews the lease
    }
  }
  port.Helping(false);
}

void FuseUring::Handle(Queue& q, Entry& e) {
  // The thread that answered this entry's last request wrote its buffers and its
  // commit, all before it submitted under sq_mu; the kernel delivered this request
  // only after that submission. Taking sq_mu makes that order visible to this thread
  // (and to ThreadSanitizer, which does not see the kernel's part).
  { std::lock_guard fence(q.sq_mu); }
  kabi::InHeader in;
  std::memcpy(&in, e.header->in_out, sizeof in);
  const uint32_t payload = e.header->ent.payload_sz;
  e.commit_id = e.header->ent.commit_id;
  // The kernel put the first argument in op_in and the rest in the payload; libfuse
  // wants them in one piece, after the header.
  const size_t fixed = sizeof in + payload;
  if (in.len < fixed || in.len - fixed > kabi::kOpInSize || payload > kPayload || e.commit_id == 0) {
    Logger("fuse")->error("io_uring: a malformed request on queue {} (length {}, payload {}); answered EIO", q.qid,
                          in.len, payload);
    kabi::OutHeader out{sizeof(kabi::OutHeader), -EIO, in.unique};
    std::memcpy(e.header->in_out, &out, sizeof out);
    e.header->ent.payload_sz = 0;
    e.unique.store(0, std::memory_order_release);  // as Reply does
    Commit(q, e);
    return;
  }
  const size_t op_size = in.len - fixed;
  char* start = e.payload - op_size - sizeof in;
  std::memcpy(start, &in, sizeof in);
  std::memcpy(start + sizeof in, e.header->op_in, op_size);
  e.unique.store(in.unique, std::memory_order_release);
  served_.fetch_add(1, std::memory_order_relaxed);
  fuse_buf buf{};
  buf.mem = start;
  buf.size = in.len;
  ProcessRequest(session_, buf);
}

bool FuseUring::Reply(const iovec* iov, int count, ssize_t* written) noexcept {
  if (count < 1 || iov[0].iov_len != sizeof(kabi::OutHeader)) return false;
  kabi::OutHeader out;
  std::memcpy(&out, iov[0].iov_base, sizeof out);
  if (out.unique == 0) return false;  // a notification: /dev/fuse only
  // Most replies are made by the thread handling the request, on its entry.
  Queue* q = nullptr;
  Entry* e = nullptr;
  if (tl_entry != nullptr && tl_entry->unique.load(std::memory_order_acquire) == out.unique) {
    q = static_cast<Queue*>(const_cast<void*>(tl_handling));
    e = tl_entry;
  }
  for (size_t k = 0; e == nullptr && k < queues_.size(); ++k) {
    const unsigned used = queues_[k]->used.load(std::memory_order_acquire);
    for (unsigned i = 0; i < used; ++i) {
      if (queues_[k]->entries[i].unique.load(std::memory_order_acquire) != out.unique) continue;
      q = queues_[k].get();
      e = &q->entries[i];
      break;
    }
  }
  if (e == nullptr) return false;
  size_t len = 0;
  for (int k = 1; k < count; ++k) len += iov[k].iov_len;
  if (len > kPayload) {
    Logger("fuse")->error("io_uring: a {}-byte reply exceeds the buffer; answered EIO", len);
    out.error = -EIO;
    len = 0;
  } else {
    char* p = e->payload;
    for (int k = 1; k < count; ++k) {
      std::memcpy(p, iov[k].iov_base, iov[k].iov_len);
      p += iov[k].iov_len;
    }
  }
  out.len = static_cast<uint32_t>(sizeof out + len);
  std::memcpy(e->header->in_out, &out, sizeof out);
  e->header->ent.payload_sz = static_cast<uint32_t>(len);
  e->unique.store(0, std::memory_order_release);
  Commit(*q, *e);
  *written = static_cast<ssize_t>(sizeof out + len);
  return true;
}

void FuseUring::Commit(Queue& q, Entry& e) noexcept {
  std::lock_guard lock(q.sq_mu);
  if (tl_handling != &q) {
    // Another thread (an isolated server's replies): the queue's own thread commits,
    // so the entry's next request is delivered to it, on its CPU, and not to this one.
    try {
      q.pending.push_back(e.index);
    } catch (...) {
      Logger("fuse")->error("io_uring: out of memory; a reply is lost");
      return;
    }
    if (q.pending.size() == 1) {
      const uint64_t one = 1;
      (void)!::write(q.wake.get(), &one, sizeof one);
    }
    return;
  }
  PrepCommit(q, e);  // submitted before the queue's thread waits again
}

void FuseUring::PrepCommit(Queue& q, Entry& e) noexcept {
  io_uring_sqe* sqe = io_uring_get_sqe(&q.ring);
  if (sqe == nullptr) {  // cannot happen (one slot per entry, and one for the knock)
    io_uring_submit(&q.ring);
    sqe = io_uring_get_sqe(&q.ring);
    if (sqe == nullptr) {
      Logger("fuse")->error("io_uring: no submission slot on queue {}; a reply is lost", q.qid);
      return;
    }
  }
  PrepCommand(sqe, q, e, kabi::kCommitAndFetch);
}

bool FuseUring::CheckHeldUp() {
  std::lock_guard lock(mu_);
  if (stopping_) return false;
  const int64_t now = NowNs();
  bool busy = false;
  for (auto& qp : queues_) {
    Queue& q = *qp;
    Worker* w = q.leader;
    if (w == nullptr || q.ended) continue;
    int64_t since = w->busy_since.load(std::memory_order_relaxed);
    if (since <= 0) continue;
    busy = true;
    if (now - since < options_.takeover.count()) continue;
    // Stuck in one request: a spare leads the queue from now on (the old leader
    // learns it when its request ends).
    if (!w->busy_since.compare_exchange_strong(since, kTaken)) continue;
    q.leader = nullptr;
    if (q.spares == 0 && q.workers.size() < options_.max_threads) {
      if (!StartWorker(q)) Logger("fuse")->warn("io_uring: cannot start another thread for queue {}", q.qid);
    }
    q.cv.notify_one();
  }
  return busy;
}

}  // namespace ulsp::msgport
