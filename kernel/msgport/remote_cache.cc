#include "kernel/msgport/remote_cache.h"

#include <fcntl.h>
#include <linux/fuse.h>

#include <algorithm>
#include <cstring>

#include "kernel/msgport/vfs_codec.h"

namespace ulsp::msgport {
namespace {

// Requests that change nothing the cache holds.
bool ChangesNothing(const VfsRequest& r) {
  switch (r.op) {
    case VfsOp::kLookup:
    case VfsOp::kForget:
    case VfsOp::kGetAttr:
    case VfsOp::kReadLink:
    case VfsOp::kRead:
    case VfsOp::kFlush:
    case VfsOp::kRelease:
    case VfsOp::kFsync:
    case VfsOp::kOpenDir:
    case VfsOp::kReadDir:
    case VfsOp::kReadDirPlus:
    case VfsOp::kReleaseDir:
    case VfsOp::kFsyncDir:
    case VfsOp::kStatFs:
    case VfsOp::kGetXattr:
    case VfsOp::kListXattr:
    case VfsOp::kAccess:
    case VfsOp::kLseek:
      return true;
    case VfsOp::kOpen:
      return (r.flags & O_TRUNC) == 0;
    default:
      return false;
  }
}

// Requests that may change a file's bytes.
bool ChangesData(const VfsRequest& r) {
  switch (r.op) {
    case VfsOp::kWrite:
    case VfsOp::kSetAttr:
    case VfsOp::kFallocate:
    case VfsOp::kCopyFileRange:
    case VfsOp::kOpen:  // with O_TRUNC
    case VfsOp::kCreate:
      return true;
    default:
      return false;
  }
}

// Answers that carry something worth keeping.
bool Teaches(VfsOp op) {
  switch (op) {
    case VfsOp::kLookup:  // these answer with an entry
    case VfsOp::kMkNod:
    case VfsOp::kMkDir:
    case VfsOp::kSymlink:
    case VfsOp::kLink:
    case VfsOp::kCreate:
    case VfsOp::kGetAttr:
    case VfsOp::kSetAttr:
    case VfsOp::kReadDirPlus:
    case VfsOp::kOpen:
    case VfsOp::kOpenDir:
      return true;
    default:
      return false;
  }
}

struct stat FromFuse(const fuse_attr& a) {
  struct stat st {};
  st.st_ino = a.ino;
  st.st_size = static_cast<off_t>(a.size);
  st.st_blocks = static_cast<blkcnt_t>(a.blocks);
  st.st_atim = {static_cast<time_t>(a.atime), static_cast<long>(a.atimensec)};
  st.st_mtim = {static_cast<time_t>(a.mtime), static_cast<long>(a.mtimensec)};
  st.st_ctim = {static_cast<time_t>(a.ctime), static_cast<long>(a.ctimensec)};
  st.st_mode = a.mode;
  st.st_nlink = a.nlink;
  st.st_uid = a.uid;
  st.st_gid = a.gid;
  st.st_rdev = a.rdev;
  st.st_blksize = a.blksize;
  return st;
}

}  // namespace

void RemoteCache::DropListingLocked(Listing& listing) {
  for (size_t i = listing.next; i < listing.chunks.size(); ++i) {
    ForEachDirentPlus(listing.chunks[i], [&](const fuse_direntplus& d, size_t) {
      if (d.entry_out.nodeid != 0) ++forgets_[d.entry_out.nodeid];
    });
  }
  listing.next = listing.chunks.size();
}

uint32_t RemoteCache::listing_chunk() const {
  std::lock_guard lock(mu_);
  return listing_chunk_;
}

std::vector<std::pair<uint64_t, uint64_t>> RemoteCache::TakeForgets() {
  std::lock_guard lock(mu_);
  std::vector<std::pair<uint64_t, uint64_t>> out(forgets_.begin(), forgets_.end());
  forgets_.clear();
  return out;
}

void RemoteCache::ChangedLocked(bool data) {
  ++generation_;
  attrs_.clear();
  // A listing fetched with its directory's opendir is what the directory held then:
  // a directory opened, then changed, then read shows the change (and the entries'
  // attributes as they are now), so the agent answers its readdirs.
  for (auto& [key, listing] : listings_) DropListingLocked(listing);
  listings_.clear();
  if (data) {
    prefetched_.clear();
    prefetched_bytes_ = 0;
  }
}

void RemoteCache::KeepAttrs(const std::vector<char>& readdirplus, Clock::time_point now) {
  ForEachDirentPlus(readdirplus, [&](const fuse_direntplus& d, size_t) {
    const double seconds = static_cast<double>(d.entry_out.attr_valid) + d.entry_out.attr_valid_nsec / 1e9;
    KeepAttr(d.entry_out.nodeid, FromFuse(d.entry_out.attr), seconds, now);
  });
}

void RemoteCache::KeepAttr(uint64_t node, const struct stat& st, double seconds, Clock::time_point now) {
  if (node == 0 || !(seconds > 0)) return;
  if (attrs_.size() >= kMaxAttrs) attrs_.clear();  // a bound; old ones are likely stale
  attrs_[node] = Attr{st, now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds))};
}

bool RemoteCache::Answer(VfsMessage& m, uint64_t* generation) {
  VfsRequest& r = m.req;
  std::unique_lock lock(mu_);
  if (!ChangesNothing(r)) {
    ChangedLocked(ChangesData(r));
  } else if (r.op == VfsOp::kGetAttr && r.flags == 0) {  // a statx's (flags) wants the birth time too
    auto it = attrs_.find(r.node);
    if (it != attrs_.end()) {
      if (Clock::now() < it->second.until) {
        r.out_attr = it->second.st;
        ++attr_hits_;
        lock.unlock();
        EncodeVfsReply(r, m.payload);
        return true;
      }
      attrs_.erase(it);
    }
  } else if (r.op == VfsOp::kRead) {
    auto it = prefetched_.find({r.node, r.fh});
    if (it != prefetched_.end() && r.offset >= 0) {
      const std::vector<char>& data = it->second.data;
      const uint64_t offset = static_cast<uint64_t>(r.offset);
      // Inside what came, or anywhere when it came whole (past its end: nothing).
      if (offset + r.size <= data.size() || it->second.eof) {
        const size_t from = static_cast<size_t>(std::min<uint64_t>(offset, data.size()));
        const size_t to = static_cast<size_t>(std::min<uint64_t>(offset + r.size, data.size()));
        r.out.assign(data.begin() + static_cast<std::ptrdiff_t>(from), data.begin() + static_cast<std::ptrdiff_t>(to));
        ++read_hits_;
        lock.unlock();
        EncodeVfsReply(r, m.payload);
        return true;
      }
    }
  } else if (r.op == VfsOp::kReadDirPlus || r.op == VfsOp::kReadDir) {
    if (r.op == VfsOp::kReadDirPlus && r.size >= 4096)
      listing_chunk_ = std::min<uint32_t>(listing_chunk_, static_cast<uint32_t>(std::min<uint64_t>(r.size, 1u << 20)));
    auto it = listings_.find({r.node, r.fh});
    if (it != listings_.end()) {
      Listing& l = it->second;
      const bool plus = r.op == VfsOp::kReadDirPlus;
      if (plus && l.next < l.chunks.size() && l.starts[l.next] == r.offset && l.chunks[l.next].size() <= r.size) {
        r.out = std::move(l.chunks[l.next]);
        ++l.next;
        ++listing_hits_;
        lock.unlock();
        EncodeVfsReply(r, m.payload);
        return true;
      }
      if (plus && l.next == l.chunks.size() && l.eof && r.offset == l.end) {
        r.out.clear();  // the end of the listing
        ++listing_hits_;
        lock.unlock();
        EncodeVfsReply(r, m.payload);
        return true;
      }
      DropListingLocked(l);  // it asks something else: the agent answers from here on
      listings_.erase(it);
    }
  } else if (r.op == VfsOp::kReleaseDir) {
    auto it = listings_.find({r.node, r.fh});
    if (it != listings_.end()) {
      DropListingLocked(it->second);
      listings_.erase(it);
    }
  } else if (r.op == VfsOp::kForget) {
    attrs_.erase(r.node);  // the agent may give the id to another file
  } else if (r.op == VfsOp::kRelease) {
    auto it = prefetched_.find({r.node, r.fh});
    if (it != prefetched_.end()) {
      prefetched_bytes_ -= it->second.data.size();
      prefetched_.erase(it);
    }
  }
  *generation = generation_;
  return false;
}

void RemoteCache::Learn(const VfsMessage& m, uint64_t generation, std::span<const std::byte> prefetch, bool prefetch_eof,
                        std::vector<std::vector<char>> listing) {
  const VfsRequest& asked = m.req;
  const bool changing = !ChangesNothing(asked);
  VfsRequest got;
  got.op = asked.op;
  if (!Teaches(asked.op)) {
    if (changing) {
      std::lock_guard lock(mu_);
      ChangedLocked(ChangesData(asked));
    }
    return;
  }
  if (!DecodeVfsReply(m.payload, got)) {  // the port's user will say so
    std::lock_guard lock(mu_);
    Listing l{std::move(listing), {}, 0, false, 0};
    DropListingLocked(l);
    return;
  }
  const auto now = Clock::now();
  std::lock_guard lock(mu_);
  if (changing) {
    // Its own answer is new: what it says holds, what was learnt before may not.
    ChangedLocked(ChangesData(asked));
  } else if (generation != generation_) {
    // Something changed while it was on its way: learn nothing, hand on no listing.
    Listing l{std::move(listing), {}, 0, false, 0};
    DropListingLocked(l);
    return;
  }
  switch (asked.op) {
    case VfsOp::kGetAttr:
    case VfsOp::kSetAttr:
      KeepAttr(asked.node, got.out_attr, asked.timeout, now);
      break;
    case VfsOp::kReadDirPlus:
      KeepAttrs(got.out, now);
      break;
    case VfsOp::kOpenDir: {
      if (listing.empty() && !prefetch_eof) break;
      Listing l;
      l.eof = prefetch_eof;
      int64_t offset = 0;
      for (auto& chunk : listing) {
        KeepAttrs(chunk, now);
        l.starts.push_back(offset);
        ForEachDirentPlus(chunk, [&](const fuse_direntplus& d, size_t) { offset = static_cast<int64_t>(d.dirent.off); });
        l.chunks.push_back(std::move(chunk));
      }
      l.end = offset;
      auto [it, fresh] = listings_.try_emplace({asked.node, got.open.fh});
      if (!fresh) DropListingLocked(it->second);
      it->second = std::move(l);
      break;
    }
    case VfsOp::kOpen:
      if ((prefetch_eof || !prefetch.empty()) && prefetched_bytes_ + prefetch.size() <= max_prefetch_bytes_) {
        Prefetched& p = prefetched_[{asked.node, got.open.fh}];
        prefetched_bytes_ -= p.data.size();
        p.data.assign(reinterpret_cast<const char*>(prefetch.data()),
                      reinterpret_cast<const char*>(prefetch.data() + prefetch.size()));
        p.eof = prefetch_eof;
        prefetched_bytes_ += p.data.size();
      }
      break;
    default:  // those answered with an entry
      KeepAttr(got.entry.ino, got.entry.attr, got.entry.attr_timeout, now);
      break;
  }
}

RemoteCache::Stats RemoteCache::stats() const {
  std::lock_guard lock(mu_);
  return Stats{attr_hits_, read_hits_, listing_hits_, attrs_.size(), prefetched_bytes_};
}

}  // namespace ulsp::msgport
