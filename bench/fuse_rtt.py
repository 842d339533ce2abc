#!/usr/bin/python3
"""What one FUSE round trip costs on this machine, and how much of it is the CPUs:
bench/fuse_rtt (ioctl(TCGETS), then open+close, N each) on a file natively and
through `ulsp mount --stack passthrough:DIR`. Requests read from /dev/fuse
(`--no-io-uring`), with the program and the server

  unpinned      where the scheduler puts them
  two CPUs      program on CPU 0, server on CPU 1
  one CPU       both on CPU 0

and requests through FUSE over io_uring (the kernel switch turned on for that mount
only; the server's thread for each CPU is pinned there), with the program unpinned
and on CPU 0; then both transports with the stack in an isolated server process
(`--isolated`: one more hop, through a shared-memory port, and an open's descriptor
passed over a Unix socket). Every subject twice: calls back to back, and with the
program computing `--gap` µs before each call (so the server's CPUs may go idle in
between, as they do under a real program); the unpinned /dev/fuse mount once more
with its per-CPU readers never resting (ULSP_FUSE_REST=0, docs/vfs.md). Interleaved
rounds; prints medians in microseconds. Needs root.

  bench/fuse_rtt.py [--ulsp build/ulsp/core/ulsp] [--rtt build/bench/fuse_rtt] [--rounds 5] [-n 2000] [--gap 20]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import fuse_uring_switch

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ulsp", default=os.path.join(HERE, "..", "build", "ulsp", "core", "ulsp"))
    ap.add_argument("--rtt", default=os.path.join(HERE, "..", "build", "bench", "fuse_rtt"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--gap", type=float, default=20.0)
    args = ap.parse_args()
    gaps = [0.0, args.gap]
    ulsp, rtt = os.path.abspath(args.ulsp), os.path.abspath(args.rtt)
    work = tempfile.mkdtemp(prefix="ulsp-rtt.")
    src, mnt = os.path.join(work, "src"), os.path.join(work, "mnt")
    os.makedirs(src)
    os.makedirs(mnt)
    with open(os.path.join(src, "f"), "w") as f:
        f.write("x\n")
    # (name, server's CPUs or None, program's CPUs or None)
    subjects = [("native", None, None), ("unpinned", None, None), ("unpinned, no resting", None, None),
                ("two CPUs", "1", "0"), ("one CPU", "0", "0"),
                ("io_uring, unpinned", None, None), ("io_uring, CPU 0", None, "0"),
                ("isolated", None, None), ("io_uring, isolated", None, None)]
    results = {(name, gap): ([], []) for name, _, _ in subjects for gap in gaps}

    def pin(cpus, cmd):
        return (["taskset", "-c", cpus] if cpus else []) + cmd

    try:
        for _ in range(args.rounds):
            for name, server_cpus, program_cpus in subjects:
                path = os.path.join(src, "f")
                uring = name.startswith("io_uring")
                env = dict(os.environ, ULSP_FUSE_REST="0") if name.endswith("no resting") else None
                # The switch stays on while the mount lives: the kernel reads it when it
                # takes the INIT reply, which may come after `ulsp mount` returned.
                with fuse_uring_switch.enabled(uring):
                    if name != "native":
                        subprocess.run(pin(server_cpus, [ulsp, "mount", "--stack", "passthrough:" + src, mnt] +
                                           ([] if uring else ["--no-io-uring"]) +
                                           (["--isolated"] if name.endswith("isolated") else [])), check=True,
                                       env=env)
                        path = os.path.join(mnt, "f")
                    try:
                        for gap in gaps:
                            out = subprocess.run(pin(program_cpus, [rtt, path, str(args.n), str(gap)]), check=True,
                                                 capture_output=True, text=True).stdout.split()
                            results[(name, gap)][0].append(float(out[0]))
                            results[(name, gap)][1].append(float(out[1]))
                    finally:
                        if name != "native":
                            subprocess.run([ulsp, "umount", mnt], check=True)
    finally:
        subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", work])
    print(f"median of {args.rounds} interleaved rounds of {args.n} calls each; microseconds per call")
    print(f"  {'':<22} {'back to back':>26} {f'{args.gap:g} µs of work before each':>30}")
    print(f"  {'program and server':<22} {'ioctl(TCGETS)':>14} {'open+close':>11} {'ioctl(TCGETS)':>18} {'open+close':>11}")
    for name, _, _ in subjects:
        cells = []
        for gap in gaps:
            ioctl, opens = results[(name, gap)]
            cells.append(f"{statistics.median(ioctl):14.1f} {statistics.median(opens):11.1f}")
        print(f"  {name:<22} {cells[0]}    {cells[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
