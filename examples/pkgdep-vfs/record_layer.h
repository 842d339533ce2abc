// RecordLayer: a VFS layer that remembers every path the group touched through the
// stack below it, how (the strongest use seen), and the first process — pid and
// argv — that touched it that way. pkgdep-vfs puts it on top of the group's root
// stack and reads it when the command is done.
//
// Uses, weakest first: a lookup that found nothing, a lookup or stat (a probe), a
// directory listing, reading a symlink, opening, writing, executing. Probes are not
// uses: a program that looks for a file and goes on without it does not need it.
// The kernel caches lookups and attributes for the mount's timeout, so every first
// access is seen, not every repetition — which is all this record needs.
//
// The argv of a process is read from the group's own /proc (its pids are the group's)
// through a descriptor opened once, when the group is built and before its command
// starts, by pkgdep-vfs's main thread: reading it by path from a request of this very
// mount would go through this mount again, which a FUSE server must never do.
// Requests before that (the group's init building its world) have no argv.
//
// Thread-safe (Serve runs on many threads).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "ulsp/vfs/layer.h"

namespace pkgdep {

enum class Use : uint8_t { kMissing, kProbe, kListed, kReadLink, kOpened, kWritten, kExecuted };
std::string_view UseName(Use u) noexcept;  // "not found", "probed", "listed", ...
inline bool IsUse(Use u) noexcept { return u >= Use::kReadLink; }

struct Touch {
  Use use = Use::kMissing;
  bool dir = false;
  bool written = false;  // written at some point (a program a build made, then ran)
  pid_t pid = 0;      // in the group's pid namespace
  std::string argv;   // of that process, as its /proc/PID/cmdline said
};

// Entries a view below left out of a directory's listings (enforce mode): a program
// that finds files by listing a directory (Python's import) misses them without ever
// looking one up by name.
struct Unlisted {
  pid_t pid = 0;                 // the first process whose listing left one out
  std::string argv;              // its argv
  std::set<std::string> paths;   // what was left out
};

// What a RecordLayer saw. Owned by whoever reads it (shared with the layer, which
// goes when the group's stack does).
class Recording {
 public:
  Recording();
  ~Recording();
  Recording(const Recording&) = delete;
  Recording& operator=(const Recording&) = delete;

  // Opens the group's /proc, /proc/INIT/root/proc (INIT: the group's init, host
  // pid), once the group is built. Never from a request of the mount (see above).
  void OpenGroupProc(pid_t init);
  // The command as the user gave it. A process of the group that still has this
  // program's argv (forked from it, its exec not done yet, or failed: a command that
  // does not exist is looked for by it) is shown as "COMMAND (before its exec)".
  void SetCommand(std::string command);
  // Records that `path` was touched this way by `pid` (keeps the strongest use).
  void Note(const std::string& path, Use use, bool dir, pid_t pid);

  // Records that a listing of `dir` by `pid` left `path` out.
  void NoteUnlisted(const std::string& dir, std::string path, pid_t pid);

  // What has been recorded so far, by path.
  std::map<std::string, Touch> Snapshot() const;
  std::map<std::string, Unlisted> UnlistedSnapshot() const;  // by directory
  size_t size() const;
  size_t processes() const;

 private:
  std::string ArgvOf(pid_t pid);  // with mu_ held
  std::string Shown(const std::string& argv, pid_t pid) const;  // with mu_ held

  std::atomic<int> proc_fd_{-1};  // the group's /proc, once open
  mutable std::mutex mu_;  // guards what follows
  const std::string own_argv_;  // this program's, as /proc/self/cmdline says
  std::string command_;
  std::unordered_map<std::string, Touch> touched_;
  std::map<std::string, Unlisted> unlisted_;
  struct Proc {                        // a process seen
    std::string argv;                  // as first read ("" until the group's /proc opens)
    bool execing = false;              // it opened a program to execute; argv not yet new
    std::string before;                // the argv before that exec
    std::vector<std::string> executed; // its executed paths, waiting for the new argv
  };
  std::unordered_map<pid_t, Proc> procs_;
};

class RecordLayer final : public ulsp::vfs::Layer {
 public:
  // `hidden` (may be empty): the predicate of the view below, which says what its
  // listings leave out.
  RecordLayer(std::shared_ptr<Recording> recording, std::unique_ptr<ulsp::vfs::Layer> lower,
              std::function<bool(std::string_view)> hidden = {})
      : Layer(std::move(lower)), rec_(std::move(recording)), hidden_(std::move(hidden)) {
    PassesFileData();  // it records opens; what is read after does not matter
    ListsThrough();    // and listings, as they are read
  }

  int Serve(ulsp::vfs::VfsRequest& req) noexcept override;
  std::string_view Name() const noexcept override { return "record"; }

 private:
  void Note(const std::string& path, Use use, bool dir, pid_t pid) { rec_->Note(path, use, dir, pid); }
  void Wrote(uint64_t fh);  // a write, fallocate or copy into handle `fh`

  std::shared_ptr<Recording> rec_;
  const std::function<bool(std::string_view)> hidden_;
  // Handles opened for writing that have not written yet: a file opened read-write
  // and left as it was is an input, not the command's output. (Their reads and
  // writes come through this layer, not the kernel's passthrough.)
  struct Opener {
    std::string path;
    pid_t pid;
  };
  std::mutex unwritten_mu_;
  std::unordered_map<uint64_t, Opener> unwritten_;  // by handle
};

}  // namespace pkgdep
