#include "ulsp/core/cgroup.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <ranges>
#include <sstream>
#include <thread>
#include <tuple>
#include <vector>

#include "kernel/msgport/own_file.h"
#include "kernel/msgport/unique_fd.h"
#include "ulsp/core/agent.h"
#include "ulsp/core/mount.h"

namespace ulsp::core {
namespace {

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string part;
  std::istringstream in(s);
  while (std::getline(in, part, sep)) out.push_back(part);
  return out;
}

// The words of a cgroup2 list file ("cpu io pids\n").
std::vector<std::string> Words(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

bool Has(const std::vector<std::string>& words, const std::string& word) { return std::ranges::find(words, word) != words.end(); }

// A cgroup file's text ("" when it cannot be read).
std::string ReadSmall(const std::string& path) {
  auto text = ReadTextFile(path, 1u << 20);
  return text ? std::move(*text) : std::string();
}

std::expected<void, std::string> WriteSmall(const std::string& path, const std::string& text) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd) return std::unexpected(path + ": " + std::strerror(errno));
  if (auto w = WriteAll(fd.get(), text); !w) return std::unexpected("writing " + text + " to " + path + ": " + w.error().Describe());
  return {};
}

// This process's cgroup path in the v1 hierarchy of `controller`, or cgroup2's ("").
std::string OwnPath(const std::string& controller) {
  std::ifstream in("/proc/self/cgroup");
  for (std::string line; std::getline(in, line);) {
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    if (controller.empty() ? (line.compare(0, a, "0") == 0 && controllers.empty()) : Has(Split(controllers, ','), controller))
      return line.substr(b + 1);
  }
  return "";
}

std::string DirOf(const MountEntry& m, const std::string& own) {
  // A mount of a part of the hierarchy (a container's) holds only what is beneath it.
  std::string rel = own;
  if (m.root != "/" && rel.starts_with(m.root)) rel = rel.substr(m.root.size());
  std::string dir = m.point;
  if (!rel.empty() && rel != "/") {
    if (rel.front() != '/') dir += '/';
    dir += rel;
  }
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir;
}

// Removes the cgroups beneath `parent` that a `ulsp run` killed by SIGKILL left
// (`ulsp-GROUP-PID` of a PID no longer alive), if they are empty: its destructor,
// which removes them, never ran. One that still holds a process is left alone.
void SweepLeftCgroups(const std::string& parent) {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(parent, ec)) {
    const std::string name = entry.path().filename().string();
    const size_t dash = name.rfind('-');
    if (!name.starts_with("ulsp-") || dash <= 4 || dash + 1 == name.size()) continue;
    const std::string digits = name.substr(dash + 1);
    if (!std::ranges::all_of(digits, [](char c) { return c >= '0' && c <= '9'; }) || digits.size() > 9) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(digits));
    if (pid <= 0 || ::kill(pid, 0) == 0 || errno != ESRCH) continue;
    ::rmdir(entry.path().c_str());
  }
}

}  // namespace

std::expected<std::string, std::string> GroupCgroup::ParentCgroup(const std::string& controller) {
  std::optional<MountEntry> v1, v2;
  for (MountEntry& m : Mounts()) {
    if (m.fstype == "cgroup" && Has(m.super_options, controller)) {
      if (!v1) v1 = std::move(m);
    } else if (m.fstype == "cgroup2") {
      if (!v2) v2 = std::move(m);
    }
  }
  if (v1) {
    const std::string own = OwnPath(controller);
    if (own.empty())
      return std::unexpected("cgroup v1's " + controller + " hierarchy is mounted on " + v1->point + ", but /proc/self/cgroup has no line for it");
    return DirOf(*v1, own);
  }
  if (v2) {
    const std::string own = OwnPath("");
    const std::string dir = DirOf(*v2, own.empty() ? "/" : own);
    const std::string& top = v2->point;
    // Beneath the nearest cgroup, ours or above, that gives the controller to its
    // children (systemd gives pids and memory to those of user.slice's).
    for (std::string d = dir;; d = d.substr(0, d.rfind('/'))) {
      if (Has(Words(ReadSmall(d + "/cgroup.subtree_control")), controller)) return d;
      if (d.size() <= top.size() || d.rfind('/') == std::string::npos) break;
    }
    // None does: the top's children are given it, if the hierarchy has it.
    if (!Has(Words(ReadSmall(top + "/cgroup.controllers")), controller))
      return std::unexpected("no cgroup " + controller + " controller: cgroup v1 has no " + controller + " hierarchy mounted, and cgroup2 on " +
                             top + " does not offer it (its cgroup.controllers)");
    if (auto w = WriteSmall(top + "/cgroup.subtree_control", "+" + controller); !w)
      return std::unexpected("cgroup2's " + controller + " controller is given to the children of no cgroup from " + dir + " up to " + top +
                             ", and giving it to " + top + "'s failed: " + w.error());
    return top;
  }
  return std::unexpected("no cgroup " + controller + " controller is mounted (neither cgroup v1's " + controller +
                         " hierarchy nor cgroup2, in /proc/self/mountinfo)");
}

std::expected<GroupCgroup, std::string> GroupCgroup::Make(const std::string& group, const Want& want) {
  std::string name = "ulsp-";
  for (char c : group) name += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.') ? c : '_';
  name += '-';
  name += std::to_string(::getpid());
  GroupCgroup made;
  std::string pids_parent, memory_parent;
  for (auto [wanted, controller, what, parent] : {std::tuple(want.pids, "pids", &want.pids_what, &pids_parent),
                                                  std::tuple(want.memory, "memory", &want.memory_what, &memory_parent)}) {
    if (!wanted) continue;
    auto found = ParentCgroup(controller);
    if (!found) return std::unexpected(*what + ": " + found.error());
    *parent = std::move(*found);
  }
  // In cgroup2 both are in one hierarchy, where a process is in one cgroup: both
  // limits go on one, beneath the higher parent. It gives both controllers: one given
  // to a cgroup's children is given by each cgroup above it.
  auto above = [](const std::string& a, const std::string& b) { return !a.empty() && b.starts_with(a + "/"); };
  if (above(pids_parent, memory_parent)) memory_parent = pids_parent;
  if (above(memory_parent, pids_parent)) pids_parent = memory_parent;
  // The cgroup beneath `parent` for the limit `what`: made, or found made already (cgroup2).
  auto make = [&](const std::string& parent, const std::string& what) -> std::expected<std::string, std::string> {
    const std::string dir = parent + "/" + name;
    if (std::find(made.dirs_.begin(), made.dirs_.end(), dir) != made.dirs_.end()) return dir;
    SweepLeftCgroups(parent);
    // One left by a run of the same pid that was killed: empty, it goes; else say so.
    if (::mkdir(dir.c_str(), 0755) != 0 && !(errno == EEXIST && ::rmdir(dir.c_str()) == 0 && ::mkdir(dir.c_str(), 0755) == 0))
      return std::unexpected(what + ": making the group's cgroup " + dir + ": " + std::strerror(errno));
    made.dirs_.push_back(dir);
    return dir;
  };
  auto has = [](const std::string& dir, const std::string& file) { return ::access((dir + "/" + file).c_str(), F_OK) == 0; };
  if (want.pids) {
    auto dir = make(pids_parent, want.pids_what);
    if (!dir) return std::unexpected(dir.error());
    if (!has(*dir, "pids.max")) return std::unexpected(want.pids_what + ": " + *dir + " has no pids.max: the pids controller is not enabled there");
    made.pids_dir_ = *dir;
  }
  if (want.memory) {
    auto dir = make(memory_parent, want.memory_what);
    if (!dir) return std::unexpected(dir.error());
    made.memory_v2_ = !has(*dir, "memory.limit_in_bytes");
    if (made.memory_v2_ && !has(*dir, "memory.max"))
      return std::unexpected(want.memory_what + ": " + *dir + " has neither memory.limit_in_bytes nor memory.max: the memory controller is not enabled there");
    made.memory_dir_ = *dir;
  }
  return made;
}

GroupCgroup::GroupCgroup(GroupCgroup&& other) noexcept
    : dirs_(std::move(other.dirs_)),
      pids_dir_(std::move(other.pids_dir_)),
      memory_dir_(std::move(other.memory_dir_)),
      memory_v2_(other.memory_v2_) {
  other.dirs_.clear();
}

GroupCgroup::~GroupCgroup() {
  // With a pid namespace the kernel has killed the rest with the init; without one,
  // the init killed what it knew of. What is still here (exiting) is killed again.
  for (const std::string& dir : dirs_) {
    int err = 0;
    for (int i = 0; i < 300; ++i) {
      if (::rmdir(dir.c_str()) == 0 || errno == ENOENT) {
        err = 0;
        break;
      }
      err = errno;
      if (err != EBUSY) break;
      std::istringstream procs(ReadSmall(dir + "/cgroup.procs"));
      for (pid_t p; procs >> p;) ::kill(p, SIGKILL);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (err != 0) std::fprintf(stderr, "ulsp run: the group's cgroup %s could not be removed: %s\n", dir.c_str(), std::strerror(err));
  }
}

std::expected<void, std::string> GroupCgroup::Join(pid_t pid) const {
  for (const std::string& dir : dirs_) {
    if (dir == CommandOnlyDir()) continue;
    if (auto w = WriteSmall(dir + "/cgroup.procs", std::to_string(pid)); !w) return w;
  }
  return {};
}

std::expected<void, std::string> GroupCgroup::SetPidsMax(uint64_t max) const {
  return WriteSmall(pids_dir_ + "/pids.max", std::to_string(max));
}

std::expected<void, std::string> GroupCgroup::SetMemoryMax(uint64_t bytes) const {
  return WriteSmall(memory_dir_ + (memory_v2_ ? "/memory.max" : "/memory.limit_in_bytes"), std::to_string(bytes));
}

uint64_t GroupCgroup::Pids() const {
  if (pids_dir_.empty()) return 0;
  std::istringstream in(ReadSmall(pids_dir_ + "/pids.current"));
  uint64_t n = 0;
  in >> n;
  return n;
}

uint64_t GroupCgroup::OomKills() const {
  if (memory_dir_.empty()) return 0;
  // v1: memory.oom_control, v2: memory.events; both have a line "oom_kill N".
  std::istringstream in(ReadSmall(memory_dir_ + (memory_v2_ ? "/memory.events" : "/memory.oom_control")));
  for (std::string key; in >> key;) {
    uint64_t n = 0;
    if (!(in >> n)) break;
    if (key == "oom_kill") return n;
  }
  return 0;
}

}  // namespace ulsp::core
