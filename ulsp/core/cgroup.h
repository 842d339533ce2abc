// A group's process limit (`processes` in a policy's [limits]): a cgroup of the
// kernel's pids controller that the group's init joins before it starts anything, so
// that every process and thread the command starts counts, however it starts them.
// A fork or clone past the limit fails with EAGAIN, as under RLIMIT_NPROC (which
// does not bind root, and counts all of a user's processes, not a group's).
//
// The controller is found where the system mounts it: cgroup v1's `pids` hierarchy,
// or cgroup2 with `pids` enabled for this process's cgroup's children. The group's
// cgroup is made beneath this process's own one in that hierarchy, named
// `ulsp-GROUP-PID`, and removed when the group ends, after killing anything still in it.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <expected>
#include <string>
#include <vector>

namespace ulsp::core {

// A cgroup file system this process sees mounted (/proc/self/mountinfo).
struct CgroupMountInfo {
  bool v2 = false;
  std::string root;                  // the hierarchy's directory mounted there
  std::string point;                 // where
  std::vector<std::string> options;  // the super block's options (v1: its controllers)
};
std::vector<CgroupMountInfo> CgroupMounts();

class PidsCgroup {
 public:
  // Makes the cgroup with pids.max = `max`. Fails with a line that says what is
  // missing (no pids controller mounted) or what could not be done, and where.
  static std::expected<PidsCgroup, std::string> Make(const std::string& group, uint64_t max);

  PidsCgroup(PidsCgroup&& other) noexcept : dir_(std::move(other.dir_)) { other.dir_.clear(); }
  PidsCgroup& operator=(PidsCgroup&&) = delete;
  PidsCgroup(const PidsCgroup&) = delete;
  // Kills what is left in the cgroup and removes it.
  ~PidsCgroup();

  // Moves process `pid` (all its threads) into the cgroup.
  std::expected<void, std::string> Add(pid_t pid) const;
  // Sets pids.max.
  std::expected<void, std::string> SetMax(uint64_t max) const;
  // How many processes and threads are in it now (pids.current; 0 if unreadable).
  uint64_t Current() const;
  const std::string& dir() const { return dir_; }

  // The directory of this process's own cgroup in the pids hierarchy, or a line
  // saying why there is none. Exposed for tests.
  static std::expected<std::string, std::string> OwnPidsCgroup();

 private:
  explicit PidsCgroup(std::string dir) : dir_(std::move(dir)) {}
  std::string dir_;
};

}  // namespace ulsp::core
