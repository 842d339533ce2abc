#include "ulsp/core/agent.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/async-unix.h>
#include <kj/compat/tls.h>
#include <kj/debug.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

#include "kernel/msgport/agent.capnp.h"
#include "kernel/msgport/agent_wire.h"
#include "kernel/msgport/log.h"
#include "kernel/msgport/own_file.h"
#include "kernel/msgport/unique_fd.h"
#include "kernel/msgport/vfs_codec.h"
#include "ulsp/core/registry.h"
#include "ulsp/core/tls_files.h"
#include "ulsp/vfs/stack.h"

namespace ulsp::core {
namespace {

using msgport::wire::Agent;
using msgport::wire::Stack;

using msgport::AgentFrameLimits;
using msgport::kAgentProtocolVersion;

// Threads that serve requests off the event loop, so a request that blocks (a FIFO,
// a slow disk) holds up no other.
class Workers {
 public:
  explicit Workers(unsigned n) {
    for (unsigned i = 0; i < n; ++i) threads_.emplace_back([this] { Run(); });
  }
  ~Workers() {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void Submit(std::function<void()> job) {
    {
      std::lock_guard lock(mu_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
  }

 private:
  void Run() {
    std::unique_lock lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      auto job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      job();
      lock.lock();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

// Files the relays of remote mounts asked this agent to hold (VfsOp::kLend). A file a
// program there has open is losing its last name (an unlink, a rename onto it), and
// its descriptor cannot cross the network to be kept there, as an isolated mount keeps
// one for a new server. The agent keeps it, under a random name that the lend
// answers, so that the new stack of the mount's next connection can adopt it
// (kAdopt with that name). A file is let go when the stack holding it has released
// its last handle of it, or kGrace after that stack's connection ended without
// another stack adopting it (checked at the next lend, adopt or disconnect).
class HeldFiles {
 public:
  static constexpr size_t kPerStack = 1024;
  static constexpr auto kGrace = std::chrono::minutes(10);
  using Clock = std::chrono::steady_clock;

  // Holds a copy of `fd` (`tag`: what the stack's lend answered) for node `node` of
  // stack `stack`, which serves export `export_name`. Returns its name, or 0 when the
  // stack holds kPerStack files already or the copy failed.
  uint64_t Hold(uint64_t stack, const std::string& export_name, uint64_t node, int fd, uint64_t tag) {
    UniqueFd copy(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
    if (!copy) return 0;
    std::lock_guard lock(mu_);
    Sweep();
    if (std::ranges::count_if(held_, [&](const auto& h) { return h.second.stack == stack; }) >= static_cast<long>(kPerStack))
      return 0;
    uint64_t name = 0;
    while (name == 0 || held_.contains(name))
      if (::getrandom(&name, sizeof name, 0) != static_cast<ssize_t>(sizeof name)) return 0;
    held_.emplace(name, Held{std::move(copy), tag, export_name, stack, node, Clock::time_point::max()});
    return name;
  }
  // For an adopt of `name` by a stack of export `export_name`: a copy of the file's
  // descriptor and its tag; none when no such file is held for that export.
  std::optional<std::pair<UniqueFd, uint64_t>> Find(uint64_t name, const std::string& export_name) {
    std::lock_guard lock(mu_);
    Sweep();
    auto it = held_.find(name);
    if (it == held_.end() || it->second.export_name != export_name) return std::nullopt;
    UniqueFd copy(::fcntl(it->second.fd.get(), F_DUPFD_CLOEXEC, 0));
    if (!copy) return std::nullopt;
    return std::pair{std::move(copy), it->second.tag};
  }
  // Adopted as node `node` of `stack`: held for it now.
  void Adopted(uint64_t name, uint64_t stack, uint64_t node) {
    std::lock_guard lock(mu_);
    if (auto it = held_.find(name); it != held_.end()) {
      it->second.stack = stack;
      it->second.node = node;
      it->second.expires = Clock::time_point::max();
    }
  }
  // A change to node `node` of `stack` copied its file (an overlay's copy-up of a
  // removed lower file, VfsRequest::copy_fd): the copy is held in its place.
  void Copied(uint64_t stack, uint64_t node, int fd, uint64_t tag) {
    std::lock_guard lock(mu_);
    for (auto& [name, h] : held_) {
      if (h.stack != stack || h.node != node) continue;
      if (UniqueFd copy(::fcntl(fd, F_DUPFD_CLOEXEC, 0)); copy) {
        h.fd = std::move(copy);
        h.tag = tag;
      }
    }
  }
  // `stack` released its last handle of node `node`.
  void Closed(uint64_t stack, uint64_t node) {
    std::lock_guard lock(mu_);
    std::erase_if(held_, [&](const auto& h) { return h.second.stack == stack && h.second.node == node; });
  }
  // `stack` is gone (its connection ended): its files wait kGrace for an adopt.
  void Ended(uint64_t stack) {
    std::lock_guard lock(mu_);
    const auto until = Clock::now() + kGrace;
    for (auto& [name, h] : held_)
      if (h.stack == stack) h.expires = until;
    Sweep();
  }
  size_t Count() const {
    std::lock_guard lock(mu_);
    return held_.size();
  }

 private:
  struct Held {
    UniqueFd fd;
    uint64_t tag = 0;
    std::string export_name;
    uint64_t stack = 0, node = 0;
    Clock::time_point expires;
  };
  void Sweep() {  // with mu_ held
    const auto now = Clock::now();
    std::erase_if(held_, [&](const auto& h) { return h.second.expires <= now; });
  }
  mutable std::mutex mu_;
  std::unordered_map<uint64_t, Held> held_;
};

// What a stack's files are to the agent: the handles it was given, and how many it
// has open of each node (a file held for a node is let go with the last), counted as
// requests are served, on the event loop or a worker.
//
// A request may name only handles its own connection was given: a passthrough handle
// is a descriptor number of the agent's, and a peer once read another connection's
// files (another export's) by naming theirs, and could write to the agent's sockets.
// A handle is in use while a request that names it is served; a release that comes
// then is done by the last of them, so no descriptor is closed under a request and
// taken by another connection's open meanwhile.
class StackFiles {
  struct Handle {
    uint32_t opens = 0;                          // opens that answered it, not released
    uint32_t uses = 0;                           // requests being served that name it
    std::optional<msgport::VfsRequest> release;  // one that waits for them
  };
  using Handles = std::unordered_map<uint64_t, Handle>;

 public:
  static constexpr int kLater = -1;  // Use: a release, done when the handle's uses end
  // The handles a request was let use (a layer may change the request's own fields).
  struct InUse {
    Handles* handles = nullptr;  // its files' or directories', or none
    uint64_t fh = 0, fh2 = 0;
    bool two = false;  // fh2 too (copy_file_range)
  };

  StackFiles(HeldFiles& held, std::string export_name) : held_(held), export_name_(std::move(export_name)) {
    static std::atomic<uint64_t> next{1};
    id_ = next.fetch_add(1, std::memory_order_relaxed);
  }
  ~StackFiles() { held_.Ended(id_); }
  StackFiles(const StackFiles&) = delete;
  StackFiles& operator=(const StackFiles&) = delete;

  // Before `req` is served: 0 (`used` says what it uses), EBADF for a handle this
  // connection was not given (or is releasing), or kLater for a release left to the
  // handle's last use (Served).
  int Use(const msgport::VfsRequest& req, InUse& used) {
    auto* handles = HandlesOf(req);
    if (handles == nullptr) return 0;
    std::lock_guard lock(mu_);
    auto it = handles->find(req.fh);
    if (it == handles->end() || it->second.opens == 0) return EBADF;  // (or it is being released)
    if (req.op == msgport::VfsOp::kRelease || req.op == msgport::VfsOp::kReleaseDir) {
      // (A handle a layer gives every file alike, memfs's 0, is open as often as given.)
      if (--it->second.opens > 0) return 0;
      if (it->second.uses > 0) {
        it->second.release = req;
        return kLater;
      }
      handles->erase(it);  // before the descriptor closes: an open may get its number
      return 0;
    }
    used = {handles, req.fh, req.fh2, req.op == msgport::VfsOp::kCopyFileRange};
    if (used.two) {
      auto out = handles->find(req.fh2);
      if (out == handles->end() || out->second.opens == 0) return EBADF;
      ++out->second.uses;
    }
    ++it->second.uses;
    return 0;
  }

  // After `req` was served (Use said 0, and what it used): returns a release that
  // waited for it, to serve now.
  std::optional<msgport::VfsRequest> Served(const msgport::VfsRequest& req, int error, const InUse& used) {
    using msgport::VfsOp;
    bool closed = false;
    std::optional<msgport::VfsRequest> later;
    {
      std::lock_guard lock(mu_);
      if (error == 0 && req.op == VfsOp::kOpen) {
        ++opens_[req.node];
        ++files_[req.open.fh].opens;
      } else if (error == 0 && req.op == VfsOp::kCreate) {
        ++opens_[req.entry.ino];
        ++files_[req.open.fh].opens;
      } else if (error == 0 && req.op == VfsOp::kOpenDir) {
        ++dirs_[req.open.fh].opens;
      } else if (req.op == VfsOp::kRelease) {
        if (auto it = opens_.find(req.node); it != opens_.end() && --it->second == 0) {
          opens_.erase(it);
          closed = true;
        }
      }
      if (used.handles != nullptr) {
        auto done = [&](uint64_t fh) {
          auto it = used.handles->find(fh);
          if (it == used.handles->end() || --it->second.uses > 0 || !it->second.release) return;
          later = std::move(it->second.release);
          it->second.release.reset();
          if (it->second.opens == 0) used.handles->erase(it);  // (else opened again meanwhile: memfs's 0)
        };
        done(used.fh);
        if (used.two) done(used.fh2);
      }
    }
    if (closed) held_.Closed(id_, req.node);
    if (error == 0 && req.copy_fd >= 0) held_.Copied(id_, req.node, req.copy_fd, req.copy_tag);
    return later;
  }
  HeldFiles& held() { return held_; }
  uint64_t id() const { return id_; }
  const std::string& export_name() const { return export_name_; }

 private:
  // The handles `req` names: its file's or directory's, or none.
  Handles* HandlesOf(const msgport::VfsRequest& req) {
    if (req.op == msgport::VfsOp::kLend) return &files_;  // (the relay's own, not the kernel's)
    if (!msgport::UsesHandle(req)) return nullptr;
    return msgport::UsesDirHandle(req.op) ? &dirs_ : &files_;
  }

  HeldFiles& held_;
  const std::string export_name_;
  uint64_t id_ = 0;
  std::mutex mu_;
  std::unordered_map<uint64_t, uint32_t> opens_;  // node -> handles open
  Handles files_, dirs_;
};

// One request, served: what a Stack call answers.
struct Outcome {
  int32_t error = 0;
  std::vector<std::byte> reply;
  std::vector<char> prefetch;  // an open's first bytes (agent.capnp)
  bool prefetch_eof = false;   // ... or: the listing is complete
  std::vector<std::vector<char>> listing;  // an opendir's readdirplus replies
};

// A request of the agent's own on the file or directory `opened` opened, as its
// caller, through the handle it got.
msgport::VfsRequest FollowUp(const msgport::VfsRequest& opened, msgport::VfsOp op) {
  msgport::VfsRequest r;
  r.op = op;
  r.ctx = opened.ctx;
  r.node = opened.node;
  r.fh = opened.open.fh;
  r.timeout = opened.timeout;
  return r;
}

// An opendir: reads the listing through the stack, in the chunks the kernel will ask
// for, so those requests need no round trip.
void PrefetchListing(vfs::Layer& top, const msgport::VfsRequest& opendir, uint32_t chunk, Outcome& out) {
  if (chunk == 0 || opendir.open.cache_readdir) return;
  chunk = std::min<uint32_t>(chunk, 128 * 1024);
  size_t total = 0;
  int64_t offset = 0;
  while (total + chunk <= msgport::kAgentListingMax) {
    msgport::VfsRequest rd = FollowUp(opendir, msgport::VfsOp::kReadDirPlus);
    rd.offset = offset;
    rd.size = chunk;
    if (top.Serve(rd) != 0) break;
    if (rd.out.empty()) {
      out.prefetch_eof = true;
      break;
    }
    // Where the next one starts: the last record's offset.
    msgport::ForEachDirentPlus(rd.out, [&](const fuse_direntplus& d, size_t) { offset = static_cast<int64_t>(d.dirent.off); });
    total += rd.out.size();
    out.listing.push_back(std::move(rd.out));
  }
}

// A read-only open of a small regular file: reads the file through the stack, as the
// kernel's first read will ask, so that read needs no round trip.
void Prefetch(vfs::Layer& top, const msgport::VfsRequest& open, Outcome& out) {
  if ((open.flags & O_ACCMODE) != O_RDONLY || (open.flags & O_DIRECT) || open.open.direct_io || open.open.nonseekable)
    return;
  msgport::VfsRequest stat = FollowUp(open, msgport::VfsOp::kGetAttr);  // of the node (has_fh false)
  if (top.Serve(stat) != 0 || !S_ISREG(stat.out_attr.st_mode) || stat.out_attr.st_size > msgport::kAgentPrefetchMax) return;
  msgport::VfsRequest read = FollowUp(open, msgport::VfsOp::kRead);
  read.has_fh = true;
  read.size = msgport::kAgentPrefetchMax;
  if (top.Serve(read) != 0 || read.out_fd >= 0) return;
  out.prefetch = std::move(read.out);
  out.prefetch_eof = out.prefetch.size() < msgport::kAgentPrefetchMax;
}

// A request as it came: decoded (its `in` data lives in `storage`).
struct Request {
  msgport::VfsRequest req;
  std::vector<char> storage;
  uint32_t listing_chunk = 0;
  StackFiles::InUse used;  // the handles it names
  kj::Own<kj::CrossThreadPromiseFulfiller<Outcome>> done;  // served by a worker: the answer
};

// After `req` was served: counted, and a release that waited for it served (its peer
// had its answer).
void Served(vfs::Layer& top, StackFiles& files, const msgport::VfsRequest& req, int error, const StackFiles::InUse& used) {
  if (auto release = files.Served(req, error, used)) {
    const int released = top.Serve(*release);
    (void)files.Served(*release, released, {});
  }
}

Outcome ServeOne(vfs::Layer& top, StackFiles& files, Request& r) {
  Outcome out;
  msgport::VfsRequest& req = r.req;
  out.error = top.Serve(req);
  Served(top, files, req, out.error, r.used);
  if (out.error == 0) {
    try {
      msgport::EncodeVfsReply(req, out.reply);
      if (req.op == msgport::VfsOp::kOpen) Prefetch(top, req, out);
      if (req.op == msgport::VfsOp::kOpenDir) PrefetchListing(top, req, r.listing_chunk, out);
    } catch (...) {
      out.error = ENOMEM;
    }
  } else if (!req.changed.empty()) {
    try {
      msgport::EncodeFailedVfsReply(req, out.reply);  // the nodes it changed on its way
    } catch (...) {
      out.reply.clear();
    }
  }
  return out;
}

// A relay's lend (the file a program there has open is losing its last name) or adopt
// (after it connected again): the file held here, by name (HeldFiles).
Outcome HoldOrAdopt(vfs::Layer& top, StackFiles& files, Request& r) {
  msgport::VfsRequest& req = r.req;
  Outcome out;
  if (req.op == msgport::VfsOp::kLend) {
    out.error = top.Serve(req);
    Served(top, files, req, out.error, r.used);
    if (out.error == 0) {
      const uint64_t name =
          req.open.backing_fd < 0 ? 0 : files.held().Hold(files.id(), files.export_name(), req.node, req.open.backing_fd, req.open.fh);
      if (name == 0) {
        out.error = EMFILE;  // the stack holds as many as it may: the relay keeps nothing this time
        Logger("agent")->warn("export {}: a file losing its last name is not held: {} held for one connection already",
                              files.export_name(), HeldFiles::kPerStack);
      }
      req.open = {};
      req.open.fh = name;
      req.open.held = true;
    }
  } else {
    const uint64_t name = req.fh;
    auto file = files.held().Find(name, files.export_name());
    if (!file) {
      out.error = ESTALE;  // let go already (closed, or its grace ran out)
    } else {
      req.in_fd = file->first.get();
      req.fh = file->second;
      out.error = top.Serve(req);
      req.in_fd = -1;
      if (out.error == 0) files.held().Adopted(name, files.id(), req.entry.ino);
    }
  }
  if (out.error == 0) {
    try {
      msgport::EncodeVfsReply(req, out.reply);
    } catch (...) {
      out.error = ENOMEM;
    }
  }
  return out;
}

// Whether a request is served on the event loop: it is quick and cannot wait for
// another program (metadata; the open of a regular file). The others (a FIFO's or a
// device's open, any read or write, fsync ...) go to a worker, so one that blocks
// holds up nobody else. Each hand-over to a worker and back costs two thread
// wake-ups, a good part of a round trip.
bool Quick(vfs::Layer& top, const msgport::VfsRequest& req) {
  using msgport::VfsOp;
  switch (req.op) {
    case VfsOp::kLookup:
    case VfsOp::kForget:
    case VfsOp::kGetAttr:
    case VfsOp::kReadLink:
    case VfsOp::kOpenDir:
    case VfsOp::kReadDir:
    case VfsOp::kReadDirPlus:
    case VfsOp::kReleaseDir:
    case VfsOp::kRelease:
    case VfsOp::kStatFs:
    case VfsOp::kGetXattr:
    case VfsOp::kListXattr:
    case VfsOp::kAccess:
      return true;
    case VfsOp::kOpen: {
      if (req.flags & O_TRUNC) return false;
      msgport::VfsRequest stat;
      stat.op = VfsOp::kGetAttr;
      stat.ctx = req.ctx;
      stat.node = req.node;
      return top.Serve(stat) == 0 && S_ISREG(stat.out_attr.st_mode);
    }
    default:
      return false;
  }
}

void SetResults(Stack::CallResults::Builder results, const Outcome& out) {
  results.setError(out.error);
  auto bytes = [](const auto& v) { return capnp::Data::Reader(reinterpret_cast<const kj::byte*>(v.data()), v.size()); };
  if (!out.reply.empty()) results.setReply(bytes(out.reply));
  if (!out.prefetch.empty() || out.prefetch_eof) {
    results.setPrefetch(bytes(out.prefetch));
    results.setPrefetchEof(out.prefetch_eof);
  }
  if (!out.listing.empty()) {
    auto listing = results.initListing(static_cast<unsigned>(out.listing.size()));
    for (unsigned i = 0; i < out.listing.size(); ++i) listing.set(i, bytes(out.listing[i]));
  }
}

// A stack of this connection's: its own node ids and open files, dropped with it.
class StackImpl final : public Stack::Server {
 public:
  StackImpl(std::shared_ptr<vfs::Layer> top, std::shared_ptr<StackFiles> files, Workers& workers,
            std::atomic<uint64_t>& calls)
      : top_(std::move(top)), files_(std::move(files)), workers_(workers), calls_(calls) {}

  kj::Promise<void> call(CallContext context) override {
    calls_.fetch_add(1, std::memory_order_relaxed);
    auto params = context.getParams();
    const uint32_t op = params.getOp();
    auto request = std::make_shared<Request>();
    request->listing_chunk = params.getListingChunk();
    if (op == 0 || op >= static_cast<uint32_t>(msgport::VfsOp::kCount)) {
      context.getResults().setError(EINVAL);
      return kj::READY_NOW;
    }
    request->req.op = static_cast<msgport::VfsOp>(op);
    auto data = params.getRequest();
    if (!msgport::DecodeVfsRequest(std::as_bytes(std::span(data.begin(), data.size())), request->req, request->storage)) {
      context.getResults().setError(EBADMSG);
      return kj::READY_NOW;
    }
    request->req.kernel_io_ok = false;  // no descriptor crosses the network
    request->req.handleless_ok = false;  // an opendir brings its listing with it
    context.releaseParams();
    if (const int use = files_->Use(request->req, request->used); use == StackFiles::kLater) {
      Outcome out;  // a release, answered now: done when the handle's requests are
      try {
        msgport::EncodeVfsReply(request->req, out.reply);
      } catch (...) {
        out.error = ENOMEM;
      }
      SetResults(context.getResults(), out);
      return kj::READY_NOW;
    } else if (use != 0) {
      context.getResults().setError(use);
      return kj::READY_NOW;
    }
    if (request->req.op == msgport::VfsOp::kLend || request->req.op == msgport::VfsOp::kAdopt) {
      SetResults(context.getResults(), HoldOrAdopt(*top_, *files_, *request));
      return kj::READY_NOW;
    }
    if (Quick(*top_, request->req)) {
      SetResults(context.getResults(), ServeOne(*top_, *files_, *request));
      return kj::READY_NOW;
    }
    auto paf = kj::newPromiseAndCrossThreadFulfiller<Outcome>();
    request->done = kj::mv(paf.fulfiller);
    workers_.Submit([request, top = top_, files = files_]() {
      Outcome out;
      try {
        out = ServeOne(*top, *files, *request);
      } catch (...) {
        out.error = EIO;
      }
      request->done->fulfill(kj::mv(out));
    });
    return paf.promise.then([context](Outcome&& out) mutable { SetResults(context.getResults(), out); });
  }

  kj::Promise<void> ping(PingContext) override { return kj::READY_NOW; }

 private:
  std::shared_ptr<vfs::Layer> top_;
  std::shared_ptr<StackFiles> files_;  // (a worker may still count after the connection went)
  Workers& workers_;
  std::atomic<uint64_t>& calls_;
};

struct Shared {
  AgentOptions options;
  std::string token;
  Workers* workers = nullptr;
  HeldFiles held;
  std::atomic<uint64_t> connections{0}, refused{0}, attached{0}, calls{0};
};

// Compares in time that does not depend on where the first difference is.
bool SameSecret(capnp::Data::Reader given, const std::string& secret) {
  if (given.size() != secret.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < secret.size(); ++i) diff |= static_cast<unsigned char>(given[i] ^ static_cast<unsigned char>(secret[i]));
  return diff == 0;
}

// The bootstrap capability of one connection.
class AgentImpl final : public Agent::Server {
 public:
  AgentImpl(Shared& shared, std::string peer) : shared_(shared), peer_(std::move(peer)) {}

  kj::Promise<void> attach(AttachContext context) override {
    auto params = context.getParams();
    const std::string name = params.getName();
    auto token = params.getToken();
    if (!shared_.token.empty()) {
      if (token.size() == 0) {  // a mount without --token-file: tell it what is missing
        ++shared_.refused;
        Logger("agent")->warn("refused {}: no token", peer_);
        return KJ_EXCEPTION(FAILED, "no token (this agent asks for one: give --token-file)");
      }
      const bool same = SameSecret(token, shared_.token);
      if (!same) {
        ++shared_.refused;
        Logger("agent")->warn("refused {}: wrong token", peer_);
        return KJ_EXCEPTION(FAILED, "wrong token");
      }
    }
    auto it = shared_.options.exports.find(name);
    if (it == shared_.options.exports.end()) {
      std::string names;
      for (const auto& [n, spec] : shared_.options.exports) names += (names.empty() ? "" : ", ") + n;
      Logger("agent")->warn("refused {}: no export '{}'", peer_, name);
      return KJ_EXCEPTION(FAILED, kj::str("no export '", name.c_str(), "' (exports: ", names.c_str(), ")"));
    }
    auto top = vfs::BuildStack(it->second);
    if (!top) {
      Logger("agent")->error("export {}: {}", name, top.error());
      return KJ_EXCEPTION(FAILED, kj::str("export '", name.c_str(), "' cannot be served: ", top.error().c_str()));
    }
    ++shared_.attached;
    Logger("agent")->info("{} attached to {}", peer_, name);
    auto results = context.getResults();
    results.setStack(kj::heap<StackImpl>(std::shared_ptr<vfs::Layer>(std::move(*top)),
                                         std::make_shared<StackFiles>(shared_.held, name), *shared_.workers,
                                         shared_.calls));
    results.setVersion(kAgentProtocolVersion);
    return kj::READY_NOW;
  }

 private:
  Shared& shared_;
  std::string peer_;
};

// A connection: its stream, its RPC system; gone when the peer goes.
struct Connection {
  kj::Own<kj::AsyncIoStream> stream;
  capnp::TwoPartyVatNetwork network;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpc;
  Connection(kj::Own<kj::AsyncIoStream> s, capnp::Capability::Client bootstrap)
      : stream(kj::mv(s)),
        network(*stream, capnp::rpc::twoparty::Side::SERVER, AgentFrameLimits()),
        rpc(capnp::makeRpcServer(network, kj::mv(bootstrap))) {}
};

}  // namespace

int ServeAgent(const AgentOptions& options) {
  auto fail = [](const std::string& m) {
    std::fprintf(stderr, "ulsp agent: %s\n", m.c_str());
    return 1;
  };
  if (options.exports.empty()) return fail("give at least one --export NAME=SPEC");
  for (const auto& [name, spec] : options.exports) {
    auto check = vfs::BuildStack(spec);  // a bad stack is refused before serving
    if (!check) return fail("--export " + name + ": " + check.error());
  }
  Shared shared;
  shared.options = options;
  if (!options.token_file.empty()) {
    auto token = ReadSecretFile(options.token_file);
    if (!token) return fail(token.error());
    shared.token = std::move(*token);
    while (!shared.token.empty() && (shared.token.back() == '\n' || shared.token.back() == '\r')) shared.token.pop_back();
    if (shared.token.empty()) return fail(options.token_file + ": the token is empty");
  }
  const bool tls = !options.tls_cert.empty() || !options.tls_key.empty() || !options.tls_ca.empty();
  TlsFiles tls_files;
  if (tls) {
    auto read = ReadTlsFiles(options.tls_cert, options.tls_key, options.tls_ca);
    if (!read) return fail(read.error());
    tls_files = std::move(*read);
  }
  ::signal(SIGPIPE, SIG_IGN);
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  ::pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  Workers workers(std::max(1u, options.workers));
  shared.workers = &workers;

  try {
    auto io = kj::setupAsyncIo();
    kj::WaitScope& ws = io.waitScope;
    kj::Own<kj::TlsContext> tls_context;
    kj::Own<kj::TlsKeypair> keypair;
    kj::Vector<kj::TlsCertificate> trusted;
    if (tls) {
      try {
        keypair = kj::heap<kj::TlsKeypair>(
            kj::TlsKeypair{kj::TlsPrivateKey(tls_files.key.c_str()), kj::TlsCertificate(tls_files.cert.c_str())});
        trusted.add(kj::TlsCertificate(tls_files.ca.c_str()));
      } catch (const kj::Exception& e) {
        return fail("TLS: " + msgport::DescribeKjError(e));
      }
      kj::TlsContext::Options o;
      o.useSystemTrustStore = false;
      o.verifyClients = true;
      o.trustedCertificates = trusted.asPtr();
      o.defaultKeypair = *keypair;
      o.timer = io.provider->getTimer();
      o.acceptTimeout = 10 * kj::SECONDS;
      tls_context = kj::heap<kj::TlsContext>(kj::mv(o));
    }
    kj::Own<kj::ConnectionReceiver> listener;
    try {
      auto addr = io.provider->getNetwork().parseAddress(options.listen_host, options.listen_port).wait(ws);
      listener = addr->listen();
    } catch (const kj::Exception& e) {
      return fail("listening on " + msgport::JoinHostPort(options.listen_host, options.listen_port) + ": " + msgport::DescribeKjError(e));
    }
    std::string names;
    for (const auto& [n, spec] : options.exports) names += (names.empty() ? "" : ", ") + n + "=" + spec;
    const std::string listening = msgport::JoinHostPort(options.listen_host, static_cast<int>(listener->getPort()));
    Logger("agent")->info("serving {} on {} ({})", names, listening,
                          tls ? "mutual TLS" : shared.token.empty() ? "no authentication" : "token");

    struct ErrorHandler final : kj::TaskSet::ErrorHandler {
      void taskFailed(kj::Exception&& e) override { Logger("agent")->warn("a connection ended: {}", msgport::DescribeKjError(e)); }
    } errors;
    kj::TaskSet connections(errors);
    std::function<kj::Promise<void>()> accept = [&]() -> kj::Promise<void> {
      return listener->accept().then([&](kj::Own<kj::AsyncIoStream>&& stream) {
        ++shared.connections;
        // A peer that vanished without closing (its host gone, its link cut for good)
        // is given up on within about ten seconds: its mount pings every second, so a
        // live one is never idle that long. Before, the connection stayed until the
        // link came back, and with it the connection's stack: an overlay export (one
        // overlay at a time on an upper directory) refused every other peer meanwhile.
        KJ_IF_MAYBE (fd, stream->getFd()) {
          const int on = 1, idle_s = 5, interval_s = 1, probes = 3;
          const unsigned unacked_ms = 10000;
          (void)::setsockopt(*fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
          (void)::setsockopt(*fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle_s, sizeof idle_s);
          (void)::setsockopt(*fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval_s, sizeof interval_s);
          (void)::setsockopt(*fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof probes);
          (void)::setsockopt(*fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &unacked_ms, sizeof unacked_ms);
        }
        std::string peer = "a peer";
        // A TCP stream knows its peer; a wrapped one may not.
        struct sockaddr_storage ss {};
        kj::uint len = sizeof ss;
        try {
          stream->getpeername(reinterpret_cast<struct sockaddr*>(&ss), &len);
          char host[128] = "";
          if (ss.ss_family == AF_INET) ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&ss)->sin_addr, host, sizeof host);
          if (ss.ss_family == AF_INET6) ::inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr, host, sizeof host);
          if (host[0] != '\0') peer = host;
        } catch (...) {
        }
        kj::Promise<kj::Own<kj::AsyncIoStream>> ready =
            tls_context ? tls_context->wrapServer(kj::mv(stream)) : kj::Promise<kj::Own<kj::AsyncIoStream>>(kj::mv(stream));
        connections.add(ready
                            .then([&shared, peer](kj::Own<kj::AsyncIoStream>&& s) {
                              auto conn = kj::heap<Connection>(kj::mv(s), kj::heap<AgentImpl>(shared, peer));
                              auto gone = conn->network.onDisconnect();
                              return gone.attach(kj::mv(conn)).then([peer] {
                                Logger("agent")->info("{} disconnected", peer);
                              });
                            })
                            .catch_([peer, &shared](kj::Exception&& e) {
                              ++shared.refused;
                              Logger("agent")->warn("refused {}: {}", peer, msgport::DescribeKjError(e));
                            }));
        return accept();
      });
    };
    auto accepting = accept().eagerlyEvaluate([](kj::Exception&& e) {
      Logger("agent")->error("accepting connections failed: {}", msgport::DescribeKjError(e));
    });

    // `ulsp ps` sees the agent.
    auto made = MakeRunDir();
    if (!made) Logger("agent")->warn("`ulsp ps` will not list this agent: {}", made.error());
    const std::string run_dir = made ? *made : std::string();  // "": no control socket
    std::error_code ec;
    auto control = ControlServer::Start(run_dir, [&](StatusBuilder& s) {
      s.kind = "agent";
      s.command = "agent serve " + listening + " " + names;
      s.ulsps.push_back({"agent", tls ? "agent (mutual TLS)" : "agent", static_cast<pid_t>(::getpid()), 0,
                         std::to_string(shared.connections.load()) + " connections, " +
                             std::to_string(shared.attached.load()) + " attached, " + std::to_string(shared.refused.load()) +
                             " refused, " + std::to_string(shared.calls.load()) + " calls, " +
                             std::to_string(shared.held.Count()) + " files held"});
    });

    // Until SIGINT or SIGTERM.
    {
      const UniqueFd sfd(::signalfd(-1, &stop, SFD_CLOEXEC | SFD_NONBLOCK));  // outlives the observer
      kj::UnixEventPort::FdObserver observer(io.unixEventPort, sfd.get(), kj::UnixEventPort::FdObserver::OBSERVE_READ);
      observer.whenBecomesReadable().wait(ws);
    }
    Logger("agent")->info("stopping");
    if (control) control->reset();
    std::filesystem::remove_all(run_dir, ec);
  } catch (const kj::Exception& e) {
    return fail(msgport::DescribeKjError(e));
  }
  return 0;
}

}  // namespace ulsp::core
