// The shared-memory segment behind ShmClientPort and ShmServerPort: its layout (a
// header and two rings of fixed-size cells, requests and replies), its creation and
// checked opening, and the encoding of one message's envelope into a cell and back.
// Everything read from a segment was written by another process and is validated.
#pragma once

#include <atomic>
#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/event_count.h"
#include "kernel/msgport/message.h"
#include "kernel/msgport/ring.h"

namespace ulsp::msgport::shm {

namespace bip = boost::interprocess;

constexpr uint64_t kMagic = 0x6d68732d70736c75ULL;  // "ulsp-shm"
constexpr uint32_t kVersion = 1;

// A request envelope with this command is no message: it asks the server to mark the
// message in service with the same id ABORTED. It gets no reply. Families' commands
// stay below 0xffff0000.
constexpr uint32_t kAbortCommand = 0xffffffffu;

// One ring cell. Its sequence number (the ring's) has a cache line to itself: the
// consumer spins reading it, and if the producer's writes of the message shared that
// line, the line would move between the two cores once per store. Then the message
// id (outside the envelope, so a corrupt envelope can still be answered), the
// envelope's length, and the envelope: a one-segment Cap'n Proto flat message.
struct Cell {
  alignas(64) std::atomic<uint64_t> seq;
  alignas(64) uint64_t id;
  uint32_t len;
  uint32_t reserved;
  static constexpr size_t kDataOffset = 64 + 16;
  std::byte* data() noexcept { return reinterpret_cast<std::byte*>(this) + kDataOffset; }
};
static_assert(offsetof(Cell, len) + 8 == Cell::kDataOffset);

// The segment's first bytes: what both sides check, the reply-polling lease, and the
// two rings' indices and wake-up words, each on a cache line of its own.
struct Header {
  uint64_t magic;
  uint32_t version;
  uint32_t slots;
  uint32_t slot_bytes;
  uint32_t creator_pid;
  uint64_t total_size;
  // A client thread polls the reply ring until this CLOCK_MONOTONIC time (ns; 0: none
  // does): until then the server need not wake the client's reply thread. Written
  // by the client at most once per half lease while it polls, so the line the server
  // reads after every reply stays shared instead of moving between cores.
  alignas(64) std::atomic<int64_t> reply_poll_until_ns;
  RingIndex requests;
  alignas(64) EventCount requests_ec;  // the server sleeps here
  RingIndex replies;
  alignas(64) EventCount replies_ec;  // the client's reply thread sleeps here
};

constexpr size_t RoundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }
constexpr size_t Stride(uint32_t slot_bytes) { return RoundUp(Cell::kDataOffset + slot_bytes, 64); }
constexpr size_t TotalSize(uint32_t slots, uint32_t slot_bytes) {
  return RoundUp(sizeof(Header), 64) + 2 * size_t{slots} * Stride(slot_bytes);
}

// The mapping and the views of its two rings. Owns the Boost.Interprocess objects.
//
// The layout (slots, slot size) is read from the header once, checked, and kept here:
// the header stays writable by the other process, which must not be able to move a
// cell's bounds under us afterwards.
struct Segment {
  bip::shared_memory_object object;
  bip::mapped_region region;
  Header* header = nullptr;
  Ring<Cell> requests;
  Ring<Cell> replies;

  // Views the mapping with a checked layout.
  void Bind(uint32_t slots, uint32_t slot_bytes) {
    header = static_cast<Header*>(region.get_address());
    slot_bytes_ = slot_bytes;
    auto* base = static_cast<std::byte*>(region.get_address()) + RoundUp(sizeof(Header), 64);
    size_t stride = Stride(slot_bytes);
    requests = Ring<Cell>(&header->requests, base, slots, stride);
    replies = Ring<Cell>(&header->replies, base + slots * stride, slots, stride);
  }
  uint32_t slot_bytes() const { return slot_bytes_; }

 private:
  uint32_t slot_bytes_ = 0;
};

// Words an Envelope needs beyond its payload: the root pointer and the struct (4 data
// words, 1 pointer). The builder gets exactly this much zeroed memory, so nothing
// else of the cell is touched; were the schema to grow, the builder would overflow
// and EncodeCell fail loudly (the tests would see it), never write past the cell.
constexpr size_t kEnvelopeWords = 6;
constexpr bool Fits(uint32_t slot_bytes, size_t payload_bytes) {
  return kEnvelopeWords + (payload_bytes + 7) / 8 <= (slot_bytes - 8) / 8;
}

struct Decoded {
  uint64_t id = 0;
  uint32_t command = 0;
  uint32_t flags = 0;
  int32_t error = 0;
  uint16_t fd_count = 0;
  int64_t deadline_ns = 0;
};

// Creates and initialises a segment named `name` (/dev/shm/NAME), mode 0600, with
// every page allocated now: a full /dev/shm fails here (ENOSPC), not later with
// SIGBUS in the middle of a message. Other failures: the errno of shm_open or mmap.
Result<std::unique_ptr<Segment>> CreateSegment(const std::string& name, uint32_t slots, uint32_t slot_bytes);
// Maps an existing segment and checks its layout against the mapping (the creator is
// not trusted): EINVAL for anything that is not a valid port segment.
Result<std::unique_ptr<Segment>> OpenSegment(const std::string& name);

// Writes an envelope for `msg` into `cell` (and the cell's id and length). Returns
// false when it does not fit in one segment of the cell; never throws.
bool EncodeCell(Cell& cell, uint32_t slot_bytes, const Message& msg, uint64_t id, int error,
                uint16_t fd_count) noexcept;
// Test hook: raw bytes in place of an envelope, with the length the cell claims.
void WriteRawCell(Cell& cell, uint64_t id, std::span<const std::byte> bytes, uint32_t claimed_len,
                  uint32_t slot_bytes);
// Reads the envelope in `cell`, copying the payload into `payload`. EBADMSG, with the
// reason in *why, for anything malformed; ENOMEM when the payload cannot be held.
Result<Decoded> DecodeCell(Cell& cell, uint32_t slot_bytes, std::vector<std::byte>* payload,
                           std::string* why) noexcept;

}  // namespace ulsp::msgport::shm
