// RemoteCache: what a remote port answers without a round trip, and when it must not.
#include "kernel/msgport/remote_cache.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/fuse.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "kernel/msgport/unique_fd.h"
#include "kernel/msgport/vfs_codec.h"

namespace ulsp::msgport {
namespace {

// A request as the port gets it (the agent's ids), and the reply the agent sent.
std::unique_ptr<VfsMessage> Asked(VfsOp op, uint64_t node, double timeout = 1.0) {
  auto m = std::make_unique<VfsMessage>(op);
  m->req.node = node;
  m->req.timeout = timeout;
  EncodeVfsRequest(m->req, m->payload);
  return m;
}

void Replied(VfsMessage& m, const VfsRequest& results) {
  VfsRequest r = results;
  r.op = m.req.op;
  EncodeVfsReply(r, m.payload);
}

struct stat Attr(ino_t ino, off_t size) {
  struct stat st {};
  st.st_ino = ino;
  st.st_size = size;
  st.st_mode = S_IFREG | 0644;
  st.st_nlink = 1;
  return st;
}

// Appends a readdirplus record, as the kernel's buffer holds it: a regular file.
void AddRecord(std::vector<char>& out, uint64_t node, const std::string& name, uint64_t ino, uint64_t size,
               uint64_t off) {
  fuse_direntplus d{};
  d.entry_out.nodeid = node;
  d.entry_out.attr_valid = 1;
  d.entry_out.attr.ino = ino;
  d.entry_out.attr.size = size;
  d.entry_out.attr.mode = S_IFREG | 0600;
  d.dirent.ino = ino;
  d.dirent.off = off;
  d.dirent.namelen = static_cast<uint32_t>(name.size());
  const size_t at = out.size();
  out.resize(at + FUSE_DIRENTPLUS_SIZE(&d));
  std::memcpy(out.data() + at, &d, sizeof d);
  std::memcpy(out.data() + at + FUSE_NAME_OFFSET_DIRENTPLUS, name.data(), name.size());
}

// Learns node 7's attributes from a getattr answered with `timeout`.
void LearnGetAttr(RemoteCache& cache, off_t size, double timeout = 1.0) {
  auto m_owner = Asked(VfsOp::kGetAttr, 7, timeout);
  VfsMessage& m = *m_owner;
  uint64_t generation = 0;
  ASSERT_FALSE(cache.Answer(m, &generation));
  VfsRequest results;
  results.out_attr = Attr(70, size);
  Replied(m, results);
  cache.Learn(m, generation, {}, false);
}

// Whether `m` is answered from the cache; its results, decoded, in `back`.
bool AnsweredFromCache(RemoteCache& cache, VfsMessage& m, VfsRequest& back) {
  uint64_t generation = 0;
  if (!cache.Answer(m, &generation)) return false;
  back.op = m.req.op;
  EXPECT_TRUE(DecodeVfsReply(m.payload, back));
  return true;
}

// Whether a getattr of `node` is answered from the cache, and with what size.
bool CachedSize(RemoteCache& cache, uint64_t node, off_t* size) {
  auto m = Asked(VfsOp::kGetAttr, node);
  VfsRequest back;
  if (!AnsweredFromCache(cache, *m, back)) return false;
  *size = back.out_attr.st_size;
  return true;
}

TEST(RemoteCache, AGetAttrIsAnsweredFromAnEarlierAnswerWithinItsTimeout) {
  RemoteCache cache;
  off_t size = 0;
  EXPECT_FALSE(CachedSize(cache, 7, &size));
  LearnGetAttr(cache, 1234);
  ASSERT_TRUE(CachedSize(cache, 7, &size));
  EXPECT_EQ(size, 1234);
  EXPECT_FALSE(CachedSize(cache, 8, &size));
  EXPECT_EQ(cache.stats().attr_hits, 1u);
}

TEST(RemoteCache, NothingIsKeptPastItsTimeoutOrWithTimeoutZero) {
  RemoteCache cache;
  off_t size = 0;
  LearnGetAttr(cache, 1, 0.0);
  EXPECT_FALSE(CachedSize(cache, 7, &size));
  LearnGetAttr(cache, 1, 0.05);
  EXPECT_TRUE(CachedSize(cache, 7, &size));
  std::this_thread::sleep_for(std::chrono::milliseconds(80));
  EXPECT_FALSE(CachedSize(cache, 7, &size));
}

TEST(RemoteCache, AChangeEmptiesTheCacheAndAnAnswerSentBeforeItIsNotLearnt) {
  RemoteCache cache;
  off_t size = 0;
  LearnGetAttr(cache, 10);
  // A write goes out: what was known is gone.
  auto write_owner = Asked(VfsOp::kWrite, 7);
  VfsMessage& write = *write_owner;
  uint64_t wgen = 0;
  EXPECT_FALSE(cache.Answer(write, &wgen));
  EXPECT_FALSE(CachedSize(cache, 7, &size));
  // A getattr sent before a write but answered after it says the old size: not kept.
  auto getattr_owner = Asked(VfsOp::kGetAttr, 7);
  VfsMessage& getattr = *getattr_owner;
  uint64_t ggen = 0;
  EXPECT_FALSE(cache.Answer(getattr, &ggen));
  auto write2_owner = Asked(VfsOp::kWrite, 7);
  VfsMessage& write2 = *write2_owner;
  EXPECT_FALSE(cache.Answer(write2, &wgen));
  VfsRequest old;
  old.out_attr = Attr(70, 10);
  Replied(getattr, old);
  cache.Learn(getattr, ggen, {}, false);
  EXPECT_FALSE(CachedSize(cache, 7, &size));
  // A forget lets the agent reuse the id: its attributes go.
  LearnGetAttr(cache, 20);
  auto forget_owner = Asked(VfsOp::kForget, 7);
  VfsMessage& forget = *forget_owner;
  EXPECT_FALSE(cache.Answer(forget, &wgen));
  EXPECT_FALSE(CachedSize(cache, 7, &size));
}

TEST(RemoteCache, ReaddirplusEntriesAnswerGetAttr) {
  RemoteCache cache;
  auto m_owner = Asked(VfsOp::kReadDirPlus, 1);
  VfsMessage& m = *m_owner;
  uint64_t generation = 0;
  ASSERT_FALSE(cache.Answer(m, &generation));
  VfsRequest results;
  // Two records: nodes 11 and 12.
  for (uint64_t node : {11u, 12u}) AddRecord(results.out, node, "f" + std::to_string(node), node * 10, node * 100, 0);
  Replied(m, results);
  cache.Learn(m, generation, {}, false);
  off_t size = 0;
  ASSERT_TRUE(CachedSize(cache, 12, &size));
  EXPECT_EQ(size, 1200);
  ASSERT_TRUE(CachedSize(cache, 11, &size));
  EXPECT_EQ(size, 1100);
}

// An open of node `node` (7) answered with handle `fh` (5) that brought `data`.
void LearnOpen(RemoteCache& cache, const std::string& data, bool eof, uint64_t node = 7, uint64_t fh = 5) {
  auto open_owner = Asked(VfsOp::kOpen, node);
  VfsMessage& open = *open_owner;
  uint64_t generation = 0;
  ASSERT_FALSE(cache.Answer(open, &generation));
  VfsRequest results;
  results.open.fh = fh;
  Replied(open, results);
  cache.Learn(open, generation, std::as_bytes(std::span(data.data(), data.size())), eof);
}

// Whether a read of handle `fh` (5) of node `node` (7) is answered from the cache,
// and with what.
bool CachedRead(RemoteCache& cache, int64_t offset, uint64_t size, std::string* got, uint64_t node = 7,
                uint64_t fh = 5) {
  VfsMessage m(VfsOp::kRead);
  m.req.node = node;
  m.req.fh = fh;
  m.req.offset = offset;
  m.req.size = size;
  VfsRequest back;
  if (!AnsweredFromCache(cache, m, back)) return false;
  got->assign(back.out.begin(), back.out.end());
  return true;
}

TEST(RemoteCache, ReadsInsideAnOpensPrefetchNeedNoRoundTrip) {
  RemoteCache cache;
  LearnOpen(cache, "hello, world", /*eof=*/true);
  std::string got;
  ASSERT_TRUE(CachedRead(cache, 0, 4096, &got));
  EXPECT_EQ(got, "hello, world");
  ASSERT_TRUE(CachedRead(cache, 7, 3, &got));
  EXPECT_EQ(got, "wor");
  ASSERT_TRUE(CachedRead(cache, 100, 10, &got));  // past the end of a whole file
  EXPECT_EQ(got, "");
  EXPECT_EQ(cache.stats().read_hits, 3u);
  // Released: gone.
  auto release_owner = Asked(VfsOp::kRelease, 7);
  VfsMessage& release = *release_owner;
  release.req.fh = 5;
  uint64_t generation = 0;
  EXPECT_FALSE(cache.Answer(release, &generation));
  EXPECT_FALSE(CachedRead(cache, 0, 10, &got));
  EXPECT_EQ(cache.stats().prefetched_bytes, 0u);
}

// memfs answers every open with the handle 0: the bytes are kept by node and handle
// (kept by handle alone, a read of the first file answered the second's bytes).
TEST(RemoteCache, FilesOpenedWithTheSameHandleKeepTheirOwnBytes) {
  RemoteCache cache;
  LearnOpen(cache, "AAAA", /*eof=*/true, /*node=*/7, /*fh=*/0);
  LearnOpen(cache, "BBBB", /*eof=*/true, /*node=*/8, /*fh=*/0);
  std::string got;
  ASSERT_TRUE(CachedRead(cache, 0, 10, &got, 7, 0));
  EXPECT_EQ(got, "AAAA");
  ASSERT_TRUE(CachedRead(cache, 0, 10, &got, 8, 0));
  EXPECT_EQ(got, "BBBB");
  auto release_owner = Asked(VfsOp::kRelease, 8);  // the second's release leaves the first's
  release_owner->req.fh = 0;
  uint64_t generation = 0;
  EXPECT_FALSE(cache.Answer(*release_owner, &generation));
  ASSERT_TRUE(CachedRead(cache, 0, 10, &got, 7, 0));
  EXPECT_EQ(got, "AAAA");
  EXPECT_FALSE(CachedRead(cache, 0, 10, &got, 8, 0));
}

TEST(RemoteCache, APartialPrefetchAnswersOnlyWhatItHolds) {
  RemoteCache cache;
  LearnOpen(cache, std::string(8, 'x'), /*eof=*/false);
  std::string got;
  EXPECT_TRUE(CachedRead(cache, 0, 8, &got));
  EXPECT_FALSE(CachedRead(cache, 4, 8, &got));  // runs past what came: ask the agent
}

TEST(RemoteCache, AWriteDropsPrefetchedBytes) {
  RemoteCache cache;
  LearnOpen(cache, "old", true);
  auto write_owner = Asked(VfsOp::kWrite, 7);
  VfsMessage& write = *write_owner;
  uint64_t generation = 0;
  EXPECT_FALSE(cache.Answer(write, &generation));
  std::string got;
  EXPECT_FALSE(CachedRead(cache, 0, 10, &got));
}

// A readdirplus reply with one record per node, each record's offset its node id.
std::vector<char> Chunk(std::initializer_list<uint64_t> nodes) {
  std::vector<char> out;
  for (uint64_t node : nodes) AddRecord(out, node, "x", node, 0, node);
  return out;
}

// An opendir of node `node` (1) that came with handle `fh` (9) and `chunks`.
void LearnOpenDir(RemoteCache& cache, std::vector<std::vector<char>> chunks, bool eof, bool changed_meanwhile = false,
                  uint64_t node = 1, uint64_t fh = 9) {
  auto owner = Asked(VfsOp::kOpenDir, node);
  uint64_t generation = 0;
  ASSERT_FALSE(cache.Answer(*owner, &generation));
  if (changed_meanwhile) {
    auto mkdir = Asked(VfsOp::kMkDir, 1);
    uint64_t ignored = 0;
    ASSERT_FALSE(cache.Answer(*mkdir, &ignored));
  }
  VfsRequest results;
  results.open.fh = fh;
  Replied(*owner, results);
  cache.Learn(*owner, generation, {}, eof, std::move(chunks));
}

// Asks a readdirplus of handle `fh` (9) of node `node` (1); the records' node ids
// when answered from the cache.
bool CachedListing(RemoteCache& cache, int64_t offset, uint64_t size, std::vector<uint64_t>* nodes, uint64_t node = 1,
                   uint64_t fh = 9) {
  VfsMessage m(VfsOp::kReadDirPlus);
  m.req.node = node;
  m.req.fh = fh;
  m.req.offset = offset;
  m.req.size = size;
  VfsRequest back;
  if (!AnsweredFromCache(cache, m, back)) return false;
  nodes->clear();
  ForEachDirentPlus(back.out, [&](const fuse_direntplus& d, size_t) { nodes->push_back(d.entry_out.nodeid); });
  return true;
}

TEST(RemoteCache, AnOpendirsListingAnswersTheReaddirsThatFollowInOrder) {
  RemoteCache cache;
  LearnOpenDir(cache, {Chunk({20, 21}), Chunk({22})}, /*eof=*/true);
  std::vector<uint64_t> nodes;
  ASSERT_TRUE(CachedListing(cache, 0, 32768, &nodes));
  EXPECT_EQ(nodes, (std::vector<uint64_t>{20, 21}));
  ASSERT_TRUE(CachedListing(cache, 21, 32768, &nodes));
  EXPECT_EQ(nodes, (std::vector<uint64_t>{22}));
  ASSERT_TRUE(CachedListing(cache, 22, 32768, &nodes));  // the end
  EXPECT_TRUE(nodes.empty());
  EXPECT_EQ(cache.stats().listing_hits, 3u);
  EXPECT_TRUE(cache.TakeForgets().empty());  // every entry went to the kernel
  off_t size = 0;
  EXPECT_TRUE(CachedSize(cache, 22, &size));  // and their attributes are known
}

// Two directories open at once with memfs's handle 0 (a find in a directory it is
// listing): each listing answers its own directory's readdirs.
TEST(RemoteCache, DirectoriesOpenedWithTheSameHandleKeepTheirOwnListings) {
  RemoteCache cache;
  LearnOpenDir(cache, {Chunk({20, 21})}, /*eof=*/true, false, /*node=*/1, /*fh=*/0);
  LearnOpenDir(cache, {Chunk({30, 31})}, /*eof=*/true, false, /*node=*/2, /*fh=*/0);
  std::vector<uint64_t> nodes;
  ASSERT_TRUE(CachedListing(cache, 0, 32768, &nodes, 1, 0));
  EXPECT_EQ(nodes, (std::vector<uint64_t>{20, 21}));
  ASSERT_TRUE(CachedListing(cache, 0, 32768, &nodes, 2, 0));
  EXPECT_EQ(nodes, (std::vector<uint64_t>{30, 31}));
}

TEST(RemoteCache, EntriesNotHandedOnAreForgottenInTheAgent) {
  using Forgets = std::vector<std::pair<uint64_t, uint64_t>>;
  auto sorted = [](Forgets f) {
    std::sort(f.begin(), f.end());
    return f;
  };
  {
    // The kernel asks with less room than a chunk takes: the agent answers from here.
    RemoteCache cache;
    LearnOpenDir(cache, {Chunk({20, 21}), Chunk({22})}, true);
    std::vector<uint64_t> nodes;
    EXPECT_FALSE(CachedListing(cache, 0, 64, &nodes));
    EXPECT_EQ(sorted(cache.TakeForgets()), (Forgets{{20, 1}, {21, 1}, {22, 1}}));
    EXPECT_EQ(cache.listing_chunk(), 32768u);  // 64 is below a page: not a chunk size
  }
  {
    // Closed after the first chunk.
    RemoteCache cache;
    LearnOpenDir(cache, {Chunk({20, 21}), Chunk({22})}, true);
    std::vector<uint64_t> nodes;
    EXPECT_TRUE(CachedListing(cache, 0, 8192, &nodes));
    EXPECT_EQ(cache.listing_chunk(), 8192u);  // the next opendir asks in this size
    auto releasedir = Asked(VfsOp::kReleaseDir, 1);
    releasedir->req.fh = 9;
    uint64_t generation = 0;
    EXPECT_FALSE(cache.Answer(*releasedir, &generation));
    EXPECT_EQ(cache.TakeForgets(), (Forgets{{22, 1}}));
  }
  {
    // Something changed while the opendir was on its way: nothing is handed on.
    RemoteCache cache;
    LearnOpenDir(cache, {Chunk({20, 21})}, true, /*changed_meanwhile=*/true);
    std::vector<uint64_t> nodes;
    EXPECT_FALSE(CachedListing(cache, 0, 32768, &nodes));
    EXPECT_EQ(sorted(cache.TakeForgets()), (Forgets{{20, 1}, {21, 1}}));
  }
  {
    // Something changed after the opendir, before its first readdir (a directory
    // opened, then changed, then read): the listing is stale, the agent answers.
    RemoteCache cache;
    LearnOpenDir(cache, {Chunk({20, 21}), Chunk({22})}, true);
    std::vector<uint64_t> nodes;
    ASSERT_TRUE(CachedListing(cache, 0, 32768, &nodes));
    auto mkdir = Asked(VfsOp::kMkDir, 1);
    uint64_t generation = 0;
    EXPECT_FALSE(cache.Answer(*mkdir, &generation));
    EXPECT_EQ(cache.TakeForgets(), (Forgets{{22, 1}}));
    EXPECT_FALSE(CachedListing(cache, 21, 32768, &nodes));
    EXPECT_TRUE(cache.TakeForgets().empty());
  }
}

// A listing's end (VfsRequest::dir_end) crosses with its records to an isolated server's
// or a remote agent's client: the shim answers the kernel's last readdir with it.
TEST(VfsCodec, AListingsEndCrossesWithItsRecords) {
  for (const bool end : {false, true}) {
    auto m = Asked(VfsOp::kReadDirPlus, 7);
    VfsRequest results;
    results.out = {'r', 'e', 'c'};
    results.dir_end = end;
    Replied(*m, results);
    VfsRequest back;
    back.op = VfsOp::kReadDirPlus;
    back.dir_end = !end;
    ASSERT_TRUE(DecodeVfsReply(m->payload, back));
    EXPECT_EQ(back.dir_end, end);
    EXPECT_EQ(back.out, results.out);
  }
}

// A failed request's answer carries only the nodes it changed, marked as such: a
// port's own error answer keeps the request's bytes (a server died), and neither they
// nor a success reply may be read as one.
TEST(VfsCodec, AFailedRequestsAnswerCarriesOnlyItsChangedNodesAndIsMarked) {
  VfsRequest failed;
  failed.op = VfsOp::kSetXattr;
  failed.changed = {7, 9, 1};
  std::vector<std::byte> bytes;
  EncodeFailedVfsReply(failed, bytes);
  EXPECT_EQ(DecodeFailedVfsReply(bytes), (std::vector<uint64_t>{7, 9, 1}));
  std::vector<std::byte> request;
  VfsRequest asked;
  asked.op = VfsOp::kSetXattr;
  asked.node = 7;
  asked.name = "foo.bar";
  EncodeVfsRequest(asked, request);
  EXPECT_TRUE(DecodeFailedVfsReply(request).empty());
  std::vector<std::byte> reply;
  EncodeVfsReply(failed, reply);
  EXPECT_TRUE(DecodeFailedVfsReply(reply).empty());
  std::vector<std::byte> cut(bytes.begin(), bytes.begin() + 12);  // the mark, then garbage
  EXPECT_TRUE(DecodeFailedVfsReply(cut).empty());
  EXPECT_TRUE(DecodeFailedVfsReply({}).empty());
}

// What a reply says about a descriptor it brings, or a file the server holds: a
// copy's descriptor (an overlay's copy-up) is the message's first one, with its tag,
// and is none when the message brings none; a backing file is never read as a copy;
// a lend held by the server (an agent) says so with the name it answered.
TEST(VfsCodec, ACopysDescriptorAndAHeldFileCrossAsSaid) {
  VfsRequest changed;
  changed.op = VfsOp::kSetAttr;
  changed.copy_fd = 42;
  changed.copy_tag = 6;
  std::vector<std::byte> bytes;
  EncodeVfsReply(changed, bytes);
  std::vector<UniqueFd> fds;
  fds.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  VfsRequest got;
  got.op = VfsOp::kSetAttr;
  ASSERT_TRUE(DecodeVfsReply(bytes, got, fds));
  EXPECT_EQ(got.copy_fd, fds.front().get());
  EXPECT_EQ(got.copy_tag, 6u);
  EXPECT_EQ(got.open.backing_fd, -1);
  ASSERT_TRUE(DecodeVfsReply(bytes, got, {}));
  EXPECT_EQ(got.copy_fd, -1);
  EXPECT_EQ(got.copy_tag, 0u);

  VfsRequest opened;  // a backing file, and a copy besides: the descriptor is the backing file's
  opened.op = VfsOp::kOpen;
  opened.open.backing_fd = 9;
  opened.copy_fd = 42;
  EncodeVfsReply(opened, bytes);
  got = VfsRequest{};
  got.op = VfsOp::kOpen;
  ASSERT_TRUE(DecodeVfsReply(bytes, got, fds));
  EXPECT_EQ(got.open.backing_fd, fds.front().get());
  EXPECT_EQ(got.copy_fd, -1);

  VfsRequest lent;
  lent.op = VfsOp::kLend;
  lent.open.fh = 0x1234567890abcdefULL;
  lent.open.held = true;
  EncodeVfsReply(lent, bytes);
  got = VfsRequest{};
  got.op = VfsOp::kLend;
  ASSERT_TRUE(DecodeVfsReply(bytes, got, {}));
  EXPECT_TRUE(got.open.held);
  EXPECT_EQ(got.open.fh, 0x1234567890abcdefULL);
  EXPECT_EQ(got.open.backing_fd, -1);
}

}  // namespace
}  // namespace ulsp::msgport
