// Isolated mode: the layer stack runs in its own ULSP process, reached through a
// shared-memory port, and a supervisor restarts it when it dies.
//
// IsolatedPort is the port the FUSE shim sends to. It owns what the kernel relies on,
// so a restart loses none of it:
//  - node ids: the kernel's ids are the port's own (table index + generation), each
//    mapped to the current server's id, with the name it was looked up by. After a
//    restart, a node is found again in the new server by looking its path up, one
//    component at a time, on the first request that needs it;
//  - open file and directory handles: the kernel's handles are the port's own, each
//    remembering its node and open flags; after a restart a handle is opened again
//    in the new server on first use;
//  - the open files themselves, while they are open, when a server gives their
//    descriptors for the kernel to read and write (kernel passthrough), or lends one
//    (VfsOp::kLend) before a file the kernel has open loses its name through the
//    mount: a file no name finds after a restart (unlinked while open, replaced by a
//    rename, O_TMPFILE) is given to the new server (VfsOp::kAdopt), which makes it a
//    node again. A translation agent (a remote mount's server) holds a lent file
//    itself, as no descriptor crosses a network: the port keeps the name the agent
//    gave it, and gives that back with the adopt after a reconnect.
// A request in flight when the server dies is sent again to the new server when that
// is safe (lookup, getattr, read, readdir, open without O_TRUNC, flush, fsync,
// release ...), and answered EIO otherwise (write, create, unlink, rename, setattr). A
// server killed while it serves is restarted at once; one that dies within a second of
// starting without answering anything is restarted with back-off (100 ms doubling to
// 5 s); after 8 starts in a row that fail before the server says hello, the port gives
// up and answers EIO, so no program waits forever.
//
// Thread-safety: Put and PutReply may be called from any thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/port.h"
#include "kernel/msgport/shm_port.h"
#include "kernel/msgport/unique_fd.h"
#include "kernel/msgport/vfs_message.h"

namespace ulsp::core {

// Where an IsolatedPort's servers come from: each is started (a process spawned, a
// connection to an agent made), watched until it is gone, and replaced. Called from
// the port's supervisor thread, but for Interrupt.
class ServerSource {
 public:
  virtual ~ServerSource() = default;
  // A new server, ready for requests, and its pid (0 when it is no process of ours);
  // nullptr when none could be had (the reason went to the log).
  virtual std::shared_ptr<msgport::Port> Start(pid_t* pid) = 0;
  // Blocks until `server` is gone (its process died, its connection ended), or
  // Interrupt was called.
  virtual void WaitGone(const std::shared_ptr<msgport::Port>& server, pid_t pid) = 0;
  // Ends the current server's life (any thread): the port is going.
  virtual void Interrupt(const std::shared_ptr<msgport::Port>& server, pid_t pid) = 0;
  // Requests in flight when a server goes: sent again to the next one when safe
  // (true), or answered with the error (ECONNRESET).
  virtual bool resend_in_flight() const = 0;
  // Starts failing in a row before the port gives up and answers EIO (0: never).
  virtual unsigned max_start_failures() const = 0;
  // How long a request waits while there is no server before it is answered
  // ETIMEDOUT (0: until one comes).
  virtual std::chrono::milliseconds wait_limit() const = 0;
  // For `ulsp ps`.
  virtual std::string kind() const = 0;
  // Whether each file keeps its inode number (st_ino) for as long as it lives, in
  // every server of this source: then a node found again by name in a new server must
  // have the number it had, or the name now means another file (ESTALE). False when a
  // layer may change it (overlay's copy-up) or it is not known.
  virtual bool stable_inode_numbers() const { return false; }
  virtual std::string peer() const { return ""; }
  virtual double rtt_us() const { return 0; }
};

class IsolatedPort final : public msgport::Port {
 public:
  struct Options {
    std::string spec;         // the stack the server builds
    std::string ulsp_binary;  // the program to run as the server (this one)
    // Set to why a start failed, each time one does ("its shared-memory port (in
    // /dev/shm): No space left on device"), for the caller's error line: the log may
    // go nowhere.
    std::shared_ptr<std::string> why;
  };
  // Starts the first server process and waits for it. Fails with ECHILD when it could
  // not be started or exited before serving (Options::why says which; the server's
  // own messages go to its stderr).
  static Result<std::unique_ptr<IsolatedPort>> Start(Options options);
  // The same with servers from `source` (a translation agent's, say). Fails with
  // ECONNREFUSED when the first server cannot be had.
  static Result<std::unique_ptr<IsolatedPort>> StartWith(std::unique_ptr<ServerSource> source);
  ~IsolatedPort() override;  // stops the supervisor and the server

  void Put(msgport::MessagePtr msg) override;
  void PutReply(msgport::MessagePtr msg) override;
  // The current server's: a thread polling for other work (the FUSE loop's readers)
  // delivers its replies, so the port's reply thread need not be woken.
  bool Poll() override;
  void Helping(bool on) override;
  // The current server's (a restart brings one of the same kind).
  bool Pollable() const noexcept override;

  pid_t server_pid() const noexcept { return server_pid_.load(); }
  uint64_t restarts() const noexcept { return restarts_.load(); }
  size_t NodeCount() const;
  const ServerSource& source() const noexcept { return *source_; }
  // Whether a server serves now.
  bool serving() const;

 private:
  struct KNode {
    bool in_use = false;
    uint32_t generation = 0;
    uint64_t server_id = 0;   // valid in `epoch` only
    uint64_t epoch = 0;
    uint64_t parent = 0;      // kernel id
    std::string name;
    uint64_t ino = 0;             // the stack's st_ino for it, as last answered (0: unknown)
    // The name a rename of it answered EIO (its server died with it) gave it, if the
    // rename was done: tried after a restart when its name finds nothing, or another
    // file, and taken if it finds a file of the same inode number.
    uint64_t renamed_parent = 0;  // kernel id
    std::string renamed_name;
    uint64_t nlookup = 0;         // the kernel's count
    uint64_t server_lookups = 0;  // lookups the current server counted for us
    // While the kernel has it open: a descriptor of the file, for a new server when no
    // name finds it. The one a server gave for the kernel's reads and writes (kernel
    // passthrough), or for an O_TMPFILE file's; else one lent (kLend) before it was
    // unlinked or replaced by a rename. A change that copies such a file (an overlay's
    // copy-up) brings the copy's (VfsRequest::copy_fd), kept in its place.
    UniqueFd file;
    uint64_t file_tag = 0;  // what its lend answered, for the adopt (VfsOp::kLend)
    bool file_held = false;  // no `file`: the server holds it, named by file_tag (an agent)
    uint32_t opens = 0;     // the kernel's handles of it (not of a directory)
  };
  struct KHandle {
    bool in_use = false;
    uint64_t server_fh = 0;
    uint64_t epoch = 0;
    uint64_t node = 0;  // kernel id
    int flags = 0;
    bool dir = false;
  };
  using Server = std::shared_ptr<msgport::Port>;

  explicit IsolatedPort(std::unique_ptr<ServerSource> source);
  void Supervise();
  void Sweep();  // answers ETIMEDOUT what waited past the source's wait limit
  Server Current(uint64_t* epoch) const;

  // With map_mu_ held. Translations of the kernel's ids to the current server's:
  // a node 0 when it is gone (ESTALE), no handle when it is gone (EBADF; a server's
  // handle may be any number, memfs gives 0).
  uint64_t ServerNode(uint64_t kernel_id, const Server& server, uint64_t epoch, std::unique_lock<std::mutex>& lock,
                      int depth);
  std::optional<uint64_t> ServerHandle(uint64_t kernel_fh, const Server& server, uint64_t epoch,
                                       std::unique_lock<std::mutex>& lock);
  // A rename in `m` was answered EIO, done or not: notes the name each node it moves
  // may have now.
  void MaybeRenamed(const msgport::VfsMessage& m);
  // The kernel's id for the node a server answered (`ino`: its st_ino, 0 unknown).
  // `found`: a lookup's (or a listing's) answer, which may find a node the kernel
  // holds from a dead server; not a create's, whose file is new.
  uint64_t KernelNode(uint64_t server_id, uint64_t epoch, uint64_t parent, std::string_view name, uint64_t ino,
                      bool found);
  // Whether a node known as `known` (st_ino) may be the one found with `found`.
  bool SameFile(uint64_t known, uint64_t found) const noexcept {
    return !check_identity_ || known == 0 || found == 0 || known == found;
  }
  // Drops `count` kernel lookups; at zero the node goes, and what the server counted
  // for it is added to `forgets` (server id, count), to be sent without the lock.
  void ForgetLocked(uint64_t kernel_id, uint64_t count, std::vector<std::pair<uint64_t, uint64_t>>& forgets);
  void SendForgets(const Server& server);
  KNode* Node(uint64_t kernel_id);
  // A node's place by name: its parent's kernel id and its name. In by_name_ the
  // name views the node's own KNode::name (nodes_ is a deque: its elements stay put).
  struct NameKey {
    uint64_t parent;
    std::string_view name;
    bool operator==(const NameKey&) const = default;
  };
  struct NameKeyHash {
    size_t operator()(const NameKey& k) const noexcept {
      return std::hash<std::string_view>{}(k.name) ^ (k.parent * 0x9E3779B97F4A7C15ULL);
    }
  };
  // With map_mu_ held: enters nodes_[index] under its parent and name (the key then
  // views its name), or takes it out if that entry is its own.
  void Name(uint32_t index);
  void Unname(uint32_t index);
  // With map_mu_ held: the node under `key` lost that name (unlinked, or replaced by a
  // rename). It keeps no name, so after a restart it is not found again by one (which
  // may by then be another file's): it is adopted by its kept file if it has one, and
  // answers ESTALE otherwise, unless a lookup names it again.
  void Orphan(const NameKey& key);
  void Disown(uint32_t index);  // the same for nodes_[index], whatever name it had
  // With map_mu_ held: a reply brought a descriptor of the file of the node
  // `kernel_id`, `fd` (`tag`: what a lend of it answered). The node takes it, unless
  // it holds one already (`replace`: a copy's, in place of it) or the budget is spent,
  // and keeps it while the kernel has the file open (the shim may still use the
  // number, borrowed: the kernel releases no handle before it has it).
  void KeepFile(uint64_t kernel_id, UniqueFd& fd, uint64_t tag = 0, bool replace = false);
  // With map_mu_ held, before an unlink or a rename that takes the name `key` from a
  // node the kernel has open: unless the node keeps its file already, asks `server`
  // for a descriptor of it (kLend, on one of its handles), so that a restarted server
  // can be given the file no name will lead to (kAdopt).
  void LendFile(const NameKey& key, const msgport::VfsContext& ctx, const Server& server, uint64_t epoch,
                std::unique_lock<std::mutex>& lock);
  // With map_mu_ held: the kernel released handle `kernel_fh` (index + 1).
  void FreeHandle(uint64_t kernel_fh);
  // With map_mu_ held: asks `server` for the node of nodes_[index]'s kept file
  // (kAdopt). The new server's id, or 0.
  uint64_t AdoptFile(uint64_t kernel_id, const Server& server, uint64_t epoch, std::unique_lock<std::mutex>& lock);
  // With map_mu_ held: nodes_[index] is `server_id` in the current server (`epoch`),
  // which counted one lookup for it.
  void Bind(uint32_t index, uint64_t server_id, uint64_t epoch);

  // Translates a request to the current server and sends it (or queues it while no
  // server runs). Replies it itself when it cannot be sent.
  void Forward(msgport::MessagePtr msg);
  // `msg`'s server (of `epoch`) died before it answered, or before it was sent: it
  // waits for the next server, or goes to it if one is up already.
  void Requeue(msgport::MessagePtr msg, uint64_t epoch);
  // With server_mu_ held: `msg` waits for the next server, no longer than the source's
  // wait limit from its first wait (a server that comes and goes again gives no more).
  void WaitForNextServer(msgport::MessagePtr msg);
  // A request of the port's own to `server` (of `epoch`), sent and waited for (map_mu_
  // not held). Notes in lost_epoch_ a server that went meanwhile (ECONNRESET).
  Result<std::unique_ptr<msgport::VfsMessage>> AskServer(const Server& server, uint64_t epoch,
                                                         std::unique_ptr<msgport::VfsMessage> m);
  void Translate(msgport::VfsMessage& m);  // the reply's ids, back to the kernel's
  // `changed`'s server ids as the kernel's (map_mu_ held): those it holds.
  void TranslateChanged(std::vector<uint64_t>& changed, uint64_t epoch);

  std::unique_ptr<ServerSource> source_;
  const bool check_identity_;  // source_->stable_inode_numbers()

  mutable std::mutex map_mu_;  // guards the node and handle tables
  std::deque<KNode> nodes_;    // index 0 unused, 1 the root
  std::vector<uint32_t> free_nodes_;
  std::unordered_map<uint64_t, uint32_t> by_server_id_;  // current epoch only
  std::unordered_map<NameKey, uint32_t, NameKeyHash> by_name_;  // -> index
  std::deque<KHandle> handles_;                           // fh = index + 1
  std::vector<uint32_t> free_handles_;
  size_t live_nodes_ = 1;
  size_t files_kept_ = 0;    // KNode::file descriptors held
  size_t files_budget_ = 0;  // most of them: half this process's descriptor limit
  bool lend_refused_ = false;  // the stack answered kLend ENOSYS (memfs): not asked again
  uint64_t map_epoch_ = 0;  // the epoch the tables' server ids belong to
  std::vector<std::pair<uint64_t, uint64_t>> pending_forgets_;  // (server id, count)
  std::atomic<uint64_t> lost_epoch_{0};  // the last epoch whose server went during an AskServer

  mutable std::mutex server_mu_;  // guards the fields below
  std::condition_variable server_cv_;
  Server server_;
  uint64_t epoch_ = 0;
  bool broken_ = false;  // gave up restarting
  bool stopping_ = false;
  std::vector<msgport::MessagePtr> waiting_;  // sent while no server runs (until
                                              // relay.wait_until: WaitForNextServer)
  std::atomic<pid_t> server_pid_{0};
  std::atomic<uint64_t> restarts_{0};
  std::atomic<uint64_t> answered_{0};  // replies from servers (for crash-loop detection)
  std::vector<Server> retired_;  // dead servers' ports, destroyed by the supervisor
  std::thread supervisor_;
  std::thread sweeper_;
};

// The server process's main: attaches to the segment, builds the stack, serves until
// the shim goes away. Returns the exit status.
int ServeIsolated(const std::string& segment, int socket_fd, const std::string& spec);

}  // namespace ulsp::core
