// ConnLog: the group's connection log, one JSON line per decision of the net ULSP:
//
//   {"time":"2026-12-01T10:00:00.123456Z","group":"web","pid":4242,"argv0":"curl",
//    "call":"connect","proto":"tcp","address":"10.0.0.7","port":443,
//    "name":"example.internal","verdict":"allow","rule":"rule 2 (web.toml:14)"}
//
// A UNIX socket decision has "path" instead of address and port; a name lookup has
// call "resolve" and the addresses it gave. Each line is appended with one write(2),
// so lines from many threads never interleave. Thread-safe.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <expected>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernel/msgport/log.h"

namespace ulsp::net {

struct LogEntry {
  pid_t pid = 0;
  std::string call{};    // "connect", "bind", "sendto", "resolve", ...
  std::string proto{};   // "tcp", "udp", "unix"
  std::string address{}; // or empty
  int port = -1;         // or -1
  std::string path{};    // UNIX sockets
  std::string name{};    // the host name behind the address, or the name resolved
  std::vector<std::string> addresses{};  // resolve: what it gave
  std::string verdict{}; // "allow", "deny", "log", "group" (kept inside the group)
  std::string rule{};    // "rule 2 (FILE:LINE)", "net_default", "loopback", ...
};

class ConnLog {
 public:
  // Opens (appends to, creating) `path`; "" for no log. Fails with a message naming it.
  static std::expected<std::unique_ptr<ConnLog>, std::string> Open(const std::string& path, std::string group);

  // Writes one line (nothing when there is no log). The program name is read from
  // /proc. Never throws. A log that cannot be written (a full disk) is warned about
  // once, naming it; its lines are then counted as failures, and the first line
  // written again is {"time":...,"group":...,"call":"lost","count":N,"error":"ENOSPC"}.
  void Write(const LogEntry& e) noexcept;
  uint64_t lines() const noexcept { return lines_; }
  uint64_t failures() const noexcept { return failures_; }

  bool enabled() const noexcept { return log_.enabled(); }

 private:
  ConnLog() = default;
  std::string group_;
  std::mutex mu_;  // one writer at a time: a cut line is cut back
  LineLog log_;
  std::atomic<uint64_t> lines_{0};
  std::atomic<uint64_t> failures_{0};
};

// argv[0] of process `pid` (from /proc/PID/cmdline), or "".
std::string ProgramOf(pid_t pid);

}  // namespace ulsp::net
