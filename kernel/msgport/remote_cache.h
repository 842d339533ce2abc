// RemoteCache: what a remote port (remote_port.h) answers without a round trip.
//
//  - Attributes. The agent's replies carry attributes (lookup, getattr, setattr, the
//    entries of readdirplus, create ...), each with the time the kernel may keep
//    them. The kernel asks again before that time is up when its copy was marked
//    stale: after every read (atime), which makes `tar c` ask getattr once per file.
//    Such a getattr is answered from here while the agent's answer is younger than
//    its timeout, which is the freshness the kernel itself promises. A mount with
//    --timeout 0 caches nothing.
//  - An open's prefetch. A read-only open of a small file brings the file's bytes
//    (agent.capnp); reads of that handle inside them are answered from here, until
//    the handle is released.
//  - An opendir's listing. An opendir brings the directory's readdirplus replies,
//    made in chunks of the size the kernel last asked for; the kernel's readdirplus
//    requests are answered from them, in order, while they match (the same offset,
//    room for the chunk). Every entry of a listing counts a lookup in the agent:
//    chunks not handed on (the kernel asked something else, closed the directory,
//    or something changed while the opendir was on its way) are forgotten there
//    again, through TakeForgets.
// Any request that changes something (write, setattr, create, rename, unlink,
// setxattr ...) empties the attribute cache, and a write-like one (write, setattr,
// fallocate, copy_file_range) also drops every prefetch; answers to requests sent
// before such a change are not learnt. So a program on this mount sees its own
// changes at once; changes made on the agent's host by others show after the
// timeout, as with the kernel's cache.
//
// Thread-safety: all members may be called from any thread.
#pragma once

#include <sys/stat.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kernel/msgport/vfs_message.h"

namespace ulsp::msgport {

class RemoteCache {
 public:
  // `max_prefetch_bytes`: prefetched bytes kept at most (more are not kept).
  explicit RemoteCache(size_t max_prefetch_bytes = size_t{64} << 20) : max_prefetch_bytes_(max_prefetch_bytes) {}

  // Before `m` is sent (its request holds the agent's ids). True: it is answered, its
  // results are encoded in its payload, and it must not be sent. False: send it;
  // what it will change is forgotten now. `*generation` is to be passed to Learn.
  bool Answer(VfsMessage& m, uint64_t* generation);

  // After `m`'s reply came with error 0 (its payload holds the encoded results), and
  // for an open, what it prefetched.
  void Learn(const VfsMessage& m, uint64_t generation, std::span<const std::byte> prefetch, bool prefetch_eof,
             std::vector<std::vector<char>> listing = {});

  // The readdirplus size to ask an opendir's listing in (0: none).
  uint32_t listing_chunk() const;
  // Lookups the agent counted that nobody will forget but this port: (node, count)
  // pairs to send as forget requests.
  std::vector<std::pair<uint64_t, uint64_t>> TakeForgets();

  struct Stats {
    uint64_t attr_hits = 0, read_hits = 0, listing_hits = 0;
    size_t attrs = 0, prefetched_bytes = 0;
  };
  Stats stats() const;

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr size_t kMaxAttrs = 1 << 17;
  struct Attr {
    struct stat st {};
    Clock::time_point until;
  };
  struct Prefetched {
    std::vector<char> data;  // from offset 0
    bool eof = false;        // data is all the file had
  };
  struct Listing {
    std::vector<std::vector<char>> chunks;
    std::vector<int64_t> starts;  // each chunk's offset
    size_t next = 0;              // the first not handed on
    bool eof = false;             // the chunks end the listing
    int64_t end = 0;              // the offset after the last chunk
  };
  void ChangedLocked(bool data);
  void DropListingLocked(Listing& listing);
  void KeepAttr(uint64_t node, const struct stat& st, double seconds, Clock::time_point now);
  void KeepAttrs(const std::vector<char>& readdirplus, Clock::time_point now);

  mutable std::mutex mu_;
  uint64_t generation_ = 0;  // counts changes: answers to older requests are not learnt
  std::unordered_map<uint64_t, Attr> attrs_;             // by the agent's node id
  // By node and the agent's handle: a handle alone names nothing (memfs gives every
  // file and directory the handle 0, and a cache by handle once read one file's
  // prefetched bytes as another's).
  using HandleKey = std::pair<uint64_t, uint64_t>;  // (node, handle)
  std::map<HandleKey, Prefetched> prefetched_;
  std::map<HandleKey, Listing> listings_;
  uint32_t listing_chunk_ = 32 * 1024;  // the smallest readdirplus size asked yet
  std::unordered_map<uint64_t, uint64_t> forgets_;  // node -> lookups to forget
  size_t prefetched_bytes_ = 0;
  const size_t max_prefetch_bytes_;
  uint64_t attr_hits_ = 0, read_hits_ = 0, listing_hits_ = 0;
};

}  // namespace ulsp::msgport
