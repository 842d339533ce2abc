#!/usr/bin/env python3
"""Open+close and create+close through an in-process passthrough mount, for each
`ulsp` binary given, interleaved (A/B of a change to the open path).

    python3 bench/open_create_bench.py --ulsp OLD/ulsp --ulsp build/ulsp/core/ulsp

Opens: the first 20000 files of a copy of /usr/include (looked up first, so each open
is one FUSE_OPEN round trip). Creates: 10000 new files in a directory on /dev/shm
(tmpfs: the disk's journal made ext4's figures swing 4x). Prints each binary's
median microseconds per call over the rounds. Kernel passthrough off: every read and
open is served by the stack.
"""
import argparse, os, shutil, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--ulsp", action="append", required=True, help="a ulsp binary (give two or more)")
ap.add_argument("--rounds", type=int, default=7)
args = ap.parse_args()

work = tempfile.mkdtemp(prefix="ulsp-open-bench.", dir="/var/tmp")
shm = tempfile.mkdtemp(prefix="ulsp-open-bench.", dir="/dev/shm")
tree, mnt, ctree = os.path.join(work, "tree"), os.path.join(work, "mnt"), os.path.join(shm, "c")
os.mkdir(mnt)
subprocess.run(["cp", "-a", "/usr/include/.", tree + "/"], check=True)
files = []
for d, _, fs in os.walk(tree):
    for f in fs:
        p = os.path.join(d, f)
        if os.path.isfile(p) and not os.path.islink(p):
            files.append(os.path.relpath(p, tree))
files = files[:20000]


def mounted(binary, src):
    subprocess.run([binary, "mount", "--no-kernel-passthrough", "--stack", "passthrough:" + src, mnt], check=True)


def opens(binary):
    mounted(binary, tree)
    try:
        for f in files:
            os.stat(os.path.join(mnt, f))
        t = time.perf_counter()
        for f in files:
            os.close(os.open(os.path.join(mnt, f), os.O_RDONLY))
        return (time.perf_counter() - t) / len(files) * 1e6
    finally:
        subprocess.run([binary, "umount", mnt], check=True)


def creates(binary):
    shutil.rmtree(ctree, ignore_errors=True)
    os.mkdir(ctree)
    mounted(binary, ctree)
    try:
        t = time.perf_counter()
        for i in range(10000):
            os.close(os.open(os.path.join(mnt, "f%d" % i), os.O_WRONLY | os.O_CREAT, 0o644))
        return (time.perf_counter() - t) / 10000 * 1e6
    finally:
        subprocess.run([binary, "umount", mnt], check=True)


try:
    res = {b: {"open": [], "create": []} for b in args.ulsp}
    for _ in range(args.rounds):
        for b in args.ulsp:
            res[b]["open"].append(opens(b))
            res[b]["create"].append(creates(b))
    med = lambda v: sorted(v)[len(v) // 2]
    print("%-40s %16s %18s" % ("binary", "open+close us", "create+close us"))
    for b in args.ulsp:
        print("%-40s %16.2f %18.2f" % (b, med(res[b]["open"]), med(res[b]["create"])))
finally:
    subprocess.run(["umount", mnt], stderr=subprocess.DEVNULL)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)
