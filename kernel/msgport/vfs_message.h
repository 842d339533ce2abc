// The VFS message family: one kernel file-system request (a FUSE low-level operation)
// as a message, with its arguments and, after the reply, its results.
//
// The FUSE shim (fuse_shim.h) makes one VfsMessage per kernel request and sends it to
// the mount's port; the server (a layer stack, ulsp/vfs) fills the results and
// replies; the shim's reply port turns the reply into the matching fuse_reply_*.
// Inside a process the message travels as it is (no encoding). Node ids are the
// serving stack's: 1 is the root, the others are whatever its lookups returned.
#pragma once

#include <fcntl.h>
#include <fuse3/fuse_lowlevel.h>
#include <linux/fuse.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernel/msgport/message.h"

namespace ulsp::msgport {

// The operations, after DESIGN.md's list. The value is Message::command.
enum class VfsOp : uint32_t {
  kLookup = 1,
  kForget,
  kGetAttr,
  kSetAttr,
  kReadLink,
  kMkNod,
  kMkDir,
  kUnlink,
  kRmDir,
  kSymlink,
  kRename,
  kLink,
  kOpen,
  kRead,
  kWrite,
  kFlush,
  kRelease,
  kFsync,
  kOpenDir,
  kReadDir,
  kReadDirPlus,
  kReleaseDir,
  kFsyncDir,
  kStatFs,
  kSetXattr,
  kGetXattr,
  kListXattr,
  kRemoveXattr,
  kAccess,
  kCreate,
  kFallocate,
  kCopyFileRange,
  kLseek,
  // Not the kernel's: a relaying port (ulsp/core/isolated.h) asks a restarted server
  // for the node of a file it can no longer find by name (unlinked while a program
  // holds it open), giving the file itself in `in_fd`, and in `fh` the tag the lend
  // of it answered (0 for a descriptor given otherwise). Answered as a lookup.
  kAdopt,
  // Not the kernel's either: the same port asks for a descriptor of the open file
  // `fh` of `node`, answered in `open.backing_fd` (sent with the reply), to keep while
  // the file is open and no name may lead to it (about to be unlinked or replaced by
  // a rename): what it gives a restarted server with kAdopt. `open.fh` answers a tag
  // for that adopt: which layer's file it is (an overlay's lower or upper), 0 from a
  // bottom layer.
  kLend,
  // chattr and lsattr: read or set a file's or directory's inode flags. `count` is the
  // command, one of those InodeFlagsIoctl admits; `in` the argument it sets; `size`
  // the room for the argument it reads, answered in `out`. The kernel sends no other
  // ioctl of a FUSE file system's files that a stack serves.
  kIoctl,
  kCount,  // not an operation: one past the last
};

// "lookup", "getattr", ... (for logs and traces).
std::string_view VfsOpName(VfsOp op) noexcept;

// Which operations never change anything, so they may be sent again to a restarted
// server. Forget is not among them (it changes lookup counts).
bool VfsOpIsIdempotent(VfsOp op) noexcept;

// Who asks: the calling thread's credentials as the kernel reports them.
struct VfsContext {
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;
  // create, mkdir, mknod: the permission bits the caller's umask took from `mode`. A
  // directory with a default ACL ignores the umask, so a layer that creates where such
  // a directory can be (passthrough) gives them back there.
  mode_t umask_took = 0;
};

// What an open (or opendir, or create) answers besides the node.
struct VfsOpenReply {
  uint64_t fh = 0;
  bool direct_io = false;
  bool keep_cache = false;
  bool nonseekable = false;
  bool cache_readdir = false;
  // open, create, when the request's kernel_io_ok: a descriptor of the very file this
  // handle reads and writes (the layer keeps owning it). The kernel then reads, writes
  // and maps the file's data on it by itself (FUSE passthrough): read and write
  // requests for the handle never reach the stack. -1: they do.
  int backing_fd = -1;
  // lend: the server holds the file itself, named by `fh` (a translation agent: no
  // descriptor crosses a network); an adopt gives back that name, with no descriptor.
  bool held = false;
};

// One request and its results. Fields are used as each operation's comment in
// fuse_lowlevel.h describes; those an operation does not use stay at their defaults.
struct VfsRequest {
  VfsOp op = VfsOp::kLookup;
  VfsContext ctx;

  // --- arguments ---
  uint64_t node = 0;      // the node asked about; the parent for name operations
  std::string name;       // a name in `node`; an xattr's name. A create with O_TMPFILE
                          // in `flags` has none: it makes an unnamed file in `node`
  uint64_t node2 = 0;     // rename: new parent; link: new parent; copy_file_range: out node
  std::string name2;      // rename, link: new name; symlink: the link's target
  uint64_t fh = 0;        // open file or directory handle (from open/opendir/create)
  uint64_t fh2 = 0;       // copy_file_range: out handle
  bool has_fh = false;    // getattr, setattr: whether `fh` is set
  int64_t offset = 0;     // read, write, readdir, fallocate, lseek, copy_file_range (in)
  int64_t offset2 = 0;    // copy_file_range: out offset; fallocate: length
  uint64_t size = 0;      // read, readdir, getxattr, listxattr: room; copy_file_range: length
  uint64_t count = 0;     // forget: lookups to drop
  int flags = 0;          // open/create flags, rename flags, setattr's FUSE_SET_ATTR_*
                          // mask, xattr flags, fsync datasync, lseek whence, access mask,
                          // fallocate mode; getattr: the statx mask a statx(2) asked
                          // for (STATX_BTIME: give out_btime too; 0: a plain getattr)
  mode_t mode = 0;        // create, mkdir, mknod
  dev_t rdev = 0;         // mknod
  struct stat attr {};    // setattr: the new values (those in `flags`)
  std::span<const char> in;  // write data, setxattr value: borrowed from the sender,
                             // valid until the reply
  int in_fd = -1;            // adopt: a descriptor of the file (the sender's, valid
                             // until the reply)
  double timeout = 1.0;      // seconds the kernel may cache entries and attributes
  bool fd_reply_ok = false;  // read: the sender shares the server's descriptors (same
                             // process), so the server may answer with `out_fd`
  bool kernel_io_ok = false;  // open, create: the kernel may do this file's reads and
                              // writes itself, on `open.backing_fd`. A layer that sees
                              // or changes file data must clear it before passing the
                              // request down (Layer::Down does, unless told otherwise)
  bool handleless_ok = false;  // opendir: the kernel can list this mount's directories
                               // without handles. A bottom layer that reads listings
                               // without one answers ENOSYS, and from then on the kernel
                               // sends no opendir or releasedir, and readdir with fh 0.
                               // A layer that keeps state per directory handle must
                               // clear it before passing the request down

  // readdir(plus): upper layers may hide names. Called by the layer that lists the
  // directory for each name other than "." and ".."; false hides it.
  std::function<bool(std::string_view name)> admit;

  // --- results (valid when the reply's error is 0) ---
  fuse_entry_param entry{};  // lookup, mknod, mkdir, symlink, link, create
  struct stat out_attr {};   // getattr, setattr
  struct timespec out_btime {};  // getattr asked for STATX_BTIME: the file's birth
  bool out_btime_known = false;  // time, where the stack knows it (then true)
  VfsOpenReply open;         // open, opendir, create
  std::vector<char> out;     // read data; readlink target; xattr value or list;
                             // readdir(plus): the kernel's dirent records
  int out_fd = -1;           // read, when fd_reply_ok: the data is `size` bytes of this
                             // descriptor at `offset` (spliced to the kernel), not `out`
  uint64_t out_size = 0;     // write, copy_file_range: bytes; getxattr/listxattr with
                             // size 0: the size needed; lseek: the new offset
  struct statvfs statfs {};  // statfs
  bool dir_end = false;      // readdir(plus): nothing follows the records in `out` (a
                             // listing at the last one's offset would find nothing).
                             // False when a layer does not know
  // A request that changed a file of no name which a layer had copied to a new file
  // (an overlay's copy-up of a lower file removed while open): the copy's descriptor
  // (the layer keeps owning it) and the tag a lend of it answers (VfsOp::kLend). An
  // isolated mount keeps it in place of the one it kept for the file, so that a
  // restarted server is given the copy, with the change. -1: none.
  int copy_fd = -1;
  uint64_t copy_tag = 0;
  std::vector<uint64_t> changed;  // nodes besides those named above whose attributes this
                                  // request changed as a side effect (an overlay's copy-up
                                  // gives a file's directories their upper copies: new
                                  // inode numbers and ctimes). The shim drops their
                                  // attributes from the kernel's cache before it answers
};

// setxattr: a bit in `flags` besides XATTR_CREATE and XATTR_REPLACE. Setting the ACL
// `system.posix_acl_access` must also clear the file's set-group-ID bit: the caller is
// neither in the file's group nor has CAP_FSETID, as the kernel found
// (FUSE_SETXATTR_ACL_KILL_SGID). A server running as root would keep it.
inline constexpr int kXattrAclKillSgid = 1 << 30;

// The inode-flag ioctls: FS_IOC_GETFLAGS and FS_IOC_SETFLAGS (the flags as an int,
// though their numbers say long), FS_IOC_FSGETXATTR and FS_IOC_FSSETXATTR (struct
// fsxattr). The size of `cmd`'s argument and whether it sets; size 0 for any other
// command.
struct InodeFlagsIoctl {
  size_t size = 0;
  bool sets = false;
};
InodeFlagsIoctl InodeFlagsIoctlOf(uint64_t cmd) noexcept;

// Whether `r` names an open file's or directory's handle in `fh` (and, for
// copy_file_range, in `fh2`): not a listing without one (VfsRequest::handleless_ok).
bool UsesHandle(const VfsRequest& r) noexcept;
// Whether the handle an operation names is a directory's (from opendir).
bool UsesDirHandle(VfsOp op) noexcept;

// Whether `r` makes an unnamed file, as open(2) with O_TMPFILE does: a create with
// O_TMPFILE in its flags and no name. The file can be linked to a name later (unless
// O_EXCL was given); unlinked, it goes when its last handle and lookup go.
inline bool IsTmpfile(VfsOp op, int flags) noexcept { return op == VfsOp::kCreate && (flags & O_TMPFILE) == O_TMPFILE; }
inline bool IsTmpfile(const VfsRequest& r) noexcept { return IsTmpfile(r.op, r.flags); }

// Calls f(record, position) for each record of a readdir reply (`out`) in the kernel's
// layout, `Record` being fuse_dirent (readdir) or fuse_direntplus (readdirplus); stops
// at a record that runs past the end. (Each record's name follows its fixed part.)
template <typename Record, typename F>
void ForEachRecord(std::span<const char> out, F&& f) {
  static_assert(std::is_same_v<Record, fuse_dirent> || std::is_same_v<Record, fuse_direntplus>);
  static_assert(sizeof(fuse_dirent) == FUSE_NAME_OFFSET && sizeof(fuse_direntplus) == FUSE_NAME_OFFSET_DIRENTPLUS);
  size_t pos = 0;
  while (pos + sizeof(Record) <= out.size()) {
    Record d;
    std::memcpy(&d, out.data() + pos, sizeof d);
    size_t size;
    if constexpr (std::is_same_v<Record, fuse_direntplus>) {
      size = FUSE_DIRENTPLUS_SIZE(&d);
    } else {
      size = FUSE_DIRENT_SIZE(&d);
    }
    if (pos + size > out.size()) break;
    f(static_cast<const Record&>(d), pos);
    pos += size;
  }
}
template <typename F>
void ForEachDirentPlus(std::span<const char> out, F&& f) {
  ForEachRecord<fuse_direntplus>(out, std::forward<F>(f));
}
template <typename F>
void ForEachDirent(std::span<const char> out, F&& f) {
  ForEachRecord<fuse_dirent>(out, std::forward<F>(f));
}

// The names a request makes, removes or moves, as (directory node, name): none, one,
// or two (a rename's old and new). Returns how many it wrote to `out`.
struct ChangedName {
  uint64_t dir;
  std::string_view name;
};
int ChangedNames(const VfsRequest& q, ChangedName (&out)[2]) noexcept;

// A VFS request as a message. The shim keeps its kernel request handle in `fuse_req`.
class VfsMessage final : public Message {
 public:
  explicit VfsMessage(VfsOp op) noexcept : Message(static_cast<uint32_t>(op)) { req.op = op; }
  VfsRequest req;
  fuse_req_t fuse_req = nullptr;
  std::vector<char> in_copy;  // the sender's copy of `req.in`, when it cannot lend it
  // A listxattr whose caller may not see trusted.* names (FuseShim::MayAdmin): the room
  // the caller gave (0: only the size). The stack is asked for the whole list.
  int64_t list_room = -1;
  // A relaying port's bookkeeping (ulsp/core/isolated.h): the kernel's ids while the
  // request carries the server's, where the reply goes next, and how often it was sent.
  struct Relay {
    uint64_t node = 0, node2 = 0, fh = 0, fh2 = 0;
    Port* reply_port = nullptr;
    uint32_t sends = 0;
    uint64_t epoch = 0;  // which server it was last sent to
    // When it stops waiting for a server (IsolatedPort: its source's wait limit from
    // its first wait). Not the message's deadline: once sent, it waits for the answer.
    Deadline wait_until = kNoDeadline;
  } relay;
};

}  // namespace ulsp::msgport
