// OverlayLayer: a read-only lower tree (the layer below it in the stack) and a
// writable upper directory (its argument), merged. The lower tree is never written:
// changing a file copies it up first (data, mode, owner, times), a removed name that
// exists below becomes a whiteout in the upper directory (a character device 0:0, as
// the kernel's overlayfs makes them), and a directory made where one was removed is
// marked opaque (xattr user.ulsp.opaque) so the lower one's entries stay hidden.
//
// Limits, as overlayfs without redirect_dir: renaming (or exchanging) a directory that
// has lower entries answers EXDEV (mv then copies and deletes).
// Copy-up writes a sparse file's holes as zeros.
//
// Copy-up copies extended attributes too (file capabilities, user.*), as overlayfs
// does. Names hard-linked below part on copy-up, as in overlayfs without its index.
//
// A lower file removed while open (its node keeps no name) is copied up, when
// changed, as a file of no name (O_TMPFILE in the upper directory), as an unlinked
// file on ext4 changes and stays unlinked.
//
// For an isolated mount's restart (ulsp/core/isolated.h): an open file lends its
// descriptor (kLend) tagged with its side, and is adopted by it (kAdopt) on that side.
// A change to a lower file of no name answers the copy's descriptor too
// (VfsRequest::copy_fd), so that the mount gives a new server the changed file.
//
// Node ids are the layer's own (index + generation); each holds one lookup on its
// upper and lower nodes, dropped when the kernel forgets it. Thread-safe: the tables
// under one mutex, copy-ups serialized by another.
#pragma once

#include <deque>
#include <expected>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernel/msgport/unique_fd.h"
#include "ulsp/vfs/layer.h"

namespace ulsp::vfs {

class OverlayLayer final : public Layer {
 public:
  // `upper_dir` must be (or is made as) a writable directory on a file system with
  // user xattrs.
  static std::expected<std::unique_ptr<OverlayLayer>, std::string> Open(const std::string& upper_dir,
                                                                        std::unique_ptr<Layer> lower);
  ~OverlayLayer() override;

  int Serve(VfsRequest& req) noexcept override;
  std::string PathOf(uint64_t node) const override;
  size_t NodeCount() const override;
  std::string_view Name() const noexcept override { return "overlay"; }

 private:
  struct ONode {
    bool in_use = false;
    uint32_t generation = 0;
    uint64_t upper = 0;  // node in the upper layer (0: none yet)
    uint64_t lower = 0;  // node in the lower layer (0: none)
    uint64_t parent = 0;
    std::string name;
    uint64_t nlookup = 0;
    bool dir = false;
    bool opaque = false;  // an upper directory that hides the lower one
    std::string lower_key;  // its by_key_ entry for the lower node ("" if none)
    // A lower file of no name copied up (CopyUp): the copy's upper handle, held for
    // its descriptor (GiveCopy) until the node goes.
    std::optional<uint64_t> copy_fh;
    uint64_t lower_ino = 0;  // a directory on both sides: the lower one's inode number (StableIno)
  };
  struct DirEntry {
    std::string name;
    uint32_t type = 0;  // d_type
    uint64_t ino = 0;   // as the layer that holds it reports (0 hides an entry from ls)
    // A directory on both sides: the lower one's number, which a listing gives unless
    // the upper copy is opaque (checked by ReadDir, only for a listing that needs it).
    uint64_t lower_ino = 0;
  };
  struct DirList {
    std::vector<DirEntry> entries;
    bool listed = false;  // by a readdir: the first one, and each from offset 0, lists
  };

  OverlayLayer(std::unique_ptr<Layer> upper, std::unique_ptr<Layer> lower);
  bool Get(uint64_t id, ONode* out) const;
  uint64_t Register(uint64_t parent, std::string_view name, uint64_t upper, uint64_t lower, bool dir, bool opaque);
  void Drop(uint64_t id, uint64_t count);

  int Lookup(const VfsRequest& req, uint64_t parent, const std::string& name, fuse_entry_param& e);
  // A directory found on both sides answers the lower one's inode number, before and
  // after its copy-up, as overlayfs does on one file system: a program walking the
  // tree (rm -r, find, chmod -R: fts) takes a directory whose number changed under it
  // for an error. `attr` is node `id`'s.
  void StableIno(uint64_t id, struct stat& attr) const;
  // Gives node `id` (and its directories) upper copies, once; each node copied and
  // the directory it was made in go to req.changed, as their attributes changed.
  int CopyUp(VfsRequest& req, uint64_t id, uint64_t* upper);
  // Copies regular file `lower` to a new file `name` in `upper_parent` (none: a file of
  // no name), *made its node; its handle is released, or left open in *keep_fh if given.
  // A copy that fails is removed and its node forgotten (*made 0).
  int CopyFile(const VfsRequest& req, uint64_t lower, uint64_t upper_parent, const std::string& name,
               const struct stat& st, uint64_t* made, std::optional<uint64_t>* keep_fh = nullptr);
  void CopyXattrs(const VfsRequest& req, uint64_t id, uint64_t lower_node, uint64_t made);
  bool WhitedOut(const VfsRequest& req, uint64_t upper_parent, const std::string& name);  // a whiteout is there
  int RemoveWhiteout(const VfsRequest& req, uint64_t upper_parent, const std::string& name);
  int Whiteout(const VfsRequest& req, uint64_t upper_parent, const std::string& name);
  int MakeWhiteout(const VfsRequest& req, uint64_t upper_parent, const std::string& name, uint64_t* made = nullptr);
  uint64_t SharedWhiteout(const VfsRequest& req);
  void RetireSharedWhiteout(const VfsRequest& req, uint64_t shared, bool for_good);
  int ReplaceByWhiteout(const VfsRequest& req, uint64_t upper_parent, const std::string& name, uint64_t dir = 0);
  int RemoveUpper(const VfsRequest& req, uint64_t upper_dir, const std::string& name, VfsOp op = VfsOp::kUnlink);
  void ClearUpperDir(const VfsRequest& req, uint64_t upper_dir, bool all = false);
  // Removes `name` in `upper_dir`, an entry of the overlay's own: a file, or a
  // directory with all it holds.
  void RemoveOwn(const VfsRequest& req, uint64_t upper_dir, const std::string& name);
  int MakeOpaqueDir(const VfsRequest& req, uint64_t upper_parent, VfsRequest& s);
  int MakeOverWhiteout(const VfsRequest& req, uint64_t upper_parent, VfsRequest& s);
  bool InLower(const VfsRequest& req, const ONode& parent, const std::string& name);
  int List(const VfsRequest& req, const ONode& dir, DirList& out);
  bool IsOpaque(const VfsRequest& req, uint64_t upper_dir);  // it has the opaque mark
  int Make(VfsRequest& req);
  int Adopt(VfsRequest& req);
  void Unname(uint64_t id);
  int Remove(VfsRequest& req);
  int Rename(VfsRequest& req);
  int Exchange(VfsRequest& req);
  int MarkOpaque(const VfsRequest& req, uint64_t id, uint64_t upper_dir);
  int Open(VfsRequest& req);
  void GiveCopy(VfsRequest& req);
  int ReadDir(VfsRequest& req, bool plus);
  int WithHandle(VfsRequest& req);

  std::unique_ptr<Layer> upper_;
  // UPPER, open for as long as the overlay serves, with an exclusive flock: one
  // overlay on an upper directory at a time, as overlayfs has it.
  UniqueFd upper_lock_;
  mutable std::mutex mu_;  // the tables
  std::deque<ONode> nodes_;
  std::vector<uint32_t> free_;
  // "U<upper>" -> index; a lower directory "L<lower>" -> index; a lower non-directory
  // "L<lower>:<parent>/<name>" -> index: the names of a file hard-linked below are
  // separate nodes, so copying one up leaves the others showing the lower file (as
  // overlayfs without its index does), never the copy under another name.
  std::unordered_map<std::string, uint32_t> by_key_;
  size_t live_ = 1;
  std::recursive_mutex copy_mu_;  // one copy-up at a time (a copy-up copies its parents up)
  std::deque<std::unique_ptr<DirList>> dirs_;  // directory handles: fh = index + 1
  std::vector<uint32_t> free_dirs_;
  // The whiteout each new one is a link to (Whiteout): its upper node (0: none yet),
  // its name in the upper root, and whether the upper file system refused links to it.
  std::mutex whiteout_mu_;
  uint64_t shared_whiteout_ = 0;
  std::string shared_whiteout_name_;
  bool no_shared_whiteout_ = false;
};

}  // namespace ulsp::vfs
