#!/usr/bin/python3
"""Overlay benchmark: what changing a lower tree costs through ulsp's overlay layer
against the kernel's own overlayfs, on a copy of a real tree (default /usr/include,
~25k files, ~300 MB). Three workloads, each on a fresh mount with an empty upper
directory:

  copy-up   touch every file, listed first (each is copied up: data, attributes, link)
  rm        rm -r the whole tree (a whiteout for every file and directory)
  rename    rename every file to NAME.x (a copy-up and a whiteout each)

for kernel overlayfs (the baseline), ulsp's overlay in-process and isolated, and, with
--other BIN, the same two with another build of ulsp (an A/B in one run). Rounds
alternate the configurations; prints medians and time / overlayfs.

  bench/overlay_bench.py [--ulsp build/ulsp/core/ulsp] [--other OLD_BIN] [--tree /usr/include] [--rounds 3]
                         [--workloads copy-up,rm,rename]

The lower tree is read once before timing (a warm page cache). Needs root.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import timing

WORKLOADS = {
    # The list first: a directory's copy-up gives it a new inode number (as on
    # overlayfs without xino), which a find still walking it takes for an error.
    "copy-up": "find . -type f -print0 > ../list && xargs -0 touch -c < ../list",
    "rm": "rm -rf ./*",
    "rename": "/usr/bin/python3 -c 'import os\nfor d, _, fs in os.walk(\".\"):\n for f in fs: os.rename(os.path.join(d, f), os.path.join(d, f + \".x\"))'",
}


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--ulsp", default=os.path.join(here, "..", "build", "ulsp", "core", "ulsp"))
    ap.add_argument("--other", help="another ulsp binary, measured beside --ulsp")
    ap.add_argument("--tree", default="/usr/include")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="which to run, comma-separated")
    args = ap.parse_args()
    workloads = {}
    for w in args.workloads.split(","):
        if w not in WORKLOADS:
            sys.exit(f"overlay_bench: --workloads: no workload '{w}' (known: {', '.join(WORKLOADS)})")
        workloads[w] = WORKLOADS[w]
    binaries = [("", os.path.abspath(args.ulsp))]
    if args.other:
        binaries.append((" (other)", os.path.abspath(args.other)))
    for _, b in binaries:
        if not os.access(b, os.X_OK):
            sys.exit(f"overlay_bench: {b}: not built (run tools/build)")

    work = tempfile.mkdtemp(prefix="ulsp-overlay-bench.", dir=args.workdir)
    low, up, ovl_work, mnt = (os.path.join(work, d) for d in ("low", "up", "work", "mnt"))
    os.mkdir(mnt)
    print(f"copying {args.tree} to {low} ...", flush=True)
    run(["cp", "-a", args.tree, low])
    nfiles = int(subprocess.check_output(f"find {low} -type f | wc -l", shell=True))
    size = subprocess.check_output(["du", "-sh", low]).split()[0].decode()
    subprocess.run(f"tar -C {low} -cf - . | cat > /dev/null", shell=True, check=True)

    configs = [("overlayfs", None, [])]
    for suffix, b in binaries:
        configs.append(("ulsp overlay" + suffix, b, []))
        configs.append(("ulsp overlay, isolated" + suffix, b, ["--isolated"]))
    times = {(c[0], w): [] for c in configs for w in workloads}
    failed = {}  # (configuration, workload) -> what its last failure said
    errors = os.path.join(work, "stderr")
    try:
        for r in range(args.rounds):
            for w, cmd in workloads.items():
                for name, binary, extra in configs:
                    for d in (up, ovl_work):
                        shutil.rmtree(d, ignore_errors=True)
                        os.mkdir(d)
                    if binary is None:
                        run(["mount", "-t", "overlay", "overlay", "-o",
                             f"lowerdir={low},upperdir={up},workdir={ovl_work}", mnt])
                    else:
                        run([binary, "mount", *extra, "--stack", f"overlay:{up},passthrough:{low}", mnt])
                    try:
                        subprocess.run(["sync"], check=True)
                        with open(errors, "w+") as err:
                            try:
                                t = timing.timed(cmd, 900, check=True, shell=True, cwd=mnt,
                                                 stdout=subprocess.DEVNULL, stderr=err)
                            except subprocess.CalledProcessError as e:  # said, and the run goes on
                                err.seek(0)
                                first = err.readline().strip()
                                failed[(name, w)] = f"exit {e.returncode}: {first}"
                                t = float("nan")
                    finally:
                        if binary is None:
                            run(["umount", mnt])
                        else:
                            run([binary, "umount", mnt])
                    times[(name, w)].append(t)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.tree}: {nfiles} files, {size}; median of {args.rounds} rounds, seconds (x overlayfs)")
    width = max(len(c[0]) for c in configs)
    print(f"{'':{width}}  " + "  ".join(f"{w:>16}" for w in workloads))
    for name, _, _ in configs:
        cells = []
        for w in workloads:
            if (name, w) in failed:
                cells.append("failed")
                continue
            m = statistics.median(times[(name, w)])
            base = statistics.median(times[("overlayfs", w)])
            cells.append(f"{m:7.2f} s ({m / base:4.1f}x)")
        print(f"{name:{width}}  " + "  ".join(f"{c:>16}" for c in cells))
    for (name, w), why in failed.items():
        print(f"{name}, {w}: failed ({why})")


if __name__ == "__main__":
    main()
