#include "kernel/msgport/own_file.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "kernel/msgport/errno.h"

namespace ulsp {

namespace {

// Whether what `path` names, owned by `owner`, may be trusted: it is the caller's or
// root's, or it lies in a directory that its owner alone may write, so that nobody
// else could have put it there (`sudo ulsp ...` with a file in the user's own home;
// the kernel's fs.protected_* rules also trust a directory's owner).
bool Trusted(uid_t owner, const std::string& path) {
  if (owner == ::geteuid() || owner == 0) return true;
  auto p = std::filesystem::path(path).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();  // "dir/"
  const std::string parent = p.has_parent_path() ? p.parent_path().string() : ".";
  struct stat dir {};
  if (::stat(parent.c_str(), &dir) != 0) return false;
  return dir.st_uid == owner && (dir.st_mode & (S_IWGRP | S_IWOTH)) == 0;
}

// Where a symbolic link at `path` leads (the path itself when it is none).
std::string Resolved(const std::string& path, bool is_link) {
  if (!is_link) return path;
  char real[PATH_MAX];
  return ::realpath(path.c_str(), real) != nullptr ? std::string(real) : path;
}

// "0644".
std::string ModeOf(const struct stat& st) {
  char mode[8];
  std::snprintf(mode, sizeof mode, "%04o", st.st_mode & 07777);
  return mode;
}

std::string NotOurs(const std::string& path, const char* what, uid_t uid) {
  return path + ": " + what + " owned by uid " + std::to_string(uid) +
         ", neither yours, root's nor its directory owner's: refusing to use what another user controls";
}

// Whether `path` is a symbolic link (then `link` holds its lstat), refused when it,
// or a link on the way to it (/tmp/theirs/log, /tmp/theirs -> /etc), is not trusted.
// A missing path is no link. Called before and after the path is used: a link put
// on the way meanwhile is found by the second call.
std::expected<bool, std::string> OurLink(const std::string& path, struct stat& link) {
  std::filesystem::path so_far;
  const std::filesystem::path whole(path);
  for (auto part = whole.begin(); part != whole.end(); ++part) {
    so_far /= *part;
    if (std::next(part) == whole.end()) break;  // the path itself: below
    struct stat st {};
    if (::lstat(so_far.c_str(), &st) != 0) break;  // missing: nothing further to follow
    if (S_ISLNK(st.st_mode) && !Trusted(st.st_uid, so_far.string()))
      return std::unexpected(path + ": on the way, " + NotOurs(so_far.string(), "a symbolic link", st.st_uid));
  }
  if (::lstat(path.c_str(), &link) != 0 || !S_ISLNK(link.st_mode)) return false;
  if (!Trusted(link.st_uid, path)) return std::unexpected(NotOurs(path, "a symbolic link", link.st_uid));
  return true;
}

// What is left of `fd` to its end; the read's error, or "larger than N MiB" past
// `most` bytes.
std::expected<std::string, std::string> ReadToEnd(int fd, size_t most) {
  std::string out;
  char buf[65536];
  for (;;) {
    auto n = Sys([&] { return ::read(fd, buf, sizeof buf); });
    if (!n) return std::unexpected(n.error().Describe());
    if (*n == 0) return out;
    if (out.size() + static_cast<size_t>(*n) > most)
      return std::unexpected("larger than " + std::to_string(most >> 20) + " MiB");
    out.append(buf, static_cast<size_t>(*n));
  }
}

}  // namespace

std::expected<UniqueFd, std::string> OpenOwnFile(const std::string& path, bool append) {
  struct stat link {};
  const auto is_link = OurLink(path, link);
  if (!is_link) return std::unexpected(is_link.error());
  // Not followed unless it was ours just now (a link put there since fails, ELOOP).
  // Non-blocking, so that a FIFO without a reader fails (ENXIO) instead of hanging.
  const int flags = O_WRONLY | O_CREAT | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | (append ? O_APPEND : 0) |
                    (*is_link ? 0 : O_NOFOLLOW);
  auto fd = Sys([&] { return ::open(path.c_str(), flags, 0644); });
  if (!fd) return std::unexpected(path + ": " + fd.error().Describe());
  UniqueFd file(*fd);
  struct stat st {};
  if (::fstat(file.get(), &st) != 0) return std::unexpected(path + ": " + std::strerror(errno));
  struct stat now {};
  const auto still = OurLink(path, now);
  if (!still) return std::unexpected(still.error());
  if (*still != *is_link || (*is_link && (now.st_dev != link.st_dev || now.st_ino != link.st_ino)))
    return std::unexpected(path + ": the symbolic link changed while it was opened");
  if ((S_ISREG(st.st_mode) || S_ISFIFO(st.st_mode)) && !Trusted(st.st_uid, Resolved(path, *is_link)))
    return std::unexpected(NotOurs(path, S_ISREG(st.st_mode) ? "a file" : "a FIFO", st.st_uid));
  if (::fcntl(file.get(), F_SETFL, append ? O_APPEND : 0) != 0)
    return std::unexpected(path + ": " + std::strerror(errno));
  if (!append && S_ISREG(st.st_mode) && ::ftruncate(file.get(), 0) != 0)
    return std::unexpected(path + ": " + std::strerror(errno));
  return file;
}

Result<void> WriteAll(int fd, std::string_view content) {
  while (!content.empty()) {
    auto n = Sys([&] { return ::write(fd, content.data(), content.size()); });
    if (!n) return std::unexpected(n.error());
    if (*n == 0) return Fail(ENOSPC);
    content.remove_prefix(static_cast<size_t>(*n));
  }
  return {};
}

std::expected<void, std::string> WriteOwnFile(const std::string& path, std::string_view content) {
  // Opened without emptying it, and emptied only once the disk has room for the new
  // content: a full disk leaves an earlier file as it was, not cut short.
  // A file this makes is removed again if it cannot be written whole: no empty or
  // partial report is left where there was none.
  struct stat before {};
  const bool existed = ::lstat(path.c_str(), &before) == 0;
  auto fd = OpenOwnFile(path, /*append=*/true);
  if (!fd) return std::unexpected(fd.error());
  struct stat st {};
  auto fail = [&](std::string why) {
    if (!existed && S_ISREG(st.st_mode)) ::unlink(path.c_str());
    return std::unexpected(path + ": " + std::move(why));
  };
  if (::fstat(fd->get(), &st) != 0 || ::fcntl(fd->get(), F_SETFL, 0) != 0) return fail(std::strerror(errno));
  const bool regular = S_ISREG(st.st_mode);
  if (regular && !content.empty() && ::fallocate(fd->get(), 0, 0, static_cast<off_t>(content.size())) != 0 &&
      errno != EOPNOTSUPP)
    return fail(std::strerror(errno));
  if (auto w = WriteAll(fd->get(), content); !w) return fail(w.error().Describe());
  if (regular && ::ftruncate(fd->get(), static_cast<off_t>(content.size())) != 0) return fail(std::strerror(errno));
  if (::close(fd->release()) != 0) return fail(std::strerror(errno));
  return {};
}

std::expected<std::string, std::string> ReadSecretFile(const std::string& path) {
  struct stat link {};
  if (const auto is_link = OurLink(path, link); !is_link) return std::unexpected(is_link.error());
  auto fd = Sys([&] { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY); });
  if (!fd) return std::unexpected(path + ": " + fd.error().Describe());
  UniqueFd file(*fd);
  struct stat st {};
  if (::fstat(file.get(), &st) != 0) return std::unexpected(path + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) return std::unexpected(path + ": not a regular file");
  if (!Trusted(st.st_uid, Resolved(path, true))) return std::unexpected(NotOurs(path, "a secret", st.st_uid));
  if ((st.st_mode & 077) != 0) {
    return std::unexpected(path + ": other users may read or write this secret (mode " + ModeOf(st) +
                           "): make it its owner's alone (chmod 600 " + path + ")");
  }
  auto text = ReadToEnd(file.get(), SIZE_MAX);
  if (!text) return std::unexpected(path + ": " + text.error());
  return text;
}

std::expected<std::string, std::string> ReadTextFile(const std::string& path, size_t most) {
  auto fd = Sys([&] { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY); });
  if (!fd) return std::unexpected(fd.error().Describe());
  UniqueFd file(*fd);
  struct stat st {};
  if (::fstat(file.get(), &st) != 0) return std::unexpected(std::strerror(errno));
  if (S_ISDIR(st.st_mode)) return std::unexpected("a directory, not a file");
  if (!S_ISREG(st.st_mode) && !S_ISFIFO(st.st_mode)) return std::unexpected("not a regular file or a pipe");
  return ReadToEnd(file.get(), most);
}

std::expected<void, std::string> MakeOwnDirectory(const std::string& path) {
  struct stat link {};
  const auto is_link = OurLink(path, link);
  if (!is_link) return std::unexpected(is_link.error());
  if (!*is_link && ::lstat(path.c_str(), &link) != 0) {
    // It and its missing parents, 0755 (less under a stricter umask; never more).
    std::string so_far;
    for (const auto& part : std::filesystem::path(path).lexically_normal()) {
      so_far = so_far.empty() || so_far == "/" ? so_far + part.string() : so_far + "/" + part.string();
      if (::mkdir(so_far.c_str(), 0755) != 0 && errno != EEXIST)
        return std::unexpected(so_far + ": " + std::strerror(errno));
    }
  }
  if (const auto again = OurLink(path, link); !again) return std::unexpected(again.error());  // put there meanwhile
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::unexpected(path + ": " + std::strerror(errno));
  if (!S_ISDIR(st.st_mode)) return std::unexpected(path + ": not a directory");
  if (!Trusted(st.st_uid, Resolved(path, *is_link))) return std::unexpected(NotOurs(path, "a directory", st.st_uid));
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return std::unexpected(path + ": a directory other users may write (mode " + ModeOf(st) +
                           "): what they put there would be served as yours");
  }
  return {};
}

}  // namespace ulsp
