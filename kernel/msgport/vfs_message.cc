#include "kernel/msgport/vfs_message.h"

#include <linux/fs.h>

#include <array>

namespace ulsp::msgport {
namespace {

constexpr std::array<std::string_view, static_cast<size_t>(VfsOp::kCount)> kNames = {
    "?",         "lookup",    "forget",      "getattr",  "setattr",     "readlink",   "mknod",
    "mkdir",     "unlink",    "rmdir",       "symlink",  "rename",      "link",       "open",
    "read",      "write",     "flush",       "release",  "fsync",       "opendir",    "readdir",
    "readdirplus", "releasedir", "fsyncdir", "statfs",   "setxattr",    "getxattr",   "listxattr",
    "removexattr", "access",  "create",      "fallocate", "copy_file_range", "lseek",
    "adopt",     "lend",      "ioctl"};

}  // namespace

std::string_view VfsOpName(VfsOp op) noexcept {
  const auto i = static_cast<size_t>(op);
  return i < kNames.size() ? kNames[i] : "?";
}

bool UsesHandle(const VfsRequest& r) noexcept {
  switch (r.op) {
    case VfsOp::kRead:
    case VfsOp::kWrite:
    case VfsOp::kFlush:
    case VfsOp::kRelease:
    case VfsOp::kFsync:
    case VfsOp::kReleaseDir:
    case VfsOp::kFallocate:
    case VfsOp::kCopyFileRange:
    case VfsOp::kLseek:
      return true;
    case VfsOp::kGetAttr:
    case VfsOp::kSetAttr:
      return r.has_fh;
    case VfsOp::kReadDir:
    case VfsOp::kReadDirPlus:
    case VfsOp::kFsyncDir:
      return r.fh != 0;  // 0: listed without a handle (VfsRequest::handleless_ok)
    default:
      return false;
  }
}

bool UsesDirHandle(VfsOp op) noexcept {
  return op == VfsOp::kReadDir || op == VfsOp::kReadDirPlus || op == VfsOp::kReleaseDir || op == VfsOp::kFsyncDir;
}

bool VfsOpIsIdempotent(VfsOp op) noexcept {
  switch (op) {
    case VfsOp::kLookup:  // counts a lookup, but the kernel counts it only if answered
    case VfsOp::kGetAttr:
    case VfsOp::kReadLink:
    case VfsOp::kRead:
    case VfsOp::kReadDir:
    case VfsOp::kReadDirPlus:
    case VfsOp::kStatFs:
    case VfsOp::kGetXattr:
    case VfsOp::kListXattr:
    case VfsOp::kAccess:
    case VfsOp::kLseek:
    case VfsOp::kIoctl:  // the inode flags' ioctls only: they read, or set to a value
      return true;
    default:
      return false;
  }
}

InodeFlagsIoctl InodeFlagsIoctlOf(uint64_t cmd) noexcept {
  switch (cmd) {
    case FS_IOC_GETFLAGS:
      return {sizeof(int), false};
    case FS_IOC_SETFLAGS:
      return {sizeof(int), true};
    case FS_IOC_FSGETXATTR:
      return {sizeof(fsxattr), false};
    case FS_IOC_FSSETXATTR:
      return {sizeof(fsxattr), true};
    default:
      return {};
  }
}

int ChangedNames(const VfsRequest& q, ChangedName (&out)[2]) noexcept {
  switch (q.op) {
    case VfsOp::kMkNod:
    case VfsOp::kMkDir:
    case VfsOp::kSymlink:
    case VfsOp::kCreate:
    case VfsOp::kUnlink:
    case VfsOp::kRmDir:
      if (q.name.empty()) return 0;  // an O_TMPFILE create makes no name
      out[0] = {q.node, q.name};
      return 1;
    case VfsOp::kLink:  // `node` is the file linked to
      out[0] = {q.node2, q.name2};
      return 1;
    case VfsOp::kRename:
      out[0] = {q.node, q.name};
      out[1] = {q.node2, q.name2};
      return 2;
    default:
      return 0;
  }
}

}  // namespace ulsp::msgport
