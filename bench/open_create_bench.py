#!/usr/bin/env python3
"""Open+close and create+close through an in-process passthrough mount, for each
`ulsp` binary given, interleaved (A/B of a change to the open path).

    python3 bench/open_create_bench.py --ulsp OLD/ulsp --ulsp build/ulsp/core/ulsp

Opens: the first 20000 files of a copy of /usr/include (looked up first, so each open
is one FUSE_OPEN round trip). Creates: 10000 new files in a directory on /dev/shm
(tmpfs: the disk's journal made ext4's figures swing 4x). Prints each binary's
median microseconds per call over the rounds. Kernel passthrough off: every read and
open is served by the stack.

Writes: 20000 writes of 4 KiB at offset 0 of one file on /dev/shm, each one FUSE_WRITE.
Listings: 20000 listxattr of one file on /dev/shm holding a user.* and a trusted.*
attribute, each one FUSE_LISTXATTR. A caller without CAP_SYS_ADMIN (--user) is not
listed the trusted.* name: the shim asks the stack for the whole list and leaves it out.

`--user UID` times each loop in a child process of that user (and group): creates and
writes of a caller other than root are made under its file-system ids
(kernel/msgport/thread_creds.h), which costs calls a root caller does not make.
"""
import argparse, os, shutil, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--ulsp", action="append", required=True, help="a ulsp binary (give two or more)")
ap.add_argument("--rounds", type=int, default=7)
ap.add_argument("--user", type=int, default=0, help="time the loops as this user (default: root)")
args = ap.parse_args()

work = tempfile.mkdtemp(prefix="ulsp-open-bench.", dir="/var/tmp")
shm = tempfile.mkdtemp(prefix="ulsp-open-bench.", dir="/dev/shm")
tree, mnt, ctree = os.path.join(work, "tree"), os.path.join(work, "mnt"), os.path.join(shm, "c")
os.chmod(work, 0o755)  # a --user caller walks to the mount and the tree
os.chmod(shm, 0o755)
os.mkdir(mnt)
subprocess.run(["cp", "-a", "/usr/include/.", tree + "/"], check=True)
files = []
for d, _, fs in os.walk(tree):
    for f in fs:
        p = os.path.join(d, f)
        if os.path.isfile(p) and not os.path.islink(p):
            files.append(os.path.relpath(p, tree))
files = files[:20000]


def timed(loop):
    """Runs `loop` (which returns microseconds per call), as --user if given."""
    if args.user == 0:
        return loop()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(args.user, args.user, args.user)
            os.setresuid(args.user, args.user, args.user)
            os.write(w, repr(loop()).encode())
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return float(out)


def on_mount(binary, src, loop, before=lambda: None):
    """Mounts `src`, runs `before` (untimed) and `loop` (timed), unmounts."""
    subprocess.run([binary, "mount", "--no-kernel-passthrough", "--stack", "passthrough:" + src, mnt], check=True)
    try:
        before()
        return timed(loop)
    finally:
        subprocess.run([binary, "umount", mnt], check=True)


def fresh_ctree():
    shutil.rmtree(ctree, ignore_errors=True)
    os.mkdir(ctree)
    os.chmod(ctree, 0o777)
    return ctree


def opens(binary):
    def loop():
        t = time.perf_counter()
        for f in files:
            os.close(os.open(os.path.join(mnt, f), os.O_RDONLY))
        return (time.perf_counter() - t) / len(files) * 1e6
    return on_mount(binary, tree, loop, before=lambda: [os.stat(os.path.join(mnt, f)) for f in files])


def creates(binary):
    def loop():
        t = time.perf_counter()
        for i in range(10000):
            os.close(os.open(os.path.join(mnt, "f%d" % i), os.O_WRONLY | os.O_CREAT, 0o644))
        return (time.perf_counter() - t) / 10000 * 1e6
    return on_mount(binary, fresh_ctree(), loop)


def writes(binary):
    def loop():
        fd = os.open(os.path.join(mnt, "w"), os.O_WRONLY | os.O_CREAT, 0o644)
        block = b"x" * 4096
        t = time.perf_counter()
        for _ in range(20000):
            os.pwrite(fd, block, 0)
        us = (time.perf_counter() - t) / 20000 * 1e6
        os.close(fd)
        return us
    return on_mount(binary, fresh_ctree(), loop)


def listings(binary):
    p = os.path.join(mnt, "x")

    def before():
        open(p, "w").close()
        os.chmod(p, 0o644)
        os.setxattr(p, "user.u", b"v")
        os.setxattr(p, "trusted.t", b"v")

    def loop():
        t = time.perf_counter()
        for _ in range(20000):
            os.listxattr(p)
        return (time.perf_counter() - t) / 20000 * 1e6
    return on_mount(binary, fresh_ctree(), loop, before=before)


try:
    res = {b: {"open": [], "create": [], "write": [], "listxattr": []} for b in args.ulsp}
    for _ in range(args.rounds):
        for b in args.ulsp:
            res[b]["open"].append(opens(b))
            res[b]["create"].append(creates(b))
            res[b]["write"].append(writes(b))
            res[b]["listxattr"].append(listings(b))
    med = lambda v: sorted(v)[len(v) // 2]
    print("as user %d" % args.user)
    print("%-40s %16s %18s %16s %14s" % ("binary", "open+close us", "create+close us", "4 KiB write us", "listxattr us"))
    for b in args.ulsp:
        print("%-40s %16.2f %18.2f %16.2f %14.2f" % (b, med(res[b]["open"]), med(res[b]["create"]), med(res[b]["write"]),
                                                     med(res[b]["listxattr"])))
finally:
    subprocess.run(["umount", mnt], stderr=subprocess.DEVNULL)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)
