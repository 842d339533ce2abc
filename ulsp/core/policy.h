// Policy files: TOML that declares process groups — each group's file-system view (a
// layer stack per mount point), its network rules and its limits. `ulsp run` starts
// a command in one of them; `ulsp policy check` validates a file and runs nothing.
//
// A bad file is refused whole, before anything starts, with "FILE:LINE: reason" —
// unknown keys, wrong types, bad CIDRs or ports, unknown layers, overlapping mounts.
// The keys are documented in docs/groups.md; DESIGN.md's are the stable core.
#pragma once

#include <cstdint>
#include <expected>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ulsp/net/rules.h"

namespace ulsp::core {

struct MountPolicy {
  std::string path;   // absolute, normalized ("/" for the group's root)
  std::string stack;  // a SPEC (ulsp/vfs/stack.h)
  bool isolated = false;
  bool read_only = false;  // mounted read-only: changes get EROFS from the kernel
  double timeout = 1.0;  // entry and attribute cache, seconds
  std::string where;     // "FILE:LINE"
};

// Resource limits, applied to the command (setrlimit) and, for wall_seconds, by the
// supervisor, which kills the group when it runs longer; `processes` and
// `group_memory` by the group's cgroup (ulsp/core/cgroup.h).
struct Limits {
  std::optional<uint64_t> wall_seconds;
  std::optional<uint64_t> cpu_seconds;    // RLIMIT_CPU
  std::optional<uint64_t> memory_bytes;   // RLIMIT_AS
  std::optional<uint64_t> open_files;     // RLIMIT_NOFILE
  std::optional<uint64_t> file_size_bytes;  // RLIMIT_FSIZE
  std::optional<uint64_t> processes;  // processes and threads at once, the init not counted
  std::string processes_where;        // "FILE:LINE" of that key
  std::optional<uint64_t> group_memory_bytes;  // all of the group's processes together
  std::string group_memory_where;
};

struct GroupPolicy {
  std::string name;
  std::string where;  // "FILE:LINE" of [group.NAME]
  net::RuleSet net;
  std::string log;              // connection log (JSON lines); empty for none
  bool loopback_group = false;  // loopback = "group": 127/8 and ::1 stay in the group
  bool pid_namespace = true;
  bool private_tmp = false;     // a fresh tmpfs on /tmp
  bool read_only_host = false;  // the host's tree (outside the mounts, /dev, /proc) read-only
  bool set_id_files = false;    // may make set-user-ID/set-group-ID files, set file capabilities
  std::vector<MountPolicy> mounts;  // sorted: a mount point after the ones above it
  Limits limits;
  // Names the group's resolver answers itself (before the host's), to addresses.
  std::map<std::string, std::vector<std::string>> hosts;
};

struct Policy {
  std::string file;
  std::map<std::string, GroupPolicy> groups;

  // The group `name`, or the only group when `name` is empty. Fails with a one-line
  // message that lists the groups there are.
  std::expected<const GroupPolicy*, std::string> Group(std::string_view name) const;
};

// Reads and validates FILE. Fails with "FILE:LINE: reason" (or "FILE: reason").
std::expected<Policy, std::string> LoadPolicy(const std::string& file);
// The same for text already read; `file` names it in messages.
std::expected<Policy, std::string> ParsePolicy(std::string_view text, const std::string& file);

}  // namespace ulsp::core
