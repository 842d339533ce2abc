// PassthroughLayer: serves a real directory. Every node the kernel knows is held as
// an O_PATH descriptor, and every operation is an *at call relative to one, so the
// server never walks a path a symlink could redirect and never leaves its root
// (names are single components; ".." at the root is the root). A node a listing
// (readdirplus) made is held by its directory and name until a request needs it,
// then opened from there (the same inode, or ESTALE) and kept as a descriptor.
//
// Node ids are table indices with a generation (STYLE 8): the kernel's lookup count
// is kept per node, and forget drops the node (and closes its descriptor) at zero.
// The kernel may hold more nodes than the process may have descriptors (here the hard
// limit is 20000): past a budget (three quarters of the limit, for all the process's
// passthrough layers together: an overlay has two), nodes keep the inode's file handle
// instead and are opened (open_by_handle_at) for each request that needs them. A file
// of no name keeps its descriptor until a link names it.
// Hard links of one inode share a node. Open files are their descriptors (fh is the
// fd number); open directories are entries of a handle table. An open file given by
// its descriptor (VfsOp::kAdopt: a restarted isolated server is given a file no name
// leads to) is a node with a descriptor and no name, as an O_TMPFILE file is.
//
// Permissions: the mount uses the kernel's checks (default_permissions), so the
// server acts as root; it gives new nodes to the caller (uid, and gid unless the
// parent directory is set-group-ID), as ext4 would have.
//
// Thread-safe: Serve runs on any number of threads. Lock order: table_mu_, then a
// directory handle's mu.
#pragma once

#include <dirent.h>
#include <sys/types.h>

#include <atomic>
#include <deque>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/unique_fd.h"
#include "ulsp/vfs/layer.h"

namespace ulsp::vfs {

class PassthroughLayer final : public Layer {
 public:
  // Opens `root` (a directory). Sets the process's umask to 0 (the kernel applies the
  // caller's) and raises its descriptor limit as far as it may (a node is a
  // descriptor; root goes to fs.nr_open). Fails with the errno of the open, or ENOTDIR.
  static Result<std::unique_ptr<PassthroughLayer>> Open(const std::string& root);
  ~PassthroughLayer() override;

  int Serve(VfsRequest& req) noexcept override;
  std::string PathOf(uint64_t node) const override;
  size_t NodeCount() const override;
  std::string_view Name() const noexcept override { return "passthrough"; }

 private:
  struct Node {
    UniqueFd fd;         // O_PATH; or, past the descriptor budget, none and:
    std::string handle;  // the inode's struct file_handle (name_to_handle_at);
                         // neither: a listed node, opened by (parent, name) when used
    dev_t dev = 0;
    ino_t ino = 0;
    uint64_t nlookup = 0;
    uint32_t generation = 0;
    uint64_t parent = 0;  // node id of the directory it was last looked up in
    std::string name;     // the name it was last looked up by
  };
  struct DirHandle {
    std::mutex mu;
    DIR* dir = nullptr;
    off_t offset = 0;
    struct dirent* pending = nullptr;  // read but not yet sent (did not fit)
    ~DirHandle();
  };
  struct InodeKey {
    dev_t dev;
    ino_t ino;
    bool operator==(const InodeKey&) const = default;
  };
  struct InodeKeyHash {
    size_t operator()(const InodeKey& k) const noexcept { return std::hash<uint64_t>()(k.ino * 31 + k.dev); }
  };

  explicit PassthroughLayer(UniqueFd root_fd, struct stat root_st);

  // A node's O_PATH descriptor for the length of a request: the node's own (a listed
  // node's is opened from its directory first, see OpenListed), or one opened from its
  // file handle. Converts to the descriptor; -1 when the id is not one the kernel holds.
  class FdRef {
   public:
    FdRef() = default;
    explicit FdRef(int borrowed) : fd_(borrowed) {}
    explicit FdRef(UniqueFd owned) : fd_(owned.get()), owned_(std::move(owned)) {}
    operator int() const noexcept { return fd_; }  // NOLINT: used as the fd it is

   private:
    int fd_ = -1;
    UniqueFd owned_;
  };
  FdRef NodeFd(uint64_t node);
  // NodeFd of a listed node (held by its name): opens it from its parent, checks that
  // it is still the same inode, and keeps the descriptor (or file handle) from then on.
  FdRef OpenListed(uint64_t node, uint64_t parent, std::string name, InodeKey inode);
  // Looks `name` up in `parent` and counts one kernel lookup on the result.
  int DoLookup(VfsRequest& req, uint64_t parent, std::string_view name, fuse_entry_param& e);
  // The same, with `parent`'s descriptor at hand (a listing's open directory: a
  // parent kept as a file handle is then not opened again for each of its entries).
  int LookupAt(VfsRequest& req, int parent_fd, uint64_t parent, std::string_view name, fuse_entry_param& e);
  // A listing's entry, counted as a lookup as LookupAt's, but held by its name (no
  // descriptor) until a request needs it: most entries of a readdirplus are never used
  // (find opens none), and a descriptor costs an openat and a close, and past the
  // budget a file handle besides.
  int LookupListed(VfsRequest& req, int dir_fd, uint64_t parent, const char* name, fuse_entry_param& e);
  // The end of both: registers the node (`fd` or none) and fills `e` (its attributes
  // already there) with its id and the request's timeouts.
  void Enter(const VfsRequest& req, UniqueFd fd, uint64_t parent, std::string_view name, fuse_entry_param& e);
  // Registers a node (the kernel now holds one more lookup on it): opened (fd), or
  // listed (no fd). An opened descriptor given for a listed node is kept.
  uint64_t Remember(UniqueFd fd, const struct stat& st, uint64_t parent, std::string_view name);
  // Keeps `fd` as the node's descriptor, or past the budget the inode's file handle;
  // returns the descriptor when it was not kept. Under table_mu_.
  UniqueFd Keep(Node& n, UniqueFd fd);
  void Forget(uint64_t node, uint64_t count);
  // Gives a node just created to the caller (see the class comment): `name` in
  // `parent_fd`, or the open file `file_fd` (an O_TMPFILE one, which has no name).
  int GiveToCaller(const VfsRequest& req, int parent_fd, const char* name, int file_fd = -1);

  int GetAttr(VfsRequest& req);
  int SetAttr(VfsRequest& req);
  int Create(VfsRequest& req);
  int Tmpfile(VfsRequest& req);
  int Adopt(VfsRequest& req);
  int MakeNode(VfsRequest& req);
  int Rename(VfsRequest& req);
  int Link(VfsRequest& req);
  int Open(VfsRequest& req);
  int Read(VfsRequest& req);
  int Write(VfsRequest& req);
  int OpenDir(VfsRequest& req);
  Result<int> OpenDirFd(uint64_t node);  // O_RDONLY, to list or fsync
  int OpenDirStream(uint64_t node, DirHandle& handle);
  int ReadDir(VfsRequest& req, bool plus);
  int ReadDirFrom(DirHandle& dir, VfsRequest& req, bool plus);  // at req.offset
  int ReleaseDir(VfsRequest& req);
  int Xattr(VfsRequest& req);
  int InodeFlags(VfsRequest& req);  // kIoctl: chattr, lsattr

  mutable std::shared_mutex table_mu_;
  std::deque<Node> nodes_;  // index 0 unused; index 1 is the root
  std::vector<uint32_t> free_;
  std::unordered_map<InodeKey, uint32_t, InodeKeyHash> by_inode_;
  size_t live_ = 0;
  dev_t root_dev_ = 0;
  UniqueFd root_dir_fd_;  // O_RDONLY: open_by_handle_at will not take an O_PATH one
  size_t fd_budget_ = 0;  // node descriptors kept at most, by all layers together
  size_t fds_held_ = 0;   // node descriptors this layer keeps now (under table_mu_)
  static inline std::atomic<size_t> process_fds_held_{0};  // ... and all of them

  std::mutex dirs_mu_;
  std::vector<std::unique_ptr<DirHandle>> dirs_;  // fh = index + 1
  std::vector<uint32_t> free_dirs_;
};

}  // namespace ulsp::vfs
