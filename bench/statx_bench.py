#!/usr/bin/env python3
"""What a statx that asks for the birth time (STATX_BTIME) costs through an in-process
passthrough mount, against one that asks for the basic fields only, and natively.

    python3 bench/statx_bench.py [--ulsp build/ulsp/core/ulsp] [--rounds 3]

The kernel asks the mount for the birth time with FUSE_STATX (docs/vfs.md, "Birth
time"). 10000 files of a copy of /usr/include are looked up first (lstat) on a mount
with a 60 s attribute timeout, so a basic statx is answered from the kernel's cache;
then each round times a basic statx of every file, then one with STATX_BTIME. Prints
microseconds per call; the first round's birth-time figure is the round trip, later
rounds' are the cache's (the kernel keeps the time it was given).
"""
import argparse, ctypes, os, shutil, subprocess, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("--ulsp", default="build/ulsp/core/ulsp")
ap.add_argument("--rounds", type=int, default=3)
args = ap.parse_args()

libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(256)  # struct statx
AT_FDCWD, AT_SYMLINK_NOFOLLOW = -100, 0x100
STATX_BASIC_STATS, STATX_BTIME = 0x7FF, 0x800

work = tempfile.mkdtemp(prefix="ulsp-statx-bench.", dir="/var/tmp")
tree, mnt = os.path.join(work, "tree"), os.path.join(work, "mnt")
os.mkdir(mnt)
subprocess.run(["cp", "-a", "/usr/include/.", tree + "/"], check=True)
files = []
for d, _, fs in os.walk(tree):
    files += [os.path.relpath(os.path.join(d, f), tree) for f in fs]
files = files[:10000]


def per_call(root, mask):
    paths = [os.path.join(root, f).encode() for f in files]
    t = time.perf_counter()
    for p in paths:
        if libc.statx(AT_FDCWD, p, AT_SYMLINK_NOFOLLOW, mask, buf) != 0:
            raise OSError(ctypes.get_errno(), p.decode())
    return (time.perf_counter() - t) / len(paths) * 1e6


def rounds(root):
    for f in files:
        os.lstat(os.path.join(root, f))
    for i in range(args.rounds):
        basic = per_call(root, STATX_BASIC_STATS)
        btime = per_call(root, STATX_BASIC_STATS | STATX_BTIME)
        print(f"  round {i + 1}: basic {basic:7.2f} us   with birth time {btime:7.2f} us")


try:
    print("native")
    rounds(tree)
    subprocess.run([args.ulsp, "mount", "--timeout", "60", "--stack", "passthrough:" + tree, mnt], check=True)
    try:
        print("in-process passthrough mount (--timeout 60)")
        rounds(mnt)
    finally:
        subprocess.run([args.ulsp, "umount", mnt], check=True)
finally:
    shutil.rmtree(work, ignore_errors=True)
