#include "kernel/msgport/log.h"

#include <spdlog/cfg/helpers.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string_view>

namespace ulsp {

std::shared_ptr<spdlog::logger> Logger(const std::string& component) {
  static std::mutex mu;
  std::lock_guard lock(mu);
  if (auto existing = spdlog::get(component)) return existing;
  auto logger = spdlog::stderr_color_mt(component);
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [%n %P] %v");
  logger->set_level(spdlog::level::info);
  if (const char* level = std::getenv("ULSP_LOG")) logger->set_level(spdlog::level::from_str(level));
  return logger;
}

namespace {

// Appends `text`, whole lines, to `fd`. Returns 0, or the errno of a write that
// failed (ENOSPC); then a line the write stopped inside is cut back off the file
// (all of `text` with `all_or_nothing`), and `*lines_written` says how many lines
// it kept.
int AppendWholeLines(int fd, std::string_view text, size_t* lines_written, bool all_or_nothing) noexcept {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : ENOSPC;
      const size_t nl = done == 0 || all_or_nothing ? std::string_view::npos : text.rfind('\n', done - 1);
      const size_t keep = nl == std::string_view::npos ? 0 : nl + 1;
      // The file ends where this write stopped (no other writer): cut back from there.
      // Only a failure pays the lseek.
      if (keep < done) {
        if (const off_t end = ::lseek(fd, 0, SEEK_END); end >= static_cast<off_t>(done - keep))
          (void)!::ftruncate(fd, end - static_cast<off_t>(done - keep));
      }
      *lines_written = static_cast<size_t>(std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(keep), '\n'));
      return err;
    }
    done += static_cast<size_t>(n);
  }
  *lines_written = static_cast<size_t>(std::count(text.begin(), text.end(), '\n'));
  return 0;
}

}  // namespace

LineLog::LineLog(UniqueFd fd, std::string path, std::string component, std::string who)
    : fd_(std::move(fd)), path_(std::move(path)), component_(std::move(component)), who_(std::move(who)) {}

bool LineLog::Append(std::string_view text, const GapLine& gap) {
  const auto lines = static_cast<uint64_t>(std::count(text.begin(), text.end(), '\n'));
  std::string with_gap;
  if (lost_ > 0) {
    const char* why = strerrorname_np(lost_error_);
    with_gap = gap(lost_, why != nullptr ? why : "?");
    with_gap += text;
    text = with_gap;
  }
  size_t taken = 0;
  const int err = AppendWholeLines(fd_.get(), text, &taken, /*all_or_nothing=*/lost_ > 0);
  if (err == 0) {
    if (lost_ > 0) Logger(component_)->info("{}: writing {} again; {} lines were lost", who_, path_, lost_);
    lost_ = 0;
    return true;
  }
  if (lost_ == 0) {
    lost_error_ = err;
    Logger(component_)->warn("{}: writing {} failed: {}; its lines are dropped and counted until a write succeeds", who_,
                             path_, std::strerror(err));
  }
  lost_ += lines - taken;  // after a loss nothing is taken: all or nothing
  return false;
}

}  // namespace ulsp
