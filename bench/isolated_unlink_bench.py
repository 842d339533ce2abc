#!/usr/bin/python3
"""What an isolated mount's files-without-a-name support costs (docs/vfs.md, "Isolated
mode"). On a fresh `ulsp mount --isolated --stack passthrough:DIR` each time, from this
process, the mean of

  open+close             open and close one file, 20,000 times
  create,close,unlink    5,000 times: no file open at the unlink
  create,unlink,close    5,000 times: the file open at the unlink (without kernel
                         passthrough the mount first asks the server to lend it, kLend)

with kernel passthrough (`kpt`) and without (`nokpt`). With `--base BIN` (an older
build) the same on it, alternating with `--ulsp` round by round, and the ratios. The
two unlink loops differ only in whether the file is open at the unlink: their
difference in one build is what an unlink of an open file costs there. Prints medians
(and ranges) in microseconds. Needs root.

  bench/isolated_unlink_bench.py [--ulsp build/ulsp/core/ulsp] [--base BIN] [--rounds 7] [--modes nokpt,kpt]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LOOPS = ["open+close", "create,close,unlink", "create,unlink,close"]


def per_call_us(n, fn):
    fn()  # the first one warms the kernel's caches
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def one_mount(ulsp, mode, work):
    src, mnt = os.path.join(work, "src"), os.path.join(work, "mnt")
    os.makedirs(src, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    with open(os.path.join(src, "f"), "w") as f:
        f.write("x\n")
    opts = ["--no-kernel-passthrough"] if mode == "nokpt" else []
    subprocess.run([ulsp, "mount", "--isolated", *opts, "--stack", "passthrough:" + src, mnt], check=True)
    try:
        f = os.path.join(mnt, "f")

        def closed_unlink():
            p = os.path.join(mnt, "g")
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644))
            os.unlink(p)

        def open_unlink():
            p = os.path.join(mnt, "h")
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
            os.unlink(p)
            os.close(fd)

        return [per_call_us(20000, lambda: os.close(os.open(f, os.O_RDONLY))),
                per_call_us(5000, closed_unlink), per_call_us(5000, open_unlink)]
    finally:
        subprocess.run([ulsp, "umount", mnt], check=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ulsp", default=os.path.join(HERE, "..", "build", "ulsp", "core", "ulsp"))
    ap.add_argument("--base", help="an older ulsp binary, measured alternately")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--modes", default="nokpt,kpt")
    args = ap.parse_args()
    builds = [("this", os.path.abspath(args.ulsp))] + ([("base", os.path.abspath(args.base))] if args.base else [])
    modes = args.modes.split(",")
    results = {(b, m): [] for b, _ in builds for m in modes}
    work = tempfile.mkdtemp(prefix="ulsp-unlink-bench.")
    try:
        for r in range(args.rounds):
            for mode in modes:
                for name, ulsp in (builds if r % 2 == 0 else builds[::-1]):
                    results[(name, mode)].append(one_mount(ulsp, mode, os.path.join(work, f"{name}-{mode}-{r}")))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(name, mode, i):
        return statistics.median(row[i] for row in results[(name, mode)])

    print(f"{args.rounds} rounds, medians (min-max) in us")
    print(f"{'mode':6} {'build':5} " + " ".join(f"{loop:>22}" for loop in LOOPS) + f" {'open at unlink adds':>20}")
    for mode in modes:
        for name, _ in builds:
            rows = results[(name, mode)]
            cells = [f"{med(name, mode, i):7.1f} ({min(x[i] for x in rows):.0f}-{max(x[i] for x in rows):.0f})"
                     for i in range(len(LOOPS))]
            print(f"{mode:6} {name:5} " + " ".join(f"{c:>22}" for c in cells) +
                  f" {med(name, mode, 2) - med(name, mode, 1):20.1f}")
        if args.base:
            print(f"{mode:6} ratio " + " ".join(f"{med('this', mode, i) / med('base', mode, i):22.2f}"
                                                  for i in range(len(LOOPS))))


if __name__ == "__main__":
    main()
