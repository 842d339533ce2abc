// SpawnedServer: a shared-memory port whose server is a real shm_test_server process.
// The destructor closes the port and kills and reaps the process, so a test that
// fails halfway leaves nothing running.
#pragma once

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <memory>
#include <string>

#include "kernel/msgport/shm_port.h"

namespace ulsp::msgport::testing {

struct SpawnedServer {
  std::unique_ptr<ShmClientPort> port;
  pid_t pid = -1;

  SpawnedServer() = default;
  SpawnedServer(SpawnedServer&& o) noexcept : port(std::move(o.port)), pid(std::exchange(o.pid, -1)) {}
  ~SpawnedServer() {
    port.reset();
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }

  // Kills the server with SIGKILL and reaps it, leaving the port to notice.
  void Kill() {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    pid = -1;
  }
};

// Creates a port and starts its server. Returns an empty port on failure (and says
// why on stderr).
inline SpawnedServer SpawnServer(const ShmPortOptions& options = {}, std::string name = "test") {
  SpawnedServer s;
  auto port = ShmClientPort::Create(std::move(name), options);
  if (!port) {
    std::fprintf(stderr, "ShmClientPort::Create: %s\n", port.error().Describe().c_str());
    return s;
  }
  UniqueFd theirs = (*port)->TakeServerSocket();
  // Move it above the low numbers, then dup2 to 3 in the child (dup2 clears CLOEXEC).
  UniqueFd high(::fcntl(theirs.get(), F_DUPFD_CLOEXEC, 100));
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, high.get(), 3);
  std::string segment = (*port)->segment_name();
  const char* path = ULSP_SHM_TEST_SERVER;
  char* argv[] = {const_cast<char*>(path), segment.data(), const_cast<char*>("3"), nullptr};
  int rc = ::posix_spawn(&s.pid, path, &fa, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    std::fprintf(stderr, "posix_spawn %s: %s\n", path, strerror(rc));
    s.pid = -1;
    return s;
  }
  theirs.Reset();
  high.Reset();
  if (auto ok = (*port)->WaitForServer(After(std::chrono::seconds(10)), s.pid); !ok) {
    std::fprintf(stderr, "WaitForServer: %s\n", ok.error().Describe().c_str());
    return s;
  }
  s.port = std::move(*port);
  return s;
}

}  // namespace ulsp::msgport::testing
