// Errors inside ulsp: a positive errno value in a small type, returned as
// std::expected. The sign flips only at the boundary that wants it (seccomp's
// resp.error is negative); FUSE's fuse_reply_err takes this value as it is.
#pragma once

#include <cerrno>
#include <cstring>
#include <expected>
#include <string>
#include <type_traits>
#include <utility>

namespace ulsp {

// A positive errno value (EIO, ECONNRESET, ...). Zero is never an Errno: success is the
// value side of Result.
struct Errno {
  int value;

  constexpr explicit Errno(int v) noexcept : value(v) {}
  // The C library's description ("Connection reset by peer"); thread-safe.
  std::string Describe() const { return strerrordesc_np(value) ? strerrordesc_np(value) : "errno " + std::to_string(value); }
  friend constexpr bool operator==(Errno, Errno) = default;
};

template <class T>
using Result = std::expected<T, Errno>;

// `return Fail(ENOENT);` from a function returning Result<T>.
inline std::unexpected<Errno> Fail(int error) noexcept { return std::unexpected(Errno(error)); }

// Runs a system call (a callable returning -1 and setting errno on failure), retrying
// EINTR. Every system call in the framework goes through here, so callers switch on
// the errno values they handle and never see EINTR.
template <class F>
[[nodiscard]] auto Sys(F&& call) -> Result<std::invoke_result_t<F&>> {
  for (;;) {
    auto r = call();
    if (r != -1) return r;
    if (errno != EINTR) return Fail(errno);
  }
}

}  // namespace ulsp
