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

#include <string>
#include <vector>

namespace ulsp::core {

struct RunArgs {
  std::string policy;   // the policy file
  std::string group;    // its group; "" for the only one
  std::vector<std::string> command;
};

int Run(const RunArgs& args);

// `ulsp policy check FILE`: prints "FILE: ok (groups: ...)" and returns 0, or the
// reason (FILE:LINE: ...) on stderr and returns 1.
int CheckPolicy(const std::string& file);

}  // namespace ulsp::core
