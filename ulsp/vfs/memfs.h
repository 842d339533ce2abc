// MemfsLayer: an in-memory tree, a bottom layer. Files, directories, symlinks, FIFOs,
// device nodes, hard links, xattrs, sparse files (4 KiB pages allocated on write, so a
// file past 4 GiB with a few bytes at its end costs a page), and nanosecond times.
// Its argument is the size it reports to statfs ("64M", "2G"); writes past that size
// fail with ENOSPC.
//
// Node ids are table indices with a generation, as in passthrough. A node lives while
// a name links it, the kernel holds a lookup on it, or a handle has it open.
// Permissions are the kernel's (default_permissions); new nodes belong to the caller
// (the parent's group when the parent is set-group-ID, which directories inherit).
//
// Thread-safe: one reader/writer lock over the whole tree (reads, lookups and getattr
// share it).
#pragma once

#include <sys/stat.h>

#include <deque>
#include <map>
#include <memory>
#include <shared_mutex>
#include <string>
#include <vector>

#include "kernel/msgport/errno.h"
#include "ulsp/vfs/layer.h"

namespace ulsp::vfs {

class MemfsLayer final : public Layer {
 public:
  // `capacity`: "64M", "2G", "4096" (bytes). Fails with a message naming it.
  static std::expected<std::unique_ptr<MemfsLayer>, std::string> Create(const std::string& capacity);

  int Serve(VfsRequest& req) noexcept override;
  std::string PathOf(uint64_t node) const override;
  size_t NodeCount() const override;
  std::string_view Name() const noexcept override { return "memfs"; }

 private:
  static constexpr uint64_t kPage = 4096;
  struct Node {
    struct stat st {};
    struct timespec btime {};  // when it was made
    uint32_t generation = 0;
    bool in_use = false;
    uint64_t nlookup = 0;
    uint64_t open = 0;                            // handles open on it
    std::map<uint64_t, std::vector<char>> pages;  // file data: page index -> page
    std::string target;                           // symlink
    std::map<std::string, uint64_t> children;     // directory: name -> cookie
    std::map<uint64_t, std::pair<std::string, uint64_t>> by_cookie;  // cookie -> (name, node)
    uint64_t next_cookie = 3;                     // 1 and 2 are "." and ".."
    std::map<std::string, std::string> xattrs;
    uint64_t parent = 0;  // for PathOf: where it was last linked
    std::string name;
  };

  explicit MemfsLayer(uint64_t capacity);
  Node* Get(uint64_t id);  // nullptr when stale; with mu_ held
  const Node* Get(uint64_t id) const;
  uint64_t NewNode(const VfsRequest& req, const Node& parent, mode_t mode);
  void MaybeDrop(uint64_t id);  // frees a node nothing refers to any more
  void Fill(fuse_entry_param& e, uint64_t id, const VfsRequest& req);
  void Link(Node& dir, uint64_t dir_id, const std::string& name, uint64_t id);
  void Unlink(Node& dir, const std::string& name);
  static void Touch(struct stat& st, bool modified);

  int Lookup(VfsRequest& req);
  int SetAttr(VfsRequest& req);
  int Make(VfsRequest& req);
  int Remove(VfsRequest& req);
  int Rename(VfsRequest& req);
  int Read(VfsRequest& req);
  int Write(VfsRequest& req);
  int Allocate(VfsRequest& req);
  int Truncate(Node& n, uint64_t size);
  int ReadDir(VfsRequest& req, bool plus);
  int Xattr(VfsRequest& req);
  int Seek(VfsRequest& req);

  mutable std::shared_mutex mu_;
  std::deque<Node> nodes_;  // index 0 unused; 1 is the root
  std::vector<uint32_t> free_;
  size_t live_ = 0;
  uint64_t capacity_;
  uint64_t used_pages_ = 0;
};

}  // namespace ulsp::vfs
