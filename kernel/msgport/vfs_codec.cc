#include "kernel/msgport/vfs_codec.h"

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <algorithm>
#include <cstring>

#include "kernel/msgport/vfs.capnp.h"

namespace ulsp::msgport {
namespace {

constexpr size_t kMaxData = (1u << 20) + 4096;  // the largest read, write or dirent buffer
constexpr size_t kMaxChanged = 1u << 14;  // VfsRequest::changed: more than the deepest path gives
constexpr size_t kMaxName = 4096;               // a symlink target (PATH_MAX)

void PutAttr(wire::Attr::Builder a, const struct stat& st) {
  a.setIno(st.st_ino);
  a.setMode(st.st_mode);
  a.setNlink(st.st_nlink);
  a.setUid(st.st_uid);
  a.setGid(st.st_gid);
  a.setRdev(st.st_rdev);
  a.setSize(st.st_size);
  a.setBlksize(st.st_blksize);
  a.setBlocks(st.st_blocks);
  a.setAtimeSec(st.st_atim.tv_sec);
  a.setAtimeNsec(st.st_atim.tv_nsec);
  a.setMtimeSec(st.st_mtim.tv_sec);
  a.setMtimeNsec(st.st_mtim.tv_nsec);
  a.setCtimeSec(st.st_ctim.tv_sec);
  a.setCtimeNsec(st.st_ctim.tv_nsec);
}

void GetAttr(wire::Attr::Reader a, struct stat& st) {
  st = {};
  st.st_ino = a.getIno();
  st.st_mode = a.getMode();
  st.st_nlink = a.getNlink();
  st.st_uid = a.getUid();
  st.st_gid = a.getGid();
  st.st_rdev = a.getRdev();
  st.st_size = a.getSize();
  st.st_blksize = a.getBlksize();
  st.st_blocks = a.getBlocks();
  st.st_atim = {a.getAtimeSec(), a.getAtimeNsec()};
  st.st_mtim = {a.getMtimeSec(), a.getMtimeNsec()};
  st.st_ctim = {a.getCtimeSec(), a.getCtimeNsec()};
}

kj::ArrayPtr<const capnp::byte> Bytes(const void* p, size_t n) {
  return {static_cast<const capnp::byte*>(p), n};
}

void Flatten(capnp::MessageBuilder& builder, std::vector<std::byte>& out) {
  auto words = capnp::messageToFlatArray(builder);
  auto bytes = words.asBytes();
  out.resize(bytes.size());
  std::memcpy(out.data(), bytes.begin(), bytes.size());
}

// Runs `read` on the message in `bytes`; EBADMSG for anything malformed.
template <class Root, class F>
Result<void> Read(std::span<const std::byte> bytes, F&& read) {
  if (bytes.size() % sizeof(capnp::word) != 0 || bytes.empty()) return Fail(EBADMSG);
  // Cap'n Proto reads words: copy into aligned storage (payloads are small or are data
  // that must be copied out anyway).
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  try {
    capnp::ReaderOptions options;
    options.traversalLimitInWords = (kMaxData * 2) / sizeof(capnp::word) + 4096;
    capnp::FlatArrayMessageReader reader(words, options);
    return read(reader.getRoot<Root>());
  } catch (const kj::Exception&) {
    return Fail(EBADMSG);
  }
}

}  // namespace

void EncodeVfsRequest(const VfsRequest& req, std::vector<std::byte>& out) {
  capnp::MallocMessageBuilder builder;
  auto r = builder.initRoot<wire::VfsRequest>();
  r.setUid(req.ctx.uid);
  r.setGid(req.ctx.gid);
  r.setPid(req.ctx.pid);
  r.setUmaskTook(req.ctx.umask_took);
  r.setNode(req.node);
  r.setName(Bytes(req.name.data(), req.name.size()));
  r.setNode2(req.node2);
  r.setName2(Bytes(req.name2.data(), req.name2.size()));
  r.setFh(req.fh);
  r.setFh2(req.fh2);
  r.setHasFh(req.has_fh);
  r.setOffset(req.offset);
  r.setOffset2(req.offset2);
  r.setSize(req.size);
  r.setCount(req.count);
  r.setFlags(req.flags);
  r.setMode(req.mode);
  r.setRdev(req.rdev);
  if (req.op == VfsOp::kSetAttr) PutAttr(r.initAttr(), req.attr);
  r.setIn(Bytes(req.in.data(), req.in.size()));
  r.setTimeout(req.timeout);
  r.setKernelIoOk(req.kernel_io_ok);
  r.setHandlelessOk(req.handleless_ok);
  Flatten(builder, out);
}

Result<void> DecodeVfsRequest(std::span<const std::byte> bytes, VfsRequest& req, std::vector<char>& storage) {
  return Read<wire::VfsRequest>(bytes, [&](wire::VfsRequest::Reader r) -> Result<void> {
    auto name = r.getName();
    auto name2 = r.getName2();
    auto in = r.getIn();
    if (name.size() > kMaxName || name2.size() > kMaxName || in.size() > kMaxData) return Fail(EBADMSG);
    req.ctx = {r.getUid(), r.getGid(), r.getPid(), r.getUmaskTook()};
    req.node = r.getNode();
    req.name.assign(reinterpret_cast<const char*>(name.begin()), name.size());
    req.node2 = r.getNode2();
    req.name2.assign(reinterpret_cast<const char*>(name2.begin()), name2.size());
    req.fh = r.getFh();
    req.fh2 = r.getFh2();
    req.has_fh = r.getHasFh();
    req.offset = r.getOffset();
    req.offset2 = r.getOffset2();
    req.size = r.getSize();
    req.count = r.getCount();
    req.flags = r.getFlags();
    req.mode = r.getMode();
    req.rdev = r.getRdev();
    if (r.hasAttr()) GetAttr(r.getAttr(), req.attr);
    storage.assign(reinterpret_cast<const char*>(in.begin()), reinterpret_cast<const char*>(in.end()));
    req.in = {storage.data(), storage.size()};
    req.timeout = r.getTimeout();
    if (!(req.timeout >= 0 && req.timeout <= 1e9)) req.timeout = 0;
    req.kernel_io_ok = r.getKernelIoOk();
    req.handleless_ok = r.getHandlelessOk();
    return {};
  });
}

void EncodeVfsReply(const VfsRequest& req, std::vector<std::byte>& out) {
  capnp::MallocMessageBuilder builder;
  auto r = builder.initRoot<wire::VfsReply>();
  switch (req.op) {
    case VfsOp::kLookup:
    case VfsOp::kMkNod:
    case VfsOp::kMkDir:
    case VfsOp::kSymlink:
    case VfsOp::kLink:
    case VfsOp::kCreate:
    case VfsOp::kAdopt:
      r.setEntryNode(req.entry.ino);
      r.setEntryGeneration(req.entry.generation);
      PutAttr(r.initEntryAttr(), req.entry.attr);
      r.setEntryAttrTimeout(req.entry.attr_timeout);
      r.setEntryTimeout(req.entry.entry_timeout);
      break;
    case VfsOp::kGetAttr:
    case VfsOp::kSetAttr:
      PutAttr(r.initOutAttr(), req.out_attr);
      if (req.out_btime_known) {
        r.setBtimeKnown(true);
        r.setBtimeSec(req.out_btime.tv_sec);
        r.setBtimeNsec(req.out_btime.tv_nsec);
      }
      break;
    case VfsOp::kStatFs: {
      const struct statvfs& s = req.statfs;
      const uint64_t v[] = {s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files,
                            s.f_ffree, s.f_favail, s.f_fsid, s.f_flag, s.f_namemax};
      auto list = r.initStatfs(std::size(v));
      for (unsigned i = 0; i < std::size(v); ++i) list.set(i, v[i]);
      break;
    }
    default:
      break;
  }
  r.setOpenFh(req.open.fh);
  r.setOpenFlags((req.open.direct_io ? 1u : 0u) | (req.open.keep_cache ? 2u : 0u) | (req.open.nonseekable ? 4u : 0u) |
                 (req.open.cache_readdir ? 8u : 0u) | (req.open.backing_fd >= 0 ? 16u : 0u) |
                 (req.open.backing_fd < 0 && req.copy_fd >= 0 ? 32u : 0u) | (req.open.held ? 64u : 0u));
  if (req.open.backing_fd < 0 && req.copy_fd >= 0) r.setCopyTag(req.copy_tag);
  r.setOut(Bytes(req.out.data(), req.out.size()));
  r.setOutSize(req.out_size);
  r.setDirEnd(req.dir_end);
  if (!req.changed.empty()) {
    auto changed = r.initChanged(static_cast<unsigned>(req.changed.size()));
    for (unsigned i = 0; i < changed.size(); ++i) changed.set(i, req.changed[i]);
  }
  Flatten(builder, out);
}

namespace {
constexpr char kFailedMark[8] = {'u', 'l', 's', 'p', 'f', 'a', 'i', 'l'};  // a word: what follows stays aligned
}  // namespace

void EncodeFailedVfsReply(const VfsRequest& req, std::vector<std::byte>& out) {
  capnp::MallocMessageBuilder builder;
  auto r = builder.initRoot<wire::VfsReply>();
  auto changed = r.initChanged(static_cast<unsigned>(std::min(req.changed.size(), kMaxChanged)));
  for (unsigned i = 0; i < changed.size(); ++i) changed.set(i, req.changed[i]);
  Flatten(builder, out);
  out.insert(out.begin(), reinterpret_cast<const std::byte*>(kFailedMark),
             reinterpret_cast<const std::byte*>(kFailedMark) + sizeof kFailedMark);
}

std::vector<uint64_t> DecodeFailedVfsReply(std::span<const std::byte> bytes) {
  std::vector<uint64_t> nodes;
  if (bytes.size() <= sizeof kFailedMark || std::memcmp(bytes.data(), kFailedMark, sizeof kFailedMark) != 0) return nodes;
  (void)Read<wire::VfsReply>(bytes.subspan(sizeof kFailedMark), [&](wire::VfsReply::Reader r) -> Result<void> {
    auto changed = r.getChanged();
    if (changed.size() > kMaxChanged) return Fail(EBADMSG);
    nodes.reserve(changed.size());
    for (uint64_t node : changed) nodes.push_back(node);
    return {};
  });
  return nodes;
}

Result<void> DecodeVfsReply(std::span<const std::byte> bytes, VfsRequest& req, std::span<const UniqueFd> fds) {
  return Read<wire::VfsReply>(bytes, [&](wire::VfsReply::Reader r) -> Result<void> {
    auto out = r.getOut();
    if (out.size() > kMaxData) return Fail(EBADMSG);
    if (r.hasEntryAttr()) {
      req.entry = {};
      req.entry.ino = r.getEntryNode();
      req.entry.generation = r.getEntryGeneration();
      GetAttr(r.getEntryAttr(), req.entry.attr);
      req.entry.attr_timeout = r.getEntryAttrTimeout();
      req.entry.entry_timeout = r.getEntryTimeout();
    }
    if (r.hasOutAttr()) GetAttr(r.getOutAttr(), req.out_attr);
    req.out_btime_known = r.getBtimeKnown();
    req.out_btime = {r.getBtimeSec(), r.getBtimeNsec()};
    if (r.hasStatfs()) {
      auto v = r.getStatfs();
      if (v.size() != 11) return Fail(EBADMSG);
      struct statvfs& s = req.statfs;
      s = {};
      s.f_bsize = v[0];
      s.f_frsize = v[1];
      s.f_blocks = v[2];
      s.f_bfree = v[3];
      s.f_bavail = v[4];
      s.f_files = v[5];
      s.f_ffree = v[6];
      s.f_favail = v[7];
      s.f_fsid = v[8];
      s.f_flag = v[9];
      s.f_namemax = v[10];
    }
    const uint32_t f = r.getOpenFlags();
    req.open = {r.getOpenFh(), (f & 1) != 0, (f & 2) != 0, (f & 4) != 0, (f & 8) != 0,
                (f & 16) != 0 && !fds.empty() ? fds.front().get() : -1, (f & 64) != 0};
    req.copy_fd = (f & 48) == 32 && !fds.empty() ? fds.front().get() : -1;
    req.copy_tag = req.copy_fd >= 0 ? r.getCopyTag() : 0;
    req.out.assign(reinterpret_cast<const char*>(out.begin()), reinterpret_cast<const char*>(out.end()));
    req.out_size = r.getOutSize();
    req.dir_end = r.getDirEnd();
    auto changed = r.getChanged();
    if (changed.size() > kMaxChanged) return Fail(EBADMSG);
    req.changed.clear();
    req.changed.reserve(changed.size());
    for (uint64_t node : changed) req.changed.push_back(node);
    return {};
  });
}

}  // namespace ulsp::msgport
