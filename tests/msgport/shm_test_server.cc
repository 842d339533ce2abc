// A small ULSP process for the shared-memory port tests:
//   shm_test_server SEGMENT_NAME SOCKET_FD
// attaches to the segment and serves the commands in test_commands.h until the
// client goes away.
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "kernel/msgport/shm_port.h"
#include "tests/msgport/test_commands.h"

namespace {

using namespace ulsp::msgport;
using namespace ulsp::msgport::testing;

class TestServer final : public Server {
 public:
  explicit TestServer(ShmServerPort& port) : port_(port) {}
  // Joins the handlers still running: the port must outlive their messages.
  ~TestServer() {
    for (auto& t : waiters_) t.join();
  }

  void Serve(MessagePtr msg) noexcept override {
    switch (msg->command) {
      case kEcho:
        Reply(std::move(msg), 0);
        return;
      case kSleepUs:
        std::this_thread::sleep_for(std::chrono::microseconds(From<uint32_t>(msg->payload)));
        Reply(std::move(msg), 0);
        return;
      case kErrno:
        Reply(std::move(msg), static_cast<int>(From<uint32_t>(msg->payload)));
        return;
      case kWriteToFd: {
        if (msg->fds.size() != 1) return Reply(std::move(msg), EBADF);
        ssize_t n = ::write(msg->fds[0].get(), msg->payload.data(), msg->payload.size());
        msg->fds.clear();
        msg->payload = Bytes(static_cast<int64_t>(n));
        Reply(std::move(msg), n < 0 ? errno : 0);
        return;
      }
      case kOpenFile: {
        std::string path(reinterpret_cast<const char*>(msg->payload.data()), msg->payload.size());
        int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) return Reply(std::move(msg), errno);
        msg->fds.emplace_back(fd);
        msg->payload.clear();
        Reply(std::move(msg), 0);
        return;
      }
      case kCorruptReply: {
        std::vector<std::byte> garbage(64, std::byte{0xA5});
        port_.ReplyRawForTest(std::move(msg), garbage, static_cast<uint32_t>(garbage.size()));
        return;
      }
      case kScribble: {
        port_.ScribbleForTest();
        std::vector<std::byte> garbage(64, std::byte{0x5A});
        port_.ReplyRawForTest(std::move(msg), garbage, 64u << 20);
        return;
      }
      case kWaitForAbort:
        // Off the serving thread, which must stay free to take the abort envelope.
        waiters_.emplace_back([m = std::move(msg)]() mutable {
          const auto end = Clock::now() + std::chrono::seconds(5);
          while (!m->aborted() && Clock::now() < end) std::this_thread::sleep_for(std::chrono::microseconds(200));
          const int error = m->aborted() ? ECANCELED : ETIMEDOUT;
          Reply(std::move(m), error);
        });
        return;
      case kCrash:
        ::_exit(9);
      case kPid:
        msg->payload = Bytes(static_cast<int32_t>(::getpid()));
        Reply(std::move(msg), 0);
        return;
      case kBigReply:
        msg->payload.assign(From<uint32_t>(msg->payload), std::byte{7});
        Reply(std::move(msg), 0);
        return;
      default:
        Reply(std::move(msg), ENOSYS);
    }
  }

 private:
  ShmServerPort& port_;
  std::vector<std::thread> waiters_;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s SEGMENT_NAME SOCKET_FD\n", argv[0]);
    return 2;
  }
  auto port = ShmServerPort::Attach(argv[1], ulsp::UniqueFd(std::atoi(argv[2])));
  if (!port) {
    std::fprintf(stderr, "shm_test_server: cannot attach to %s: %s\n", argv[1], port.error().Describe().c_str());
    return 1;
  }
  TestServer server(**port);
  (*port)->Serve(server);
  return 0;
}
