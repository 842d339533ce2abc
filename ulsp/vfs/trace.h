// TraceLayer: records every access that reaches it as one JSON line — time, pid,
// uid, operation, path (and the second path of rename and link), an open's access
// mode, result — then passes the request down unchanged. Forgets are not accesses
// and are not recorded. The kernel caches entries and attributes for the mount's
// timeout, so a trace sees every first access, not every repetition. It passes file
// data through: where the mount uses kernel passthrough, the kernel reads and writes
// an opened file itself, and the trace has its open, not each read and write.
//
// A request leaves a record (the paths, ids, result and time) in memory; a flusher
// thread makes the lines and appends them to the log every 50 ms (sooner when many
// gather) in writes of about 64 KiB of whole lines, and the rest when the layer is
// destroyed (the mount ends). So lines from many threads never interleave, and a
// request pays neither a system call nor the formatting. A server killed with
// SIGKILL loses at most the last 50 ms of lines. Past kMaxPending records waiting (a
// log on a disk that cannot keep up), requests wait for the flusher.
//
// A log that cannot be written (a full disk, a quota, an I/O error) does not stop the
// mount: the lines are dropped and counted, the server's log says so once (naming the
// file and the error), and when a write succeeds again the trace first gets a line
// {"time":...,"op":"lost","count":N,"result":"ENOSPC"}, so a reader knows what is
// missing. A line is never left cut in half: a write that stopped inside one is cut
// back to the last whole line (with O_APPEND each write goes at the end, so this
// assumes no other writer shares the file).
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <ctime>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/log.h"
#include "kernel/msgport/unique_fd.h"
#include "ulsp/vfs/layer.h"

namespace ulsp::vfs {

class TraceLayer final : public Layer {
 public:
  // Appends to `log_path` (created 0644 if missing; see OpenOwnFile for what is
  // refused). Fails with a message that names the path.
  static std::expected<std::unique_ptr<TraceLayer>, std::string> Open(const std::string& log_path,
                                                                   std::unique_ptr<Layer> lower);

  ~TraceLayer() override;  // writes what is still gathered

  int Serve(VfsRequest& req) noexcept override;
  std::string_view Name() const noexcept override { return "trace"; }

 private:
  struct Record {
    timespec time{};
    pid_t pid = 0;
    uid_t uid = 0;
    VfsOp op = VfsOp::kLookup;
    int flags = 0;  // open and create: their flags (the line shows the access mode)
    int err = 0;
    bool listed_without_handle = false;
    std::string path, path2;
  };
  static constexpr size_t kWakeAt = 4096;          // records that wake the flusher early
  static constexpr size_t kMaxPending = 1u << 16;  // records that hold requests back

  TraceLayer(LineLog log, std::unique_ptr<Layer> lower);
  void Append(Record&& r);
  static std::string Format(const Record& r);
  // Makes the lines of `records` and appends them to the log. Only the flusher (and
  // the destructor, after it) calls it.
  void Write(const std::vector<Record>& records);
  void Flusher();

  LineLog log_;  // the flusher's (and then the destructor's)
  std::mutex mu_;
  std::condition_variable cv_;          // the flusher waits here
  std::condition_variable drained_cv_;  // requests wait here when kMaxPending wait
  std::vector<Record> pending_;         // records not yet written
  bool stopping_ = false;
  std::thread flusher_;
};

// `s` as a JSON string literal, quotes included.
std::string JsonQuote(std::string_view s);

}  // namespace ulsp::vfs
