#!/usr/bin/python3
"""Exercises file-system semantics in a directory and prints what happened, one line
per step, with nothing that differs between two correct file systems (no inode
numbers, no absolute times except those the script sets). The test runs it in a
directory of the native file system and in the same place through a mount, and
compares the two outputs line by line: the mount must behave as ext4 underneath.

Usage: semantics.py DIR [root|user]
  root: the caller is root (device nodes, chown, RENAME_* flags).
  user: the caller is unprivileged; DIR holds `theirs` (a root-owned file, with
        attributes trusted.t and user.u),
        `sticky/` (mode 1777, holding `sticky/theirs`, root-owned), and `suid` and
        `sgid` (root's, modes 4777 and 2777).
"""
import ctypes
import errno
import fcntl
import mmap
import os
import shutil
import socket
import stat
import subprocess
import sys

from steps import attempt, out, p

d = sys.argv[1]
who = sys.argv[2] if len(sys.argv) > 2 else "root"


def describe(path, follow=False):
    st = os.stat(path, follow_symlinks=follow)
    kind = stat.S_IFMT(st.st_mode)
    size = st.st_size if not stat.S_ISDIR(st.st_mode) else "-"
    return f"mode={stat.filemode(st.st_mode)} nlink={st.st_nlink} size={size} uid={st.st_uid} gid={st.st_gid} kind={kind:o}"


def j(*parts):
    return os.path.join(d, *parts)


libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(a, b, flags):
    if libc.renameat2(-100, a.encode(), -100, b.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 16


def fallocate(path, mode, offset, length):
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


# --- files, sizes, appends, truncation ---
with open(j("a.txt"), "w") as f:
    f.write("hello\n")
p("create", describe(j("a.txt")))
fd = os.open(j("a.txt"), os.O_WRONLY | os.O_APPEND)
os.lseek(fd, 0, os.SEEK_SET)
os.write(fd, b"appended\n")
os.close(fd)
p("append", open(j("a.txt")).read().replace("\n", "|"))
os.truncate(j("a.txt"), 3)
p("truncate-path", describe(j("a.txt")))
with open(j("a.txt"), "r+") as f:
    f.truncate(10)
p("truncate-fd", open(j("a.txt"), "rb").read())
attempt("excl-create", os.open, j("a.txt"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
attempt("open-missing", os.open, j("missing"), os.O_RDONLY)
attempt("open-dir-for-write", os.open, d, os.O_WRONLY)

# --- sparse file past 4 GiB ---
fd = os.open(j("sparse"), os.O_CREAT | os.O_RDWR, 0o600)
os.pwrite(fd, b"end", 5 * 1024 * 1024 * 1024)
st = os.fstat(fd)
p("sparse", f"size={st.st_size} blocks_small={st.st_blocks < 64}")
p("sparse-read", os.pread(fd, 3, 5 * 1024 * 1024 * 1024))
p("sparse-hole", os.pread(fd, 4, 4096) == b"\0\0\0\0")
try:
    p("seek-data", os.lseek(fd, 0, os.SEEK_DATA))
except OSError as e:
    p("seek-data", errno.errorcode[e.errno])
try:
    p("seek-hole", os.lseek(fd, 0, os.SEEK_HOLE))
except OSError as e:
    p("seek-hole", errno.errorcode[e.errno])
os.close(fd)
os.unlink(j("sparse"))

# --- fallocate: reserve past the end, punch a hole, zero a range ---
with open(j("alloc"), "wb") as f:
    f.write(b"x" * 10000)
attempt("fallocate-keep-size", fallocate, j("alloc"), FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
p("keep-size", os.stat(j("alloc")).st_size)
attempt("punch-hole", fallocate, j("alloc"), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
attempt("zero-range", fallocate, j("alloc"), FALLOC_FL_ZERO_RANGE, 8000, 4000)
p("after-punch-and-zero", (open(j("alloc"), "rb").read().count(b"x"), os.stat(j("alloc")).st_size))
os.unlink(j("alloc"))

# --- names ---
attempt("name-255", lambda: os.close(os.open(j("n" * 255), os.O_CREAT | os.O_WRONLY, 0o644)))
attempt("name-256", os.open, j("n" * 256), os.O_CREAT | os.O_WRONLY, 0o644)
attempt("lookup-256", os.stat, j("n" * 256))
os.unlink(j("n" * 255))

# --- timestamps ---
os.utime(j("a.txt"), ns=(1_000_000_123, 2_000_000_456))
st = os.stat(j("a.txt"))
p("utimensat-ns", f"{st.st_atime_ns} {st.st_mtime_ns}")
os.utime(j("a.txt"), ns=(3_000_000_789, 2_000_000_456))
p("utimensat-atime", os.stat(j("a.txt")).st_atime_ns)

# --- directories, links, symlinks ---
os.mkdir(j("dir"), 0o750)
p("mkdir", describe(j("dir")))
attempt("mkdir-exists", os.mkdir, j("dir"))
os.link(j("a.txt"), j("dir", "hard"))
p("hardlink", describe(j("a.txt")))
p("hardlink-same", os.stat(j("a.txt")).st_ino == os.stat(j("dir", "hard")).st_ino)
os.symlink("../a.txt", j("dir", "sym"))
p("symlink", os.readlink(j("dir", "sym")))
p("symlink-lstat", describe(j("dir", "sym")))
p("symlink-follow", open(j("dir", "sym"), "rb").read())
os.symlink("/etc/passwd-does-not-exist", j("dangling"))
attempt("dangling-open", os.open, j("dangling"), os.O_RDONLY)
os.symlink("loop", j("loop"))
attempt("symlink-loop-open", os.open, j("loop"), os.O_RDONLY)
os.unlink(j("loop"))
attempt("rmdir-nonempty", os.rmdir, j("dir"))
attempt("unlink-dir", os.unlink, j("dir"))
os.mkdir(j("dir", "sub"))
p("dir-nlink", (os.stat(j("dir")).st_nlink, os.stat(j("dir", "sub")).st_nlink))
attempt("rename-into-itself", os.rename, j("dir"), j("dir", "sub", "x"))
os.mkdir(j("empty"))
attempt("rename-dir-over-nonempty-dir", os.rename, j("empty"), j("dir"))
attempt("rename-dir-over-empty-dir", os.rename, j("dir", "sub"), j("empty"))
p("dir-nlink-after", (os.stat(j("dir")).st_nlink, sorted(os.listdir(j("dir")))))
os.rmdir(j("empty"))
p("listdir", sorted(os.listdir(d)))
p("listdir-sub", sorted(os.listdir(j("dir"))))
# A directory opened, then changed, then read shows the change; so does one rewound
# (os.listdir(fd) rewinds a duplicate of fd).
fd = os.open(j("dir"), os.O_RDONLY | os.O_DIRECTORY)
os.mkdir(j("dir", "late"))
p("listdir-opened-before-mkdir", sorted(os.listdir(fd)))
os.rmdir(j("dir", "late"))
p("listdir-rewound-after-rmdir", sorted(os.listdir(fd)))
os.close(fd)

# --- rename and its flags ---
with open(j("b.txt"), "w") as f:
    f.write("bee")
attempt("rename-noreplace", renameat2, j("a.txt"), j("b.txt"), RENAME_NOREPLACE)
attempt("rename-exchange", renameat2, j("a.txt"), j("b.txt"), RENAME_EXCHANGE)
p("after-exchange", (open(j("a.txt"), "rb").read(), open(j("b.txt"), "rb").read()))
os.rename(j("b.txt"), j("dir", "moved"))
p("rename-into-dir", sorted(os.listdir(j("dir"))))
attempt("rename-missing", os.rename, j("nothing"), j("x"))
attempt("rename-dir-over-file", os.rename, j("dir"), j("a.txt"))
# Two names of one file: renaming one onto the other does nothing, and both stay.
with open(j("h1"), "w") as f:
    f.write("one file")
os.link(j("h1"), j("dir", "h2"))
attempt("rename-onto-own-hardlink", os.rename, j("h1"), j("dir", "h2"))
p("after-rename-onto-own-hardlink", (os.path.exists(j("h1")), describe(j("dir", "h2"))))
os.unlink(j("h1"))
os.unlink(j("dir", "h2"))

# --- O_TMPFILE: a file with no name, linked to one later (never, with O_EXCL) ---
fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o640)
os.write(fd, b"unnamed")
p("tmpfile", describe(f"/proc/self/fd/{fd}", follow=True))
p("tmpfile-listed", sorted(os.listdir(d)))
dfd = os.open(d, os.O_PATH)
attempt("tmpfile-link", lambda: os.link(f"/proc/self/fd/{fd}", "tmp-linked", dst_dir_fd=dfd))  # AT_SYMLINK_FOLLOW
os.close(fd)
p("tmpfile-linked", describe(j("tmp-linked")) + " " + repr(open(j("tmp-linked"), "rb").read()))
fd = os.open(d, os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
attempt("tmpfile-excl-link", lambda: os.link(f"/proc/self/fd/{fd}", "tmp-never", dst_dir_fd=dfd))
os.close(fd)
os.close(dfd)
attempt("tmpfile-read-only", os.open, d, os.O_TMPFILE | os.O_RDONLY)
attempt("tmpfile-in-a-file", os.open, j("tmp-linked"), os.O_TMPFILE | os.O_RDWR)
os.unlink(j("tmp-linked"))
p("tmpfile-gone", sorted(os.listdir(d)))

# --- fifos, device nodes ---
os.mkfifo(j("fifo"), 0o640)
p("fifo", describe(j("fifo")))
if who == "root":
    os.mknod(j("null"), 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    p("chardev", f"{describe(j('null'))} rdev={os.major(os.stat(j('null')).st_rdev)},{os.minor(os.stat(j('null')).st_rdev)}")
    with open(j("null"), "wb") as f:
        f.write(b"into the void")
    p("chardev-write", "ok")
else:
    attempt("mknod-as-user", os.mknod, j("null"), 0o644 | stat.S_IFCHR, os.makedev(1, 3))

# --- a socket's node: bound, listed as a socket, connected through, removed ---
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(j("sock"))
srv.listen()
p("socket", describe(j("sock")))
cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
cli.connect(j("sock"))
conn, _ = srv.accept()
cli.sendall(b"ping")
p("socket-data", conn.recv(4))
for sock in (cli, conn, srv):
    sock.close()
attempt("socket-bind-exists", lambda: socket.socket(socket.AF_UNIX).bind(j("sock")))
os.unlink(j("sock"))

# --- a program run from here: it runs, and its file cannot be written meanwhile ---
shutil.copy("/bin/sleep", j("prog"))
os.chmod(j("prog"), 0o755)
running = subprocess.Popen([j("prog"), "30"])
attempt("write-running-program", os.open, j("prog"), os.O_WRONLY)
running.kill()
p("program-ran", running.wait())
os.unlink(j("prog"))

# --- copy_file_range, shared mappings, O_DIRECT (aligned: whether an unaligned one is
# refused is the device's affair, and memfs, like tmpfs, takes it) ---
with open(j("src.bin"), "wb") as f:
    f.write(bytes(range(256)) * 64)
src, dst = os.open(j("src.bin"), os.O_RDONLY), os.open(j("dst.bin"), os.O_CREAT | os.O_RDWR, 0o644)
p("copy-file-range", os.copy_file_range(src, dst, 10000, 100, 0))
os.close(src)
p("copied", (os.fstat(dst).st_size, os.pread(dst, 4, 0), os.pread(dst, 4, 9996)))
with mmap.mmap(dst, 8192) as m:
    m[0:5] = b"SHARE"
    m.flush()
p("mmap-write-read", os.pread(dst, 5, 0))
os.close(dst)
aligned = mmap.mmap(-1, 4096)
aligned.write(b"D" * 4096)
try:
    fd = os.open(j("direct"), os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    p("odirect-write", os.pwrite(fd, aligned, 4096))
    back = mmap.mmap(-1, 4096)
    p("odirect-read", (os.preadv(fd, [back], 4096), back[:2]))
    os.close(fd)
    p("odirect-size", os.stat(j("direct")).st_size)
except OSError as e:
    p("odirect", errno.errorcode[e.errno])
for name in ("src.bin", "dst.bin", "direct"):
    if os.path.exists(j(name)):
        os.unlink(j(name))

# --- permissions and ownership ---
os.chmod(j("a.txt"), 0o4755 if who == "root" else 0o755)
p("chmod", describe(j("a.txt")))
os.chmod(j("a.txt"), 0o600)
if who == "root":
    os.chown(j("a.txt"), 1234, 5678)
    p("chown", describe(j("a.txt")))
    os.lchown(j("dir", "sym"), 99, 99)
    p("lchown", describe(j("dir", "sym")))
    os.chown(j("a.txt"), 0, 0)
    # A set-group-ID directory: what is made in it takes its group, subdirectories the bit.
    os.mkdir(j("sgid"))
    os.chown(j("sgid"), 0, 1234)
    os.chmod(j("sgid"), 0o2775)
    os.close(os.open(j("sgid", "f"), os.O_CREAT | os.O_WRONLY, 0o644))
    os.mkdir(j("sgid", "d"))
    p("setgid-dir", (describe(j("sgid", "f")), describe(j("sgid", "d"))))
    os.unlink(j("sgid", "f"))
    os.rmdir(j("sgid", "d"))
    os.rmdir(j("sgid"))
else:
    attempt("chown-as-user", os.chown, j("a.txt"), 0, 0)
    attempt("open-theirs-write", os.open, j("theirs"), os.O_WRONLY)
    attempt("chmod-theirs", os.chmod, j("theirs"), 0o777)
    attempt("utime-theirs", os.utime, j("theirs"), (1, 1))
    attempt("unlink-theirs-sticky", os.unlink, j("sticky", "theirs"))
    with open(j("sticky", "mine"), "w") as f:
        f.write("mine")
    p("create-in-sticky", describe(j("sticky", "mine")))
    attempt("unlink-mine-sticky", os.unlink, j("sticky", "mine"))
    # Root gave `theirs` a trusted.* and a user.* attribute. ext4 lists the names of
    # trusted.* ones only to a caller with CAP_SYS_ADMIN, in the size it gives too.
    whole = libc.listxattr(j("theirs").encode(), None, 0)
    room = ctypes.create_string_buffer(max(whole, 1))
    p("xattr-names-theirs", (sorted(os.listxattr(j("theirs"))), whole,
                             libc.listxattr(j("theirs").encode(), room, whole)))
    os.chmod(j("dir"), 0o500)
    attempt("create-in-readonly-dir", os.open, j("dir", "new"), os.O_CREAT | os.O_WRONLY)
    os.chmod(j("dir"), 0o750)
    os.chmod(j("a.txt"), 0o000)
    attempt("open-mode-000", os.open, j("a.txt"), os.O_RDONLY)
    os.chmod(j("a.txt"), 0o600)
attempt("access-r", os.access, j("a.txt"), os.R_OK)

# --- xattrs ---
try:
    os.setxattr(j("a.txt"), "user.colour", b"blue")
    p("xattr-get", os.getxattr(j("a.txt"), "user.colour"))
    p("xattr-list", sorted(x for x in os.listxattr(j("a.txt")) if x.startswith("user.")))
    os.removexattr(j("a.txt"), "user.colour")
    attempt("xattr-removed", os.getxattr, j("a.txt"), "user.colour")
except OSError as e:
    p("xattr", errno.errorcode[e.errno])
attempt("xattr-missing", os.getxattr, j("a.txt"), "user.none")

# --- locks ---
fd = os.open(j("a.txt"), os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
p("posix-lock", "ok")
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
p("flock", "ok")
other = os.open(j("a.txt"), os.O_RDONLY)  # another open of the file: its flock conflicts
attempt("flock-conflict", fcntl.flock, other, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.close(fd)
attempt("flock-after-release", fcntl.flock, other, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.close(other)

# --- open files: large writes, a file unlinked or renamed while open ---
fd = os.open(j("big"), os.O_CREAT | os.O_RDWR, 0o644)
data = bytes(range(256)) * 4096 * 3  # 3 MiB: more than one request's worth
p("big-write", os.write(fd, data))
p("writev", os.writev(fd, [b"a" * 100000, b"b" * 200000]))
attempt("fsync", os.fsync, fd)
attempt("fdatasync", os.fdatasync, fd)
p("big-read", (os.fstat(fd).st_size, os.pread(fd, len(data), 0) == data))
os.unlink(j("big"))
p("unlinked-open", (os.fstat(fd).st_nlink, os.pread(fd, 3, len(data) + 99999), os.pwrite(fd, b"zz", 10)))
os.ftruncate(fd, 5)
p("unlinked-ftruncate", (os.fstat(fd).st_size, os.pread(fd, 10, 0)))
os.close(fd)
fd = os.open(j("r1"), os.O_CREAT | os.O_RDWR, 0o600)
os.write(fd, b"hello")
os.rename(j("r1"), j("r2"))
os.write(fd, b" world")
os.fchmod(fd, 0o640)
p("renamed-open", (open(j("r2"), "rb").read(), describe(j("r2"))))
os.close(fd)
fd = os.open(j("r2"), os.O_RDWR)
p("rwf-append", (os.pwritev(fd, [b"!"], 0, os.RWF_APPEND), os.pread(fd, 20, 0)))
os.close(fd)
fd = os.open(j("r2"), os.O_PATH)
attempt("o-path-read", os.read, fd, 1)
os.close(fd)

# --- utimensat leaving one time alone, fallocate that extends, an xattr's size ---
os.utime(j("r2"), ns=(5_000_000_000, 6_000_000_000))
UTIME_OMIT = (1 << 30) - 2
times = (ctypes.c_long * 4)(0, UTIME_OMIT, 7, 123)
p("utime-omit", (libc.utimensat(-100, j("r2").encode(), times, 0), os.stat(j("r2")).st_atime_ns, os.stat(j("r2")).st_mtime_ns))
fd = os.open(j("r2"), os.O_RDWR)
p("fallocate-extends", (libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(123456)), os.fstat(fd).st_size))
os.close(fd)
try:
    os.setxattr(j("r2"), "user.big", b"v" * 3000)
    small = ctypes.create_string_buffer(10)
    p("xattr-sizes", (libc.getxattr(j("r2").encode(), b"user.big", None, 0),
                      libc.getxattr(j("r2").encode(), b"user.big", small, 10), errno.errorcode.get(ctypes.get_errno())))
except OSError as e:
    p("xattr-sizes", errno.errorcode[e.errno])
os.unlink(j("r2"))

# --- a removed working directory; a directory moved to another parent ---
cwd = os.getcwd()
os.mkdir(j("cd"))
os.chdir(j("cd"))
os.rmdir(j("cd"))
attempt("getcwd-removed", os.getcwd)
attempt("create-in-removed-cwd", os.open, "x", os.O_CREAT | os.O_WRONLY, 0o644)
os.chdir(cwd)
os.makedirs(j("pa", "sub"))
os.mkdir(j("pb"))
os.rename(j("pa", "sub"), j("pb", "sub"))
p("nlink-after-move", (os.stat(j("pa")).st_nlink, os.stat(j("pb")).st_nlink))
for name in (("pb", "sub"), ("pb",), ("pa",)):
    os.rmdir(j(*name))

# --- a write or truncate by another user takes the set-user/group-ID bits away ---
if who == "user":
    p("suid-write", (os.write(os.open(j("suid"), os.O_WRONLY | os.O_APPEND), b"x"), describe(j("suid"))))
    os.truncate(j("sgid"), 1)
    p("sgid-truncate", describe(j("sgid")))

# --- statfs, cleanup ---
sv = os.statvfs(d)
p("statfs", f"bsize>0={sv.f_bsize > 0} namemax={sv.f_namemax}")
os.unlink(j("dir", "hard"))
p("unlink-hardlink", describe(j("a.txt")))

print("\n".join(out))
