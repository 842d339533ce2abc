// `ulsp run` as a user meets it: the command's exit status, its own pid namespace,
// its mounts (seen by the group only, gone with it), what it leaves behind (nothing),
// limits, signals, capabilities, `ulsp ps`, and policies refused before anything runs.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <iostream>

#include "tests/core/group_fixture.h"
#include "ulsp/core/cgroup.h"

namespace ulsp::testing {
namespace {

const std::string kOpen = "[group.g]\nnet_default = \"allow\"\n";

class RunTest : public ::testing::Test {
 protected:
  void TearDown() override {
    // Nothing of the group may outlive it (other tests' mounts may be live meanwhile).
    EXPECT_EQ(Output("grep ' fuse.ulsp ' /proc/self/mountinfo | grep -c ' " + dir_.path() + "'"), "0\n");
    EXPECT_EQ(Output("pgrep -f 'sleep 98765[4]' | wc -l"), "0\n");
    EXPECT_EQ(Output("ls " + dir_ / "run" + " 2>/dev/null | wc -l"), "0\n");
  }
  TempDir dir_;
};

TEST_F(RunTest, ExitsWithTheCommandsStatusAsAShellReportsIt) {
  EXPECT_EQ(RunInGroup(dir_, kOpen, "exit 7").status, 7);
  EXPECT_EQ(RunInGroup(dir_, kOpen, "true").status, 0);
  EXPECT_EQ(RunInGroup(dir_, kOpen, "kill -TERM $$").status, 128 + SIGTERM);
  EXPECT_EQ(RunInGroup(dir_, kOpen, "kill -KILL $$").status, 128 + SIGKILL);
  // A command that cannot be started: 127, as a shell says it.
  std::ofstream(dir_ / "p.toml") << kOpen;
  EXPECT_EQ(Shell("ULSP_RUNTIME_DIR=" + dir_ / "run" + " " + ULSP_BIN + " run --policy " + dir_ / "p.toml" +
                  " -- /nonexistent/cmd 2> " + dir_ / "err"),
            127);
  EXPECT_EQ(Output("cat " + dir_ / "err"), "ulsp run: /nonexistent/cmd: No such file or directory\n");
  // An empty name is a usage error, said as such (it was "ulsp run: : No such file ..."), and nothing runs.
  EXPECT_EQ(Shell("ULSP_RUNTIME_DIR=" + dir_ / "run" + " " + ULSP_BIN + " run --policy " + dir_ / "p.toml" +
                  " -- '' 2> " + dir_ / "err"),
            125);
  EXPECT_EQ(Output("cat " + dir_ / "err"), "ulsp run: the command after -- is an empty string\n");
  auto r = RunInGroup(dir_, kOpen, "echo out; echo err >&2; exit 3");
  EXPECT_EQ(r.out, "out\n");
  EXPECT_EQ(r.err, "err\n");
}

TEST_F(RunTest, TheGroupHasItsOwnPidNamespaceAndLeavesNothingBehind) {
  auto r = RunInGroup(dir_, kOpen, "echo $$; ls /proc | grep -c '^[0-9]'; (sleep 987654 &); setsid sleep 987654 & echo started");
  EXPECT_EQ(r.status, 0) << r.err;
  std::istringstream out(r.out);
  int pid = 0, processes = 0;
  std::string started;
  out >> pid >> processes >> started;
  // 1 is the group's init; the command is 2 (3 or so in a TSan build, whose runtime
  // gives the init a thread of its own, which takes a pid too).
  EXPECT_GE(pid, 2);
  EXPECT_LE(pid, 4);
  EXPECT_LE(processes, 4);
  EXPECT_EQ(started, "started");
  // TearDown: no `sleep 987654` is left.
}

TEST_F(RunTest, WithoutAPidNamespaceLeftoversAreStillKilled) {
  auto r = RunInGroup(dir_, kOpen + "pid_namespace = false\n",
                      "echo $$; (sleep 987654 &); setsid sleep 987654 & nohup sleep 987654 > /dev/null 2>&1 & echo started");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.substr(0, 2), "2\n");
  EXPECT_NE(r.out.find("started"), std::string::npos);
}

TEST_F(RunTest, MountsAreTheGroupsAloneAndGoWithIt) {
  ASSERT_EQ(Shell("mkdir -p " + dir_ / "scratch " + dir_ / "src/sub && echo original > " + dir_ / "src/sub/file"), 0);
  const std::string policy = kOpen + "[[group.g.mount]]\npath = \"" + dir_ / "scratch" + "\"\nstack = \"memfs:64M\"\n" +
                             "[[group.g.mount]]\npath = \"" + dir_ / "src" + "\"\nstack = \"overlay:" + dir_ / "upper" +
                             ",passthrough:" + dir_ / "src" + "\"\n";
  // Seen from outside while the group runs: nothing is mounted here.
  auto r = RunInGroup(dir_, policy,
                      "echo hello > " + dir_ / "scratch/note" + " && cat " + dir_ / "scratch/note" + " && grep -c ' fuse.ulsp ' /proc/self/mountinfo"
                      " && echo changed > " + dir_ / "src/sub/file" + " && touch " + dir_ / "src/new" +
                      " && cat " + dir_ / "src/sub/file" + " && grep -c ' fuse.ulsp ' /proc/1/mountinfo");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "hello\n2\nchanged\n2\n");
  EXPECT_EQ(Output("ls -A " + dir_ / "scratch"), "");               // memfs: gone with the group
  EXPECT_EQ(Output("cat " + dir_ / "src/sub/file"), "original\n");  // overlay: below unchanged
  EXPECT_EQ(Output("cat " + dir_ / "upper/sub/file"), "changed\n"); // ... the change above
  EXPECT_EQ(Output("ls " + dir_ / "upper"), "new\nsub\n");
}

// The command gets the umask and open-file limit `ulsp run` was started with. A
// passthrough layer sets its process's umask to 0 (the kernel has masked a new file's
// mode already) and raises its open-file limit to the hard one (a million for root),
// and the group's command once inherited both: everything it made was
// world-writable, and a program that closes every descriptor up to its limit was slow.
TEST_F(RunTest, TheCommandKeepsItsCallersUmaskAndOpenFileLimit) {
  ASSERT_EQ(Shell("mkdir -p " + dir_ / "src"), 0);
  const std::string policy = kOpen + "[[group.g.mount]]\npath = \"" + dir_ / "src" + "\"\nstack = \"passthrough:" +
                             dir_ / "src" + "\"\n";
  const mode_t before = ::umask(027);
  auto r = RunInGroup(dir_, policy,
                      "umask && cd " + dir_ / "src" + " && touch file && mkdir dir && stat -c '%a %n' file dir && "
                      "touch " + dir_ / "plain" + " && stat -c %a " + dir_ / "plain" + " && ulimit -Sn",
                      60, "", "prlimit --nofile=512:4096 ");
  ::umask(before);
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "0027\n640 file\n750 dir\n640\n512\n");
  EXPECT_EQ(Output("stat -c '%a %n' " + dir_ / "src/file"), "640 " + dir_ / "src/file" + "\n");  // on disk too
}

// ext4 lists the names of trusted.* attributes only to a caller with CAP_SYS_ADMIN,
// which no process of a group holds; through the group's mount its root was once
// listed what the server (root, with it) was: here trusted.t beside user.u.
TEST_F(RunTest, AGroupIsListedNoTrustedAttribute) {
  const std::string file = dir_ / "src/f";
  ASSERT_EQ(Shell("mkdir -p " + dir_ / "src" + " && touch " + file + " && /usr/bin/python3 -c \"import os; "
                  "[os.setxattr('" + file + "', n, b'v') for n in ('trusted.t', 'user.u')]\""), 0);
  const std::string policy = kOpen + "[[group.g.mount]]\npath = \"" + dir_ / "src" + "\"\nstack = \"passthrough:" +
                             dir_ / "src" + "\"\n";
  auto r = RunInGroup(dir_, policy, "/usr/bin/python3 -c \"import os; print(sorted(os.listxattr('" + file + "')))\"");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "['user.u']\n");
}

// What ulsp makes for `ulsp ps` and the group (its runtime directory, the group's
// resolv.conf and hosts) has modes of its own, not the umask of 0 that a passthrough
// layer sets: they were once 0777 and 0666, so any user could rewrite the resolver a
// group was given, or put a control socket of theirs in root's place. (Not sticky
// 1777 either: another user could then make /run/ulsp/PID for a coming pid first.)
TEST_F(RunTest, WhatUlspMakesIsNotWorldWritable) {
  ASSERT_EQ(Shell("mkdir -p " + dir_ / "src"), 0);
  const std::string policy = kOpen + "[[group.g.mount]]\npath = \"" + dir_ / "src" + "\"\nstack = \"passthrough:" +
                             dir_ / "src" + "\"\n";
  const std::string run = dir_ / "run";
  auto r = RunInGroup(dir_, policy, "stat -c %a " + run + " " + run + "/*/ " + run + "/*/resolv.conf " + run + "/*/hosts");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "755\n755\n644\n644\n");
}

// A command started where the group cannot go (here a directory in /tmp, with the
// group's /tmp its own) does not start: it once ran from "/" instead, and its relative
// paths named the host's files there (`touch x` made /x).
TEST_F(RunTest, ACurrentDirectoryTheGroupDoesNotSeeIsAnError) {
  const std::string name = "ulsp-made-by-run-test-" + std::to_string(::getpid());
  auto r = RunInGroup(dir_, kOpen + "private_tmp = true\n", "touch " + name, 60, "", "env -C " + dir_.path() + " ");
  EXPECT_EQ(r.status, 125);
  EXPECT_EQ(r.err, "ulsp run: the current directory " + dir_.path() +
                       " is not in the group (its /tmp is a private one): No such file or directory: start it from "
                       "a directory the group sees\n");
  EXPECT_FALSE(std::filesystem::exists("/" + name));
  EXPECT_FALSE(std::filesystem::exists(dir_ / name));
  std::filesystem::remove("/" + name);
}

// Isolated mounts: their servers are processes `ulsp run` starts, and stops with
// SIGTERM when the command ends. `ulsp run` blocks SIGTERM (to forward it to the
// group), and servers once inherited that mask: they never ended, nor did `ulsp run`.
TEST_F(RunTest, IsolatedMountsServeTheGroupAndEndWithIt) {
  ASSERT_EQ(Shell("mkdir -p " + dir_ / "scratch " + dir_ / "src && echo original > " + dir_ / "src/file"), 0);
  const std::string overlay = "overlay:" + dir_ / "upper" + ",passthrough:" + dir_ / "src";
  const std::string policy = kOpen + "[[group.g.mount]]\npath = \"" + dir_ / "scratch" +
                             "\"\nstack = \"memfs:64M\"\nisolated = true\n" + "[[group.g.mount]]\npath = \"" +
                             dir_ / "src" + "\"\nstack = \"" + overlay + "\"\nisolated = true\n";
  auto r = RunInGroup(dir_, policy,
                      "echo hello > " + dir_ / "scratch/note" + " && cat " + dir_ / "scratch/note" + " && echo changed > " +
                          dir_ / "src/file" + " && cat " + dir_ / "src/file",
                      /*limit_s=*/20);
  EXPECT_EQ(r.status, 0) << r.err;  // 137: killed by the test's timeout
  EXPECT_EQ(r.out, "hello\nchanged\n");
  EXPECT_EQ(Output("cat " + dir_ / "upper/file"), "changed\n");
  EXPECT_EQ(Output("pgrep -f -- '__serve-vf[s] .*" + overlay + "' | wc -l"), "0\n");
  // A terminal's ^C: SIGINT to the whole foreground process group. It reaches ulsp
  // and the command, not the servers (in a group of their own), which once died of it
  // and were restarted under the programs' feet.
  const std::string started = dir_ / "started";
  EXPECT_EQ(Shell("cd " + dir_.path() + " && (setsid bash -c 'echo $$ > pgid; exec env ULSP_RUNTIME_DIR=" + dir_ / "run" +
                  " timeout -s KILL 20 " + ULSP_BIN + " run --policy " + dir_ / "policy.toml" + " -- sh -c \"echo hi > " +
                  dir_ / "scratch/x && touch " + started + " && sleep 30\"' 2> err & "
                  "for i in $(seq 200); do test -e " + started + " && break; sleep 0.05; done; "
                  "kill -INT -- -$(cat pgid); wait; exit 0)"),
            0);
  EXPECT_EQ(Shell("test -e " + started), 0) << "the command never ran: the check below would prove nothing";
  EXPECT_EQ(Output("grep -c restarting " + dir_ / "err"), "0\n") << Output("cat " + dir_ / "err");
  Shell("pkill -KILL -f -- '__serve-vf[s] .*" + overlay + "'");  // if a check above failed
}

TEST_F(RunTest, ARootStackGetsProcDevSysAndAPrivateTmp) {
  const std::string policy = kOpen + "private_tmp = true\n[[group.g.mount]]\npath = \"/\"\nstack = \"trace:" + dir_ / "trace.jsonl" +
                             ",passthrough:/\"\n";
  auto r = RunInGroup(dir_, policy,
                      "awk '$5 == \"/\"' /proc/self/mountinfo | grep -c fuse.ulsp; echo x > /dev/null && echo devnull; ls /sys/kernel > /dev/null && echo sys; "
                      "touch /tmp/ulsp-private-987; ls /tmp; /usr/bin/env true && echo env");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "1\ndevnull\nsys\nulsp-private-987\nenv\n");
  EXPECT_NE(Shell("test -e /tmp/ulsp-private-987"), 0);
  // What the command opened went through the stack.
  EXPECT_NE(Output("grep -c '\"path\":\"/usr/bin/env\"' " + dir_ / "trace.jsonl"), "0\n");
}

// A group whose root is an overlay writes to the overlay only, even holding a
// descriptor of the host's file system (its stdout, redirected to a file there). With
// CAP_DAC_READ_SEARCH, open_by_handle_at on that descriptor opened the host's root
// directory (ext4's inode 2), and a file made through it landed on the host ("Shocker").
TEST_F(RunTest, AHostDescriptorIsNoWayPastTheGroupsRootStack) {
  const std::string policy = kOpen + "[[group.g.mount]]\npath = \"/\"\nstack = \"overlay:" + dir_ / "upper" +
                             ",passthrough:/\"\n";
  std::ofstream(dir_ / "handle.py") << R"(
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
root = ctypes.create_string_buffer(struct.pack("Ii", 8, 1) + struct.pack("II", 2, 0))  # FILEID_INO32_GEN: inode 2
fd = libc.open_by_handle_at(1, root, os.O_RDONLY | os.O_DIRECTORY)
if fd < 0:
    print("open_by_handle_at:", os.strerror(ctypes.get_errno()))
else:
    os.close(os.open(sys.argv[1].lstrip("/"), os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    print("made", sys.argv[1], "through the handle")
)";
  auto r = RunInGroup(dir_, policy, "/usr/bin/python3 " + dir_ / "handle.py" + " " + dir_ / "escaped");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "open_by_handle_at: Operation not permitted\n");
  EXPECT_NE(Shell("test -e " + dir_ / "escaped"), 0) << "a file made in the group is on the host";
  // Nor is a standard stream that is a directory: refused before anything runs (once,
  // `< /` gave the group /proc/self/fd/0/..., the host's whole tree).
  r = RunInGroup(dir_, policy, "touch /proc/self/fd/0" + dir_ / "escaped", 60, "< /");
  EXPECT_EQ(r.status, 125);
  EXPECT_EQ(r.err, "ulsp run: stdin is a directory, which would let the group past its mounts: redirect it from a file "
                   "or /dev/null\n");
  EXPECT_NE(Shell("test -e " + dir_ / "escaped"), 0) << "a file made in the group is on the host";
}

// The kernel's settings for the whole host are read-only in a group, with or without
// its own pid namespace or a root stack: root, even without capabilities, once wrote
// kernel.core_pattern ("|PROGRAM" runs PROGRAM as the host's root at the next crash).
// The value written is the one there, so a failure changes nothing. What Docker hides
// (the host's keys by name, its timers, its firmware's tables) is hidden.
TEST_F(RunTest, TheKernelsSettingsAreReadOnly) {
  const std::string root = "[[group.g.mount]]\npath = \"/\"\nstack = \"passthrough:/\"\n";
  for (const std::string& extra : {std::string(), std::string("pid_namespace = false\n"), root}) {
    SCOPED_TRACE(extra);
    auto r = RunInGroup(dir_, kOpen + extra,
                        "p=$(cat /proc/sys/kernel/core_pattern); (echo \"$p\" > /proc/sys/kernel/core_pattern) 2>&1; "
                        "(echo 1 > /proc/sys/vm/drop_caches) 2>&1; (echo > /sys/kernel/profiling) 2>&1; "
                        "test -w /proc/sysrq-trigger && echo sysrq-writable; cat /proc/sys/kernel/ostype; "
                        "cat /proc/keys /proc/timer_list; ls -A /sys/firmware /proc/acpi; echo hidden");
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out,
              "bash: line 1: /proc/sys/kernel/core_pattern: Read-only file system\n"
              "bash: line 1: /proc/sys/vm/drop_caches: Read-only file system\n"
              "bash: line 1: /sys/kernel/profiling: Read-only file system\n"
              "Linux\n/proc/acpi:\n\n/sys/firmware:\nhidden\n");
  }
}

// A group has a /dev of its own, with or without a root stack: the host's held its
// disks (root could open /dev/sda with CAP_DAC_OVERRIDE and write past every stack),
// /dev/kvm, loop devices and consoles. No device node can be made (no CAP_MKNOD),
// and one a stack serves opens nothing (its mount is nodev). Terminals, /dev/shm and
// the usual links work.
TEST_F(RunTest, AGroupHasADevOfItsOwn) {
  // A node in a stack's tree, and one on the host's own tree, which a group without a
  // root stack sees as it is: once, that one opened.
  ASSERT_EQ(Shell("mkdir " + dir_ / "src " + dir_ / "host && mknod " + dir_ / "src/null c 1 3 && mknod " + dir_ / "host/null c 1 3"), 0);
  const std::string src = "[[group.g.mount]]\npath = \"" + dir_ / "src" + "\"\nstack = \"passthrough:" + dir_ / "src" + "\"\n";
  const std::string root = "[[group.g.mount]]\npath = \"/\"\nstack = \"passthrough:/\"\n";
  for (const std::string& extra : {src, root + src}) {
    SCOPED_TRACE(extra);
    auto r = RunInGroup(dir_, kOpen + extra,
                        "ls /dev | tr '\\n' ' '; echo; echo x > /dev/null && echo null; "
                        "(mknod /dev/shm/disk b 8 0) 2>&1; (echo x > " + dir_ / "src/null" + ") 2>&1; (echo x > " +
                            dir_ / "host/null" + ") 2>&1; echo x > /dev/zero && echo zero; "
                        "/usr/bin/python3 -c 'import os, pty; m, s = pty.openpty(); print(os.ttyname(s))'");
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out,
              "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero \nnull\n"
              "mknod: /dev/shm/disk: Operation not permitted\n"
              "bash: line 1: " + dir_ / "src/null" + ": Permission denied\nbash: line 1: " + dir_ / "host/null" +
                  ": Permission denied\nzero\n/dev/pts/0\n");
  }
}

// A mount beneath /tmp in a group with a private /tmp: the private /tmp once went on
// after the group's mounts and hid this one, silently; it also had to exist in the
// host's /tmp. Now the private /tmp comes first, under a root stack's mount too, and
// the mount point is made in it.
TEST_F(RunTest, AMountUnderAPrivateTmpIsMadeInItAndNotHidden) {
  for (const std::string root : {"", "[[group.g.mount]]\npath = \"/\"\nstack = \"passthrough:/\"\n"}) {
    const std::string policy = kOpen + "private_tmp = true\n[[group.g.mount]]\npath = \"/tmp/ulsp-under-tmp-987/deep\"\n" +
                               "stack = \"memfs:1M\"\n" + root;
    auto r = RunInGroup(dir_, policy,
                        "echo y > /tmp/ulsp-under-tmp-987/deep/f && cat /tmp/ulsp-under-tmp-987/deep/f && "
                        "awk '$5 == \"/tmp/ulsp-under-tmp-987/deep\"' /proc/self/mountinfo | grep -c fuse.ulsp");
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out, "y\n1\n") << root;
    EXPECT_NE(Shell("test -e /tmp/ulsp-under-tmp-987"), 0);  // made in the group's /tmp only
  }
  auto r = RunInGroup(dir_, kOpen + "private_tmp = true\n[[group.g.mount]]\npath = \"/tmp\"\nstack = \"memfs:1M\"\n", "true");
  EXPECT_EQ(r.status, 125);
  EXPECT_EQ(r.err, "ulsp run: " + dir_ / "policy.toml" +
                       ":5: mount point /tmp: the group's private_tmp is a fresh /tmp too: drop one of the two\n");
}

// A read-only root (`read_only = true`): the command reads the system as it is, every
// change to it is refused as on any read-only mount, and its private /tmp is writable.
TEST_F(RunTest, AReadOnlyRootRefusesChangesButNotTheGroupsTmp) {
  const std::string policy = kOpen + "private_tmp = true\n[[group.g.mount]]\npath = \"/\"\nstack = \"passthrough:/\"\n" +
                             "read_only = true\n";
  auto r = RunInGroup(dir_, policy,
                      "cat /etc/hostname > /dev/null && echo read; touch /ulsp-ro-987 2>&1 | grep -c 'Read-only file system'; "
                      "touch /tmp/x && echo tmp; "
                      "awk '$5 == \"/\" {print $6}' /proc/self/mountinfo | cut -d, -f1");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "read\n1\ntmp\nro\n");
  EXPECT_NE(Shell("test -e /ulsp-ro-987"), 0);
}

// Without a root stack the group sees the host's own tree, and root in the group
// wrote it: a file made in the host's /etc (or its users' homes) stayed after the
// group. With read_only_host, what it sees of the host's tree refuses changes, while
// its stack, its /dev, its /proc, its private /tmp and its descriptors from outside
// (standard output) take them; with and without a pid namespace.
TEST_F(RunTest, ReadOnlyHostKeepsTheHostsTreeUnchanged) {
  const std::string probe = "/var/tmp/ulsp-ro-host-" + std::to_string(::getpid());  // outside the private /tmp
  auto script = [&](const std::string& stack_dir) {
    return "touch " + probe + " 2>&1 | grep -c 'Read-only file system'; touch /etc/ulsp-ro-host-987 2>&1 | grep -c "
           "'Read-only file system'; echo s > " + stack_dir + "/made && echo stack; echo t > /tmp/t && echo tmp; "
           "echo x > /dev/null && : > /dev/shm/s && echo dev; echo 5 > /proc/self/oom_score_adj && echo proc; "
           "echo 1 > /proc/sys/vm/overcommit_memory 2>/dev/null || echo sysctl-refused";
  };
  ASSERT_EQ(Shell("mkdir " + dir_ / "w"), 0);
  for (const char* pid_ns : {"true", "false"}) {
    const std::string policy = kOpen + "private_tmp = true\nread_only_host = true\npid_namespace = " + pid_ns +
                               "\n[[group.g.mount]]\npath = \"" + dir_ / "w" + "\"\nstack = \"memfs:1M\"\n";
    auto r = RunInGroup(dir_, policy, script(dir_ / "w"));
    EXPECT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out, "1\n1\nstack\ntmp\ndev\nproc\nsysctl-refused\n") << pid_ns << "\n" << r.err;
    EXPECT_NE(Shell("test -e " + probe), 0);
    EXPECT_NE(Shell("test -e /etc/ulsp-ro-host-987"), 0);
  }
  // Without it (the default), as before: the host's tree is the group's to change.
  auto r = RunInGroup(dir_, kOpen, "touch " + probe + " && echo wrote");
  EXPECT_EQ(r.out, "wrote\n") << r.err;
  EXPECT_EQ(Shell("test -e " + probe), 0);
  Shell("rm -f /etc/ulsp-ro-host-987 " + probe);
}

// A group runs as root, and where it writes on the host (an overlay's upper
// directory, a passthrough stack) a set-user-ID program it left gave any host user
// who ran it root's rights: made through the mount, the file on the host was
// root's and mode 4755. Every way to set either set-ID bit is refused (EPERM), in both
// ABIs, and so are file capabilities (no CAP_SETFCAP); the calls that cannot be
// read (fchmodat2, openat2) are ENOSYS, and the C library then takes the others.
// set_id_files = true allows them, as before.
TEST_F(RunTest, NoSetIdFileIsLeftOnTheHost) {
  ASSERT_EQ(Shell("mkdir " + dir_ / "w " + dir_ / "src && echo x > " + dir_ / "src/f && echo 'int main(void){return 0;}' > " +
                  dir_ / "m.c"),
            0);
  // Each way to make a set-ID file, by system call (64-bit, then through int $0x80).
  std::ofstream(dir_ / "setid.c") << R"(#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <linux/capability.h>
#include <setjmp.h>
#include <signal.h>
#include <unistd.h>
static sigjmp_buf no_abi;  /* a kernel without the 32-bit ABI faults on int $0x80 */
static void faulted(int sig) { (void)sig; siglongjmp(no_abi, 1); }
static void say(const char* what, long r) { printf("%s %s\n", what, r < 0 ? strerrorname_np(errno) : "ok"); }
static long int80(long nr, long a, long b, long c) {
  long r;
  __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
  if (r < 0 && r > -4096) { errno = (int)-r; return -1; }
  return r;
}
int main(int argc, char** argv) {
  char p[4096];
  snprintf(p, sizeof p, "%s/f", argv[1]);
  int fd = open(p, O_RDWR);
  say("chmod", chmod(p, 04755));
  say("chmod-g", chmod(p, 02755));
  say("fchmod", fchmod(fd, 04755));
  say("fchmodat", syscall(SYS_fchmodat, AT_FDCWD, p, 04755));
  say("fchmodat2", syscall(452, AT_FDCWD, p, 04755, 0));
  snprintf(p, sizeof p, "%s/new1", argv[1]);
  say("open", open(p, O_CREAT | O_WRONLY, 04755));
  snprintf(p, sizeof p, "%s/new2", argv[1]);
  say("creat", creat(p, 06755));
  snprintf(p, sizeof p, "%s/new3", argv[1]);
  say("mknod", mknod(p, S_IFREG | 04755, 0));
  say("tmpfile", open(argv[1], O_TMPFILE | O_WRONLY, 04755));
  snprintf(p, sizeof p, "%s/f", argv[1]);
  char* path32 = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
  strcpy(path32, "f");  /* the 32-bit ABI takes 32-bit pointers */
  signal(SIGSEGV, faulted);
  if (sigsetjmp(no_abi, 1) != 0) printf("chmod-i386 no-abi\n");
  else if (chdir(argv[1]) == 0) say("chmod-i386", int80(15 /* chmod */, (long)(unsigned long)path32, 04755, 0));
  signal(SIGSEGV, SIG_DFL);
  if (chdir(argv[1]) != 0) return 1;
  say("plain-chmod", chmod(p, 0750));
  say("plain-open", open("plain", O_CREAT | O_WRONLY, 0644));
  struct vfs_cap_data caps = {0};
  caps.magic_etc = VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE;
  caps.data[0].permitted = 1u << CAP_NET_RAW;
  say("setcap", setxattr("plain", "security.capability", &caps, XATTR_CAPS_SZ_2, 0));
  return 0;
}
)";
  ASSERT_EQ(Shell("cc -O1 -o " + dir_ / "setid " + dir_ / "setid.c"), 0);
  // Outside a group first: does this kernel run `int $0x80` at all? Where it faults
  // (some VMs), the 32-bit ABI is no way to a set-ID file either, and says so.
  ASSERT_EQ(Shell("mkdir " + dir_ / "native && echo x > " + dir_ / "native/f"), 0);
  const std::string native = Output(dir_ / "setid " + dir_ / "native");
  ASSERT_NE(native.find("plain-open ok\n"), std::string::npos) << native;
  const bool abi32 = native.find("chmod-i386 no-abi\n") == std::string::npos;
  if (!abi32) std::cout << "this kernel has no 32-bit ABI: int $0x80 faults outside a group too\n";
  const std::string mount = "[[group.g.mount]]\npath = \"" + dir_ / "w" + "\"\nstack = \"passthrough:" + dir_ / "src" + "\"\n";
  auto r = RunInGroup(dir_, kOpen + mount, dir_ / "setid " + dir_ / "w");
  EXPECT_EQ(r.out,
            "chmod EPERM\nchmod-g EPERM\nfchmod EPERM\nfchmodat EPERM\nfchmodat2 ENOSYS\nopen EPERM\ncreat EPERM\n"
            "mknod EPERM\ntmpfile EPERM\nchmod-i386 " + std::string(abi32 ? "EPERM" : "no-abi") +
                "\nplain-chmod ok\nplain-open ok\nsetcap EPERM\n")
      << r.err;
  EXPECT_EQ(Output("find " + dir_ / "src" + " -perm /6000 | wc -l"), "0\n");
  EXPECT_EQ(Output("stat -c %a " + dir_ / "src/f"), "750\n");
  // Allowed by the policy: as natively.
  Shell("rm -f " + dir_ / "src/plain");
  r = RunInGroup(dir_, kOpen + "set_id_files = true\n" + mount, dir_ / "setid " + dir_ / "w");
  EXPECT_NE(r.out.find("chmod ok\n"), std::string::npos) << r.out << r.err;
  EXPECT_NE(r.out.find("open ok\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(abi32 ? "chmod-i386 ok\n" : "chmod-i386 no-abi\n"), std::string::npos) << r.out;
  EXPECT_EQ(Output("stat -c %a " + dir_ / "src/new1"), "4755\n");
}

TEST_F(RunTest, TheWallLimitEndsTheGroup) {
  const auto start = std::chrono::steady_clock::now();
  auto r = RunInGroup(dir_, kOpen + "[group.g.limits]\nwall_seconds = 1\n", "sleep 987654");
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(r.status, 124);
  EXPECT_EQ(r.err, "ulsp run: group g ran past its wall_seconds limit (1 s): killed\n");
  EXPECT_LT(took, std::chrono::seconds(10));
}

// Limits, and what the group may not do. A user namespace of its own (which gives
// every capability inside it) and the keyrings root shares with the host's root
// processes were once open to it (unshare -U; keyctl read the host root's keyring);
// threads and children still work with clone3 refused (glibc falls back to clone).
TEST_F(RunTest, LimitsAndCapabilitiesApplyToTheCommand) {
  auto r = RunInGroup(dir_, kOpen + "[group.g.limits]\nopen_files = 77\nfile_size = \"1M\"\n",
                      "ulimit -n; ulimit -f; mount -t tmpfs none /mnt 2>/dev/null || echo no-mount; "
                      "grep CapBnd /proc/self/status; unshare -n true 2>/dev/null || echo no-unshare; "
                      "unshare -U true 2>/dev/null || echo no-userns; /usr/bin/python3 -c '"
                      "import ctypes, os, threading\n"
                      "libc = ctypes.CDLL(None, use_errno=True)\n"
                      "print(\"keyctl\", libc.syscall(250, 0, -4, 0), os.strerror(ctypes.get_errno()))\n"
                      "t = threading.Thread(target=lambda: print(\"thread\")); t.start(); t.join()'");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "77\n1024\nno-mount\nCapBnd:\t00000000200405fb\nno-unshare\nno-userns\n"
                   "keyctl -1 Operation not permitted\nthread\n");
}

// `processes` bounds everything the command starts, however it starts it: here a
// python that forks (each child waiting) until the kernel refuses, with and without
// a pid namespace. python itself is one of the 10, so it gets 9 children (8 in a
// TSan build, whose runtime may give the group's init a thread after it joined).
// The command cannot leave the cgroup (its cgroup mounts are read-only), and the
// cgroup goes with the group.
TEST_F(RunTest, TheProcessLimitBoundsEverythingTheCommandStarts) {
  const std::string fork_until_refused =
      "import errno, os, signal\n"
      "kids, err = [], 0\n"
      "while len(kids) < 50:\n"
      "    try:\n"
      "        pid = os.fork()\n"
      "    except OSError as e:\n"
      "        err = e.errno\n"
      "        break\n"
      "    if pid == 0:\n"
      "        signal.pause()\n"
      "        os._exit(0)\n"
      "    kids.append(pid)\n"
      "print(len(kids), errno.errorcode.get(err, err))\n"
      "for k in kids: os.kill(k, 9)\n"
      "for k in kids: os.waitpid(k, 0)\n";
  for (const std::string pid_namespace : {"true", "false"}) {
    SCOPED_TRACE("pid_namespace = " + pid_namespace);
    std::ofstream(dir_ / "fork.py") << fork_until_refused;
    auto r = RunInGroup(dir_, kOpen + "pid_namespace = " + pid_namespace + "\n[group.g.limits]\nprocesses = 10\n",
                        "(echo $BASHPID > /sys/fs/cgroup/pids/cgroup.procs) 2>&1 | grep -c 'Read-only file system'; "
                        "exec /usr/bin/python3 " + dir_ / "fork.py");
    EXPECT_EQ(r.status, 0) << r.err;
    std::istringstream out(r.out);
    int refused_escape = 0, children = 0;
    std::string why;
    out >> refused_escape >> children >> why;
    EXPECT_EQ(refused_escape, 1) << r.out;
    EXPECT_GE(children, 8) << r.out;
    EXPECT_LE(children, 9) << r.out;
    EXPECT_EQ(why, "EAGAIN") << r.out;
    EXPECT_EQ(Output("ls -d /sys/fs/cgroup/pids/ulsp-g-* 2>/dev/null | wc -l"), "0\n");
  }
  // Without the limit nothing stops it at 10.
  auto r = RunInGroup(dir_, kOpen, "exec /usr/bin/python3 " + dir_ / "fork.py");
  EXPECT_EQ(r.out, "50 0\n") << r.err;
}

// `group_memory` bounds the group's processes together, where `memory` (RLIMIT_AS)
// bounds each alone: two pythons of 40 MB each fit under 64M one at a time, not both.
// (No `memory` here: an AddressSanitizer build's group init cannot run under an
// RLIMIT_AS of a few GB, its shadow memory being reserved address space.)
// The kernel's OOM killer ends one (SIGKILL: 137 as bash reports it), the other goes
// on, and ulsp says what happened. Without the limit both finish.
TEST_F(RunTest, TheGroupMemoryLimitBoundsItsProcessesTogether) {
  const std::string two =
      "/usr/bin/python3 -c 'import time; b = b\"x\" * (40 << 20); time.sleep(2)' & first=$!; "
      "/usr/bin/python3 -c 'import time; time.sleep(0.5); b = b\"x\" * (40 << 20); time.sleep(0.5)'; second=$?; "
      "wait $first; echo $? $second";
  auto r = RunInGroup(dir_, kOpen + "[group.g.limits]\ngroup_memory = \"64M\"\n", two);
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(r.out == "137 0\n" || r.out == "0 137\n") << r.out << r.err;
  EXPECT_NE(r.err.find("ulsp run: group g reached its group_memory limit (64M): the kernel's OOM killer ended 1 of its processes\n"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(Output("ls -d /sys/fs/cgroup/*/ulsp-g-* /sys/fs/cgroup/*/*/*/ulsp-g-* 2>/dev/null | wc -l"), "0\n");
  r = RunInGroup(dir_, kOpen, two);
  EXPECT_EQ(r.out, "0 0\n") << r.err;
}

// A limit the machine cannot enforce is an error before anything runs, not a group
// without it. Here the pids hierarchy is unmounted in a mount namespace of ulsp's own.
TEST_F(RunTest, AProcessLimitWithoutThePidsControllerIsRefused) {
  auto r = RunInGroup(dir_, kOpen + "[group.g.limits]\nprocesses = 10\n", "touch " + dir_ / "ran", 60, "",
                      "unshare -m sh -c 'umount /sys/fs/cgroup/pids && exec \"$0\" \"$@\"' ");
  EXPECT_EQ(r.status, 125);
  EXPECT_EQ(r.err.rfind("ulsp run: " + dir_ / "policy.toml" + ":4: limit processes = 10: no cgroup pids controller", 0), 0u) << r.err;
  EXPECT_NE(Shell("test -e " + dir_ / "ran"), 0);
}

// Without CAP_SYS_RESOURCE (some containers' root), a limit above the hard limit
// cannot be set: the group gets the hard limit and the user a warning that says so,
// rather than no group at all. prlimit sets the hard limit; setpriv takes the
// capability from `ulsp run`.
TEST_F(RunTest, ALimitAboveAHardLimitThatCannotBeRaisedBecomesIt) {
  auto r = RunInGroup(dir_, kOpen + "[group.g.limits]\nopen_files = 3000\n", "ulimit -n", 60, "",
                      "prlimit --nofile=1000:2000 setpriv --inh-caps -sys_resource --bounding-set -sys_resource ");
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "2000\n");
  EXPECT_EQ(r.err,
            "ulsp run: limit open_files = 3000 is above the hard limit 2000, which this process may not raise (it lacks "
            "CAP_SYS_RESOURCE): the group gets 2000\n");
}

// A usage error is ulsp's own failure: 125 and one line, never a status that could
// be the command's (CLI11's own codes were 106 and 109).
TEST_F(RunTest, AUsageErrorExits125WithOneLine) {
  EXPECT_EQ(Shell(std::string(ULSP_BIN) + " run -- true 2> " + dir_ / "err"), 125);
  EXPECT_EQ(Output("cat " + dir_ / "err"), "ulsp run: --policy is required (see ulsp run --help)\n");
  EXPECT_EQ(Shell(std::string(ULSP_BIN) + " run --policy " + dir_ / "p.toml 2> " + dir_ / "err"), 125);
  EXPECT_EQ(Output("cat " + dir_ / "err"), "ulsp run: COMMAND is required (see ulsp run --help)\n");
  EXPECT_EQ(Shell(std::string(ULSP_BIN) + " frobnicate 2> " + dir_ / "err"), 2);
  EXPECT_EQ(Output("cat " + dir_ / "err"), "ulsp: The following argument was not expected: frobnicate (see ulsp --help)\n");
  // No subcommand at all: the help, on stderr, and 2 (it was 0, on stdout).
  EXPECT_EQ(Shell(std::string(ULSP_BIN) + " > " + dir_ / "out 2> " + dir_ / "err"), 2);
  EXPECT_EQ(Output("cat " + dir_ / "out"), "");
  EXPECT_NE(Output("cat " + dir_ / "err").find("Subcommands:"), std::string::npos) << Output("cat " + dir_ / "err");
}

TEST_F(RunTest, SignalsReachTheCommand) {
  std::ofstream(dir_ / "p.toml") << kOpen;
  const std::string cmd = "ULSP_RUNTIME_DIR=" + dir_ / "run" + " " + ULSP_BIN + " run --policy " + dir_ / "p.toml" +
                          " -- bash -c 'trap \"echo got TERM; exit 3\" TERM; echo ready; sleep 987654 & wait' > " + dir_ / "out" +
                          " & pid=$!; for i in $(seq 100); do grep -q ready " + dir_ / "out" +
                          " && break; sleep 0.05; done; kill -TERM $pid; wait $pid";
  EXPECT_EQ(Shell(cmd), 3);
  EXPECT_EQ(Output("cat " + dir_ / "out"), "ready\ngot TERM\n");
}

TEST_F(RunTest, PsShowsTheGroupWhileItLives) {
  // The mount covers the directory that holds the policy and the registry: the group
  // still gets its resolv.conf (opened before the mounts are made).
  std::ofstream(dir_ / "p.toml") << kOpen << "[[group.g.mount]]\npath = \"" + dir_.path() + "\"\nstack = \"memfs:1M\"\n"
                                 << "[group.g.limits]\nprocesses = 50\n";
  const std::string env = "ULSP_RUNTIME_DIR=" + dir_ / "run" + " ";
  ASSERT_EQ(Shell(env + ULSP_BIN + " run --policy " + dir_ / "p.toml" + " -- sleep 3 & echo $! > " + dir_ / "pid"), 0);
  nlohmann::json ps;
  for (int i = 0; i < 100; ++i) {
    ps = nlohmann::json::parse(Output(env + ULSP_BIN + " ps --json"));
    if (!ps.empty()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(ps.size(), 1u);
  EXPECT_EQ(ps[0]["kind"], "run");
  EXPECT_EQ(ps[0]["command"], "sleep 3");
  ASSERT_EQ(ps[0]["groups"].size(), 1u);
  EXPECT_EQ(ps[0]["groups"][0]["name"], "g");
  EXPECT_GT(ps[0]["groups"][0]["init_pid"].get<int>(), 0);
  EXPECT_EQ(ps[0]["groups"][0]["processes"], 1);  // sleep
  EXPECT_EQ(ps[0]["groups"][0]["processes_max"], 50);
  ASSERT_EQ(ps[0]["mounts"].size(), 1u);
  EXPECT_EQ(ps[0]["mounts"][0]["stack"], "memfs:1M");
  EXPECT_GE(ps[0]["ports"].size(), 2u);  // the mount's and the net ULSP's
  const std::string table = Output(env + ULSP_BIN + " ps");
  EXPECT_NE(table.find("GROUPS"), std::string::npos) << table;
  EXPECT_NE(table.find("memfs:1M"), std::string::npos) << table;
  EXPECT_NE(table.find(" 1/50 "), std::string::npos) << table;
  EXPECT_EQ(Shell("wait $(cat " + dir_ / "pid" + ") 2>/dev/null; while kill -0 $(cat " + dir_ / "pid" + ") 2>/dev/null; do sleep 0.1; done"), 0);
  EXPECT_EQ(Output(env + ULSP_BIN + " ps --json"), "[]\n");
}

// A supervisor killed with SIGKILL cannot remove its entry in the runtime directory
// nor its group's cgroup; the next ulsp process to start does (as `ulsp ps` does the
// entry), so none stays behind. Once, the cgroup `ulsp-g-PID` stayed for good.
TEST_F(RunTest, WhatAKilledSupervisorLeftIsClearedByTheNextOne) {
  std::ofstream(dir_ / "p.toml") << kOpen << "[group.g.limits]\nprocesses = 50\n";
  auto parent = core::GroupCgroup::ParentCgroup("pids");
  ASSERT_TRUE(parent.has_value()) << parent.error();
  const std::string env = "ULSP_RUNTIME_DIR=" + dir_ / "run" + " ";
  ASSERT_EQ(Shell(env + ULSP_BIN + " run --policy " + dir_ / "p.toml" + " -- sleep 30 & echo $! > " + dir_ / "pid"), 0);
  std::string pid = Output("cat " + dir_ / "pid");
  pid.erase(pid.find_last_not_of('\n') + 1);
  for (int i = 0; i < 200 && !std::filesystem::exists(dir_ / "run/" + pid + "/control"); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  ASSERT_TRUE(std::filesystem::exists(dir_ / "run/" + pid + "/control"));
  ASSERT_EQ(Shell("kill -9 " + pid + "; while kill -0 " + pid + " 2>/dev/null; do sleep 0.05; done"), 0);
  ASSERT_TRUE(std::filesystem::exists(dir_ / "run/" + pid));  // left behind
  const std::string cgroup = *parent + "/ulsp-g-" + pid;
  EXPECT_TRUE(std::filesystem::exists(cgroup));  // left behind
  EXPECT_EQ(Shell(env + ULSP_BIN + " run --policy " + dir_ / "p.toml" + " -- true"), 0);
  EXPECT_FALSE(std::filesystem::exists(dir_ / "run/" + pid));
  EXPECT_FALSE(std::filesystem::exists(cgroup));
  ::rmdir(cgroup.c_str());  // if the check above failed
}

TEST_F(RunTest, ABadPolicyIsRefusedBeforeAnythingRuns) {
  auto r = RunInGroup(dir_, "[group.g]\n[[group.g.net]]\naction = \"allow\"\nto = \"10.0.0.0/99\"\n", "touch " + dir_ / "ran");
  EXPECT_EQ(r.status, 125);
  EXPECT_EQ(r.err, "ulsp run: " + dir_ / "policy.toml" + ":4: '10.0.0.0/99': the prefix length must be 0 to 32\n");
  EXPECT_NE(Shell("test -e " + dir_ / "ran"), 0);
  r = RunInGroup(dir_, "[group.a]\n[group.b]\n", "true");
  EXPECT_EQ(r.status, 125);
  EXPECT_EQ(r.err, "ulsp run: " + dir_ / "policy.toml" + ": holds 2 groups (a, b): say which with --group NAME\n");
  r = RunInGroup(dir_, kOpen + "[[group.g.mount]]\npath = \"/nonexistent-mount-point\"\nstack = \"memfs:1M\"\n", "touch " + dir_ / "ran");
  EXPECT_EQ(r.status, 125);
  EXPECT_EQ(r.err, "ulsp run: " + dir_ / "policy.toml" + ":4: mount point /nonexistent-mount-point does not exist (ulsp makes no mount points: make it first)\n");
  EXPECT_NE(Shell("test -e " + dir_ / "ran"), 0);
  // A connection log at a path another user controls: their link would have root
  // append to whatever it names.
  const std::string link = dir_ / "their-link", precious = dir_ / "precious";
  ASSERT_EQ(Shell("echo keep > " + precious + " && ln -s " + precious + " " + link + " && chown -h 65534 " + link), 0);
  r = RunInGroup(dir_, "[group.g]\nlog = \"" + link + "\"\n", "touch " + dir_ / "ran");
  EXPECT_EQ(r.status, 125);
  EXPECT_EQ(r.err, "ulsp run: the connection log " + link +
                       ": a symbolic link owned by uid 65534, neither yours, root's nor its directory owner's: "
                       "refusing to use what another user controls\n");
  EXPECT_NE(Shell("test -e " + dir_ / "ran"), 0);
  EXPECT_EQ(Output("cat " + precious), "keep\n");
}

TEST_F(RunTest, PolicyCheckSaysWhatIsWrongOrOk) {
  std::ofstream(dir_ / "good.toml") << kOpen;
  std::ofstream(dir_ / "bad.toml") << "[group.g]\nloopback = \"yes\"\n";
  EXPECT_EQ(Output(std::string(ULSP_BIN) + " policy check " + dir_ / "good.toml" + " 2>&1"),
            dir_ / "good.toml" + ": ok: g (0 mounts, 0 net rules, net_default allow)\n");
  std::ofstream(dir_ / "one.toml") << "[group.g]\n[[group.g.mount]]\npath = \"/mnt\"\nstack = \"memfs:1M\"\n"
                                     << "[[group.g.net]]\naction = \"allow\"\nto = \"127.0.0.1/32\"\n";
  EXPECT_EQ(Output(std::string(ULSP_BIN) + " policy check " + dir_ / "one.toml" + " 2>&1"),
            dir_ / "one.toml" + ": ok: g (1 mount, 1 net rule, net_default deny)\n");
  EXPECT_EQ(Shell(std::string(ULSP_BIN) + " policy check " + dir_ / "bad.toml" + " 2> " + dir_ / "err"), 1);
  EXPECT_EQ(Output("cat " + dir_ / "err"),
            "ulsp policy check: " + dir_ / "bad.toml" + ":2: loopback must be \"group\" or \"host\", not \"yes\"\n");
  // An answer that cannot be written (a full disk) is not a success: it once was, with
  // nothing said. `ulsp ps` and --version likewise.
  for (const std::string& command : {"policy check " + dir_ / "good.toml", std::string("ps"), std::string("--version")}) {
    EXPECT_EQ(Shell(std::string(ULSP_BIN) + " " + command + " > /dev/full 2> " + dir_ / "err"), 1) << command;
    EXPECT_EQ(Output("cat " + dir_ / "err"), "ulsp: cannot write to standard output: No space left on device\n") << command;
  }
}

}  // namespace
}  // namespace ulsp::testing
