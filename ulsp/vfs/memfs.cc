#include "ulsp/vfs/memfs.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <ctime>
#include <mutex>
#include <new>

#include "kernel/msgport/log.h"
#include "ulsp/vfs/size.h"

namespace ulsp::vfs {
namespace {

constexpr uint64_t MakeId(uint32_t index, uint32_t generation) {
  return (static_cast<uint64_t>(generation) << 32) | index;
}
constexpr uint32_t IndexOf(uint64_t id) { return static_cast<uint32_t>(id & 0xffffffffu); }
constexpr uint32_t GenerationOf(uint64_t id) { return static_cast<uint32_t>(id >> 32); }

// NameError, and "." and ".." are never names to make.
int MakeableName(std::string_view name) {
  if (int err = NameError(name)) return err;
  return name == "." || name == ".." ? EINVAL : 0;
}

struct timespec Now() {
  struct timespec ts {};
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

}  // namespace

std::expected<std::unique_ptr<MemfsLayer>, std::string> MemfsLayer::Create(const std::string& capacity) {
  const auto bytes = ParseSize(capacity);
  if (!bytes)
    return std::unexpected("memfs:" + capacity +
                           ": the size must be a number of bytes from 1 to 1024T, optionally with K, M, G or T");
  return std::unique_ptr<MemfsLayer>(new MemfsLayer(*bytes));
}

MemfsLayer::MemfsLayer(uint64_t capacity) : Layer(nullptr), capacity_(capacity) {
  nodes_.resize(2);
  Node& root = nodes_[1];
  root.in_use = true;
  root.nlookup = 1;
  root.st.st_mode = S_IFDIR | 0755;
  // Whoever mounts it owns its root (as a user's tmpfs with uid=): a user's memfs is
  // theirs to write in.
  root.st.st_uid = ::geteuid();
  root.st.st_gid = ::getegid();
  root.st.st_nlink = 2;
  root.st.st_ino = 1;
  root.st.st_blksize = kPage;
  root.st.st_atim = root.st.st_mtim = root.st.st_ctim = root.btime = Now();
  root.parent = kRootNode;
  live_ = 1;
}

MemfsLayer::Node* MemfsLayer::Get(uint64_t id) {
  const uint32_t index = IndexOf(id);
  if (index == 0 || index >= nodes_.size()) return nullptr;
  Node& n = nodes_[index];
  return n.in_use && n.generation == GenerationOf(id) ? &n : nullptr;
}

const MemfsLayer::Node* MemfsLayer::Get(uint64_t id) const { return const_cast<MemfsLayer*>(this)->Get(id); }

size_t MemfsLayer::NodeCount() const {
  std::shared_lock lock(mu_);
  return live_;
}

std::string MemfsLayer::PathOf(uint64_t node) const {
  std::vector<std::string_view> parts;
  std::shared_lock lock(mu_);
  for (int depth = 0; node != kRootNode; ++depth) {
    const Node* n = Get(node);
    if (n == nullptr || depth > 4096 || n->name.empty()) return "";
    parts.push_back(n->name);
    node = n->parent;
  }
  if (parts.empty()) return "/";
  std::string path;
  for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
    path += '/';
    path += *it;
  }
  return path;
}

void MemfsLayer::Touch(struct stat& st, bool modified) {
  const struct timespec now = Now();
  st.st_ctim = now;
  if (modified) st.st_mtim = now;
}

uint64_t MemfsLayer::NewNode(const VfsRequest& req, const Node& parent, mode_t mode) {
  uint32_t index;
  if (!free_.empty()) {
    index = free_.back();
    free_.pop_back();
  } else {
    index = static_cast<uint32_t>(nodes_.size());
    nodes_.emplace_back();
  }
  Node& n = nodes_[index];
  const uint32_t generation = n.generation;
  n = Node{};
  n.generation = generation;
  n.in_use = true;
  n.st.st_mode = mode;
  n.st.st_ino = index;
  n.st.st_uid = req.ctx.uid;
  n.st.st_gid = req.ctx.gid;
  if (parent.st.st_mode & S_ISGID) {  // BSD group semantics, as ext4
    n.st.st_gid = parent.st.st_gid;
    if (S_ISDIR(mode)) n.st.st_mode |= S_ISGID;
  }
  n.st.st_nlink = S_ISDIR(mode) ? 2 : 1;
  n.st.st_blksize = kPage;
  n.st.st_rdev = req.rdev;
  n.st.st_atim = n.st.st_mtim = n.st.st_ctim = n.btime = Now();
  ++live_;
  return MakeId(index, generation);
}

void MemfsLayer::MaybeDrop(uint64_t id) {
  Node* n = Get(id);
  if (n == nullptr || IndexOf(id) == 1 || n->nlookup > 0) return;
  if (S_ISDIR(n->st.st_mode) ? n->st.st_nlink > 1 : n->st.st_nlink > 0) return;
  used_pages_ -= n->pages.size();
  const uint32_t generation = n->generation + 1;
  *n = Node{};
  n->generation = generation;
  free_.push_back(IndexOf(id));
  --live_;
}

void MemfsLayer::Fill(fuse_entry_param& e, uint64_t id, const VfsRequest& req) {
  Node& n = *Get(id);
  ++n.nlookup;
  e = fuse_entry_param{};
  e.ino = id;
  e.generation = GenerationOf(id);
  e.attr = n.st;
  e.attr_timeout = req.timeout;
  e.entry_timeout = req.timeout;
}

void MemfsLayer::Link(Node& dir, uint64_t dir_id, const std::string& name, uint64_t id) {
  const uint64_t cookie = dir.next_cookie++;
  dir.children[name] = cookie;
  dir.by_cookie[cookie] = {name, id};
  Node& n = *Get(id);
  n.parent = dir_id;
  n.name = name;
  Touch(dir.st, true);
}

void MemfsLayer::Unlink(Node& dir, const std::string& name) {
  auto it = dir.children.find(name);
  dir.by_cookie.erase(it->second);
  dir.children.erase(it);
  Touch(dir.st, true);
}

int MemfsLayer::Lookup(VfsRequest& req) {
  std::unique_lock lock(mu_);
  Node* dir = Get(req.node);
  if (dir == nullptr) return ESTALE;
  if (!S_ISDIR(dir->st.st_mode)) return ENOTDIR;
  if (req.name == ".") {
    Fill(req.entry, req.node, req);
    return 0;
  }
  if (req.name == "..") {
    Fill(req.entry, req.node == kRootNode ? kRootNode : dir->parent, req);
    return 0;
  }
  auto it = dir->children.find(req.name);
  if (it == dir->children.end()) return req.name.size() > NAME_MAX ? ENAMETOOLONG : ENOENT;  // as ext4 says
  Fill(req.entry, dir->by_cookie[it->second].second, req);
  return 0;
}

int MemfsLayer::Truncate(Node& n, uint64_t size) {
  if (!S_ISREG(n.st.st_mode)) return S_ISDIR(n.st.st_mode) ? EISDIR : EINVAL;
  const uint64_t keep = (size + kPage - 1) / kPage;
  for (auto it = n.pages.lower_bound(keep); it != n.pages.end();) {
    it = n.pages.erase(it);
    --used_pages_;
  }
  if (size % kPage != 0) {  // zero the tail of the last page kept
    if (auto it = n.pages.find(size / kPage); it != n.pages.end())
      std::fill(it->second.begin() + static_cast<long>(size % kPage), it->second.end(), '\0');
  }
  n.st.st_size = static_cast<off_t>(size);
  n.st.st_blocks = static_cast<blkcnt_t>(n.pages.size() * (kPage / 512));
  Touch(n.st, true);
  return 0;
}

int MemfsLayer::SetAttr(VfsRequest& req) {
  std::unique_lock lock(mu_);
  Node* n = Get(req.node);
  if (n == nullptr) return ESTALE;
  const int valid = req.flags;
  const struct stat& a = req.attr;
  if (valid & FUSE_SET_ATTR_MODE) {
    n->st.st_mode = (n->st.st_mode & S_IFMT) | (a.st_mode & 07777);
  }
  if (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
    if (valid & FUSE_SET_ATTR_UID) n->st.st_uid = a.st_uid;
    if (valid & FUSE_SET_ATTR_GID) n->st.st_gid = a.st_gid;
    // Clearing set-user-ID on chown and write is the kernel's: it sends the new mode.
  }
  if (valid & FUSE_SET_ATTR_SIZE) {
    if (int err = Truncate(*n, static_cast<uint64_t>(a.st_size))) return err;
  }
  const struct timespec now = Now();
  if (valid & FUSE_SET_ATTR_ATIME_NOW) n->st.st_atim = now;
  else if (valid & FUSE_SET_ATTR_ATIME) n->st.st_atim = a.st_atim;
  if (valid & FUSE_SET_ATTR_MTIME_NOW) n->st.st_mtim = now;
  else if (valid & FUSE_SET_ATTR_MTIME) n->st.st_mtim = a.st_mtim;
  n->st.st_ctim = now;
  req.out_attr = n->st;
  return 0;
}

int MemfsLayer::Make(VfsRequest& req) {
  const bool unnamed = IsTmpfile(req);  // a file in no directory, until a link gives it a name
  if (int err = unnamed ? 0 : MakeableName(req.name)) return err;
  std::unique_lock lock(mu_);
  Node* dir = Get(req.node);
  if (dir == nullptr) return ESTALE;
  if (!S_ISDIR(dir->st.st_mode)) return ENOTDIR;
  if (!unnamed && dir->children.contains(req.name)) {
    if (req.op == VfsOp::kCreate && !(req.flags & O_EXCL)) {
      // create of an existing name opens it (the kernel usually looks up first).
      const uint64_t id = dir->by_cookie[dir->children[req.name]].second;
      if (S_ISDIR(Get(id)->st.st_mode)) return EISDIR;
      Fill(req.entry, id, req);
      if (req.flags & O_TRUNC) Truncate(*Get(id), 0);
      req.open = {};
      req.open.fh = (req.flags & O_APPEND) ? 1 : 0;
      return 0;
    }
    return EEXIST;
  }
  mode_t mode = req.mode;
  switch (req.op) {
    case VfsOp::kMkDir: mode = S_IFDIR | (mode & 07777); break;
    case VfsOp::kSymlink: mode = S_IFLNK | 0777; break;
    case VfsOp::kCreate: mode = S_IFREG | (mode & 07777); break;
    default: break;  // mknod: the type is in the mode
  }
  if (!S_ISDIR(mode) && !S_ISREG(mode) && !S_ISLNK(mode) && !S_ISFIFO(mode) && !S_ISCHR(mode) && !S_ISBLK(mode) &&
      !S_ISSOCK(mode))
    return EINVAL;
  const uint64_t dir_id = req.node;
  const uint64_t id = NewNode(req, *Get(dir_id), mode);
  dir = Get(dir_id);  // NewNode may have grown the table (deque: references stay valid)
  Node& n = *Get(id);
  if (S_ISLNK(mode)) {
    n.target = req.name2;
    n.st.st_size = static_cast<off_t>(req.name2.size());
  }
  if (unnamed) {
    n.st.st_nlink = 0;
  } else {
    Link(*dir, dir_id, req.name, id);
  }
  if (S_ISDIR(mode)) ++dir->st.st_nlink;
  Fill(req.entry, id, req);
  if (req.op == VfsOp::kCreate) {
    req.open = {};
    req.open.fh = (req.flags & O_APPEND) ? 1 : 0;
  }
  return 0;
}

int MemfsLayer::Remove(VfsRequest& req) {
  std::unique_lock lock(mu_);
  Node* dir = Get(req.node);
  if (dir == nullptr) return ESTALE;
  auto it = dir->children.find(req.name);
  if (it == dir->children.end()) return ENOENT;
  const uint64_t id = dir->by_cookie[it->second].second;
  Node& n = *Get(id);
  if (req.op == VfsOp::kRmDir) {
    if (!S_ISDIR(n.st.st_mode)) return ENOTDIR;
    if (!n.children.empty()) return ENOTEMPTY;
    --dir->st.st_nlink;
    n.st.st_nlink = 1;  // MaybeDrop frees a directory at 1 (its own ".")
  } else {
    if (S_ISDIR(n.st.st_mode)) return EISDIR;
    --n.st.st_nlink;
  }
  Touch(n.st, false);
  Unlink(*dir, req.name);
  MaybeDrop(id);
  return 0;
}

int MemfsLayer::Rename(VfsRequest& req) {
  if (int err = MakeableName(req.name2)) return err;
  const unsigned flags = static_cast<unsigned>(req.flags);
  if (flags & ~static_cast<unsigned>(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT)) return EINVAL;
  if ((flags & RENAME_EXCHANGE) && (flags & ~static_cast<unsigned>(RENAME_EXCHANGE))) return EINVAL;
  std::unique_lock lock(mu_);
  Node* from = Get(req.node);
  Node* to = Get(req.node2);
  if (from == nullptr || to == nullptr) return ESTALE;
  auto src = from->children.find(req.name);
  if (src == from->children.end()) return ENOENT;
  const uint64_t id = from->by_cookie[src->second].second;
  Node& moving = *Get(id);
  auto dst = to->children.find(req.name2);
  const bool exists = dst != to->children.end();
  const uint64_t victim = exists ? to->by_cookie[dst->second].second : 0;
  if ((flags & RENAME_NOREPLACE) && exists) return EEXIST;
  if ((flags & RENAME_EXCHANGE) && !exists) return ENOENT;
  if (victim == id) return 0;  // two names of one node: nothing to do
  // A directory may not move into itself or below.
  if (S_ISDIR(moving.st.st_mode)) {
    for (uint64_t up = req.node2; up != kRootNode; up = Get(up)->parent)
      if (up == id) return EINVAL;
  }
  if (flags & RENAME_EXCHANGE) {
    Node& other = *Get(victim);
    from->by_cookie[src->second].second = victim;
    to->by_cookie[dst->second].second = id;
    other.parent = req.node;
    other.name = req.name;
    moving.parent = req.node2;
    moving.name = req.name2;
    if (S_ISDIR(moving.st.st_mode) != S_ISDIR(other.st.st_mode) && req.node != req.node2) {
      const int delta = S_ISDIR(moving.st.st_mode) ? 1 : -1;
      to->st.st_nlink = static_cast<nlink_t>(static_cast<int>(to->st.st_nlink) + delta);
      from->st.st_nlink = static_cast<nlink_t>(static_cast<int>(from->st.st_nlink) - delta);
    }
    Touch(from->st, true);
    Touch(to->st, true);
    Touch(moving.st, false);
    Touch(other.st, false);
    return 0;
  }
  if (exists) {
    Node& old = *Get(victim);
    if (S_ISDIR(moving.st.st_mode) && !S_ISDIR(old.st.st_mode)) return ENOTDIR;
    if (!S_ISDIR(moving.st.st_mode) && S_ISDIR(old.st.st_mode)) return EISDIR;
    if (S_ISDIR(old.st.st_mode)) {
      if (!old.children.empty()) return ENOTEMPTY;
      --to->st.st_nlink;
      old.st.st_nlink = 1;
    } else {
      --old.st.st_nlink;
    }
    Touch(old.st, false);
    Unlink(*to, req.name2);
  }
  Unlink(*from, req.name);
  Link(*to, req.node2, req.name2, id);
  if (S_ISDIR(moving.st.st_mode) && req.node != req.node2) {
    --from->st.st_nlink;
    ++to->st.st_nlink;
  }
  Touch(moving.st, false);
  if (flags & RENAME_WHITEOUT) {
    // As ext4: the old name now holds a whiteout, a character device 0:0 with no
    // permission bits, the caller's (the kernel admits only a caller with CAP_MKNOD).
    // overlayfs with a memfs mount as its upper directory hides a lower entry by it
    // in the same step as the move.
    const uint64_t from_id = req.node;
    const uint64_t wid = NewNode(req, *from, S_IFCHR);
    Get(wid)->st.st_rdev = 0;
    Link(*Get(from_id), from_id, req.name, wid);
  }
  if (exists) MaybeDrop(victim);
  return 0;
}

int MemfsLayer::Read(VfsRequest& req) {
  std::shared_lock lock(mu_);
  const Node* n = Get(req.node);
  if (n == nullptr) return ESTALE;
  if (S_ISDIR(n->st.st_mode)) return EISDIR;
  if (req.offset < 0) return EINVAL;
  const uint64_t size = static_cast<uint64_t>(n->st.st_size);
  const uint64_t start = std::min<uint64_t>(static_cast<uint64_t>(req.offset), size);
  const uint64_t end = std::min<uint64_t>(start + std::min<uint64_t>(req.size, 64u << 20), size);
  req.out.assign(end - start, '\0');  // holes read as zeros
  for (auto it = n->pages.lower_bound(start / kPage); it != n->pages.end() && it->first * kPage < end; ++it) {
    const uint64_t page_start = it->first * kPage;
    const uint64_t from = std::max(start, page_start);
    const uint64_t to = std::min(end, page_start + kPage);
    std::memcpy(req.out.data() + (from - start), it->second.data() + (from - page_start), to - from);
  }
  return 0;
}

int MemfsLayer::Write(VfsRequest& req) {
  std::unique_lock lock(mu_);
  Node* n = Get(req.node);
  if (n == nullptr) return ESTALE;
  if (!S_ISREG(n->st.st_mode)) return EINVAL;
  if (req.offset < 0) return EINVAL;
  // O_APPEND (kept in the handle) writes at the end, whatever offset the kernel sent.
  const uint64_t start = req.fh == 1 ? static_cast<uint64_t>(n->st.st_size) : static_cast<uint64_t>(req.offset);
  const uint64_t end = start + req.in.size();
  if (end > (1ull << 50)) return EFBIG;
  uint64_t new_pages = 0;
  for (uint64_t p = start / kPage; p * kPage < end; ++p) new_pages += n->pages.contains(p) ? 0u : 1u;
  if ((used_pages_ + new_pages) * kPage > capacity_) return ENOSPC;
  for (uint64_t p = start / kPage; p * kPage < end; ++p) {
    auto [it, added] = n->pages.try_emplace(p);
    if (added) {
      it->second.assign(kPage, '\0');
      ++used_pages_;
    }
    const uint64_t page_start = p * kPage;
    const uint64_t from = std::max(start, page_start);
    const uint64_t to = std::min(end, page_start + kPage);
    std::memcpy(it->second.data() + (from - page_start), req.in.data() + (from - start), to - from);
  }
  n->st.st_size = std::max<off_t>(n->st.st_size, static_cast<off_t>(end));
  n->st.st_blocks = static_cast<blkcnt_t>(n->pages.size() * (kPage / 512));
  Touch(n->st, true);
  req.out_size = req.in.size();
  return 0;
}

// fallocate(2) as tmpfs answers it: plain and FALLOC_FL_KEEP_SIZE reserve zeroed pages
// (so that writing there cannot fail for space), FALLOC_FL_PUNCH_HOLE zeroes a range
// and frees the pages wholly inside it, FALLOC_FL_ZERO_RANGE zeroes and reserves.
// Collapsing and inserting ranges are not supported (EOPNOTSUPP, as tmpfs says).
int MemfsLayer::Allocate(VfsRequest& req) {
  const int mode = req.flags;
  if ((mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) != 0) return EOPNOTSUPP;
  const bool punch = (mode & FALLOC_FL_PUNCH_HOLE) != 0, zero = (mode & FALLOC_FL_ZERO_RANGE) != 0;
  if ((punch && zero) || (punch && (mode & FALLOC_FL_KEEP_SIZE) == 0)) return EOPNOTSUPP;
  if (req.offset < 0 || req.offset2 <= 0) return EINVAL;
  std::unique_lock lock(mu_);
  Node* n = Get(req.node);
  if (n == nullptr) return ESTALE;
  if (!S_ISREG(n->st.st_mode)) return S_ISDIR(n->st.st_mode) ? EISDIR : ENODEV;
  const uint64_t start = static_cast<uint64_t>(req.offset), end = start + static_cast<uint64_t>(req.offset2);
  if (end > (1ull << 50) || end < start) return EFBIG;
  const uint64_t first = start / kPage, last = (end + kPage - 1) / kPage;  // pages [first, last)
  // Zeroes [from, to) of a page that is kept.
  auto clear = [&](std::vector<char>& page, uint64_t p) {
    const uint64_t from = std::max(start, p * kPage), to = std::min(end, (p + 1) * kPage);
    std::fill(page.begin() + static_cast<long>(from - p * kPage), page.begin() + static_cast<long>(to - p * kPage), '\0');
  };
  if (punch) {
    for (auto it = n->pages.lower_bound(first); it != n->pages.end() && it->first < last;) {
      if (start <= it->first * kPage && (it->first + 1) * kPage <= end) {
        it = n->pages.erase(it);
        --used_pages_;
      } else {
        clear(it->second, it->first);
        ++it;
      }
    }
  } else {
    uint64_t have = 0;
    for (auto it = n->pages.lower_bound(first); it != n->pages.end() && it->first < last; ++it) ++have;
    if ((used_pages_ + (last - first - have)) * kPage > capacity_) return ENOSPC;
    for (uint64_t p = first; p < last; ++p) {
      auto [it, added] = n->pages.try_emplace(p);
      if (added) {
        it->second.assign(kPage, '\0');
        ++used_pages_;
      } else if (zero) {
        clear(it->second, p);
      }
    }
  }
  n->st.st_blocks = static_cast<blkcnt_t>(n->pages.size() * (kPage / 512));
  const bool grows = !punch && (mode & FALLOC_FL_KEEP_SIZE) == 0 && end > static_cast<uint64_t>(n->st.st_size);
  if (grows) n->st.st_size = static_cast<off_t>(end);
  if (grows || punch || zero) Touch(n->st, true);
  return 0;
}

int MemfsLayer::ReadDir(VfsRequest& req, bool plus) {
  std::unique_lock lock(mu_);  // readdirplus counts lookups
  Node* dir = Get(req.node);
  if (dir == nullptr) return ESTALE;
  const size_t room = std::min<uint64_t>(req.size, 1u << 20);
  req.out.resize(room);
  size_t used = 0;
  auto add = [&](const char* name, uint64_t id, bool dots, uint64_t next) {
    const Node& n = *Get(id);
    size_t size;
    if (plus) {
      fuse_entry_param e{};
      if (dots) {
        e.attr.st_ino = n.st.st_ino;
        e.attr.st_mode = n.st.st_mode;
        size = fuse_add_direntry_plus(nullptr, req.out.data() + used, room - used, name, &e, static_cast<off_t>(next));
      } else {
        e.ino = id;
        e.generation = GenerationOf(id);
        e.attr = n.st;
        e.attr_timeout = e.entry_timeout = req.timeout;
        size = fuse_add_direntry_plus(nullptr, req.out.data() + used, room - used, name, &e, static_cast<off_t>(next));
        if (size <= room - used) ++Get(id)->nlookup;
      }
    } else {
      struct stat st {};
      st.st_ino = n.st.st_ino;
      st.st_mode = n.st.st_mode;
      size = fuse_add_direntry(nullptr, req.out.data() + used, room - used, name, &st, static_cast<off_t>(next));
    }
    if (size > room - used) return false;
    used += size;
    return true;
  };
  uint64_t offset = static_cast<uint64_t>(std::max<int64_t>(req.offset, 0));
  if (offset < 1 && !add(".", req.node, true, 1)) return 0;
  if (offset < 2 && !add("..", req.node == kRootNode ? kRootNode : dir->parent, true, 2)) {
    req.out.resize(used);
    return 0;
  }
  req.dir_end = true;  // unless the room runs out
  for (auto it = dir->by_cookie.upper_bound(std::max<uint64_t>(offset, 2)); it != dir->by_cookie.end(); ++it) {
    if (req.admit && !req.admit(it->second.first)) continue;
    if (!add(it->second.first.c_str(), it->second.second, false, it->first)) {
      req.dir_end = false;
      break;
    }
  }
  req.out.resize(used);
  return 0;
}

int MemfsLayer::Xattr(VfsRequest& req) {
  std::unique_lock lock(mu_);
  Node* n = Get(req.node);
  if (n == nullptr) return ESTALE;
  switch (req.op) {
    case VfsOp::kSetXattr: {
      if (!req.name.starts_with("user.") && !req.name.starts_with("trusted.")) return EOPNOTSUPP;
      if (S_ISLNK(n->st.st_mode) || (!S_ISREG(n->st.st_mode) && !S_ISDIR(n->st.st_mode) && req.name.starts_with("user.")))
        return EPERM;
      const bool exists = n->xattrs.contains(req.name);
      if ((req.flags & XATTR_CREATE) && exists) return EEXIST;
      if ((req.flags & XATTR_REPLACE) && !exists) return ENODATA;
      n->xattrs[req.name].assign(req.in.begin(), req.in.end());
      Touch(n->st, false);
      return 0;
    }
    case VfsOp::kRemoveXattr:
      if (n->xattrs.erase(req.name) == 0) return ENODATA;
      Touch(n->st, false);
      return 0;
    case VfsOp::kGetXattr: {
      auto it = n->xattrs.find(req.name);
      if (it == n->xattrs.end()) return ENODATA;
      req.out_size = it->second.size();
      if (req.size == 0) return 0;
      if (req.size < it->second.size()) return ERANGE;
      req.out.assign(it->second.begin(), it->second.end());
      return 0;
    }
    case VfsOp::kListXattr: {
      std::string list;
      for (const auto& [name, value] : n->xattrs) {
        list += name;
        list += '\0';
      }
      req.out_size = list.size();
      if (req.size == 0) return 0;
      if (req.size < list.size()) return ERANGE;
      req.out.assign(list.begin(), list.end());
      return 0;
    }
    default:
      return ENOSYS;
  }
}

int MemfsLayer::Seek(VfsRequest& req) {
  std::shared_lock lock(mu_);
  const Node* n = Get(req.node);
  if (n == nullptr) return ESTALE;
  const uint64_t size = static_cast<uint64_t>(n->st.st_size);
  if (req.offset < 0 || static_cast<uint64_t>(req.offset) >= size) return ENXIO;
  const uint64_t off = static_cast<uint64_t>(req.offset);
  if (req.flags == SEEK_DATA) {
    auto it = n->pages.lower_bound(off / kPage);
    if (it == n->pages.end()) return ENXIO;
    req.out_size = std::max(off, it->first * kPage);
    return 0;
  }
  if (req.flags == SEEK_HOLE) {
    uint64_t p = off / kPage;
    while (n->pages.contains(p)) ++p;
    req.out_size = std::min(size, std::max(off, p * kPage));
    return 0;
  }
  return EINVAL;
}

int MemfsLayer::Serve(VfsRequest& req) noexcept try {
  switch (req.op) {
    case VfsOp::kLookup:
      return Lookup(req);
    case VfsOp::kForget: {
      std::unique_lock lock(mu_);
      Node* n = Get(req.node);
      if (n == nullptr || IndexOf(req.node) == 1) return 0;
      n->nlookup -= std::min(req.count, n->nlookup);
      MaybeDrop(req.node);
      return 0;
    }
    case VfsOp::kGetAttr: {
      std::shared_lock lock(mu_);
      const Node* n = Get(req.node);
      if (n == nullptr) return ESTALE;
      req.out_attr = n->st;
      req.out_btime = n->btime;
      req.out_btime_known = (static_cast<unsigned>(req.flags) & STATX_BTIME) != 0;
      return 0;
    }
    case VfsOp::kSetAttr:
      return SetAttr(req);
    case VfsOp::kReadLink: {
      std::shared_lock lock(mu_);
      const Node* n = Get(req.node);
      if (n == nullptr) return ESTALE;
      if (!S_ISLNK(n->st.st_mode)) return EINVAL;
      req.out.assign(n->target.begin(), n->target.end());
      return 0;
    }
    case VfsOp::kMkNod:
    case VfsOp::kMkDir:
    case VfsOp::kSymlink:
    case VfsOp::kCreate:
      return Make(req);
    case VfsOp::kUnlink:
    case VfsOp::kRmDir:
      return Remove(req);
    case VfsOp::kRename:
      return Rename(req);
    case VfsOp::kLink: {
      if (int err = MakeableName(req.name2)) return err;
      std::unique_lock lock(mu_);
      Node* n = Get(req.node);
      Node* dir = Get(req.node2);
      if (n == nullptr || dir == nullptr) return ESTALE;
      if (S_ISDIR(n->st.st_mode)) return EPERM;
      if (dir->children.contains(req.name2)) return EEXIST;
      ++n->st.st_nlink;
      Touch(n->st, false);
      Link(*dir, req.node2, req.name2, req.node);
      Fill(req.entry, req.node, req);
      return 0;
    }
    case VfsOp::kOpen: {
      std::unique_lock lock(mu_);
      Node* n = Get(req.node);
      if (n == nullptr) return ESTALE;
      if ((req.flags & O_TRUNC) && S_ISREG(n->st.st_mode)) Truncate(*n, 0);
      req.open = {};
      req.open.fh = (req.flags & O_APPEND) ? 1 : 0;
      req.open.keep_cache = true;  // only this mount changes the data
      return 0;
    }
    case VfsOp::kRead:
      return Read(req);
    case VfsOp::kWrite:
      return Write(req);
    case VfsOp::kOpenDir: {
      std::shared_lock lock(mu_);
      const Node* n = Get(req.node);
      if (n == nullptr) return ESTALE;
      if (!S_ISDIR(n->st.st_mode)) return ENOTDIR;
      req.open = {};
      return 0;
    }
    case VfsOp::kReadDir:
      return ReadDir(req, false);
    case VfsOp::kReadDirPlus:
      return ReadDir(req, true);
    case VfsOp::kFlush:
    case VfsOp::kRelease:
    case VfsOp::kFsync:
    case VfsOp::kReleaseDir:
    case VfsOp::kFsyncDir:
    case VfsOp::kAccess:
      return 0;
    case VfsOp::kStatFs: {
      std::shared_lock lock(mu_);
      req.statfs = {};
      req.statfs.f_bsize = req.statfs.f_frsize = kPage;
      req.statfs.f_blocks = capacity_ / kPage;
      req.statfs.f_bfree = req.statfs.f_bavail = capacity_ / kPage - std::min(capacity_ / kPage, used_pages_);
      req.statfs.f_files = 1u << 20;
      req.statfs.f_ffree = req.statfs.f_favail = (1u << 20) - std::min<uint64_t>(live_, 1u << 20);
      req.statfs.f_namemax = 255;
      return 0;
    }
    case VfsOp::kSetXattr:
    case VfsOp::kGetXattr:
    case VfsOp::kListXattr:
    case VfsOp::kRemoveXattr:
      return Xattr(req);
    case VfsOp::kFallocate:
      return Allocate(req);
    case VfsOp::kLseek:
      return Seek(req);
    case VfsOp::kCopyFileRange:
      return EOPNOTSUPP;  // the kernel falls back to read and write
    case VfsOp::kIoctl:
      return ENOTTY;  // no inode flags, as on a file system without them
    case VfsOp::kAdopt:  // a host file's descriptor: no file of this layer
    case VfsOp::kLend:   // its files have no descriptor (and die with the process)
    case VfsOp::kCount:
      break;
  }
  return ENOSYS;
} catch (const std::bad_alloc&) {
  return ENOMEM;
} catch (const std::exception& e) {
  Logger("vfs")->error("memfs: {} failed: {}", msgport::VfsOpName(req.op), e.what());
  return EIO;
}

}  // namespace ulsp::vfs
