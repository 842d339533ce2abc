// One named spdlog logger per component ("msgport", "vfs", "net", ...), created on
// first use, writing to standard error. Debug messages are compiled in and off by
// default; ULSP_LOG=debug (or any spdlog level) turns them on for every component.
#pragma once

#include <spdlog/spdlog.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "kernel/msgport/unique_fd.h"

namespace ulsp {

std::shared_ptr<spdlog::logger> Logger(const std::string& component);

// An append-only log of whole lines ('\n'-ended) on a disk that may fill up: the
// trace layer's and the connection log's. A write that fails (a full disk, a quota,
// an I/O error) never leaves a line cut in half: the file is cut back to its last
// whole line, which assumes no other writer shares it. What could not be written is
// dropped and counted; the component's logger warns once, naming the file and the
// error; and the first append that succeeds again begins with a line, made by the
// caller, that says how many were lost. That line is written only together with the
// lines after it, so a count is always followed by a line. Not thread-safe: a log
// shared between threads needs a lock around Append.
class LineLog {
 public:
  // Makes the line (with its '\n') that reports `count` lost lines, dropped after
  // the error named `error` ("ENOSPC").
  using GapLine = std::function<std::string(uint64_t count, const char* error)>;

  LineLog() = default;  // no log: enabled() is false
  // Appends to `fd` (opened O_APPEND), which is `path`. The messages about it go to
  // Logger(component) and begin with `who` ("trace", "group web").
  LineLog(UniqueFd fd, std::string path, std::string component, std::string who);

  // Appends `text`, whole lines (preceded by gap's line when lines were lost). True
  // when all of it was written.
  bool Append(std::string_view text, const GapLine& gap);
  // Lines dropped since the last append that succeeded.
  uint64_t lost() const noexcept { return lost_; }
  const std::string& path() const noexcept { return path_; }
  bool enabled() const noexcept { return fd_.valid(); }

 private:
  UniqueFd fd_;
  std::string path_, component_, who_;
  uint64_t lost_ = 0;
  int lost_error_ = 0;  // the error that began the dropping
};

}  // namespace ulsp
