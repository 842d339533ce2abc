// TraceLayer: records every access that reaches it as one JSON line — time, pid,
// uid, operation, path (and the second path of rename and link), result — then
// passes the request down unchanged. Forgets are not accesses and are not recorded.
// The kernel caches entries and attributes for the mount's timeout, so a trace sees
// every first access, not every repetition.
//
// Lines are collected in memory and appended to the log in one write(2) every 50 ms,
// when 64 KiB have gathered, and when the layer is destroyed (the mount ends), so
// lines from many threads never interleave and tracing costs no system call per
// access. A server killed with SIGKILL loses at most the last 50 ms of lines.
#pragma once

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/unique_fd.h"
#include "ulsp/vfs/layer.h"

namespace ulsp::vfs {

class TraceLayer final : public Layer {
 public:
  // Appends to `log_path` (created 0644 if missing). Fails with the open's errno.
  static Result<std::unique_ptr<TraceLayer>> Open(const std::string& log_path, std::unique_ptr<Layer> lower);

  ~TraceLayer() override;  // writes what is still gathered

  int Serve(VfsRequest& req) noexcept override;
  std::string_view Name() const noexcept override { return "trace"; }

 private:
  TraceLayer(UniqueFd log, std::unique_ptr<Layer> lower);
  void Append(const std::string& line);
  // Writes `pending_` out; called with mu_ held.
  void FlushLocked();
  void Flusher();

  UniqueFd log_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::string pending_;  // lines not yet written
  bool stopping_ = false;
  bool warned_ = false;
  std::thread flusher_;
};

// `s` as a JSON string literal, quotes included.
std::string JsonQuote(std::string_view s);

}  // namespace ulsp::vfs
