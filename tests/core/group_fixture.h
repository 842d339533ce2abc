// Helpers for tests that run commands in groups: servers on the host's loopback that
// count who reached them, and `ulsp run` with a policy written for the test. Every
// server stops and every group ends by the end of the test, whatever it did.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <string>
#include <thread>

#include "tests/vfs/mount_fixture.h"

namespace ulsp::testing {

// A TCP server on 127.0.0.1 (an ephemeral port) that says "hello PORT" to each
// connection and counts them.
class HostTcpServer {
 public:
  HostTcpServer() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    ::listen(fd_, 64);
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] {
      for (;;) {
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, 50) <= 0) {
          if (stop_) return;
          continue;
        }
        const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) continue;
        ++accepted_;
        const std::string hello = "hello " + std::to_string(port_) + "\n";
        (void)!::write(c, hello.data(), hello.size());
        ::close(c);
      }
    });
  }
  ~HostTcpServer() {
    stop_ = true;
    thread_.join();
    ::close(fd_);
  }
  int port() const { return port_; }
  int accepted() const { return accepted_; }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::atomic<int> accepted_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// A UDP echo server on 127.0.0.1 that counts datagrams.
class HostUdpEcho {
 public:
  HostUdpEcho() {
    fd_ = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] {
      char buf[2048];
      for (;;) {
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, 50) <= 0) {
          if (stop_) return;
          continue;
        }
        sockaddr_storage from{};
        socklen_t flen = sizeof from;
        const ssize_t n = ::recvfrom(fd_, buf, sizeof buf, 0, reinterpret_cast<sockaddr*>(&from), &flen);
        if (n < 0) continue;
        ++received_;
        const std::string reply = "echo " + std::string(buf, static_cast<size_t>(n));
        ::sendto(fd_, reply.data(), reply.size(), 0, reinterpret_cast<sockaddr*>(&from), flen);
      }
    });
  }
  ~HostUdpEcho() {
    stop_ = true;
    thread_.join();
    ::close(fd_);
  }
  int port() const { return port_; }
  int received() const { return received_; }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::atomic<int> received_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// A UNIX stream server at a path on the host that counts connections.
class HostUnixServer {
 public:
  explicit HostUnixServer(const std::string& path) : path_(path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    path.copy(a.sun_path, sizeof a.sun_path - 1);
    ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    ::listen(fd_, 16);
    thread_ = std::thread([this] {
      for (;;) {
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, 50) <= 0) {
          if (stop_) return;
          continue;
        }
        const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) continue;
        ++accepted_;
        (void)!::write(c, "hello unix\n", 11);
        ::close(c);
      }
    });
  }
  ~HostUnixServer() {
    stop_ = true;
    thread_.join();
    ::close(fd_);
    ::unlink(path_.c_str());
  }
  int accepted() const { return accepted_; }

 private:
  std::string path_;
  int fd_ = -1;
  std::atomic<int> accepted_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// A port nothing listens on (bound, then closed).
inline int FreePort() {
  const int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(s);
  return ntohs(a.sin_port);
}

// Quotes a word for bash.
inline std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// What `ulsp run` did.
struct RunResult {
  int status = -1;
  std::string out;  // the command's stdout
  std::string err;  // stderr (the command's and ulsp's)
};

// Runs `command` (a bash command line) with `ulsp run --policy DIR/policy.toml`, the
// policy being `policy`, with the registry in DIR/run. Killed after `limit_s`.
// `wrapper` (may be empty) comes before ulsp in the command line ("setpriv ... ").
inline RunResult RunInGroup(const TempDir& dir, const std::string& policy, const std::string& command,
                            int limit_s = 60, const std::string& redirections = "", const std::string& wrapper = "") {
  std::ofstream(dir / "policy.toml") << policy;
  const std::string line = "ULSP_RUNTIME_DIR=" + dir / "run" + " timeout -s KILL " + std::to_string(limit_s) + " " +
                           wrapper + ULSP_BIN + " run --policy " + dir / "policy.toml" + " -- bash -c " + Quote(command) +
                           " > " + dir / "out" + " 2> " + dir / "err" + " " + redirections;
  RunResult r;
  r.status = Shell(line);
  r.out = Output("cat " + dir / "out");
  r.err = Output("cat " + dir / "err");
  return r;
}

// The lines of a file.
inline std::vector<std::string> Lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

}  // namespace ulsp::testing
