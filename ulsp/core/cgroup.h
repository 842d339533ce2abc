// A group's cgroup limits: `processes` (the kernel's pids controller) and
// `group_memory` (its memory controller), for all of the group's processes together,
// however they were started. The group's init joins the cgroup before it starts
// anything (but group_memory's in cgroup v1, which the command joins as it starts:
// CommandOnlyDir), so everything the command starts is in it.
//
// A fork or clone past `processes` fails with EAGAIN, as under RLIMIT_NPROC (which
// does not bind root, and counts all of a user's processes, not a group's). Past
// `group_memory` the kernel reclaims the group's page cache, then its OOM killer ends
// one of the group's processes.
//
// Each controller is found where the system mounts it: cgroup v1's hierarchy of that
// name, or cgroup2 (ParentCgroup). The group's cgroup, `ulsp-GROUP-PID`, is made
// there, and removed when the group ends, after killing anything still in it. Those
// a `ulsp run` killed by SIGKILL left (their PID gone) are removed, if empty, when
// the next group makes its own beside them.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <expected>
#include <string>
#include <vector>

namespace ulsp::core {

class GroupCgroup {
 public:
  // Makes the cgroups the limits need. Fails with a line that says what is missing
  // (no such controller mounted) or what could not be done, and where; `pids_what`
  // and `memory_what` begin the line for each ("p.toml:7: limit processes = 10").
  struct Want {
    bool pids = false, memory = false;
    std::string pids_what, memory_what;
  };
  static std::expected<GroupCgroup, std::string> Make(const std::string& group, const Want& want);

  // The directory beneath which a group's cgroup of `controller` ("pids", "memory")
  // is made, or a line saying why there is none. In cgroup v1: this process's own
  // cgroup in that hierarchy. In cgroup2, where a cgroup that holds processes (ours
  // holds us) can give no controller to its children, unless it is the root: the
  // nearest cgroup, this process's own or above, that gives the controller to its
  // children; else the mount's top, given it now (systemd's slices give pids and
  // memory, so a login session's scope finds its slice).
  static std::expected<std::string, std::string> ParentCgroup(const std::string& controller);

  GroupCgroup(GroupCgroup&& other) noexcept;
  GroupCgroup& operator=(GroupCgroup&&) = delete;
  GroupCgroup(const GroupCgroup&) = delete;
  // Kills what is left in the cgroups and removes them.
  ~GroupCgroup();

  // Moves process `pid` (all its threads) into every cgroup of the group but the one
  // only the command joins.
  std::expected<void, std::string> Join(pid_t pid) const;
  // The cgroup the command joins itself and the group's init does not: group_memory's
  // in cgroup v1 ("" for none). When the group reaches it, the kernel's OOM killer
  // ends the process it finds biggest among the cgroup's, and the init (ulsp's own
  // binary, whose resident size counts what it shares with `ulsp run`) could look
  // biggest: killing it would end the whole group. In cgroup2 a process is in one
  // cgroup, so there the init is in it too.
  std::string CommandOnlyDir() const { return memory_v2_ ? "" : memory_dir_; }
  // pids.max; memory.limit_in_bytes (v1) or memory.max (v2).
  std::expected<void, std::string> SetPidsMax(uint64_t max) const;
  std::expected<void, std::string> SetMemoryMax(uint64_t bytes) const;
  // Processes and threads in it now (pids.current; 0 without the pids cgroup).
  uint64_t Pids() const;
  // How many processes the kernel's OOM killer ended in it (0 without the memory one).
  uint64_t OomKills() const;

 private:
  GroupCgroup() = default;

  std::vector<std::string> dirs_;  // each made once (cgroup2 holds both controllers in one)
  std::string pids_dir_, memory_dir_;
  bool memory_v2_ = false;
};

}  // namespace ulsp::core
