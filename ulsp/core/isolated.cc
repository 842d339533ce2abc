#include "ulsp/core/isolated.h"

#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "kernel/msgport/log.h"
#include "kernel/msgport/vfs_codec.h"
#include "ulsp/vfs/stack.h"

namespace ulsp::core {

using msgport::MessagePtr;
using msgport::VfsMessage;
using msgport::VfsOp;

namespace {

constexpr uint64_t kRootServerNode = FUSE_ROOT_ID;  // the root is 1 on both sides

constexpr uint64_t MakeId(uint32_t index, uint32_t generation) {
  return (static_cast<uint64_t>(generation) << 32) | index;
}
constexpr uint32_t IndexOf(uint64_t id) { return static_cast<uint32_t>(id & 0xffffffffu); }
constexpr uint32_t GenerationOf(uint64_t id) { return static_cast<uint32_t>(id >> 32); }

constexpr unsigned kMaxSpawnFailures = 8;  // servers in a row that never said hello
constexpr uint32_t kMaxSends = 3;          // an idempotent request survives 2 deaths

// Whether a request may be sent again to a new server after the one serving it died.
// The idempotent operations, and those whose effect died with the server: an open
// (without O_TRUNC) or opendir makes a new handle; flush, fsync and release act on a
// handle the new server reopens (release: answered at once, nothing is open there).
// Not: writes, creations, removals, renames, attribute changes.
bool Resendable(const msgport::VfsRequest& r) {
  switch (r.op) {
    case VfsOp::kOpen:
      return (r.flags & O_TRUNC) == 0;
    case VfsOp::kOpenDir:
    case VfsOp::kFlush:
    case VfsOp::kFsync:
    case VfsOp::kFsyncDir:
    case VfsOp::kRelease:
    case VfsOp::kReleaseDir:
      return true;
    default:
      return msgport::VfsOpIsIdempotent(r.op);
  }
}

bool UsesNode2(VfsOp op) { return op == VfsOp::kRename || op == VfsOp::kLink || op == VfsOp::kCopyFileRange; }

// Replies `msg` to the port the shim gave it (its relay's), with `error`, counting it
// in `counters` (of the relay: `ulsp ps` shows them) as replied or refused.
void Answer(msgport::PortCounters& counters, MessagePtr msg, int error) {
  (error == 0 ? counters.replied : counters.refused).fetch_add(1, std::memory_order_relaxed);
  auto& m = static_cast<VfsMessage&>(*msg);
  msg->reply_port = m.relay.reply_port;
  msgport::Reply(std::move(msg), error);
}

// A request made by the port itself (re-finding a node or reopening a handle after a
// restart), sent and waited for. Returns the replied request, or an errno.
Result<std::unique_ptr<VfsMessage>> Ask(msgport::Port& server, std::unique_ptr<VfsMessage> m) {
  msgport::EncodeVfsRequest(m->req, m->payload);
  auto reply = msgport::DoMsg(server, MessagePtr(m.release()), msgport::After(std::chrono::seconds(10)));
  if (!reply) return std::unexpected(reply.error());
  std::unique_ptr<VfsMessage> back(static_cast<VfsMessage*>(reply->release()));
  if (back->error != 0) return Fail(back->error);
  if (!msgport::DecodeVfsReply(back->payload, back->req)) return Fail(EIO);
  return back;
}

}  // namespace

// Servers that are processes of this program (`ulsp __serve-vfs`), on shared memory.
class ProcessSource final : public ServerSource {
 public:
  explicit ProcessSource(IsolatedPort::Options options) : options_(std::move(options)) {}

  std::shared_ptr<msgport::Port> Start(pid_t* pid) override {
    msgport::ShmPortOptions options;
    options.slots = 64;
    options.slot_bytes = 136u << 10;  // a 128 KiB read or write and its envelope
    // A program the kernel interrupted (a signal, SIGKILL too) waits no more than this
    // for a server that has stopped answering (SIGSTOP, a deadlocked layer).
    options.answer_aborted_after = std::chrono::seconds(1);
    auto port = msgport::ShmClientPort::Create("vfs", options);
    if (!port) {
      Failed("its shared-memory port (in /dev/shm): " + port.error().Describe());
      return nullptr;
    }
    UniqueFd theirs = (*port)->TakeServerSocket();
    UniqueFd high(::fcntl(theirs.get(), F_DUPFD_CLOEXEC, 100));
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, high.get(), 3);
    std::string segment = (*port)->segment_name();
    std::string binary = options_.ulsp_binary;
    std::string spec = options_.spec;
    char arg0[] = "ulsp", cmd[] = "__serve-vfs", three[] = "3";
    char* argv[] = {arg0, cmd, segment.data(), three, spec.data(), nullptr};
    // The server is stopped by SIGTERM (Interrupt): it must not inherit this process's
    // mask (`ulsp run` blocks SIGTERM to forward it to its group, and a server that
    // kept it blocked never ended, nor did `ulsp run`) nor an ignored SIGTERM. In a
    // process group of its own, a terminal's ^C (SIGINT to the foreground group)
    // reaches ulsp and the programs, not the server, which would die of it midway.
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t none, term;
    sigemptyset(&none);
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &term);
    posix_spawnattr_setpgroup(&attr, 0);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
    const int rc = ::posix_spawn(pid, binary.c_str(), &fa, &attr, argv, environ);
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&fa);
    // The server's end of the socket is the server's alone from now on: a server
    // that dies before it says hello closes it, and the wait below ends at once
    // (while this process held it too, the wait ran its whole 10 s, and every
    // program using the mount waited with it).
    high.Reset();
    theirs.Reset();
    if (rc != 0) {
      Failed("cannot start " + binary + ": " + std::strerror(rc));
      return nullptr;
    }
    if (auto ok = (*port)->WaitForServer(msgport::After(std::chrono::seconds(10)), *pid); !ok) {
      ::kill(*pid, SIGKILL);
      int status = 0;
      ::waitpid(*pid, &status, 0);
      std::string what = " did not say hello within 10 s";
      if (ok.error().value != ETIMEDOUT && WIFEXITED(status))
        what = " exited with status " + std::to_string(WEXITSTATUS(status)) + " before serving";
      else if (ok.error().value != ETIMEDOUT && WIFSIGNALED(status))
        what = std::string(" died of ") + strsignal(WTERMSIG(status)) + " before serving";
      Failed("server " + std::to_string(*pid) + what);
      return nullptr;
    }
    return std::shared_ptr<msgport::Port>(port->release());
  }

  void WaitGone(const std::shared_ptr<msgport::Port>&, pid_t pid) override {
    const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (pidfd >= 0) {
      pollfd p{pidfd, POLLIN, 0};
      while (::poll(&p, 1, -1) < 0 && errno == EINTR) {
      }
      ::close(pidfd);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    last_status_ = status;
  }

  void Interrupt(const std::shared_ptr<msgport::Port>&, pid_t pid) override {
    if (pid > 0) ::kill(pid, SIGTERM);
  }

  bool resend_in_flight() const override { return true; }
  // A passthrough stack's numbers are the files' own on the disk; an overlay's change
  // at copy-up, memfs's die with the server.
  bool stable_inode_numbers() const override {
    auto layers = vfs::ParseStackSpec(options_.spec);
    if (!layers || layers->empty() || layers->back().name != "passthrough") return false;
    return std::none_of(layers->begin(), layers->end(), [](const vfs::LayerSpec& l) { return l.name == "overlay"; });
  }
  unsigned max_start_failures() const override { return kMaxSpawnFailures; }
  std::chrono::milliseconds wait_limit() const override { return std::chrono::milliseconds(0); }
  std::string kind() const override { return "shared memory"; }
  int last_status() const { return last_status_; }

 private:
  void Failed(const std::string& why) {
    Logger("vfs")->error("isolated server: {}", why);
    if (options_.why) *options_.why = why;
  }

  IsolatedPort::Options options_;
  int last_status_ = 0;
};

IsolatedPort::IsolatedPort(std::unique_ptr<ServerSource> source)
    : Port("vfs-isolated"), source_(std::move(source)), check_identity_(source_->stable_inode_numbers()) {
  nodes_.resize(2);
  nodes_[1].in_use = true;
  nodes_[1].nlookup = 1;
  // Open files' descriptors are kept (KNode::file): as many as the hard limit lets,
  // half of them at most, so that descriptors coming with replies always find room.
  // (A group started by `ulsp run` gets the caller's limits back: group_init.)
  struct rlimit files {};
  if (::getrlimit(RLIMIT_NOFILE, &files) == 0) {
    files.rlim_cur = files.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &files);
    ::getrlimit(RLIMIT_NOFILE, &files);
    files_budget_ = static_cast<size_t>(std::min<rlim_t>(files.rlim_cur / 2, 1u << 20));
  }
}

Result<std::unique_ptr<IsolatedPort>> IsolatedPort::Start(Options options) {
  auto port = StartWith(std::make_unique<ProcessSource>(std::move(options)));
  if (!port) return Fail(ECHILD);
  return port;
}

Result<std::unique_ptr<IsolatedPort>> IsolatedPort::StartWith(std::unique_ptr<ServerSource> source) {
  std::unique_ptr<IsolatedPort> port(new IsolatedPort(std::move(source)));
  pid_t pid = 0;
  Server first = port->source_->Start(&pid);
  if (!first) return Fail(ECONNREFUSED);
  port->server_ = std::move(first);
  port->epoch_ = 1;
  port->server_pid_ = pid;
  port->map_epoch_ = 1;
  port->supervisor_ = std::thread([p = port.get()] { p->Supervise(); });
  if (port->source_->wait_limit().count() > 0) port->sweeper_ = std::thread([p = port.get()] { p->Sweep(); });
  return port;
}

IsolatedPort::~IsolatedPort() {
  Server current;
  {
    std::lock_guard lock(server_mu_);
    stopping_ = true;
    current = server_;
  }
  server_cv_.notify_all();
  source_->Interrupt(current, server_pid_.load());
  current.reset();
  if (supervisor_.joinable()) supervisor_.join();
  if (sweeper_.joinable()) sweeper_.join();
  std::vector<MessagePtr> waiting;
  Server last;
  {
    std::lock_guard lock(server_mu_);
    waiting.swap(waiting_);
    last = std::move(server_);
  }
  last.reset();
  retired_.clear();
  for (auto& m : waiting) Answer(counters(), std::move(m), EIO);
}

bool IsolatedPort::serving() const {
  std::lock_guard lock(server_mu_);
  return server_ != nullptr;
}

void IsolatedPort::Sweep() {
  std::unique_lock lock(server_mu_);
  while (!stopping_) {
    server_cv_.wait_for(lock, std::chrono::milliseconds(100));
    const auto now = msgport::Clock::now();
    std::vector<MessagePtr> expired;
    for (auto it = waiting_.begin(); it != waiting_.end();) {
      // (Or its sender's deadline, if it has one and that comes first.)
      if (std::min((*it)->deadline, static_cast<VfsMessage&>(**it).relay.wait_until) <= now) {
        expired.push_back(std::move(*it));
        it = waiting_.erase(it);
      } else {
        ++it;
      }
    }
    if (expired.empty()) continue;
    lock.unlock();
    for (auto& m : expired) Answer(counters(), std::move(m), ETIMEDOUT);
    lock.lock();
  }
}

void IsolatedPort::Supervise() {
  unsigned spawn_failures = 0;
  unsigned quick_deaths = 0;
  for (;;) {
    Server server;
    pid_t pid = 0;
    {
      std::lock_guard lock(server_mu_);
      if (stopping_) return;
      server = server_;
      pid = server_pid_.load();
    }
    const auto started = std::chrono::steady_clock::now();
    const uint64_t answered_before = answered_.load();
    if (server) {
      // Wait for the server's end (the destructor's Interrupt ends this too).
      source_->WaitGone(server, pid);
      {
        std::lock_guard lock(server_mu_);
        if (server_ == server) server_.reset();  // requests wait in waiting_ from now on
        server_pid_ = 0;
        if (stopping_) {
          retired_.push_back(std::move(server));
          return;
        }
      }
      if (pid > 0) {
        const int status = static_cast<ProcessSource&>(*source_).last_status();
        Logger("vfs")->warn("isolated server {} died ({}); restarting it", pid,
                            WIFSIGNALED(status) ? std::string("signal ") + strsignal(WTERMSIG(status))
                                                : "exit status " + std::to_string(WEXITSTATUS(status)));
      } else {
        Logger("vfs")->warn("{} server {} is gone; reconnecting", source_->kind(), source_->peer());
      }
      // Its port replies what was outstanding (ECONNRESET) once it notices; the
      // replies come back through PutReply and wait for the next server. The port is
      // destroyed here, on this thread, once nobody else holds it (never on its own
      // reply thread, which its destructor joins).
      retired_.push_back(std::move(server));
      std::erase_if(retired_, [](const Server& s) { return s.use_count() == 1; });
      // A crash loop is a server that dies soon after it starts without answering
      // anything; one killed while it serves (by a user, by a test) is restarted at once.
      const auto lived = std::chrono::steady_clock::now() - started;
      const bool useless = lived < std::chrono::seconds(1) && answered_.load() == answered_before;
      quick_deaths = useless ? quick_deaths + 1 : 0;
    }
    // Back-off against crash loops: 0, then 100 ms doubling to 5 s.
    const unsigned tries = quick_deaths + spawn_failures;
    if (tries > 0) {
      const auto delay = std::min<std::chrono::milliseconds>(
          std::chrono::milliseconds(100 << std::min(tries - 1, 6u)), std::chrono::seconds(5));
      std::unique_lock lock(server_mu_);
      if (server_cv_.wait_for(lock, delay, [this] { return stopping_; })) return;
    }
    pid_t new_pid = 0;
    Server next = source_->Start(&new_pid);
    std::vector<MessagePtr> waiting;
    {
      std::lock_guard lock(server_mu_);
      if (stopping_) {
        if (next) {
          source_->Interrupt(next, new_pid);
          if (new_pid > 0) ::waitpid(new_pid, nullptr, 0);
        }
        return;
      }
      if (!next) {
        const unsigned most = source_->max_start_failures();
        if (most == 0) {
          spawn_failures = std::min(spawn_failures + 1, 6u);  // back off, and try again for ever
          continue;
        }
        if (++spawn_failures < most) continue;
        Logger("vfs")->error("isolated server: {} starts failed in a row; answering EIO from now on", spawn_failures);
        broken_ = true;
        waiting.swap(waiting_);
      } else {
        spawn_failures = 0;
        server_ = next;
        server_pid_ = new_pid;
        ++epoch_;
        restarts_.fetch_add(1);
        waiting.swap(waiting_);
      }
    }
    if (next) {
      std::lock_guard lock(map_mu_);
      by_server_id_.clear();  // the new server's ids start afresh
      ++map_epoch_;
    }
    if (next && new_pid > 0) Logger("vfs")->info("isolated server {} serves (it said hello)", new_pid);
    for (auto& m : waiting) {
      if (broken_) {
        Answer(counters(), std::move(m), EIO);
      } else {
        Forward(std::move(m));
      }
    }
    if (broken_) return;
  }
}

IsolatedPort::Server IsolatedPort::Current(uint64_t* epoch) const {
  std::lock_guard lock(server_mu_);
  *epoch = epoch_;
  return server_;
}

bool IsolatedPort::Poll() {
  uint64_t epoch;
  const Server server = Current(&epoch);
  return server != nullptr && server->Poll();
}

void IsolatedPort::Helping(bool on) {
  uint64_t epoch;
  if (const Server server = Current(&epoch)) server->Helping(on);
}

bool IsolatedPort::Pollable() const noexcept {
  uint64_t epoch;
  const Server server = Current(&epoch);
  return server != nullptr && server->Pollable();
}

size_t IsolatedPort::NodeCount() const {
  std::lock_guard lock(map_mu_);
  return live_nodes_;
}

void IsolatedPort::Name(uint32_t index) {
  const KNode& n = nodes_[index];
  if (n.name.empty()) return;  // an O_TMPFILE file, which no name finds
  const NameKey key{n.parent, n.name};
  auto [it, added] = by_name_.try_emplace(key, index);
  if (added) return;
  // An entry of another node under the same name views that node's name: replaced
  // whole, key and all, never just given this index.
  by_name_.erase(it);
  by_name_.emplace(key, index);
}

void IsolatedPort::Unname(uint32_t index) {
  const KNode& n = nodes_[index];
  if (auto it = by_name_.find(NameKey{n.parent, n.name}); it != by_name_.end() && it->second == index)
    by_name_.erase(it);
}

void IsolatedPort::Orphan(const NameKey& key) {
  if (auto it = by_name_.find(key); it != by_name_.end()) Disown(it->second);
}

void IsolatedPort::Disown(uint32_t index) {
  Unname(index);  // first: the table's key views the name
  KNode& n = nodes_[index];
  n.name.clear();
  n.parent = 0;
  n.renamed_name.clear();
}

void IsolatedPort::KeepFile(uint64_t kernel_id, UniqueFd& fd, uint64_t tag, bool replace) {
  KNode* n = Node(kernel_id);
  if (n == nullptr || !fd || (n->file && !replace) || n->opens == 0) return;
  if (!n->file) {
    if (files_kept_ >= files_budget_) return;
    ++files_kept_;
  }
  n->file = std::move(fd);
  n->file_tag = tag;
  n->file_held = false;
}

void IsolatedPort::LendFile(const NameKey& key, const msgport::VfsContext& ctx, const Server& server, uint64_t epoch,
                            std::unique_lock<std::mutex>& lock) {
  auto it = by_name_.find(key);
  if (it == by_name_.end() || lend_refused_) return;
  const KNode& n = nodes_[it->second];
  if (n.opens == 0 || n.file || n.file_held || files_kept_ >= files_budget_) return;
  const uint64_t kernel_id = MakeId(it->second, n.generation);
  uint64_t kernel_fh = 0;  // one of its handles (an unlink of an open file is rare: a scan)
  for (size_t i = 0; i < handles_.size() && kernel_fh == 0; ++i)
    if (handles_[i].in_use && !handles_[i].dir && handles_[i].node == kernel_id) kernel_fh = i + 1;
  if (kernel_fh == 0) return;
  const uint64_t node = ServerNode(kernel_id, server, epoch, lock, 0);
  const std::optional<uint64_t> fh = node == 0 ? std::nullopt : ServerHandle(kernel_fh, server, epoch, lock);
  if (!fh) return;
  auto ask = std::make_unique<VfsMessage>(VfsOp::kLend);
  ask->req.ctx = ctx;  // for the caller whose unlink or rename it is (a trace says so)
  ask->req.node = node;
  ask->req.fh = *fh;
  lock.unlock();
  auto lent = AskServer(server, epoch, std::move(ask));
  lock.lock();
  if (!lent) {
    if (lent.error().value == ENOSYS) lend_refused_ = true;
    return;
  }
  if (!(*lent)->fds.empty()) {
    KeepFile(kernel_id, (*lent)->fds.front(), (*lent)->req.open.fh);
  } else if (KNode* held = Node(kernel_id); (*lent)->req.open.held && held != nullptr && held->opens > 0 && !held->file) {
    held->file_held = true;  // by the server (an agent), under this name
    held->file_tag = (*lent)->req.open.fh;
  }
}

void IsolatedPort::FreeHandle(uint64_t kernel_fh) {
  if (kernel_fh == 0 || kernel_fh > handles_.size() || !handles_[kernel_fh - 1].in_use) return;
  KHandle& h = handles_[kernel_fh - 1];
  if (KNode* n = Node(h.node); n != nullptr && !h.dir && n->opens > 0 && --n->opens == 0) {
    if (n->file) {
      n->file.Reset();
      --files_kept_;
    }
    n->file_held = false;  // (an agent lets it go when its own last handle of it is released)
  }
  h = KHandle{};
  free_handles_.push_back(static_cast<uint32_t>(kernel_fh - 1));
}

IsolatedPort::KNode* IsolatedPort::Node(uint64_t kernel_id) {
  const uint32_t index = IndexOf(kernel_id);
  if (index == 0 || index >= nodes_.size()) return nullptr;
  KNode& n = nodes_[index];
  return n.in_use && n.generation == GenerationOf(kernel_id) ? &n : nullptr;
}

uint64_t IsolatedPort::KernelNode(uint64_t server_id, uint64_t epoch, uint64_t parent, std::string_view name,
                                  uint64_t ino, bool found) {
  if (server_id == kRootServerNode) return kRootServerNode;
  uint32_t index = 0;
  const bool current = epoch == map_epoch_;  // answered by the server that serves now
  if (auto it = current ? by_server_id_.find(server_id) : by_server_id_.end(); it != by_server_id_.end()) {
    index = it->second;
  } else if (!current || found) {
    // Not known by this server's id: the node the kernel holds under the name, if it is
    // the same file. For an answer from a server that has died since, whichever node
    // that is; for this server's lookup or listing, one of a dead server's that no
    // request has found again yet: the same node to the kernel. (A new id would make
    // the kernel drop its entry, and with it a working directory, what is mounted
    // there, and the locks held on the file.)
    if (auto named = by_name_.find(NameKey{parent, name});
        named != by_name_.end() && SameFile(nodes_[named->second].ino, ino) &&
        (!current || nodes_[named->second].epoch != epoch)) {
      index = named->second;
      if (current) {
        Bind(index, server_id, epoch);
        nodes_[index].server_lookups = 0;  // this answer's is counted below
        nodes_[index].renamed_parent = 0;  // found by the name it had: no rename moved it
        nodes_[index].renamed_name.clear();
      }
    }
  }
  if (index != 0) {
    KNode& n = nodes_[index];
    if (ino != 0) n.ino = ino;  // the latest (an overlay's copy-up changes it)
    ++n.nlookup;
    if (n.epoch == epoch) ++n.server_lookups;
    if (n.parent != parent || n.name != name) {  // known by another name (a hard link)
      Unname(index);
      n.parent = parent;
      n.name.assign(name);
      Name(index);
    } else if (auto it = by_name_.find(NameKey{parent, name}); it == by_name_.end() || it->second != index) {
      Name(index);  // the name is this node's again
    }
    return MakeId(index, n.generation);
  }
  if (!free_nodes_.empty()) {
    index = free_nodes_.back();
    free_nodes_.pop_back();
  } else {
    index = static_cast<uint32_t>(nodes_.size());
    nodes_.emplace_back();
  }
  KNode& n = nodes_[index];
  n.in_use = true;
  n.server_id = server_id;
  n.epoch = epoch;
  n.parent = parent;
  n.name.assign(name);
  n.ino = ino;
  n.nlookup = 1;
  n.server_lookups = 1;
  if (epoch == map_epoch_) by_server_id_[server_id] = index;
  Name(index);
  ++live_nodes_;
  return MakeId(index, n.generation);
}

void IsolatedPort::ForgetLocked(uint64_t kernel_id, uint64_t count, std::vector<std::pair<uint64_t, uint64_t>>& forgets) {
  if (kernel_id == kRootServerNode) return;
  KNode* n = Node(kernel_id);
  if (n == nullptr) return;
  n->nlookup -= std::min(count, n->nlookup);
  if (n->nlookup > 0) return;
  const uint32_t index = IndexOf(kernel_id);
  if (n->epoch == map_epoch_) {
    forgets.emplace_back(n->server_id, n->server_lookups);
    if (auto it = by_server_id_.find(n->server_id); it != by_server_id_.end() && it->second == index)
      by_server_id_.erase(it);
  }
  Unname(index);
  if (n->file) --files_kept_;  // (the kernel releases its handles before it forgets)
  const uint32_t generation = n->generation + 1;
  *n = KNode{};
  n->generation = generation;
  free_nodes_.push_back(index);
  --live_nodes_;
}

uint64_t IsolatedPort::ServerNode(uint64_t kernel_id, const Server& server, uint64_t epoch,
                                  std::unique_lock<std::mutex>& lock, int depth) {
  if (kernel_id == kRootServerNode) return kRootServerNode;
  KNode* n = Node(kernel_id);
  if (n == nullptr || depth > 256) return 0;
  if (n->epoch == epoch) return n->server_id;
  // Known to a server that died: find it again in this one by its name; failing that,
  // by the name a rename answered EIO may have given it (with the inode number known).
  bool another_file = false;
  for (const bool renamed : {false, true}) {
    if (renamed && (!check_identity_ || n->ino == 0 || n->renamed_name.empty())) break;
    const uint64_t kernel_parent = renamed ? n->renamed_parent : n->parent;
    const uint64_t parent = ServerNode(kernel_parent, server, epoch, lock, depth + 1);
    n = Node(kernel_id);
    if (n == nullptr) return 0;
    std::string name = renamed ? n->renamed_name : n->name;
    if (parent == 0 || name.empty()) continue;
    auto ask = std::make_unique<VfsMessage>(VfsOp::kLookup);
    ask->req.node = parent;
    ask->req.name = name;
    lock.unlock();  // replies (ours too) are delivered through PutReply, which locks
    auto found = AskServer(server, epoch, std::move(ask));
    lock.lock();
    n = Node(kernel_id);
    if (!found) {
      if (n == nullptr) return 0;
      continue;
    }
    const uint64_t server_id = (*found)->req.entry.ino;
    if (n == nullptr || n->epoch == epoch) {
      // Gone meanwhile, or found by another request first: give our lookup back.
      pending_forgets_.emplace_back(server_id, 1);
      return n == nullptr ? 0 : n->server_id;
    }
    const uint64_t ino = (*found)->req.entry.attr.st_ino;
    if (renamed ? ino != n->ino : !SameFile(n->ino, ino)) {
      // The name is another file's now (replaced beside the mount, or by a change the
      // dead server made but did not answer).
      pending_forgets_.emplace_back(server_id, 1);
      another_file |= !renamed;
      continue;
    }
    const uint32_t index = IndexOf(kernel_id);
    if (renamed) {  // the rename was done
      Unname(index);
      n->parent = kernel_parent;
      n->name = std::move(name);
      Name(index);
    }
    n->renamed_parent = 0;
    n->renamed_name.clear();
    Bind(index, server_id, epoch);
    return server_id;
  }
  if (another_file && n != nullptr) Disown(IndexOf(kernel_id));  // no name to be found by any more
  // No name finds it (unlinked while open, say), but the file itself is at hand.
  return n != nullptr && (n->file || n->file_held) ? AdoptFile(kernel_id, server, epoch, lock) : 0;
}

uint64_t IsolatedPort::AdoptFile(uint64_t kernel_id, const Server& server, uint64_t epoch,
                                 std::unique_lock<std::mutex>& lock) {
  KNode* n = Node(kernel_id);
  auto ask = std::make_unique<VfsMessage>(VfsOp::kAdopt);
  if (n->file) {  // else held by the server, named by the tag
    UniqueFd copy(::fcntl(n->file.get(), F_DUPFD_CLOEXEC, 0));
    if (!copy) return 0;
    ask->fds.push_back(std::move(copy));  // the server's req.in_fd
  }
  ask->req.fh = n->file_tag;
  lock.unlock();
  auto found = AskServer(server, epoch, std::move(ask));
  lock.lock();
  n = Node(kernel_id);
  if (!found) return 0;
  const uint64_t server_id = (*found)->req.entry.ino;
  if (n == nullptr || n->epoch == epoch) {  // gone meanwhile, or found by another request
    pending_forgets_.emplace_back(server_id, 1);
    return n == nullptr ? 0 : n->server_id;
  }
  n->ino = (*found)->req.entry.attr.st_ino;
  Bind(IndexOf(kernel_id), server_id, epoch);
  return server_id;
}

void IsolatedPort::Bind(uint32_t index, uint64_t server_id, uint64_t epoch) {
  KNode& n = nodes_[index];
  n.server_id = server_id;
  n.epoch = epoch;
  n.server_lookups = 1;
  by_server_id_[server_id] = index;
}

void IsolatedPort::MaybeRenamed(const VfsMessage& m) {
  std::lock_guard lock(map_mu_);
  auto note = [this](const NameKey& from, uint64_t parent, const std::string& name) {
    if (auto it = by_name_.find(from); it != by_name_.end()) {
      nodes_[it->second].renamed_parent = parent;
      nodes_[it->second].renamed_name = name;
    }
  };
  note(NameKey{m.relay.node, m.req.name}, m.relay.node2, m.req.name2);
  if (m.req.flags & RENAME_EXCHANGE) note(NameKey{m.relay.node2, m.req.name2}, m.relay.node, m.req.name);
}

std::optional<uint64_t> IsolatedPort::ServerHandle(uint64_t kernel_fh, const Server& server, uint64_t epoch,
                                                   std::unique_lock<std::mutex>& lock) {
  if (kernel_fh == 0 || kernel_fh > handles_.size() || !handles_[kernel_fh - 1].in_use) return std::nullopt;
  KHandle h = handles_[kernel_fh - 1];
  if (h.epoch == epoch) return h.server_fh;
  // Opened in a server that died: open it again in this one.
  const uint64_t node = ServerNode(h.node, server, epoch, lock, 0);
  if (node == 0) return std::nullopt;
  auto ask = std::make_unique<VfsMessage>(h.dir ? VfsOp::kOpenDir : VfsOp::kOpen);
  ask->req.node = node;
  ask->req.flags = h.flags;
  lock.unlock();
  auto opened = AskServer(server, epoch, std::move(ask));
  lock.lock();
  if (!opened) return std::nullopt;
  KHandle& now = handles_[kernel_fh - 1];
  if (!now.in_use) return std::nullopt;
  now.server_fh = (*opened)->req.open.fh;
  now.epoch = epoch;
  return now.server_fh;
}

Result<std::unique_ptr<VfsMessage>> IsolatedPort::AskServer(const Server& server, uint64_t epoch,
                                                              std::unique_ptr<VfsMessage> m) {
  auto reply = Ask(*server, std::move(m));
  if (!reply && reply.error().value == ECONNRESET) lost_epoch_.store(epoch, std::memory_order_release);
  return reply;
}

void IsolatedPort::Requeue(MessagePtr msg, uint64_t epoch) {
  {
    // The supervisor may not have seen the death yet: take that server out of
    // service now, so this request (and every new one) waits for the next.
    std::lock_guard lock(server_mu_);
    if (server_ != nullptr && epoch_ == epoch) server_ = nullptr;
    if (server_ == nullptr && !broken_ && !stopping_) {
      WaitForNextServer(std::move(msg));
      return;
    }
  }
  Forward(std::move(msg));  // to the next server, already up; or answered EIO
}

void IsolatedPort::WaitForNextServer(MessagePtr msg) {
  auto& m = static_cast<VfsMessage&>(*msg);
  if (const auto limit = source_->wait_limit(); limit.count() > 0 && m.relay.wait_until == msgport::kNoDeadline)
    m.relay.wait_until = msgport::After(limit);
  waiting_.push_back(std::move(msg));
}

void IsolatedPort::Put(MessagePtr msg) {
  auto* m = dynamic_cast<VfsMessage*>(msg.get());
  if (m == nullptr) {
    msgport::Reply(std::move(msg), EINVAL);
    return;
  }
  m->relay.reply_port = msg->reply_port;
  m->relay.node = m->req.node;
  m->relay.node2 = m->req.node2;
  m->relay.fh = m->req.fh;
  m->relay.fh2 = m->req.fh2;
  m->relay.sends = 0;
  m->relay.wait_until = msgport::kNoDeadline;
  Forward(std::move(msg));
}

void IsolatedPort::SendForgets(const Server& server) {
  std::vector<std::pair<uint64_t, uint64_t>> forgets;
  {
    std::lock_guard lock(map_mu_);
    forgets.swap(pending_forgets_);
  }
  for (auto [id, count] : forgets) {
    auto f = std::make_unique<VfsMessage>(VfsOp::kForget);
    f->req.node = id;
    f->req.count = count;
    msgport::EncodeVfsRequest(f->req, f->payload);
    f->reply_port = nullptr;
    msgport::Send(*server, MessagePtr(f.release()));
  }
}

void IsolatedPort::Forward(MessagePtr msg) {
  auto& m = static_cast<VfsMessage&>(*msg);
  msgport::VfsRequest& r = m.req;
  r.node = m.relay.node;
  r.node2 = m.relay.node2;
  r.fh = m.relay.fh;
  r.fh2 = m.relay.fh2;

  uint64_t epoch = 0;
  Server server = Current(&epoch);
  if (r.op == VfsOp::kForget) {
    {
      std::lock_guard lock(map_mu_);
      ForgetLocked(r.node, r.count, pending_forgets_);
    }
    if (server) SendForgets(server);
    Answer(counters(), std::move(msg), 0);
    return;
  }
  if (!server) {
    std::unique_lock lock(server_mu_);
    if (broken_ || stopping_) {
      lock.unlock();
      Answer(counters(), std::move(msg), EIO);
      return;
    }
    if (server_ == nullptr) {
      WaitForNextServer(std::move(msg));  // sent when the next server is up
      return;
    }
    server = server_;
    epoch = epoch_;
  }
  int error = 0;
  {
    std::unique_lock lock(map_mu_);
    const bool release = r.op == VfsOp::kRelease || r.op == VfsOp::kReleaseDir;
    if (release && (r.fh == 0 || r.fh > handles_.size() || handles_[r.fh - 1].epoch != epoch)) {
      // Opened in a server that died: nothing to close there.
      FreeHandle(r.fh);
      lock.unlock();
      Answer(counters(), std::move(msg), 0);
      return;
    }
    r.node = ServerNode(m.relay.node, server, epoch, lock, 0);
    if (r.node == 0) error = ESTALE;
    if (!error && UsesNode2(r.op)) {
      r.node2 = ServerNode(m.relay.node2, server, epoch, lock, 0);
      if (r.node2 == 0) error = ESTALE;
    }
    if (!error && (r.op == VfsOp::kUnlink || (r.op == VfsOp::kRename && !(r.flags & RENAME_EXCHANGE)))) {
      // A file the kernel has open may be losing its last name here.
      LendFile(r.op == VfsOp::kUnlink ? NameKey{m.relay.node, r.name} : NameKey{m.relay.node2, r.name2}, r.ctx, server,
               epoch, lock);
    }
    if (!error && UsesHandle(r)) {
      const std::optional<uint64_t> fh = ServerHandle(m.relay.fh, server, epoch, lock);
      if (!fh) error = EBADF;
      r.fh = fh.value_or(0);
      if (!error && r.op == VfsOp::kCopyFileRange) {
        const std::optional<uint64_t> fh2 = ServerHandle(m.relay.fh2, server, epoch, lock);
        if (!fh2) error = EBADF;
        r.fh2 = fh2.value_or(0);
      }
    }
  }
  SendForgets(server);
  if (lost_epoch_.load(std::memory_order_acquire) == epoch) {
    // The server died while its nodes or handles were found again in it (or a file
    // was lent by it): the request was not sent, so it waits for the next server,
    // whatever it is. (Answered EBADF or ESTALE before, for a descriptor that was
    // fine; or sent to the dead server, and then EIO if it was a change.)
    Requeue(std::move(msg), epoch);
    return;
  }
  if (error) {
    Answer(counters(), std::move(msg), error);
    return;
  }
  msgport::EncodeVfsRequest(r, msg->payload);
  m.relay.epoch = epoch;
  ++m.relay.sends;
  msg->reply_port = this;
  msgport::Send(*server, std::move(msg));
}

void IsolatedPort::TranslateChanged(std::vector<uint64_t>& changed, uint64_t epoch) {
  // Nodes whose attributes changed besides: by the kernel's ids. One the kernel does
  // not hold (or one of a server that died since) has nothing cached to drop.
  size_t kept = 0;
  for (const uint64_t server_id : changed) {
    if (server_id == kRootServerNode) {
      changed[kept++] = kRootServerNode;
    } else if (auto it = by_server_id_.find(server_id); epoch == map_epoch_ && it != by_server_id_.end()) {
      changed[kept++] = MakeId(it->second, nodes_[it->second].generation);
    }
  }
  changed.resize(kept);
}

void IsolatedPort::Translate(VfsMessage& m) {
  msgport::VfsRequest& r = m.req;
  std::lock_guard lock(map_mu_);
  const uint64_t epoch = m.relay.epoch;
  auto new_handle = [&](uint64_t server_fh, uint64_t node, int flags, bool dir) {
    uint32_t index;
    if (!free_handles_.empty()) {
      index = free_handles_.back();
      free_handles_.pop_back();
    } else {
      index = static_cast<uint32_t>(handles_.size());
      handles_.emplace_back();
    }
    handles_[index] = KHandle{true, server_fh, epoch, node, flags & ~(O_CREAT | O_EXCL | O_TRUNC), dir};
    if (KNode* n = Node(node); n != nullptr && !dir) {
      ++n->opens;
      // The file's descriptor, given for the kernel to read and write it by, or with
      // an O_TMPFILE file's create for this port to keep (with no backing file).
      if (!m.fds.empty() && (r.open.backing_fd >= 0 ? m.fds.front().get() == r.open.backing_fd : msgport::IsTmpfile(r)))
        KeepFile(node, m.fds.front());
    }
    return uint64_t{index} + 1;
  };
  TranslateChanged(r.changed, epoch);
  // A file of no name copied (an overlay's copy-up): a new server is given the copy.
  if (r.copy_fd >= 0 && !m.fds.empty() && m.fds.front().get() == r.copy_fd)
    KeepFile(m.relay.node, m.fds.front(), r.copy_tag, /*replace=*/true);
  switch (r.op) {
    case VfsOp::kLookup:
    case VfsOp::kMkNod:
    case VfsOp::kMkDir:
    case VfsOp::kSymlink:
    case VfsOp::kLink:
    case VfsOp::kCreate: {
      const bool link = r.op == VfsOp::kLink;
      const uint64_t id = KernelNode(r.entry.ino, epoch, link ? m.relay.node2 : m.relay.node, link ? r.name2 : r.name,
                                     r.entry.attr.st_ino, /*found=*/r.op == VfsOp::kLookup);
      r.entry.ino = id;
      r.entry.generation = GenerationOf(id);
      if (r.op == VfsOp::kCreate) r.open.fh = new_handle(r.open.fh, id, r.flags, false);
      break;
    }
    case VfsOp::kGetAttr:
    case VfsOp::kSetAttr:
      if (KNode* n = Node(m.relay.node); n != nullptr && r.out_attr.st_ino != 0) n->ino = r.out_attr.st_ino;
      break;
    case VfsOp::kOpen:
    case VfsOp::kOpenDir:
      r.open.fh = new_handle(r.open.fh, m.relay.node, r.flags, r.op == VfsOp::kOpenDir);
      break;
    case VfsOp::kRelease:
    case VfsOp::kReleaseDir:
      FreeHandle(m.relay.fh);
      break;
    case VfsOp::kReadDirPlus: {
      // The records carry the server's node ids: give the kernel its own.
      msgport::ForEachDirentPlus(r.out, [&](const fuse_direntplus& record, size_t pos) {
        if (record.entry_out.nodeid == 0 || record.dirent.namelen > 255) return;
        fuse_entry_out entry = record.entry_out;
        const std::string_view name(r.out.data() + pos + FUSE_NAME_OFFSET_DIRENTPLUS, record.dirent.namelen);
        entry.nodeid = KernelNode(entry.nodeid, epoch, m.relay.node, name, entry.attr.ino, /*found=*/true);
        entry.generation = GenerationOf(entry.nodeid);
        std::memcpy(r.out.data() + pos, &entry, sizeof entry);
      });
      break;
    }
    case VfsOp::kUnlink:
    case VfsOp::kRmDir:
      Orphan(NameKey{m.relay.node, r.name});
      break;
    case VfsOp::kRename: {
      const NameKey from{m.relay.node, r.name}, to{m.relay.node2, r.name2};
      auto a = by_name_.find(from);
      const uint32_t moving = a == by_name_.end() ? 0 : a->second;
      auto b = by_name_.find(to);
      const uint32_t other = b == by_name_.end() ? 0 : b->second;
      by_name_.erase(from);
      if ((r.flags & RENAME_EXCHANGE) || other == moving) {
        by_name_.erase(to);
      } else {
        Orphan(to);  // replaced
      }
      if (moving != 0) {
        nodes_[moving].parent = m.relay.node2;
        nodes_[moving].name = r.name2;
        Name(moving);
      }
      if ((r.flags & RENAME_EXCHANGE) && other != 0) {
        nodes_[other].parent = m.relay.node;
        nodes_[other].name = r.name;
        Name(other);
      }
      break;
    }
    default:
      break;
  }
}

void IsolatedPort::PutReply(MessagePtr msg) {
  auto& m = static_cast<VfsMessage&>(*msg);
  if (msg->error == ECONNRESET && !source_->resend_in_flight()) {
    // The server went with it; this kind of server's requests fail then (a remote
    // agent may have done it or not). Take that server out of service at once.
    std::lock_guard lock(server_mu_);
    if (server_ != nullptr && epoch_ == m.relay.epoch) server_ = nullptr;
  } else if (msg->error == ECONNRESET) {  // the server died with it
    if (Resendable(m.req) && m.relay.sends < kMaxSends) {
      Requeue(std::move(msg), m.relay.epoch);
      return;
    }
    msg->error = EIO;
    if (m.req.op == VfsOp::kRename && check_identity_) {
      try {
        MaybeRenamed(m);  // done or not: the node may be found by either name
      } catch (...) {
        // Out of memory: the node is found by its old name only, as without this.
      }
    }
  } else {
    answered_.fetch_add(1, std::memory_order_relaxed);
  }
  if (msg->error == 0) {
    if (!msgport::DecodeVfsReply(msg->payload, m.req, msg->fds)) {
      Logger("vfs")->error("isolated server: a malformed {} reply; answering EIO", msgport::VfsOpName(m.req.op));
      msg->error = EIO;
    } else {
      try {
        Translate(m);
      } catch (...) {
        msg->error = ENOMEM;
      }
    }
  } else if (!msg->payload.empty()) {
    // A failed request that changed nodes on its way (an overlay's copy-up before the
    // upper layer refused) says which (EncodeFailedVfsReply).
    try {
      std::vector<uint64_t> changed = msgport::DecodeFailedVfsReply(msg->payload);
      if (!changed.empty()) {
        std::lock_guard lock(map_mu_);
        TranslateChanged(changed, m.relay.epoch);
        m.req.changed = std::move(changed);
      }
    } catch (...) {
      // Out of memory: the kernel's cached attributes stay until their timeout.
    }
  }
  counters().replied.fetch_add(1, std::memory_order_relaxed);  // the server's answer, whatever its errno
  // The reply goes up with the kernel's ids in it, not this server's: the shim keys
  // what it keeps per node (a backing file) by them, and a new server numbers its
  // nodes afresh, so its id of one file may be a dead server's id of another.
  m.req.node = m.relay.node;
  m.req.node2 = m.relay.node2;
  m.req.fh = m.relay.fh;
  m.req.fh2 = m.relay.fh2;
  msgport::Port* up = m.relay.reply_port;
  msg->reply_port = up;
  if (up != nullptr) {
    up->PutReply(std::move(msg));
  } else {
    msg.reset();
  }
}

// --- the server process ------------------------------------------------------------

namespace {

// Most requests an isolated server serves at once beside one held up in its stack.
constexpr size_t kIsolatedHelpers = 16;

class IsolatedServer final : public msgport::Server {
 public:
  explicit IsolatedServer(vfs::Layer& top) : top_(top) {}
  void Serve(MessagePtr msg) noexcept override {
    if (msg->command == 0 || msg->command >= static_cast<uint32_t>(VfsOp::kCount)) {
      msgport::Reply(std::move(msg), EINVAL);
      return;
    }
    msgport::VfsRequest req;
    req.op = static_cast<VfsOp>(msg->command);
    std::vector<char> storage;
    if (!msgport::DecodeVfsRequest(msg->payload, req, storage)) {
      msgport::Reply(std::move(msg), EBADMSG);
      return;
    }
    // Descriptors a request brings (adopt's file) are the request's, closed with it,
    // never sent back with the reply.
    const std::vector<UniqueFd> given = std::move(msg->fds);
    msg->fds.clear();
    if (req.op == VfsOp::kAdopt) req.in_fd = given.empty() ? -1 : given.front().get();
    const int error = top_.Serve(req);
    try {
      // The file's descriptor, sent with the reply (the stack keeps its own): for the
      // shim to give the kernel (the backing file of an open or create), or for the
      // relay to keep (a lend; an O_TMPFILE file's; a copy's).
      int give = -1;
      if (error == 0 && req.open.backing_fd >= 0 &&
          (req.op == VfsOp::kOpen || req.op == VfsOp::kCreate || req.op == VfsOp::kLend)) {
        give = req.open.backing_fd;
      } else if (error == 0 && msgport::IsTmpfile(req)) {
        // An O_TMPFILE file served through the stack: no name ever leads to it, so the
        // relay is given its descriptor to keep (with no backing file in the reply:
        // not for the kernel's reads and writes), as a kLend would, without the trip.
        // (Its tag is 0: such a file is made on an overlay's upper side.)
        msgport::VfsRequest lend;
        lend.op = VfsOp::kLend;
        lend.ctx = req.ctx;
        lend.node = req.entry.ino;
        lend.fh = req.open.fh;
        if (top_.Serve(lend) == 0) give = lend.open.backing_fd;
      } else if (error == 0 && req.open.backing_fd < 0 && req.copy_fd >= 0) {
        give = req.copy_fd;  // a file of no name changed in a copy (VfsRequest::copy_fd)
      }
      if (give >= 0) {
        if (const int copy = ::fcntl(give, F_DUPFD_CLOEXEC, 0); copy >= 0) {
          msg->fds.emplace_back(copy);
        } else if (give == req.open.backing_fd) {
          req.open.backing_fd = -1;  // served through the stack, then
        }
      }
      if (msg->fds.empty()) req.copy_fd = -1;  // not said to be sent
      if (error == 0) {
        msgport::EncodeVfsReply(req, msg->payload);
      } else if (!req.changed.empty()) {
        msgport::EncodeFailedVfsReply(req, msg->payload);  // the nodes it changed on its way
      } else {
        msg->payload.clear();
      }
      msgport::Reply(std::move(msg), error);
    } catch (...) {
      msgport::Reply(std::move(msg), ENOMEM);
    }
  }

 private:
  vfs::Layer& top_;
};

// The port a SIGTERM stops (the supervisor's way to end the server at unmount): the
// stack is then destroyed in order, and a trace writes its last lines. Before, the
// signal's default action ended the process, and what the trace held was lost.
msgport::ShmServerPort* g_serving = nullptr;

extern "C" void OnTerm(int) {
  static volatile sig_atomic_t again = 0;
  if (again) _exit(128 + SIGTERM);
  again = 1;
  ::alarm(2);  // a request held up for good must not keep it: SIGALRM's default ends it
  if (g_serving != nullptr) g_serving->Stop();
}

}  // namespace

int ServeIsolated(const std::string& segment, int socket_fd, const std::string& spec) {
  // The stack first: a server that cannot build it never says hello, and the shim
  // reports that it did not start.
  auto top = vfs::BuildStack(spec);
  if (!top) {
    std::fprintf(stderr, "ulsp: isolated server: %s\n", top.error().c_str());
    return 1;
  }
  auto port = msgport::ShmServerPort::Attach(segment, UniqueFd(socket_fd));
  if (!port) {
    std::fprintf(stderr, "ulsp: isolated server: cannot attach to %s: %s\n", segment.c_str(),
                 port.error().Describe().c_str());
    return 1;
  }
  IsolatedServer server(**top);
  g_serving = port->get();
  struct sigaction term {};
  term.sa_handler = OnTerm;
  ::sigaction(SIGTERM, &term, nullptr);
  // A request held up in the stack (a hung file system below) leaves the others to
  // helper threads, as an in-process mount's spare readers do.
  (*port)->Serve(server, kIsolatedHelpers);
  return 0;
}

}  // namespace ulsp::core
