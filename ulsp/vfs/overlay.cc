#include "ulsp/vfs/overlay.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/xattr.h>
#include <unistd.h>
#include <linux/fuse.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <new>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

#include "kernel/msgport/log.h"
#include "kernel/msgport/own_file.h"
#include "kernel/msgport/thread_creds.h"
#include "ulsp/vfs/passthrough.h"

namespace ulsp::vfs {
namespace {

constexpr const char* kOpaque = "user.ulsp.opaque";

constexpr uint64_t MakeId(uint32_t index, uint32_t generation) {
  return (static_cast<uint64_t>(generation) << 32) | index;
}
constexpr uint32_t IndexOf(uint64_t id) { return static_cast<uint32_t>(id & 0xffffffffu); }
constexpr uint32_t GenerationOf(uint64_t id) { return static_cast<uint32_t>(id >> 32); }

bool IsWhiteout(const struct stat& st) { return S_ISCHR(st.st_mode) && st.st_rdev == 0; }

// The names the overlay gives entries of its own in UPPER for a moment: a whiteout or
// a directory made to be renamed into place, or a removed directory being emptied.
// A killed server may leave one. The merged view never shows such a name, and no
// program can make one (EPERM).
constexpr std::string_view kWorkPrefix = ".ulsp-whiteout.";
bool Reserved(std::string_view name) { return name.starts_with(kWorkPrefix); }
std::string WorkName() {
  static std::atomic<uint64_t> next{0};
  return std::string(kWorkPrefix) + std::to_string(::getpid()) + "." + std::to_string(next.fetch_add(1));
}
// Whether a name of the overlay's own (Reserved) is one a process now gone left
// (`.ulsp-whiteout.PID.N`, no process PID: a killed server). A live process's, this
// one's included, may be in use.
bool LeftByTheDead(std::string_view name) {
  name.remove_prefix(kWorkPrefix.size());
  pid_t pid = 0;
  const auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), pid);
  if (ec != std::errc() || pid <= 0 || pid == ::getpid() || end == name.data() + name.size() || *end != '.') return false;
  return ::kill(pid, 0) != 0 && errno == ESRCH;
}
// `make(name)` under a fresh work name, put in *name; another is tried while one a
// killed server left (the same pid, an earlier process) is in the way (EEXIST).
template <class F>
int UnderWorkName(std::string* name, F&& make) {
  int err = EEXIST;
  for (int tries = 0; err == EEXIST && tries < 8; ++tries) err = make(*name = WorkName());
  return err;
}

// A request of the overlay's own to a layer below, on behalf of `req`'s caller.
VfsRequest Sub(const VfsRequest& req, VfsOp op, uint64_t node) {
  VfsRequest s;
  s.op = op;
  s.ctx = req.ctx;
  s.node = node;
  s.timeout = req.timeout;
  return s;
}
// The same as the overlay itself (root): for copy-ups and whiteouts, which the caller
// did not ask for and must not be refused.
VfsRequest Own(const VfsRequest& req, VfsOp op, uint64_t node) {
  VfsRequest s = Sub(req, op, node);
  s.ctx = {};
  return s;
}

void Forget(Layer& layer, uint64_t node, uint64_t count) {
  if (node == 0 || node == kRootNode) return;
  VfsRequest f;
  f.op = VfsOp::kForget;
  f.node = node;
  f.count = count;
  layer.Serve(f);
}

void Release(Layer& layer, uint64_t node, uint64_t fh) {
  VfsRequest r;
  r.op = VfsOp::kRelease;
  r.node = node;
  r.fh = fh;
  layer.Serve(r);
}

void TakeResults(VfsRequest& to, VfsRequest& from) {
  if (from.copy_fd >= 0) {  // an overlay below copied the file
    to.copy_fd = from.copy_fd;
    to.copy_tag = from.copy_tag;
  }
  to.entry = from.entry;
  to.out_attr = from.out_attr;
  to.out_btime = from.out_btime;
  to.out_btime_known = from.out_btime_known;
  to.open = from.open;
  to.out = std::move(from.out);
  to.out_fd = from.out_fd;
  to.out_size = from.out_size;
  to.dir_end = from.dir_end;
  to.statfs = from.statfs;
}

// Calls `fn(name, d_type, ino)` for every entry of `dir` in `layer` but "." and "..".
template <class F>
int ForEachEntry(Layer& layer, const VfsRequest& req, uint64_t dir, F&& fn) {
  VfsRequest open = Own(req, VfsOp::kOpenDir, dir);
  if (int err = layer.Serve(open)) return err;
  int result = 0;
  int64_t offset = 0;
  for (;;) {
    VfsRequest rd = Own(req, VfsOp::kReadDir, dir);
    rd.fh = open.open.fh;
    rd.size = 64 << 10;
    rd.offset = offset;
    if ((result = layer.Serve(rd)) != 0 || rd.out.empty()) break;
    msgport::ForEachDirent(rd.out, [&](const fuse_dirent& d, size_t pos) {
      const std::string name(rd.out.data() + pos + FUSE_NAME_OFFSET, d.namelen);
      if (name != "." && name != "..") fn(name, d.type, d.ino);
      offset = static_cast<int64_t>(d.off);
    });
    if (rd.dir_end) break;
  }
  VfsRequest close = Own(req, VfsOp::kReleaseDir, dir);
  close.fh = open.open.fh;
  layer.Serve(close);
  return result;
}

// The whiteouts of the overlay's own in the upper root that a server killed before it
// could remove them left there (its shared one: Whiteout): hidden, but taking room.
void RemoveLeftWhiteouts(const std::string& upper_dir) {
  std::error_code ec;
  for (std::filesystem::directory_iterator it(upper_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename();
    struct stat st {};
    if (Reserved(name) && ::lstat(it->path().c_str(), &st) == 0 && IsWhiteout(st)) ::unlink(it->path().c_str());
  }
}

}  // namespace

std::expected<std::unique_ptr<OverlayLayer>, std::string> OverlayLayer::Open(const std::string& upper_dir,
                                                                            std::unique_ptr<Layer> lower) {
  // A fresh upper directory is made. Another user's would let them choose what the
  // stack serves (their files shadow the lower layer's).
  if (auto own = MakeOwnDirectory(upper_dir); !own) return std::unexpected("overlay:" + own.error());
  // What copy-ups and opaque directories will need, tried now: an upper directory
  // that takes no new names (/proc, a read-only file system) or no user xattrs would
  // fail every change later, with errors that do not say why.
  const std::string probe = upper_dir + "/.ulsp-probe." + std::to_string(::getpid());
  if (::mkdir(probe.c_str(), 0700) != 0)
    return std::unexpected("overlay:" + upper_dir + ": cannot make directories there (" + std::strerror(errno) +
                           "): the upper directory must be writable");
  const bool xattrs = ::setxattr(probe.c_str(), kOpaque, "y", 1, 0) == 0;
  const int xattr_errno = errno;
  ::rmdir(probe.c_str());
  if (!xattrs)
    return std::unexpected("overlay:" + upper_dir + ": its file system keeps no user extended attributes (" +
                           std::strerror(xattr_errno) + "), which the overlay needs to mark opaque directories");
  // One overlay on an upper directory at a time. Two (two mounts, two groups of one
  // policy, two peers of an agent's export) each copied a file up and linked its copy
  // in: the second's link failed, and the program's open or append with it (EEXIST).
  // Nor do they see each other's whiteouts. overlayfs refuses the second mount too.
  UniqueFd lock(::open(upper_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!lock) return std::unexpected("overlay:" + upper_dir + ": " + std::strerror(errno));
  if (::flock(lock.get(), LOCK_EX | LOCK_NB) != 0)
    return std::unexpected("overlay:" + upper_dir + ": " +
                           (errno == EWOULDBLOCK ? std::string("another overlay serves this upper directory now (a mount, a "
                                                               "group or an agent's export); give each its own")
                                                 : std::string("cannot lock it: ") + std::strerror(errno)));
  RemoveLeftWhiteouts(upper_dir);
  auto upper = PassthroughLayer::Open(upper_dir);
  if (!upper) return std::unexpected("overlay:" + upper_dir + ": " + upper.error().Describe());
  auto layer = std::unique_ptr<OverlayLayer>(new OverlayLayer(std::move(*upper), std::move(lower)));
  layer->upper_lock_ = std::move(lock);
  return layer;
}

OverlayLayer::OverlayLayer(std::unique_ptr<Layer> upper, std::unique_ptr<Layer> lower)
    : Layer(std::move(lower)), upper_(std::move(upper)) {
  nodes_.resize(2);
  ONode& root = nodes_[1];
  root.in_use = true;
  root.upper = kRootNode;
  root.lower = kRootNode;
  root.dir = true;
  root.nlookup = 1;
  root.parent = kRootNode;
}

OverlayLayer::~OverlayLayer() {
  for (const ONode& n : nodes_)
    if (n.in_use && n.copy_fh) Release(*upper_, n.upper, *n.copy_fh);
  if (shared_whiteout_ != 0) {
    RemoveUpper(VfsRequest{}, kRootNode, shared_whiteout_name_);
    Forget(*upper_, shared_whiteout_, 1);
  }
}

bool OverlayLayer::Get(uint64_t id, ONode* out) const {
  std::lock_guard lock(mu_);
  const uint32_t index = IndexOf(id);
  if (index == 0 || index >= nodes_.size()) return false;
  const ONode& n = nodes_[index];
  if (!n.in_use || n.generation != GenerationOf(id)) return false;
  *out = n;
  return true;
}

size_t OverlayLayer::NodeCount() const {
  std::lock_guard lock(mu_);
  return live_;
}

std::string OverlayLayer::PathOf(uint64_t node) const {
  std::vector<std::string> parts;
  for (int depth = 0; node != kRootNode; ++depth) {
    ONode n;
    if (depth > 4096 || !Get(node, &n) || n.name.empty()) return "";
    parts.push_back(n.name);
    node = n.parent;
  }
  if (parts.empty()) return "/";
  std::string path;
  for (auto it = parts.rbegin(); it != parts.rend(); ++it) path += "/" + *it;
  return path;
}

uint64_t OverlayLayer::Register(uint64_t parent, std::string_view name, uint64_t up, uint64_t lo, bool dir,
                                bool opaque) {
  uint64_t drop_upper = 0, drop_lower = 0;
  uint64_t id;
  const std::string lower_key =
      lo == 0 ? "" : "L" + std::to_string(lo) + (dir ? "" : ":" + std::to_string(parent) + "/" + std::string(name));
  {
    std::lock_guard lock(mu_);
    const std::string key = up ? "U" + std::to_string(up) : lower_key;
    if (auto it = by_key_.find(key); it != by_key_.end()) {
      ONode& n = nodes_[it->second];
      ++n.nlookup;
      n.parent = parent;
      n.name.assign(name);
      // The node holds one lookup on each side already: give back the new ones.
      if (up) drop_upper = up;
      if (lo && n.lower == 0 && !n.opaque) {
        n.lower = lo;
      } else if (lo) {
        drop_lower = lo;
      }
      id = MakeId(it->second, n.generation);
    } else {
      uint32_t index;
      if (!free_.empty()) {
        index = free_.back();
        free_.pop_back();
      } else {
        index = static_cast<uint32_t>(nodes_.size());
        nodes_.emplace_back();
      }
      ONode& n = nodes_[index];
      const uint32_t generation = n.generation;
      n = ONode{true, generation, up, lo, parent, std::string(name), 1, dir, opaque, lower_key, std::nullopt};
      by_key_[key] = index;
      if (up && lo) by_key_[lower_key] = index;
      ++live_;
      id = MakeId(index, generation);
    }
  }
  Forget(*upper_, drop_upper, 1);
  if (drop_lower) Forget(*lower(), drop_lower, 1);
  return id;
}

void OverlayLayer::Drop(uint64_t id, uint64_t count) {
  uint64_t up = 0, lo = 0;
  std::optional<uint64_t> copy_fh;
  {
    std::lock_guard lock(mu_);
    const uint32_t index = IndexOf(id);
    if (index <= 1 || index >= nodes_.size()) return;
    ONode& n = nodes_[index];
    if (!n.in_use || n.generation != GenerationOf(id)) return;
    n.nlookup -= std::min(count, n.nlookup);
    if (n.nlookup > 0) return;
    up = n.upper;
    lo = n.lower;
    copy_fh = n.copy_fh;
    for (const std::string& key : {"U" + std::to_string(up), n.lower_key}) {
      if (auto it = by_key_.find(key); it != by_key_.end() && it->second == index) by_key_.erase(it);
    }
    const uint32_t generation = n.generation + 1;
    n = ONode{};
    n.generation = generation;
    free_.push_back(index);
    --live_;
  }
  if (copy_fh) Release(*upper_, up, *copy_fh);
  Forget(*upper_, up, 1);
  if (lo) Forget(*lower(), lo, 1);
}

int OverlayLayer::Lookup(const VfsRequest& req, uint64_t parent, const std::string& name, fuse_entry_param& e) {
  ONode p;
  if (!Get(parent, &p)) return ESTALE;
  if (Reserved(name)) return ENOENT;
  uint64_t up = 0, lo = 0;
  struct stat ust {}, lst {};
  bool opaque = false;
  if (p.upper) {
    VfsRequest s = Own(req, VfsOp::kLookup, p.upper);
    s.name = name;
    const int err = upper_->Serve(s);
    if (err == 0) {
      if (IsWhiteout(s.entry.attr)) {
        Forget(*upper_, s.entry.ino, 1);
        return ENOENT;
      }
      up = s.entry.ino;
      ust = s.entry.attr;
      opaque = S_ISDIR(ust.st_mode) && IsOpaque(req, up);
    } else if (err != ENOENT) {
      return err;
    }
  }
  if (p.lower && !p.opaque && !(up && (!S_ISDIR(ust.st_mode) || opaque))) {
    VfsRequest s = Own(req, VfsOp::kLookup, p.lower);
    s.name = name;
    const int err = lower()->Serve(s);
    if (err == 0) {
      if (up && !S_ISDIR(s.entry.attr.st_mode)) {
        Forget(*lower(), s.entry.ino, 1);  // an upper directory hides a lower file
      } else {
        lo = s.entry.ino;
        lst = s.entry.attr;
      }
    } else if (err != ENOENT && !up) {
      return err;
    }
  }
  if (!up && !lo) return ENOENT;
  const struct stat& st = up ? ust : lst;
  const uint64_t id = Register(parent, name, up, lo, S_ISDIR(st.st_mode), opaque);
  e = fuse_entry_param{};
  e.ino = id;
  e.generation = GenerationOf(id);
  e.attr = st;
  e.attr_timeout = e.entry_timeout = req.timeout;
  if (S_ISDIR(st.st_mode) && lo) {  // merged: the lower number (StableIno)
    std::lock_guard lock(mu_);
    if (ONode& n = nodes_[IndexOf(id)]; n.lower) n.lower_ino = e.attr.st_ino = lst.st_ino;
  }
  return 0;
}

void OverlayLayer::StableIno(uint64_t id, struct stat& attr) const {
  if (!S_ISDIR(attr.st_mode)) return;
  std::lock_guard lock(mu_);
  const uint32_t index = IndexOf(id);
  if (index >= nodes_.size() || !nodes_[index].in_use || nodes_[index].generation != GenerationOf(id)) return;
  if (nodes_[index].lower_ino != 0) attr.st_ino = nodes_[index].lower_ino;
}

bool OverlayLayer::InLower(const VfsRequest& req, const ONode& parent, const std::string& name) {
  if (parent.lower == 0 || parent.opaque) return false;
  VfsRequest s = Own(req, VfsOp::kLookup, parent.lower);
  s.name = name;
  if (lower()->Serve(s) != 0) return false;
  Forget(*lower(), s.entry.ino, 1);
  return true;
}

bool OverlayLayer::WhitedOut(const VfsRequest& req, uint64_t upper_parent, const std::string& name) {
  VfsRequest s = Own(req, VfsOp::kLookup, upper_parent);
  s.name = name;
  if (upper_->Serve(s) != 0) return false;
  Forget(*upper_, s.entry.ino, 1);
  return IsWhiteout(s.entry.attr);
}

int OverlayLayer::RemoveWhiteout(const VfsRequest& req, uint64_t upper_parent, const std::string& name) {
  return WhitedOut(req, upper_parent, name) ? RemoveUpper(req, upper_parent, name) : 0;
}

int OverlayLayer::RemoveUpper(const VfsRequest& req, uint64_t upper_dir, const std::string& name, VfsOp op) {
  VfsRequest u = Own(req, op, upper_dir);
  u.name = name;
  return upper_->Serve(u);
}

// Empties `upper_dir`, the upper copy of a directory the merged view shows empty: it
// holds whiteouts, and maybe directories of the overlay's own (Reserved) that a killed
// server left half removed, which go with what they hold. With `all`, every directory
// in it goes with what it holds (one of the overlay's own).
void OverlayLayer::ClearUpperDir(const VfsRequest& req, uint64_t upper_dir, bool all) {
  std::vector<std::string> names;
  ForEachEntry(*upper_, req, upper_dir, [&](const std::string& name, uint32_t, uint64_t) { names.push_back(name); });
  for (const auto& name : names) {
    if (all || Reserved(name)) {
      RemoveOwn(req, upper_dir, name);
    } else {
      RemoveUpper(req, upper_dir, name);
    }
  }
}

void OverlayLayer::RemoveOwn(const VfsRequest& req, uint64_t upper_dir, const std::string& name) {
  if (RemoveUpper(req, upper_dir, name) != EISDIR) return;
  VfsRequest s = Own(req, VfsOp::kLookup, upper_dir);
  s.name = name;
  if (upper_->Serve(s) != 0) return;
  ClearUpperDir(req, s.entry.ino, /*all=*/true);
  Forget(*upper_, s.entry.ino, 1);
  RemoveUpper(req, upper_dir, name, VfsOp::kRmDir);
}

// A whiteout `name` in `upper_parent`. As on overlayfs, it is a hard link to one
// whiteout the overlay keeps in the upper root under a name of its own: a link costs
// a directory entry where a new device costs an inode (on this machine's ext4, about
// 300 µs a device against 10 µs a link: rm -r of a lower tree spent most of its time
// there). One that has all the links it can have (EMLINK) or is gone is replaced.
// Where a link fails and a device can be made, the upper file system takes no such
// links: from then on each whiteout is a device.
int OverlayLayer::Whiteout(const VfsRequest& req, uint64_t upper_parent, const std::string& name) {
  for (int tries = 0; tries < 2; ++tries) {
    const uint64_t shared = SharedWhiteout(req);
    if (shared == 0) break;
    VfsRequest l = Own(req, VfsOp::kLink, shared);
    l.node2 = upper_parent;
    l.name2 = name;
    const int err = upper_->Serve(l);
    if (err == 0) {
      Forget(*upper_, l.entry.ino, 1);
      return 0;
    }
    VfsRequest g = Own(req, VfsOp::kGetAttr, shared);
    if (err == EMLINK || upper_->Serve(g) != 0 || g.out_attr.st_nlink == 0) {  // used up, or gone
      RetireSharedWhiteout(req, shared, false);
      continue;
    }
    // The name's error or the disk's (EEXIST, ENOSPC), which a device gets too; or
    // links refused.
    const int made = MakeWhiteout(req, upper_parent, name);
    if (made == 0) RetireSharedWhiteout(req, shared, true);
    return made;
  }
  return MakeWhiteout(req, upper_parent, name);
}

int OverlayLayer::MakeWhiteout(const VfsRequest& req, uint64_t upper_parent, const std::string& name, uint64_t* made) {
  VfsRequest w = Own(req, VfsOp::kMkNod, upper_parent);
  w.name = name;
  w.mode = S_IFCHR;
  w.rdev = 0;
  const int err = upper_->Serve(w);
  if (err == 0 && made != nullptr) {
    *made = w.entry.ino;
  } else if (err == 0) {
    Forget(*upper_, w.entry.ino, 1);
  }
  return err;
}

// The whiteout to link (Whiteout), made at first need; 0 if there is none to be had.
uint64_t OverlayLayer::SharedWhiteout(const VfsRequest& req) {
  std::lock_guard lock(whiteout_mu_);
  if (shared_whiteout_ != 0 || no_shared_whiteout_) return shared_whiteout_;
  std::string name;
  auto make = [&](const std::string& work) { return MakeWhiteout(req, kRootNode, work, &shared_whiteout_); };
  if (UnderWorkName(&name, make) == 0) shared_whiteout_name_ = name;
  return shared_whiteout_;
}

// The shared whiteout `shared` failed a link: it is dropped, and the next whiteout
// makes a new one, unless links to it do not work here (`for_good`).
void OverlayLayer::RetireSharedWhiteout(const VfsRequest& req, uint64_t shared, bool for_good) {
  std::lock_guard lock(whiteout_mu_);
  if (shared_whiteout_ == shared) {
    RemoveUpper(req, kRootNode, shared_whiteout_name_);
    Forget(*upper_, std::exchange(shared_whiteout_, 0), 1);
  }
  if (for_good && !no_shared_whiteout_) {
    no_shared_whiteout_ = true;
    Logger("vfs")->info("overlay: the upper file system takes no links to a whiteout; each is made anew");
  }
}

int OverlayLayer::CopyFile(const VfsRequest& req, uint64_t lower_node, uint64_t upper_parent, const std::string& name,
                           const struct stat& st, uint64_t* made, std::optional<uint64_t>* keep_fh) {
  VfsRequest c = Own(req, VfsOp::kCreate, upper_parent);
  c.name = name;
  c.mode = st.st_mode & 07777;
  c.flags = name.empty() ? O_WRONLY | O_TMPFILE : O_WRONLY | O_CREAT | O_EXCL;  // none: a file of no name
  if (int err = upper_->Serve(c)) return err;
  *made = c.entry.ino;
  VfsRequest o = Own(req, VfsOp::kOpen, lower_node);
  o.flags = O_RDONLY;
  const int opened = lower()->Serve(o);
  int err = opened;
  for (int64_t offset = 0; err == 0;) {
    VfsRequest r = Own(req, VfsOp::kRead, lower_node);
    r.fh = o.open.fh;
    r.size = 128 << 10;
    r.offset = offset;
    if ((err = lower()->Serve(r)) != 0 || r.out.empty()) break;
    VfsRequest w = Own(req, VfsOp::kWrite, *made);
    w.fh = c.open.fh;
    w.in = {r.out.data(), r.out.size()};
    w.offset = offset;
    if ((err = upper_->Serve(w)) != 0) break;
    offset += static_cast<int64_t>(r.out.size());
  }
  if (opened == 0) Release(*lower(), lower_node, o.open.fh);
  if (err == 0 && keep_fh != nullptr) {
    *keep_fh = c.open.fh;
  } else {
    Release(*upper_, *made, c.open.fh);
  }
  if (err != 0) {  // leave nothing behind: a file of no name goes with its node
    if (!name.empty()) RemoveUpper(req, upper_parent, name);
    Forget(*upper_, std::exchange(*made, 0), 1);
  }
  return err;
}

void OverlayLayer::CopyXattrs(const VfsRequest& req, uint64_t id, uint64_t lower_node, uint64_t made) {
  VfsRequest list = Own(req, VfsOp::kListXattr, lower_node);
  list.size = 1 << 16;
  if (lower()->Serve(list) != 0) return;  // none, or a layer without them
  for (size_t at = 0; at < list.out.size();) {
    const std::string name(list.out.data() + at, strnlen(list.out.data() + at, list.out.size() - at));
    at += name.size() + 1;
    if (name.empty() || name == kOpaque) continue;
    VfsRequest get = Own(req, VfsOp::kGetXattr, lower_node);
    get.name = name;
    get.size = 1 << 16;
    if (lower()->Serve(get) != 0) continue;  // removed meanwhile
    VfsRequest set = Own(req, VfsOp::kSetXattr, made);
    set.name = name;
    set.in = {get.out.data(), get.out.size()};
    // One the upper file system refuses is said, not fatal: the copy's data is right,
    // and failing now would leave the half-made copy in the way of the next try.
    if (int err = upper_->Serve(set); err != 0)
      Logger("vfs")->warn("overlay: copying up {}: extended attribute {} not copied: {}", PathOf(id), name,
                          std::strerror(err));
  }
}

int OverlayLayer::CopyUp(VfsRequest& req, uint64_t id, uint64_t* upper) {
  std::lock_guard copying(copy_mu_);
  ONode n;
  if (!Get(id, &n)) return ESTALE;
  if (n.upper) {
    *upper = n.upper;
    return 0;
  }
  // The copy takes disk space for the caller, so only what the caller could take
  // (not the blocks ext4 keeps back for root): made as root otherwise (Own), and
  // given the lower file's owner afterwards all the same.
  const AsWriter as_caller(req.ctx.uid, AsWriter::Kind::kFiles);
  // A lower file no name leads to any more (removed or replaced while a program holds
  // it open; or adopted so after a restart): copied up as a file of no name (an
  // O_TMPFILE in the upper root), so that it changes as an unlinked file on ext4 does
  // and the name stays removed. Only a regular file is opened so.
  const bool unnamed = n.name.empty();
  uint64_t parent_upper = 0;
  if (int err = CopyUp(req, unnamed ? kRootNode : n.parent, &parent_upper)) return err;
  VfsRequest g = Own(req, VfsOp::kGetAttr, n.lower);
  if (int err = lower()->Serve(g)) return err;
  const struct stat st = g.out_attr;
  if (unnamed && !S_ISREG(st.st_mode)) return ENOENT;
  if (int err = unnamed ? 0 : RemoveWhiteout(req, parent_upper, n.name)) return err;
  uint64_t made = 0;
  std::optional<uint64_t> copy_fh;  // a copy of no name's handle, kept for its descriptor
  int err = 0;
  bool link = false;  // the copy is made with no name and linked under it once whole
  if (S_ISREG(st.st_mode)) {
    // A named file too is copied as a file of no name, given its owner, mode, times
    // and extended attributes, and only then linked in: a copy that fails (a full
    // disk) or a server killed while it copies leaves no half-made file to hide the
    // lower one. An upper file system without O_TMPFILE gets the copy under its name
    // at once (removed again if the copy fails; not so after a kill).
    err = CopyFile(req, n.lower, parent_upper, "", st, &made, unnamed ? &copy_fh : nullptr);
    if (!unnamed && err == EOPNOTSUPP) {
      err = CopyFile(req, n.lower, parent_upper, n.name, st, &made);
    } else {
      link = !unnamed && err == 0;
    }
  } else {
    VfsRequest m = Own(req, VfsOp::kMkNod, parent_upper);
    m.name = n.name;
    m.mode = st.st_mode;
    m.rdev = st.st_rdev;
    if (S_ISDIR(st.st_mode)) {
      m.op = VfsOp::kMkDir;
      m.mode = st.st_mode & 07777;
    } else if (S_ISLNK(st.st_mode)) {
      VfsRequest l = Own(req, VfsOp::kReadLink, n.lower);
      if ((err = lower()->Serve(l)) != 0) return err;
      m.op = VfsOp::kSymlink;
      m.name2.assign(l.out.begin(), l.out.end());
    }
    err = upper_->Serve(m);
    made = m.entry.ino;
  }
  if (err) return err;
  // Owner, mode (set-ID bits included) and times, as below; then the extended
  // attributes (a chown would clear file capabilities set before it).
  VfsRequest a = Own(req, VfsOp::kSetAttr, made);
  a.attr = st;
  a.flags = FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID | FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME;
  if (!S_ISLNK(st.st_mode)) a.flags |= FUSE_SET_ATTR_MODE;
  if (S_ISLNK(st.st_mode)) a.flags &= ~(FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME);
  upper_->Serve(a);
  CopyXattrs(req, id, n.lower, made);
  if (link) {
    VfsRequest l = Own(req, VfsOp::kLink, made);
    l.node2 = parent_upper;
    l.name2 = n.name;
    err = upper_->Serve(l);
    Forget(*upper_, made, 1);  // the name's entry holds the copy now, or nothing does
    if (err) return err;
    made = l.entry.ino;
  }
  {
    std::lock_guard lock(mu_);
    ONode& node = nodes_[IndexOf(id)];
    if (node.in_use && node.generation == GenerationOf(id)) {
      node.upper = made;
      node.copy_fh = std::exchange(copy_fh, std::nullopt);
      by_key_["U" + std::to_string(made)] = IndexOf(id);
    }
  }
  if (copy_fh) Release(*upper_, made, *copy_fh);
  // Its inode number and ctime are the copy's now, and its directory has a new entry.
  for (uint64_t changed : {n.parent, id})
    if ((!unnamed || changed == id) && std::ranges::find(req.changed, changed) == req.changed.end())
      req.changed.push_back(changed);
  *upper = made;
  return 0;
}

int OverlayLayer::List(const VfsRequest& req, const ONode& dir, DirList& out) {
  constexpr size_t kWhiteout = SIZE_MAX;
  std::map<std::string, size_t> seen;  // each upper name: its entry in `out`, or kWhiteout
  if (dir.upper) {
    std::vector<std::string> left;  // by a killed server
    int err = ForEachEntry(*upper_, req, dir.upper, [&](const std::string& name, uint32_t type, uint64_t ino) {
      if (Reserved(name)) {
        if (LeftByTheDead(name)) left.push_back(name);
        return;
      }
      if (type == DT_CHR) {  // maybe a whiteout
        VfsRequest s = Own(req, VfsOp::kLookup, dir.upper);
        s.name = name;
        if (upper_->Serve(s) == 0) {
          Forget(*upper_, s.entry.ino, 1);
          if (IsWhiteout(s.entry.attr)) {
            seen.emplace(name, kWhiteout);
            return;
          }
        }
      }
      seen.emplace(name, out.entries.size());
      out.entries.push_back({name, type, ino});
    });
    if (err) return err;
    // Hidden, they only took room until now (their directory's removal took them too).
    for (const auto& name : left) RemoveOwn(req, dir.upper, name);
  }
  if (dir.lower && !dir.opaque) {
    int err = ForEachEntry(*lower(), req, dir.lower, [&](const std::string& name, uint32_t type, uint64_t ino) {
      const auto it = seen.find(name);
      if (it == seen.end()) {
        if (!Reserved(name)) out.entries.push_back({name, type, ino});
        return;
      }
      if (type == DT_DIR && it->second != kWhiteout && out.entries[it->second].type == DT_DIR)
        out.entries[it->second].lower_ino = ino;
    });
    if (err) return err;
  }
  return 0;
}

bool OverlayLayer::IsOpaque(const VfsRequest& req, uint64_t upper_dir) {
  VfsRequest x = Own(req, VfsOp::kGetXattr, upper_dir);
  x.name = kOpaque;
  return upper_->Serve(x) == 0;
}

int OverlayLayer::Make(VfsRequest& req) {
  ONode p;
  if (!Get(req.node, &p)) return ESTALE;
  // An O_TMPFILE file is made in the upper copy of the directory too; it has no name
  // that could exist already, be below or be whited out.
  const bool unnamed = IsTmpfile(req);
  fuse_entry_param existing;
  if (!unnamed && Lookup(req, req.node, req.name, existing) == 0) {
    Drop(existing.ino, 1);
    return EEXIST;
  }
  uint64_t pu = 0;
  if (int err = CopyUp(req, req.node, &pu)) return err;
  Get(req.node, &p);
  // A directory made where a lower one is (removed: the lookup found none) hides its
  // entries (opaque). Anything else made where a whiteout is takes its place in one
  // step; a directory there with nothing below (a lower entry gone since) replaces it
  // in two, which bring nothing back.
  const bool dir = req.op == VfsOp::kMkDir;
  const bool opaque = dir && InLower(req, p, req.name);
  VfsRequest s = req;
  s.node = pu;
  if (opaque) {
    if (int err = MakeOpaqueDir(req, pu, s)) return err;
  } else if (!dir && !unnamed && WhitedOut(req, pu, req.name)) {
    if (int err = MakeOverWhiteout(req, pu, s)) return err;
  } else {
    if (int err = dir ? RemoveWhiteout(req, pu, req.name) : 0) return err;
    if (int err = upper_->Serve(s)) return err;
  }
  TakeResults(req, s);
  const uint64_t id = Register(req.node, req.name, s.entry.ino, 0, S_ISDIR(s.entry.attr.st_mode), opaque);
  req.entry.ino = id;
  req.entry.generation = GenerationOf(id);
  if (req.op == VfsOp::kCreate) req.open.fh = (s.open.fh << 1) | 1;
  return 0;
}

// A directory made over a removed lower one (req.name in upper_parent, a whiteout
// there) hides the lower entries (opaque): `s`, the mkdir for the upper layer, makes it
// under a name of its own; it is marked, then swapped with the whiteout. So no moment,
// and no kill of the server, shows the lower entries there, and a directory that
// cannot be marked is not made.
int OverlayLayer::MakeOpaqueDir(const VfsRequest& req, uint64_t upper_parent, VfsRequest& s) {
  int err = UnderWorkName(&s.name, [&](const std::string&) { return upper_->Serve(s); });
  if (err) return err;
  VfsRequest x = Own(req, VfsOp::kSetXattr, s.entry.ino);
  x.name = kOpaque;
  x.in = {"y", 1};
  if ((err = upper_->Serve(x)) == 0) {
    VfsRequest r = Own(req, VfsOp::kRename, upper_parent);
    r.name = s.name;
    r.node2 = upper_parent;
    r.name2 = req.name;
    r.flags = RENAME_EXCHANGE;
    if ((err = upper_->Serve(r)) == 0) {
      RemoveUpper(req, upper_parent, s.name);  // the whiteout
    } else if (err == EINVAL || err == ENOENT) {  // no RENAME_EXCHANGE here, or no whiteout: two steps
      r.flags = 0;
      if ((err = RemoveWhiteout(req, upper_parent, req.name)) == 0) err = upper_->Serve(r);
    }
  }
  if (err) {
    Forget(*upper_, s.entry.ino, 1);
    RemoveUpper(req, upper_parent, s.name, VfsOp::kRmDir);
  }
  return err;
}

// A file made where a removed lower file's whiteout is (req.name in upper_parent): `s`,
// the create, mknod, symlink or link for the upper layer, makes it under a name of its
// own, and it is renamed over the whiteout. So no moment, and no kill of the server,
// shows the lower file there again, and a file that cannot be made (no room) leaves the
// name removed. (Once the whiteout was removed first, and a create that then failed
// showed the removed lower file again.)
int OverlayLayer::MakeOverWhiteout(const VfsRequest& req, uint64_t upper_parent, VfsRequest& s) {
  std::string& name = s.op == VfsOp::kLink ? s.name2 : s.name;
  int err = UnderWorkName(&name, [&](const std::string&) { return upper_->Serve(s); });
  if (err) return err;
  VfsRequest r = Own(req, VfsOp::kRename, upper_parent);
  r.name = name;
  r.node2 = upper_parent;
  r.name2 = s.op == VfsOp::kLink ? req.name2 : req.name;
  if ((err = upper_->Serve(r)) != 0) {
    if (s.op == VfsOp::kCreate) Release(*upper_, s.entry.ino, s.open.fh);
    Forget(*upper_, s.entry.ino, 1);
    RemoveUpper(req, upper_parent, name);
    return err;
  }
  name = r.name2;
  return 0;
}

// A lower file's node whose name was removed, or taken by a rename, while the kernel
// may hold it (a program's open file): it keeps no name, so a change copies it up as
// a file of no name (CopyUp) instead of bringing the name back.
void OverlayLayer::Unname(uint64_t id) {
  std::lock_guard lock(mu_);
  const uint32_t index = IndexOf(id);
  if (index >= nodes_.size() || !nodes_[index].in_use || nodes_[index].generation != GenerationOf(id)) return;
  ONode& n = nodes_[index];
  if (auto it = by_key_.find(n.lower_key); !n.lower_key.empty() && it != by_key_.end() && it->second == index)
    by_key_.erase(it);
  n.lower_key.clear();
  n.name.clear();
}

// The node of an open file no name leads to any more (unlinked, replaced by a rename,
// or whited out, in a server that died), given by its descriptor and the tag its lend
// answered: the side it is on makes it a node again. A lower file adopted has no name:
// it reads, and a change copies it up as a file of no name (CopyUp).
int OverlayLayer::Adopt(VfsRequest& req) {
  const bool lower_file = (req.fh & 1) != 0;
  Layer& side = lower_file ? *lower() : *upper_;
  VfsRequest s = req;
  s.fh = req.fh >> 1;
  if (int err = side.Serve(s)) return err;
  if (S_ISDIR(s.entry.attr.st_mode)) {
    Forget(side, s.entry.ino, 1);
    return EINVAL;
  }
  uint64_t parent = kRootNode;
  std::string name;  // none, unless the upper layer knows the file by a name this layer gave it too
  if (!lower_file) {
    std::lock_guard lock(mu_);
    if (auto it = by_key_.find("U" + std::to_string(s.entry.ino)); it != by_key_.end()) {
      parent = nodes_[it->second].parent;
      name = nodes_[it->second].name;
    }
  }
  TakeResults(req, s);
  const uint64_t id = lower_file ? Register(parent, name, 0, s.entry.ino, false, false)
                                 : Register(parent, name, s.entry.ino, 0, false, false);
  req.entry.ino = id;
  req.entry.generation = GenerationOf(id);
  return 0;
}

int OverlayLayer::Remove(VfsRequest& req) {
  fuse_entry_param e;
  if (int err = Lookup(req, req.node, req.name, e)) return err;
  ONode c;
  Get(e.ino, &c);
  Drop(e.ino, 1);
  const bool rmdir = req.op == VfsOp::kRmDir;
  if (rmdir && !c.dir) return ENOTDIR;
  if (!rmdir && c.dir) return EISDIR;
  if (rmdir) {
    DirList l;
    if (int err = List(req, c, l)) return err;
    if (!l.entries.empty()) return ENOTEMPTY;
  }
  uint64_t pu = 0;
  if (int err = CopyUp(req, req.node, &pu)) return err;
  ONode p;
  Get(req.node, &p);
  const bool below = c.lower != 0 || InLower(req, p, req.name);  // (an upper file hides what is below it)
  if (c.upper) {
    if (below) return ReplaceByWhiteout(req, pu, req.name, rmdir ? c.upper : 0);
    if (rmdir) ClearUpperDir(req, c.upper);  // whiteouts, or what a killed server left
    VfsRequest s = req;
    s.node = pu;
    if (int err = upper_->Serve(s)) return err;
  }
  if (int err = below ? Whiteout(req, pu, req.name) : 0) return err;
  if (!c.dir && !c.upper) Unname(e.ino);
  return 0;
}

// The upper file `name` in `upper_parent`, which hides a lower one, becomes a whiteout
// in one step: one made under a name of its own is renamed over it, or, for a
// directory (`dir`, its upper node; the merged view shows it empty), swapped with it,
// and the directory is emptied and removed under that name. So no moment, and no kill
// of the server, shows the lower file or directory there again, and a whiteout that
// cannot be made (no inode left) leaves the name as it was.
int OverlayLayer::ReplaceByWhiteout(const VfsRequest& req, uint64_t upper_parent, const std::string& name,
                                    uint64_t dir) {
  std::string made;
  int err = UnderWorkName(&made, [&](const std::string& work) { return Whiteout(req, upper_parent, work); });
  if (err) return err;
  VfsRequest r = Own(req, VfsOp::kRename, upper_parent);
  r.name = made;
  r.node2 = upper_parent;
  r.name2 = name;
  r.flags = dir ? RENAME_EXCHANGE : 0;
  if ((err = upper_->Serve(r)) != 0) {
    RemoveUpper(req, upper_parent, made);
    if (!dir || err != EINVAL) return err;
    // No RENAME_EXCHANGE on this file system: removed, then whited out (a server
    // killed between the two shows the lower directory again).
    ClearUpperDir(req, dir);
    if ((err = RemoveUpper(req, upper_parent, name, VfsOp::kRmDir)) != 0) return err;
    return Whiteout(req, upper_parent, name);
  }
  if (dir) {
    ClearUpperDir(req, dir);
    if (int rerr = RemoveUpper(req, upper_parent, made, VfsOp::kRmDir))  // hidden; goes with its directory
      Logger("vfs")->warn("overlay: removed {} but not its upper copy, now {}: {}", name, made, std::strerror(rerr));
  }
  return 0;
}

// Marks the upper directory `upper_dir` (overlay node `id`) opaque: the lower
// directory of the same name stays hidden behind it.
int OverlayLayer::MarkOpaque(const VfsRequest& req, uint64_t id, uint64_t upper_dir) {
  VfsRequest x = Own(req, VfsOp::kSetXattr, upper_dir);
  x.name = kOpaque;
  x.in = {"y", 1};
  if (int err = upper_->Serve(x)) return err;
  std::lock_guard lock(mu_);
  const uint32_t index = IndexOf(id);
  if (index < nodes_.size() && nodes_[index].in_use && nodes_[index].generation == GenerationOf(id)) {
    nodes_[index].opaque = true;  // its `lower`, if any, is still held and dropped with it
  }
  return 0;
}

// RENAME_EXCHANGE: both names exist and swap. Each side is copied up; a directory
// with lower entries cannot move (EXDEV, as for a plain rename). A directory that
// lands on a name with a lower entry hides it (opaque; marked before the swap).
int OverlayLayer::Exchange(VfsRequest& req) {
  fuse_entry_param a, b;
  if (int err = Lookup(req, req.node, req.name, a)) return err;
  if (int err = Lookup(req, req.node2, req.name2, b)) {
    Drop(a.ino, 1);
    return err;
  }
  ONode na, nb;
  Get(a.ino, &na);
  Get(b.ino, &nb);
  int err = 0;
  uint64_t au = 0, bu = 0, pu = 0, pu2 = 0;
  if ((na.dir && na.lower) || (nb.dir && nb.lower)) {
    err = EXDEV;
  } else if ((err = CopyUp(req, a.ino, &au)) == 0 && (err = CopyUp(req, b.ino, &bu)) == 0 &&
             (err = CopyUp(req, req.node, &pu)) == 0 && (err = CopyUp(req, req.node2, &pu2)) == 0) {
    ONode p, p2;
    Get(req.node, &p);
    Get(req.node2, &p2);
    if (na.dir && InLower(req, p2, req.name2)) err = MarkOpaque(req, a.ino, au);
    if (err == 0 && nb.dir && InLower(req, p, req.name)) err = MarkOpaque(req, b.ino, bu);
    VfsRequest s = req;
    s.node = pu;
    s.node2 = pu2;
    if (err == 0) err = upper_->Serve(s);
  }
  if (err == 0) {
    std::lock_guard lock(mu_);
    for (auto [id, parent, name] : {std::tuple{a.ino, req.node2, &req.name2}, std::tuple{b.ino, req.node, &req.name}}) {
      const uint32_t index = IndexOf(id);
      if (index < nodes_.size() && nodes_[index].in_use && nodes_[index].generation == GenerationOf(id)) {
        nodes_[index].parent = parent;
        nodes_[index].name = *name;
      }
    }
  }
  Drop(a.ino, 1);
  Drop(b.ino, 1);
  return err;
}

int OverlayLayer::Rename(VfsRequest& req) {
  // As overlayfs: a program's RENAME_WHITEOUT would leave this layer's own marker.
  if (static_cast<unsigned>(req.flags) & ~static_cast<unsigned>(RENAME_NOREPLACE | RENAME_EXCHANGE)) return EINVAL;
  if (req.flags & RENAME_EXCHANGE) return Exchange(req);
  fuse_entry_param e;
  if (int err = Lookup(req, req.node, req.name, e)) return err;
  ONode c;
  Get(e.ino, &c);
  Drop(e.ino, 1);
  if (c.dir && c.lower) return EXDEV;  // as overlayfs without redirect_dir
  fuse_entry_param t;
  uint64_t replaced_lower = 0;  // a lower file the rename takes its name from
  const bool target_shown = Lookup(req, req.node2, req.name2, t) == 0;
  if (target_shown) {
    ONode target;
    Get(t.ino, &target);
    Drop(t.ino, 1);
    if (req.flags & RENAME_NOREPLACE) return EEXIST;
    if (c.dir && !target.dir) return ENOTDIR;
    if (!c.dir && target.dir) return EISDIR;
    if (target.dir) {
      DirList l;
      if (int err = List(req, target, l)) return err;
      if (!l.entries.empty()) return ENOTEMPTY;
      // An emptied merged directory is marked opaque, then rid of its whiteouts, and
      // so stays empty whatever happens after: the rename replaces it in one step or
      // fails (no room) with it as it was. (Once its whiteouts were removed first, and
      // a rename that then failed, or a kill, showed its lower entries again.)
      if (target.lower && target.upper && !target.opaque)
        if (int err = MarkOpaque(req, t.ino, target.upper)) return err;
      if (target.upper) ClearUpperDir(req, target.upper);
    }
    if (!target.dir && !target.upper && t.ino != e.ino) replaced_lower = t.ino;  // (a name onto itself: nothing)
  }
  uint64_t cu = 0, pu = 0, pu2 = 0;
  if (int err = CopyUp(req, e.ino, &cu)) {
    if (err != ESTALE) return err;
  }
  if (int err = CopyUp(req, req.node, &pu)) return err;
  if (int err = CopyUp(req, req.node2, &pu2)) return err;
  ONode p, p2;
  Get(req.node, &p);
  Get(req.node2, &p2);
  const bool below = c.lower != 0 || InLower(req, p, req.name);
  // A directory that takes the name of a lower entry (shown, or removed and whited
  // out) hides it: marked opaque before it moves, so one that cannot be marked does
  // not move. (Once it was marked only when it replaced a lower directory shown, and
  // one moved over a whiteout showed the removed entries from the next mount on.)
  if (c.dir && InLower(req, p2, req.name2))
    if (int err = MarkOpaque(req, e.ino, cu)) return err;
  VfsRequest s = req;
  s.node = pu;
  s.node2 = pu2;
  // A name with a lower file below it is whited out by the rename itself
  // (RENAME_WHITEOUT), so no moment, and no kill of the server, shows the lower file
  // there again, and a whiteout that cannot be made (no inode left) fails the rename
  // before anything moved. An upper file system without it (EINVAL) gets the rename,
  // then the whiteout.
  auto rename = [&] {
    s.flags = (req.flags & RENAME_NOREPLACE) | (below ? RENAME_WHITEOUT : 0);
    int err = upper_->Serve(s);
    if (below && err == EINVAL) {
      s.flags = req.flags & RENAME_NOREPLACE;
      return std::pair{upper_->Serve(s), false};
    }
    return std::pair{err, below && err == 0};
  };
  int err = 0;
  bool whited = false;
  // A name no layer shows, where the old name needs a whiteout, gets one first (a
  // whiteout of nothing, which hides nothing): swapped with it below, the rename leaves
  // it at the old name in the same step, as a link to the shared whiteout, where
  // RENAME_WHITEOUT makes an inode (about 300 µs on this machine's ext4, most of a
  // rename's own time). One that cannot be made leaves it to RENAME_WHITEOUT.
  const bool whited_out2 = !target_shown && WhitedOut(req, pu2, req.name2);  // (a name shown is no whiteout)
  const bool made2 = !whited_out2 && below && !target_shown && Whiteout(req, pu2, req.name2) == 0;
  if ((whited_out2 || made2) && (c.dir || (req.flags & RENAME_NOREPLACE) || below)) {
    // Onto a whiteout, which a directory cannot replace and RENAME_NOREPLACE refuses:
    // swapped with it, in one step as a file's rename over it is. The whiteout, now at
    // the old name, stays if a lower entry is below it.
    s.flags = RENAME_EXCHANGE;
    if ((err = upper_->Serve(s)) == 0) {
      whited = below;
      if (!below)
        if (int rerr = RemoveUpper(req, pu, req.name))  // a whiteout of nothing: hides nothing
          Logger("vfs")->warn("overlay: renamed {} but left a whiteout in its place: {}", PathOf(e.ino),
                              std::strerror(rerr));
    } else if (made2 || err == EINVAL) {  // (EINVAL: no RENAME_EXCHANGE here) the whiteout removed, then the rename
      if ((err = RemoveUpper(req, pu2, req.name2)) == 0) {
        std::tie(err, whited) = rename();
        if (err && whited_out2 && Whiteout(req, pu2, req.name2) != 0)
          Logger("vfs")->error("overlay: a rename onto {} failed and the lower file shows there again",
                               req.name2);
      }
    }
  } else {
    std::tie(err, whited) = rename();
  }
  if (err) return err;
  if (below && !whited) {
    if (int werr = Whiteout(req, pu, req.name))
      Logger("vfs")->error("overlay: renamed {} but could not white it out ({}): the lower file shows there again",
                           PathOf(e.ino), std::strerror(werr));
  }
  {
    std::lock_guard lock(mu_);
    const uint32_t index = IndexOf(e.ino);
    if (index < nodes_.size() && nodes_[index].in_use && nodes_[index].generation == GenerationOf(e.ino)) {
      nodes_[index].parent = req.node2;
      nodes_[index].name = req.name2;
    }
  }
  if (replaced_lower != 0) Unname(replaced_lower);
  return 0;
}

int OverlayLayer::Open(VfsRequest& req) {
  ONode n;
  if (!Get(req.node, &n)) return ESTALE;
  const bool writes = (req.flags & O_ACCMODE) != O_RDONLY || (req.flags & O_TRUNC);
  uint64_t up = n.upper;
  if (writes && (up == 0)) {
    if (int err = CopyUp(req, req.node, &up)) return err;
  }
  VfsRequest s = req;
  s.node = up ? up : n.lower;
  Layer& layer = up ? *upper_ : *lower();
  if (int err = layer.Serve(s)) return err;
  TakeResults(req, s);
  req.open.fh = (s.open.fh << 1) | (up ? 1 : 0);
  if (writes) GiveCopy(req);
  return 0;
}

// After a change to a file of no name copied up (CopyUp), the reply says which file
// now holds it: the copy's descriptor, lent by the upper layer (VfsRequest::copy_fd).
// After each change, not only the one that copied: a first that failed once copied
// said nothing.
void OverlayLayer::GiveCopy(VfsRequest& req) {
  ONode n;
  if (!Get(req.node, &n) || !n.copy_fh) return;
  VfsRequest l = Own(req, VfsOp::kLend, n.upper);
  l.fh = *n.copy_fh;
  if (upper_->Serve(l) != 0 || l.open.backing_fd < 0) return;
  req.copy_fd = l.open.backing_fd;
  req.copy_tag = l.open.fh << 1;  // the upper side (kLend)
}

int OverlayLayer::WithHandle(VfsRequest& req) {
  ONode n;
  if (!Get(req.node, &n)) return ESTALE;
  const bool up = (req.fh & 1) != 0;
  if (up ? n.upper == 0 : n.lower == 0) return EBADF;
  VfsRequest s = req;
  s.fh = req.fh >> 1;
  s.node = up ? n.upper : n.lower;
  Layer& layer = up ? *upper_ : *lower();
  const int err = layer.Serve(s);
  if (err == 0) TakeResults(req, s);
  if (err == 0 && req.op == VfsOp::kGetAttr) StableIno(req.node, req.out_attr);
  return err;
}

int OverlayLayer::ReadDir(VfsRequest& req, bool plus) {
  DirList* list = nullptr;
  {
    std::lock_guard lock(mu_);
    if (req.fh == 0 || req.fh > dirs_.size() || !dirs_[req.fh - 1]) return EBADF;
    list = dirs_[req.fh - 1].get();  // kept until releasedir, after this request
  }
  // Listed when read from the start, not when opened: a directory opened, then changed,
  // then read (or rewound, as rewinddir(3) promises) shows what it holds now. The kernel
  // serialises the readdirs of one open directory, so the list can be replaced here.
  if (req.offset <= 0 || !list->listed) {
    ONode n;
    if (!Get(req.node, &n)) return ESTALE;
    DirList fresh;
    if (int err = List(req, n, fresh)) return err;
    list->entries = std::move(fresh.entries);
    list->listed = true;
  }
  uint64_t upper_dir = 0;  // the listed directory's upper copy
  if (ONode d; !plus && Get(req.node, &d)) upper_dir = d.upper;
  const size_t room = std::min<uint64_t>(req.size, 1u << 20);
  req.out.resize(room);
  size_t used = 0;
  // Offsets: 1 after ".", 2 after "..", 3 + i after entry i.
  req.dir_end = true;  // unless the room runs out
  for (int64_t i = std::max<int64_t>(req.offset, 0); i < static_cast<int64_t>(list->entries.size()) + 2; ++i) {
    const bool dots = i < 2;
    const DirEntry* entry = dots ? nullptr : &list->entries[static_cast<size_t>(i - 2)];
    const std::string name = dots ? (i == 0 ? "." : "..") : entry->name;
    if (!dots && req.admit && !req.admit(name)) continue;
    size_t size;
    if (plus) {
      fuse_entry_param e{};
      if (dots) {
        e.attr.st_mode = S_IFDIR;
        e.attr.st_ino = 1;  // as without plus: readdir(3) skips an entry whose inode is 0
      } else if (Lookup(req, req.node, name, e) != 0) {
        continue;  // gone since the listing
      }
      size = fuse_add_direntry_plus(nullptr, req.out.data() + used, room - used, name.c_str(), &e, i + 1);
      if (size > room - used && !dots) Drop(e.ino, 1);
    } else {
      struct stat st {};
      st.st_mode = dots ? S_IFDIR : entry->type << 12;
      st.st_ino = dots ? 1 : entry->ino;
      // A directory on both sides, merged (its upper copy not opaque), gives the lower
      // one's number, as a lookup of it does (StableIno; READDIRPLUS answers by lookups).
      if (!dots && entry->lower_ino != 0 && upper_dir != 0) {
        VfsRequest s = Own(req, VfsOp::kLookup, upper_dir);
        s.name = name;
        if (upper_->Serve(s) == 0) {
          if (!IsOpaque(req, s.entry.ino)) st.st_ino = entry->lower_ino;
          Forget(*upper_, s.entry.ino, 1);
        }
      }
      size = fuse_add_direntry(nullptr, req.out.data() + used, room - used, name.c_str(), &st, i + 1);
    }
    if (size > room - used) {
      req.dir_end = false;
      break;
    }
    used += size;
  }
  req.out.resize(used);
  return 0;
}

int OverlayLayer::Serve(VfsRequest& req) noexcept try {
  // A file read through a lower handle may be copied up and written through another:
  // the kernel could not keep both on one backing file, so the overlay serves data.
  req.kernel_io_ok = false;
  req.handleless_ok = false;  // a directory handle holds the merged listing
  ONode n;
  switch (req.op) {  // a name the overlay keeps for itself cannot be made
    case VfsOp::kMkNod:
    case VfsOp::kMkDir:
    case VfsOp::kSymlink:
    case VfsOp::kCreate:
      if (Reserved(req.name)) return EPERM;
      break;
    case VfsOp::kLink:
    case VfsOp::kRename:
      if (Reserved(req.name2)) return EPERM;
      break;
    default:
      break;
  }
  switch (req.op) {
    case VfsOp::kLookup:
      return Lookup(req, req.node, req.name, req.entry);
    case VfsOp::kForget:
      Drop(req.node, req.count);
      return 0;
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
      uint64_t up = 0, pu = 0;
      if (int err = CopyUp(req, req.node, &up)) return err;
      if (int err = CopyUp(req, req.node2, &pu)) return err;
      fuse_entry_param existing;
      if (Lookup(req, req.node2, req.name2, existing) == 0) {
        Drop(existing.ino, 1);
        return EEXIST;
      }
      VfsRequest s = req;
      s.node = up;
      s.node2 = pu;
      if (WhitedOut(req, pu, req.name2)) {
        if (int err = MakeOverWhiteout(req, pu, s)) return err;
      } else if (int err = upper_->Serve(s)) {
        return err;
      }
      TakeResults(req, s);
      const uint64_t id = Register(req.node2, req.name2, s.entry.ino, 0, false, false);
      req.entry.ino = id;
      req.entry.generation = GenerationOf(id);
      return 0;
    }
    case VfsOp::kOpen:
      return Open(req);
    case VfsOp::kGetAttr:
    case VfsOp::kReadLink:
    case VfsOp::kGetXattr:
    case VfsOp::kListXattr:
    case VfsOp::kAccess: {
      if (req.op == VfsOp::kGetAttr && req.has_fh) return WithHandle(req);
      if (!Get(req.node, &n)) return ESTALE;
      VfsRequest s = req;
      s.node = n.upper ? n.upper : n.lower;
      Layer& layer = n.upper ? *upper_ : *lower();
      if (req.op == VfsOp::kGetXattr && req.name == kOpaque) return ENODATA;
      const int err = layer.Serve(s);
      if (err == 0) TakeResults(req, s);
      if (err == 0 && req.op == VfsOp::kGetAttr) StableIno(req.node, req.out_attr);
      if (err == 0 && req.op == VfsOp::kListXattr && req.size > 0) {  // hide the overlay's own mark
        std::string list(req.out.begin(), req.out.end());
        const std::string mark = std::string(kOpaque) + '\0';
        if (auto at = list.find(mark); at != std::string::npos) list.erase(at, mark.size());
        req.out.assign(list.begin(), list.end());
      }
      return err;
    }
    case VfsOp::kSetAttr:
    case VfsOp::kSetXattr:
    case VfsOp::kRemoveXattr: {
      uint64_t up = 0;
      if (int err = CopyUp(req, req.node, &up)) return err;
      VfsRequest s = req;
      s.node = up;
      if (req.has_fh && (req.fh & 1)) {
        s.fh = req.fh >> 1;
      } else {
        s.has_fh = false;  // a lower handle: the change goes to the copy
      }
      const int err = upper_->Serve(s);
      if (err == 0) {
        TakeResults(req, s);
        if (req.op == VfsOp::kSetAttr) StableIno(req.node, req.out_attr);
        GiveCopy(req);
      }
      return err;
    }
    case VfsOp::kIoctl: {  // chattr sets the flags of the copy; lsattr reads them where the file is
      const bool sets = msgport::InodeFlagsIoctlOf(req.count).sets;
      VfsRequest s = req;
      Layer* layer = upper_.get();
      if (sets) {
        if (int err = CopyUp(req, req.node, &s.node)) return err;
      } else {
        if (!Get(req.node, &n)) return ESTALE;
        s.node = n.upper ? n.upper : n.lower;
        if (!n.upper) layer = lower();
      }
      const int err = layer->Serve(s);
      if (err == 0) {
        TakeResults(req, s);
        if (sets) GiveCopy(req);
      }
      return err;
    }
    case VfsOp::kRead:
    case VfsOp::kWrite:
    case VfsOp::kFlush:
    case VfsOp::kRelease:
    case VfsOp::kFsync:
    case VfsOp::kFallocate:
    case VfsOp::kLseek:
      return WithHandle(req);
    case VfsOp::kOpenDir: {
      if (!Get(req.node, &n)) return ESTALE;
      auto list = std::make_unique<DirList>();  // listed by the first readdir
      std::lock_guard lock(mu_);
      uint32_t index;
      if (!free_dirs_.empty()) {
        index = free_dirs_.back();
        free_dirs_.pop_back();
        dirs_[index] = std::move(list);
      } else {
        index = static_cast<uint32_t>(dirs_.size());
        dirs_.push_back(std::move(list));
      }
      req.open = {};
      req.open.fh = index + 1u;
      return 0;
    }
    case VfsOp::kReadDir:
      return ReadDir(req, false);
    case VfsOp::kReadDirPlus:
      return ReadDir(req, true);
    case VfsOp::kReleaseDir: {
      std::lock_guard lock(mu_);
      if (req.fh == 0 || req.fh > dirs_.size() || !dirs_[req.fh - 1]) return EBADF;
      dirs_[req.fh - 1].reset();
      free_dirs_.push_back(static_cast<uint32_t>(req.fh - 1));
      return 0;
    }
    case VfsOp::kFsyncDir:
      return 0;
    case VfsOp::kStatFs: {
      VfsRequest s = Sub(req, VfsOp::kStatFs, kRootNode);
      const int err = upper_->Serve(s);
      if (err == 0) req.statfs = s.statfs;
      return err;
    }
    case VfsOp::kCopyFileRange:
      return EOPNOTSUPP;  // the kernel falls back to read and write
    case VfsOp::kLend: {
      // Tagged for Adopt with the side it is on (the low bit: 1 lower), above that
      // side's own tag. A file copied up with no name lends the copy, whatever side
      // the handle is on.
      if (GiveCopy(req); req.copy_fd >= 0) {
        req.open.backing_fd = std::exchange(req.copy_fd, -1);
        req.open.fh = req.copy_tag;
        return 0;
      }
      const bool lower_file = (req.fh & 1) == 0;
      const int err = WithHandle(req);
      if (err == 0) req.open.fh = (req.open.fh << 1) | (lower_file ? 1 : 0);
      return err;
    }
    case VfsOp::kAdopt:
      return Adopt(req);
    case VfsOp::kCount:
      break;
  }
  return ENOSYS;
} catch (const std::bad_alloc&) {
  return ENOMEM;
} catch (const std::exception& e) {
  Logger("vfs")->error("overlay: {} failed: {}", msgport::VfsOpName(req.op), e.what());
  return EIO;
}

}  // namespace ulsp::vfs
