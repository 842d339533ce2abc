// Real mounts, real programs: cp -a, tar, diff -r, git, python3 and parallel writers
// through `ulsp mount`, over passthrough alone and over a stack (trace on view on
// passthrough). Every test mounts on a fresh directory and leaves nothing behind.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <functional>
#include <thread>
#include <sstream>
#include <string>

#include "tests/vfs/mount_fixture.h"
#include "ulsp/vfs/memfs.h"

namespace ulsp::testing {
namespace {

const std::string kPython = "/usr/bin/python3";
const std::string kSemantics = std::string(ULSP_TESTS_DIR) + "/vfs/semantics.py";
const std::string kAcl = std::string(ULSP_TESTS_DIR) + "/vfs/acl.py";

// One mount for a test: a source directory, a mount point, and what serves it.
// The parameter is "passthrough", "isolated" (passthrough in its own process),
// "stack" (trace, then view admitting /work, on passthrough, with kernel passthrough
// off so that every read and write is served by the stack), "memfs", "isolated-memfs"
// (memfs in its own process: its handles are 0, which the isolated port once took for
// no handle, answering EBADF), or "overlay" (an upper directory over passthrough of
// src/); "uring" and "uring-isolated" are passthrough and isolated with requests
// through FUSE over io_uring (the kernel's switch on for the test), and the others
// read /dev/fuse (the switch off).
class MountTest : public ::testing::TestWithParam<std::string> {
 protected:
  bool Uring() const { return GetParam().starts_with("uring"); }
  bool Memfs() const { return GetParam().ends_with("memfs"); }
  void SetUp() override {
    uring_switch_ = std::make_unique<KernelUringSwitch>(Uring());
    ASSERT_TRUE(uring_switch_->ok()) << "cannot set " << KernelUringSwitch::kParam;
    ASSERT_EQ(::mkdir((dir_ / "src").c_str(), 0755), 0);
    ASSERT_EQ(::mkdir((dir_ / "mnt").c_str(), 0755), 0);
    ASSERT_EQ(::mkdir((dir_ / "src/work").c_str(), 0777), 0);
    ASSERT_EQ(::chmod((dir_ / "src/work").c_str(), 0777), 0);
    std::vector<std::string> args;
    if (GetParam() == "passthrough" || GetParam() == "uring") {
      args = {dir_ / "src"};
    } else if (GetParam() == "isolated" || GetParam() == "uring-isolated") {
      args = {"--isolated", dir_ / "src"};
    } else if (Memfs()) {
      args = {"--stack", "memfs:8G"};
      if (GetParam() == "isolated-memfs") args.insert(args.begin(), "--isolated");
    } else if (GetParam() == "overlay") {
      ASSERT_EQ(::mkdir((dir_ / "upper").c_str(), 0755), 0);
      args = {"--stack", "overlay:" + (dir_ / "upper") + ",passthrough:" + (dir_ / "src")};
    } else {
      std::ofstream(dir_ / "allow.txt") << "# the test's working tree\n/work\n";
      args = {"--no-kernel-passthrough", "--stack",
              "trace:" + (dir_ / "trace.jsonl") + ",view:" + (dir_ / "allow.txt") + ",passthrough:" + (dir_ / "src")};
    }
    mount_ = std::make_unique<ServedMount>(args, dir_ / "mnt", dir_ / "server.log");
    ASSERT_TRUE(mount_->ok()) << "the mount did not come up; server log:\n" << ReadAll(dir_ / "server.log");
    work_ = mount_->path() + "/work";
    if (Memfs()) {
      ASSERT_EQ(::mkdir(work_.c_str(), 0777), 0);
      ASSERT_EQ(::chmod(work_.c_str(), 0777), 0);
    }
  }
  // Where `rel` (inside /work) is stored: on disk under src/, or, for memfs, only
  // in the mount.
  std::string Stored(const std::string& rel) const {
    if (Memfs()) return work_ + "/" + rel;
    if (GetParam() == "overlay") return dir_ / "upper/work/" + rel;  // changes land above
    return dir_ / "src/work/" + rel;
  }
  void TearDown() override {
    if (mount_) {
      EXPECT_EQ(mount_->Stop(), 0) << "the server did not exit cleanly; log:\n" << ReadAll(dir_ / "server.log");
      // The server counts, on its way out, the requests that came through the rings.
      const std::string log = ReadAll(dir_ / "server.log");
      if (Uring()) {
        EXPECT_NE(log.find("requests came through io_uring"), std::string::npos) << log;
      } else {
        EXPECT_EQ(log.find("io_uring"), std::string::npos) << log;
      }
    }
    uring_switch_.reset();
  }

  std::unique_ptr<KernelUringSwitch> uring_switch_;
  TempDir dir_;
  std::unique_ptr<ServedMount> mount_;
  std::string work_;  // where tests write, inside the mount
};

TEST_P(MountTest, CpArchiveThenDiffMatchesSourceAndDisk) {
  ASSERT_EQ(Shell("cp -a /usr/include/linux " + work_ + "/linux"), 0);
  EXPECT_EQ(Shell("diff -r /usr/include/linux " + work_ + "/linux"), 0);
  // What the mount reports is what is on disk underneath.
  EXPECT_EQ(Shell("diff -r " + Stored("linux") + " " + work_ + "/linux"), 0);
  // Names, types, modes, file sizes and modification times (a directory's size is the
  // file system's own business).
  const std::string listing = " && find . -printf '%p %y %m %T@ ' \\( -type d -printf '\\n' -o -printf '%s\\n' \\) | sort";
  EXPECT_EQ(Output("cd /usr/include/linux" + listing), Output("cd " + work_ + "/linux" + listing));
}

TEST_P(MountTest, TarExtractAndCreateRoundTrip) {
  ASSERT_EQ(Shell("set -o pipefail; tar -C /usr/include -cf - linux sound | tar -C " + work_ + " -xf -"), 0);
  ASSERT_EQ(Shell("tar -C " + work_ + " -cf " + dir_ / "out.tar" + " linux sound"), 0);
  ASSERT_EQ(::mkdir((dir_ / "native").c_str(), 0755), 0);
  ASSERT_EQ(Shell("tar -C " + dir_ / "native" + " -xf " + dir_ / "out.tar"), 0);
  EXPECT_EQ(Shell("diff -r /usr/include/linux " + dir_ / "native/linux"), 0);
  EXPECT_EQ(Shell("diff -r /usr/include/sound " + dir_ / "native/sound"), 0);
}

TEST_P(MountTest, GitInitAddCommitStatus) {
  const std::string repo = work_ + "/repo";
  const std::string git = "git -C " + repo + " -c user.name=t -c user.email=t@example.invalid ";
  ASSERT_EQ(Shell("mkdir " + repo + " && cp -a /usr/include/linux/netfilter " + repo + "/"), 0);
  ASSERT_EQ(Shell(git + "init -q"), 0);
  ASSERT_EQ(Shell(git + "add ."), 0);
  ASSERT_EQ(Shell(git + "commit -qm first"), 0);
  EXPECT_EQ(Output(git + "status --porcelain"), "");
  ASSERT_EQ(Shell("echo change >> " + repo + "/netfilter/xt_mark.h"), 0);
  EXPECT_EQ(Output(git + "status --porcelain"), " M netfilter/xt_mark.h\n");
  ASSERT_EQ(Shell(git + "commit -qam second"), 0);
  EXPECT_EQ(Output(git + "rev-list --count HEAD"), "2\n");
  EXPECT_EQ(Shell(git + "fsck --no-progress 2>/dev/null"), 0);
}

// The semantics script gives the same answers natively and through the mount.
TEST_P(MountTest, SemanticsMatchTheFileSystemUnderneathForRoot) {
  ASSERT_EQ(::mkdir((dir_ / "native").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((work_ + "/sem").c_str(), 0755), 0);
  const std::string native = Output(kPython + " " + kSemantics + " " + dir_ / "native" + " root", true);
  const std::string mounted = Output(kPython + " " + kSemantics + " " + work_ + "/sem root", true);
  ASSERT_NE(native.find("unlink-hardlink:"), std::string::npos) << native;
  EXPECT_EQ(native, mounted);
}

TEST_P(MountTest, SemanticsMatchTheFileSystemUnderneathForAnUnprivilegedUser) {
  // A world-writable directory with a root-owned file (with a trusted.* and a user.*
  // attribute), a sticky directory holding another, and root's world-writable
  // set-user-ID and set-group-ID files, in both places.
  auto prepare = [](const std::string& d) {
    return Shell("mkdir -m 777 " + d + " && chmod 777 " + d + " && echo x > " + d + "/theirs && " + kPython +
                 " -c \"import os; [os.setxattr('" + d + "/theirs', n, b'v') for n in ('trusted.t', 'user.u')]\" && mkdir " + d +
                 "/sticky && chmod 1777 " + d + "/sticky && echo y > " + d + "/sticky/theirs && echo s > " + d +
                 "/suid && chmod 4777 " + d + "/suid && echo g > " + d + "/sgid && chmod 2777 " + d + "/sgid");
  };
  ASSERT_EQ(prepare(dir_ / "native"), 0);
  ASSERT_EQ(prepare(work_ + "/user"), 0);
  const std::string as_nobody = "setpriv --reuid nobody --regid nogroup --clear-groups " + kPython + " " + kSemantics;
  const std::string native = Output(as_nobody + " " + dir_ / "native user", true);
  const std::string mounted = Output(as_nobody + " " + work_ + "/user user", true);
  ASSERT_NE(native.find("unlink-theirs-sticky: EPERM"), std::string::npos) << native;
  ASSERT_NE(native.find("uid=65534"), std::string::npos) << native;
  ASSERT_NE(native.find("sgid-truncate: mode=-rwxrwxrwx"), std::string::npos) << native;
  ASSERT_NE(native.find("xattr-names-theirs: (['user.u'], 7, 7)"), std::string::npos) << native;
  EXPECT_EQ(native, mounted);
}

// chattr and lsattr: a file's and a directory's inode flags are read and set, and
// ext4 underneath enforces them: an append-only file refuses to be overwritten but
// takes an append, an immutable directory takes no new name, and only the owner may
// change them. Before, the shim served no ioctl and both said "Inappropriate ioctl
// for device". memfs has no inode flags: reading them fails, as on a file system
// without them.
TEST_P(MountTest, InodeFlagsActAsOnTheFileSystemUnderneath) {
  // Each line the same on two correct file systems: the flags, and errors without
  // the path that precedes them.
  const std::string steps = R"sh(set -u; cd "$1"
flags() { lsattr -d "$1" 2>/dev/null | sed 's/ .*//'; lsattr -d "$1" 2>&1 >/dev/null | sed 's/^lsattr: //; s/ While.*//'; }
errors() { "$@" 2>&1 | sed 's/.*: //'; }
echo data > f && mkdir dir && chmod 666 f
errors chattr +a f; echo "f: $(flags f)"
errors sh -c 'echo over > f'; echo more >> f; echo "f holds $(paste -sd' ' f)"
errors setpriv --reuid nobody --regid nogroup --clear-groups chattr -a f
errors setpriv --reuid nobody --regid nogroup --clear-groups sh -c 'echo by-nobody >> f'
chattr -a f; echo "f: $(flags f)"; echo again > f && echo "f holds $(cat f)"
errors chattr +i dir; echo "dir: $(flags dir)"
errors touch dir/new; chattr -i dir; touch dir/new && echo "dir takes a name"
errors chattr +d f; echo "f: $(flags f)"
)sh";
  ASSERT_EQ(::mkdir((dir_ / "native").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((work_ + "/flags").c_str(), 0755), 0);
  std::ofstream(dir_ / "steps.sh") << steps;
  const std::string native = Output("sh " + dir_ / "steps.sh " + dir_ / "native", true);
  const std::string mounted = Output("sh " + dir_ / "steps.sh " + work_ + "/flags", true);
  ASSERT_NE(native.find("f: -----a"), std::string::npos) << native;
  ASSERT_NE(native.find("dir: ----i"), std::string::npos) << native;
  if (!Memfs()) {
    EXPECT_EQ(native, mounted);
  } else {
    EXPECT_NE(mounted.find("f: Operation not supported"), std::string::npos) << mounted;
  }
}

// POSIX ACLs set by root and met by nobody: enforced, kept in step with the mode, and
// inherited from a directory's default ACL in place of the umask, as on ext4. Before
// the shim asked the kernel for POSIX ACLs, the kernel checked the mode bits alone (a
// user an ACL denied read the file; one it let in was refused) and applied the umask
// under a default ACL too. memfs keeps no ACLs: setting one is refused, as on a file
// system without them, and the mode alone decides.
TEST_P(MountTest, PosixAclsActAsOnTheFileSystemUnderneath) {
  ASSERT_EQ(::mkdir((dir_ / "native").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((work_ + "/acl").c_str(), 0755), 0);
  const std::string native = Output(kPython + " " + kAcl + " " + dir_ / "native", true);
  const std::string mounted = Output(kPython + " " + kAcl + " " + work_ + "/acl", true);
  ASSERT_NE(native.find("nobody-reads-deny: EACCES\n"), std::string::npos) << native;
  ASSERT_NE(native.find("nobody-creates: ok\n"), std::string::npos) << native;
  if (GetParam().find("memfs") == std::string::npos) {
    EXPECT_EQ(native, mounted);
  } else {
    EXPECT_NE(mounted.find("set-deny: ENOTSUP\n"), std::string::npos) << mounted;
    EXPECT_NE(mounted.find("nobody-reads-deny: secret\n"), std::string::npos) << mounted;
    EXPECT_EQ(mounted.substr(mounted.find("umask:")), native.substr(native.find("umask:")));
  }
}

// Mounts each stack over the disk `dir`/src in turn (passthrough, isolated,
// trace+view+passthrough, an overlay with `dir`/upper), with the kernel keeping
// entries 30 s, and calls `check` with the mount's path once a stat through the mount
// has found no `rel` (so the kernel holds "no such name" for it). After each, empties
// `rel`'s directory in src and the upper directory.
void ForEachStackOverADisk(const TempDir& dir, const std::string& rel, const std::function<void(const std::string&)>& check) {
  ASSERT_EQ(Shell("mkdir -p " + dir / "mnt " + dir / "upper"), 0);
  std::ofstream(dir / "allow.txt") << "/\n";
  const std::vector<std::vector<std::string>> stacks = {
      {dir / "src"},
      {"--isolated", dir / "src"},
      {"--stack", "trace:" + dir / "t.jsonl,view:" + dir / "allow.txt,passthrough:" + dir / "src"},
      {"--stack", "overlay:" + dir / "upper,passthrough:" + dir / "src"},
  };
  for (std::vector<std::string> args : stacks) {
    SCOPED_TRACE(args.back());
    args.insert(args.begin(), {"--timeout", "30"});  // the kernel keeps "no such name" meanwhile
    ServedMount mount(args, dir / "mnt", dir / "server.log");
    ASSERT_TRUE(mount.ok()) << ReadAll(dir / "server.log");
    EXPECT_EQ(Output("(stat -c %n " + mount.path() + "/" + rel + ") 2>&1 | grep -c 'No such file'"), "1\n");
    check(mount.path());
    EXPECT_EQ(mount.Stop(), 0);
    const std::string emptied = dir / "src/" + rel.substr(0, rel.rfind('/') + 1);
    ASSERT_EQ(Shell("rm -rf " + emptied + "* " + dir / "upper/*"), 0);
  }
}

// A file made beside the mount (on the disk below) where the kernel still holds
// "no such name": the kernel asks the server to create it, not to open it, and checks
// no permission of the file. Opened by the server (root), root's 0600 file was
// appended to by `nobody` and given to it. Now a caller other than root gets EEXIST,
// the kernel drops its entry, and the next try meets the file's permissions. (The
// overlay finds the lower file and answers EEXIST, as before.)
TEST(BehindANegativeEntry, ACreateOpensNoFilePastItsPermissions) {
  TempDir dir;
  ASSERT_EQ(Shell("mkdir -p " + dir / "src/w && chmod 777 " + dir / "src/w"), 0);
  ForEachStackOverADisk(dir, "w/f", [&](const std::string& m) {
    const std::string f = m + "/w/f";
    ASSERT_EQ(Shell("echo secret > " + dir / "src/w/f && chmod 600 " + dir / "src/w/f"), 0);
    EXPECT_EQ(Output("setpriv --reuid nobody --regid nogroup --clear-groups sh -c 'echo x >> " + f + "; echo x >> " + f +
                     "' 2>&1"),
              "sh: 1: cannot create " + f + ": File exists\nsh: 1: cannot create " + f + ": Permission denied\n");
    EXPECT_EQ(Output("stat -c '%U %a' " + dir / "src/w/f && cat " + dir / "src/w/f"), "root 600\nsecret\n");
  });
}

// A rename onto such a file in a sticky directory, where only the file's owner, the
// directory's or root may replace it. The servers rename as root and do not check the
// rule; the kernel does, because it looks a rename's target up again whatever it holds
// (FUSE's revalidation with LOOKUP_RENAME_TARGET), as it does for O_EXCL but not for
// a plain O_CREAT. So `nobody` gets EPERM on every stack; this guards that.
TEST(BehindANegativeEntry, ARenameKeepsAStickyDirectorysRule) {
  TempDir dir;
  ASSERT_EQ(Shell("mkdir -p " + dir / "src/s && chmod 1777 " + dir / "src/s"), 0);
  ForEachStackOverADisk(dir, "s/t", [&](const std::string& m) {
    const std::string t = m + "/s/t";
    ASSERT_EQ(Shell("echo theirs > " + dir / "src/s/t"), 0);
    EXPECT_EQ(Output("setpriv --reuid nobody --regid nogroup --clear-groups /usr/bin/python3 -c \"import os\n"
                     "open('" + m + "/s/mine', 'w').write('mine')\n"
                     "try:\n os.rename('" + m + "/s/mine', '" + t + "')\nexcept OSError as e:\n print(e.strerror)\" 2>&1"),
              "Operation not permitted\n");
    EXPECT_EQ(Output("stat -c %U " + dir / "src/s/t && cat " + dir / "src/s/t " + m + "/s/t"), "root\ntheirs\ntheirs\n");
  });
}

// Disk space: a caller takes through a passthrough mount no more than it could
// natively. ext4 keeps blocks back for root (`mkfs.ext4 -m`), and lets a writer
// whose file-system uid is root's or who holds CAP_SYS_RESOURCE use them; the servers
// write as root, and the kernel writes through a backing file with the credentials
// of whoever registered it. Before, on a disk with half its blocks kept back, user
// 1000 wrote 21 MiB natively and 53 MiB, the whole disk, through every stack here,
// and fallocate took 30 MiB. Now the writes and creates are the caller's as to space
// (AsWriter, kernel/msgport/thread_creds.h), and backing files are registered as a
// writer that is not root, also while root holds the file open ("root holds it").
TEST(DiskSpace, ACallerTakesNoBlocksKeptBackForRoot) {
  TempDir dir;
  ASSERT_EQ(Shell("cd " + dir.path() + " && mkdir disk mnt upper && truncate -s 64M img && mkfs.ext4 -q -m 50 img && "
                  "mount -o loop img disk && mkdir disk/u disk/upper && chown 1000:1000 disk/u"),
            0);
  const std::string as_user = "setpriv --reuid 1000 --regid 1000 --clear-groups ";
  // As user 1000: asks fallocate for 30 MiB, then fills `d`/u/big (while root holds
  // it open for writing, if asked); says how the fallocate ended and how big the
  // file grew.
  const auto fill = [&](const std::string& d, bool root_holds) {
    const std::string big = d + "/u/big";
    return Output("sh -c '" + as_user + "fallocate -l 30M " + d + "/u/more 2>&1 | sed \"s/.*: //\"; " +
                  std::string(root_holds ? ": >" + big + " && chown 1000 " + big + " && exec 7>>" + big + "; " : "") +
                  as_user + "dd if=/dev/zero of=" + big + " bs=1M count=100 conv=notrunc 2>/dev/null; stat -c %s " +
                  big + "'");
  };
  const auto empty_disk = [&] { return Shell("rm -rf " + dir / "disk/u/* " + dir / "disk/upper/* && sync"); };
  const std::string native = fill(dir / "disk", false);
  ASSERT_EQ(empty_disk(), 0);
  // 21 MiB of 53 free: what the user may take.
  ASSERT_EQ(native.rfind("No space left on device\n", 0), 0u) << native;
  ASSERT_LT(std::stoll(native.substr(native.find('\n') + 1)), 32ll << 20) << native;

  struct Case {
    std::vector<std::string> args;
    bool root_holds;
  };
  const std::vector<Case> cases = {
      {{dir / "disk"}, false},
      {{dir / "disk"}, true},
      {{"--no-kernel-passthrough", dir / "disk"}, false},
      {{"--isolated", dir / "disk"}, false},
      {{"--isolated", dir / "disk"}, true},
      {{"--stack", "overlay:" + dir / "disk/upper,passthrough:" + dir / "disk"}, false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args.front() + (c.root_holds ? " (root holds it)" : ""));
    std::string mounted;
    {
      ServedMount mount(c.args, dir / "mnt", dir / "server.log");
      ASSERT_TRUE(mount.ok()) << ReadAll(dir / "server.log");
      mounted = fill(mount.path(), c.root_holds);
      EXPECT_EQ(mount.Stop(), 0);
    }
    EXPECT_EQ(mounted, native);
    ASSERT_EQ(empty_disk(), 0);  // with the server gone, nothing holds the files' blocks
  }

  // A shared writable mapping's pages, which the kernel writes back with no caller
  // (user 0, pid 0) when kernel passthrough is off: natively the user's page faults
  // find no room past its share (SIGBUS); through the mount the write-back does not
  // (msync: ENOSPC). Before, the server wrote them as root: all 40 MiB.
  std::ofstream(dir / "map.py") << "import mmap, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
                                   "os.ftruncate(fd, 40 << 20)\nm = mmap.mmap(fd, 40 << 20)\n"
                                   "for i in range(0, 40 << 20, 4096):\n    m[i] = 1\n"
                                   "try:\n    m.flush()\nexcept OSError as e:\n    print(e.strerror)\n";
  {
    ServedMount mount({"--no-kernel-passthrough", dir / "disk"}, dir / "mnt", dir / "server.log");
    ASSERT_TRUE(mount.ok()) << ReadAll(dir / "server.log");
    EXPECT_EQ(Output(as_user + kPython + " " + dir / "map.py " + mount.path() + "/u/map"), "No space left on device\n");
    EXPECT_EQ(mount.Stop(), 0);
  }
  EXPECT_LT(std::stoll(Output("stat -c %b " + dir / "disk/u/map")) * 512, 32ll << 20);
  ASSERT_EQ(empty_disk(), 0);

  // The overlay's copy of a lower file, made for the caller's write, is the caller's
  // to pay for: root's 15 MiB file of user 1000's leaves the user 6 MiB, and an
  // append through the overlay, which copies the file up, finds no room. Before,
  // the copy took the reserve.
  ASSERT_EQ(Shell("dd if=/dev/zero of=" + dir / "disk/u/lower bs=1M count=15 2>/dev/null && chown 1000 " +
                  dir / "disk/u/lower && sync"),
            0);
  ServedMount overlay({"--stack", "overlay:" + dir / "disk/upper,passthrough:" + dir / "disk"}, dir / "mnt",
                      dir / "server.log");
  ASSERT_TRUE(overlay.ok()) << ReadAll(dir / "server.log");
  EXPECT_EQ(Output(as_user + "sh -c 'echo more >> " + overlay.path() + "/u/lower' 2>&1 | sed 's/.*: //'"),
            "No space left on device\n");
  EXPECT_EQ(Output("ls " + dir / "disk/upper/u 2>&1; stat -c %s " + dir / "disk/u/lower"), std::to_string(15 << 20) + "\n");
}

// A statx that asks for the birth time (STATX_BTIME; GNU stat's %w) gets the file's,
// which the kernel asks for with FUSE_STATX: the file system's below, as natively
// (memfs: when it made the file). A change does not move it, and the other fields come
// with it. Before, libfuse answered ENOSYS and stat said "-".
TEST_P(MountTest, StatxGivesTheBirthTime) {
  ASSERT_EQ(Shell("echo x > " + work_ + "/born && mkdir " + work_ + "/dir"), 0);
  const std::string born = Output("stat -c %w " + work_ + "/born");
  ASSERT_NE(born, "-\n");
  EXPECT_NE(Output("stat -c %w " + work_ + "/dir"), "-\n");
  if (!Memfs()) {
    EXPECT_EQ(born, Output("stat -c %w " + Stored("born")));
    EXPECT_EQ(Output("stat -c %w " + work_ + "/dir"), Output("stat -c %w " + Stored("dir")));
  }
  ASSERT_EQ(Shell("echo yy >> " + work_ + "/born && touch -d @7 " + work_ + "/born"), 0);
  EXPECT_EQ(Output("stat -c '%w %s %Y %F %h' " + work_ + "/born"), born.substr(0, born.size() - 1) + " 5 7 regular file 1\n");
}

TEST_P(MountTest, ParallelWritersLoseNothing) {
  // 8 writers, each making 100 files and appending 100 lines to one shared log.
  const std::string script = R"PY(
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
log = os.open(os.path.join(d, "shared.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i in range(100):
    with open(os.path.join(d, f"w{n}-{i}"), "wb") as f:
        f.write(bytes([n]) * (1000 + i))
    os.write(log, f"writer {n} line {i}\n".encode())
os.close(log)
)PY";
  std::ofstream(dir_ / "writer.py") << script;
  std::string cmd;
  for (int n = 0; n < 8; ++n) cmd += kPython + " " + dir_ / "writer.py" + " " + work_ + " " + std::to_string(n) + " & ";
  ASSERT_EQ(Shell(cmd + "wait"), 0);
  EXPECT_EQ(Output("wc -l < " + Stored("shared.log")), "800\n");
  EXPECT_EQ(Output("ls " + work_ + " | grep -c '^w'"), "800\n");
  for (int n = 0; n < 8; ++n) {
    struct stat st {};
    ASSERT_EQ(::stat(Stored(std::string("w").append(std::to_string(n)).append("-99")).c_str(), &st), 0);
    EXPECT_EQ(st.st_size, 1099);
  }
}

// A FIFO in the mount joins two programs. (The kernel serves a FIFO itself once it is
// looked up: its open blocks in the kernel, not in the server.)
TEST_P(MountTest, AFifoJoinsTwoPrograms) {
  ASSERT_EQ(::mkfifo((work_ + "/fifo").c_str(), 0644), 0);
  ASSERT_EQ(Shell("(timeout 20 taskset -c 0 cat " + work_ + "/fifo > " + dir_ / "got" + " &) ; sleep 0.2; echo hello > " +
                  Stored("plain") + "; " + "timeout 20 taskset -c 0 sh -c 'cat " + work_ + "/plain > " + work_ +
                  "/fifo'"),
            0);
  for (int i = 0; i < 200 && ReadAll(dir_ / "got").empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(ReadAll(dir_ / "got"), "hello\n");
}

INSTANTIATE_TEST_SUITE_P(Layers, MountTest,
                         ::testing::Values("passthrough", "isolated", "stack", "memfs", "isolated-memfs", "overlay",
                                           "uring", "uring-isolated"),
                         [](const ::testing::TestParamInfo<std::string>& p) {
                           std::string name = p.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// --- the stack's own layers, seen through a mount ---

// A request that blocks inside the server must not stall the others, even those made
// from the same CPU (with io_uring: the same queue, whose thread is the one blocked;
// isolated: the server process's thread, whose helpers then serve).
// The mount's source holds a second mount whose server is stopped (SIGSTOP), so a
// lookup below it blocks in the first server's layer until that server continues.
class BlockedServerTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    uring_ = std::make_unique<KernelUringSwitch>(GetParam() == "uring");
    ASSERT_TRUE(uring_->ok()) << "cannot set " << KernelUringSwitch::kParam;
    ASSERT_EQ(Shell("mkdir -p " + dir_ / "src/lower " + dir_ / "mnt " + dir_ / "inner && echo hello > " +
                    dir_ / "src/plain"),
              0);
    lower_ = std::make_unique<ServedMount>(std::vector<std::string>{dir_ / "inner"}, dir_ / "src/lower", dir_ / "lower.log");
    ASSERT_TRUE(lower_->ok()) << ReadAll(dir_ / "lower.log");
    std::vector<std::string> args{dir_ / "src"};
    if (GetParam() == "isolated") args.insert(args.begin(), "--isolated");
    mount_ = std::make_unique<ServedMount>(args, dir_ / "mnt", dir_ / "server.log");
    ASSERT_TRUE(mount_->ok()) << ReadAll(dir_ / "server.log");
    // `lower` itself is looked up now, while its server runs (its entry stays cached):
    // below, each program's request is a lookup of its own name in it, not a wait for
    // the one lookup of `lower`. Then its server stops.
    ASSERT_EQ(Shell("stat " + dir_ / "mnt/lower > /dev/null"), 0);
    ASSERT_EQ(::kill(lower_->pid(), SIGSTOP), 0);
    stopped_ = true;
  }
  void TearDown() override {
    if (stopped_) ::kill(lower_->pid(), SIGCONT);  // whatever happened, it continues
  }
  // `cat` of a file beside the blocked lookups (on `cpu` if >= 0) is answered at once.
  void ExpectAnswered(int cpu) {
    const std::string pin = cpu >= 0 ? "taskset -c " + std::to_string(cpu) + " " : "";
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_EQ(Output("timeout -s KILL 10 " + pin + "cat " + dir_ / "mnt/plain"), "hello\n");
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  }
  // The same, then both servers continue and stop cleanly.
  void ExpectServed(int cpu) {
    ExpectAnswered(cpu);
    ::kill(lower_->pid(), SIGCONT);
    stopped_ = false;
    EXPECT_EQ(mount_->Stop(), 0) << ReadAll(dir_ / "server.log");
    EXPECT_EQ(lower_->Stop(), 0) << ReadAll(dir_ / "lower.log");
  }
  std::unique_ptr<KernelUringSwitch> uring_;
  TempDir dir_;
  std::unique_ptr<ServedMount> lower_, mount_;
  bool stopped_ = false;
};

TEST_P(BlockedServerTest, ARequestStuckInTheLayerDoesNotStallItsCpu) {
  ASSERT_EQ(Shell("(timeout 20 taskset -c 0 stat " + dir_ / "mnt/lower/x" + " > /dev/null 2>&1 &) ; sleep 0.3"), 0);
  ExpectServed(0);
  if (GetParam() == "uring") {
    EXPECT_NE(ReadAll(dir_ / "server.log").find("requests came through io_uring"), std::string::npos)
        << ReadAll(dir_ / "server.log");
  }
}

// More requests stuck than the server has readers (one per CPU for /dev/fuse, one
// per queue for io_uring): spares take over, and a program elsewhere is served. Twice:
// the spares of the first time, gone (/dev/fuse) or idle (io_uring) once the readers
// were free, must not keep the second time from being served. (With io_uring the
// second time once hung: the spares led with entries the stuck thread had committed,
// and the kernel gave the program's request to one of them.)
TEST_P(BlockedServerTest, MoreStuckRequestsThanReadersLeaveTheRestServed) {
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  auto block = [&](const std::string& prefix) {
    for (long i = 0; i < 2 * cpus + 2; ++i) {  // distinct names: each its own lookup
      ASSERT_EQ(Shell("(timeout 20 stat " + dir_ / "mnt/lower/" + prefix + std::to_string(i) + " > /dev/null 2>&1 &)"), 0);
    }
    ASSERT_EQ(Shell("sleep 0.3"), 0);
  };
  block("x");
  ExpectAnswered(-1);
  ::kill(lower_->pid(), SIGCONT);
  ASSERT_EQ(Shell("sleep 0.5 && stat " + dir_ / "mnt/lower > /dev/null"), 0);  // all answered; spares leave
  ASSERT_EQ(::kill(lower_->pid(), SIGSTOP), 0);
  block("y");
  ExpectServed(-1);
}

INSTANTIATE_TEST_SUITE_P(Transports, BlockedServerTest, ::testing::Values("devfuse", "uring", "isolated"),
                         [](const ::testing::TestParamInfo<std::string>& p) { return p.param; });

// A mount whose server logs at debug level (the readers' counts); the test's own
// ULSP_LOG is put back once it started.
std::unique_ptr<ServedMount> DebugMount(const std::vector<std::string>& args, const TempDir& dir) {
  const char* was = std::getenv("ULSP_LOG");
  const std::string log_level = was != nullptr ? was : "";
  ::setenv("ULSP_LOG", "debug", 1);
  auto mount = std::make_unique<ServedMount>(args, dir / "mnt", dir / "server.log");
  if (was != nullptr) {
    ::setenv("ULSP_LOG", log_level.c_str(), 1);
  } else {
    ::unsetenv("ULSP_LOG");
  }
  return mount;
}

// Per-CPU readers rest while one program on another CPU makes request after request
// (fuse_loop.h). A program that then comes to a resting reader's CPU is served, the
// readers say in the log that they rested, and the mount ends at once.
TEST(RestingReadersTest, AProgramOnARestingReadersCpuIsServed) {
  ASSERT_GE(::sysconf(_SC_NPROCESSORS_ONLN), 2) << "per-CPU readers need two CPUs";
  TempDir dir;
  ASSERT_EQ(Shell("mkdir " + dir / "src " + dir / "mnt && echo hello > " + dir / "src/f"), 0);
  auto served = DebugMount({"--no-io-uring", dir / "src"}, dir);
  ServedMount& mount = *served;
  ASSERT_TRUE(mount.ok()) << ReadAll(dir / "server.log");
  const std::string file = mount.path() + "/f";
  // 3000 opens from CPU 0 (each an OPEN, and a RELEASE), then at once a program on
  // CPU 1, while CPU 1's reader rests.
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(Output("timeout -s KILL 20 taskset -c 0 " + kPython + " -c \"import os\n" +
                   "for _ in range(3000): os.close(os.open('" + file + "', os.O_RDONLY))\" && " +
                   "timeout -s KILL 10 taskset -c 1 cat " + file),
            "hello\n");
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(15));
  const auto stopped = std::chrono::steady_clock::now();
  EXPECT_EQ(mount.Stop(), 0) << ReadAll(dir / "server.log");
  EXPECT_LT(std::chrono::steady_clock::now() - stopped, std::chrono::seconds(5));
  EXPECT_NE(ReadAll(dir / "server.log").find("per-CPU readers rested"), std::string::npos)
      << ReadAll(dir / "server.log");
}

// An isolated server's replies are delivered by the reader that passed the request
// on, polling the server's reply ring while its program waits (no reply thread woken).
// How many come that way depends on how busy the CPUs are; none did when the port
// around the server did not say it could be polled, and only the speed showed it.
TEST(IsolatedReadersTest, TheReadersDeliverTheServersReplies) {
  ASSERT_GE(::sysconf(_SC_NPROCESSORS_ONLN), 2) << "per-CPU readers need two CPUs";
  TempDir dir;
  ASSERT_EQ(Shell("mkdir " + dir / "src " + dir / "mnt && echo hello > " + dir / "src/f"), 0);
  auto mount = DebugMount({"--no-io-uring", "--isolated", dir / "src"}, dir);
  ASSERT_TRUE(mount->ok()) << ReadAll(dir / "server.log");
  const std::string file = mount->path() + "/f";
  ASSERT_EQ(Shell("timeout -s KILL 20 " + kPython + " -c \"import os\n" + "for _ in range(500): os.close(os.open('" +
                  file + "', os.O_RDONLY))\""),
            0);
  ASSERT_EQ(mount->Stop(), 0) << ReadAll(dir / "server.log");
  const std::string log = ReadAll(dir / "server.log");
  const std::string said = "the readers delivered the server's replies ";
  const size_t at = log.find(said);
  ASSERT_NE(at, std::string::npos) << log;
  EXPECT_GT(std::stoul(log.substr(at + said.size())), 0u) << log;
}

// With io_uring, requests may come through a ring as soon as its thread registered,
// while the thread that answered INIT is still starting the others: their replies must
// reach the ring (a reply written to /dev/fuse instead is refused by the kernel, and
// the program waits for ever). Mount after mount, a program asks at once.
TEST(UringStartTest, RequestsRightAfterTheMountAreAnswered) {
  KernelUringSwitch uring(true);
  ASSERT_TRUE(uring.ok()) << "cannot set " << KernelUringSwitch::kParam;
  TempDir dir;
  ASSERT_EQ(Shell("mkdir " + dir / "src " + dir / "mnt && echo hello > " + dir / "src/f"), 0);
  for (int i = 0; i < 30; ++i) {
    // `ulsp mount` (background) returns once INIT is answered; the stat follows at once.
    ASSERT_EQ(Shell("timeout 20 " + std::string(ULSP_BIN) + " mount " + dir / "src " + dir / "mnt" +
                    " && timeout 10 stat " + dir / "mnt/f" + " > /dev/null"),
              0)
        << "mount " << i;
    ASSERT_EQ(Shell(std::string(ULSP_BIN) + " umount " + dir / "mnt"), 0);
  }
}

// A 1 MiB tmpfs (`options` more: its number of inodes, say) made and mounted on
// `path`, unmounted however the test ends: a disk to fill.
class SmallDisk {
 public:
  explicit SmallDisk(std::string path, const std::string& options = "") : path_(std::move(path)) {
    ok_ = Shell("mkdir " + path_ + " && mount -t tmpfs -o size=1m" + options + " ulsp-test " + path_) == 0;
  }
  ~SmallDisk() { ::umount2(path_.c_str(), MNT_DETACH); }
  SmallDisk(const SmallDisk&) = delete;
  SmallDisk& operator=(const SmallDisk&) = delete;
  bool ok() const { return ok_; }
  // Takes every inode left (files fill1, fill2, ...) and what is left of the space
  // tmpfs counts extended attributes in (theirs, on fill1); true if none is left.
  // Removing fillN files gives inodes back.
  bool Fill() const {
    Shell("for i in $(seq 32); do touch " + path_ + "/fill$i 2>/dev/null || break; done");
    const std::string file = path_ + "/fill1";
    int n = 0;
    for (size_t size = 1024; size > 0; size /= 2)
      while (::setxattr(file.c_str(), ("user.fill" + std::to_string(n++)).c_str(), std::string(size, 'x').data(), size,
                        0) == 0) {
      }
    return Shell("touch " + path_ + "/one-more 2>/dev/null") != 0;
  }

 private:
  std::string path_;
  bool ok_ = false;
};

class StackTest : public ::testing::Test {
 protected:
  void Mount(const std::string& spec) {
    mount_ = std::make_unique<ServedMount>(std::vector<std::string>{"--stack", spec}, dir_ / "mnt", dir_ / "server.log");
    ASSERT_TRUE(mount_->ok()) << ReadAll(dir_ / "server.log");
  }
  void SetUp() override {
    ASSERT_EQ(Shell("mkdir -p " + dir_ / "mnt " + dir_ / "src/pub/sub " + dir_ / "src/secret && echo a > " +
                    dir_ / "src/pub/a && echo s > " + dir_ / "src/secret/s && echo t > " + dir_ / "src/top"),
              0);
  }
  TempDir dir_;
  std::unique_ptr<ServedMount> mount_;
};

TEST_F(StackTest, ABadSpinSettingIsSaidAndIgnored) {
  // ULSP_FUSE_SPIN_US tunes how long the FUSE leader polls, for measurements. A value
  // that is no number of microseconds (here one with a unit, which atoi read as 50)
  // is said in the log and the default kept, never taken without a word.
  ::setenv("ULSP_FUSE_SPIN_US", "50us", 1);
  struct Unset {
    ~Unset() { ::unsetenv("ULSP_FUSE_SPIN_US"); }
  } unset;
  Mount("passthrough:" + dir_ / "src");
  EXPECT_EQ(Output("cat " + mount_->path() + "/top"), "t\n");
  mount_.reset();  // unmounted: the log is complete
  EXPECT_NE(ReadAll(dir_ / "server.log").find("ULSP_FUSE_SPIN_US='50us' is not a number of microseconds"),
            std::string::npos)
      << ReadAll(dir_ / "server.log");
}

TEST_F(StackTest, ViewShowsOnlyWhatItsListAdmits) {
  std::ofstream(dir_ / "allow.txt") << "/pub\n/top\n";
  Mount("view:" + dir_ / "allow.txt" + ",passthrough:" + dir_ / "src");
  const std::string m = mount_->path();
  EXPECT_EQ(Output("ls " + m), "pub\ntop\n");
  EXPECT_EQ(Output("cat " + m + "/pub/a"), "a\n");
  EXPECT_NE(Shell("cat " + m + "/secret/s 2>/dev/null"), 0);
  EXPECT_EQ(Output("stat -c %n " + m + "/secret 2>&1 | grep -c 'No such file'"), "1\n");
  // New names: inside an admitted tree yes, elsewhere refused.
  EXPECT_EQ(Shell("echo n > " + m + "/pub/new"), 0);
  EXPECT_EQ(Output("echo n 2>&1 > " + m + "/other | grep -c 'Permission denied'", true), "1\n");
  EXPECT_EQ(Output("mv " + m + "/pub/new " + m + "/moved 2>&1 | grep -c 'Permission denied'"), "1\n");
}

TEST_F(StackTest, TraceRecordsEveryAccessAsAJsonLine) {
  Mount("trace:" + dir_ / "t.jsonl" + ",passthrough:" + dir_ / "src");
  const std::string m = mount_->path();
  ASSERT_EQ(Shell("cat " + m + "/pub/a > /dev/null && echo more >> " + m + "/pub/a && ! cat " + m +
                  "/pub/missing 2>/dev/null && mv " + m + "/top " + m + "/pub/top2"),
            0);
  mount_->Stop();
  // Every line parses; the accesses above are there with their results, each open
  // with its mode. The kernel read and wrote the opened file itself (passthrough), so
  // no read or write reached the trace.
  const std::string check = R"PY(
import json, sys
ops = [json.loads(l) for l in open(sys.argv[1])]
assert all({"time", "pid", "uid", "op", "path", "result"} <= set(o) for o in ops), ops[:3]
def has(op, path, result, to=None, mode=None):
    return any(o["op"] == op and o["path"] == path and o["result"] == result and o.get("to") == to and
               o.get("mode") == mode for o in ops)
assert has("open", "/pub/a", "ok", mode="r"), [o for o in ops if o["op"] == "open"]
assert has("open", "/pub/a", "ok", mode="w"), [o for o in ops if o["op"] == "open"]
assert has("lookup", "/pub/missing", "ENOENT")
assert has("rename", "/top", "ok", to="/pub/top2")
assert not [o for o in ops if o["op"] in ("read", "write")], [o for o in ops if o["op"] in ("read", "write")]
print("ok", len(ops))
)PY";
  std::ofstream(dir_ / "check.py") << check;
  EXPECT_EQ(Output(kPython + " " + dir_ / "check.py" + " " + dir_ / "t.jsonl", true).substr(0, 3), "ok ");
}

TEST_F(StackTest, WithoutKernelPassthroughTraceRecordsEveryReadAndWrite) {
  mount_ = std::make_unique<ServedMount>(
      std::vector<std::string>{"--no-kernel-passthrough", "--stack", "trace:" + dir_ / "t.jsonl" + ",passthrough:" + dir_ / "src"},
      dir_ / "mnt", dir_ / "server.log");
  ASSERT_TRUE(mount_->ok()) << ReadAll(dir_ / "server.log");
  const std::string m = mount_->path();
  ASSERT_EQ(Shell("cat " + m + "/pub/a > /dev/null && echo more >> " + m + "/pub/a"), 0);
  mount_->Stop();
  const std::string log = ReadAll(dir_ / "t.jsonl");
  EXPECT_NE(log.find(R"("op":"read","path":"/pub/a")"), std::string::npos) << log;
  EXPECT_NE(log.find(R"("op":"write","path":"/pub/a")"), std::string::npos) << log;
}

// A shared writable mapping's pages, which the kernel writes back with no caller (user
// 0, pid 0) where it does not pass the file through, come to every layer as their
// handle's opener's (FuseShim::CreditWriter): the trace records user 1000's write-back
// as user 1000's. Before, as root's: the passthrough layer alone knew whose they were.
TEST_F(StackTest, APageWrittenBackIsItsOpenersToEveryLayer) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "src/u && chown 1000:1000 " + dir_ / "src/u"), 0);
  mount_ = std::make_unique<ServedMount>(
      std::vector<std::string>{"--no-kernel-passthrough", "--stack", "trace:" + dir_ / "t.jsonl" + ",passthrough:" + dir_ / "src"},
      dir_ / "mnt", dir_ / "server.log");
  ASSERT_TRUE(mount_->ok()) << ReadAll(dir_ / "server.log");
  std::ofstream(dir_ / "map.py") << "import mmap, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
                                    "os.ftruncate(fd, 1 << 20)\nm = mmap.mmap(fd, 1 << 20)\n"
                                    "for i in range(0, 1 << 20, 4096):\n    m[i] = 1\nm.flush()\nprint('ok')\n";
  EXPECT_EQ(Output("setpriv --reuid 1000 --regid 1000 --clear-groups " + kPython + " " + dir_ / "map.py " +
                   mount_->path() + "/u/map"),
            "ok\n");
  mount_->Stop();
  const std::string check = R"PY(
import json, sys
writes = [(o["pid"], o["uid"]) for o in map(json.loads, open(sys.argv[1])) if o["op"] == "write" and o["path"] == "/u/map"]
print(sorted(set(writes)))
)PY";
  std::ofstream(dir_ / "check.py") << check;
  EXPECT_EQ(Output(kPython + " " + dir_ / "check.py" + " " + dir_ / "t.jsonl"), "[(0, 1000)]\n");
  EXPECT_EQ(Output("stat -c %u:%s " + dir_ / "src/u/map"), "1000:1048576\n");
}

// A read-only mount (-r): every change is refused by the kernel (EROFS) and never
// reaches the stack, the tree underneath stays as it was, and reading a file leaves
// its cached attributes valid, so a stat after the read is no request. (On a writable
// mount the kernel drops a file's cached atime whenever it is read: tar c, which
// fstats each file after reading it, then makes a GETATTR per file.)
TEST_F(StackTest, AReadOnlyMountRefusesChangesAndKeepsAttributesAcrossReads) {
  mount_ = std::make_unique<ServedMount>(
      std::vector<std::string>{"-r", "--timeout", "60", "--stack", "trace:" + dir_ / "t.jsonl" + ",passthrough:" + dir_ / "src"},
      dir_ / "mnt", dir_ / "server.log");
  ASSERT_TRUE(mount_->ok()) << ReadAll(dir_ / "server.log");
  const std::string m = mount_->path();
  const std::string listing = "cd " + dir_ / "src" + " && find . -printf '%p %m %s %T@\\n' | sort && cat pub/a top";
  const std::string before = Output(listing);
  EXPECT_EQ(Output("awk '$5 == \"" + m + "\" {print $6}' /proc/self/mountinfo | cut -d, -f1"), "ro\n");
  const std::string reads = R"PY(
import os, sys
p = sys.argv[1]
os.stat(p)
for _ in range(3):
    fd = os.open(p, os.O_RDONLY)
    assert os.read(fd, 100) == b"a\n"
    os.fstat(fd)
    os.close(fd)
    os.stat(p)
print("ok")
)PY";
  std::ofstream(dir_ / "reads.py") << reads;
  EXPECT_EQ(Output(kPython + " " + dir_ / "reads.py " + m + "/pub/a"), "ok\n");
  for (const std::string& change :
       {"touch " + m + "/new", "echo x >> " + m + "/pub/a", "truncate -s 0 " + m + "/pub/a", "rm " + m + "/pub/a",
        "mkdir " + m + "/d", "mv " + m + "/top " + m + "/pub/top", "chmod 600 " + m + "/top", "ln " + m + "/top " + m + "/h",
        "ln -s top " + m + "/s", "mkfifo " + m + "/f", "touch -d 2000-01-01 " + m + "/top", "rmdir " + m + "/pub/sub"}) {
    EXPECT_EQ(Output("(" + change + ") 2>&1 | grep -c 'Read-only file system'"), "1\n") << change;
  }
  mount_->Stop();
  EXPECT_EQ(Output(listing), before);
  const std::string check = R"PY(
import json, sys
ops = [json.loads(l) for l in open(sys.argv[1])]
changes = [o for o in ops if o["op"] not in ("lookup", "getattr", "open", "read", "flush", "release", "opendir",
                                              "readdir", "readdirplus", "releasedir", "statfs", "access", "getxattr",
                                              "listxattr", "readlink", "lseek")]
assert not changes, changes
opened = [i for i, o in enumerate(ops) if o["op"] == "open" and o["path"] == "/pub/a"]
assert len(opened) == 3, [o for o in ops if o["path"] == "/pub/a"]
again = [o for o in ops[opened[0]:] if o["op"] == "getattr" and o["path"] == "/pub/a"]
assert not again, again
print("ok")
)PY";
  std::ofstream(dir_ / "check.py") << check;
  EXPECT_EQ(Output(kPython + " " + dir_ / "check.py " + dir_ / "t.jsonl", true), "ok\n");
}

// A trace whose log's file system is full: the mount keeps serving, the server's log
// names the file and the error, no line is left cut in half (a write that stopped
// inside one is cut back), and once the disk has room the trace says how many lines
// it lost before going on.
TEST_F(StackTest, TraceOnAFullDiskDropsWholeLinesAndSaysHowMany) {
  const std::string logfs = dir_ / "logfs";
  const SmallDisk disk(logfs);
  ASSERT_TRUE(disk.ok());
  for (int i = 0; i < 200; ++i) std::ofstream(dir_ / ("src/pub/f" + std::to_string(i))) << i << "\n";
  // Full but for one page: the first write of lines stops inside one.
  ASSERT_EQ(Shell("dd if=/dev/zero of=" + logfs + "/fill bs=64k 2>/dev/null; truncate -s -4096 " + logfs + "/fill"), 0);
  Mount("trace:" + logfs + "/t.jsonl,passthrough:" + dir_ / "src");
  const std::string m = mount_->path();
  EXPECT_EQ(Shell("cat " + m + "/pub/f* > /dev/null"), 0);  // about 600 lines: 80 KB
  std::string server;
  for (int i = 0; i < 200 && server.find("No space left on device") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    server = ReadAll(dir_ / "server.log");
  }
  EXPECT_NE(server.find("trace: writing " + logfs + "/t.jsonl failed: No space left on device"), std::string::npos)
      << server;
  ASSERT_EQ(Shell("rm " + logfs + "/fill"), 0);
  EXPECT_EQ(Shell("cat " + m + "/secret/s > /dev/null"), 0);
  EXPECT_EQ(mount_->Stop(), 0);
  const std::string check = R"PY(
import json, sys
lines = open(sys.argv[1]).read().split("\n")
assert lines[-1] == "", "the log ends inside a line"
ops = [json.loads(l) for l in lines[:-1]]
gaps = [i for i, o in enumerate(ops) if o["op"] == "lost"]
assert gaps, "no line says what was lost"
for i in gaps:
    assert ops[i]["count"] > 0 and ops[i]["result"] == "ENOSPC", ops[i]
    assert i + 1 < len(ops) and ops[i + 1]["op"] != "lost", "a gap line with no line after it"
after = ops[gaps[-1] + 1:]
assert any(o["op"] == "open" and o["path"] == "/secret/s" for o in after), after
lost = sum(ops[i]["count"] for i in gaps)
kept = len([o for o in ops if o["op"] == "open" and o["path"].startswith("/pub/f")])
assert kept + lost >= 200, (kept, lost)
print("ok", len(ops), lost)
)PY";
  std::ofstream(dir_ / "check.py") << check;
  EXPECT_EQ(Output(kPython + " " + dir_ / "check.py" + " " + logfs + "/t.jsonl", true).substr(0, 3), "ok ")
      << ReadAll(dir_ / "server.log");
}

// Kernel passthrough: on a passthrough stack (in-process or isolated, under a view)
// the kernel reads, writes and maps opened files by itself, so no read or write
// request reaches the server (libfuse's request log, -d, shows none), and what
// programs see and leave on disk is the same as through the server.
class KernelPassthroughTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_EQ(Shell("mkdir -p " + dir_ / "mnt " + dir_ / "src && head -c 3000000 /dev/urandom > " + dir_ / "src/big"),
              0);
    std::ofstream(dir_ / "allow.txt") << "/\n";
  }
  // Runs a reader, a writer, an appender and an mmap reader on a mount made with
  // `args`; returns libfuse's request log.
  std::string Exercise(std::vector<std::string> args) {
    args.insert(args.begin(), "-d");
    ServedMount mount(args, dir_ / "mnt", dir_ / "server.log");
    EXPECT_TRUE(mount.ok()) << ReadAll(dir_ / "server.log");
    if (!mount.ok()) return "";
    const std::string m = mount.path();
    EXPECT_EQ(Shell("cmp " + dir_ / "src/big " + m + "/big"), 0);
    EXPECT_EQ(Shell("head -c 1000000 /dev/urandom > " + m + "/new && echo tail >> " + m + "/new && cmp " + m +
                    "/new " + dir_ / "src/new"),
                0);
    EXPECT_EQ(Output("stat -c %s " + m + "/new"), "1000005\n");  // the kernel's size follows its writes
    // mmap, as the dynamic loader and git use it.
    const std::string mapped = "import mmap, sys\n"
                               "f = open(sys.argv[1], 'rb')\n"
                               "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
                               "sys.exit(0 if m[:] == open(sys.argv[2], 'rb').read() else 1)\n";
    std::ofstream(dir_ / "mapped.py") << mapped;
    EXPECT_EQ(Shell(kPython + " " + dir_ / "mapped.py " + m + "/big " + dir_ / "src/big"), 0);
    EXPECT_EQ(mount.Stop(), 0);
    return ReadAll(dir_ / "server.log");
  }
  static bool Has(const std::string& log, const std::string& opcode) {
    return log.find("opcode: " + opcode + " (") != std::string::npos;
  }
  TempDir dir_;
};

TEST_P(KernelPassthroughTest, TheKernelReadsAndWritesOpenedFilesItself) {
  std::vector<std::string> args = {"--stack", "trace:" + dir_ / "t.jsonl" + ",view:" + dir_ / "allow.txt" +
                                                  ",passthrough:" + dir_ / "src"};
  if (GetParam() == "isolated") args.insert(args.begin(), "--isolated");
  const std::string log = Exercise(args);
  EXPECT_TRUE(Has(log, "OPEN")) << log.substr(0, 2000);
  EXPECT_FALSE(Has(log, "READ")) << "a read reached the server";
  EXPECT_FALSE(Has(log, "WRITE")) << "a write reached the server";
}

TEST_P(KernelPassthroughTest, WithoutItEveryReadReachesTheStack) {
  std::vector<std::string> args = {"--no-kernel-passthrough", "--stack", "passthrough:" + dir_ / "src"};
  if (GetParam() == "isolated") args.insert(args.begin(), "--isolated");
  const std::string log = Exercise(args);
  EXPECT_TRUE(Has(log, "READ"));
  EXPECT_TRUE(Has(log, "WRITE"));
}

INSTANTIATE_TEST_SUITE_P(Modes, KernelPassthroughTest, ::testing::Values("inprocess", "isolated"),
                         [](const ::testing::TestParamInfo<std::string>& p) { return p.param; });

// A change answered EIO may have been made: an isolated server that dies between doing
// a change and answering it is one way (restart_test.cc), this layer is a sure one. It
// passes every request down and, while `failing`, answers `error` (EIO; ECONNRESET as
// for a remote agent's lost connection) to each change of a name or of attributes the
// layer below made.
class DoneButEio final : public vfs::Layer {
 public:
  DoneButEio(std::unique_ptr<vfs::Layer> lower, int error) : Layer(std::move(lower)), error_(error) {}
  int Serve(msgport::VfsRequest& req) noexcept override {
    const int error = Down(req);
    if (error != 0 || !failing.load()) return error;
    switch (req.op) {
      case msgport::VfsOp::kMkDir:
      case msgport::VfsOp::kCreate:
      case msgport::VfsOp::kUnlink:
      case msgport::VfsOp::kRename:
      case msgport::VfsOp::kLink:
      case msgport::VfsOp::kSetAttr:
        return error_;
      default:
        return 0;
    }
  }
  std::string_view Name() const noexcept override { return "done-but-eio"; }
  std::atomic<bool> failing{false};

 private:
  const int error_;
};

// After a change answered EIO the kernel asks the stack again about each name and node
// it touched, rather than trusting what it cached before (here for 60 s): the names
// and modes read what is on the disk at once. Through /dev/fuse and through io_uring
// (whose notifications still go to /dev/fuse); EIO, and ECONNRESET through /dev/fuse.
class UnsureChangeTest : public ::testing::TestWithParam<std::string> {};

TEST_P(UnsureChangeTest, TheKernelForgetsWhatAChangeAnsweredEioMayHaveChanged) {
  KernelUringSwitch uring(GetParam() == "uring");
  const int error = GetParam() == "econnreset" ? ECONNRESET : EIO;
  ASSERT_TRUE(uring.ok()) << "cannot set " << KernelUringSwitch::kParam;
  TempDir dir;
  ASSERT_EQ(Shell("mkdir " + dir / "mnt " + dir / "src && cd " + dir / "src && touch gone moved mode linked && chmod 644 mode"), 0);
  auto layer = OnPassthrough<DoneButEio>(dir / "src", error);
  ASSERT_TRUE(layer);
  DoneButEio& eio = *layer;
  InProcessMount mount(std::move(layer), dir / "mnt", /*timeout=*/60);
  ASSERT_EQ(mount.error(), "");
  const std::string m = dir / "mnt";
  auto exists = [&](const std::string& name) {
    struct stat st {};
    return ::lstat((m + "/" + name).c_str(), &st) == 0;
  };
  auto mode = [&](const std::string& name) {
    struct stat st {};
    return ::lstat((m + "/" + name).c_str(), &st) == 0 ? st.st_mode & 07777 : 0;
  };
  // What the kernel caches: four names missing, four present, and a mode.
  for (const char* name : {"dir", "file", "renamed", "link"}) ASSERT_FALSE(exists(name)) << name;
  for (const char* name : {"gone", "moved", "linked"}) ASSERT_TRUE(exists(name)) << name;
  ASSERT_EQ(mode("mode"), 0644u);

  eio.failing = true;
  auto fails_eio = [error](int rc) { return rc == -1 && errno == error; };
  EXPECT_TRUE(fails_eio(::mkdir((m + "/dir").c_str(), 0755)));
  const int fd = ::open((m + "/file").c_str(), O_CREAT | O_WRONLY, 0644);
  EXPECT_TRUE(fails_eio(fd));
  if (fd >= 0) ::close(fd);
  EXPECT_TRUE(fails_eio(::unlink((m + "/gone").c_str())));
  EXPECT_TRUE(fails_eio(::rename((m + "/moved").c_str(), (m + "/renamed").c_str())));
  EXPECT_TRUE(fails_eio(::link((m + "/linked").c_str(), (m + "/link").c_str())));
  EXPECT_TRUE(fails_eio(::chmod((m + "/mode").c_str(), 0600)));
  eio.failing = false;

  // The caches are dropped just after each answer, by another thread: allow it a moment.
  auto truth = [&] {
    return exists("dir") && exists("file") && !exists("gone") && !exists("moved") && exists("renamed") &&
           exists("link") && mode("mode") == 0600u;
  };
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!truth() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(exists("dir"));
  EXPECT_TRUE(exists("file"));
  EXPECT_FALSE(exists("gone"));
  EXPECT_FALSE(exists("moved"));
  EXPECT_TRUE(exists("renamed"));
  EXPECT_TRUE(exists("link"));
  EXPECT_EQ(mode("mode"), 0600u);
  struct stat st {};
  ASSERT_EQ(::stat((m + "/linked").c_str(), &st), 0);
  EXPECT_EQ(st.st_nlink, 2u) << "the link count of the node linked to";
  if (GetParam() == "uring") {
    EXPECT_GT(mount.shim().UringServed(), 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, UnsureChangeTest, ::testing::Values("devfuse", "uring", "econnreset"),
                         [](const ::testing::TestParamInfo<std::string>& p) { return p.param; });

// Counts what reaches the stack of each listing: readdir(plus) requests, and those
// answered with nothing (the end of a listing).
class CountListings final : public vfs::Layer {
 public:
  explicit CountListings(std::unique_ptr<vfs::Layer> lower) : Layer(std::move(lower)) {}
  int Serve(msgport::VfsRequest& req) noexcept override {
    const int error = Down(req);
    if (req.op == msgport::VfsOp::kReadDir || req.op == msgport::VfsOp::kReadDirPlus) {
      ++listings;
      if (error == 0 && req.out.empty()) ++empty;
    }
    return error;
  }
  std::string_view Name() const noexcept override { return "count-listings"; }
  std::atomic<int> listings{0}, empty{0};
};

// The names getdents64 gives for `fd`, one call of a 64 KiB buffer.
std::vector<std::string> GetDents(int fd) {
  alignas(8) char buf[64 << 10];
  std::vector<std::string> names;
  const long n = ::syscall(SYS_getdents64, fd, buf, sizeof buf);
  for (long pos = 0; pos < n;) {
    const auto* d = reinterpret_cast<const struct dirent64*>(buf + pos);
    if (std::string_view(d->d_name) != "." && std::string_view(d->d_name) != "..") names.emplace_back(d->d_name);
    pos += d->d_reclen;
  }
  return names;
}

// The kernel asks once more after a directory's last records, to hear that nothing
// follows. A bottom layer that knows its listing ended says so with those records,
// and the shim answers that last question itself: one round trip per directory less.
// Listings read the same as on the disk, big ones (many answers) too; and a name made
// through the mount between two reads of one listing is still found (the shim forgets
// what it knew of the directory), here on memfs, which lists new names last.
TEST(ListingEndTest, TheShimAnswersTheLastQuestionOfAListing) {
  TempDir dir;
  ASSERT_EQ(Shell("mkdir -p " + dir / "mnt " + dir / "src/empty " + dir / "src/few " + dir / "src/many && cd " +
                  dir / "src && touch few/a few/b few/c && for i in $(seq 800); do : > many/entry-$i-with-a-long-name; done"),
            0);
  auto layer = OnPassthrough<CountListings>(dir / "src");
  ASSERT_TRUE(layer);
  CountListings& count = *layer;
  {
    InProcessMount mount(std::move(layer), dir / "mnt", /*timeout=*/60);
    ASSERT_EQ(mount.error(), "");
    EXPECT_EQ(Output("cd " + dir / "mnt && find . | sort"), Output("cd " + dir / "src && find . | sort"));
    EXPECT_GT(count.listings.load(), 4) << "the big directory takes several answers";
    EXPECT_EQ(count.empty.load(), 0) << "a listing's end went to the stack";
  }

  auto memfs = vfs::MemfsLayer::Create("16M");
  ASSERT_TRUE(memfs) << memfs.error();
  auto counted = std::make_unique<CountListings>(std::move(*memfs));
  CountListings& memfs_count = *counted;
  InProcessMount mount(std::move(counted), dir / "mnt", /*timeout=*/60);
  ASSERT_EQ(mount.error(), "");
  const std::string m = dir / "mnt";
  ASSERT_EQ(Shell("mkdir " + m + "/d && touch " + m + "/d/one " + m + "/d/two"), 0);
  UniqueFd fd(::open((m + "/d").c_str(), O_RDONLY | O_DIRECTORY));
  ASSERT_TRUE(fd);
  std::vector<std::string> first = GetDents(fd.get());
  std::sort(first.begin(), first.end());
  EXPECT_EQ(first, (std::vector<std::string>{"one", "two"}));
  ASSERT_EQ(Shell("touch " + m + "/d/three"), 0);
  EXPECT_EQ(GetDents(fd.get()), std::vector<std::string>{"three"}) << "a name made through the mount was lost";
  EXPECT_EQ(GetDents(fd.get()), std::vector<std::string>{});
  // Without a change the listing's end is answered by the shim.
  const int before = memfs_count.empty.load();
  EXPECT_EQ(Output("ls " + m + "/d | wc -l"), "3\n");
  EXPECT_EQ(memfs_count.empty.load(), before);
}

// Listings without handles: a stack whose layers keep nothing per directory handle
// (here a view on passthrough) answers the first opendir with ENOSYS, and the kernel
// then sends no opendir or releasedir on the mount, only readdirs with fh 0 (one
// round trip less per directory). Listings that take many readdirs, and changes made
// through the mount or beside it, read the same as on the disk. An overlay keeps a
// handle per listing, so it is opened as before.
class HandlelessListingTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    // 3000 long names: about 250 KB of entries, many readdir answers.
    ASSERT_EQ(Shell("mkdir -p " + dir_ / "mnt " + dir_ / "src/many/sub/deeper " + dir_ / "upper && cd " + dir_ /
                    "src/many && for i in $(seq 3000); do : > entry-$i-with-a-rather-long-name-to-fill-the-buffer; "
                    "done && echo x > sub/deeper/f"),
              0);
    std::ofstream(dir_ / "allow.txt") << "/\n";
  }
  static size_t Count(const std::string& log, const std::string& opcode) {
    size_t n = 0;
    for (size_t at = 0; (at = log.find("opcode: " + opcode + " (", at)) != std::string::npos; ++at) ++n;
    return n;
  }
  // Lists the tree through a mount made with `stack` and checks it against the disk;
  // returns libfuse's request log.
  std::string ListThrough(const std::string& stack) {
    std::vector<std::string> args = {"-d", "--timeout", "0.3", "--stack", stack};
    if (GetParam() == "isolated") args.insert(args.begin(), "--isolated");
    ServedMount mount(args, dir_ / "mnt", dir_ / "server.log");
    EXPECT_TRUE(mount.ok()) << ReadAll(dir_ / "server.log");
    if (!mount.ok()) return "";
    const std::string m = mount.path();
    const std::string native = Output("cd " + dir_ / "src && find . | sort");
    EXPECT_EQ(Output("cd " + m + " && find . | sort"), native);
    EXPECT_EQ(Output("ls -f " + m + "/many | sort"), Output("ls -f " + dir_ / "src/many | sort"));
    // A change through the mount shows at once; one beside it within the timeout.
    EXPECT_EQ(Shell("touch " + m + "/many/made-through && ls " + m + "/many | grep -qx made-through"), 0);
    EXPECT_EQ(Shell("touch " + dir_ / "src/many/made-beside && sleep 0.6 && ls " + m + "/many | grep -qx made-beside"), 0);
    EXPECT_EQ(Shell("rm " + m + "/many/made-through " + m + "/many/made-beside"), 0);
    EXPECT_EQ(Shell("sleep 0.6 && ! ls " + m + "/many | grep -q made-"), 0);
    EXPECT_EQ(mount.Stop(), 0);
    return ReadAll(dir_ / "server.log");
  }
  TempDir dir_;
};

TEST_P(HandlelessListingTest, APassthroughStackIsListedWithoutOpendir) {
  const std::string log = ListThrough("view:" + dir_ / "allow.txt" + ",passthrough:" + dir_ / "src");
  EXPECT_LE(Count(log, "OPENDIR"), 1u) << "the kernel kept opening directories";
  EXPECT_EQ(Count(log, "RELEASEDIR"), 0u);
  EXPECT_GT(Count(log, "READDIR") + Count(log, "READDIRPLUS"), 10u);
}

TEST_P(HandlelessListingTest, AnOverlayKeepsItsHandles) {
  const std::string log = ListThrough("overlay:" + dir_ / "upper" + ",passthrough:" + dir_ / "src");
  EXPECT_GT(Count(log, "OPENDIR"), 3u);
  EXPECT_GT(Count(log, "RELEASEDIR"), 3u);
}

INSTANTIATE_TEST_SUITE_P(Modes, HandlelessListingTest, ::testing::Values("inprocess", "isolated"),
                         [](const ::testing::TestParamInfo<std::string>& p) { return p.param; });

// The overlay keeps the lower tree as it was: changes, removals and new files land in
// the upper directory (copy-up, whiteouts, opaque directories), and the merged view
// is what a program sees. A git repository in the lower tree is used through it.
TEST_F(StackTest, OverlayWritesAboveAndNeverBelow) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "upper && cp -a /usr/include/linux/netfilter " + dir_ / "src/pub/nf && cd " +
                  dir_ / "src/pub/nf && git init -q && git add . && git -c user.name=t -c user.email=t@e.invalid commit -qm base"),
            0);
  const std::string before = Output("cd " + dir_ / "src" + " && find . -printf '%p %s %T@\\n' | sort && cat pub/a secret/s");
  Mount("overlay:" + dir_ / "upper,passthrough:" + dir_ / "src");
  const std::string m = mount_->path();
  EXPECT_EQ(Shell("echo changed > " + m + "/pub/a"), 0);                    // copy-up of a file
  EXPECT_EQ(Shell("rm " + m + "/top && rm -r " + m + "/secret"), 0);         // whiteouts
  EXPECT_EQ(Shell("mkdir " + m + "/secret && touch " + m + "/secret/new"), 0);  // opaque: s stays hidden
  EXPECT_EQ(Shell("mv " + m + "/pub/sub " + m + "/moved"), 0);               // an empty lower directory
  EXPECT_EQ(Shell("mv " + m + "/pub/nf " + m + "/nf2"), 0);                  // EXDEV: mv copies
  EXPECT_EQ(Output("cat " + m + "/pub/a"), "changed\n");
  EXPECT_EQ(Output("ls " + m), "moved\nnf2\npub\nsecret\n");
  EXPECT_EQ(Output("ls " + m + "/secret"), "new\n");
  EXPECT_EQ(Shell("test -e " + m + "/top"), 1);
  EXPECT_EQ(Shell("echo more >> " + m + "/nf2/xt_mark.h"), 0);
  EXPECT_EQ(Output("git -C " + m + "/nf2 status --porcelain"), " M xt_mark.h\n");
  EXPECT_EQ(Shell("diff -r /usr/include/linux/netfilter/xt_esp.h " + m + "/nf2/xt_esp.h"), 0);
  // Below: exactly as before.
  mount_->Stop();
  EXPECT_EQ(Output("cd " + dir_ / "src" + " && find . -printf '%p %s %T@\\n' | sort && cat pub/a secret/s"), before);
  // Above: the copies and the whiteouts (character devices 0:0).
  EXPECT_EQ(Output("cat " + dir_ / "upper/pub/a"), "changed\n");
  EXPECT_EQ(Output("stat -c '%F %t:%T' " + dir_ / "upper/top"), "character special file 0:0\n");
}

// Copy-up keeps what is below: extended attributes (a program's file capabilities,
// user attributes), and a file hard-linked below parts from its other names as in
// overlayfs without its index. Once, a change through one name was copied up under
// the other (both names were one node, keyed by the lower file), so after a remount
// the name written showed the old bytes and the other the new; and no attribute was
// copied (ping lost cap_net_raw).
TEST_F(StackTest, OverlayCopyUpKeepsXattrsAndPartsHardLinks) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "upper && echo orig > " + dir_ / "src/a && ln " + dir_ / "src/a " + dir_ / "src/b" +
                  " && " + kPython + " -c \"import os; os.setxattr('" + dir_ / "src/a" + "', 'user.colour', b'blue')\"" +
                  " && cp /usr/bin/true " + dir_ / "src/tool" + " && setcap cap_net_raw+ep " + dir_ / "src/tool"),
            0);
  auto colour = [](const std::string& path) {
    return Output(kPython + " -c \"import os; print(os.getxattr('" + path + "', 'user.colour').decode())\"");
  };
  const std::string spec = "overlay:" + dir_ / "upper,passthrough:" + dir_ / "src";
  Mount(spec);
  std::string m = mount_->path();
  EXPECT_EQ(Shell("echo more >> " + m + "/a && touch " + m + "/tool"), 0);
  EXPECT_EQ(Output("cat " + m + "/a " + m + "/b"), "orig\nmore\norig\n");
  EXPECT_EQ(colour(m + "/a"), "blue\n");
  EXPECT_EQ(Output("getcap " + m + "/tool"), m + "/tool cap_net_raw=ep\n");
  mount_.reset();
  EXPECT_EQ(Output("ls " + dir_ / "upper"), "a\ntool\n");
  EXPECT_EQ(colour(dir_ / "upper/a"), "blue\n");
  EXPECT_EQ(Output("getcap " + dir_ / "upper/tool"), dir_ / "upper/tool" + " cap_net_raw=ep\n");
  Mount(spec);  // the same, fresh
  m = mount_->path();
  EXPECT_EQ(Output("cat " + m + "/a " + m + "/b"), "orig\nmore\norig\n");
  EXPECT_EQ(Output("cat " + dir_ / "src/a"), "orig\n");  // below: untouched
}

// A copy-up the upper file system has no room for fails with ENOSPC and leaves the
// lower file as it was: no half copy in the upper directory hiding it, and the space
// the failed copy took given back. Before, the copy was made under its name: a 3 MB
// file appended to on a 1 MB upper became its first megabyte. In-process and isolated.
TEST_F(StackTest, ACopyUpWithNoRoomLeavesTheLowerFileWhole) {
  const std::string upfs = dir_ / "upfs";
  const SmallDisk disk(upfs);
  ASSERT_TRUE(disk.ok());
  ASSERT_EQ(Shell("head -c 3000000 /dev/urandom > " + dir_ / "src/big"), 0);
  for (const char* mode : {"", "--isolated"}) {
    SCOPED_TRACE(*mode ? mode : "in-process");
    ASSERT_EQ(Shell("rm -rf " + upfs + "/up"), 0);
    std::vector<std::string> args = {"--stack", "overlay:" + upfs + "/up,passthrough:" + dir_ / "src"};
    if (*mode) args.insert(args.begin(), mode);
    mount_ = std::make_unique<ServedMount>(args, dir_ / "mnt", dir_ / "server.log");
    ASSERT_TRUE(mount_->ok()) << ReadAll(dir_ / "server.log");
    const std::string m = mount_->path();
    EXPECT_EQ(Output("(echo x >> " + m + "/big) 2>&1"), "sh: 1: cannot create " + m + "/big: No space left on device\n");
    EXPECT_EQ(Shell("cmp " + dir_ / "src/big " + m + "/big"), 0);
    EXPECT_EQ(Output("ls -A " + upfs + "/up"), "");
    EXPECT_EQ(Output("df --output=used " + upfs + " | tail -1 | tr -d ' '"), "0\n");  // the nameless copy is gone too
    EXPECT_EQ(Shell("echo small > " + m + "/new && echo x >> " + m + "/top"), 0);  // room for these
    EXPECT_EQ(Output("cat " + m + "/new " + m + "/top"), "small\nt\nx\n");
    EXPECT_EQ(mount_->Stop(), 0);
  }
}

// A rename or unlink that must leave a whiteout (a lower file of that name below)
// where no inode is left for one: it fails with ENOSPC and changes nothing. Before,
// the rename moved the upper file and then failed to white out the old name, said
// nothing, and the lower file showed there again. Once there is room, both leave
// just the whiteout (no whiteout made under a name of its own is left over).
TEST_F(StackTest, AWhiteoutWithNoInodeLeftChangesNothing) {
  const std::string upfs = dir_ / "upfs";
  const SmallDisk disk(upfs, ",nr_inodes=16");
  ASSERT_TRUE(disk.ok());
  ASSERT_EQ(Shell("echo lower-f > " + dir_ / "src/f && echo lower-k > " + dir_ / "src/k"), 0);
  Mount("overlay:" + upfs + "/up,passthrough:" + dir_ / "src");
  const std::string m = mount_->path();
  ASSERT_EQ(Shell("echo upper-f > " + m + "/f && echo upper-k > " + m + "/k"), 0);  // copied up
  ASSERT_TRUE(disk.Fill()) << "the disk still has inodes";
  EXPECT_EQ(Output("(mv " + m + "/f " + m + "/g) 2>&1"),
            "mv: cannot move '" + m + "/f' to '" + m + "/g': No space left on device\n");
  EXPECT_EQ(Output("(rm " + m + "/k) 2>&1"), "rm: cannot remove '" + m + "/k': No space left on device\n");
  EXPECT_EQ(Output("cat " + m + "/f " + m + "/k"), "upper-f\nupper-k\n");
  EXPECT_EQ(Output("ls " + m), "f\nk\npub\nsecret\ntop\n");
  // Room for the rename's whiteout, and for the unlink's: the first whiteout linked
  // also makes the one the overlay links them to (tmpfs counts a link as an inode).
  ASSERT_EQ(Shell("rm " + upfs + "/fill1 " + upfs + "/fill2 " + upfs + "/fill3"), 0);
  EXPECT_EQ(Shell("mv " + m + "/f " + m + "/g && rm " + m + "/k"), 0);
  EXPECT_EQ(Output("ls " + m), "g\npub\nsecret\ntop\n");
  EXPECT_EQ(Output("cat " + m + "/g"), "upper-f\n");
  ASSERT_EQ(mount_->Stop(), 0);  // which removes the whiteout the others link to
  EXPECT_EQ(Output("cd " + upfs + "/up && stat -c '%n %F %t:%T' * .[!.]* 2>/dev/null"),
            "f character special file 0:0\ng regular file 0:0\nk character special file 0:0\n");
  EXPECT_EQ(Output("cat " + dir_ / "src/f " + dir_ / "src/k"), "lower-f\nlower-k\n");  // below: untouched
}

// A directory made again over a removed lower one, or a merged directory removed,
// where the upper disk has no room: it fails with ENOSPC, and the merged view, on this
// mount and the next, stays as it was. Before, `mkdir` over a removed lower directory
// removed the whiteout, made the directory and ignored a failure to mark it opaque:
// it succeeded, and from the next mount on the lower directory's removed entries
// showed in it again. Now the directory is made and marked under a name of its own,
// then swapped with the whiteout; `rmdir` swaps a whiteout made first with the
// directory (so no kill of the server between two steps shows the lower directory
// again; it needs an inode where the two steps did not). Once there is room, both
// work and leave no entry of the overlay's own behind.
TEST_F(StackTest, AMergedDirectoryRemovedOrMadeAgainWithNoRoomChangesNothing) {
  const std::string upfs = dir_ / "upfs";
  const SmallDisk disk(upfs, ",nr_inodes=16");
  ASSERT_TRUE(disk.ok());
  const std::string spec = "overlay:" + upfs + "/up,passthrough:" + dir_ / "src";
  Mount(spec);
  std::string m = mount_->path();
  auto unfill = [&] { EXPECT_EQ(Shell("rm -f " + upfs + "/fill*"), 0); };
  auto remount = [&] {
    ASSERT_EQ(mount_->Stop(), 0);
    Mount(spec);
    m = mount_->path();
  };
  ASSERT_EQ(Shell("rm -r " + m + "/pub"), 0);
  ASSERT_TRUE(disk.Fill()) << "the disk still has room";
  EXPECT_EQ(Output("(LC_ALL=C mkdir " + m + "/pub) 2>&1"),
            "mkdir: cannot create directory '" + m + "/pub': No space left on device\n");
  EXPECT_EQ(Output("ls " + m), "secret\ntop\n");
  unfill();
  remount();
  EXPECT_EQ(Output("(ls " + m + "/pub) 2>&1"), "ls: cannot access '" + m + "/pub': No such file or directory\n");
  ASSERT_EQ(Shell("mkdir " + m + "/pub"), 0);
  remount();
  EXPECT_EQ(Output("ls -A " + m + "/pub"), "");
  EXPECT_EQ(Output("ls -A " + upfs + "/up " + upfs + "/up/pub"), upfs + "/up:\npub\n\n" + upfs + "/up/pub:\n");

  ASSERT_EQ(Shell("rm " + m + "/secret/s"), 0);  // secret: merged, and empty
  ASSERT_TRUE(disk.Fill()) << "the disk still has room";
  EXPECT_EQ(Output("(rmdir " + m + "/secret) 2>&1"),
            "rmdir: failed to remove '" + m + "/secret': No space left on device\n");
  EXPECT_EQ(Output("ls " + m + " " + m + "/secret"), m + ":\npub\nsecret\ntop\n\n" + m + "/secret:\n");
  unfill();
  remount();
  EXPECT_EQ(Output("ls " + m + " " + m + "/secret"), m + ":\npub\nsecret\ntop\n\n" + m + "/secret:\n");
  ASSERT_EQ(Shell("rmdir " + m + "/secret"), 0);
  EXPECT_EQ(Output("ls " + m), "pub\ntop\n");
  ASSERT_EQ(mount_->Stop(), 0);  // which removes the whiteout the others link to
  EXPECT_EQ(Output("cd " + upfs + "/up && stat -c '%n %F %t:%T' * .[!.]* 2>/dev/null"),
            "pub directory 0:0\nsecret character special file 0:0\n");
  EXPECT_EQ(Output("ls " + dir_ / "src/pub " + dir_ / "src/secret"),
            dir_ / "src/pub" + ":\na\nsub\n\n" + dir_ / "src/secret" + ":\ns\n");  // below: untouched
}

// A file made, linked or moved where a lower file was removed, or a directory moved
// over an emptied merged one, when the upper disk has no room: what needs room fails
// with ENOSPC and what was removed stays removed, on this mount and the next; a move
// that needs no new inode is done. Before, the whiteout (or the emptied directory's
// whiteouts) went first, and a create, link or move that then failed, or a server
// killed between the two steps, showed the lower entries again (here: the long
// symlink, for which removing the whiteout freed no block). Now a new file is made
// under a name of the overlay's own and renamed over the whiteout, a directory or a
// RENAME_NOREPLACE move is swapped with it, and an emptied merged directory is marked
// opaque before its whiteouts go.
TEST_F(StackTest, WhatIsMadeOrMovedOntoARemovedNameWithNoRoomBringsNothingBack) {
  const std::string upfs = dir_ / "upfs";
  const SmallDisk disk(upfs, ",nr_inodes=16");
  ASSERT_TRUE(disk.ok());
  ASSERT_EQ(Shell("echo lower-f > " + dir_ / "src/f && echo lower-g > " + dir_ / "src/g"), 0);
  const std::string spec = "overlay:" + upfs + "/up,passthrough:" + dir_ / "src";
  Mount(spec);
  std::string m = mount_->path();
  ASSERT_EQ(Shell("cd " + m + " && rm top g secret/s && echo upper-f >> f && echo mine > mine && mkdir x"), 0);
  // No block left (a long symlink's target takes one), then no inode.
  Shell("head -c 2M /dev/zero > " + upfs + "/fill-blocks 2>/dev/null");
  ASSERT_TRUE(disk.Fill()) << "the disk still has room";
  EXPECT_EQ(Output("(ln -s " + std::string(3000, 'l') + " " + m + "/top) 2>&1"),
            "ln: failed to create symbolic link '" + m + "/top': No space left on device\n");
  EXPECT_EQ(Output("(touch " + m + "/top) 2>&1"), "touch: cannot touch '" + m + "/top': No space left on device\n");
  EXPECT_EQ(Output("(ln " + m + "/mine " + m + "/top) 2>&1"),  // tmpfs counts a link as an inode
            "ln: failed to create hard link '" + m + "/top': No space left on device\n");
  EXPECT_EQ(Output("(mv -T " + m + "/x " + m + "/secret) 2>&1"),
            "mv: cannot move '" + m + "/x' to '" + m + "/secret': No space left on device\n");
  EXPECT_EQ(Output("ls " + m + " " + m + "/secret"), m + ":\nf\nmine\npub\nsecret\nx\n\n" + m + "/secret:\n");
  // mv asks RENAME_NOREPLACE first: swapped with the whiteout, no inode needed.
  EXPECT_EQ(Shell("mv " + m + "/f " + m + "/g && mv " + m + "/mine " + m + "/top"), 0);
  EXPECT_EQ(Output("ls " + m + " && cat " + m + "/g " + m + "/top"), "g\npub\nsecret\ntop\nx\nlower-f\nupper-f\nmine\n");
  ASSERT_EQ(Shell("rm " + upfs + "/fill*"), 0);
  ASSERT_EQ(mount_->Stop(), 0);
  Mount(spec);
  m = mount_->path();
  EXPECT_EQ(Output("ls " + m + " " + m + "/secret"), m + ":\ng\npub\nsecret\ntop\nx\n\n" + m + "/secret:\n");
  EXPECT_EQ(Shell("cd " + m + " && mv -T x secret && rm top && ln g top && rm g && touch g"), 0);
  ASSERT_EQ(mount_->Stop(), 0);
  Mount(spec);
  m = mount_->path();
  EXPECT_EQ(Output("ls -A " + m + " " + m + "/secret"), m + ":\ng\npub\nsecret\ntop\n\n" + m + "/secret:\n");
  EXPECT_EQ(Output("cat " + m + "/top " + m + "/g"), "lower-f\nupper-f\n");
  ASSERT_EQ(mount_->Stop(), 0);
  EXPECT_EQ(Output("cd " + upfs + "/up && stat -c '%n %F' * .[!.]* secret/* secret/.[!.]* 2>/dev/null"),
            "f character special file\ng regular empty file\nsecret directory\ntop regular file\n");
  EXPECT_EQ(Output("cat " + dir_ / "src/f " + dir_ / "src/g " + dir_ / "src/top"), "lower-f\nlower-g\nt\n");
}

// A directory moved to the name of a removed lower directory hides the lower one's
// entries, on this mount and the next. Before, it was marked opaque only when it
// replaced a lower directory still shown: one moved over the whiteout of a removed
// one showed the removed entries from the next mount on.
TEST_F(StackTest, ADirectoryMovedOverARemovedLowerOneHidesItsEntries) {
  const std::string spec = "overlay:" + dir_ / "upper,passthrough:" + dir_ / "src";
  ASSERT_EQ(Shell("mkdir " + dir_ / "upper"), 0);
  Mount(spec);
  std::string m = mount_->path();
  ASSERT_EQ(Shell("rm -r " + m + "/pub && mkdir " + m + "/x && touch " + m + "/x/mine && mv " + m + "/x " + m + "/pub"),
            0);
  EXPECT_EQ(Output("ls -A " + m + "/pub"), "mine\n");
  ASSERT_EQ(mount_->Stop(), 0);
  Mount(spec);
  m = mount_->path();
  EXPECT_EQ(Output("ls -A " + m + " " + m + "/pub"), m + ":\npub\nsecret\ntop\n\n" + m + "/pub:\nmine\n");
}

// The names the overlay gives entries of its own in the upper directory for a moment
// (".ulsp-whiteout.*") are never shown, and a program cannot make one. A directory
// of that name that a killed server left half removed (whiteouts in it) goes when the
// directory that holds it is removed; before, `rmdir` of that directory failed with
// ENOTEMPTY though `ls` showed it empty.
TEST_F(StackTest, TheOverlaysOwnNamesAreHiddenAndCannotBeMade) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "upper"), 0);
  Mount("overlay:" + dir_ / "upper,passthrough:" + dir_ / "src");
  const std::string m = mount_->path();
  ASSERT_EQ(Shell("rm " + m + "/pub/a && rmdir " + m + "/pub/sub"), 0);
  const std::string left = dir_ / "upper/pub/.ulsp-whiteout.1.2";
  ASSERT_EQ(Shell("mkdir " + left + " && mknod " + left + "/x c 0 0 && mknod " + dir_ / "upper/.ulsp-whiteout.3.4 c 0 0"),
            0);
  EXPECT_EQ(Output("ls -A " + m + " " + m + "/pub"), m + ":\npub\nsecret\ntop\n\n" + m + "/pub:\n");
  EXPECT_EQ(Output("(stat " + m + "/pub/.ulsp-whiteout.1.2) 2>&1 | grep -c 'No such file'"), "1\n");
  EXPECT_EQ(Output("(touch " + m + "/.ulsp-whiteout.5; mkdir " + m + "/.ulsp-whiteout.6; mv " + m + "/top " + m +
                   "/.ulsp-whiteout.7; ln " + m + "/top " + m + "/.ulsp-whiteout.8) 2>&1 | grep -c 'Operation not permitted'"),
            "4\n");
  EXPECT_EQ(Shell("rmdir " + m + "/pub"), 0);
  EXPECT_EQ(Output("ls -A " + m), "secret\ntop\n");
  EXPECT_EQ(Output("cd " + dir_ / "upper" + " && stat -c '%n %F' *"), "pub character special file\n");
  // A whiteout of the overlay's own left in the upper root (the one it links the
  // others to, by a killed server) is removed by the next mount.
  ASSERT_EQ(mount_->Stop(), 0);
  ASSERT_EQ(Shell("mknod " + dir_ / "upper/.ulsp-whiteout.5.6 c 0 0"), 0);
  Mount("overlay:" + dir_ / "upper,passthrough:" + dir_ / "src");
  EXPECT_EQ(Output("ls -A " + dir_ / "upper"), "pub\n");
}

// What a killed server left in UPPER under the overlay's own names (a file made but
// not yet moved over its whiteout, a directory emptied half way) goes when its
// directory is next listed, wherever that is; a name a live process made stays (it
// may be in use). Before, one outside the upper root stayed until its directory was
// removed, taking room.
TEST_F(StackTest, WhatAKilledServerLeftGoesWhenItsDirectoryIsListed) {
  ASSERT_EQ(Shell("mkdir -p " + dir_ / "upper/pub"), 0);
  const std::string dead = Output("sh -c 'echo $$' | tr -d '\\n'");  // a process gone
  ASSERT_FALSE(dead.empty());
  const std::string pub = dir_ / "upper/pub/";
  ASSERT_EQ(Shell("cd " + pub + " && echo half > .ulsp-whiteout." + dead + ".1 && mkdir -p .ulsp-whiteout." + dead +
                  ".2/x && mknod .ulsp-whiteout." + dead + ".2/x/w c 0 0 && touch .ulsp-whiteout.1.3"),
            0);
  Mount("overlay:" + dir_ / "upper,passthrough:" + dir_ / "src");
  const std::string m = mount_->path();
  EXPECT_EQ(Output("ls -A " + m + "/pub"), "a\nsub\n");
  EXPECT_EQ(Output("ls -A " + pub), ".ulsp-whiteout.1.3\n");  // pid 1 lives
  EXPECT_EQ(Output("ls -A " + dir_ / "src/pub"), "a\nsub\n");  // below: untouched
}

// A directory found on both sides keeps the lower one's inode number after its
// copy-up, as on overlayfs over one file system. Programs that walk a tree with fts
// check that a directory they come back to is the one they left: once, its copy-up
// (to hold the whiteouts of its entries) gave it the upper copy's number, and `rm -r`
// of a tree 60 directories deep failed with "fts_read failed: No such file or
// directory", as did a `find` while a `touch` copied its directories up.
TEST_F(StackTest, ADirectoryKeepsItsNumberWhenCopiedUp) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "upper && cd " + dir_ / "src && p=.; for i in $(seq 60); do p=$p/d$i; mkdir $p; "
                  "echo $i > $p/f; done"),
            0);
  Mount("overlay:" + dir_ / "upper,passthrough:" + dir_ / "src");
  const std::string m = mount_->path();
  const std::string before = Output("stat -c %i " + m + "/d1/d2");
  EXPECT_EQ(before, Output("stat -c %i " + dir_ / "src/d1/d2"));
  ASSERT_EQ(Shell("touch " + m + "/d1/d2/f"), 0);  // d1 and d2 copied up
  EXPECT_EQ(Output("stat -c %i " + m + "/d1/d2"), before);
  EXPECT_EQ(Output("(chmod -R g+w " + m + "/d1 && rm -r " + m + "/d1) 2>&1"), "");
  EXPECT_EQ(Output("ls -A " + m + " | grep -c d1"), "0\n");
  EXPECT_EQ(Output("find " + dir_ / "src -name f | wc -l"), "60\n");  // below: untouched
  // A listing's entries give that number too. The kernel asks for a listing's first
  // part with attributes (READDIRPLUS, which a lookup answers) and, with no lookup
  // meanwhile, for the rest without (READDIR). A part can be as big as the caller's
  // buffer (32 KiB for glibc's readdir), so 1000 directories take several; Python's
  // scandir looks nothing up. Once, READDIR gave the upper copies' numbers.
  ASSERT_EQ(Shell("mkdir " + dir_ / "src/many && cd " + dir_ / "src/many && for i in $(seq 1000); do mkdir dir$i; done"),
            0);
  ASSERT_EQ(Shell("for d in " + m + "/many/dir*; do touch $d/f; done"), 0);  // each copied up
  EXPECT_EQ(Output("/usr/bin/python3 -c \"import os; es = list(os.scandir('" + m +
                   "/many')); print(len(es), sum(e.inode() != os.stat(e.path).st_ino for e in es))\""),
            "1000 0\n");
}

// A copy-up makes upper copies of the written file's directories, which have their own
// change times (their inode numbers stay the lower ones: ADirectoryKeepsItsNumber...),
// and a file's copy its own inode number; the kernel must learn them at once, not when
// its cached attributes expire. Once it did not: `tar c` run within the attribute
// timeout after a write said "file changed as we read it" of a directory above it (its
// ctime moved under tar), and `stat` showed a copied-up file's old inode number.
TEST_F(StackTest, ACopyUpsNewDirectoriesAreSeenAtOnce) {
  ASSERT_EQ(Shell("mkdir -p " + dir_ / "upper " + dir_ / "src/d1/d2 " + dir_ / "src/d3 && echo z > " + dir_ / "src/d3/f"), 0);
  for (const char* mode : {"", "--isolated"}) {
    SCOPED_TRACE(*mode ? mode : "in-process");
    ASSERT_EQ(Shell("rm -rf " + dir_ / "upper/*"), 0);
    std::vector<std::string> args = {"--timeout", "60", "--stack", "overlay:" + dir_ / "upper,passthrough:" + dir_ / "src"};
    if (*mode) args.insert(args.begin(), mode);
    mount_ = std::make_unique<ServedMount>(args, dir_ / "mnt", dir_ / "server.log");
    ASSERT_TRUE(mount_->ok()) << ReadAll(dir_ / "server.log");
    const std::string m = mount_->path();
    const std::string ids = " -c '%n %i %Z' ";
    ASSERT_EQ(Shell("stat" + ids + m + "/pub " + m + "/d1 " + m + "/d1/d2 >/dev/null"), 0);  // now cached
    ASSERT_EQ(Shell("echo x > " + m + "/d1/d2/new && echo y >> " + m + "/pub/a"), 0);   // copy-ups
    auto seen = [&](const std::string& root, const std::string& format) {
      return Output("cd " + root + " && stat -c '" + format + "' pub d1 d1/d2");
    };
    EXPECT_EQ(seen(m, "%n %Z"), seen(dir_ / "upper", "%n %Z"));
    EXPECT_EQ(seen(m, "%n %i"), seen(dir_ / "src", "%n %i"));
    EXPECT_EQ(Shell("cd " + m + " && tar cf /dev/null ."), 0);
    // A request that copies up, then fails: ext4 below refuses an xattr of no known
    // namespace after the overlay copied d3/f up. Its answer is an error, and it still
    // says which nodes changed (an isolated server's error once carried nothing).
    ASSERT_EQ(Shell("stat" + ids + m + "/d3 " + m + "/d3/f >/dev/null"), 0);
    EXPECT_EQ(Output(kPython + " -c \"import os\ntry: os.setxattr('" + m + "/d3/f', 'foo.bar', b'1')\n"
                     "except OSError as e: print(os.strerror(e.errno))\""),
              "Operation not supported\n");
    EXPECT_EQ(Output("cd " + m + " && stat -c '%n %Z' d3 && stat" + ids + "d3/f"),
              Output("cd " + dir_ / "upper && stat -c '%n %Z' d3 && stat" + ids + "d3/f"));
    mount_.reset();
  }
}

// RENAME_WHITEOUT on memfs leaves what ext4 leaves at the old name: a character
// device 0:0 with no permission bits, the caller's, made in the same step as the move
// (with RENAME_EXCHANGE: EINVAL). overlayfs asks for it of an upper directory at
// mount, so a memfs mount now serves as one (RAM with a size cap under a container's
// changes, say): removing and renaming lower files leaves whiteouts in it. Before,
// memfs answered EINVAL and overlayfs refused the mount ("upper fs does not support
// RENAME_WHITEOUT"). Without --no-kernel-passthrough the kernel counts a FUSE mount
// as stacked already and refuses a file system above it.
TEST_F(StackTest, OverlayfsTakesAMemfsMountAsItsUpperDirectory) {
  mount_ = std::make_unique<ServedMount>(std::vector<std::string>{"--no-kernel-passthrough", "--stack", "memfs:64M"},
                                         dir_ / "mnt", dir_ / "server.log");
  ASSERT_TRUE(mount_->ok()) << ReadAll(dir_ / "server.log");
  const std::string m = mount_->path();
  const std::string whiteout =
      kPython + " -c \"import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); d = sys.argv[1]; "
                "open(d + '/a', 'w').write('A'); open(d + '/x', 'w').write('X'); "
                "r = libc.renameat2(-100, (d + '/a').encode(), -100, (d + '/b').encode(), 4); "
                "print(r, os.strerror(ctypes.get_errno()) if r else ''); st = os.lstat(d + '/a'); "
                "print(oct(st.st_mode), os.major(st.st_rdev), os.minor(st.st_rdev), st.st_uid, st.st_nlink, "
                "open(d + '/b').read()); "
                "r = libc.renameat2(-100, (d + '/b').encode(), -100, (d + '/x').encode(), 2 | 4); "
                "print(r, os.strerror(ctypes.get_errno()) if r else '', sorted(os.listdir(d)))\" ";
  ASSERT_EQ(Shell("mkdir " + dir_ / "native"), 0);
  const std::string native = Output(whiteout + dir_ / "native");
  EXPECT_EQ(native, "0 \n0o20000 0 0 0 1 A\n-1 Invalid argument ['a', 'b', 'x']\n");
  EXPECT_EQ(Output(whiteout + m), native);

  ASSERT_EQ(Shell("mkdir " + m + "/up " + m + "/work " + dir_ / "lower " + dir_ / "ov && echo f > " + dir_ / "lower/f" +
                  " && echo g > " + dir_ / "lower/g"),
            0);
  const std::string ov = dir_ / "ov";
  struct Detach {
    std::string path;
    ~Detach() { ::umount2(path.c_str(), MNT_DETACH); }
  } detach{ov};
  const std::string options = "lowerdir=" + dir_ / "lower" + ",upperdir=" + m + "/up,workdir=" + m + "/work";
  ASSERT_EQ(::mount("ulsp-test", ov.c_str(), "overlay", 0, options.c_str()), 0) << std::strerror(errno);
  EXPECT_EQ(Shell("rm " + ov + "/f && mv " + ov + "/g " + ov + "/g2"), 0);
  EXPECT_EQ(Output("ls " + ov), "g2\n");
  EXPECT_EQ(Output("cat " + ov + "/g2"), "g\n");
  EXPECT_EQ(Output("stat -c '%n %F %t:%T %a' " + m + "/up/f " + m + "/up/g"),
            m + "/up/f character special file 0:0 0\n" + m + "/up/g character special file 0:0 0\n");
  EXPECT_EQ(Output("ls " + dir_ / "lower"), "f\ng\n");  // below, nothing changed
}

// --- the command line ---

class CommandLineTest : public ::testing::Test {
 protected:
  std::string Ulsp(const std::string& args) { return Output(std::string(ULSP_BIN) + " " + args, true); }
  bool Mounted(const std::string& p) {
    char resolved[PATH_MAX];
    return ::realpath(p.c_str(), resolved) != nullptr && core::IsMountPoint(resolved);
  }
  TempDir dir_;
};

TEST_F(CommandLineTest, MountReturnsLiveAndUmountTakesItAway) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "src " + dir_ / "mnt && echo hi > " + dir_ / "src/f"), 0);
  ASSERT_EQ(Ulsp("mount " + dir_ / "src " + dir_ / "mnt"), "");
  EXPECT_TRUE(Mounted(dir_ / "mnt"));
  EXPECT_EQ(ReadAll(dir_ / "mnt/f"), "hi\n");  // live at once, no waiting
  EXPECT_EQ(Ulsp("umount " + dir_ / "mnt"), "");
  EXPECT_FALSE(Mounted(dir_ / "mnt"));
  EXPECT_EQ(Ulsp("umount " + dir_ / "mnt"), "ulsp umount: " + dir_ / "mnt" + ": not a ulsp mount\n");
  // A SOURCE given relative to where ulsp ran is shown (mount, df, ps) as its full path.
  ASSERT_EQ(Shell("cd " + dir_.path() + " && " + ULSP_BIN + " mount src mnt"), 0);
  EXPECT_EQ(Output("findmnt -n -o SOURCE " + dir_ / "mnt"), dir_ / "src\n");
  EXPECT_EQ(Ulsp("umount " + dir_ / "mnt"), "");
  // A SOURCE whose name holds a comma (once "unknown layer", the rest of the name).
  ASSERT_EQ(Shell("mkdir '" + dir_ / "a,b" + "' && echo comma > '" + dir_ / "a,b/f" + "'"), 0);
  ASSERT_EQ(Ulsp("mount '" + dir_ / "a,b" + "' " + dir_ / "mnt"), "");
  EXPECT_EQ(ReadAll(dir_ / "mnt/f"), "comma\n");
  EXPECT_EQ(Output("findmnt -n -o SOURCE " + dir_ / "mnt"), dir_ / "a,b\n");
  EXPECT_EQ(Ulsp("umount " + dir_ / "mnt"), "");
}

// A user mounts and unmounts a tree of their own, through fusermount3, as with any
// FUSE file system. Once every mount asked for allow_other, which fusermount3 refuses
// a user unless /etc/fuse.conf says user_allow_other, so no user could mount at all;
// and `ulsp umount` called umount2, which only root may.
TEST_F(CommandLineTest, AUserMountsTheirOwnTree) {
  struct DeviceMode {  // /dev/fuse as the test needs it, then as it was
    struct stat st {};
    explicit DeviceMode(mode_t mode) {
      if (::stat("/dev/fuse", &st) == 0) ::chmod("/dev/fuse", mode);
    }
    ~DeviceMode() { ::chmod("/dev/fuse", st.st_mode & 07777); }
  };
  const std::string home = dir_ / "home";
  ASSERT_EQ(Shell("mkdir -p " + home + "/src " + home + "/mnt && echo hi > " + home + "/src/f && chown -R nobody:nogroup " +
                  home),
            0);
  // Their runtime directory, for `ulsp ps`, in their home here (XDG_RUNTIME_DIR), not
  // /tmp/ulsp-65534 (the default without one), which would outlive the test.
  const std::string as_nobody =
      "cd " + home + " && setpriv --reuid nobody --regid nogroup --clear-groups env XDG_RUNTIME_DIR=" + home + " ";
  const std::string ulsp = std::string(ULSP_BIN);
  {
    DeviceMode closed(0600);  // a machine where FUSE is root's alone: said so
    EXPECT_EQ(Output(as_nobody + ulsp + " mount src mnt", true),
              "ulsp mount: " + home + "/mnt: mounting failed: Permission denied (/dev/fuse: Permission denied: FUSE is "
              "root's alone on this machine)\n");
  }
  DeviceMode open(0666);  // as Debian has it
  ASSERT_EQ(Output(as_nobody + ulsp + " mount src mnt", true), "");
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{home + "/mnt"};
  EXPECT_TRUE(Mounted(home + "/mnt"));
  EXPECT_EQ(Output(as_nobody + "sh -c 'cat mnt/f && echo new > mnt/g && stat -c %U mnt/g && cat src/g'"),
            "hi\nnobody\nnew\n");
  EXPECT_EQ(Output(as_nobody + ulsp + " umount mnt", true), "");
  EXPECT_FALSE(Mounted(home + "/mnt"));
  EXPECT_EQ(Shell("for i in $(seq 100); do pgrep -u nobody -x ulsp >/dev/null || exit 0; sleep 0.05; done; exit 1"), 0)
      << "the server outlived its mount";
  // A user's memfs is theirs to write in, in-process and isolated (its root was
  // root's), and their own `ulsp ps` lists it (their runtime directory is their own:
  // here $XDG_RUNTIME_DIR/ulsp; it was /run/ulsp, which a user may not write).
  const std::string& xdg = as_nobody;
  for (const char* isolated : {"", "--isolated "}) {
    SCOPED_TRACE(isolated);
    ASSERT_EQ(Output(xdg + ulsp + " mount " + isolated + "--stack memfs:1M mnt", true), "");
    EXPECT_EQ(Output(as_nobody + "sh -c 'echo mine > mnt/f && stat -c %U:%G mnt mnt/f && cat mnt/f'"),
              "nobody:nogroup\nnobody:nogroup\nmine\n");
    EXPECT_NE(Output(xdg + ulsp + " ps", true).find(home + "/mnt"), std::string::npos) << Output(xdg + ulsp + " ps", true);
    EXPECT_EQ(Output(xdg + ulsp + " umount mnt", true), "");
    EXPECT_FALSE(Mounted(home + "/mnt"));
  }
  EXPECT_EQ(Shell("for i in $(seq 100); do pgrep -u nobody -x ulsp >/dev/null || exit 0; sleep 0.05; done; exit 1"), 0)
      << "a server outlived its mount";
}

// A mount point's name is bytes, not always UTF-8 (here Latin-1's é). `ulsp ps
// --json` once died on it (an uncaught nlohmann type_error, abort); the name now shows
// with U+FFFD for what is not UTF-8, as in the text listing's terminal.
TEST_F(CommandLineTest, PsJsonListsAMountWhoseNameIsNotUtf8) {
  std::string mnt = dir_ / "caf", shown = mnt;
  mnt += '\xe9';
  shown += "\xef\xbf\xbd";  // U+FFFD
  ASSERT_EQ(Shell("mkdir " + dir_ / "src '" + mnt + "'"), 0);
  const std::string env = "ULSP_RUNTIME_DIR=" + dir_ / "run" + " ";
  ASSERT_EQ(Output(env + ULSP_BIN + " mount " + dir_ / "src '" + mnt + "'", true), "");
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mnt};
  const nlohmann::json all = nlohmann::json::parse(Output(env + ULSP_BIN + " ps --json", true), nullptr, false);
  ASSERT_TRUE(all.is_array()) << all;
  bool seen = false;
  for (const auto& p : all)
    for (const auto& m : p["mounts"]) seen = seen || m["path"] == shown;
  EXPECT_TRUE(seen) << all.dump(2);
  EXPECT_EQ(Output(env + ULSP_BIN + " umount '" + mnt + "'", true), "");
}

// A control socket is its owner's alone (0600): another user's `ulsp ps` cannot ask
// root's mount, and once said "no ulsp process is serving anything" while it served.
TEST_F(CommandLineTest, PsSaysWhatItMayNotAsk) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "src " + dir_ / "mnt"), 0);
  const std::string env = "ULSP_RUNTIME_DIR=" + dir_ / "run" + " ";
  ASSERT_EQ(Output(env + ULSP_BIN + " mount " + dir_ / "src " + dir_ / "mnt", true), "");
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{dir_ / "mnt"};
  const std::string pid = Output("ls " + dir_ / "run");
  ASSERT_FALSE(pid.empty());
  const std::string as_nobody = env + "setpriv --reuid nobody --regid nogroup --clear-groups " + ULSP_BIN + " ps";
  EXPECT_EQ(Output(as_nobody + " 2>/dev/null"), "");
  EXPECT_EQ(Output(as_nobody + " 2>&1 >/dev/null"),
            "ulsp ps: not shown, as only their owners may ask them (run ulsp ps as root or as that user): pid " + pid);
  EXPECT_EQ(Output(as_nobody + " --json 2>/dev/null"), "[]\n");
  EXPECT_NE(Output(env + ULSP_BIN + " ps"), "no ulsp process is serving anything\n");
  EXPECT_EQ(Output(env + ULSP_BIN + " umount " + dir_ / "mnt", true), "");
}

// A stopped server (SIGSTOP, a debugger) is named in one line, and the others are
// listed. The line once ended in kj's stack trace.
TEST_F(CommandLineTest, PsNamesAStoppedServerInOneLine) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "src " + dir_ / "mnt " + dir_ / "mnt2"), 0);
  const std::string env = "ULSP_RUNTIME_DIR=" + dir_ / "run" + " ";
  ASSERT_EQ(Output(env + ULSP_BIN + " mount " + dir_ / "src " + dir_ / "mnt", true), "");
  ASSERT_EQ(Output(env + ULSP_BIN + " mount " + dir_ / "src " + dir_ / "mnt2", true), "");
  pid_t stopped = 0;
  for (const auto& p : nlohmann::json::parse(Output(env + ULSP_BIN + " ps --json")))
    if (p["mounts"][0]["path"] == dir_ / "mnt") stopped = p["pid"].get<pid_t>();
  ASSERT_GT(stopped, 1);
  ASSERT_EQ(::kill(stopped, SIGSTOP), 0);
  const std::string out = Output(env + ULSP_BIN + " ps 2>" + dir_ / "err");
  ::kill(stopped, SIGCONT);
  EXPECT_EQ(ReadAll(dir_ / "err"),
            "ulsp ps: pid " + std::to_string(stopped) + " did not answer within 2 s (is it stopped?)\n");
  EXPECT_NE(out.find(dir_ / "mnt2"), std::string::npos) << out;
  EXPECT_EQ(Output(env + ULSP_BIN + " umount " + dir_ / "mnt", true), "");
  EXPECT_EQ(Output(env + ULSP_BIN + " umount " + dir_ / "mnt2", true), "");
}

// `ulsp umount` returns once the mount's server has ended, so that what runs after it
// finds the trace complete and no server left. It once returned when the kernel let
// go, while an isolated server was still running and its trace's last lines unwritten.
TEST_F(CommandLineTest, UmountReturnsOnceTheServerHasEnded) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "src " + dir_ / "mnt"), 0);
  const std::string env = "ULSP_RUNTIME_DIR=" + dir_ / "run" + " ";
  for (const std::string isolated : {"", "--isolated "}) {
    ASSERT_EQ(Output(env + ULSP_BIN + " mount " + isolated + "--stack trace:" + dir_ / "t.jsonl,passthrough:" + dir_ / "src " +
                         dir_ / "mnt",
                     true),
              "");
    pid_t server = 0;
    for (const auto& p : nlohmann::json::parse(Output(env + ULSP_BIN + " ps --json")))
      if (p["kind"] == "mount") server = p["pid"].get<pid_t>();
    ASSERT_GT(server, 1);
    ASSERT_EQ(Shell("echo hi > " + dir_ / "mnt/f"), 0);
    EXPECT_EQ(Output(env + ULSP_BIN + " umount " + dir_ / "mnt", true), "");
    // Gone, or a zombie that init has yet to reap.
    const std::string state = Output("awk '{print $3}' /proc/" + std::to_string(server) + "/stat 2>/dev/null");
    EXPECT_TRUE(state.empty() || state == "Z\n") << isolated << "state " << state;
    EXPECT_NE(ReadAll(dir_ / "t.jsonl").find(R"("op":"release","path":"/f")"), std::string::npos) << isolated;
    EXPECT_EQ(Output("ls " + dir_ / "run"), "") << isolated;
    ::unlink((dir_ / "t.jsonl").c_str());
  }
}

// A busy mount (a program holds a file there) is refused, saying --lazy; with it, it
// leaves the tree at once, the program goes on reading its file, and the server ends
// once the file is closed.
TEST_F(CommandLineTest, ABusyMountIsRefusedOrWithLazyDetached) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "src " + dir_ / "mnt && echo hi > " + dir_ / "src/f"), 0);
  const std::string env = "ULSP_RUNTIME_DIR=" + dir_ / "run" + " ";
  ASSERT_EQ(Output(env + ULSP_BIN + " mount " + dir_ / "src " + dir_ / "mnt", true), "");
  pid_t server = 0;
  for (const auto& p : nlohmann::json::parse(Output(env + ULSP_BIN + " ps --json")))
    if (p["kind"] == "mount") server = p["pid"].get<pid_t>();
  ASSERT_GT(server, 1);
  UniqueFd held(::open((dir_ / "mnt/f").c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(held);
  EXPECT_EQ(Output(env + ULSP_BIN + " umount " + dir_ / "mnt", true),
            "ulsp umount: " + dir_ / "mnt" +
                ": busy (a program is using it; --lazy detaches it now, served until they let go)\n");
  EXPECT_TRUE(Mounted(dir_ / "mnt"));
  EXPECT_EQ(Output(env + ULSP_BIN + " umount --lazy " + dir_ / "mnt", true), "");
  EXPECT_FALSE(Mounted(dir_ / "mnt"));
  char buf[8] = {};
  EXPECT_EQ(::pread(held.get(), buf, sizeof buf, 0), 3);
  EXPECT_STREQ(buf, "hi\n");
  EXPECT_EQ(::kill(server, 0), 0);  // still serving
  held.Reset();
  bool ended = false;
  for (int i = 0; i < 500 && !ended; ++i) {  // gone, or a zombie that init has yet to reap
    const std::string state = Output("awk '{print $3}' /proc/" + std::to_string(server) + "/stat 2>/dev/null");
    ended = state.empty() || state == "Z\n";
    if (!ended) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(ended);
}

// `ulsp ps` counts a mount's requests at its port as put and, once answered, replied:
// every request gets one answer, so when the mount is quiet the two agree. Neither an
// isolated mount's relay port nor an in-process mount's direct port sees the replies
// pass (they go straight to the shim), and both were once not counted (0 replied).
TEST_F(CommandLineTest, PsCountsTheAnswersOfAMount) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "src " + dir_ / "mnt && echo hi > " + dir_ / "src/f"), 0);
  const std::string env = "ULSP_RUNTIME_DIR=" + dir_ / "run" + " ";
  for (const std::string how : {"--isolated ", ""}) {
    SCOPED_TRACE(how);
    ASSERT_EQ(Output(env + ULSP_BIN + " mount " + how + dir_ / "src " + dir_ / "mnt", true), "");
    EXPECT_EQ(Output("cat " + dir_ / "mnt/f; ls " + dir_ / "mnt/nope 2>&1 >/dev/null | wc -l"), "hi\n1\n");
    const std::string port = how.empty() ? "vfs:" + (dir_ / "mnt") : "vfs-isolated";
    uint64_t put = 0, replied = 0, refused = 0;
    bool seen = false;
    for (int i = 0; i < 100; ++i) {  // the release after cat is answered in the background
      for (const auto& p : nlohmann::json::parse(Output(env + ULSP_BIN + " ps --json")))
        for (const auto& q : p["ports"]) {
          if (q["name"].get<std::string>() != port) continue;
          seen = true;
          put = q["put"].get<uint64_t>();
          replied = q["replied"].get<uint64_t>();
          refused = q["refused"].get<uint64_t>();
        }
      if (seen && put == replied) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_TRUE(seen);
    EXPECT_GE(put, 4u);  // two lookups, an open and a release at least
    EXPECT_EQ(replied, put);
    EXPECT_EQ(refused, 0u);
    EXPECT_EQ(Output(env + ULSP_BIN + " umount " + dir_ / "mnt", true), "");
  }
}

// A background server builds its stack after it forks: the trace's writer thread
// must be alive in the server, so lines reach the log while the mount lives.
TEST_F(CommandLineTest, ABackgroundTraceWritesWhileTheMountLives) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "src " + dir_ / "mnt && echo hi > " + dir_ / "src/f"), 0);
  ASSERT_EQ(Ulsp("mount --stack trace:" + dir_ / "t.jsonl,passthrough:" + dir_ / "src " + dir_ / "mnt"), "");
  EXPECT_EQ(ReadAll(dir_ / "mnt/f"), "hi\n");
  std::string log;
  for (int i = 0; i < 100 && log.find("\"op\":\"open\"") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    log = ReadAll(dir_ / "t.jsonl");
  }
  EXPECT_NE(log.find("\"op\":\"open\",\"path\":\"/f\""), std::string::npos) << log;
  EXPECT_EQ(Ulsp("umount " + dir_ / "mnt"), "");
}

// SIGTERM (or ^C) ends a foreground mount at once: the handler wakes the loop's
// readers, which otherwise notice an exit only when their one-second poll runs out
// (half a second on average; three stops all under 300 ms then had a 3% chance).
// Liveness, not speed: the bound is a hundred times what a stop takes.
TEST_F(CommandLineTest, AForegroundMountStopsAtOnceOnSigterm) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "src " + dir_ / "mnt && echo hi > " + dir_ / "src/f"), 0);
  for (int i = 0; i < 3; ++i) {
    ServedMount m({dir_ / "src"}, dir_ / "mnt", dir_ / "log");
    ASSERT_TRUE(m.ok()) << ReadAll(dir_ / "log");
    EXPECT_EQ(ReadAll(dir_ / "mnt/f"), "hi\n");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the readers go back to sleep
    const auto sent = std::chrono::steady_clock::now();
    ASSERT_EQ(::kill(m.pid(), SIGTERM), 0);
    siginfo_t exited{};  // WNOWAIT: left for ServedMount to reap
    while (::waitid(P_PID, static_cast<id_t>(m.pid()), &exited, WEXITED | WNOHANG | WNOWAIT) == 0 && exited.si_pid == 0 &&
           std::chrono::steady_clock::now() - sent < std::chrono::seconds(5))
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - sent);
    EXPECT_LT(took.count(), 300) << "stop " << i;
    EXPECT_FALSE(Mounted(dir_ / "mnt"));
    EXPECT_EQ(m.Stop(), 0);  // exited by itself, with status 0
  }
}

// One overlay on an upper directory at a time, as overlayfs has it. Two (two mounts,
// two groups of one policy) each copied a file up and linked their copy in; the
// second link failed, and so did the program's append through it ("File exists"),
// and neither saw the other's whiteouts. The second is refused, in-process or
// isolated, with a line that says why; once the first ends, the directory is free.
TEST_F(CommandLineTest, OneOverlayAtATimeOnAnUpperDirectory) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "src " + dir_ / "up " + dir_ / "a " + dir_ / "b && echo x > " + dir_ / "src/f"), 0);
  const std::string stack = "--stack overlay:" + dir_ / "up" + ",passthrough:" + dir_ / "src ";
  ASSERT_EQ(Ulsp("mount " + stack + dir_ / "a"), "");
  const std::string refused = "ulsp mount: overlay:" + dir_ / "up" +
                              ": another overlay serves this upper directory now (a mount, a group or an agent's export); "
                              "give each its own\n";
  EXPECT_EQ(Ulsp("mount " + stack + dir_ / "b"), refused);
  EXPECT_EQ(Ulsp("mount --isolated " + stack + dir_ / "b"), refused);
  EXPECT_FALSE(Mounted(dir_ / "b"));
  EXPECT_EQ(Shell("echo a >> " + dir_ / "a/f"), 0);
  EXPECT_EQ(Ulsp("umount " + dir_ / "a"), "");
  ASSERT_EQ(Ulsp("mount --isolated " + stack + dir_ / "b"), "");
  EXPECT_EQ(Shell("echo b >> " + dir_ / "b/f"), 0);
  EXPECT_EQ(ReadAll(dir_ / "up/f"), "x\na\nb\n");
  EXPECT_EQ(Ulsp("umount " + dir_ / "b"), "");
}

TEST_F(CommandLineTest, BadInputGetsAOneLineErrorAndNothingIsMounted) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "src " + dir_ / "mnt"), 0);
  // Orphans come to this process (not init), so a server a failed mount left behind,
  // even one only exiting, is seen below. Once, it was left for init to reap.
  ASSERT_EQ(::prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
  const std::string mnt = dir_ / "mnt";
  struct Case {
    std::string args, expected;
  } cases[] = {
      {"mount --stack bogus:/x " + mnt, "ulsp mount: unknown layer 'bogus' (known: passthrough:DIR, memfs:SIZE, overlay:UPPERDIR, trace:LOG, view:ALLOWLIST)\n"},
      {"mount --stack trace:/tmp/x.jsonl " + mnt,
       "ulsp mount: layer 'trace' needs a layer below it: end the stack with passthrough:DIR or memfs:SIZE\n"},
      {"mount --stack passthrough:" + dir_ / "src" + ",, " + mnt, "ulsp mount: empty layer at position 2 of the stack\n"},
      {"mount " + dir_ / "nope " + mnt, "ulsp mount: passthrough:" + dir_ / "nope" + ": No such file or directory\n"},
      {"mount --stack view:" + dir_ / "nolist,passthrough:" + dir_ / "src " + mnt,
       "ulsp mount: view:" + dir_ / "nolist" + ": cannot read the allow-list: No such file or directory\n"},
      // A directory read as no lines, an empty allow-list: the mount once showed nothing.
      {"mount --stack view:" + dir_ / "src,passthrough:" + dir_ / "src " + mnt,
       "ulsp mount: view:" + dir_ / "src" + ": cannot read the allow-list: a directory, not a file\n"},
      // /dev/zero was read for ever.
      {"mount --stack view:/dev/zero,passthrough:" + dir_ / "src " + mnt,
       "ulsp mount: view:/dev/zero: cannot read the allow-list: not a regular file or a pipe\n"},
      {"mount " + dir_ / "src " + dir_ / "nomnt", "ulsp mount: " + dir_ / "nomnt" + ": mount point: No such file or directory\n"},
      {"mount " + dir_ / "src " + mnt + " --timeout -1", "ulsp mount: --timeout must be 0 or more seconds\n"},
      // NaN passed the `< 0` test and reached libfuse's conversion to whole seconds.
      {"mount " + dir_ / "src " + mnt + " --timeout nan", "ulsp mount: --timeout must be 0 or more seconds\n"},
      {"mount --remote 127.0.0.1:1/x --deadline nan " + mnt,
       "ulsp mount: --deadline must be more than 0 and at most 86400 seconds\n"},
      // A lower directory inside the upper one: copy-ups landed in the layer the overlay
      // keeps unchanged, and showed twice through the mount.
      {"mount --stack overlay:" + dir_ / "up,passthrough:" + dir_ / "up/low " + mnt,
       "ulsp mount: passthrough:" + dir_ / "up/low" + " lies inside overlay:" + dir_ / "up" +
           ", so the overlay's changes would land in the layer it keeps unchanged: put the upper directory "
           "elsewhere\n"},
      {"mount --stack overlay:" + dir_.path() + ",passthrough:" + dir_ / "src " + mnt,
       "ulsp mount: " + mnt + ": mount point is inside overlay:" + dir_.path() +
           ", so the mount would contain itself: mount it outside that directory\n"},
      // Once mounted, a lookup of mnt/ through the mount reached the mount itself and
      // held it busy: `ulsp umount` could not end it.
      {"mount " + dir_.path() + " " + mnt,
       "ulsp mount: " + mnt + ": mount point is inside passthrough:" + dir_.path() +
           ", so the mount would contain itself: mount it outside that directory\n"},
      {"mount", "ulsp mount: MOUNTPOINT is required (see ulsp mount --help)\n"},
      {"mount " + dir_ / "src " + mnt + " --timeout soon",
       "ulsp mount: Could not convert: --timeout = soon (see ulsp mount --help)\n"},
      // An upper directory that takes no new names: once mounted, and every change
      // through it failed with "No such file or directory".
      {"mount --stack overlay:/proc,passthrough:" + dir_ / "src " + mnt,
       "ulsp mount: overlay:/proc: cannot make directories there (No such file or directory): the upper directory "
       "must be writable\n"},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(Ulsp(c.args), c.expected) << c.args;
    EXPECT_FALSE(Mounted(mnt)) << c.args;
  }
  // What another user controls (as one could have made it in /tmp beforehand): their
  // directory as an overlay's upper (their files would shadow the lower layer's),
  // their link as the trace's log or the server's (root would write through it).
  const std::string theirs = dir_ / "their-upper", link = dir_ / "their-link", precious = dir_ / "precious";
  ASSERT_EQ(Shell("mkdir " + theirs + " && chown 65534 " + theirs + " && echo keep > " + precious + " && ln -s " +
                  precious + " " + link + " && chown -h 65534 " + link),
            0);
  const std::string refused =
      ", neither yours, root's nor its directory owner's: refusing to use what another user controls\n";
  EXPECT_EQ(Ulsp("mount --stack overlay:" + theirs + ",passthrough:" + dir_ / "src " + mnt),
            "ulsp mount: overlay:" + theirs + ": a directory owned by uid 65534" + refused);
  EXPECT_EQ(Ulsp("mount --stack trace:" + link + ",passthrough:" + dir_ / "src " + mnt),
            "ulsp mount: trace: cannot open the log " + link + ": a symbolic link owned by uid 65534" + refused);
  EXPECT_EQ(Ulsp("mount --log " + link + " " + dir_ / "src " + mnt),
            "ulsp mount: the log " + link + ": a symbolic link owned by uid 65534" + refused);
  EXPECT_FALSE(Mounted(mnt));
  EXPECT_EQ(ReadAll(precious), "keep\n");

  std::ofstream(dir_ / "bad-list") << "/ok\nrelative/path\n";
  EXPECT_EQ(Ulsp("mount --stack view:" + dir_ / "bad-list,passthrough:" + dir_ / "src " + mnt),
            "ulsp mount: view:" + dir_ / "bad-list" +
                ":2: 'relative/path' is not an absolute path without '.' or '..' components\n");
  siginfo_t left{};
  EXPECT_EQ(::waitid(P_ALL, 0, &left, WEXITED | WNOHANG), -1) << "a failed mount left process " << left.si_pid;
  EXPECT_EQ(errno, ECHILD);
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
  // A busy mount point: mounted once already.
  ASSERT_EQ(Ulsp("mount " + dir_ / "src " + mnt), "");
  EXPECT_EQ(Ulsp("mount " + dir_ / "src " + mnt),
            "ulsp mount: " + mnt + ": mount point is busy (something is already mounted there)\n");
  EXPECT_EQ(Ulsp("umount " + mnt), "");
  EXPECT_FALSE(Mounted(mnt));
}

// An isolated mount needs a shared-memory segment: with /dev/shm full, `ulsp mount`
// says so in its one line (the background server's log goes nowhere without --log),
// and nothing is mounted. /dev/shm is a full 16 KiB tmpfs in a mount namespace of the
// test's own; the umount after the check ends a server that would have mounted.
TEST_F(CommandLineTest, AnIsolatedMountWithDevShmFullSaysWhy) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "mnt"), 0);
  const std::string mnt = dir_ / "mnt", out = dir_ / "out";
  const int rc = Shell("unshare -m --propagation private sh -c 'mount -t tmpfs -o size=16k tmpfs /dev/shm && "
                       "head -c 16384 /dev/zero > /dev/shm/fill 2>/dev/null; " +
                       std::string(ULSP_BIN) + " mount --isolated --stack memfs:1M " + mnt + " 2> " + out +
                       "; echo status $?  >> " + out + "; grep -c \" " + mnt + " \" /proc/self/mounts >> " + out + "; " +
                       std::string(ULSP_BIN) + " umount " + mnt + " 2>/dev/null; true'");
  ASSERT_EQ(rc, 0);
  EXPECT_EQ(ReadAll(out),
            "ulsp mount: the isolated server did not start: its shared-memory port (in /dev/shm): No space left on "
            "device\nstatus 1\n0\n");
}

}  // namespace
}  // namespace ulsp::testing
