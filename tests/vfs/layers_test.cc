// Unit tests of the layers without a mount: stack specs, the view's rules, trace's
// JSON, and passthrough's node table driven with requests directly.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <seccomp.h>
#include <linux/fs.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "tests/vfs/mount_fixture.h"
#include "ulsp/vfs/passthrough.h"
#include "ulsp/vfs/stack.h"
#include "ulsp/vfs/trace.h"
#include "ulsp/vfs/view.h"

namespace ulsp::vfs {
namespace {

TEST(StackSpec, ParsesLayersTopFirst) {
  auto s = ParseStackSpec("trace:/t.jsonl,view:/a.txt,passthrough:/src");
  ASSERT_TRUE(s) << s.error();
  ASSERT_EQ(s->size(), 3u);
  EXPECT_EQ((*s)[0].name, "trace");
  EXPECT_EQ((*s)[0].argument, "/t.jsonl");
  EXPECT_EQ((*s)[2].name, "passthrough");
  EXPECT_EQ((*s)[2].argument, "/src");
}

TEST(StackSpec, PathsAreMadeAbsoluteAndNormal) {
  EXPECT_EQ(AbsoluteStackSpec("trace:/t/./x.jsonl,overlay:/up/,passthrough:/src/dir/..").value(),
            "trace:/t/x.jsonl,overlay:/up,passthrough:/src");
  EXPECT_EQ(AbsoluteStackSpec("passthrough:/src/..").value(), "passthrough:/");
  EXPECT_EQ(AbsoluteStackSpec("memfs:1M").value(), "memfs:1M");
}

// A directory's name may hold a comma: escaped with a backslash in a stack, and
// escaped when a stack is composed from paths (`ulsp mount SOURCE MOUNTPOINT`, a
// policy's resolved paths). `ulsp mount /srv/a,b /mnt` once failed with "unknown
// layer 'b'", and no stack could name such a directory.
TEST(StackSpec, ACommaOrABackslashInAPathIsEscaped) {
  auto s = ParseStackSpec(R"(trace:/t\,1.jsonl,passthrough:/srv/a\,b\\c)");
  ASSERT_TRUE(s) << s.error();
  ASSERT_EQ(s->size(), 2u);
  EXPECT_EQ((*s)[0].argument, "/t,1.jsonl");
  EXPECT_EQ((*s)[1].argument, R"(/srv/a,b\c)");
  EXPECT_EQ(ComposeStackSpec(*s), R"(trace:/t\,1.jsonl,passthrough:/srv/a\,b\\c)");
  EXPECT_EQ(AbsoluteStackSpec(ComposeStackSpec({{"passthrough", "/srv/x,y/./z"}})).value(), R"(passthrough:/srv/x\,y/z)");
  EXPECT_EQ(ParseStackSpec(R"(passthrough:/a\)").error(), R"(a '\' at the end of the stack escapes nothing)");
}

TEST(StackSpec, RefusesWhatIsWrongByName) {
  EXPECT_EQ(ParseStackSpec("").error(), "empty stack: give layers, top first, e.g. trace:/tmp/t.jsonl,passthrough:/src");
  EXPECT_EQ(ParseStackSpec("passthrough").error(),
            "layer 'passthrough' needs an argument (passthrough:DIR, memfs:SIZE, overlay:UPPERDIR, trace:LOG, view:ALLOWLIST)");
  EXPECT_EQ(ParseStackSpec("passthrough:/a,trace:/t").error(),
            "layer 'passthrough' must be the last (bottom) layer of the stack");
  EXPECT_EQ(ParseStackSpec("view:/a").error(), "layer 'view' needs a layer below it: end the stack with passthrough:DIR or memfs:SIZE");
  EXPECT_EQ(ParseStackSpec("passthrough:/a,").error(), "empty layer at position 2 of the stack");
}

TEST(View, AdmitsListedPathsTheirSubtreesAndAncestors) {
  auto v = ViewLayer::FromPaths({"/usr/lib/x", "  /etc/hosts  # comment", "# only a comment", "", "//opt//a/"}, "list",
                                nullptr);
  ASSERT_TRUE(v) << v.error();
  for (auto p : {"/", "/usr", "/usr/lib", "/usr/lib/x", "/usr/lib/x/y/z", "/etc", "/etc/hosts", "/opt/a", "/opt/a/b"})
    EXPECT_TRUE((*v)->Visible(p)) << p;
  for (auto p : {"/usr/bin", "/usr/lib/xy", "/usr/lib/y", "/etc/passwd", "/var", "/opt/b", "/etc/hosts2"})
    EXPECT_FALSE((*v)->Visible(p)) << p;
}

TEST(View, RefusesBadLinesWithFileAndLine) {
  EXPECT_EQ(ViewLayer::FromPaths({"/a", "b"}, "allow.txt", nullptr).error(),
            "allow.txt:2: 'b' is not an absolute path without '.' or '..' components");
  EXPECT_EQ(ViewLayer::FromPaths({"/a/../etc"}, "allow.txt", nullptr).error(),
            "allow.txt:1: '/a/../etc' is not an absolute path without '.' or '..' components");
}

TEST(Trace, QuotesEveryByteAsValidJson) {
  EXPECT_EQ(JsonQuote("plain/name.txt"), "\"plain/name.txt\"");
  EXPECT_EQ(JsonQuote("a\"b\\c"), "\"a\\\"b\\\\c\"");
  EXPECT_EQ(JsonQuote(std::string("\n\x01\xff", 3)), "\"\\u000a\\u0001\\u00ff\"");
  // UTF-8 is kept, so a JSON reader gets the name back; a byte that is not part of
  // UTF-8 (a Latin-1 name, a cut sequence, an overlong form, a surrogate) is \u00XX.
  EXPECT_EQ(JsonQuote("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"), "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"");
  EXPECT_EQ(JsonQuote("caf\xe9"), "\"caf\\u00e9\"");
  EXPECT_EQ(JsonQuote("\xc3"), "\"\\u00c3\"");
  EXPECT_EQ(JsonQuote("\xe2\x82x"), "\"\\u00e2\\u0082x\"");
  EXPECT_EQ(JsonQuote("\xc0\xaf"), "\"\\u00c0\\u00af\"");
  EXPECT_EQ(JsonQuote("\xed\xa0\x80"), "\"\\u00ed\\u00a0\\u0080\"");
  EXPECT_EQ(JsonQuote("\xf4\x90\x80\x80"), "\"\\u00f4\\u0090\\u0080\\u0080\"");
  EXPECT_EQ(nlohmann::json::parse(JsonQuote("\xd0\xb4\xd0\xb0\x7f")).get<std::string>(), "\xd0\xb4\xd0\xb0\x7f");
}

// Runs `body` in a forked child, which passes if it exits 0 (a body ends with
// ::_exit; one that returns exits 0). A child that fails says why on stderr.
::testing::AssertionResult InChild(const std::function<void()>& body) {
  const pid_t child = ::fork();
  if (child < 0) return ::testing::AssertionFailure() << "fork: " << std::strerror(errno);
  if (child == 0) {
    body();
    ::_exit(0);
  }
  int status = 0;
  if (::waitpid(child, &status, 0) != child) return ::testing::AssertionFailure() << "waitpid: " << std::strerror(errno);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "the child failed (its line on stderr says why); status " << status;
}

// The node `name` in `parent` names in `layer` (a lookup it counts), or 0 with the
// errno in `*err`.
uint64_t LookupIn(Layer& layer, uint64_t parent, const std::string& name, int* err = nullptr) {
  VfsRequest r;
  r.op = VfsOp::kLookup;
  r.node = parent;
  r.name = name;
  const int e = layer.Serve(r);
  if (err != nullptr) *err = e;
  return e == 0 ? r.entry.ino : 0;
}

// Drives passthrough with requests as the shim would make them.
class PassthroughTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(testing::Shell("mkdir -p " + dir_ / "root/d && echo data > " + dir_ / "root/d/f && ln -s /etc/passwd " +
                             dir_ / "root/escape"),
              0);
    auto p = PassthroughLayer::Open(dir_ / "root");
    ASSERT_TRUE(p);
    layer_ = std::move(*p);
  }
  uint64_t Lookup(uint64_t parent, const std::string& name, int* err = nullptr) {
    return LookupIn(*layer_, parent, name, err);
  }
  void Forget(uint64_t node, uint64_t n) {
    VfsRequest r;
    r.op = VfsOp::kForget;
    r.node = node;
    r.count = n;
    EXPECT_EQ(layer_->Serve(r), 0);
  }
  testing::TempDir dir_;
  std::unique_ptr<PassthroughLayer> layer_;
};

TEST_F(PassthroughTest, LookupCountsFollowTheKernelsAndForgetDropsNodes) {
  EXPECT_EQ(layer_->NodeCount(), 1u);  // the root
  const uint64_t d = Lookup(kRootNode, "d");
  const uint64_t f = Lookup(d, "f");
  ASSERT_NE(f, 0u);
  EXPECT_EQ(Lookup(d, "f"), f);  // the same inode is the same node
  EXPECT_EQ(layer_->NodeCount(), 3u);
  EXPECT_EQ(layer_->PathOf(f), "/d/f");
  Forget(f, 1);
  EXPECT_EQ(layer_->NodeCount(), 3u);  // one lookup still held
  Forget(f, 1);
  EXPECT_EQ(layer_->NodeCount(), 2u);
  // A forgotten id is stale even when its slot is reused.
  VfsRequest r;
  r.op = VfsOp::kGetAttr;
  r.node = f;
  EXPECT_EQ(layer_->Serve(r), ESTALE);
  const uint64_t again = Lookup(d, "f");
  EXPECT_NE(again, f);
  EXPECT_EQ(again & 0xffffffffu, f & 0xffffffffu);  // same slot, new generation
}

TEST_F(PassthroughTest, NeverLeavesItsRoot) {
  int err = 0;
  EXPECT_EQ(Lookup(kRootNode, "..", &err), kRootNode);  // ".." of the root is the root
  EXPECT_EQ(Lookup(kRootNode, "d/f", &err), 0u);
  EXPECT_EQ(err, EINVAL);
  // A symlink is a node of its own, never followed by the server.
  const uint64_t link = Lookup(kRootNode, "escape");
  VfsRequest r;
  r.op = VfsOp::kGetAttr;
  r.node = link;
  ASSERT_EQ(layer_->Serve(r), 0);
  EXPECT_TRUE(S_ISLNK(r.out_attr.st_mode));
  VfsRequest o;
  o.op = VfsOp::kOpen;
  o.node = link;
  o.flags = O_RDONLY;
  EXPECT_EQ(layer_->Serve(o), ELOOP);  // opening the link itself, as O_NOFOLLOW would
}

// chattr and lsattr reach the file below; no other ioctl does, and none reaches a
// device, a FIFO or a symlink (a peer of a translation agent can send any command of
// any node: the agent, root, would make the ioctl of its own device).
TEST_F(PassthroughTest, ServesOnlyTheInodeFlagsIoctlsAndNeverOfADevice) {
  ASSERT_EQ(testing::Shell("mknod " + dir_ / "root/null c 1 3 && mkfifo " + dir_ / "root/fifo"), 0);
  auto ioctl = [&](uint64_t node, uint64_t cmd, std::vector<char> in, uint64_t size, std::vector<char>* out = nullptr) {
    VfsRequest r;
    r.op = VfsOp::kIoctl;
    r.node = node;
    r.count = cmd;
    r.in = in;
    r.size = size;
    const int err = layer_->Serve(r);
    if (out != nullptr) *out = r.out;
    return err;
  };
  const uint64_t f = Lookup(Lookup(kRootNode, "d"), "f");
  int flags = FS_NODUMP_FL;
  std::vector<char> set(reinterpret_cast<char*>(&flags), reinterpret_cast<char*>(&flags) + sizeof flags);
  ASSERT_EQ(ioctl(f, FS_IOC_SETFLAGS, set, 0), 0);
  std::vector<char> got;
  ASSERT_EQ(ioctl(f, FS_IOC_GETFLAGS, {}, sizeof(int), &got), 0);
  ASSERT_EQ(got.size(), sizeof(int));
  std::memcpy(&flags, got.data(), sizeof flags);
  EXPECT_TRUE(flags & FS_NODUMP_FL);
  EXPECT_EQ(testing::Output("lsattr " + dir_ / "root/d/f").substr(0, 7), "------d");
  ASSERT_EQ(ioctl(kRootNode, FS_IOC_FSGETXATTR, {}, sizeof(fsxattr), &got), 0);  // a directory's
  EXPECT_EQ(got.size(), sizeof(fsxattr));
  EXPECT_EQ(ioctl(f, TCGETS, {}, sizeof(termios)), ENOTTY);
  EXPECT_EQ(ioctl(f, FS_IOC_GETFLAGS, {}, 64), ENOTTY);  // not the argument's size
  EXPECT_EQ(ioctl(f, FS_IOC_SETFLAGS, {'x'}, 0), ENOTTY);
  // Opening a device may be harm enough (a watchdog's, a tape's): the layer opens
  // neither the device nor the FIFO, as inotify would see.
  const UniqueFd watch(::inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
  ASSERT_TRUE(watch.valid());
  ASSERT_GE(::inotify_add_watch(watch.get(), (dir_ / "root").c_str(), IN_OPEN), 0);
  for (const char* name : {"null", "fifo", "escape"}) {
    SCOPED_TRACE(name);
    EXPECT_EQ(ioctl(Lookup(kRootNode, name), FS_IOC_GETFLAGS, {}, sizeof(int)), ENOTTY);
  }
  alignas(inotify_event) char events[4096];
  const ssize_t n = ::read(watch.get(), events, sizeof events);
  EXPECT_EQ(n, -1) << "the first opened: " << (n > 0 ? reinterpret_cast<inotify_event*>(events)->name : "");
}

// O_TMPFILE: the file has a node (its inode's) and no path until a link names it;
// a view makes one only in a directory below an admitted path.
TEST_F(PassthroughTest, AnUnnamedFileIsANodeUntilForgottenAndAViewAdmitsIt) {
  auto tmpfile = [](Layer& layer, uint64_t dir, VfsRequest& r) {
    r = VfsRequest{};
    r.op = VfsOp::kCreate;
    r.node = dir;
    r.flags = O_TMPFILE | O_RDWR;
    r.mode = 0600;
    return layer.Serve(r);
  };
  const uint64_t d = Lookup(kRootNode, "d");
  VfsRequest t;
  ASSERT_EQ(tmpfile(*layer_, d, t), 0);
  ::close(static_cast<int>(t.open.fh));
  EXPECT_EQ(t.entry.attr.st_nlink, 0u);
  EXPECT_EQ(layer_->NodeCount(), 3u);  // the root, d and the unnamed file
  EXPECT_EQ(layer_->PathOf(t.entry.ino), "");
  EXPECT_EQ(testing::Shell("ls " + dir_ / "root/d | grep -vx f"), 1);  // nothing new listed
  VfsRequest l;
  l.op = VfsOp::kLink;
  l.node = t.entry.ino;
  l.node2 = d;
  l.name2 = "named";
  ASSERT_EQ(layer_->Serve(l), 0);
  EXPECT_EQ(l.entry.ino, t.entry.ino);
  EXPECT_EQ(layer_->PathOf(t.entry.ino), "/d/named");
  Forget(t.entry.ino, 2);
  EXPECT_EQ(layer_->NodeCount(), 2u);

  std::unique_ptr<Layer> lower = std::move(layer_);
  auto view = ViewLayer::FromPaths({"/d"}, "list", std::move(lower));
  ASSERT_TRUE(view) << view.error();
  VfsRequest r;
  EXPECT_EQ(tmpfile(**view, kRootNode, r), EACCES);  // "/" is only on the way to /d
  ASSERT_EQ(tmpfile(**view, d, r), 0);
  ::close(static_cast<int>(r.open.fh));
}

// Adopt (a restarted isolated server's way back to a file no name finds): the open
// file's descriptor becomes a node with no name, which serves as any other; a file
// that a name leads to too is that name's node, and keeps its path.
TEST_F(PassthroughTest, AnOpenFileIsAdoptedByItsDescriptor) {
  auto adopt = [this](int fd, VfsRequest& r) {
    r = VfsRequest{};
    r.op = VfsOp::kAdopt;
    r.in_fd = fd;
    return layer_->Serve(r);
  };
  VfsRequest r;
  EXPECT_EQ(adopt(-1, r), EBADF);
  const UniqueFd gone(::open((dir_ / "root/d/gone").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  ASSERT_TRUE(gone);
  ASSERT_EQ(::write(gone.get(), "12345", 5), 5);
  ASSERT_EQ(::unlink((dir_ / "root/d/gone").c_str()), 0);
  ASSERT_EQ(adopt(gone.get(), r), 0);
  const uint64_t node = r.entry.ino;
  EXPECT_EQ(r.entry.attr.st_size, 5);
  EXPECT_EQ(r.entry.attr.st_nlink, 0u);
  EXPECT_EQ(layer_->PathOf(node), "");
  VfsRequest s;
  s.op = VfsOp::kSetAttr;
  s.node = node;
  s.flags = FUSE_SET_ATTR_SIZE;
  s.attr.st_size = 2;
  ASSERT_EQ(layer_->Serve(s), 0);
  EXPECT_EQ(s.out_attr.st_size, 2);
  Forget(node, 1);
  EXPECT_EQ(layer_->NodeCount(), 1u);

  const uint64_t f = Lookup(Lookup(kRootNode, "d"), "f");
  const UniqueFd named(::open((dir_ / "root/d/f").c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_EQ(adopt(named.get(), r), 0);
  EXPECT_EQ(r.entry.ino, f);
  EXPECT_EQ(layer_->PathOf(f), "/d/f");
}

// Lend (an isolated mount's relay, before an open file may lose its last name): the
// descriptor the open file's handle reads by, given even when the kernel was not to
// read the file itself (no kernel_io_ok), for the relay to keep.
TEST_F(PassthroughTest, AnOpenFileLendsItsDescriptor) {
  const uint64_t f = Lookup(Lookup(kRootNode, "d"), "f");
  VfsRequest o;
  o.op = VfsOp::kOpen;
  o.node = f;
  o.flags = O_RDONLY;
  ASSERT_EQ(layer_->Serve(o), 0);
  EXPECT_EQ(o.open.backing_fd, -1);  // not asked for kernel passthrough
  VfsRequest l;
  l.op = VfsOp::kLend;
  l.node = f;
  l.fh = o.open.fh;
  ASSERT_EQ(layer_->Serve(l), 0);
  ASSERT_GE(l.open.backing_fd, 0);
  struct stat lent {}, file {};
  ASSERT_EQ(::fstat(l.open.backing_fd, &lent), 0);
  ASSERT_EQ(::stat((dir_ / "root/d/f").c_str(), &file), 0);
  EXPECT_EQ(lent.st_ino, file.st_ino);
  EXPECT_EQ(lent.st_dev, file.st_dev);
  // Not a file's handle (a directory's descriptor here): nothing is lent.
  const UniqueFd dir(::open(dir_.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  ASSERT_TRUE(dir);
  VfsRequest d;
  d.op = VfsOp::kLend;
  d.node = f;
  d.fh = static_cast<uint64_t>(dir.get());
  EXPECT_EQ(layer_->Serve(d), EBADF);
  VfsRequest c;
  c.op = VfsOp::kRelease;
  c.node = f;
  c.fh = o.open.fh;
  EXPECT_EQ(layer_->Serve(c), 0);
  Forget(f, 1);
}

// An overlay on passthrough: `dir` holds up/ and low/, and low/l says "low".
class OverlayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(testing::Shell("mkdir " + dir / "up " + dir / "low && echo low > " + dir / "low/l"), 0);
    auto top = BuildStack("overlay:" + dir / "up,passthrough:" + dir / "low");
    ASSERT_TRUE(top) << top.error();
    top_ = std::move(*top);
  }
  uint64_t Lookup(const std::string& name, int* err = nullptr) { return LookupIn(*top_, kRootNode, name, err); }
  testing::TempDir dir;
  std::unique_ptr<Layer> top_;
};

// Lend and adopt through an overlay: a file's descriptor is lent with a tag that says
// its side, and adopted it is a node of that side again: an upper file the same node
// while the overlay knows it, with its path; a lower file one with no name, which a
// change copies up as a file of no name (the lower tree is never changed).
TEST_F(OverlayTest, AFileIsAdoptedOnItsSide) {
  Layer& o = *top_;
  const uint64_t lower = Lookup("l");
  ASSERT_NE(lower, 0u);
  VfsRequest r;
  r.op = VfsOp::kOpen;
  r.node = lower;
  r.flags = O_RDONLY;
  ASSERT_EQ(o.Serve(r), 0);
  VfsRequest l;
  l.op = VfsOp::kLend;
  l.node = lower;
  l.fh = r.open.fh;
  ASSERT_EQ(o.Serve(l), 0);
  ASSERT_GE(l.open.backing_fd, 0);
  EXPECT_EQ(l.open.fh, 1u);  // the lower side's
  VfsRequest a;
  a.op = VfsOp::kAdopt;
  a.in_fd = l.open.backing_fd;
  a.fh = l.open.fh;
  ASSERT_EQ(o.Serve(a), 0);
  const uint64_t adopted = a.entry.ino;
  EXPECT_EQ(a.entry.attr.st_size, 4);
  VfsRequest t;
  t.op = VfsOp::kSetAttr;
  t.node = adopted;
  t.flags = FUSE_SET_ATTR_SIZE;
  t.attr.st_size = 1;
  ASSERT_EQ(o.Serve(t), 0);
  EXPECT_EQ(t.out_attr.st_size, 1);
  EXPECT_EQ(testing::Output("cat " + dir / "low/l"), "low\n");
  EXPECT_EQ(testing::Output("ls -A " + dir / "up"), "");

  VfsRequest c;
  c.op = VfsOp::kCreate;
  c.node = kRootNode;
  c.name = std::string("u");
  c.mode = S_IFREG | 0644;
  c.flags = O_RDWR | O_CREAT;
  ASSERT_EQ(o.Serve(c), 0);
  const uint64_t upper = c.entry.ino;
  l = VfsRequest{};
  l.op = VfsOp::kLend;
  l.node = upper;
  l.fh = c.open.fh;
  ASSERT_EQ(o.Serve(l), 0);
  ASSERT_GE(l.open.backing_fd, 0);
  EXPECT_EQ(l.open.fh, 0u);  // the upper side's
  ASSERT_EQ(::write(l.open.backing_fd, "12345", 5), 5);
  a = VfsRequest{};
  a.op = VfsOp::kAdopt;
  a.in_fd = l.open.backing_fd;
  a.fh = l.open.fh;
  ASSERT_EQ(o.Serve(a), 0);
  EXPECT_EQ(a.entry.ino, upper);
  EXPECT_EQ(a.entry.attr.st_size, 5);
  EXPECT_EQ(o.PathOf(upper), "/u");
  EXPECT_EQ(testing::Output("cat " + dir / "up/u"), "12345");
}

// A program's RENAME_WHITEOUT is refused (EINVAL), as by overlayfs: the device it
// would leave in the upper directory is the overlay's own whiteout, so the old name
// would vanish rather than hold a device. Nothing moves.
TEST_F(OverlayTest, AProgramsRenameWhiteoutIsRefused) {
  ASSERT_EQ(testing::Shell("echo up > " + dir / "up/u"), 0);
  VfsRequest r;
  r.op = VfsOp::kRename;
  r.node = r.node2 = kRootNode;
  r.name = "u";
  r.name2 = "v";
  r.flags = RENAME_WHITEOUT;
  EXPECT_EQ(top_->Serve(r), EINVAL);
  EXPECT_EQ(testing::Output("ls " + dir / "up"), "u\n");
  r.flags = 0;
  EXPECT_EQ(top_->Serve(r), 0);
  EXPECT_EQ(testing::Output("ls " + dir / "up"), "v\n");
}

// A lower file removed while a program holds it open, then changed through its
// descriptor (fchmod): ext4 changes the unlinked file and the name stays removed. The
// overlay copies it up as a file of no name. (Before, the copy-up took its old name
// and brought the removed file back in place of its whiteout.) The change's answer
// gives the copy's descriptor (for an isolated mount to keep in place of the lower
// file's), tagged as an upper file, and so does a lend on the lower handle after it.
TEST_F(OverlayTest, ARemovedLowerFileChangesWithoutComingBack) {
  Layer& o = *top_;
  const uint64_t lower = Lookup("l");
  ASSERT_NE(lower, 0u);
  VfsRequest r;  // a program's descriptor of it
  r.op = VfsOp::kOpen;
  r.node = lower;
  r.flags = O_RDONLY;
  ASSERT_EQ(o.Serve(r), 0);
  VfsRequest u;
  u.op = VfsOp::kUnlink;
  u.node = kRootNode;
  u.name = "l";
  ASSERT_EQ(o.Serve(u), 0);
  VfsRequest t;
  t.op = VfsOp::kSetAttr;
  t.node = lower;
  t.flags = FUSE_SET_ATTR_MODE;
  t.attr.st_mode = S_IFREG | 0600;
  ASSERT_EQ(o.Serve(t), 0);
  EXPECT_EQ(t.out_attr.st_mode & 07777, 0600u);
  struct stat copy {};
  ASSERT_GE(t.copy_fd, 0);
  EXPECT_EQ(t.copy_tag, 0u);  // the upper side's
  ASSERT_EQ(::fstat(t.copy_fd, &copy), 0);
  EXPECT_EQ(copy.st_mode, S_IFREG | 0600u);
  EXPECT_EQ(copy.st_nlink, 0u);
  EXPECT_EQ(copy.st_size, 4);
  VfsRequest l;
  l.op = VfsOp::kLend;
  l.node = lower;
  l.fh = r.open.fh;
  ASSERT_EQ(o.Serve(l), 0);
  EXPECT_EQ(l.open.backing_fd, t.copy_fd);
  EXPECT_EQ(l.open.fh, 0u);
  EXPECT_EQ(l.copy_fd, -1);
  VfsRequest again = t;  // a second change answers it again; a read-only open does not
  again.copy_fd = -1;
  ASSERT_EQ(o.Serve(again), 0);
  EXPECT_EQ(again.copy_fd, t.copy_fd);
  VfsRequest reading;
  reading.op = VfsOp::kOpen;
  reading.node = l.node;
  reading.flags = O_RDONLY;
  ASSERT_EQ(o.Serve(reading), 0);
  EXPECT_EQ(reading.copy_fd, -1);
  for (uint64_t fh : {r.open.fh, reading.open.fh}) {
    VfsRequest release;
    release.op = VfsOp::kRelease;
    release.node = l.node;
    release.fh = fh;
    EXPECT_EQ(o.Serve(release), 0);
  }
  int err = 0;
  EXPECT_EQ(Lookup("l", &err), 0u);
  EXPECT_EQ(err, ENOENT);
  EXPECT_EQ(testing::Output("stat -c %F " + dir / "up/l"), "character special file\n");  // still its whiteout
  EXPECT_EQ(testing::Output("stat -c %a " + dir / "low/l"), "644\n");
}

// A link of a file of no name (an overlay's copy-up links each one) where linkat's
// AT_EMPTY_PATH is refused, as before Linux 6.10 to a server without
// CAP_DAC_READ_SEARCH (a mount by a user who is not root): a seccomp filter in a child
// answers it ENOENT, as such a kernel does. The link goes through the descriptor's
// /proc link instead. (Before, the link failed, and so did every overlay copy-up.)
TEST_F(PassthroughTest, ALinkOfAFileOfNoNameWorksWithoutLinkingByDescriptor) {
  EXPECT_TRUE(InChild([&] {
    scmp_filter_ctx ctx = ::seccomp_init(SCMP_ACT_ALLOW);
    if (ctx == nullptr ||
        ::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOENT), SCMP_SYS(linkat), 1,
                           SCMP_A4(SCMP_CMP_MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH)) != 0 ||
        ::seccomp_load(ctx) != 0)
      ::_exit(3);
    const uint64_t d = Lookup(kRootNode, "d");
    VfsRequest t;
    t.op = VfsOp::kCreate;
    t.node = d;
    t.flags = O_TMPFILE | O_RDWR;
    t.mode = 0600;
    if (layer_->Serve(t) != 0 || ::write(static_cast<int>(t.open.fh), "copy", 4) != 4) ::_exit(4);
    ::close(static_cast<int>(t.open.fh));
    VfsRequest l;
    l.op = VfsOp::kLink;
    l.node = t.entry.ino;
    l.node2 = d;
    l.name2 = "named";
    const int err = layer_->Serve(l);
    std::fprintf(stderr, "link: %s\n", std::strerror(err));
    ::_exit(err == 0 && l.entry.ino == t.entry.ino ? 0 : 1);
  }));
  EXPECT_EQ(testing::Output("cat " + dir_ / "root/d/named"), "copy");
}

// An overlay holds two nodes for each file copied up (the copy and the lower file),
// each a descriptor while the budget lasts. The budget is the process's: once, each
// passthrough layer had its own (three quarters of the limit), so an overlay ran out
// of descriptors (EMFILE) when the kernel held about as many copied-up files as the
// limit allowed (a `touch` of every file of /usr/include failed past 10,000). A copy
// of no name keeps its descriptor while it has no name, and is kept as any other once
// linked. In a child with a limit of 2048 descriptors (a budget of 1024): 1,500
// copy-ups, each node still held.
TEST(OverlayDescriptors, CopyUpsPastTheBudgetKeepWorking) {
  testing::TempDir dir;
  ASSERT_EQ(testing::Shell("mkdir " + dir / "up " + dir / "low && cd " + dir / "low && seq 1500 | xargs touch"), 0);
  EXPECT_TRUE(InChild([&] {
    const struct rlimit limit {2048, 2048};
    if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) ::_exit(3);
    auto top = BuildStack("overlay:" + dir / "up,passthrough:" + dir / "low");
    if (!top) ::_exit(4);
    for (int i = 1; i <= 1500; ++i) {
      int err = 0;
      const uint64_t node = LookupIn(**top, kRootNode, std::to_string(i), &err);  // held, as by the kernel
      VfsRequest a;
      a.op = VfsOp::kSetAttr;
      a.node = node;
      a.flags = FUSE_SET_ATTR_MODE;
      a.attr.st_mode = S_IFREG | 0600;
      if (err != 0 || (err = (*top)->Serve(a)) != 0) {
        std::fprintf(stderr, "file %d: %s\n", i, std::strerror(err));
        ::_exit(1);
      }
    }
    ::_exit(0);
  }));
  EXPECT_EQ(testing::Output("find " + dir / "up -type f -perm 600 | wc -l"), "1500\n");
}

// A whiteout (an unlink's or a rename's) is a hard link to one the overlay keeps in
// the upper root, as on overlayfs: a link costs a directory entry, where a new device
// costs an inode (on this machine's ext4 about 300 µs, which made most of an `rm -r`
// through the overlay, and RENAME_WHITEOUT makes one too).
// The one linked to goes with the overlay; one gone under it is made again. An
// upper file system that refuses the links (here a seccomp filter in a child answers
// every linkat EPERM) gets a device for each whiteout, as before; one whose links run
// out (EMLINK, every time here) gets a device, and no whiteout of the overlay's own
// is left behind.
TEST(OverlayWhiteouts, AreLinksToOneAndDevicesWhereLinksAreRefused) {
  testing::TempDir dir;
  ASSERT_EQ(testing::Shell("mkdir " + dir / "up " + dir / "low && cd " + dir / "low && touch a b c d e f g r"), 0);
  auto unlink = [](Layer& top, const std::string& name) {
    VfsRequest u;
    u.op = VfsOp::kUnlink;
    u.node = kRootNode;
    u.name = name;
    return top.Serve(u);
  };
  auto rename = [](Layer& top, const std::string& from, const std::string& to) {
    VfsRequest r;
    r.op = VfsOp::kRename;
    r.node = r.node2 = kRootNode;
    r.name = from;
    r.name2 = to;
    return top.Serve(r);
  };
  auto stat_of = [&](const std::string& name) { return testing::Output("stat -c '%F %t:%T %h' " + dir / "up/" + name); };
  {
    auto top = BuildStack("overlay:" + dir / "up,passthrough:" + dir / "low");
    ASSERT_TRUE(top);
    ASSERT_EQ(unlink(**top, "a"), 0);
    ASSERT_EQ(unlink(**top, "b"), 0);
    int err = 0;
    LookupIn(**top, kRootNode, "r", &err);  // held, as by the kernel
    ASSERT_EQ(err, 0);
    ASSERT_EQ(rename(**top, "r", "r2"), 0);  // the old name's whiteout is a link too
    EXPECT_EQ(stat_of("a"), "character special file 0:0 4\n");  // a, b, r and the one they link to
    EXPECT_EQ(testing::Output("stat -c %i " + dir / "up/a"), testing::Output("stat -c %i " + dir / "up/b"));
    // Its name removed by hand: the overlay still holds it, and links to it.
    ASSERT_EQ(testing::Shell("rm " + dir / "up/.ulsp-whiteout.*"), 0);
    ASSERT_EQ(unlink(**top, "c"), 0);
    EXPECT_EQ(stat_of("c"), "character special file 0:0 4\n");
    // Every link to it removed by hand: gone (no link can be made to it), made again.
    ASSERT_EQ(testing::Shell("cd " + dir / "up" + " && rm a b c r"), 0);
    ASSERT_EQ(unlink(**top, "d"), 0);
    EXPECT_EQ(stat_of("d"), "character special file 0:0 2\n");
    EXPECT_EQ(testing::Output("ls -A " + dir / "up" + " | grep -c ulsp-whiteout"), "1\n");
  }
  EXPECT_EQ(testing::Output("ls -A " + dir / "up"), "d\nr2\n");
  EXPECT_EQ(stat_of("d"), "character special file 0:0 1\n");
  for (const int refusal : {EPERM, EMLINK}) {
    SCOPED_TRACE(std::strerror(refusal));
    const std::vector<std::string> names =
        refusal == EPERM ? std::vector<std::string>{"e", "f"} : std::vector<std::string>{"g"};
    EXPECT_TRUE(InChild([&] {
      scmp_filter_ctx ctx = ::seccomp_init(SCMP_ACT_ALLOW);
      if (ctx == nullptr || ::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(static_cast<uint32_t>(refusal)), SCMP_SYS(linkat), 0) != 0 ||
          ::seccomp_load(ctx) != 0)
        ::_exit(3);
      auto top = BuildStack("overlay:" + dir / "up,passthrough:" + dir / "low");
      if (!top) ::_exit(4);
      for (const auto& name : names) {
        if (int err = unlink(**top, name)) {
          std::fprintf(stderr, "unlink %s: %s\n", name.c_str(), std::strerror(err));
          ::_exit(1);
        }
      }
      ::_exit(0);  // with no destructors run: a whiteout of the overlay's own would be left
    }));
    for (const auto& name : names) EXPECT_EQ(stat_of(name), "character special file 0:0 1\n") << name;
  }
  EXPECT_EQ(testing::Output("ls -A " + dir / "up"), "d\ne\nf\ng\nr2\n");
}

// The kernel grows a descriptor table by doubling it, and in a process with threads
// each growth waits for an RCU grace period (10-15 ms here), inside whichever request
// made the node that needed it. Opening a passthrough grows the table up front.
TEST(PassthroughOpen, GrowsTheDescriptorTableOnce) {
  auto fd_size = [] {
    std::ifstream status("/proc/self/status");
    for (std::string line; std::getline(status, line);) {
      if (line.starts_with("FDSize:")) return std::stol(line.substr(7));
    }
    return -1L;
  };
  // In a child: its table is sized for the descriptors it inherits, not this
  // process's (which earlier tests may have grown).
  EXPECT_TRUE(InChild([&] {
    const long before = fd_size();
    auto layer = PassthroughLayer::Open("/");
    const long after = fd_size();
    struct rlimit limit {};
    ::getrlimit(RLIMIT_NOFILE, &limit);  // as Open left it
    const long want = static_cast<long>(std::min<rlim_t>(limit.rlim_cur, 65536));
    std::fprintf(stderr, "FDSize %ld before, %ld after; %ld wanted\n", before, after, want);
    ::_exit(before > 0 && before < want && layer && after >= want ? 0 : 1);
  }));
}

}  // namespace
}  // namespace ulsp::vfs
