#include "kernel/msgport/fuse_shim.h"

#include <fuse3/fuse_lowlevel.h>
#include <linux/limits.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "kernel/msgport/fuse_loop.h"
#include "kernel/msgport/fuse_uring.h"
#include "kernel/msgport/log.h"
#include "kernel/msgport/thread_creds.h"

namespace ulsp::msgport {

// The largest read or write the kernel sends when requests cross to another process.
constexpr unsigned kMaxRelayedIo = 128u << 10;

// Answers the kernel: every reply to a VfsMessage the shim sent lands here, on
// whichever thread made it.
class FuseShim::ReplyPort final : public Port {
 public:
  explicit ReplyPort(FuseShim& shim) : Port("fuse-replies"), shim_(shim) {}
  void Put(MessagePtr msg) override { Reply(std::move(msg), EINVAL); }  // not a request port
  void PutReply(MessagePtr msg) override;

 private:
  void Answer(VfsMessage& m) noexcept;
  // An open's or create's answer, on the kernel's own file when the stack gave one.
  void AnswerOpen(const VfsRequest& q, fuse_req_t r, fuse_file_info fi) noexcept;

  FuseShim& shim_;
};

namespace {

// --- FUSE passthrough (Linux 6.9, protocol 7.40) and FUSE over io_uring (6.14, 7.42),
// which libfuse 3.14 neither negotiates nor answers with. The shim adds them on the way
// out: libfuse writes every reply through FuseShim::WriteReply, which patches the INIT
// reply and the open replies that the sending thread marked in tl_patch just before.
namespace kabi {
struct OutHeader {  // struct fuse_out_header
  uint32_t len;
  int32_t error;
  uint64_t unique;
};
constexpr uint32_t kWritebackCache = 1u << 16;       // FUSE_WRITEBACK_CACHE (excludes it)
constexpr uint32_t kInitExt = 1u << 30;              // FUSE_INIT_EXT: flags2 is read
constexpr uint32_t kPassthrough2 = 1u << (37 - 32);  // FUSE_PASSTHROUGH, in flags2
// The mount's stacking depth: backing files may lie on a file system that stacks once
// (overlayfs, as in most containers); the mount in turn cannot be overlayfs's lower.
constexpr uint32_t kMaxStackDepth = 2;
constexpr uint32_t kOpenPassthrough = 1u << 7;  // FOPEN_PASSTHROUGH
// struct fuse_init_out: flags, flags2, max_stack_depth.
constexpr size_t kInitFlags = 12, kInitMaxWrite = 20, kInitMaxPages = 28, kInitFlags2 = 32, kInitStackDepth = 36;
constexpr uint32_t kMaxPages = 1u << 22;              // FUSE_MAX_PAGES: max_pages is read
constexpr uint32_t kParallelDirops = 1u << 18;        // FUSE_PARALLEL_DIROPS
constexpr uint32_t kOverIoUring2 = 1u << (41 - 32);  // FUSE_OVER_IO_URING, in flags2
constexpr uint32_t kSetxattrExt = 1u << 29;           // FUSE_SETXATTR_EXT
constexpr uint32_t kSetxattrAclKillSgid = 1u << 0;   // FUSE_SETXATTR_ACL_KILL_SGID
// The kernel's INIT request: struct fuse_in_header, then struct fuse_init_in
// {u32 major, minor, max_readahead, flags; ...}.
constexpr size_t kInHeaderSize = 40, kInHeaderOpcode = 4, kInitInFlags = kInHeaderSize + 12;
constexpr uint32_t kOpInit = 26;  // FUSE_INIT
// struct fuse_open_out {u64 fh; u32 open_flags; s32 backing_id;} ends an open's and a
// create's reply.
constexpr size_t kOpenOutSize = 16, kOpenFlags = 8, kOpenBackingId = 12;
struct BackingMap {  // struct fuse_backing_map
  int32_t fd;
  uint32_t flags;
  uint64_t padding;
};
constexpr unsigned long kBackingOpen = _IOW(229, 1, BackingMap);  // FUSE_DEV_IOC_BACKING_OPEN
constexpr unsigned long kBackingClose = _IOW(229, 2, uint32_t);   // FUSE_DEV_IOC_BACKING_CLOSE
// FUSE_STATX's reply (protocol 7.39; ProcessRequest in fuse_loop.h).
struct StatxTime {  // struct fuse_sx_time
  int64_t tv_sec;
  uint32_t tv_nsec;
  int32_t reserved;
};
struct Statx {  // struct fuse_statx
  uint32_t mask, blksize;
  uint64_t attributes;
  uint32_t nlink, uid, gid;
  uint16_t mode, spare0;
  uint64_t ino, size, blocks, attributes_mask;
  StatxTime atime, btime, ctime, mtime;
  uint32_t rdev_major, rdev_minor, dev_major, dev_minor;
  uint64_t spare2[14];
};
struct StatxOut {  // struct fuse_statx_out
  uint64_t attr_valid;
  uint32_t attr_valid_nsec, flags;
  uint64_t spare[2];
  Statx stat;
};
static_assert(sizeof(Statx) == 256 && sizeof(StatxOut) == 288);
}  // namespace kabi

struct ReplyPatch {
  bool init = false;         // the next reply of this thread answers INIT
  int32_t backing_id = -1;   // the reply being sent opens a file on this backing id
};
thread_local ReplyPatch tl_patch;

template <typename T>
T Load(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
void Store(char* p, T v) {
  std::memcpy(p, &v, sizeof v);
}

// The kernel orders a reply before the requests it leads to: the RELEASE of a file
// comes only after the reply to its last READ was written, and may be read by another
// thread, which then closes the descriptor the READ's reply was read from. That order
// passes through the kernel, where ThreadSanitizer cannot see it; this counter states
// it: every write to the device releases it first, every read from it acquires it
// after. Only in ThreadSanitizer builds: the kernel gives the real ordering, and
// elsewhere the counter would be one cache line that every reader's CPU writes.
#if defined(__SANITIZE_THREAD__)
std::atomic<uint64_t> g_device_order{0};
void BeforeDeviceWrite() { g_device_order.fetch_add(1, std::memory_order_release); }
void AfterDeviceRead() { (void)g_device_order.load(std::memory_order_acquire); }
#else
void BeforeDeviceWrite() {}
void AfterDeviceRead() {}
#endif

// Both ways: from the device into libfuse's pipe, and from a pipe to the device.
ssize_t IoSplice(int fdin, off_t* offin, int fdout, off_t* offout, size_t len, unsigned flags, void*) {
  BeforeDeviceWrite();
  const ssize_t n = ::splice(fdin, offin, fdout, offout, len, flags);
  AfterDeviceRead();
  return n;
}

// The names in `list` (each ending in NUL) but those of trusted.* attributes.
std::string WithoutTrusted(std::span<const char> list) {
  std::string kept;
  kept.reserve(list.size());
  for (size_t at = 0; at < list.size();) {
    const std::string_view name(list.data() + at, ::strnlen(list.data() + at, list.size() - at));
    if (!name.starts_with("trusted.")) kept.append(name).push_back('\0');
    at += name.size() + 1;
  }
  return kept;
}

}  // namespace

ssize_t FuseShim::ReadRequest(int fd, void* buf, size_t len, void* userdata) {
  const ssize_t n = ::read(fd, buf, len);
  AfterDeviceRead();
  // What the kernel offers, libfuse 3.14 keeps only where it knows the flag.
  const char* in = static_cast<const char*>(buf);
  if (n >= static_cast<ssize_t>(kabi::kInitInFlags + 4) && Load<uint32_t>(in + kabi::kInHeaderOpcode) == kabi::kOpInit)
    static_cast<FuseShim*>(userdata)->kernel_offers_.store(Load<uint32_t>(in + kabi::kInitInFlags));
  return n;
}

ssize_t FuseShim::WriteReply(int fd, iovec* iov, int count, void* userdata) {
  auto* shim = static_cast<FuseShim*>(userdata);
  bool start_uring = false;
  uint32_t max_write = 0, max_pages = 0;
  if ((tl_patch.init || tl_patch.backing_id >= 0) && count == 2 && iov[0].iov_len == sizeof(kabi::OutHeader) &&
      Load<kabi::OutHeader>(static_cast<const char*>(iov[0].iov_base)).error == 0) {
    // libfuse's reply body is its own writable local, sent once.
    char* body = static_cast<char*>(iov[1].iov_base);
    const size_t size = iov[1].iov_len;
    if (tl_patch.init && size >= kabi::kInitStackDepth + 4) {
      // What libfuse 3.14 leaves out, as the shim decided in FuseOps::Init.
      uint32_t flags = Load<uint32_t>(body + kabi::kInitFlags);
      if (shim->parallel_dirops_) flags |= kabi::kParallelDirops;
      // The kernel then says when setting an ACL must clear the set-group-ID bit
      // (FuseOps::SetXattr): only it knows the caller's groups and capabilities.
      if (shim->kernel_offers_.load() & kabi::kSetxattrExt) {
        flags |= kabi::kSetxattrExt;
        shim->setxattr_ext_.store(true);
      }
      uint32_t flags2 = Load<uint32_t>(body + kabi::kInitFlags2);
      if (shim->passthrough_io_ && !(flags & kabi::kWritebackCache)) {
        flags |= kabi::kInitExt;
        flags2 |= kabi::kPassthrough2;
        Store<uint32_t>(body + kabi::kInitStackDepth, kabi::kMaxStackDepth);
      }
      if (shim->uring_) {
        flags |= kabi::kInitExt;
        flags2 |= kabi::kOverIoUring2;
        start_uring = true;
        max_write = Load<uint32_t>(body + kabi::kInitMaxWrite);
        if (flags & kabi::kMaxPages) max_pages = Load<uint16_t>(body + kabi::kInitMaxPages);
      }
      Store<uint32_t>(body + kabi::kInitFlags, flags);
      Store<uint32_t>(body + kabi::kInitFlags2, flags2);
    } else if (tl_patch.backing_id >= 0 && size >= kabi::kOpenOutSize) {
      char* out = body + size - kabi::kOpenOutSize;
      Store<uint32_t>(out + kabi::kOpenFlags, Load<uint32_t>(out + kabi::kOpenFlags) | kabi::kOpenPassthrough);
      Store<int32_t>(out + kabi::kOpenBackingId, tl_patch.backing_id);
    }
  }
  tl_patch.init = false;
  BeforeDeviceWrite();
  if (FuseUring* uring = shim->uring_live_.load(std::memory_order_acquire)) {
    ssize_t written = 0;
    if (uring->Reply(iov, count, &written)) return written;
  }
  const ssize_t written = ::writev(fd, iov, count);
  // The kernel took the INIT reply (it is processed inside the write): the rings may
  // register now.
  if (start_uring && written >= 0) {
    // Live first: a request may come through a ring as soon as its thread registered.
    shim->uring_live_.store(shim->uring_.get(), std::memory_order_release);
    shim->uring_->Start(max_write, max_pages);
  }
  return written;
}

void FuseShim::ReplyPort::AnswerOpen(const VfsRequest& q, fuse_req_t r, fuse_file_info fi) noexcept {
  const uint64_t node = q.op == VfsOp::kCreate ? q.entry.ino : q.node;
  // The kernel takes a passthrough open with no flags but direct I/O and no-flush.
  const bool passthrough = q.open.backing_fd >= 0 && !fi.nonseekable && !fi.cache_readdir;
  const int32_t id = passthrough ? shim_.AcquireBacking(node, q.open.fh, q.open.backing_fd, q) : -1;
  if (id >= 0) fi.keep_cache = 0;  // no FUSE page cache: the backing file's serves
  tl_patch.backing_id = id;
  shim_.NoteOpener(fi.fh, q);  // before the kernel may write on the handle
  const int sent = q.op == VfsOp::kCreate ? fuse_reply_create(r, &q.entry, &fi) : fuse_reply_open(r, &fi);
  tl_patch.backing_id = -1;
  // The kernel gave up on the open (interrupted): it will send no release.
  if (sent != 0) {
    shim_.ForgetOpener(fi.fh);
    if (id >= 0) shim_.ReleaseBacking(q.open.fh);
  }
}

namespace {

// A getattr that came as FUSE_STATX (ProcessRequest) is answered as one: fstat's
// fields as fuse_reply_attr gives them, and the birth time where the stack knew it.
void ReplyStatx(fuse_req_t r, const VfsRequest& q) noexcept {
  const struct stat& st = q.out_attr;
  const auto time = [](const struct timespec& t) {
    return kabi::StatxTime{t.tv_sec, static_cast<uint32_t>(t.tv_nsec), 0};
  };
  kabi::StatxOut out{};
  // Seconds and nanoseconds of the timeout, as libfuse's calc_timeout_sec/nsec.
  const double timeout = std::max(q.timeout, 0.0);
  out.attr_valid = timeout >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(timeout);
  out.attr_valid_nsec = timeout >= 1.8e19 ? 0 : static_cast<uint32_t>((timeout - static_cast<double>(out.attr_valid)) * 1e9);
  kabi::Statx& sx = out.stat;
  sx.mask = STATX_BASIC_STATS | (q.out_btime_known ? STATX_BTIME : 0);
  sx.blksize = static_cast<uint32_t>(st.st_blksize);
  sx.nlink = static_cast<uint32_t>(st.st_nlink);
  sx.uid = st.st_uid;
  sx.gid = st.st_gid;
  sx.mode = static_cast<uint16_t>(st.st_mode);
  sx.ino = st.st_ino;
  sx.size = static_cast<uint64_t>(st.st_size);
  sx.blocks = static_cast<uint64_t>(st.st_blocks);
  sx.atime = time(st.st_atim);
  sx.mtime = time(st.st_mtim);
  sx.ctime = time(st.st_ctim);
  if (q.out_btime_known) sx.btime = time(q.out_btime);
  sx.rdev_major = major(st.st_rdev);
  sx.rdev_minor = minor(st.st_rdev);
  fuse_reply_buf(r, reinterpret_cast<const char*>(&out), sizeof out);
}

}  // namespace

void FuseShim::ReplyPort::Answer(VfsMessage& m) noexcept {
  fuse_req_t r = m.fuse_req;
  if (r == nullptr) return;  // forget: the kernel wants no answer
  const VfsRequest& q = m.req;
  int err = m.error;
  if (!q.changed.empty()) shim_.DropAttributes(q);
  if (err != 0) {
    if (q.op == VfsOp::kLookup && err == ENOENT && q.timeout > 0) {
      fuse_entry_param negative{};  // lets the kernel cache "no such name"
      negative.entry_timeout = q.timeout;
      fuse_reply_entry(r, &negative);
      return;
    }
    if (err < 0 || err > 4095) err = EIO;  // a server's bug must not confuse the kernel
    fuse_reply_err(r, err);
    if (err == EIO || err == ECONNRESET || err == ETIMEDOUT) shim_.Unsure(q);  // done or not: unknown
    return;
  }
  auto open_info = [&q] {
    fuse_file_info fi{};
    fi.fh = q.open.fh;
    fi.direct_io = q.open.direct_io;
    fi.keep_cache = q.open.keep_cache;
    fi.nonseekable = q.open.nonseekable;
    fi.cache_readdir = q.open.cache_readdir;
    return fi;
  };
  switch (q.op) {
    case VfsOp::kLookup:
    case VfsOp::kMkNod:
    case VfsOp::kMkDir:
    case VfsOp::kSymlink:
    case VfsOp::kLink:
      fuse_reply_entry(r, &q.entry);
      return;
    case VfsOp::kGetAttr:
      if (q.flags != 0) {  // a FUSE_STATX
        ReplyStatx(r, q);
        return;
      }
      [[fallthrough]];
    case VfsOp::kSetAttr:
      fuse_reply_attr(r, &q.out_attr, q.timeout);
      return;
    case VfsOp::kReadLink: {
      std::string target(q.out.begin(), q.out.end());
      fuse_reply_readlink(r, target.c_str());
      return;
    }
    case VfsOp::kOpenDir: {
      fuse_file_info fi = open_info();
      fuse_reply_open(r, &fi);
      return;
    }
    case VfsOp::kOpen:
    case VfsOp::kCreate:
      AnswerOpen(q, r, open_info());
      return;
    case VfsOp::kRead:
      if (q.out_fd >= 0) {
        fuse_bufvec buf = FUSE_BUFVEC_INIT(q.size);
        buf.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
        buf.buf[0].fd = q.out_fd;
        buf.buf[0].pos = q.offset;
        fuse_reply_data(r, &buf, static_cast<fuse_buf_copy_flags>(0));
        return;
      }
      fuse_reply_buf(r, q.out.data(), q.out.size());
      return;
    case VfsOp::kReadDir:
    case VfsOp::kReadDirPlus:
      if (q.dir_end) shim_.NoteDirEnd(q);  // before the kernel can ask again
      fuse_reply_buf(r, q.out.data(), q.out.size());
      return;
    case VfsOp::kWrite:
    case VfsOp::kCopyFileRange:
      fuse_reply_write(r, q.out_size);
      return;
    case VfsOp::kStatFs:
      fuse_reply_statfs(r, &q.statfs);
      return;
    case VfsOp::kListXattr:
      if (m.list_room >= 0) {  // a caller without CAP_SYS_ADMIN: as ext4 lists to it
        const std::string list = WithoutTrusted(q.out);
        if (m.list_room == 0) {
          fuse_reply_xattr(r, list.size());
        } else if (list.size() > static_cast<uint64_t>(m.list_room)) {
          fuse_reply_err(r, ERANGE);
        } else {
          fuse_reply_buf(r, list.data(), list.size());
        }
        return;
      }
      [[fallthrough]];
    case VfsOp::kGetXattr:
      if (q.size == 0) {
        fuse_reply_xattr(r, q.out_size);
      } else {
        fuse_reply_buf(r, q.out.data(), q.out.size());
      }
      return;
    case VfsOp::kLseek:
      fuse_reply_lseek(r, static_cast<off_t>(q.out_size));
      return;
    case VfsOp::kIoctl:
      fuse_reply_ioctl(r, 0, q.out.data(), q.out.size());
      return;
    default:
      fuse_reply_err(r, 0);
      return;
  }
}

void FuseShim::ReplyPort::PutReply(MessagePtr msg) {
  // Answer first, free after: fuse_reply_* waits for a running interrupt callback,
  // which may still touch the message.
  Answer(static_cast<VfsMessage&>(*msg));
  msg.reset();
  if (!shim_.port_.CountsReplies()) shim_.port_.counters().replied.fetch_add(1, std::memory_order_relaxed);
  // Release: the destructor, once it sees no reply due, may close the device this
  // reply was written to.
  shim_.in_flight_.fetch_sub(1, std::memory_order_release);
}

// The libfuse callbacks. Each is noexcept: nothing may unwind into libfuse.
struct FuseOps {
  static FuseShim& Shim(fuse_req_t req) { return *static_cast<FuseShim*>(fuse_req_userdata(req)); }

  // A message for `req`, with the caller's credentials. nullptr (and the kernel
  // answered ENOMEM) when memory ran out.
  static std::unique_ptr<VfsMessage> Begin(fuse_req_t req, VfsOp op, fuse_ino_t node) noexcept {
    VfsMessage* m = new (std::nothrow) VfsMessage(op);
    if (m == nullptr) {
      fuse_reply_err(req, ENOMEM);
      return nullptr;
    }
    m->fuse_req = req;
    const fuse_ctx* ctx = fuse_req_ctx(req);
    m->req.ctx = {ctx->uid, ctx->gid, ctx->pid, 0};
    m->req.node = node;
    m->req.timeout = Shim(req).options_.timeout;
    // The stack may give the kernel the file itself (FUSE passthrough).
    m->req.kernel_io_ok = (op == VfsOp::kOpen || op == VfsOp::kCreate) && Shim(req).KernelPassthrough();
    // The stack may say its listings need no handle (answering ENOSYS).
    m->req.handleless_ok = op == VfsOp::kOpenDir && Shim(req).handleless_dirs_;
    return std::unique_ptr<VfsMessage>(m);
  }

  // The mode a create, mkdir or mknod asks for, with the caller's umask applied. With
  // FUSE_CAP_DONT_MASK the kernel leaves that to the file system, which must not apply
  // it under a directory with a default ACL: the bits it took go along.
  static void SetMode(fuse_req_t req, VfsRequest& r, mode_t mode) noexcept {
    if (Shim(req).dont_mask_) {
      const mode_t took = mode & fuse_req_ctx(req)->umask & 07777;
      r.ctx.umask_took = took;
      mode &= ~took;
    }
    r.mode = mode;
  }

  static void OnInterrupt(fuse_req_t, void* data) noexcept { Abort(*static_cast<VfsMessage*>(data)); }

  // Sends `m` to the mount's port; its reply answers the kernel.
  static void Submit(std::unique_ptr<VfsMessage> m) noexcept {
    if (!m) return;
    FuseShim& shim = Shim(m->fuse_req);
    m->reply_port = shim.replies_.get();
    shim.DropDirEnds(m->req);
    m->req.fd_reply_ok = shim.options_.splice_read && shim.serves_inline_;
    shim.in_flight_.fetch_add(1, std::memory_order_relaxed);
    // Every request a program waits for may be interrupted: the abort tells the
    // server (which may cut a blocking one short), and a port that answers an
    // unanswered abort itself (an isolated server's, after a second) frees the program
    // from a stopped or wedged server.
    if (!shim.serves_inline_ && m->req.op != VfsOp::kRelease && m->req.op != VfsOp::kReleaseDir)
      fuse_req_interrupt_func(m->fuse_req, OnInterrupt, m.get());
    try {
      Send(shim.port_, MessagePtr(m.release()));
    } catch (...) {
      // Send owned the message: destroying it unreplied answered the kernel (EIO).
      Logger("fuse")->error("sending a request failed");
    }
  }

  // Names must be copied: the kernel's buffer is reused once the callback returns.
  static void Named(fuse_req_t req, VfsOp op, fuse_ino_t parent, const char* name) noexcept try {
    auto m = Begin(req, op, parent);
    if (!m) return;
    m->req.name = name;
    Submit(std::move(m));
  } catch (...) {
    fuse_reply_err(req, ENOMEM);
  }

  static void Plain(fuse_req_t req, VfsOp op, fuse_ino_t node, fuse_file_info* fi = nullptr) noexcept {
    auto m = Begin(req, op, node);
    if (!m) return;
    if (fi != nullptr) {
      m->req.fh = fi->fh;
      m->req.has_fh = true;
      m->req.flags = fi->flags;
    }
    Submit(std::move(m));
  }

  static void Init(void* userdata, fuse_conn_info* conn) noexcept {
    auto& shim = *static_cast<FuseShim*>(userdata);
    // A spliced reply goes to /dev/fuse, not into a ring's buffer.
    if (shim.options_.splice_read && !shim.uring_ && (conn->capable & FUSE_CAP_SPLICE_WRITE))
      conn->want |= FUSE_CAP_SPLICE_WRITE;
    if (conn->capable & FUSE_CAP_READDIRPLUS) {
      conn->want |= FUSE_CAP_READDIRPLUS | FUSE_CAP_READDIRPLUS_AUTO;
      if (shim.options_.readdirplus_always) conn->want &= ~static_cast<unsigned>(FUSE_CAP_READDIRPLUS_AUTO);
    }
    if (conn->capable & FUSE_CAP_CACHE_SYMLINKS) conn->want |= FUSE_CAP_CACHE_SYMLINKS;
    // POSIX ACLs: the kernel enforces them, reading them as xattrs from the stack (the
    // disk below keeps a file's mode in step with its ACL, and gives a new file its
    // directory's default ACL). Without this the kernel checked the mode bits alone: a
    // user an ACL denied got in. A default ACL overrides the umask, so the kernel
    // leaves the umask to the shim (SetMode).
    if (conn->capable & FUSE_CAP_POSIX_ACL) conn->want |= FUSE_CAP_POSIX_ACL;
    if (conn->capable & FUSE_CAP_IOCTL_DIR) conn->want |= FUSE_CAP_IOCTL_DIR;  // a directory's inode flags
    if (conn->capable & FUSE_CAP_DONT_MASK) {
      conn->want |= FUSE_CAP_DONT_MASK;
      shim.dont_mask_ = true;
    }
    // Lookups and listings in one directory in parallel: without it the kernel holds
    // the directory's lock across each lookup, and one that blocks in the server (say
    // on a stopped file system below) stalls every other in that directory. libfuse
    // 3.14 takes the wish but leaves the flag out of its INIT reply: the writer adds it.
    shim.parallel_dirops_ = (conn->capable & FUSE_CAP_PARALLEL_DIROPS) != 0;
    shim.handleless_dirs_ = (conn->capable & FUSE_CAP_NO_OPENDIR_SUPPORT) != 0;
    conn->want &= ~static_cast<unsigned>(FUSE_CAP_HANDLE_KILLPRIV);
    if (shim.passthrough_io_) {
      conn->want &= ~static_cast<unsigned>(FUSE_CAP_WRITEBACK_CACHE);  // the kernel refuses both
      shim.passthrough_.store(true);
    }
    tl_patch.init = true;  // INIT's reply, sent next from this thread, is patched
    if (!shim.serves_inline_) {  // a request and its answer must fit a port's slot
      conn->max_write = kMaxRelayedIo;
      conn->max_read = kMaxRelayedIo;
    }
    if (shim.options_.on_ready) {
      try {
        shim.options_.on_ready();
      } catch (...) {
        Logger("fuse")->error("the ready callback failed");
      }
    }
  }

  static void Lookup(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept {
    Named(req, VfsOp::kLookup, parent, name);
  }
  static void Forget(fuse_req_t req, fuse_ino_t node, uint64_t nlookup) noexcept {
    ForgetOne(req, node, nlookup);
    fuse_reply_none(req);
  }
  static void ForgetMulti(fuse_req_t req, size_t count, fuse_forget_data* forgets) noexcept {
    for (size_t i = 0; i < count; ++i) ForgetOne(req, forgets[i].ino, forgets[i].nlookup);
    fuse_reply_none(req);
  }
  static void ForgetOne(fuse_req_t req, fuse_ino_t node, uint64_t nlookup) noexcept {
    auto m = Begin(req, VfsOp::kForget, node);
    if (!m) return;
    m->fuse_req = nullptr;  // forget has no answer; `req` is answered by the caller
    m->req.count = nlookup;
    FuseShim& shim = Shim(req);
    m->reply_port = nullptr;
    try {
      Send(shim.port_, MessagePtr(m.release()));
    } catch (...) {
      Logger("fuse")->error("sending a forget failed");
    }
  }
  static void GetAttr(fuse_req_t req, fuse_ino_t node, fuse_file_info* fi) noexcept {
    auto m = Begin(req, VfsOp::kGetAttr, node);
    if (!m) return;
    if (fi != nullptr) {
      m->req.fh = fi->fh;
      m->req.has_fh = true;
    }
    m->req.flags = static_cast<int>(StatxMask());  // 0 but for a FUSE_STATX
    Submit(std::move(m));
  }
  static void SetAttr(fuse_req_t req, fuse_ino_t node, struct stat* attr, int to_set, fuse_file_info* fi) noexcept {
    auto m = Begin(req, VfsOp::kSetAttr, node);
    if (!m) return;
    if (fi != nullptr) {
      m->req.fh = fi->fh;
      m->req.has_fh = true;
    }
    m->req.attr = *attr;
    m->req.flags = to_set;
    Submit(std::move(m));
  }
  static void ReadLink(fuse_req_t req, fuse_ino_t node) noexcept { Plain(req, VfsOp::kReadLink, node); }
  static void MkNod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev) noexcept try {
    auto m = Begin(req, VfsOp::kMkNod, parent);
    if (!m) return;
    m->req.name = name;
    SetMode(req, m->req, mode);
    m->req.rdev = rdev;
    Submit(std::move(m));
  } catch (...) {
    fuse_reply_err(req, ENOMEM);
  }
  static void MkDir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) noexcept try {
    auto m = Begin(req, VfsOp::kMkDir, parent);
    if (!m) return;
    m->req.name = name;
    SetMode(req, m->req, mode);
    Submit(std::move(m));
  } catch (...) {
    fuse_reply_err(req, ENOMEM);
  }
  static void Unlink(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept {
    Named(req, VfsOp::kUnlink, parent, name);
  }
  static void RmDir(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept {
    Named(req, VfsOp::kRmDir, parent, name);
  }
  static void Symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name) noexcept try {
    auto m = Begin(req, VfsOp::kSymlink, parent);
    if (!m) return;
    m->req.name = name;
    m->req.name2 = link;
    Submit(std::move(m));
  } catch (...) {
    fuse_reply_err(req, ENOMEM);
  }
  static void Rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
                     const char* newname, unsigned flags) noexcept try {
    auto m = Begin(req, VfsOp::kRename, parent);
    if (!m) return;
    m->req.name = name;
    m->req.node2 = newparent;
    m->req.name2 = newname;
    m->req.flags = static_cast<int>(flags);
    Submit(std::move(m));
  } catch (...) {
    fuse_reply_err(req, ENOMEM);
  }
  static void Link(fuse_req_t req, fuse_ino_t node, fuse_ino_t newparent, const char* newname) noexcept try {
    auto m = Begin(req, VfsOp::kLink, node);
    if (!m) return;
    m->req.node2 = newparent;
    m->req.name2 = newname;
    Submit(std::move(m));
  } catch (...) {
    fuse_reply_err(req, ENOMEM);
  }
  static void Open(fuse_req_t req, fuse_ino_t node, fuse_file_info* fi) noexcept {
    Plain(req, VfsOp::kOpen, node, fi);
  }
  static void Read(fuse_req_t req, fuse_ino_t node, size_t size, off_t off, fuse_file_info* fi) noexcept {
    auto m = Begin(req, VfsOp::kRead, node);
    if (!m) return;
    m->req.fh = fi->fh;
    m->req.size = size;
    m->req.offset = off;
    Submit(std::move(m));
  }
  static void Write(fuse_req_t req, fuse_ino_t node, const char* buf, size_t size, off_t off,
                    fuse_file_info* fi) noexcept try {
    auto m = Begin(req, VfsOp::kWrite, node);
    if (!m) return;
    m->req.fh = fi->fh;
    m->req.offset = off;
    m->req.flags = fi->flags;
    Shim(req).CreditWriter(m->req);
    if (Shim(req).serves_inline_) {
      m->req.in = {buf, size};  // answered before this callback returns
    } else {
      m->in_copy.assign(buf, buf + size);  // libfuse reuses `buf` once we return
      m->req.in = {m->in_copy.data(), m->in_copy.size()};
    }
    Submit(std::move(m));
  } catch (...) {
    fuse_reply_err(req, ENOMEM);
  }
  static void Flush(fuse_req_t req, fuse_ino_t node, fuse_file_info* fi) noexcept {
    Plain(req, VfsOp::kFlush, node, fi);
  }
  static void Release(fuse_req_t req, fuse_ino_t node, fuse_file_info* fi) noexcept {
    Shim(req).ForgetOpener(fi->fh);  // before the stack may give the number out again
    Shim(req).ReleaseBacking(fi->fh);
    Plain(req, VfsOp::kRelease, node, fi);
  }
  static void Fsync(fuse_req_t req, fuse_ino_t node, int datasync, fuse_file_info* fi) noexcept {
    auto m = Begin(req, VfsOp::kFsync, node);
    if (!m) return;
    m->req.fh = fi->fh;
    m->req.flags = datasync;
    Submit(std::move(m));
  }
  static void OpenDir(fuse_req_t req, fuse_ino_t node, fuse_file_info* fi) noexcept { Plain(req, VfsOp::kOpenDir, node, fi); }
  static void ReadDirAny(fuse_req_t req, VfsOp op, fuse_ino_t node, size_t size, off_t off, fuse_file_info* fi) noexcept {
    if (Shim(req).TakeDirEnd(fuse_req_ctx(req)->pid, node, off)) {
      fuse_reply_buf(req, nullptr, 0);  // the listing's end, known from its last records
      return;
    }
    auto m = Begin(req, op, node);
    if (!m) return;
    m->req.fh = fi->fh;
    m->req.size = size;
    m->req.offset = off;
    Submit(std::move(m));
  }
  static void ReadDir(fuse_req_t req, fuse_ino_t node, size_t size, off_t off, fuse_file_info* fi) noexcept {
    ReadDirAny(req, VfsOp::kReadDir, node, size, off, fi);
  }
  static void ReadDirPlus(fuse_req_t req, fuse_ino_t node, size_t size, off_t off, fuse_file_info* fi) noexcept {
    ReadDirAny(req, VfsOp::kReadDirPlus, node, size, off, fi);
  }
  static void ReleaseDir(fuse_req_t req, fuse_ino_t node, fuse_file_info* fi) noexcept { Plain(req, VfsOp::kReleaseDir, node, fi); }
  static void FsyncDir(fuse_req_t req, fuse_ino_t node, int datasync, fuse_file_info* fi) noexcept {
    auto m = Begin(req, VfsOp::kFsyncDir, node);
    if (!m) return;
    m->req.fh = fi->fh;
    m->req.flags = datasync;
    Submit(std::move(m));
  }
  static void StatFs(fuse_req_t req, fuse_ino_t node) noexcept { Plain(req, VfsOp::kStatFs, node); }
  static void SetXattr(fuse_req_t req, fuse_ino_t node, const char* name, const char* value, size_t size,
                       int flags) noexcept try {
    if (Shim(req).setxattr_ext_.load()) {
      // libfuse 3.14 reads the request's header as 8 bytes, as it was before FUSE
      // 7.33: what it takes for the name starts with the extended header's
      // setxattr_flags and padding (both 32 bits, the padding zero).
      if (Load<uint32_t>(name) & kabi::kSetxattrAclKillSgid) flags |= kXattrAclKillSgid;
      name += 8;
      value = name + std::strlen(name) + 1;
    }
    auto m = Begin(req, VfsOp::kSetXattr, node);
    if (!m) return;
    m->req.name = name;
    m->in_copy.assign(value, value + size);
    m->req.in = {m->in_copy.data(), m->in_copy.size()};
    m->req.flags = flags;
    Submit(std::move(m));
  } catch (...) {
    fuse_reply_err(req, ENOMEM);
  }
  // chattr and lsattr: the kernel asks for a file's inode flags with these ioctls, on
  // a handle it opened for them. It sends a program's other ioctls of a file here too
  // (python's isatty of every file it opens, for one): they are answered at once, as
  // the kernel answers on a file system without them.
  static void Ioctl(fuse_req_t req, fuse_ino_t node, unsigned int cmd, void*, fuse_file_info*, unsigned,
                    const void* in_buf, size_t in_size, size_t out_size) noexcept try {
    const InodeFlagsIoctl io = InodeFlagsIoctlOf(cmd);
    if (io.size == 0 || (io.sets ? in_size : out_size) != io.size) {
      fuse_reply_err(req, ENOTTY);
      return;
    }
    auto m = Begin(req, VfsOp::kIoctl, node);
    if (!m) return;
    m->req.count = cmd;
    if (io.sets) {
      const char* in = static_cast<const char*>(in_buf);
      m->in_copy.assign(in, in + in_size);
      m->req.in = {m->in_copy.data(), m->in_copy.size()};
    } else {
      m->req.size = out_size;
    }
    Submit(std::move(m));
  } catch (...) {
    fuse_reply_err(req, ENOMEM);
  }
  static void GetXattr(fuse_req_t req, fuse_ino_t node, const char* name, size_t size) noexcept try {
    auto m = Begin(req, VfsOp::kGetXattr, node);
    if (!m) return;
    m->req.name = name;
    m->req.size = size;
    Submit(std::move(m));
  } catch (...) {
    fuse_reply_err(req, ENOMEM);
  }
  static void ListXattr(fuse_req_t req, fuse_ino_t node, size_t size) noexcept {
    auto m = Begin(req, VfsOp::kListXattr, node);
    if (!m) return;
    m->req.size = size;
    // ext4 (and tmpfs, and overlayfs) list the names of trusted.* attributes only to a
    // caller with CAP_SYS_ADMIN; the kernel refuses the others their values, not their
    // names, and the stack lists as root. For such a caller the whole list is asked,
    // and the answer leaves those names out (and says its own size).
    if (!Shim(req).MayAdmin(m->req.ctx.pid)) {
      m->list_room = static_cast<int64_t>(size);
      m->req.size = XATTR_LIST_MAX;
    }
    Submit(std::move(m));
  }
  static void RemoveXattr(fuse_req_t req, fuse_ino_t node, const char* name) noexcept {
    Named(req, VfsOp::kRemoveXattr, node, name);
  }
  static void Access(fuse_req_t req, fuse_ino_t node, int mask) noexcept {
    auto m = Begin(req, VfsOp::kAccess, node);
    if (!m) return;
    m->req.flags = mask;
    Submit(std::move(m));
  }
  static void Create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi) noexcept try {
    auto m = Begin(req, VfsOp::kCreate, parent);
    if (!m) return;
    SetMode(req, m->req, mode);
    m->req.flags = fi->flags;
    if (std::string_view(name) == "/") {  // a FUSE_TMPFILE (ProcessRequest)
      m->req.flags = (fi->flags & ~O_CREAT) | O_TMPFILE;
    } else {
      m->req.name = name;
    }
    Submit(std::move(m));
  } catch (...) {
    fuse_reply_err(req, ENOMEM);
  }
  static void Fallocate(fuse_req_t req, fuse_ino_t node, int mode, off_t offset, off_t length,
                        fuse_file_info* fi) noexcept {
    auto m = Begin(req, VfsOp::kFallocate, node);
    if (!m) return;
    m->req.fh = fi->fh;
    m->req.flags = mode;
    m->req.offset = offset;
    m->req.offset2 = length;
    Submit(std::move(m));
  }
  static void CopyFileRange(fuse_req_t req, fuse_ino_t in_node, off_t in_off, fuse_file_info* in_fi,
                            fuse_ino_t out_node, off_t out_off, fuse_file_info* out_fi, size_t len,
                            int flags) noexcept {
    auto m = Begin(req, VfsOp::kCopyFileRange, in_node);
    if (!m) return;
    m->req.fh = in_fi->fh;
    m->req.offset = in_off;
    m->req.node2 = out_node;
    m->req.fh2 = out_fi->fh;
    m->req.offset2 = out_off;
    m->req.size = len;
    m->req.flags = flags;
    Submit(std::move(m));
  }
  static void Lseek(fuse_req_t req, fuse_ino_t node, off_t off, int whence, fuse_file_info* fi) noexcept {
    auto m = Begin(req, VfsOp::kLseek, node);
    if (!m) return;
    m->req.fh = fi->fh;
    m->req.offset = off;
    m->req.flags = whence;
    Submit(std::move(m));
  }

  static fuse_lowlevel_ops Table() {
    fuse_lowlevel_ops ops{};
    ops.init = Init;
    ops.lookup = Lookup;
    ops.forget = Forget;
    ops.forget_multi = ForgetMulti;
    ops.getattr = GetAttr;
    ops.setattr = SetAttr;
    ops.readlink = ReadLink;
    ops.mknod = MkNod;
    ops.mkdir = MkDir;
    ops.unlink = Unlink;
    ops.rmdir = RmDir;
    ops.symlink = Symlink;
    ops.rename = Rename;
    ops.link = Link;
    ops.open = Open;
    ops.read = Read;
    ops.write = Write;
    ops.flush = Flush;
    ops.release = Release;
    ops.fsync = Fsync;
    ops.opendir = OpenDir;
    ops.readdir = ReadDir;
    ops.readdirplus = ReadDirPlus;
    ops.releasedir = ReleaseDir;
    ops.fsyncdir = FsyncDir;
    ops.statfs = StatFs;
    ops.setxattr = SetXattr;
    ops.ioctl = Ioctl;
    ops.getxattr = GetXattr;
    ops.listxattr = ListXattr;
    ops.removexattr = RemoveXattr;
    ops.access = Access;
    ops.create = Create;
    ops.fallocate = Fallocate;
    ops.copy_file_range = CopyFileRange;
    ops.lseek = Lseek;
    return ops;
  }
};

FuseShim::FuseShim(Options options, Port& port)
    : options_(std::move(options)), port_(port), replies_(std::make_unique<ReplyPort>(*this)) {}

Result<std::unique_ptr<FuseShim>> FuseShim::Mount(Options options, Port& port, bool serves_inline) {
  std::unique_ptr<FuseShim> shim(new FuseShim(std::move(options), port));
  shim->serves_inline_ = serves_inline;
  shim->exit_fd_.Reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!shim->exit_fd_) return Fail(errno);
  const Options& o = shim->options_;
  // libfuse parses options from an argv; fsname is escaped for its comma syntax.
  std::string fsname;
  for (char c : o.fsname) {
    if (c == ',' || c == '\\') fsname += '\\';
    fsname += c;
  }
  std::string opts = "fsname=" + fsname + ",subtype=ulsp,default_permissions";
  if (o.allow_other) opts += ",allow_other";
  if (o.read_only) opts += ",ro";
  if (!serves_inline) opts += ",max_read=" + std::to_string(kMaxRelayedIo);
  // Device nodes and set-user-ID files work as on the file system underneath (libfuse
  // would mount nodev,nosuid); only root may ask for that.
  if (::geteuid() == 0) opts += ",dev,suid";
  std::vector<std::string> argv_s = {"ulsp", "-o", opts};
  if (o.debug) argv_s.push_back("-d");
  std::vector<char*> argv;
  for (auto& s : argv_s) argv.push_back(s.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  static const fuse_lowlevel_ops kOps = FuseOps::Table();
  shim->session_ = fuse_session_new(&args, &kOps, sizeof kOps, shim.get());
  fuse_opt_free_args(&args);
  if (shim->session_ == nullptr) return Fail(EINVAL);
  if (o.premounted_fd >= 0) {
    // libfuse takes a descriptor given as /dev/fd/N as already mounted, and closes it
    // when the session ends.
    const std::string fd_path = "/dev/fd/" + std::to_string(o.premounted_fd);
    if (fuse_session_mount(shim->session_, fd_path.c_str()) != 0) return Fail(errno != 0 ? errno : EIO);
    shim->UseCustomIo();
    return shim;
  }
  if (fuse_session_mount(shim->session_, o.mountpoint.c_str()) != 0) return Fail(errno != 0 ? errno : EIO);
  shim->mounted_ = true;
  shim->UseCustomIo();
  return shim;
}

void FuseShim::UseCustomIo() noexcept {
  if (options_.io_uring && FuseUring::KernelOffers()) {
    FuseUring::Options uo;
    if (!serves_inline_ && port_.Pollable()) uo.helped = &port_;
    auto uring = FuseUring::Create(session_, uo);
    if (uring) {
      uring_ = std::move(*uring);
    } else {
      Logger("fuse")->info("{}: FUSE over io_uring is offered but cannot be set up ({}); requests come through /dev/fuse",
                           options_.mountpoint, uring.error().Describe());
    }
  }
  // Whether descriptors come (from a stack in this process, or with an isolated
  // server's replies) is the port's business: without one an open is served as usual.
  static const fuse_custom_io kIo = {WriteReply, ReadRequest, IoSplice, IoSplice};
  const bool ok = fuse_session_custom_io(session_, &kIo, fuse_session_fd(session_)) == 0;
  passthrough_io_ = ok && options_.kernel_passthrough;
  if (!ok) uring_.reset();
}

uint64_t FuseShim::UringServed() const noexcept {
  const FuseUring* uring = uring_live_.load(std::memory_order_acquire);
  return uring != nullptr ? uring->Served() : 0;
}

int32_t FuseShim::AcquireBacking(uint64_t node, uint64_t fh, int fd, const VfsRequest& q) noexcept try {
  std::lock_guard lock(backing_mu_);
  auto it = backing_.find(node);
  if (it == backing_.end()) {
    if (!passthrough_.load()) return -1;
    kabi::BackingMap map{fd, 0, 0};
    // The kernel reads and writes through a backing file with the credentials of
    // whoever registered it, for every handle of the node that comes while it is
    // registered, whoever opened them (it takes no other file for the node
    // meanwhile, nor an open that is not passed through). Registered as root, it let
    // a caller of user 1000 fill the blocks ext4 keeps back for root. So it is
    // registered as a writer that is not root (thread_creds.h): the first opener,
    // or, for a root one, nobody; writes through the kernel then never take the
    // reserve, a root caller's neither (its served writes do).
    const bool root = q.ctx.uid == 0;
    int err = 0;
    const int id = [&] {
      const AsWriter as_writer(root ? kNobody : q.ctx.uid, AsWriter::Kind::kFiles);
      const int r = ::ioctl(fuse_session_fd(session_), kabi::kBackingOpen, &map);
      err = errno;  // before the scope's own calls
      return r;
    }();
    if (id < 0) {
      if (err == EPERM || err == ENOTTY || err == EINVAL || err == EOPNOTSUPP) {
        // Not this kernel, not without CAP_SYS_ADMIN, or not negotiated: from now on
        // every file's data goes through the stack.
        passthrough_.store(false);
        Logger("fuse")->info("{}: the kernel does not take backing files ({}); reads and writes go through the stack",
                             options_.mountpoint, Errno(err).Describe());
      } else {
        // This file only (ELOOP: it lies on a file system stacked too deep).
        Logger("fuse")->debug("{}: node {} is served without passthrough: {}", options_.mountpoint, node,
                              Errno(err).Describe());
      }
      return -1;
    }
    it = backing_.emplace(node, Backing{id, 0}).first;
  }
  backed_fh_.emplace(fh, node);
  ++it->second.opens;
  return it->second.id;
} catch (...) {
  return -1;
}

void FuseShim::ReleaseBacking(uint64_t fh) noexcept {
  if (!passthrough_io_) return;  // no handle was ever backed
  std::lock_guard lock(backing_mu_);
  auto h = backed_fh_.find(fh);
  if (h == backed_fh_.end()) return;
  auto it = backing_.find(h->second);
  backed_fh_.erase(h);
  if (it == backing_.end() || --it->second.opens > 0) return;
  // Files the kernel opened on this id keep their own reference to the backing file.
  uint32_t id = static_cast<uint32_t>(it->second.id);
  ::ioctl(fuse_session_fd(session_), kabi::kBackingClose, &id);
  backing_.erase(it);
}

void FuseShim::NoteOpener(uint64_t fh, const VfsRequest& q) noexcept try {
  if (q.ctx.uid == 0 || (q.flags & O_ACCMODE) == O_RDONLY) return;
  std::lock_guard lock(openers_mu_);
  openers_[fh] = {q.ctx.uid, q.ctx.gid};
} catch (...) {
  // No room to note it: this handle's write-back is served as root's.
}

void FuseShim::ForgetOpener(uint64_t fh) noexcept {
  std::lock_guard lock(openers_mu_);
  if (!openers_.empty()) openers_.erase(fh);
}

void FuseShim::CreditWriter(VfsRequest& q) noexcept {
  if (q.ctx.uid != 0 || q.ctx.pid != 0) return;
  std::lock_guard lock(openers_mu_);
  const auto it = openers_.find(q.fh);
  if (it == openers_.end()) return;
  q.ctx.uid = it->second.uid;
  q.ctx.gid = it->second.gid;
}

bool FuseShim::MayAdmin(pid_t pid) const noexcept {
  if (!options_.callers_may_admin || pid <= 0) return false;
  ThreadCaps caps;
  return caps.Get(pid) && ((caps.Effective() >> CAP_SYS_ADMIN) & 1) != 0;
}

void FuseShim::NoteDirEnd(const VfsRequest& q) noexcept try {
  if (q.out.empty() || q.timeout <= 0) return;  // after nothing, the kernel asks no more
  int64_t last = 0;
  if (q.op == VfsOp::kReadDirPlus) {
    ForEachDirentPlus(q.out, [&](const fuse_direntplus& d, size_t) { last = static_cast<int64_t>(d.dirent.off); });
  } else {
    ForEachDirent(q.out, [&](const fuse_dirent& d, size_t) { last = static_cast<int64_t>(d.off); });
  }
  const auto now = std::chrono::steady_clock::now();
  const auto until = now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                               std::chrono::duration<double>(std::min(q.timeout, 3600.0)));
  std::lock_guard lock(dir_end_mu_);
  if (dir_ends_.size() >= 1024) {  // listings left unfinished: keep the table small
    std::erase_if(dir_ends_, [&](const auto& e) { return e.second.until <= now; });
    if (dir_ends_.size() >= 1024) dir_ends_.clear();
  }
  dir_ends_[q.node] = {q.ctx.pid, last, until};
} catch (...) {
  // Out of memory: the kernel's last question goes to the stack, as without this.
}

bool FuseShim::TakeDirEnd(pid_t pid, uint64_t node, int64_t offset) noexcept {
  if (offset == 0) return false;
  std::lock_guard lock(dir_end_mu_);
  auto it = dir_ends_.find(node);
  if (it == dir_ends_.end() || it->second.pid != pid || it->second.offset != offset) return false;
  const bool fresh = std::chrono::steady_clock::now() < it->second.until;
  dir_ends_.erase(it);
  return fresh;
}

void FuseShim::DropDirEnds(const VfsRequest& q) noexcept {
  ChangedName names[2];
  const int n = ChangedNames(q, names);
  if (n == 0) return;
  std::lock_guard lock(dir_end_mu_);
  for (int i = 0; i < n; ++i) dir_ends_.erase(names[i].dir);
}

void FuseShim::Unsure(const VfsRequest& q) noexcept try {
  ChangedName names[2];
  const int n = ChangedNames(q, names);
  const bool attrs = q.op == VfsOp::kSetAttr || q.op == VfsOp::kLink;  // link: the link count
  if (n == 0 && !attrs) return;
  std::lock_guard lock(stale_mu_);
  if (stale_stop_) return;
  for (int i = 0; i < n; ++i) stale_.push_back({names[i].dir, std::string(names[i].name)});
  if (attrs) stale_.push_back({q.node, {}});
  if (!invalidator_.joinable()) invalidator_ = std::thread([this] { Invalidate(); });
  stale_cv_.notify_one();
} catch (...) {
  Logger("fuse")->warn("{}: out of memory: the kernel's cache of a change of unknown outcome stays until its timeout",
                       options_.mountpoint);
}

void FuseShim::DropAttributes(const VfsRequest& q) noexcept {
  for (uint64_t node : q.changed) {
    // A negative offset: the attributes only. ENOENT: the kernel holds no such node.
    const int rc = fuse_lowlevel_notify_inval_inode(session_, node, -1, 0);
    if (rc != 0 && rc != -ENOENT)
      Logger("fuse")->debug("{}: dropping node {}'s attributes from the kernel's cache: {}", options_.mountpoint,
                            node, Errno(-rc).Describe());
  }
}

void FuseShim::Invalidate() noexcept {
  std::unique_lock lock(stale_mu_);
  for (;;) {
    stale_cv_.wait(lock, [this] { return stale_stop_ || !stale_.empty(); });
    if (stale_stop_) return;
    std::vector<Stale> batch;
    batch.swap(stale_);
    lock.unlock();
    for (const Stale& s : batch) {
      // ENOENT: the kernel holds no such node or name any more, which is as good.
      const int rc = s.name.empty() ? fuse_lowlevel_notify_inval_inode(session_, s.node, 0, 0)
                                    : fuse_lowlevel_notify_inval_entry(session_, s.node, s.name.data(), s.name.size());
      if (rc != 0 && rc != -ENOENT)
        Logger("fuse")->debug("{}: dropping node {}'s {} from the kernel's cache: {}", options_.mountpoint, s.node,
                              s.name.empty() ? "attributes" : "entry '" + s.name + "'", Errno(-rc).Describe());
    }
    lock.lock();
  }
}

void FuseShim::StopInvalidating() noexcept {
  {
    std::lock_guard lock(stale_mu_);
    stale_stop_ = true;
  }
  stale_cv_.notify_one();
  if (invalidator_.joinable()) invalidator_.join();
}

namespace {
std::atomic<FuseShim*> g_signalled{nullptr};  // the shim HandleSignals ends
void ExitOnSignal(int) {
  if (FuseShim* shim = g_signalled.load()) shim->Exit();
}
constexpr int kExitSignals[] = {SIGINT, SIGTERM, SIGHUP};
}  // namespace

FuseShim::~FuseShim() {
  if (session_ == nullptr) return;
  // Replies still due would answer a destroyed session: wait for them (a port
  // replies every message, ECONNRESET at worst).
  for (int i = 0; i < 5000 && in_flight_.load(std::memory_order_acquire) > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  // Before the session goes. (Once every reply went out, whatever it waits for the
  // kernel to finish ends soon.)
  StopInvalidating();
  if (signals_) {
    for (int sig : kExitSignals) ::signal(sig, SIG_DFL);
    g_signalled.store(nullptr);
  }
  if (mounted_) fuse_session_unmount(session_);
  if (uring_) {
    // Its threads feed the session: they stop before it goes.
    if (const uint64_t n = UringServed(); n > 0)
      Logger("fuse")->info("{}: {} requests came through io_uring", options_.mountpoint, n);
    uring_live_.store(nullptr);
    uring_.reset();
  }
  fuse_session_destroy(session_);
}

int FuseShim::Serve() {
  FuseLoop::Options loop;
  loop.spin = options_.spin;
  if (const char* sp = std::getenv("ULSP_FUSE_SPIN_US")) {
    // For measurements (docs/vfs.md): how long the leader polls after a request.
    const std::string_view text(sp);
    unsigned us = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), us);
    if (ec == std::errc() && end == text.data() + text.size() && us <= 1'000'000) {
      loop.spin = std::chrono::microseconds(us);
    } else {
      Logger("fuse")->warn("ULSP_FUSE_SPIN_US='{}' is not a number of microseconds up to 1000000; spinning {} µs",
                           text, std::chrono::duration_cast<std::chrono::microseconds>(loop.spin).count());
    }
  }
  if (const char* rest = std::getenv("ULSP_FUSE_REST"); rest != nullptr && std::string_view(rest) == "0") {
    loop.rest = false;  // for measurements (docs/vfs.md): every reader waits for every request
  }
  loop.max_threads = options_.max_threads;
  loop.exit_fd = exit_fd_.get();
  if (!serves_inline_ && port_.Pollable()) {
    // Replies come from another process, through a ring that the per-CPU readers can
    // drain: they deliver them. (A remote port's come from its own thread.)
    loop.helped = &port_;
    loop.replies_due = &in_flight_;
  }
  FuseLoop serving(session_, loop);
  const int result = serving.Run();
  if (const uint64_t rests = serving.Rests(); rests > 0)
    Logger("fuse")->debug("{}: per-CPU readers rested {} times", options_.mountpoint, rests);
  if (loop.helped != nullptr)
    Logger("fuse")->debug("{}: the readers delivered the server's replies {} times", options_.mountpoint,
                          serving.Delivered());
  return result;
}

void FuseShim::Exit() noexcept {
  fuse_session_exit(session_);
  const uint64_t one = 1;
  (void)!::write(exit_fd_.get(), &one, sizeof one);
}

void FuseShim::HandleSignals() {
  // Not libfuse's handlers: they end the session but wake none of the loop's threads.
  if (signals_) return;
  g_signalled.store(this);
  struct sigaction sa {};
  sa.sa_handler = ExitOnSignal;
  sigemptyset(&sa.sa_mask);
  for (int sig : kExitSignals) ::sigaction(sig, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);  // as libfuse's: a reply to a vanished kernel request is not fatal
  signals_ = true;
}

}  // namespace ulsp::msgport
