#include "ulsp/vfs/passthrough.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <new>
#include <optional>

#include "kernel/msgport/log.h"
#include "kernel/msgport/thread_creds.h"

namespace ulsp::vfs {
namespace {

constexpr uint64_t MakeId(uint32_t index, uint32_t generation) {
  return (static_cast<uint64_t>(generation) << 32) | index;
}
constexpr uint32_t IndexOf(uint64_t id) { return static_cast<uint32_t>(id & 0xffffffffu); }
constexpr uint32_t GenerationOf(uint64_t id) { return static_cast<uint32_t>(id >> 32); }

// 0 or the errno of a system call made through Sys.
template <class F>
int Errno0(F&& call) {
  auto r = Sys(std::forward<F>(call));
  return r ? 0 : r.error().value;
}

// "/proc/self/fd/N": the way to reach an O_PATH descriptor's file with calls that
// take no descriptor (open, xattrs, truncate, utimens).
struct ProcPath {
  char buf[32];
  explicit ProcPath(int fd) { std::snprintf(buf, sizeof buf, "/proc/self/fd/%d", fd); }
  const char* c_str() const { return buf; }
};

// The mode to make a file, directory or node with in the directory `dir_fd`:
// `req.mode`, from which the caller's umask took `req.ctx.umask_took`, unless the
// directory has a default ACL, which the disk then applies in the umask's place (as it
// does for a caller of its own).
mode_t CreationMode(const VfsRequest& req, int dir_fd) {
  if (req.ctx.umask_took == 0) return req.mode;
  const bool default_acl = ::getxattr(ProcPath(dir_fd).c_str(), "system.posix_acl_default", nullptr, 0) > 0;
  return default_acl ? req.mode | req.ctx.umask_took : req.mode;
}

// Grows this process's descriptor table now to hold the first 64Ki descriptors (at
// most `limit`), so that descriptors for nodes later take no growth. The kernel
// grows a table by doubling it, and when the process has more than one thread each
// growth waits for an RCU grace period: 10–15 ms on a 2-vCPU VM, inside whichever
// request opened the 128th, 256th, 512th … descriptor. The table then costs 512 KiB
// of kernel memory; it never shrinks.
void ReserveDescriptorTable(rlim_t limit) {
  const int last = static_cast<int>(std::min<rlim_t>(limit, rlim_t{1} << 16)) - 1;
  if (last < 64 || ::fcntl(last, F_GETFD) >= 0) return;  // small enough already, or in use
  const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  // F_DUPFD takes the lowest free number from `last` on: `last` itself, free above.
  if (const int high = ::fcntl(fd, F_DUPFD_CLOEXEC, last); high >= 0) ::close(high);
  ::close(fd);
}

// O_DIRECT I/O wants its memory aligned to the disk's logical block, and a request's
// data sits where the kernel's message put it (a write's 80 bytes in). A file opened
// O_DIRECT that refuses it (EINVAL) is read or written once more through an aligned
// copy; what the file then still refuses (an unaligned offset or size) the caller gets.
constexpr size_t kDirectAlign = 4096;

bool RefusedAsDirect(int err, int fd) { return err == EINVAL && (::fcntl(fd, F_GETFL) & O_DIRECT) != 0; }

std::unique_ptr<char, decltype(&std::free)> AlignedCopyBuffer(size_t size) {
  const size_t rounded = (std::max<size_t>(size, 1) + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
  return {static_cast<char*>(std::aligned_alloc(kDirectAlign, rounded)), &std::free};
}

// The kernel opens devices, FIFOs and sockets itself and never asks a server to; only
// a peer that is not a kernel (an agent's) could, and then the server, as root, would
// open them for it: the agent's host's disks, a FIFO that blocks a worker for good.
// Refused with EPERM; regular files and directories are opened, and a symlink is
// ELOOP, as O_NOFOLLOW says.
int SpecialFileError(mode_t mode) {
  if (S_ISREG(mode) || S_ISDIR(mode)) return 0;
  return S_ISLNK(mode) ? ELOOP : EPERM;
}

}  // namespace

PassthroughLayer::DirHandle::~DirHandle() {
  if (dir != nullptr) closedir(dir);
}

Result<std::unique_ptr<PassthroughLayer>> PassthroughLayer::Open(const std::string& root) {
  auto fd = Sys([&] { return ::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC); });
  if (!fd) return std::unexpected(fd.error());
  UniqueFd root_fd(*fd);
  struct stat st {};
  if (auto r = Sys([&] { return ::fstat(root_fd.get(), &st); }); !r) return std::unexpected(r.error());
  // The kernel has applied the caller's umask already; the server's own must not
  // mask a second time.
  ::umask(0);
  // Every node the kernel holds is a descriptor: allow as many as the system lets
  // this process have (root may raise its hard limit to fs.nr_open).
  struct rlimit files {1024, 1024};
  if (::getrlimit(RLIMIT_NOFILE, &files) == 0) {
    rlim_t most = files.rlim_max;
    if (std::ifstream nr_open("/proc/sys/fs/nr_open"); nr_open >> most && most > files.rlim_max) {
      struct rlimit raised = {most, most};
      if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) files = raised;
    }
    files.rlim_cur = files.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &files);
  }
  ReserveDescriptorTable(files.rlim_cur);
  auto dir_fd = Sys([&] { return ::openat(root_fd.get(), ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC); });
  if (!dir_fd) return std::unexpected(dir_fd.error());
  auto layer = std::unique_ptr<PassthroughLayer>(new PassthroughLayer(std::move(root_fd), st));
  layer->root_dir_fd_.Reset(*dir_fd);
  // Keep a quarter of the descriptors (at least 1024) for open files, directories and
  // libfuse; nodes beyond the rest, counted over every passthrough layer of the
  // process (an overlay has two), are kept as file handles.
  const rlim_t limit = files.rlim_cur;
  const rlim_t reserve = std::max<rlim_t>(limit / 4, 1024);
  layer->fd_budget_ = limit > reserve ? static_cast<size_t>(limit - reserve) : 0;
  return layer;
}

PassthroughLayer::PassthroughLayer(UniqueFd root_fd, struct stat root_st) : Layer(nullptr) {
  nodes_.resize(2);
  Node& root = nodes_[1];
  root.fd = std::move(root_fd);
  root.dev = root_st.st_dev;
  root.ino = root_st.st_ino;
  root.nlookup = 1;
  root_dev_ = root.dev;
  fds_held_ = 1;
  process_fds_held_.fetch_add(1, std::memory_order_relaxed);
  by_inode_[{root.dev, root.ino}] = 1;
  live_ = 1;
}

PassthroughLayer::~PassthroughLayer() { process_fds_held_.fetch_sub(fds_held_, std::memory_order_relaxed); }

size_t PassthroughLayer::NodeCount() const {
  std::shared_lock lock(table_mu_);
  return live_;
}

PassthroughLayer::FdRef PassthroughLayer::NodeFd(uint64_t node) {
  const uint32_t index = IndexOf(node);
  std::string handle, name;
  uint64_t parent = 0;
  InodeKey inode{};
  {
    std::shared_lock lock(table_mu_);
    if (index == 0 || index >= nodes_.size()) return {};
    const Node& n = nodes_[index];
    if (n.generation != GenerationOf(node) || n.nlookup == 0) return {};
    if (n.fd) return FdRef(n.fd.get());
    handle = n.handle;
    parent = n.parent;
    name = n.name;
    inode = {n.dev, n.ino};
  }
  if (handle.empty()) return OpenListed(node, parent, name, inode);
  // A node kept as a file handle: open it for this request only.
  auto* fh = reinterpret_cast<file_handle*>(handle.data());
  const int fd = ::open_by_handle_at(root_dir_fd_.get(), fh, O_PATH | O_CLOEXEC);
  return fd < 0 ? FdRef() : FdRef(UniqueFd(fd));
}

PassthroughLayer::FdRef PassthroughLayer::OpenListed(uint64_t node, uint64_t parent, std::string name, InodeKey inode) {
  // Its name may change under a rename in flight: read it again and retry once.
  for (int attempt = 0;; ++attempt) {
    UniqueFd fd;
    struct stat st {};
    if (const FdRef pfd = NodeFd(parent); pfd >= 0) {
      fd.Reset(::openat(pfd, name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
      if (fd && ::fstat(fd.get(), &st) != 0) fd.Reset();
    }
    UniqueFd unused;  // closed after the lock is released
    std::unique_lock lock(table_mu_);
    Node& n = nodes_[IndexOf(node)];
    if (n.generation != GenerationOf(node) || n.nlookup == 0) return {};
    if (n.fd) {  // another request opened it meanwhile
      unused = std::move(fd);
      return FdRef(n.fd.get());
    }
    if (fd && InodeKey{st.st_dev, st.st_ino} == inode) {
      if (!n.handle.empty()) return FdRef(std::move(fd));
      unused = Keep(n, std::move(fd));
      return unused ? FdRef(std::move(unused)) : FdRef(n.fd.get());
    }
    // Gone, or another file under its name: renamed or removed behind the mount's back,
    // unless a rename through it is changing the name now.
    if (attempt > 0 || (n.parent == parent && n.name == name)) return {};
    parent = n.parent;
    name = n.name;
  }
}

std::string PassthroughLayer::PathOf(uint64_t node) const {
  std::vector<std::string_view> parts;
  std::shared_lock lock(table_mu_);
  for (int depth = 0; node != kRootNode; ++depth) {
    const uint32_t index = IndexOf(node);
    if (depth > 4096 || index == 0 || index >= nodes_.size()) return "";
    const Node& n = nodes_[index];
    if (n.generation != GenerationOf(node) || n.nlookup == 0 || n.name.empty()) return "";
    parts.push_back(n.name);
    node = n.parent;
  }
  if (parts.empty()) return "/";
  std::string path;
  for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
    path += '/';
    path += *it;
  }
  return path;
}

UniqueFd PassthroughLayer::Keep(Node& n, UniqueFd fd) {
  if (process_fds_held_.load(std::memory_order_relaxed) >= fd_budget_ && n.dev == root_dev_ && !n.name.empty()) {
    // Out of descriptors to keep: keep the inode's file handle instead (the kernel may
    // hold more nodes than this process may have descriptors). Not for a file of no
    // name (O_TMPFILE, adopted): its descriptor may be all that keeps it.
    std::string handle(sizeof(file_handle) + MAX_HANDLE_SZ, '\0');
    auto* fh = reinterpret_cast<file_handle*>(handle.data());
    fh->handle_bytes = MAX_HANDLE_SZ;
    int mount_id = 0;
    if (::name_to_handle_at(fd.get(), "", fh, &mount_id, AT_EMPTY_PATH) == 0) {
      handle.resize(sizeof(file_handle) + fh->handle_bytes);
      n.handle = std::move(handle);
      return fd;
    }
  }
  ++fds_held_;
  process_fds_held_.fetch_add(1, std::memory_order_relaxed);
  n.fd = std::move(fd);
  return {};
}

uint64_t PassthroughLayer::Remember(UniqueFd fd, const struct stat& st, uint64_t parent,
                                    std::string_view name) {
  UniqueFd unused, spilled;  // closed after the lock is released
  std::unique_lock lock(table_mu_);
  if (auto it = by_inode_.find({st.st_dev, st.st_ino}); it != by_inode_.end()) {
    Node& n = nodes_[it->second];
    ++n.nlookup;
    if (it->second != 1 && !name.empty()) {  // none: ".", "..", or a file by its descriptor
      const bool named_now = n.name.empty();
      n.parent = parent;
      n.name.assign(name);
      if (named_now && n.fd) {  // a file of no name, linked: kept as any other now (Keep)
        --fds_held_;
        process_fds_held_.fetch_sub(1, std::memory_order_relaxed);
        spilled = Keep(n, std::move(n.fd));
      }
    }
    unused = (fd && !n.fd && n.handle.empty()) ? Keep(n, std::move(fd)) : std::move(fd);
    return MakeId(it->second, n.generation);
  }
  uint32_t index;
  if (!free_.empty()) {
    index = free_.back();
    free_.pop_back();
  } else {
    index = static_cast<uint32_t>(nodes_.size());
    nodes_.emplace_back();
  }
  Node& n = nodes_[index];
  n.handle.clear();
  n.dev = st.st_dev;
  n.ino = st.st_ino;
  n.nlookup = 1;
  n.parent = parent;
  n.name.assign(name);
  if (fd) unused = Keep(n, std::move(fd));
  by_inode_[{n.dev, n.ino}] = index;
  ++live_;
  return MakeId(index, n.generation);
}

void PassthroughLayer::Forget(uint64_t node, uint64_t count) {
  UniqueFd closing;
  std::unique_lock lock(table_mu_);
  const uint32_t index = IndexOf(node);
  if (index <= 1 || index >= nodes_.size()) return;  // the root is never dropped
  Node& n = nodes_[index];
  if (n.generation != GenerationOf(node) || n.nlookup == 0) return;
  n.nlookup -= std::min(count, n.nlookup);
  if (n.nlookup > 0) return;
  by_inode_.erase({n.dev, n.ino});
  if (n.fd) {
    --fds_held_;
    process_fds_held_.fetch_sub(1, std::memory_order_relaxed);
  }
  closing = std::move(n.fd);
  n.handle.clear();
  n.handle.shrink_to_fit();
  n.name.clear();
  n.name.shrink_to_fit();
  ++n.generation;
  free_.push_back(index);
  --live_;
}

int PassthroughLayer::DoLookup(VfsRequest& req, uint64_t parent, std::string_view name,
                               fuse_entry_param& e) {
  if (name.empty()) return ENOENT;
  if (int err = NameError(name)) return err;
  const FdRef pfd = NodeFd(parent);
  if (pfd < 0) return ESTALE;
  return LookupAt(req, pfd, parent, name, e);
}

int PassthroughLayer::LookupAt(VfsRequest& req, int pfd, uint64_t parent, std::string_view name,
                               fuse_entry_param& e) {
  std::string component(name);
  // The kernel resolves "." and ".." itself; a server that is asked anyway never
  // climbs above its root.
  if (component == ".." && parent == kRootNode) component = ".";
  auto fd = Sys([&] { return ::openat(pfd, component.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC); });
  if (!fd) return fd.error().value;
  UniqueFd node_fd(*fd);
  e = fuse_entry_param{};
  if (int err = Errno0([&] { return ::fstatat(node_fd.get(), "", &e.attr, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW); }))
    return err;
  const bool dots = component == "." || component == "..";
  Enter(req, std::move(node_fd), parent, dots ? std::string_view() : name, e);
  return 0;
}

void PassthroughLayer::Enter(const VfsRequest& req, UniqueFd fd, uint64_t parent, std::string_view name,
                             fuse_entry_param& e) {
  e.ino = Remember(std::move(fd), e.attr, parent, name);
  e.generation = GenerationOf(e.ino);
  e.attr_timeout = req.timeout;
  e.entry_timeout = req.timeout;
}

int PassthroughLayer::LookupListed(VfsRequest& req, int dir_fd, uint64_t parent, const char* name,
                                   fuse_entry_param& e) {
  e = fuse_entry_param{};
  if (int err = Errno0([&] { return ::fstatat(dir_fd, name, &e.attr, AT_SYMLINK_NOFOLLOW); })) return err;
  // A file with other links keeps a descriptor: the kernel may drop the name it was
  // listed under while it keeps the node through another.
  if (!S_ISDIR(e.attr.st_mode) && e.attr.st_nlink > 1) return LookupAt(req, dir_fd, parent, name, e);
  Enter(req, UniqueFd(), parent, name, e);
  return 0;
}

int PassthroughLayer::GiveToCaller(const VfsRequest& req, int parent_fd, const char* name, int file_fd) {
  if (req.ctx.uid == 0 && req.ctx.gid == 0) return 0;
  struct stat parent_st {};
  if (int err = Errno0([&] { return ::fstat(parent_fd, &parent_st); })) return err;
  const gid_t gid = (parent_st.st_mode & S_ISGID) ? static_cast<gid_t>(-1) : req.ctx.gid;
  if (int err = Errno0([&] {
        return file_fd >= 0 ? ::fchown(file_fd, req.ctx.uid, gid) : ::fchownat(parent_fd, name, req.ctx.uid, gid, AT_SYMLINK_NOFOLLOW);
      }))
    return err;
  // chown clears set-user-ID and set-group-ID bits; the caller asked for them.
  if ((req.mode & (S_ISUID | S_ISGID)) && !S_ISLNK(req.mode) && !S_ISDIR(req.mode))
    return Errno0([&] {
      return file_fd >= 0 ? ::fchmod(file_fd, req.mode & 07777) : ::fchmodat(parent_fd, name, req.mode & 07777, 0);
    });
  return 0;
}

int PassthroughLayer::GetAttr(VfsRequest& req) {
  FdRef node_fd;
  int fd = static_cast<int>(req.fh);
  if (!req.has_fh) {
    node_fd = NodeFd(req.node);
    if (node_fd < 0) return ESTALE;
    fd = node_fd;
  }
  if (int err = Errno0([&] { return ::fstatat(fd, "", &req.out_attr, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW); }))
    return err;
  if (static_cast<unsigned>(req.flags) & STATX_BTIME) {  // a statx(2) that wants the birth time
    struct statx sx {};
    // Not every file system keeps one: then the answer has none.
    req.out_btime_known = ::statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_BTIME, &sx) == 0 &&
                          (sx.stx_mask & STATX_BTIME) != 0;
    if (req.out_btime_known) req.out_btime = {sx.stx_btime.tv_sec, sx.stx_btime.tv_nsec};
  }
  return 0;
}

int PassthroughLayer::SetAttr(VfsRequest& req) {
  const FdRef fd = NodeFd(req.node);
  if (fd < 0) return ESTALE;
  const int valid = req.flags;
  const int ifd = req.has_fh ? static_cast<int>(req.fh) : -1;
  const ProcPath proc(fd);
  const struct stat& a = req.attr;
  if (valid & FUSE_SET_ATTR_MODE) {
    int err = ifd >= 0 ? Errno0([&] { return ::fchmod(ifd, a.st_mode); })
                       : Errno0([&] { return ::chmod(proc.c_str(), a.st_mode); });
    if (err) return err;
  }
  if (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
    const uid_t uid = (valid & FUSE_SET_ATTR_UID) ? a.st_uid : static_cast<uid_t>(-1);
    const gid_t gid = (valid & FUSE_SET_ATTR_GID) ? a.st_gid : static_cast<gid_t>(-1);
    if (int err = Errno0([&] { return ::fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW); }))
      return err;
  }
  if (valid & FUSE_SET_ATTR_SIZE) {
    int err = ifd >= 0 ? Errno0([&] { return ::ftruncate(ifd, a.st_size); })
                       : Errno0([&] { return ::truncate(proc.c_str(), a.st_size); });
    if (err) return err;
  }
  if (valid & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME)) {
    struct timespec tv[2];
    tv[0].tv_sec = tv[1].tv_sec = 0;
    tv[0].tv_nsec = tv[1].tv_nsec = UTIME_OMIT;
    if (valid & FUSE_SET_ATTR_ATIME_NOW) tv[0].tv_nsec = UTIME_NOW;
    else if (valid & FUSE_SET_ATTR_ATIME) tv[0] = a.st_atim;
    if (valid & FUSE_SET_ATTR_MTIME_NOW) tv[1].tv_nsec = UTIME_NOW;
    else if (valid & FUSE_SET_ATTR_MTIME) tv[1] = a.st_mtim;
    int err = ifd >= 0 ? Errno0([&] { return ::futimens(ifd, tv); })
                       : Errno0([&] { return ::utimensat(AT_FDCWD, proc.c_str(), tv, 0); });
    if (err) return err;
  }
  req.has_fh = false;
  return GetAttr(req);
}

int PassthroughLayer::Create(VfsRequest& req) {
  if (IsTmpfile(req)) return Tmpfile(req);
  if (int err = NameError(req.name)) return err;
  const FdRef pfd = NodeFd(req.node);
  if (pfd < 0) return ESTALE;
  // The kernel asks to create a name only where it holds no file for it, so a name
  // that exists was made behind a negative entry it still holds (beside the mount, or
  // by a server killed before it answered). This server opens as root: an existing
  // file would be opened past its permissions, which the kernel checked for none, and
  // given to the caller. So a caller other than root gets EEXIST (the kernel then
  // drops its entry, and the next try opens the file by the kernel's checks).
  const int excl = (req.ctx.uid != 0 || req.ctx.gid != 0) ? O_EXCL : 0;
  // Not blocking, should a FIFO have come by the name (SpecialFileError): the caller's
  // own flag is put back.
  auto fd = Sys([&] {
    return ::openat(pfd, req.name.c_str(), (req.flags | O_CREAT | excl | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK) & ~O_PATH,
                    CreationMode(req, pfd));
  });
  if (!fd) return fd.error().value == ENXIO ? EEXIST : fd.error().value;  // (a FIFO with no reader: not a file)
  UniqueFd file(*fd);
  struct stat st {};
  if (int err = Errno0([&] { return ::fstat(file.get(), &st); })) return err;
  if (SpecialFileError(st.st_mode) != 0) return EEXIST;  // a name the kernel could not have asked to create
                                                          // (a symlink: O_NOFOLLOW failed already)
  if (!(req.flags & O_NONBLOCK))
    if (int err = Errno0([&] { return ::fcntl(file.get(), F_SETFL, req.flags); })) return err;  // (status flags only)
  if (int err = GiveToCaller(req, pfd, req.name.c_str())) return err;
  if (int err = DoLookup(req, req.node, req.name, req.entry)) return err;
  req.open = {};
  req.open.fh = static_cast<uint64_t>(file.release());
  if (req.kernel_io_ok) req.open.backing_fd = static_cast<int>(req.open.fh);
  return 0;
}

// An unnamed file in the directory `req.node`, made by the file system below with
// O_TMPFILE. No name leads to it, so its node keeps a descriptor (an O_PATH one,
// reopened through /proc); a link (AT_EMPTY_PATH) gives it a name, unless O_EXCL
// said it may have none (the kernel checks that on both sides).
int PassthroughLayer::Tmpfile(VfsRequest& req) {
  const FdRef pfd = NodeFd(req.node);
  if (pfd < 0) return ESTALE;
  auto fd = Sys([&] {
    return ::openat(pfd, ".", (req.flags | O_CLOEXEC) & ~(O_PATH | O_CREAT | O_NOFOLLOW), CreationMode(req, pfd));
  });
  if (!fd) return fd.error().value;
  UniqueFd file(*fd);
  if (int err = GiveToCaller(req, pfd, nullptr, file.get())) return err;
  const ProcPath proc(file.get());
  auto node_fd = Sys([&] { return ::open(proc.c_str(), O_PATH | O_CLOEXEC); });
  if (!node_fd) return node_fd.error().value;
  UniqueFd node(*node_fd);
  req.entry = fuse_entry_param{};
  if (int err = Errno0([&] { return ::fstat(node.get(), &req.entry.attr); })) return err;
  Enter(req, std::move(node), req.node, {}, req.entry);
  req.open = {};
  req.open.fh = static_cast<uint64_t>(file.release());
  if (req.kernel_io_ok) req.open.backing_fd = static_cast<int>(req.open.fh);
  return 0;
}

// The node of the open file `req.in_fd` (one this layer opened, in a server that
// died), which no name may lead to: unlinked, it lives only while opened. Its node
// keeps a descriptor and no name, as an O_TMPFILE file's; a file that is also known
// by a name is that name's node.
int PassthroughLayer::Adopt(VfsRequest& req) {
  if (req.in_fd < 0) return EBADF;
  const ProcPath proc(req.in_fd);
  auto node_fd = Sys([&] { return ::open(proc.c_str(), O_PATH | O_CLOEXEC); });
  if (!node_fd) return node_fd.error().value;
  UniqueFd node(*node_fd);
  req.entry = fuse_entry_param{};
  if (int err = Errno0([&] { return ::fstat(node.get(), &req.entry.attr); })) return err;
  Enter(req, std::move(node), kRootNode, {}, req.entry);
  return 0;
}

int PassthroughLayer::MakeNode(VfsRequest& req) {
  if (int err = NameError(req.name)) return err;
  const FdRef pfd = NodeFd(req.node);
  if (pfd < 0) return ESTALE;
  const char* name = req.name.c_str();
  int err = 0;
  switch (req.op) {
    case VfsOp::kMkDir:
      err = Errno0([&] { return ::mkdirat(pfd, name, CreationMode(req, pfd)); });
      req.mode |= S_IFDIR;
      break;
    case VfsOp::kMkNod:
      err = Errno0([&] { return ::mknodat(pfd, name, CreationMode(req, pfd), req.rdev); });
      break;
    case VfsOp::kSymlink:
      err = Errno0([&] { return ::symlinkat(req.name2.c_str(), pfd, name); });
      req.mode = S_IFLNK | 0777;
      break;
    default:
      return ENOSYS;
  }
  if (err) return err;
  if ((err = GiveToCaller(req, pfd, name))) return err;
  return DoLookup(req, req.node, req.name, req.entry);
}

int PassthroughLayer::Rename(VfsRequest& req) {
  for (std::string_view name : {std::string_view(req.name), std::string_view(req.name2)})
    if (int err = NameError(name)) return err;
  const FdRef pfd = NodeFd(req.node);
  const FdRef npfd = NodeFd(req.node2);
  if (pfd < 0 || npfd < 0) return ESTALE;
  if (int err = Errno0([&] {
        return ::renameat2(pfd, req.name.c_str(), npfd, req.name2.c_str(), static_cast<unsigned>(req.flags));
      }))
    return err;
  // Keep the moved nodes' names current, for PathOf.
  auto rename_node = [&](int dir_fd, const std::string& name, uint64_t parent) {
    struct stat st {};
    if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return;
    std::unique_lock lock(table_mu_);
    auto it = by_inode_.find({st.st_dev, st.st_ino});
    if (it == by_inode_.end() || it->second == 1) return;
    nodes_[it->second].parent = parent;
    nodes_[it->second].name = name;
  };
  rename_node(npfd, req.name2, req.node2);
  if (req.flags & RENAME_EXCHANGE) rename_node(pfd, req.name, req.node);
  return 0;
}

int PassthroughLayer::Link(VfsRequest& req) {
  if (int err = NameError(req.name2)) return err;
  const FdRef fd = NodeFd(req.node);
  const FdRef npfd = NodeFd(req.node2);
  if (fd < 0 || npfd < 0) return ESTALE;
  // AT_EMPTY_PATH links the very inode the node holds. Before Linux 6.10 that needs
  // CAP_DAC_READ_SEARCH, which a server run by a user who is not root lacks (ENOENT):
  // its /proc link, followed, is the same inode.
  int err = Errno0([&] { return ::linkat(fd, "", npfd, req.name2.c_str(), AT_EMPTY_PATH); });
  if (err == ENOENT) {
    const ProcPath proc(fd);
    err = Errno0([&] { return ::linkat(AT_FDCWD, proc.c_str(), npfd, req.name2.c_str(), AT_SYMLINK_FOLLOW); });
  }
  if (err) return err;
  return DoLookup(req, req.node2, req.name2, req.entry);
}

int PassthroughLayer::Open(VfsRequest& req) {
  const FdRef fd = NodeFd(req.node);
  if (fd < 0) return ESTALE;
  struct stat st {};
  if (int err = Errno0([&] { return ::fstat(fd, &st); })) return err;
  if (int err = SpecialFileError(st.st_mode)) return err;  // (a node's type never changes)
  const ProcPath proc(fd);
  auto file = Sys([&] { return ::open(proc.c_str(), (req.flags | O_CLOEXEC) & ~(O_NOFOLLOW | O_CREAT | O_EXCL)); });
  if (!file) return file.error().value;
  req.open = {};
  req.open.fh = static_cast<uint64_t>(*file);
  // The kernel may keep the file's cached pages from one open to the next (it still
  // drops them when the attributes, refreshed every timeout, show a change): a file
  // read by many processes crosses the mount once.
  req.open.keep_cache = req.timeout > 0;
  if (req.kernel_io_ok) req.open.backing_fd = *file;
  return 0;
}

int PassthroughLayer::Read(VfsRequest& req) {
  if (req.size > (64u << 20)) return EINVAL;
  if (req.fd_reply_ok) {  // the shim splices straight from the file
    req.out_fd = static_cast<int>(req.fh);
    return 0;
  }
  const int fd = static_cast<int>(req.fh);
  req.out.resize(req.size);
  auto n = Sys([&] { return ::pread(fd, req.out.data(), req.size, req.offset); });
  if (!n && RefusedAsDirect(n.error().value, fd)) {
    auto aligned = AlignedCopyBuffer(req.size);
    if (!aligned) return ENOMEM;
    n = Sys([&] { return ::pread(fd, aligned.get(), req.size, req.offset); });
    if (n) std::memcpy(req.out.data(), aligned.get(), static_cast<size_t>(*n));
  }
  if (!n) return n.error().value;
  req.out.resize(static_cast<size_t>(*n));
  return 0;
}

int PassthroughLayer::Write(VfsRequest& req) {
  const int fd = static_cast<int>(req.fh);
  auto n = Sys([&] { return ::pwrite(fd, req.in.data(), req.in.size(), req.offset); });
  if (!n && RefusedAsDirect(n.error().value, fd)) {
    auto aligned = AlignedCopyBuffer(req.in.size());
    if (!aligned) return ENOMEM;
    std::memcpy(aligned.get(), req.in.data(), req.in.size());
    n = Sys([&] { return ::pwrite(fd, aligned.get(), req.in.size(), req.offset); });
  }
  if (!n) return n.error().value;
  req.out_size = static_cast<uint64_t>(*n);
  return 0;
}

Result<int> PassthroughLayer::OpenDirFd(uint64_t node) {
  const FdRef fd = NodeFd(node);
  if (fd < 0) return Fail(ESTALE);
  return Sys([&] { return ::openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC); });
}

int PassthroughLayer::OpenDirStream(uint64_t node, DirHandle& handle) {
  auto dfd = OpenDirFd(node);
  if (!dfd) return dfd.error().value;
  handle.dir = ::fdopendir(*dfd);
  if (handle.dir == nullptr) {
    const int err = errno;
    ::close(*dfd);
    return err;
  }
  return 0;
}

int PassthroughLayer::OpenDir(VfsRequest& req) {
  // Listings need no handle here (each readdir opens the directory at its offset):
  // the kernel, told so, sends no opendir and no releasedir again on this mount.
  if (req.handleless_ok) return ENOSYS;
  auto handle = std::make_unique<DirHandle>();
  if (const int err = OpenDirStream(req.node, *handle); err != 0) return err;
  std::lock_guard lock(dirs_mu_);
  uint32_t index;
  if (!free_dirs_.empty()) {
    index = free_dirs_.back();
    free_dirs_.pop_back();
    dirs_[index] = std::move(handle);
  } else {
    index = static_cast<uint32_t>(dirs_.size());
    dirs_.push_back(std::move(handle));
  }
  req.open = {};
  req.open.fh = index + 1u;
  return 0;
}

int PassthroughLayer::ReleaseDir(VfsRequest& req) {
  std::unique_ptr<DirHandle> handle;
  std::lock_guard lock(dirs_mu_);
  if (req.fh == 0 || req.fh > dirs_.size() || !dirs_[req.fh - 1]) return EBADF;
  handle = std::move(dirs_[req.fh - 1]);
  free_dirs_.push_back(static_cast<uint32_t>(req.fh - 1));
  return 0;
}

int PassthroughLayer::ReadDir(VfsRequest& req, bool plus) {
  if (req.fh == 0) {  // no handle (the kernel sends no opendir): one for this read
    DirHandle once;
    if (const int err = OpenDirStream(req.node, once); err != 0) return err;
    return ReadDirFrom(once, req, plus);
  }
  DirHandle* handle = nullptr;
  {
    std::lock_guard lock(dirs_mu_);
    if (req.fh > dirs_.size() || !dirs_[req.fh - 1]) return EBADF;
    handle = dirs_[req.fh - 1].get();  // lives until releasedir, which the kernel
                                       // sends only after this request is answered
  }
  std::lock_guard lock(handle->mu);
  return ReadDirFrom(*handle, req, plus);
}

int PassthroughLayer::ReadDirFrom(DirHandle& dir, VfsRequest& req, bool plus) {
  if (req.offset != dir.offset) {
    ::seekdir(dir.dir, req.offset);
    dir.pending = nullptr;
    dir.offset = req.offset;
  }
  const size_t room = std::min<uint64_t>(req.size, 1u << 20);
  req.out.resize(room);
  size_t used = 0;
  for (;;) {
    struct dirent* d = dir.pending;
    if (d == nullptr) {
      errno = 0;
      d = ::readdir(dir.dir);
      if (d == nullptr) {
        if (errno != 0 && used == 0) return errno;
        req.dir_end = errno == 0;
        break;
      }
    }
    dir.pending = d;
    const std::string_view name(d->d_name);
    const bool dots = name == "." || name == "..";
    const off_t next = d->d_off;
    if (!dots && req.admit && !req.admit(name)) {
      dir.pending = nullptr;
      dir.offset = next;
      continue;
    }
    size_t size;
    if (plus) {
      fuse_entry_param e{};
      if (dots) {
        e.attr.st_ino = d->d_ino;
        e.attr.st_mode = static_cast<mode_t>(d->d_type) << 12;
      } else if (LookupListed(req, ::dirfd(dir.dir), req.node, d->d_name, e) != 0) {
        dir.pending = nullptr;  // vanished since it was listed
        dir.offset = next;
        continue;
      }
      size = fuse_add_direntry_plus(nullptr, req.out.data() + used, room - used, d->d_name, &e, next);
      if (size > room - used && !dots) Forget(e.ino, 1);
    } else {
      struct stat st {};
      st.st_ino = d->d_ino;
      st.st_mode = static_cast<mode_t>(d->d_type) << 12;
      size = fuse_add_direntry(nullptr, req.out.data() + used, room - used, d->d_name, &st, next);
    }
    if (size > room - used) break;  // stays pending for the next call
    used += size;
    dir.pending = nullptr;
    dir.offset = next;
  }
  req.out.resize(used);
  return 0;
}

int PassthroughLayer::Xattr(VfsRequest& req) {
  const FdRef fd = NodeFd(req.node);
  if (fd < 0) return ESTALE;
  const ProcPath proc(fd);
  const size_t room = std::min<uint64_t>(req.size, 1u << 16);
  switch (req.op) {
    case VfsOp::kSetXattr: {
      const int flags = req.flags & ~msgport::kXattrAclKillSgid;
      if (int err = Errno0([&] { return ::setxattr(proc.c_str(), req.name.c_str(), req.in.data(), req.in.size(), flags); }))
        return err;
      if (!(req.flags & msgport::kXattrAclKillSgid) || req.name != "system.posix_acl_access") return 0;
      // As ext4 does for such a caller. The mode's group bits stay, and with them the
      // ACL's mask.
      struct stat st {};
      if (::fstat(fd, &st) != 0 || !(st.st_mode & S_ISGID)) return 0;
      return Errno0([&] { return ::chmod(proc.c_str(), st.st_mode & 07777 & ~mode_t{S_ISGID}); });
    }
    case VfsOp::kRemoveXattr:
      return Errno0([&] { return ::removexattr(proc.c_str(), req.name.c_str()); });
    case VfsOp::kGetXattr:
    case VfsOp::kListXattr: {
      req.out.resize(room);
      auto n = req.op == VfsOp::kGetXattr
                   ? Sys([&] { return ::getxattr(proc.c_str(), req.name.c_str(), req.out.data(), room); })
                   : Sys([&] { return ::listxattr(proc.c_str(), req.out.data(), room); });
      if (!n) return n.error().value;
      req.out_size = static_cast<uint64_t>(*n);
      req.out.resize(room == 0 ? 0 : static_cast<size_t>(*n));
      return 0;
    }
    default:
      return ENOSYS;
  }
}

int PassthroughLayer::InodeFlags(VfsRequest& req) {
  const msgport::InodeFlagsIoctl io = msgport::InodeFlagsIoctlOf(req.count);
  if (io.size == 0 || (io.sets ? req.in.size() : req.size) != io.size) return ENOTTY;
  const FdRef fd = NodeFd(req.node);
  if (fd < 0) return ESTALE;
  // A file's or a directory's, on a descriptor of its own (a node's is O_PATH, on
  // which ioctl fails). Never a device's: its ioctls are its driver's.
  struct stat st {};
  if (int err = Errno0([&] { return ::fstat(fd, &st); })) return err;
  if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) return ENOTTY;
  auto file = Sys([&] { return ::open(ProcPath(fd).c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC); });
  if (!file) return file.error().value;
  const UniqueFd owned(*file);
  alignas(fsxattr) char arg[sizeof(fsxattr)] = {};
  if (io.sets) std::memcpy(arg, req.in.data(), io.size);
  if (int err = Errno0([&] { return ::ioctl(owned.get(), req.count, arg); })) return err;
  if (!io.sets) req.out.assign(arg, arg + io.size);
  return 0;
}

namespace {

// Whether `op` may take disk space (data, a directory's or an inode's block, an
// extended attribute's), and so must take only what the caller could (AsWriter):
// kData on a file already open, kFiles where files are made or named.
constexpr std::optional<AsWriter::Kind> TakesSpace(VfsOp op) {
  switch (op) {
    case VfsOp::kWrite:
    case VfsOp::kFallocate:
    case VfsOp::kCopyFileRange:
      return AsWriter::Kind::kData;
    case VfsOp::kMkNod:
    case VfsOp::kMkDir:
    case VfsOp::kSymlink:
    case VfsOp::kRename:
    case VfsOp::kLink:
    case VfsOp::kCreate:
    case VfsOp::kSetXattr:
      return AsWriter::Kind::kFiles;
    default:
      return std::nullopt;
  }
}

}  // namespace

int PassthroughLayer::Serve(VfsRequest& req) noexcept try {
  // (A page the kernel writes back with no caller comes as its handle's opener's:
  // FuseShim::CreditWriter.)
  std::optional<AsWriter> as_caller;
  if (const auto kind = TakesSpace(req.op)) as_caller.emplace(req.ctx.uid, *kind);
  switch (req.op) {
    case VfsOp::kLookup:
      return DoLookup(req, req.node, req.name, req.entry);
    case VfsOp::kForget:
      Forget(req.node, req.count);
      return 0;
    case VfsOp::kGetAttr:
      return GetAttr(req);
    case VfsOp::kSetAttr:
      return SetAttr(req);
    case VfsOp::kReadLink: {
      const FdRef fd = NodeFd(req.node);
      if (fd < 0) return ESTALE;
      req.out.resize(PATH_MAX);
      auto n = Sys([&] { return ::readlinkat(fd, "", req.out.data(), req.out.size()); });
      if (!n) return n.error().value;
      req.out.resize(static_cast<size_t>(*n));
      return 0;
    }
    case VfsOp::kMkNod:
    case VfsOp::kMkDir:
    case VfsOp::kSymlink:
      return MakeNode(req);
    case VfsOp::kUnlink:
    case VfsOp::kRmDir: {
      if (int err = NameError(req.name)) return err;
      const FdRef pfd = NodeFd(req.node);
      if (pfd < 0) return ESTALE;
      const int flag = req.op == VfsOp::kRmDir ? AT_REMOVEDIR : 0;
      return Errno0([&] { return ::unlinkat(pfd, req.name.c_str(), flag); });
    }
    case VfsOp::kRename:
      return Rename(req);
    case VfsOp::kLink:
      return Link(req);
    case VfsOp::kOpen:
      return Open(req);
    case VfsOp::kRead:
      return Read(req);
    case VfsOp::kWrite:
      return Write(req);
    case VfsOp::kFlush:
      // Nothing to do: writes went to the file as they came, locks are the kernel's,
      // and a local file system reports no write errors at close. ENOSYS tells the
      // kernel so, and it sends no flush again on this mount (one round trip less
      // for every close).
      return ENOSYS;
    case VfsOp::kRelease:
      ::close(static_cast<int>(req.fh));
      return 0;
    case VfsOp::kFsync:
      return req.flags ? Errno0([&] { return ::fdatasync(static_cast<int>(req.fh)); })
                       : Errno0([&] { return ::fsync(static_cast<int>(req.fh)); });
    case VfsOp::kOpenDir:
      return OpenDir(req);
    case VfsOp::kReadDir:
      return ReadDir(req, false);
    case VfsOp::kReadDirPlus:
      return ReadDir(req, true);
    case VfsOp::kReleaseDir:
      return ReleaseDir(req);
    case VfsOp::kFsyncDir: {
      if (req.fh == 0) {  // no handle (the kernel sends no opendir)
        auto dfd = OpenDirFd(req.node);
        if (!dfd) return dfd.error().value;
        const UniqueFd dir(*dfd);
        return Errno0([&] { return ::fsync(dir.get()); });
      }
      DIR* dir = nullptr;
      {
        std::lock_guard lock(dirs_mu_);
        if (req.fh > dirs_.size() || !dirs_[req.fh - 1]) return EBADF;
        dir = dirs_[req.fh - 1]->dir;
      }
      return Errno0([&] { return ::fsync(::dirfd(dir)); });
    }
    case VfsOp::kStatFs: {
      const FdRef fd = NodeFd(req.node);
      if (fd < 0) return ESTALE;
      return Errno0([&] { return ::fstatvfs(fd, &req.statfs); });
    }
    case VfsOp::kSetXattr:
    case VfsOp::kGetXattr:
    case VfsOp::kListXattr:
    case VfsOp::kRemoveXattr:
      return Xattr(req);
    case VfsOp::kAccess: {
      const FdRef fd = NodeFd(req.node);
      if (fd < 0) return ESTALE;
      return Errno0([&] { return ::faccessat(AT_FDCWD, ProcPath(fd).c_str(), req.flags, AT_EACCESS); });
    }
    case VfsOp::kCreate:
      return Create(req);
    case VfsOp::kFallocate:
      return Errno0([&] { return ::fallocate(static_cast<int>(req.fh), req.flags, req.offset, req.offset2); });
    case VfsOp::kCopyFileRange: {
      loff_t in_off = req.offset;
      loff_t out_off = req.offset2;
      auto n = Sys([&] {
        return ::copy_file_range(static_cast<int>(req.fh), &in_off, static_cast<int>(req.fh2), &out_off, req.size,
                                 static_cast<unsigned>(req.flags));
      });
      if (!n) return n.error().value;
      req.out_size = static_cast<uint64_t>(*n);
      return 0;
    }
    case VfsOp::kLseek: {
      auto off = Sys([&] { return ::lseek(static_cast<int>(req.fh), req.offset, req.flags); });
      if (!off) return off.error().value;
      req.out_size = static_cast<uint64_t>(*off);
      return 0;
    }
    case VfsOp::kIoctl:
      return InodeFlags(req);
    case VfsOp::kAdopt:
      return Adopt(req);
    case VfsOp::kLend: {  // the handle is the file's descriptor (still this layer's)
      struct stat st {};
      if (req.fh > INT_MAX || ::fstat(static_cast<int>(req.fh), &st) != 0 || !S_ISREG(st.st_mode)) return EBADF;
      req.open.backing_fd = static_cast<int>(req.fh);
      return 0;
    }
    case VfsOp::kCount:
      break;
  }
  return ENOSYS;
} catch (const std::bad_alloc&) {
  return ENOMEM;
} catch (const std::exception& e) {
  Logger("vfs")->error("passthrough: {} failed: {}", msgport::VfsOpName(req.op), e.what());
  return EIO;
}

}  // namespace ulsp::vfs
