// Message-port benchmark: round-trip latency (DoMsg) through each port kind and, in
// the same run, the baselines — pipe and UNIX socketpair ping-pong between two
// processes, Boost.Interprocess message_queue between two processes — then throughput
// with 64 messages in flight. Prints p50/p99, ratios, and the targets.
//
//   ulsp-msgport-bench [--seconds S] [--payload BYTES]
//
// The machines are shared and noisy: compare ratios within one run, not figures
// across runs. The shared-memory server is this same program, started as
//   ulsp-msgport-bench --serve SEGMENT FD
#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <boost/interprocess/ipc/message_queue.hpp>
#include <cinttypes>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernel/msgport/direct_port.h"
#include "kernel/msgport/shm_port.h"
#include "kernel/msgport/thread_port.h"

namespace {

using namespace ulsp;
using namespace ulsp::msgport;
namespace bip = boost::interprocess;
using Nanos = std::chrono::nanoseconds;

double g_seconds = 2.0;
size_t g_payload = 64;
std::string g_only;  // "shm-latency" or "shm-throughput": that alone (for profiling)

class Echo final : public Server {
 public:
  void Serve(MessagePtr msg) noexcept override { Reply(std::move(msg), 0); }
};

struct Latency {
  std::string name;
  double p50_ns = 0, p99_ns = 0;
  uint64_t count = 0;
};

// Times `one` (one round trip) repeatedly for g_seconds. With batch > 1, each sample
// is the mean of `batch` consecutive round trips (for operations near the clock's
// own cost, ~20 ns).
Latency Measure(const std::string& name, const std::function<void()>& one, int batch = 1) {
  for (int i = 0; i < 2000; ++i) one();  // warm up: caches, spinning peers, page faults
  std::vector<double> samples;
  samples.reserve(1 << 20);
  const auto end = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(g_seconds));
  uint64_t count = 0;
  while (Clock::now() < end) {
    for (int k = 0; k < 256; ++k) {
      auto t0 = Clock::now();
      for (int b = 0; b < batch; ++b) one();
      auto t1 = Clock::now();
      samples.push_back(static_cast<double>(std::chrono::duration_cast<Nanos>(t1 - t0).count()) / batch);
      count += static_cast<uint64_t>(batch);
    }
  }
  std::sort(samples.begin(), samples.end());
  Latency l{name};
  l.p50_ns = samples[samples.size() / 2];
  l.p99_ns = samples[samples.size() * 99 / 100];
  l.count = count;
  return l;
}

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "ulsp-msgport-bench: %s failed: %s\n", what, std::strerror(errno));
    std::exit(2);
  }
}

// A child process that lives no longer than this one.
pid_t Fork() {
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  Check(pid >= 0, "fork");
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(0);
  }
  return pid;
}

void Reap(pid_t pid) {
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
}

void ReadFull(int fd, char* buf, size_t n) {
  while (n > 0) {
    ssize_t r = ::read(fd, buf, n);
    if (r <= 0) {
      if (r < 0 && errno == EINTR) continue;
      ::_exit(0);
    }
    buf += r;
    n -= static_cast<size_t>(r);
  }
}
void WriteFull(int fd, const char* buf, size_t n) {
  while (n > 0) {
    ssize_t r = ::write(fd, buf, n);
    if (r <= 0) {
      if (r < 0 && errno == EINTR) continue;
      ::_exit(0);
    }
    buf += r;
    n -= static_cast<size_t>(r);
  }
}

// Ping-pong over a pair of fds (pipes or one socketpair) with a forked echo process.
Latency FdPingPong(const std::string& name, int parent_rd, int parent_wr, int child_rd, int child_wr) {
  pid_t pid = Fork();
  std::vector<char> buf(g_payload);
  if (pid == 0) {
    for (;;) {
      ReadFull(child_rd, buf.data(), buf.size());
      WriteFull(child_wr, buf.data(), buf.size());
    }
  }
  Latency l = Measure(name, [&] {
    WriteFull(parent_wr, buf.data(), buf.size());
    ReadFull(parent_rd, buf.data(), buf.size());
  });
  Reap(pid);
  return l;
}

Latency PipeBaseline() {
  int a[2], b[2];
  Check(::pipe(a) == 0 && ::pipe(b) == 0, "pipe");
  Latency l = FdPingPong("pipe ping-pong (2 processes)", b[0], a[1], a[0], b[1]);
  for (int fd : {a[0], a[1], b[0], b[1]}) ::close(fd);
  return l;
}

Latency SocketpairBaseline() {
  int sv[2];
  Check(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
  Latency l = FdPingPong("UNIX socketpair ping-pong (2 processes)", sv[0], sv[0], sv[1], sv[1]);
  ::close(sv[0]);
  ::close(sv[1]);
  return l;
}

Latency MessageQueueBaseline() {
  std::string req = "ulsp-bench-mq-req-" + std::to_string(::getpid());
  std::string rep = "ulsp-bench-mq-rep-" + std::to_string(::getpid());
  bip::message_queue::remove(req.c_str());
  bip::message_queue::remove(rep.c_str());
  bip::message_queue to(bip::create_only, req.c_str(), 64, g_payload);
  bip::message_queue from(bip::create_only, rep.c_str(), 64, g_payload);
  std::vector<char> buf(g_payload);
  pid_t pid = Fork();
  if (pid == 0) {
    bip::message_queue in(bip::open_only, req.c_str());
    bip::message_queue out(bip::open_only, rep.c_str());
    for (;;) {
      size_t n;
      unsigned prio;
      in.receive(buf.data(), buf.size(), n, prio);
      out.send(buf.data(), n, 0);
    }
  }
  Latency l = Measure("Boost.Interprocess message_queue (2 processes)", [&] {
    size_t n;
    unsigned prio;
    to.send(buf.data(), buf.size(), 0);
    from.receive(buf.data(), buf.size(), n, prio);
  });
  Reap(pid);
  bip::message_queue::remove(req.c_str());
  bip::message_queue::remove(rep.c_str());
  return l;
}

// The floor: two processes bouncing one cache line (a spinning counter), no queue,
// no encoding, no sleeping. What any shared-memory design pays at least.
Latency SpinPingPongBaseline() {
  void* mem = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  Check(mem != MAP_FAILED, "mmap");
  auto* word = new (mem) std::atomic<uint64_t>(0);
  pid_t pid = Fork();
  if (pid == 0) {
    for (uint64_t expect = 1;; expect += 2) {
      while (word->load(std::memory_order_acquire) != expect) CpuRelax();
      word->store(expect + 1, std::memory_order_release);
    }
  }
  uint64_t next = 1;
  Latency l = Measure("spinning one-cache-line ping-pong (2 processes)", [&] {
    word->store(next, std::memory_order_release);
    while (word->load(std::memory_order_acquire) != next + 1) CpuRelax();
    next += 2;
  });
  Reap(pid);
  ::munmap(mem, 4096);
  return l;
}

// The shared-memory server: this program, re-executed with --serve.
struct ShmServer {
  std::unique_ptr<ShmClientPort> port;
  pid_t pid = -1;
  ~ShmServer() {
    port.reset();
    if (pid > 0) Reap(pid);
  }
};

std::unique_ptr<ShmServer> StartShmServer(const char* self) {
  auto s = std::make_unique<ShmServer>();
  auto port = ShmClientPort::Create("bench", {.slots = 256, .slot_bytes = 1024});
  Check(port.has_value(), "ShmClientPort::Create");
  UniqueFd theirs = (*port)->TakeServerSocket();
  std::string segment = (*port)->segment_name();
  s->pid = Fork();
  if (s->pid == 0) {
    if (const char* cpu = std::getenv("ULSP_BENCH_SERVER_CPU")) {  // placement experiments
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(std::strtoul(cpu, nullptr, 10), &set);
      ::sched_setaffinity(0, sizeof set, &set);
    }
    ::dup2(theirs.get(), 3);  // clears close-on-exec
    ::execl(self, self, "--serve", segment.c_str(), "3", nullptr);
    ::_exit(127);
  }
  theirs.Reset();
  Check((*port)->WaitForServer(After(std::chrono::seconds(10)), s->pid).has_value(), "WaitForServer");
  s->port = std::move(*port);
  return s;
}

int Serve(const char* segment, int fd) {
  auto port = ShmServerPort::Attach(segment, UniqueFd(fd));
  if (!port) return 1;
  Echo echo;
  (*port)->Serve(echo);
  return 0;
}

Latency PortLatency(const std::string& name, Port& port, int batch = 1) {
  MessagePtr msg = Message::Make(1);
  msg->payload.resize(g_payload);
  return Measure(
      name,
      [&] {
        auto r = DoMsg(port, std::move(msg));
        if (!r || (*r)->error != 0) {
          std::fprintf(stderr, "ulsp-msgport-bench: %s: round trip failed\n", port.name().c_str());
          std::exit(2);
        }
        msg = std::move(*r);
      },
      batch);
}

// Messages per second with `in_flight` outstanding at all times.
double PortThroughput(Port& port, int in_flight) {
  ReplyQueue replies("bench-replies", 1024);
  replies.Help(port);
  for (int i = 0; i < in_flight; ++i) {
    MessagePtr m = Message::Make(1);
    m->payload.resize(g_payload);
    m->reply_port = &replies;
    Send(port, std::move(m));
  }
  uint64_t done = 0;
  const auto start = Clock::now();
  const auto end = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(g_seconds));
  auto now = start;
  while (now < end) {
    for (int k = 0; k < 1024; ++k) {
      MessagePtr r = replies.Wait(After(std::chrono::seconds(10)));
      if (!r || r->error != 0) {
        std::fprintf(stderr, "ulsp-msgport-bench: %s: throughput reply failed\n", port.name().c_str());
        std::exit(2);
      }
      ++done;
      Send(port, std::move(r));
    }
    now = Clock::now();
  }
  const double secs = std::chrono::duration<double>(now - start).count();
  for (int i = 0; i < in_flight; ++i) (void)replies.Wait(After(std::chrono::seconds(10)));
  return static_cast<double>(done) / secs;
}

double SocketpairThroughput(int in_flight) {
  int sv[2];
  Check(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
  std::vector<char> buf(g_payload);
  pid_t pid = Fork();
  if (pid == 0) {
    for (;;) {
      ReadFull(sv[1], buf.data(), buf.size());
      WriteFull(sv[1], buf.data(), buf.size());
    }
  }
  for (int i = 0; i < in_flight; ++i) WriteFull(sv[0], buf.data(), buf.size());
  uint64_t done = 0;
  const auto start = Clock::now();
  const auto end = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(g_seconds));
  auto now = start;
  while (now < end) {
    for (int k = 0; k < 1024; ++k) {
      ReadFull(sv[0], buf.data(), buf.size());
      WriteFull(sv[0], buf.data(), buf.size());
      ++done;
    }
    now = Clock::now();
  }
  Reap(pid);
  ::close(sv[0]);
  ::close(sv[1]);
  return static_cast<double>(done) / std::chrono::duration<double>(now - start).count();
}

const char* Verdict(bool ok) { return ok ? "met" : "NOT MET"; }

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "--serve") == 0) return Serve(argv[2], std::atoi(argv[3]));
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
      g_seconds = std::atof(argv[++i]);
    } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
      g_only = argv[++i];
    } else if (std::strcmp(argv[i], "--payload") == 0 && i + 1 < argc) {
      g_payload = static_cast<size_t>(std::atol(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--seconds S] [--payload BYTES] [--only shm-latency|shm-throughput]\n", argv[0]);
      return 2;
    }
  }
  std::printf("ulsp message-port benchmark: %zu-byte payload, %.1f s per measurement, %ld CPUs\n\n", g_payload,
              g_seconds, ::sysconf(_SC_NPROCESSORS_ONLN));

  if (const char* cpu = std::getenv("ULSP_BENCH_CLIENT_CPU")) {  // placement experiments
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(std::strtoul(cpu, nullptr, 10), &set);
    ::sched_setaffinity(0, sizeof set, &set);
  }
  Echo echo;
  DirectPort direct("direct", echo);
  ThreadPort thread("thread", echo, 1024);
  auto shm = StartShmServer("/proc/self/exe");

  if (g_only == "shm-latency") {
    Latency l = PortLatency("shared-memory port (2 processes)", *shm->port);
    std::printf("%s: p50 %.0f ns, p99 %.0f ns\n", l.name.c_str(), l.p50_ns, l.p99_ns);
    return 0;
  }
  if (g_only == "spin") {
    Latency l = SpinPingPongBaseline();
    std::printf("%s: p50 %.0f ns, p99 %.0f ns\n", l.name.c_str(), l.p50_ns, l.p99_ns);
    return 0;
  }
  if (g_only == "shm-throughput") {
    std::printf("shared-memory port, 64 in flight: %.2f M msg/s\n", PortThroughput(*shm->port, 64) / 1e6);
    return 0;
  }

  std::vector<Latency> rows;
  rows.push_back(PortLatency("direct port (same thread)", direct, 64));
  rows.push_back(PortLatency("thread port (2 threads)", thread));
  rows.push_back(PortLatency("shared-memory port (2 processes)", *shm->port));
  rows.push_back(PipeBaseline());
  rows.push_back(SocketpairBaseline());
  rows.push_back(MessageQueueBaseline());
  rows.push_back(SpinPingPongBaseline());
  const Latency& d = rows[0];
  const Latency& s = rows[2];
  const Latency& sp = rows[4];

  std::printf("Round trip (DoMsg, or write+read for baselines)\n");
  std::printf("  %-48s %10s %10s %14s\n", "", "p50", "p99", "p50 vs shm");
  for (const auto& r : rows) {
    std::printf("  %-48s %8.0f ns %8.0f ns %13.1fx\n", r.name.c_str(), r.p50_ns, r.p99_ns, r.p50_ns / s.p50_ns);
  }
  std::printf("  (the direct port's samples are means of 64 consecutive calls: one call is near the clock's cost)\n\n");

  std::printf("Throughput, 64 messages in flight\n");
  const double shm_tput = PortThroughput(*shm->port, 64);
  const double thread_tput = PortThroughput(thread, 64);
  const double sp_tput = SocketpairThroughput(64);
  std::printf("  %-48s %10.2f M msg/s\n", "shared-memory port (2 processes)", shm_tput / 1e6);
  std::printf("  %-48s %10.2f M msg/s\n", "thread port (2 threads)", thread_tput / 1e6);
  std::printf("  %-48s %10.2f M msg/s\n", "UNIX socketpair, pipelined (2 processes)", sp_tput / 1e6);
  std::printf("  shared-memory port / socketpair: %.1fx\n\n", shm_tput / sp_tput);

  std::printf("Targets (issue 2)\n");
  std::printf("  shared-memory p50 <= 1 us:                 %7.0f ns   %s\n", s.p50_ns, Verdict(s.p50_ns <= 1000));
  std::printf("  shared-memory >= 8x faster than socketpair: %6.1fx      %s\n", sp.p50_ns / s.p50_ns,
              Verdict(sp.p50_ns / s.p50_ns >= 8));
  std::printf("  direct port <= 50 ns:                       %6.1f ns   %s\n", d.p50_ns, Verdict(d.p50_ns <= 50));
  std::printf("  >= 2 M msg/s with 64 in flight (shm):       %6.2f M/s  %s\n", shm_tput / 1e6,
              Verdict(shm_tput >= 2e6));
  return 0;
}
