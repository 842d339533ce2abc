#include "kernel/msgport/shm_segment.h"

#include <unistd.h>

#include <bit>
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <cstring>
#include <fmt/format.h>
#include <kj/exception.h>

#include "kernel/msgport/envelope.capnp.h"
#include "kernel/msgport/fd_channel.h"

namespace ulsp::msgport::shm {

Result<std::unique_ptr<Segment>> CreateSegment(const std::string& name, uint32_t slots, uint32_t slot_bytes) {
  auto seg = std::make_unique<Segment>();
  try {
    seg->object = bip::shared_memory_object(bip::create_only, name.c_str(), bip::read_write, bip::permissions(0600));
    size_t size = TotalSize(slots, slot_bytes);
    seg->object.truncate(static_cast<bip::offset_t>(size));
    seg->region = bip::mapped_region(seg->object, bip::read_write);
    // Touch every page now: a full /dev/shm fails here with a clear errno, not later
    // with SIGBUS in the middle of a message.
    if (int rc = ::posix_fallocate(seg->object.get_mapping_handle().handle, 0, static_cast<off_t>(size)); rc != 0) {
      bip::shared_memory_object::remove(name.c_str());
      return Fail(rc);  // ENOSPC when /dev/shm is full
    }
    auto* h = new (seg->region.get_address()) Header{};
    h->magic = kMagic;
    h->version = kVersion;
    h->slots = slots;
    h->slot_bytes = slot_bytes;
    h->creator_pid = static_cast<uint32_t>(::getpid());
    h->total_size = size;
    seg->Bind(slots, slot_bytes);
    seg->requests.Initialise();
    seg->replies.Initialise();
  } catch (const bip::interprocess_exception& e) {
    bip::shared_memory_object::remove(name.c_str());
    int err = e.get_native_error();
    return Fail(err != 0 ? err : EIO);
  }
  return seg;
}

Result<std::unique_ptr<Segment>> OpenSegment(const std::string& name) {
  auto seg = std::make_unique<Segment>();
  try {
    seg->object = bip::shared_memory_object(bip::open_only, name.c_str(), bip::read_write);
    bip::offset_t size = 0;
    if (!seg->object.get_size(size) || static_cast<size_t>(size) < sizeof(Header)) return Fail(EINVAL);
    seg->region = bip::mapped_region(seg->object, bip::read_write);
    const auto* h = static_cast<const volatile Header*>(seg->region.get_address());
    // The creator is not trusted: read each field once, and the layout must match the
    // mapping exactly.
    const uint64_t magic = h->magic;
    const uint32_t version = h->version, slots = h->slots, slot_bytes = h->slot_bytes;
    const uint64_t total_size = h->total_size;
    if (magic != kMagic || version != kVersion || slots == 0 || !std::has_single_bit(slots) || slot_bytes < 64 ||
        slot_bytes % 8 != 0 || slot_bytes > (64u << 20) || TotalSize(slots, slot_bytes) != static_cast<size_t>(size) ||
        total_size != static_cast<size_t>(size)) {
      return Fail(EINVAL);
    }
    seg->Bind(slots, slot_bytes);
  } catch (const bip::interprocess_exception& e) {
    int err = e.get_native_error();
    return Fail(err != 0 ? err : EIO);
  }
  return seg;
}

namespace {

// Builds a message in place in a cell: the first segment is the cell's memory. Unlike
// MallocMessageBuilder it does not zero that memory again when destroyed (which would
// wipe the envelope after it was written). A message that needs a second segment has
// outgrown the cell: it gets heap memory, and overflowed() says so.
class CellBuilder final : public capnp::MessageBuilder {
 public:
  explicit CellBuilder(kj::ArrayPtr<capnp::word> cell) : cell_(cell) {}
  kj::ArrayPtr<capnp::word> allocateSegment(capnp::uint minimum_size) override {
    if (!cell_used_ && minimum_size <= cell_.size()) {
      cell_used_ = true;
      return cell_;
    }
    overflowed_ = true;
    overflow_.emplace_back(std::max<size_t>(minimum_size, 1024));  // zeroed
    return kj::arrayPtr(overflow_.back().data(), overflow_.back().size());
  }
  bool overflowed() const { return overflowed_; }

 private:
  kj::ArrayPtr<capnp::word> cell_;
  bool cell_used_ = false;
  bool overflowed_ = false;
  std::vector<std::vector<capnp::word>> overflow_;
};

}  // namespace

// Writes an envelope for `msg` into `cell`. Returns false when it does not fit in one
// segment of the cell (then the cell is not valid).
// Never throws: it runs inside a ring push, where a cell claimed and never published
// would stall the ring.
bool EncodeCell(Cell& cell, uint32_t slot_bytes, const Message& msg, uint64_t id, int error,
                uint16_t fd_count) noexcept try {
  // Flat format: a segment table (count - 1, then the size in words), then the segment.
  auto* table = reinterpret_cast<uint32_t*>(cell.data());
  auto* words = reinterpret_cast<capnp::word*>(cell.data() + 8);
  // The builder needs zeroed memory; zero what it will use: root pointer, struct
  // (4 data words, 1 pointer), payload, and slack.
  if (!Fits(slot_bytes, msg.payload.size())) return false;
  const size_t need_words = kEnvelopeWords + (msg.payload.size() + 7) / 8;
  std::memset(words, 0, need_words * sizeof(capnp::word));
  CellBuilder builder(kj::arrayPtr(words, need_words));
  auto env = builder.initRoot<wire::Envelope>();
  env.setId(id);
  env.setCommand(msg.command);
  env.setFlags(msg.flags() & (kMsgSync | kMsgAborted));
  env.setError(error);
  env.setFdCount(fd_count);
  env.setDeadlineNs(msg.deadline == kNoDeadline
                        ? 0
                        : std::chrono::duration_cast<std::chrono::nanoseconds>(msg.deadline.time_since_epoch()).count());
  env.setPayload(kj::arrayPtr(reinterpret_cast<const kj::byte*>(msg.payload.data()), msg.payload.size()));
  auto segments = builder.getSegmentsForOutput();
  if (builder.overflowed() || segments.size() != 1 || segments[0].begin() != words) return false;
  table[0] = 0;
  table[1] = static_cast<uint32_t>(segments[0].size());
  cell.id = id;
  cell.len = static_cast<uint32_t>(8 + segments[0].size() * sizeof(capnp::word));
  return true;
} catch (...) {
  return false;
}

void WriteRawCell(Cell& cell, uint64_t id, std::span<const std::byte> bytes, uint32_t claimed_len,
                  uint32_t slot_bytes) {
  cell.id = id;
  cell.len = claimed_len;
  if (!bytes.empty()) std::memcpy(cell.data(), bytes.data(), std::min<size_t>(bytes.size(), slot_bytes));
}


// Reads the envelope in `cell`, copying the payload into `payload`. Everything in the
// cell is the other process's and is checked: EBADMSG for anything malformed, with
// the reason in *why.
Result<Decoded> DecodeCell(Cell& cell, uint32_t slot_bytes, std::vector<std::byte>* payload,
                           std::string* why) noexcept {
  const uint32_t len = cell.len;  // read once
  auto bad = [why](std::string reason) {
    if (why != nullptr) *why = std::move(reason);
    return Fail(EBADMSG);
  };
  if (len < 16 || len > slot_bytes || len % 8 != 0) {
    return bad("length " + std::to_string(len) + " is not a whole number of words from 16 to " +
               std::to_string(slot_bytes));
  }
  try {
    capnp::ReaderOptions options;
    options.traversalLimitInWords = len / 8;
    options.nestingLimit = 8;
    capnp::FlatArrayMessageReader reader(
        kj::arrayPtr(reinterpret_cast<const capnp::word*>(cell.data()), len / sizeof(capnp::word)), options);
    auto env = reader.getRoot<wire::Envelope>();
    Decoded d{env.getId(), env.getCommand(), env.getFlags(), env.getError(), env.getFdCount(), env.getDeadlineNs()};
    if (d.id != cell.id) return bad(fmt::format("envelope id {:#x} does not match the cell's {:#x}", d.id, cell.id));
    if (d.error < 0 || d.error > 4095) return bad("error " + std::to_string(d.error) + " is not an errno");
    if (d.fd_count > FdChannel::kMaxFds) return bad("claims " + std::to_string(d.fd_count) + " descriptors");
    auto data = env.getPayload();
    if (payload != nullptr) {
      payload->resize(data.size());
      if (data.size() != 0) std::memcpy(payload->data(), data.begin(), data.size());
    }
    return d;
  } catch (const kj::Exception& e) {
    return bad(std::string(e.getDescription().cStr()));
  } catch (const std::bad_alloc&) {
    return Fail(ENOMEM);
  }
}

}  // namespace ulsp::msgport::shm
