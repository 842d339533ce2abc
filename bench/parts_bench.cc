// Micro-benchmarks of the message ports' building blocks, with Google Benchmark:
// what one envelope costs to build and to read, one DoMsg through a direct port, one
// ring push and pop, one message-queue push and pop. All in one thread, warm caches:
// the floor under the cross-process figures of ulsp-msgport-bench. Also what a VFS
// server's scope as a caller other than root costs (AsWriter, run as root).
//
//   ulsp-parts-bench [--benchmark_filter=REGEX] [--benchmark_repetitions=N]
#include <benchmark/benchmark.h>

#include <memory>

#include "kernel/msgport/direct_port.h"
#include "kernel/msgport/message_queue.h"
#include "kernel/msgport/ring.h"
#include "kernel/msgport/shm_segment.h"
#include "kernel/msgport/thread_creds.h"

namespace {

using namespace ulsp::msgport;

constexpr uint32_t kSlotBytes = 1024;

// One cell's worth of memory, aligned as in a segment.
struct CellBuffer {
  std::unique_ptr<std::byte[]> bytes = std::make_unique<std::byte[]>(shm::Stride(kSlotBytes) + 64);
  shm::Cell* cell() {
    auto p = reinterpret_cast<uintptr_t>(bytes.get());
    return reinterpret_cast<shm::Cell*>((p + 63) / 64 * 64);
  }
};

MessagePtr Payload(int64_t size) {
  MessagePtr m = Message::Make(1);
  m->payload.resize(static_cast<size_t>(size));
  return m;
}

void BM_EncodeEnvelope(benchmark::State& state) {
  CellBuffer buf;
  MessagePtr m = Payload(state.range(0));
  for (auto _ : state) {
    bool ok = shm::EncodeCell(*buf.cell(), kSlotBytes, *m, 42, 0, 0);
    benchmark::DoNotOptimize(ok);
  }
}
BENCHMARK(BM_EncodeEnvelope)->Arg(0)->Arg(64)->Arg(512);

void BM_DecodeEnvelope(benchmark::State& state) {
  CellBuffer buf;
  MessagePtr m = Payload(state.range(0));
  if (!shm::EncodeCell(*buf.cell(), kSlotBytes, *m, 42, 0, 0)) state.SkipWithError("encode failed");
  std::vector<std::byte> payload;
  std::string why;
  for (auto _ : state) {
    auto d = shm::DecodeCell(*buf.cell(), kSlotBytes, &payload, &why);
    benchmark::DoNotOptimize(d);
  }
}
BENCHMARK(BM_DecodeEnvelope)->Arg(0)->Arg(64)->Arg(512);

class Echo final : public Server {
 public:
  void Serve(MessagePtr msg) noexcept override { Reply(std::move(msg), 0); }
};

void BM_DirectPortDoMsg(benchmark::State& state) {
  Echo echo;
  DirectPort port("direct", echo);
  MessagePtr m = Payload(64);
  for (auto _ : state) {
    auto r = DoMsg(port, std::move(m));
    m = std::move(*r);
  }
}
BENCHMARK(BM_DirectPortDoMsg);

void BM_RingPushPop(benchmark::State& state) {
  struct Cell {
    std::atomic<uint64_t> seq;
    uint64_t value;
  };
  RingIndex index;
  auto cells = std::make_unique<Cell[]>(256);
  Ring<Cell> ring(&index, reinterpret_cast<std::byte*>(cells.get()), 256, sizeof(Cell));
  ring.Initialise();
  uint64_t v = 0;
  for (auto _ : state) {
    ring.TryPush([&](Cell& c) noexcept { c.value = ++v; });
    ring.TryPop([&](Cell& c) noexcept { benchmark::DoNotOptimize(c.value); });
  }
}
BENCHMARK(BM_RingPushPop);

void BM_MessageQueuePushPop(benchmark::State& state) {
  MessageQueue queue(256);
  MessagePtr m = Payload(0);
  for (auto _ : state) {
    queue.TryPush(m);
    m = queue.TryPop();
  }
}
BENCHMARK(BM_MessageQueuePushPop);

// Arg 0: kData (a write's), 1: kFiles (a create's).
void BM_AsWriterScope(benchmark::State& state) {
  const auto kind = state.range(0) == 0 ? ulsp::AsWriter::Kind::kData : ulsp::AsWriter::Kind::kFiles;
  for (auto _ : state) {
    const ulsp::AsWriter w(1000, kind);
    benchmark::DoNotOptimize(w.active());
  }
}
BENCHMARK(BM_AsWriterScope)->Arg(0)->Arg(1);

}  // namespace

BENCHMARK_MAIN();
