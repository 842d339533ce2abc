#!/usr/bin/python3
"""pkgdep-vfs benchmark (issue 6): real commands, each timed in the same run as

  plain          the command alone
  pkgdep-vfs     pkgdep-vfs check (observe mode) on it
  dpkg-depcheck  Debian's strace-based peer (package devscripts), the same command

Rounds alternate between the three; medians. Prints seconds and ratios, and the
targets: pkgdep-vfs <= 2x the plain run, and >= 5x faster than dpkg-depcheck.
Needs root.

  bench/pkgdep_bench.py [--pkgdep build/examples/pkgdep-vfs/pkgdep-vfs] [--rounds 5]
"""
import argparse
import os
import statistics
import subprocess
import sys

import fuse_uring_switch
import timing

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = "/var/tmp/ulsp-pkgdep-bench"  # not /tmp: a group's /tmp is its own

WORKLOADS = [
    # (name, package whose declarations count, command)
    ("python3 start-up, 4 imports", "python3",
     ["/usr/bin/python3", "-c", "import json, sqlite3, urllib.request, email.message"]),
    ("C compile (gcc -c, 1 file)", "gcc-12",
     ["/usr/bin/gcc-12", "-O1", "-c", WORK + "/hello.c", "-o", WORK + "/hello.o"]),
    ("tar cJf of 1 MB (tar + xz)", "tar",
     ["/usr/bin/tar", "-cJf", WORK + "/out.tar.xz", "-C", "/usr/share/doc", "tar", "coreutils", "bash"]),
]


def timed(cmd):
    return timing.timed(cmd, 600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pkgdep", default=os.path.join(HERE, "..", "build", "examples", "pkgdep-vfs", "pkgdep-vfs"))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    pkgdep = os.path.abspath(args.pkgdep)
    os.makedirs(WORK, exist_ok=True)
    with open(WORK + "/hello.c", "w") as f:
        f.write("#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n"
                "int main(int argc, char** argv) { printf(\"%zu\\n\", strlen(argc > 1 ? argv[1] : \"\")); return 0; }\n")
    results = {}
    for name, package, cmd in WORKLOADS:
        subjects = {
            "plain": cmd,
            "pkgdep-vfs": [pkgdep, "check", "--package", package, "--"] + cmd,
            # The same, its mount's requests through FUSE over io_uring (the kernel's
            # switch on for this subject only).
            "pkgdep-vfs [io_uring]": [pkgdep, "check", "--package", package, "--"] + cmd,
            "dpkg-depcheck": ["dpkg-depcheck", "--no-list-files", "-o", WORK + "/depcheck.txt", "--"] + cmd,
        }
        def run(k, c):
            with fuse_uring_switch.enabled(k.endswith("[io_uring]")):
                return timed(c)
        for k, c in subjects.items():  # warm the page cache and the programs' own caches
            run(k, c)
        times = {k: [] for k in subjects}
        for _ in range(args.rounds):
            for k, c in subjects.items():
                times[k].append(run(k, c))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = med
        print(f"{name}: plain {med['plain'] * 1000:.0f} ms, pkgdep-vfs {med['pkgdep-vfs'] * 1000:.0f} ms, "
              f"with io_uring {med['pkgdep-vfs [io_uring]'] * 1000:.0f} ms, "
              f"dpkg-depcheck {med['dpkg-depcheck'] * 1000:.0f} ms", flush=True)
    print()
    print(f"median of {args.rounds} alternating rounds; seconds; pkgdep-vfs reading /dev/fuse, then with io_uring")
    print(f"  {'command':<32} {'plain':>8} {'pkgdep-vfs':>11} {'io_uring':>9} {'depcheck':>9}   "
          f"{'pkgdep/plain':>20} {'depcheck/pkgdep':>20}")
    for name, med in results.items():
        cells = []
        for k in ("pkgdep-vfs", "pkgdep-vfs [io_uring]"):
            over = med[k] / med["plain"]
            cells.append(f"{over:5.2f}x {'met' if over <= 2 else 'NOT met':<7}")
        for k in ("pkgdep-vfs", "pkgdep-vfs [io_uring]"):
            faster = med["dpkg-depcheck"] / med[k]
            cells.append(f"{faster:5.1f}x {'met' if faster >= 5 else 'NOT met':<7}")
        print(f"  {name:<32} {med['plain']:8.3f} {med['pkgdep-vfs']:11.3f} {med['pkgdep-vfs [io_uring]']:9.3f} "
              f"{med['dpkg-depcheck']:9.3f}   {cells[0]} {cells[1]}   {cells[2]} {cells[3]}")
    print("  targets: pkgdep-vfs <= 2x plain; >= 5x faster than dpkg-depcheck")
    subprocess.run(["rm", "-rf", WORK])
    return 0


if __name__ == "__main__":
    sys.exit(main())
