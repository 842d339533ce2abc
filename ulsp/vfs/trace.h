// TraceLayer: records every access that reaches it as one JSON line — time, pid,
// uid, operation, path (and the second path of rename and link), result — then
// passes the request down unchanged. Forgets are not accesses and are not recorded.
// The kernel caches entries and attributes for the mount's timeout, so a trace sees
// every first access, not every repetition.
//
// Each line is one append write(2), so lines from many threads never interleave and
// a line acknowledged is in the file even if the server is killed.
#pragma once

#include <string>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/unique_fd.h"
#include "ulsp/vfs/layer.h"

namespace ulsp::vfs {

class TraceLayer final : public Layer {
 public:
  // Appends to `log_path` (created 0644 if missing). Fails with the open's errno.
  static Result<std::unique_ptr<TraceLayer>> Open(const std::string& log_path, std::unique_ptr<Layer> lower);

  int Serve(VfsRequest& req) noexcept override;
  std::string_view Name() const noexcept override { return "trace"; }

 private:
  TraceLayer(UniqueFd log, std::unique_ptr<Layer> lower) : Layer(std::move(lower)), log_(std::move(log)) {}
  UniqueFd log_;
};

// `s` as a JSON string literal, quotes included.
std::string JsonQuote(std::string_view s);

}  // namespace ulsp::vfs
