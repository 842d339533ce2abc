#include "ulsp/core/cgroup.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

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

bool Has(const std::vector<std::string>& words, const std::string& word) {
  for (const auto& w : words) {
    if (w == word) return true;
  }
  return false;
}

// /proc/self/mountinfo writes space, tab, newline and backslash as \ooo.
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      const std::string oct = s.substr(i + 1, 3);
      if (oct.find_first_not_of("01234567") == std::string::npos) {
        out += static_cast<char>(std::stoi(oct, nullptr, 8));
        i += 3;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

std::string ReadSmall(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::expected<void, std::string> WriteSmall(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return std::unexpected(path + ": " + std::strerror(errno));
  const ssize_t n = ::write(fd, text.data(), text.size());
  const int err = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(text.size())) return std::unexpected("writing " + text + " to " + path + ": " + std::strerror(n < 0 ? err : EIO));
  return {};
}

// This process's cgroup path in the hierarchy whose /proc/self/cgroup line matches.
std::string OwnPath(bool v2) {
  std::ifstream in("/proc/self/cgroup");
  for (std::string line; std::getline(in, line);) {
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    if (v2 ? (line.compare(0, a, "0") == 0 && controllers.empty()) : Has(Split(controllers, ','), "pids")) return line.substr(b + 1);
  }
  return "";
}

std::string Join(const CgroupMountInfo& m, const std::string& own) {
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

}  // namespace

std::vector<CgroupMountInfo> CgroupMounts() {
  std::vector<CgroupMountInfo> out;
  std::ifstream in("/proc/self/mountinfo");
  for (std::string line; std::getline(in, line);) {
    // ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPEROPTIONS
    const auto fields = Split(line, ' ');
    size_t dash = 0;
    while (dash < fields.size() && fields[dash] != "-") ++dash;
    if (dash < 5 || dash + 3 >= fields.size()) continue;
    const std::string& type = fields[dash + 1];
    if (type != "cgroup" && type != "cgroup2") continue;
    out.push_back({type == "cgroup2", Unescape(fields[3]), Unescape(fields[4]), Split(fields[dash + 3], ',')});
  }
  return out;
}

std::expected<std::string, std::string> PidsCgroup::OwnPidsCgroup() {
  std::optional<CgroupMountInfo> v1, v2;
  for (const CgroupMountInfo& m : CgroupMounts()) {
    if (!m.v2 && Has(m.options, "pids")) {
      if (!v1) v1 = m;
    } else if (m.v2) {
      if (!v2) v2 = m;
    }
  }
  if (v1) {
    const std::string own = OwnPath(false);
    if (own.empty()) return std::unexpected("cgroup v1's pids hierarchy is mounted on " + v1->point + ", but /proc/self/cgroup has no line for it");
    return Join(*v1, own);
  }
  if (v2) {
    const std::string own = OwnPath(true);
    const std::string dir = Join(*v2, own.empty() ? "/" : own);
    const std::string control = dir + "/cgroup.subtree_control";
    if (Has(Words(ReadSmall(control)), "pids")) return dir;
    if (!Has(Words(ReadSmall(dir + "/cgroup.controllers")), "pids"))
      return std::unexpected("no cgroup pids controller: cgroup v1 has no pids hierarchy mounted, and cgroup2 on " + v2->point +
                             " does not offer pids to " + dir + " (its cgroup.controllers)");
    if (auto w = WriteSmall(control, "+pids"); !w)
      return std::unexpected("cgroup2's pids controller is not enabled for the children of " + dir + ", and enabling it failed: " + w.error());
    return dir;
  }
  return std::unexpected("no cgroup pids controller is mounted (neither cgroup v1's pids hierarchy nor cgroup2, in /proc/self/mountinfo)");
}

std::expected<PidsCgroup, std::string> PidsCgroup::Make(const std::string& group, uint64_t max) {
  auto parent = OwnPidsCgroup();
  if (!parent) return std::unexpected(parent.error());
  std::string name = "ulsp-";
  for (char c : group) name += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.') ? c : '_';
  name += '-';
  name += std::to_string(::getpid());
  const std::string dir = *parent + "/" + name;
  // One left by a run of the same pid that was killed: empty, it goes; else say so.
  if (::mkdir(dir.c_str(), 0755) != 0 && !(errno == EEXIST && ::rmdir(dir.c_str()) == 0 && ::mkdir(dir.c_str(), 0755) == 0))
    return std::unexpected("making the group's cgroup " + dir + ": " + std::strerror(errno));
  PidsCgroup made(dir);
  if (::access((dir + "/pids.max").c_str(), F_OK) != 0) return std::unexpected(dir + " has no pids.max: the pids controller is not enabled there");
  if (auto w = made.SetMax(max); !w) return std::unexpected(w.error());
  return made;
}

PidsCgroup::~PidsCgroup() {
  if (dir_.empty()) return;
  // With a pid namespace the kernel has killed the rest with the init; without one,
  // the init killed what it knew of. What is still here (exiting) is killed again.
  for (int i = 0; i < 300; ++i) {
    if (::rmdir(dir_.c_str()) == 0 || errno == ENOENT) return;
    if (errno != EBUSY) break;
    std::istringstream procs(ReadSmall(dir_ + "/cgroup.procs"));
    for (pid_t p; procs >> p;) ::kill(p, SIGKILL);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::fprintf(stderr, "ulsp run: the group's cgroup %s could not be removed: %s\n", dir_.c_str(), std::strerror(errno));
}

std::expected<void, std::string> PidsCgroup::Add(pid_t pid) const { return WriteSmall(dir_ + "/cgroup.procs", std::to_string(pid)); }

std::expected<void, std::string> PidsCgroup::SetMax(uint64_t max) const {
  return WriteSmall(dir_ + "/pids.max", std::to_string(max));
}

uint64_t PidsCgroup::Current() const {
  std::istringstream in(ReadSmall(dir_ + "/pids.current"));
  uint64_t n = 0;
  in >> n;
  return n;
}

}  // namespace ulsp::core
