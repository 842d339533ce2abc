// Ring: a bounded multi-producer multi-consumer queue of fixed-size cells (Dmitry
// Vyukov's algorithm: one sequence number per cell, no locks, no allocation). The
// storage is external, so the same code runs over heap memory (ThreadPort, ReplyQueue)
// and over a shared-memory segment between processes (ShmPort), where a cell holds a
// whole encoded message and is filled and read in place.
//
// A Cell type starts with `std::atomic<uint64_t> seq`; cells are `stride` bytes apart.
// Thread-safe: any number of threads (or processes) may push and pop at once.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <new>

namespace ulsp::msgport {

// Asks for a cache line with intent to write (PREFETCHW), so a later store does not
// miss. GCC's __builtin_prefetch(p, 1) emits it only when compiling for a CPU that
// has it, else a read prefetch, which leaves the line shared and useless to a writer.
// CPUs without PREFETCHW execute this encoding as a no-op.
inline void PrefetchForWrite(const void* p) noexcept { asm volatile("prefetchw %0" : : "m"(*static_cast<const char*>(p))); }

// The two indices of a ring, each on its own cache line. Lives beside the cells.
struct RingIndex {
  alignas(64) std::atomic<uint64_t> tail{0};  // next position to push
  alignas(64) std::atomic<uint64_t> head{0};  // next position to pop
};

template <class Cell>
class Ring {
 public:
  Ring() = default;
  // Views `capacity` cells (a power of two) of `stride` bytes at `cells`.
  Ring(RingIndex* index, std::byte* cells, size_t capacity, size_t stride) noexcept
      : index_(index), cells_(cells), mask_(capacity - 1), stride_(stride) {}

  // Initialises the cells' sequence numbers; once, by the creator, before any use.
  void Initialise() noexcept {
    for (uint64_t i = 0; i <= mask_; ++i) At(i).seq.store(i, std::memory_order_relaxed);
    index_->head.store(0, std::memory_order_relaxed);
    index_->tail.store(0, std::memory_order_release);
  }

  size_t capacity() const noexcept { return mask_ + 1; }

  // Retries of one push or pop while other parties move the index. Honest contention
  // between a few threads settles in a handful.
  static constexpr int kMaxRetries = 1 << 16;

  // Claims a free cell, calls fill(cell) to write it in place, publishes it. Returns
  // false, without calling fill, when the ring is full — or when the indices stay
  // inconsistent for kMaxRetries tries, which only a peer that scribbled on a shared
  // ring causes: the caller is never kept spinning by the other process.
  template <class Fill>
  bool TryPush(Fill&& fill) noexcept(noexcept(fill(std::declval<Cell&>()))) {
    uint64_t pos = index_->tail.load(std::memory_order_relaxed);
    Cell* cell;
    for (int tries = 0;; ++tries) {
      if (tries == kMaxRetries) return false;
      cell = &At(pos);
      uint64_t seq = cell->seq.load(std::memory_order_acquire);
      auto diff = static_cast<int64_t>(seq - pos);
      if (diff == 0) {
        if (index_->tail.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) break;
      } else if (diff < 0) {
        return false;
      } else {
        pos = index_->tail.load(std::memory_order_relaxed);
      }
    }
    fill(*cell);
    cell->seq.store(pos + 1, std::memory_order_release);
    // Prepare the next push while nobody waits. Its sequence number is read then:
    // fetch it now (shared; the consumer may be spinning on it, so not for writing).
    // Its later lines are only written: take them now, and writing them costs no miss.
    const auto* next = reinterpret_cast<const std::byte*>(&At(pos + 1));
    __builtin_prefetch(next);
    for (size_t off = 64; off < stride_ && off < 256; off += 64) PrefetchForWrite(next + off);
    return true;
  }

  // Takes the oldest cell, calls take(cell) to read it in place, frees it. Returns
  // false, without calling take, when the ring is empty (or, as for TryPush, its
  // indices stay inconsistent).
  template <class Take>
  bool TryPop(Take&& take) noexcept(noexcept(take(std::declval<Cell&>()))) {
    uint64_t pos = index_->head.load(std::memory_order_relaxed);
    Cell* cell;
    for (int tries = 0;; ++tries) {
      if (tries == kMaxRetries) return false;
      cell = &At(pos);
      uint64_t seq = cell->seq.load(std::memory_order_acquire);
      auto diff = static_cast<int64_t>(seq - (pos + 1));
      if (diff == 0) {
        if (index_->head.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) break;
      } else if (diff < 0) {
        return false;
      } else {
        pos = index_->head.load(std::memory_order_relaxed);
      }
    }
    return Consume(cell, pos, take);
  }

  // TryPop for a ring with one consumer at a time (the caller guarantees it): the
  // head moves with a plain store, no compare-and-swap.
  template <class Take>
  bool TryPopSingleConsumer(Take&& take) noexcept(noexcept(take(std::declval<Cell&>()))) {
    const uint64_t pos = index_->head.load(std::memory_order_relaxed);
    Cell* cell = &At(pos);
    // Anything but "published for pos" is empty, or a peer's scribbling: not ours.
    if (cell->seq.load(std::memory_order_acquire) != pos + 1) return false;
    index_->head.store(pos + 1, std::memory_order_relaxed);
    return Consume(cell, pos, take);
  }

  // Cells pushed and not yet popped (a snapshot).
  uint64_t Depth() const noexcept {
    const uint64_t head = index_->head.load(std::memory_order_acquire);
    const uint64_t tail = index_->tail.load(std::memory_order_acquire);
    return tail > head ? tail - head : 0;
  }

  // True when a pop would find a published cell now (a hint under concurrency).
  bool HasReady() const noexcept {
    uint64_t pos = index_->head.load(std::memory_order_seq_cst);
    return At(pos).seq.load(std::memory_order_seq_cst) == pos + 1;
  }

 private:
  // Reads the claimed cell at pos with take, then frees it for the producers.
  template <class Take>
  bool Consume(Cell* cell, uint64_t pos, Take& take) noexcept(noexcept(take(std::declval<Cell&>()))) {
    // A cell larger than a cache line was written by another core: ask for all its
    // lines at once, so reading it pays one miss's latency instead of one per line.
    // And the next cell's sequence number, which the next pop (or the consumer's
    // spinning) reads first.
    for (size_t off = 64; off < stride_ && off < 256; off += 64) {
      __builtin_prefetch(reinterpret_cast<const std::byte*>(cell) + off);
    }
    __builtin_prefetch(&At(pos + 1));
    take(*cell);
    cell->seq.store(pos + mask_ + 1, std::memory_order_release);
    return true;
  }

  Cell& At(uint64_t pos) const noexcept {
    return *std::launder(reinterpret_cast<Cell*>(cells_ + (pos & mask_) * stride_));
  }

  RingIndex* index_ = nullptr;
  std::byte* cells_ = nullptr;
  uint64_t mask_ = 0;
  size_t stride_ = 0;
};

}  // namespace ulsp::msgport
