// Helpers for any test: shell commands, and a temporary directory that is removed
// (after any mount inside it is detached).
#pragma once

#include <stdlib.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace ulsp::testing {

// Runs `command` with bash; returns its exit status (128+N when killed by signal N).
inline int Shell(const std::string& command) {
  const int rc = std::system(("bash -c '" + [&] {
                                std::string q;
                                for (char c : command) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
                                return q;
                              }() + "'")
                                 .c_str());
  if (rc == -1) return -1;
  if (WIFSIGNALED(rc)) return 128 + WTERMSIG(rc);
  return WEXITSTATUS(rc);
}

// Runs `command` with bash and returns what it printed on stdout (stderr joins it
// when `with_stderr`).
inline std::string Output(const std::string& command, bool with_stderr = false) {
  const std::string full = command + (with_stderr ? " 2>&1" : "");
  FILE* f = ::popen(full.c_str(), "r");
  if (f == nullptr) return "popen failed";
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  ::pclose(f);
  return out;
}

// The whole text of the file `path` ("" when it cannot be read).
inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Detaches every mount at or below `dir` (deepest first).
inline void DetachMountsUnder(const std::string& dir) {
  std::vector<std::string> points;
  for (const auto& line : [] {
         std::vector<std::string> lines;
         FILE* f = std::fopen("/proc/self/mountinfo", "r");
         if (f == nullptr) return lines;
         char buf[4096];
         while (std::fgets(buf, sizeof buf, f) != nullptr) lines.emplace_back(buf);
         std::fclose(f);
         return lines;
       }()) {
    char point[4096];
    if (std::sscanf(line.c_str(), "%*s %*s %*s %*s %4095s", point) == 1 && std::string(point).starts_with(dir))
      points.emplace_back(point);
  }
  for (auto it = points.rbegin(); it != points.rend(); ++it) ::umount2(it->c_str(), MNT_DETACH);
}

// A fresh directory under `base` (/tmp: ext4 here; /dev/shm: tmpfs, where making
// files is 20x faster), removed with everything in it (mounts detached first).
class TempDir {
 public:
  explicit TempDir(const std::string& base = "/tmp") {
    std::string tmpl = base + "/ulsp-test.XXXXXX";
    path_ = ::mkdtemp(tmpl.data());
    ::chmod(path_.c_str(), 0755);
  }
  ~TempDir() {
    DetachMountsUnder(path_);
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace ulsp::testing
