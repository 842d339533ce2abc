// The group's side of `ulsp run`: the process that becomes the group's init. It runs
// in new mount and network namespaces (and, with pid_namespace, as pid 1 of a new
// pid namespace), builds the group's world, and starts the command.
//
// It talks to the supervisor (group.h) over a SEQPACKET socket, one message a step:
//
//   group -> supervisor            supervisor -> group
//   "pid N"       (its host pid)
//   "mount I" + a /dev/fuse fd     "ok" once the stack answered the kernel's INIT
//   "listener N"  (its seccomp     "ok" once the shim holds it (pidfd_getfd)
//                  listener fd)
//   "error TEXT"  (then it exits 125)
//
// Then it starts the command and stays as its init: it forwards the signals the
// supervisor sends, reaps orphans, and exits with the command's status (128+N when
// a signal N killed it). Without a pid namespace it kills what the command left
// behind before it exits; with one, the kernel does.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ulsp::core {

// What the group's init must do, computed by the supervisor before the fork (the
// child allocates as little as it can).
struct GroupPlan {
  struct Mount {
    std::string path;    // in the group's view ("/" for its root)
    std::string fsname;  // the "source" column of /proc/mounts
    bool isolated = false;
    bool read_only = false;
    std::string where;  // the policy's FILE:LINE, for errors
  };
  std::vector<Mount> mounts;  // parents first
  std::string staging;        // where the root stack is mounted before pivot_root ("" if none)
  std::string resolv_conf;    // files bound over /etc/resolv.conf and /etc/hosts
  std::string hosts;
  bool pid_namespace = true;
  bool private_tmp = false;
  bool read_only_host = false;  // what the group sees of the host's tree is read-only
  bool set_id_files = false;    // it may make set-user/group-ID files and set file capabilities
  std::string cwd;            // the command's directory (falls back to /)
  mode_t umask = 022;         // the command's umask: the one ulsp was started with
  uint64_t files_soft = 0;    // the command's open-file limit before the policy's (0: as is)
  uint64_t files_hard = 0;
  std::vector<std::string> command;
  std::string who = "ulsp run";  // starts the error line when the command cannot start
  std::optional<uint64_t> cpu_seconds, memory_bytes, open_files, file_size_bytes;
  bool seal_cgroups = false;  // every cgroup mount read-only in the group (it has cgroup limits)
  std::string command_cgroup;  // a cgroup the command joins and the init does not ("" for none)
};

// Runs in the forked child; never returns. `sock` is its end of the socket.
[[noreturn]] void GroupMain(const GroupPlan& plan, int sock);

}  // namespace ulsp::core
