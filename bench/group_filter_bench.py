#!/usr/bin/python3
"""What a group's seccomp filter costs a system call that it lets through.

`dd if=/dev/zero of=/dev/null bs=1 count=N` makes 2N read/write calls, which the
filter passes to the kernel after walking its rules. It runs natively and in a group
(`ulsp run`, a policy with no mounts) of each ULSP binary given, interleaved for
--rounds rounds; the median seconds of each, the group's extra time per system call
((group - native) / 2N), and each binary's ratio to the first are printed. A group's
fixed cost (its namespaces, about 20 ms) is measured with N = 1 and taken off.

  bench/group_filter_bench.py --ulsp build/ulsp/core/ulsp [--ulsp OTHER] [--calls 2000000] [--rounds 5]
"""
import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ulsp", action="append", required=True, help="a ulsp binary (repeat to compare)")
    ap.add_argument("--calls", type=int, default=2_000_000, help="read+write pairs (dd's count)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        policy = os.path.join(d, "p.toml")
        with open(policy, "w") as f:
            f.write('[group.bench]\nnet_default = "deny"\n')
        dd = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1"]
        quiet = {"stdout": open(os.devnull, "w"), "stderr": open(os.devnull, "w")}
        subjects = {"native": lambda n: dd + [f"count={n}"]}
        for u in args.ulsp:
            subjects[u] = lambda n, u=u: [u, "run", "--policy", policy, "--"] + dd + [f"count={n}"]
        times = {k: [] for k in subjects}
        fixed = {k: [] for k in subjects}
        for _ in range(args.rounds):
            for name, cmd in subjects.items():
                fixed[name].append(timed(cmd(1), 60, check=True, **quiet))
                times[name].append(timed(cmd(args.calls), 600, check=True, **quiet))
    native = statistics.median(times["native"]) - statistics.median(fixed["native"])
    print(f"{'subject':40} {'median s':>9} {'fixed s':>8} {'ns/call extra':>14}")
    first = None
    for name in subjects:
        t, f0 = statistics.median(times[name]), statistics.median(fixed[name])
        extra = ((t - f0) - native) / (2 * args.calls) * 1e9
        line = f"{name[-40:]:40} {t:9.3f} {f0:8.3f} {extra:14.1f}"
        if name != "native":
            if first is None:
                first = t - f0
            line += f"   x{(t - f0) / first:.3f} of the first"
        print(line)


if __name__ == "__main__":
    main()
