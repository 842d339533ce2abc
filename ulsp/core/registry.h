// The registry behind `ulsp ps`: every running ulsp process that serves something (an
// `ulsp run` supervisor, a background or foreground `ulsp mount`) keeps a control
// socket in its own directory under the runtime directory (/run/ulsp/PID/control;
// ULSP_RUNTIME_DIR moves it). `ulsp ps` connects to each and reads one Status
// (control.capnp); an entry whose process is gone is removed.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <expected>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/port.h"
#include "kernel/msgport/unique_fd.h"

namespace ulsp::core {

// $ULSP_RUNTIME_DIR; else root's /run/ulsp, or a user's own: $XDG_RUNTIME_DIR/ulsp
// (/run/user/UID/ulsp under systemd), or /tmp/ulsp-UID without one. A user may not
// write /run/ulsp, so their mounts were in no directory `ulsp ps` reads.
std::string RuntimeDir();
// Makes RuntimeDir()/PID, this process's directory there, and returns its path, or
// says why it cannot. Both are 0755 whatever the umask (a passthrough layer sets 0),
// and both must be trusted and writable by no other user (MakeOwnDirectory).
std::expected<std::string, std::string> MakeRunDir();

// What a process reports; mirrors control.capnp's Status.
struct StatusBuilder {
  struct Group {
    std::string name, policy;
    pid_t init_pid = 0;
    std::string net_default;
    uint64_t notifications = 0, in_flight = 0, workers = 0, allowed = 0, denied = 0, logged = 0, kept = 0;
    uint64_t processes = 0, processes_max = 0;  // with a `processes` limit (0: none)
  };
  struct Mount {
    std::string path, stack, group;
    bool isolated = false;
    uint64_t requests = 0, in_flight = 0, nodes = 0;
  };
  struct Ulsp {
    std::string name, kind;
    pid_t pid = 0;
    uint64_t restarts = 0;
    std::string state;
  };
  struct PortInfo {
    std::string name, kind;
    uint64_t put = 0, replied = 0, refused = 0, bad_input = 0, in_flight = 0;
    std::string peer, state;
    double rtt_us = 0;
  };

  pid_t pid = 0;
  std::string kind, command, started_at;
  std::vector<Group> groups;
  std::vector<Mount> mounts;
  std::vector<Ulsp> ulsps;
  std::vector<PortInfo> ports;

  // Adds a port with its counters.
  void AddPort(const msgport::Port& port, std::string port_kind, uint64_t in_flight, std::string peer = "",
               std::string state = "up", double rtt_us = 0);
};

// Answers `ulsp ps` for this process, on DIR/control, from a thread of its own.
class ControlServer {
 public:
  using Fill = std::function<void(StatusBuilder&)>;
  // `fill` is called on the server's thread for each question. Fails with the errno
  // of the socket's bind (a directory that cannot hold it).
  static Result<std::unique_ptr<ControlServer>> Start(const std::string& dir, Fill fill);
  ~ControlServer();  // stops, removes the socket
  // Asks the server's thread to end, without waiting (the destructor waits).
  void Stop() noexcept;

 private:
  ControlServer() = default;
  void Loop();
  std::string path_;
  std::string started_at_;
  Fill fill_;
  UniqueFd listen_, stop_;
  std::thread thread_;
};

// The pid of the `ulsp mount` process that serves MOUNTPOINT (as it was given to it,
// absolute), or 0 when no process this user may ask says it does.
pid_t MountServerPid(const std::string& mountpoint);

// `ulsp ps [--json]`: prints every live ulsp process's status. Returns 0.
int Ps(bool json);

}  // namespace ulsp::core
