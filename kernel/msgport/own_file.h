// Files and directories that ulsp, usually running as root, writes where other users
// may write too (/tmp): logs, reports, an overlay's upper directory. Where the
// kernel's fs.protected_symlinks and fs.protected_regular are off (the kernel's own
// default, kept by systems without systemd's sysctl.d), a local user could otherwise
// plant a symbolic link or a file of their own at the path beforehand and have root
// write through it (into /etc/shadow), or serve a group files of their choosing.
//
// Trusted here: what is the caller's or root's, and what the owner of a directory
// that only they may write made in it (`sudo ulsp ...` with files in the user's own
// home), as the kernel's fs.protected_* rules also judge.
#pragma once

#include <expected>
#include <string>
#include <string_view>

#include "kernel/msgport/errno.h"
#include "kernel/msgport/unique_fd.h"

namespace ulsp {

// Opens `path` for writing, appended to (`append`) or emptied, made 0644 if missing.
// Refused, with a message that names the path and says why: a symbolic link there
// or on the way there that is not trusted, or an existing file or FIFO that is not
// (checked before anything of it changes). Character devices (/dev/null, a
// terminal) are written as they are.
std::expected<UniqueFd, std::string> OpenOwnFile(const std::string& path, bool append);

// Writes all of `content` to `fd`, retrying short writes (and EINTR). Fails with the
// errno of the write that failed (ENOSPC for one that took nothing).
Result<void> WriteAll(int fd, std::string_view content);

// Writes `content` as the whole of file `path`, opened as OpenOwnFile does. A full
// disk is an error that names the path, and leaves a file that was there unchanged
// (its blocks are reserved before the old content goes), and makes none that was not.
std::expected<void, std::string> WriteOwnFile(const std::string& path, std::string_view content);

// Reads a secret (a shared token, a TLS private key) whole, as ssh reads a private
// key: refused, with a message that names the path and says how to mend it, when
// the file (or a symbolic link to it or on the way) is not trusted, or any other
// user may read or write it.
std::expected<std::string, std::string> ReadSecretFile(const std::string& path);

// Reads a file a user named (a policy, an allow-list, a certificate) whole. What is
// wrong, as a reason without the path (the caller says what the file was for): it
// cannot be opened (strerror), it is a directory, it is neither a regular file nor a
// pipe (/dev/zero would be read for ever), or it holds more than `most` bytes.
std::expected<std::string, std::string> ReadTextFile(const std::string& path, size_t most);

// Makes directory `path` (0755, parents as needed) when missing, and checks that it
// is trusted and that no other user may write in it (followed through symbolic
// links, at the end or on the way, that are trusted too). What is wrong, in a message that names the path, else
// nothing.
std::expected<void, std::string> MakeOwnDirectory(const std::string& path);

}  // namespace ulsp
