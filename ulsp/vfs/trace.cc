#include "ulsp/vfs/trace.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <chrono>
#include <ctime>

#include <fmt/format.h>

#include "kernel/msgport/log.h"

namespace ulsp::vfs {

std::string JsonQuote(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out += '"';
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    // Names are bytes, not UTF-8: control characters and bytes above 0x7e become
    // \u00XX so every line stays valid JSON (the byte value is kept for a reader).
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(ch);
    } else if (c < 0x20 || c >= 0x7f) {
      static constexpr char kHex[] = "0123456789abcdef";
      const char esc[6] = {'\\', 'u', '0', '0', kHex[c >> 4], kHex[c & 15]};
      out.append(esc, sizeof esc);
    } else {
      out.push_back(ch);
    }
  }
  out += '"';
  return out;
}

Result<std::unique_ptr<TraceLayer>> TraceLayer::Open(const std::string& log_path, std::unique_ptr<Layer> lower) {
  auto fd = Sys([&] { return ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644); });
  if (!fd) return std::unexpected(fd.error());
  return std::unique_ptr<TraceLayer>(new TraceLayer(UniqueFd(*fd), std::move(lower)));
}

TraceLayer::TraceLayer(UniqueFd log, std::unique_ptr<Layer> lower)
    : Layer(std::move(lower)), log_(std::move(log)), flusher_([this] { Flusher(); }) {
  ListsThrough();  // it logs listings; nothing of its own is kept per directory handle
}

TraceLayer::~TraceLayer() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_one();
  flusher_.join();
  std::lock_guard lock(mu_);
  FlushLocked();
}

void TraceLayer::FlushLocked() {
  size_t done = 0;
  while (done < pending_.size()) {
    const ssize_t n = ::write(log_.get(), pending_.data() + done, pending_.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (!warned_) Logger("vfs")->warn("trace: writing the log failed: {}", std::strerror(errno));
      warned_ = true;
      break;
    }
    done += static_cast<size_t>(n);
  }
  pending_.clear();
}

void TraceLayer::Flusher() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    cv_.wait_for(lock, std::chrono::milliseconds(50));
    if (!pending_.empty()) FlushLocked();
  }
}

void TraceLayer::Append(const std::string& line) {
  std::lock_guard lock(mu_);
  pending_ += line;
  if (pending_.size() >= (64u << 10)) FlushLocked();
}

int TraceLayer::Serve(VfsRequest& req) noexcept {
  if (req.op == VfsOp::kForget) return Down(req);
  // Paths are taken before the request runs: a rename or forget changes them. A
  // failure to log never changes what the request does.
  std::string path, path2;
  try {
    path = PathOf(req.node);
    switch (req.op) {
      case VfsOp::kLookup:
      case VfsOp::kMkNod:
      case VfsOp::kMkDir:
      case VfsOp::kUnlink:
      case VfsOp::kRmDir:
      case VfsOp::kSymlink:
      case VfsOp::kCreate:
        path = JoinPath(path, req.name);
        break;
      case VfsOp::kRename:
        path = JoinPath(path, req.name);
        path2 = JoinPath(PathOf(req.node2), req.name2);
        break;
      case VfsOp::kLink:
        path2 = JoinPath(PathOf(req.node2), req.name2);
        break;
      default:
        break;
    }
  } catch (...) {
    path.assign(1, '?');
  }
  const int err = Down(req);
  try {
    struct timespec now {};
    clock_gettime(CLOCK_REALTIME, &now);
    struct tm utc {};
    gmtime_r(&now.tv_sec, &utc);
    // ENOSYS to a handleless opendir tells the kernel to list without handles: for
    // the program, its opendir succeeded (and the kernel sends no more of them).
    const bool listed_without_handle = req.op == VfsOp::kOpenDir && err == ENOSYS && req.handleless_ok;
    const char* result = err == 0 || listed_without_handle ? "ok" : strerrorname_np(err);
    std::string line = fmt::format(
        R"({{"time":"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z","pid":{},"uid":{},"op":"{}","path":{})",
        utc.tm_year + 1900, utc.tm_mon + 1, utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec, now.tv_nsec / 1000,
        req.ctx.pid, req.ctx.uid, msgport::VfsOpName(req.op), JsonQuote(path));
    if (!path2.empty()) line += fmt::format(R"(,"to":{})", JsonQuote(path2));
    line += fmt::format(R"(,"result":"{}"}})", result != nullptr ? result : "?");
    line += '\n';
    Append(line);
  } catch (...) {
    Logger("vfs")->warn("trace: a record was lost (out of memory)");
  }
  return err;
}

}  // namespace ulsp::vfs
