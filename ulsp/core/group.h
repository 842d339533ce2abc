// `ulsp run`: a command in a new process group behind ULSPs. The supervisor (this
// process) loads the policy, builds the group's layer stacks, and starts the group's
// init (group_init.h) in new namespaces; it then serves the group's FUSE mounts and
// its seccomp notifications (through the net ULSP, ulsp/net) until the command ends,
// and exits with the command's status.
//
// Exit status: the command's (128+N when signal N killed it); 124 when the group ran
// past its wall_seconds limit; 125 when ulsp itself failed (a bad policy, a stack
// that cannot be built, a mount that fails: one line on stderr says which); 126 or
// 127 when the command could not be started, as a shell reports it.
//
// Needs root (namespaces, mounts, seccomp listeners in other processes).
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ulsp/core/policy.h"
#include "ulsp/vfs/layer.h"

namespace ulsp::core {

struct RunArgs {
  std::string policy;   // the policy file
  std::string group;    // its group; "" for the only one
  std::vector<std::string> command;
};

int Run(const RunArgs& args);

// A group described in code (what Run makes of a policy file, and what
// examples/pkgdep-vfs builds itself).
struct GroupRun {
  const GroupPolicy* policy = nullptr;  // must outlive the run
  std::string policy_file;              // shown by `ulsp ps`
  std::vector<std::string> command;
  // Stacks the caller made, by mount index; a missing or null one is built from the
  // mount's SPEC. Taken by RunGroup.
  std::vector<std::unique_ptr<vfs::Layer>> stacks;
  // Called once the group's init exists (its pid in the host's namespace), before
  // its mounts are served. The group's own processes are forked by then (an
  // isolated mount's server is started later).
  std::function<void(pid_t init_pid)> on_started;
  // Called once the group's world is built (its mounts, its /proc, its root in
  // place) and before its command starts. Its /proc is then /proc/INIT/root/proc.
  std::function<void(pid_t init_pid)> on_built;
  std::string who = "ulsp run";  // starts ulsp's own error lines
  // Out: why ulsp could not make the group or start its command ("" when it did), as
  // said on stderr; RunGroup then returns 125, which a command may return too.
  std::string failure;
  // Out: the last signal asking it to stop (SIGINT, SIGQUIT, SIGTERM, SIGHUP) that
  // reached ulsp while the group ran (and went on to the group), or 0.
  int interrupted_by = 0;
};

// Runs a group; returns as Run does (the command's status, 124, 125, 126, 127).
int RunGroup(GroupRun& run);

// A command's words joined by spaces, as reports and `ulsp ps` show it.
std::string JoinCommand(const std::vector<std::string>& words);

// `ulsp policy check FILE`: prints "FILE: ok (groups: ...)" and returns 0, or the
// reason (FILE:LINE: ...) on stderr and returns 1.
int CheckPolicy(const std::string& file);

}  // namespace ulsp::core
