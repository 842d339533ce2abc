// Where a group's cgroup goes in cgroup2, on the real kernel. This machine binds pids
// and memory to cgroup v1, so the cgroup2 rules are tried with hugetlb, a controller
// cgroup v1 does not hold here and ParentCgroup treats as any other.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include "tests/temp_dir.h"
#include "ulsp/core/cgroup.h"
#include "ulsp/core/mount.h"

namespace ulsp::testing {
namespace {

bool WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  out.flush();
  return static_cast<bool>(out);
}

// In a child process, with the machine's cgroup2 on `point`: moves itself into
// T/session, a cgroup that then holds a process, as a login session's scope does,
// and asks where a group's cgroup of hugetlb goes. Returns what went otherwise than
// expected ("" when all went as expected). Leaves the hierarchy as it found it.
std::string TryInChild(const std::string& point) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return std::string("pipe: ") + std::strerror(errno);
  const pid_t child = ::fork();
  if (child < 0) return std::string("fork: ") + std::strerror(errno);
  if (child == 0) {
    ::close(pipe_fds[0]);
    std::string found;
    auto note = [&](const std::string& what) { found += what + "\n"; };
    const std::string top = point, t = top + "/ulsp-cgroup-test-" + std::to_string(::getpid()), session = t + "/session";
    const bool given_before = ReadAll(top + "/cgroup.subtree_control").find("hugetlb") != std::string::npos;
    std::string was = top;  // the cgroup2 cgroup this process is in (its line "0::/PATH")
    std::istringstream lines(ReadAll("/proc/self/cgroup"));
    for (std::string line; std::getline(lines, line);)
      if (line.starts_with("0::/")) was += line.substr(3);
    if (::mkdir(t.c_str(), 0755) != 0 || ::mkdir(session.c_str(), 0755) != 0 ||
        !WriteText(session + "/cgroup.procs", std::to_string(::getpid()))) {
      note("making " + session + " and joining it failed");
    } else {
      // No cgroup from the session up gives hugetlb: the top's children are given it.
      auto parent = core::GroupCgroup::ParentCgroup("hugetlb");
      if (!given_before) {
        if (!parent || *parent != top) note("with none giving it: " + (parent ? *parent : parent.error()) + ", not " + top);
        if (ReadAll(top + "/cgroup.subtree_control").find("hugetlb") == std::string::npos)
          note("the top does not give hugetlb to its children");
      }
      // T gives it (it holds no process, so it may): the group's goes beneath T,
      // the nearest, not beneath the session (which holds us) nor the top.
      if (!WriteText(t + "/cgroup.subtree_control", "+hugetlb")) {
        note("T could not be made to give hugetlb");
      } else {
        parent = core::GroupCgroup::ParentCgroup("hugetlb");
        if (!parent || *parent != t) note("with T giving it: " + (parent ? *parent : parent.error()) + ", not " + t);
      }
      // A controller the kernel has not: refused with a line that says so.
      auto none = core::GroupCgroup::ParentCgroup("nonesuch");
      if (none || none.error().find("cgroup2 on " + top + " does not offer it") == std::string::npos)
        note("for a controller the kernel has not: " + (none ? *none : none.error()));
    }
    WriteText(was + "/cgroup.procs", std::to_string(::getpid()));  // back where it was
    WriteText(t + "/cgroup.subtree_control", "-hugetlb");
    ::rmdir(session.c_str());
    ::rmdir(t.c_str());
    if (!given_before) WriteText(top + "/cgroup.subtree_control", "-hugetlb");
    const ssize_t wrote = ::write(pipe_fds[1], found.data(), found.size());
    ::_exit(wrote == static_cast<ssize_t>(found.size()) ? 0 : 1);
  }
  ::close(pipe_fds[1]);
  std::string found;
  char buf[4096];
  for (ssize_t n; (n = ::read(pipe_fds[0], buf, sizeof buf)) > 0;) found.append(buf, static_cast<size_t>(n));
  ::close(pipe_fds[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) found += "the child failed (status " + std::to_string(status) + ")\n";
  return found;
}

// In cgroup2 a cgroup that holds processes gives no controller to its children (the
// root apart), so the group's cgroup cannot go beneath `ulsp run`'s own one there:
// it goes beneath the nearest cgroup above that gives the controller, or beneath the
// top, given it. (Before, a group with a limit was refused on a cgroup2 machine unless
// `ulsp run` ran in the root cgroup: "enabling it failed: Device or resource busy".)
TEST(Cgroup2, AGroupsCgroupGoesBeneathTheNearestCgroupThatGivesTheController) {
  std::string point;  // the machine's cgroup2 (this one's: beside its cgroup v1 hierarchies)
  for (const core::MountEntry& m : core::Mounts()) {
    if (m.fstype == "cgroup" && std::ranges::find(m.super_options, "hugetlb") != m.super_options.end())
      GTEST_SKIP() << "cgroup v1 holds hugetlb here (" << m.point << "), so cgroup2 cannot offer it";
    if (m.fstype == "cgroup2" && point.empty()) point = m.point;
  }
  if (point.empty()) GTEST_SKIP() << "this machine mounts no cgroup2";
  EXPECT_EQ(TryInChild(point), "");
}

}  // namespace
}  // namespace ulsp::testing
