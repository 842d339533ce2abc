// Where a group's cgroup goes in cgroup2, on the real kernel. This machine binds pids
// and memory to cgroup v1, so the cgroup2 rules are tried with hugetlb, a controller
// cgroup v1 does not hold here and ParentCgroup treats as any other.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include "tests/vfs/mount_fixture.h"
#include "ulsp/core/cgroup.h"

namespace ulsp::testing {
namespace {

bool WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  out.flush();
  return static_cast<bool>(out);
}

// In a child process, with cgroup2 on `point` (mounted there in a mount namespace of
// its own first when `mount_it`: the machine mounts no cgroup2): moves itself into
// T/session, a cgroup that then holds a process, as a login session's scope does,
// and asks where a group's cgroup of hugetlb goes. Returns what went otherwise than
// expected ("" when all went as expected). Leaves the hierarchy as it found it.
std::string TryInChild(const std::string& point, bool mount_it) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return std::string("pipe: ") + std::strerror(errno);
  const pid_t child = ::fork();
  if (child < 0) return std::string("fork: ") + std::strerror(errno);
  if (child == 0) {
    ::close(pipe_fds[0]);
    std::string found;
    auto note = [&](const std::string& what) { found += what + "\n"; };
    if (mount_it && (::unshare(CLONE_NEWNS) != 0 || ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
                     ::mount("none", point.c_str(), "cgroup2", 0, nullptr) != 0)) {
      note(std::string("mounting cgroup2: ") + std::strerror(errno));
    } else {
      const std::string top = point, t = top + "/ulsp-cgroup-test-" + std::to_string(::getpid()), session = t + "/session";
      const bool given_before = ReadAll(top + "/cgroup.subtree_control").find("hugetlb") != std::string::npos;
      std::string was = top;  // the cgroup2 cgroup this process is in ("0::/PATH")
      if (const std::string self = ReadAll("/proc/self/cgroup"); self.starts_with("0::") || self.find("\n0::") != std::string::npos) {
        const size_t at = self.starts_with("0::") ? 3 : self.find("\n0::") + 4;
        const std::string path = self.substr(at, self.find('\n', at) - at);
        if (path != "/") was += path;
      }
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
      if (mount_it) ::umount(point.c_str());
    }
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
  const std::string mountinfo = ReadAll("/proc/self/mountinfo");
  if (mountinfo.find(",hugetlb") != std::string::npos || mountinfo.find(" hugetlb") != std::string::npos)
    GTEST_SKIP() << "cgroup v1 holds hugetlb here, so cgroup2 cannot offer it";
  // The machine's cgroup2 (this one's, beside its cgroup v1 hierarchies, on
  // /sys/fs/cgroup/unified), or one mounted for the test.
  std::string point;
  std::istringstream lines(mountinfo);
  for (std::string line; std::getline(lines, line) && point.empty();) {
    std::istringstream fields(line);
    std::string id, parent, dev, root, at, options, field;
    fields >> id >> parent >> dev >> root >> at >> options;
    while (fields >> field && field != "-") {}
    if (fields >> field && field == "cgroup2") point = at;
  }
  TempDir dir;
  const bool mount_it = point.empty();
  if (mount_it) {
    ASSERT_EQ(::mkdir((dir / "cg2").c_str(), 0755), 0);
    point = dir / "cg2";
  }
  EXPECT_EQ(TryInChild(point, mount_it), "");
}

}  // namespace
}  // namespace ulsp::testing
