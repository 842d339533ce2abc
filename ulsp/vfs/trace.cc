#include "ulsp/vfs/trace.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <chrono>
#include <ctime>

#include <fmt/format.h>

#include "kernel/msgport/log.h"
#include "kernel/msgport/own_file.h"

namespace ulsp::vfs {

namespace {
// The length of the well-formed UTF-8 sequence at s[i] (RFC 3629: no overlong forms,
// no surrogates, nothing past U+10FFFF), or 0 if there is none.
size_t Utf8Length(std::string_view s, size_t i) {
  const auto at = [&](size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0u; };
  const auto tail = [&](size_t k) { return (at(k) & 0xc0) == 0x80; };
  const unsigned c = at(0);
  if (c >= 0xc2 && c <= 0xdf) return tail(1) ? 2 : 0;
  if (c >= 0xe0 && c <= 0xef) {
    const unsigned lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;
    return at(1) >= lo && at(1) <= hi && tail(2) ? 3 : 0;
  }
  if (c >= 0xf0 && c <= 0xf4) {
    const unsigned lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
    return at(1) >= lo && at(1) <= hi && tail(2) && tail(3) ? 4 : 0;
  }
  return 0;
}
}  // namespace

std::string JsonQuote(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out += '"';
  for (size_t i = 0; i < s.size(); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    // Names are bytes. UTF-8 is written as it is, so a reader gets the name back;
    // control characters, DEL and each byte that is not part of UTF-8 become \u00XX
    // (a Latin-1 name reads as Latin-1), so every line stays valid JSON.
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(s[i]);
    } else if (c >= 0x20 && c < 0x7f) {
      out.push_back(s[i]);
    } else if (const size_t n = c >= 0x80 ? Utf8Length(s, i) : 0; n > 0) {
      out.append(s.substr(i, n));
      i += n - 1;
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      const char esc[6] = {'\\', 'u', '0', '0', kHex[c >> 4], kHex[c & 15]};
      out.append(esc, sizeof esc);
    }
  }
  out += '"';
  return out;
}

std::expected<std::unique_ptr<TraceLayer>, std::string> TraceLayer::Open(const std::string& log_path,
                                                                        std::unique_ptr<Layer> lower) {
  auto fd = OpenOwnFile(log_path, /*append=*/true);
  if (!fd) return std::unexpected(fd.error());
  return std::unique_ptr<TraceLayer>(new TraceLayer(LineLog(std::move(*fd), log_path, "vfs", "trace"), std::move(lower)));
}

TraceLayer::TraceLayer(LineLog log, std::unique_ptr<Layer> lower)
    : Layer(std::move(lower)), log_(std::move(log)), flusher_([this] { Flusher(); }) {
  ListsThrough();  // it logs listings; nothing of its own is kept per directory handle
  // It records opens (with their access mode); what is read and written after is the
  // kernel's to do when it may (a read or write that reaches it is recorded too).
  PassesFileData();
}

TraceLayer::~TraceLayer() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_one();
  flusher_.join();
  try {
    Write(pending_);  // no other thread is left
  } catch (const std::bad_alloc&) {
    Logger("vfs")->warn("trace: {} records were lost (out of memory)", pending_.size());
  }
  if (log_.lost() > 0)
    Logger("vfs")->warn("trace: {} lines at the end were lost: {} could not take them", log_.lost(), log_.path());
}

namespace {
// A line's start: {"time":"2026-12-02T05:30:00.123456Z" (UTC, microseconds).
std::string LineStart(const timespec& t) {
  struct tm utc {};
  gmtime_r(&t.tv_sec, &utc);
  return fmt::format(R"({{"time":"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z")", utc.tm_year + 1900, utc.tm_mon + 1,
                     utc.tm_mday, utc.tm_hour, utc.tm_min, utc.tm_sec, t.tv_nsec / 1000);
}
}  // namespace

std::string TraceLayer::Format(const Record& r) {
  // ENOSYS to a handleless opendir tells the kernel to list without handles: for the
  // program, its opendir succeeded (and the kernel sends no more of them).
  const char* result = r.err == 0 || r.listed_without_handle ? "ok" : strerrorname_np(r.err);
  std::string line = LineStart(r.time) + fmt::format(R"(,"pid":{},"uid":{},"op":"{}","path":{})", r.pid, r.uid,
                                                     IsTmpfile(r.op, r.flags) ? "tmpfile" : msgport::VfsOpName(r.op),
                                                     JsonQuote(r.path));
  if (!r.path2.empty()) line += fmt::format(R"(,"to":{})", JsonQuote(r.path2));
  if (r.op == VfsOp::kOpen || r.op == VfsOp::kCreate) {
    const int access = r.flags & O_ACCMODE;
    line += access == O_RDONLY ? R"(,"mode":"r")" : access == O_WRONLY ? R"(,"mode":"w")" : R"(,"mode":"rw")";
  }
  line += fmt::format(R"(,"result":"{}"}})", result != nullptr ? result : "?");
  line += '\n';
  return line;
}

void TraceLayer::Write(const std::vector<Record>& records) {
  std::string text;
  for (const Record& r : records) {
    text += Format(r);
    if (text.size() < (64u << 10) && &r != &records.back()) continue;
    // After lines were dropped, the first write that succeeds says how many.
    (void)log_.Append(text, [](uint64_t count, const char* error) {
      timespec now{};
      ::clock_gettime(CLOCK_REALTIME, &now);
      return LineStart(now) + fmt::format(R"(,"op":"lost","count":{},"result":"{}"}})", count, error) + "\n";
    });
    text.clear();
  }
}

void TraceLayer::Flusher() {
  std::vector<Record> batch;
  std::unique_lock lock(mu_);
  while (!stopping_) {
    cv_.wait_for(lock, std::chrono::milliseconds(50));
    if (pending_.empty()) continue;
    batch.swap(pending_);
    lock.unlock();
    drained_cv_.notify_all();
    try {
      Write(batch);
    } catch (const std::bad_alloc&) {
      Logger("vfs")->warn("trace: {} records were lost (out of memory)", batch.size());
    }
    batch.clear();
    lock.lock();
  }
}

void TraceLayer::Append(Record&& r) {
  std::unique_lock lock(mu_);
  // A log that cannot keep up holds the requests back rather than grow without end.
  drained_cv_.wait(lock, [this] { return pending_.size() < kMaxPending || stopping_; });
  pending_.push_back(std::move(r));
  if (pending_.size() == kWakeAt) cv_.notify_one();
}

int TraceLayer::Serve(VfsRequest& req) noexcept {
  if (req.op == VfsOp::kForget) return Down(req);
  // Paths are taken before the request runs: a rename or forget changes them. A
  // failure to log never changes what the request does. The line is made and
  // written by the flusher thread, off the request's path.
  Record r;
  try {
    r.path = PathOf(req.node);
    switch (req.op) {
      case VfsOp::kLookup:
      case VfsOp::kMkNod:
      case VfsOp::kMkDir:
      case VfsOp::kUnlink:
      case VfsOp::kRmDir:
      case VfsOp::kSymlink:
      case VfsOp::kCreate:
        if (!req.name.empty()) r.path = JoinPath(r.path, req.name);  // none for O_TMPFILE: the directory
        break;
      case VfsOp::kRename:
        r.path = JoinPath(r.path, req.name);
        r.path2 = JoinPath(PathOf(req.node2), req.name2);
        break;
      case VfsOp::kLink:
        r.path2 = JoinPath(PathOf(req.node2), req.name2);
        break;
      default:
        break;
    }
  } catch (...) {
    r.path.assign(1, '?');
  }
  r.op = req.op;
  r.flags = req.flags;
  r.pid = req.ctx.pid;
  r.uid = req.ctx.uid;
  r.err = Down(req);
  r.listed_without_handle = req.op == VfsOp::kOpenDir && r.err == ENOSYS && req.handleless_ok;
  clock_gettime(CLOCK_REALTIME, &r.time);
  const int err = r.err;
  try {
    Append(std::move(r));
  } catch (...) {
    Logger("vfs")->warn("trace: a record was lost (out of memory)");
  }
  return err;
}

}  // namespace ulsp::vfs
