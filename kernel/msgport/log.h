// One named spdlog logger per component ("msgport", "vfs", "net", ...), created on
// first use, writing to standard error. Debug messages are compiled in and off by
// default; ULSP_LOG=debug (or any spdlog level) turns them on for every component.
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>
#include <string_view>

namespace ulsp {

std::shared_ptr<spdlog::logger> Logger(const std::string& component);

// Appends `text`, whole lines ('\n'-ended), to `fd` (opened O_APPEND). Returns 0, or
// the errno of a write that failed (a full disk: ENOSPC); then a line the write
// stopped inside is cut back off the file (all of `text` with `all_or_nothing`), so
// it ends with a whole line, and `*lines_written` says how many lines it kept. The
// cut assumes no other writer appended meanwhile: callers that share `fd` between
// threads hold a lock.
int AppendWholeLines(int fd, std::string_view text, size_t* lines_written, bool all_or_nothing = false) noexcept;

}  // namespace ulsp
