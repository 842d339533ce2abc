// FuseShim: the kernel end of a mount. It owns the libfuse3 low-level session (the
// /dev/fuse connection), turns each kernel request into a VfsMessage sent to the
// mount's port, and turns each reply into the matching fuse_reply_* on the thread
// that delivers it. Replies may come in any order and from any thread, so several
// requests are in flight at once. Requests are read by a FuseLoop (fuse_loop.h): a
// reader per CPU (in-process) or one spinning leader (isolated), and spares that take
// over from requests that block; and, when the kernel offers FUSE over io_uring, come
// through a FuseUring (fuse_uring.h): a queue per CPU, served on that CPU.
//
// Kernel interrupts become Abort on the message (the server may still answer in
// full; it replies exactly once either way).
//
// Ownership: the port must outlive the shim. Serve runs on one caller thread (plus
// libfuse's workers); Exit may be called from any thread or a signal handler's
// thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <sys/types.h>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/port.h"
#include "kernel/msgport/unique_fd.h"
#include "kernel/msgport/vfs_message.h"

struct fuse_session;
struct iovec;

namespace ulsp::msgport {

class FuseUring;

class FuseShim {
 public:
  struct Options {
    std::string mountpoint;
    std::string fsname = "ulsp";      // the "source" column of /proc/mounts
    double timeout = 1.0;             // entry and attribute cache, seconds (0: none)
    bool allow_other = true;          // other users may use the mount (needs root)
    unsigned max_threads = 16;        // threads reading requests, at most
    std::chrono::nanoseconds spin{std::chrono::microseconds(50)};  // polling after a
                                      // request before sleeping (0: sleep at once)
    bool splice_read = true;          // reads answered from a descriptor are spliced
    bool readdirplus_always = false;  // every directory listing carries its entries'
                                      // attributes (the kernel then needs no lookup for
                                      // them); otherwise the kernel picks, per listing
    bool kernel_passthrough = true;   // files the stack lets it (kernel_io_ok and a
                                      // backing_fd in the open's answer) are read and
                                      // written by the kernel itself, on the stack's
                                      // descriptor (FUSE passthrough: Linux 6.9+, root;
                                      // the mount then cannot be overlayfs's lower)
    bool io_uring = true;             // requests come through FUSE over io_uring, one
                                      // queue per CPU (fuse_uring.h), when the kernel
                                      // offers it (the fuse module's enable_uring)
    bool read_only = false;           // mounted read-only: the kernel refuses every
                                      // change (EROFS) before it reaches the stack, and
                                      // keeps a file's attributes cached across reads
                                      // (on a writable mount a read drops the cached
                                      // atime, so the next stat is a GETATTR)
    bool debug = false;               // libfuse's own request log on stderr
    std::function<void()> on_ready;   // called once the kernel's INIT is answered
    bool callers_may_admin = true;    // false: no caller of this mount holds
                                      // CAP_SYS_ADMIN (a group's, whose processes are
                                      // bounded without it), so none is asked; true:
                                      // each listxattr asks its caller's capabilities
    int premounted_fd = -1;           // a /dev/fuse descriptor already mounted (by a
                                      // process in another mount namespace): the shim
                                      // serves it, takes ownership, and never unmounts
  };

  // Mounts `options.mountpoint` (as fuse.ulsp), or takes `options.premounted_fd`,
  // with `port` serving the requests.
  // `serves_inline`: the port answers every message before Send returns (a direct
  // port in this process), so request data is lent rather than copied and reads may
  // be answered from the server's descriptors. Fails with EINVAL when libfuse
  // refuses the options, or the errno of the mount.
  static Result<std::unique_ptr<FuseShim>> Mount(Options options, Port& port, bool serves_inline);
  ~FuseShim();  // unmounts (if still mounted) and ends the session

  // Serves kernel requests until the file system is unmounted or Exit is called.
  // Blocks. Returns 0, or the errno that ended the loop.
  int Serve();
  // Makes Serve return at once: its waiting threads are woken (it also unmounts when
  // the shim is destroyed). Safe in a signal handler.
  void Exit() noexcept;
  // Installs SIGINT/SIGTERM/SIGHUP handlers that call Exit (one shim at a time).
  void HandleSignals();

  // Requests that came through FUSE over io_uring (0 when it is not in use).
  uint64_t UringServed() const noexcept;

  // Requests sent to the port and not yet answered.
  uint64_t InFlight() const noexcept { return in_flight_.load(std::memory_order_relaxed); }

 private:
  class ReplyPort;
  FuseShim(Options options, Port& port);

  Options options_;
  Port& port_;
  std::unique_ptr<ReplyPort> replies_;
  fuse_session* session_ = nullptr;
  bool serves_inline_ = false;
  bool mounted_ = false;
  bool signals_ = false;
  UniqueFd exit_fd_;  // an eventfd, readable once Exit was called: the loop's threads poll it
  std::atomic<uint64_t> in_flight_{0};

  // FUSE passthrough. The kernel wants every open of a node on one backing file, so a
  // backing id is registered per node while any of its passthrough handles is open.
  struct Backing {
    int32_t id = -1;
    uint32_t opens = 0;
  };
  // Whether the kernel does reads and writes of files the stack lets it (false until
  // the kernel's INIT is answered, and once the kernel refused a backing file).
  bool KernelPassthrough() const noexcept { return passthrough_.load(std::memory_order_relaxed); }
  // A backing id for handle `fh` of `node`, whose file is `fd`, opened by `q`'s
  // caller; -1 when the kernel will not take it (then the handle's data goes through
  // the stack).
  int32_t AcquireBacking(uint64_t node, uint64_t fh, int fd, const VfsRequest& q) noexcept;
  // Sets up FUSE over io_uring if it may be used, and sends every reply through
  // WriteReply.
  void UseCustomIo() noexcept;
  // libfuse's writer (fuse_custom_io): adds what libfuse 3.14 leaves out of the INIT
  // reply (parallel directory operations, passthrough, io_uring) and passthrough to
  // open replies, and hands io_uring's replies to it.
  static ssize_t WriteReply(int fd, iovec* iov, int count, void* userdata);
  // libfuse's reader: notes what the kernel offers in its INIT request.
  static ssize_t ReadRequest(int fd, void* buf, size_t len, void* userdata);
  std::atomic<uint32_t> kernel_offers_{0};  // INIT's request flags
  std::atomic<bool> setxattr_ext_{false};   // setxattr requests come with the extended
                                            // header (FUSE_SETXATTR_EXT)
  std::unique_ptr<FuseUring> uring_;           // set up before INIT, if offered
  std::atomic<FuseUring*> uring_live_{nullptr};  // once started: replies go to it
  // Handle `fh` was released (or its open never reached the kernel).
  void ReleaseBacking(uint64_t fh) noexcept;
  bool passthrough_io_ = false;           // replies go out through the patching writer
  std::atomic<bool> passthrough_{false};  // negotiated, and not refused since
  bool parallel_dirops_ = false;          // INIT's reply asks for parallel directory
                                          // operations (libfuse 3.14 leaves them out)
  bool handleless_dirs_ = false;          // the kernel can list without opendir (FUSE
                                          // no-opendir), if the stack answers ENOSYS
  bool dont_mask_ = false;                // the kernel leaves the umask to the shim
  std::mutex backing_mu_;
  std::unordered_map<uint64_t, Backing> backing_;     // node -> its backing id
  std::unordered_map<uint64_t, uint64_t> backed_fh_;  // handle -> its node

  // A change that was answered EIO, ECONNRESET or ETIMEDOUT may have been made or not
  // (an isolated server died with it; a remote agent's connection ended or its deadline
  // passed), so what the kernel cached about it may be wrong until its timeout: a
  // "no such name" after a mkdir, a name after an unlink, a mode after a chmod. Unsure
  // queues the names (and, for attribute changes, the node) that `q` changed; a thread
  // of their own drops them from the kernel's caches, after the answer went out. (The
  // kernel holds the directory's lock until the caller has the answer, and so would
  // the invalidation; a reply thread that waited for it could hold up the very reply
  // that ends it.)
  void Unsure(const VfsRequest& q) noexcept;
  // Drops the cached attributes of the nodes a request changed as a side effect
  // (VfsRequest::changed), before its answer: the caller's next stat must see them.
  // Done at once, unlike Unsure's: dropping attributes alone (no cached data) takes
  // no lock the kernel could be holding for the request.
  void DropAttributes(const VfsRequest& q) noexcept;
  void Invalidate() noexcept;  // the invalidating thread
  void StopInvalidating() noexcept;
  struct Stale {
    uint64_t node;
    std::string name;  // empty: the node's attributes and cached data
  };
  std::mutex stale_mu_;
  std::condition_variable stale_cv_;
  std::vector<Stale> stale_;
  bool stale_stop_ = false;
  std::thread invalidator_;  // started when first needed

  // The kernel writes a shared writable mapping's pages back with no caller (user 0,
  // pid 0; where it does not pass the file through): natively the page fault was the
  // writer's, and the space it took theirs. So the opener of each handle open for
  // writing, where not root, is noted here, and such a write is sent as the handle's
  // opener's: every layer, a restarted server and a remote agent see whose it is
  // (passthrough takes disk space as that user, thread_creds.h).
  void NoteOpener(uint64_t fh, const VfsRequest& q) noexcept;  // q: an open or create answered `fh`
  void ForgetOpener(uint64_t fh) noexcept;                     // fh: released, or never given
  void CreditWriter(VfsRequest& q) noexcept;                   // q: a write from the kernel
  struct Opener {
    uid_t uid;
    gid_t gid;
  };
  std::mutex openers_mu_;
  std::unordered_map<uint64_t, Opener> openers_;  // kernel's handle -> its opener

  // Whether caller `pid` (a thread in the mount's pid namespace) holds CAP_SYS_ADMIN,
  // which a caller must to see the names of trusted.* attributes listed. Not where it
  // cannot be told (pid 0: a caller outside that namespace; gone) or none may.
  bool MayAdmin(pid_t pid) const noexcept;

  // The end of a listing. The kernel asks once more after a directory's last records,
  // at the last one's offset, to hear that nothing follows. When the stack said so with
  // those records (VfsRequest::dir_end), that question, from the same caller and within
  // the mount's entry timeout, is answered here, empty, and not sent: it would cost a
  // round trip to the stack for every directory listed. A change of names in the
  // directory through the mount drops what is noted of it.
  void NoteDirEnd(const VfsRequest& q) noexcept;           // q: a readdir(plus) answered
  bool TakeDirEnd(pid_t pid, uint64_t node, int64_t offset) noexcept;
  void DropDirEnds(const VfsRequest& q) noexcept;          // q: any request being sent
  struct DirEnd {
    pid_t pid;
    int64_t offset;
    std::chrono::steady_clock::time_point until;
  };
  std::mutex dir_end_mu_;
  std::unordered_map<uint64_t, DirEnd> dir_ends_;  // directory node -> its listing's end

  friend struct FuseOps;
};

}  // namespace ulsp::msgport
