#!/usr/bin/python3
"""Networking benchmark (issue 4), baselines in the same run:

 1. What a connect costs: bench/connect_bench makes N TCP connections to a server on
    the host's loopback, natively, through a minimal seccomp supervisor that only
    answers CONTINUE (the floor: what the kernel's notification round trip alone
    adds, whatever a supervisor does), and from inside an `ulsp run` group whose
    rule allows it (the connect goes through the seccomp shim and the net ULSP, which
    decides and makes it). Rounds alternate; medians of the per-round medians.
 2. Bulk TCP throughput: iperf3 from inside a group, natively, from a network
    namespace behind slirp4netns, and behind pasta (passt), to an iperf3 server on
    the host; rounds alternate.

Prints the figures, the ratios and the issue's targets (connect adds <= 15 us;
throughput >= 0.95x native and >= 3x slirp4netns). Needs root.

  bench/net_bench.py [--ulsp build/ulsp/core/ulsp] [--connects 2000] [--seconds 5] [--rounds 3]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_times():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:8]), fields[7]


def policy(path, ports):
    rules = "".join(
        f'[[group.bench.net]]\naction = "allow"\nproto = "tcp"\nto = "127.0.0.1/32"\nports = {p}\n' for p in ports)
    with open(path, "w") as f:
        f.write('[group.bench]\nnet_default = "deny"\n' + rules)


def connect_figures(out):
    m = re.search(r"^connect p50 ([\d.]+) us mean ([\d.]+) us", out, re.M)
    w = re.search(r"^socket\+connect\+close p50 ([\d.]+) us mean ([\d.]+) us", out, re.M)
    return float(m.group(1)), float(w.group(1))


def iperf_gbits(out):
    m = re.findall(r"([\d.]+) (G|M)bits/sec\s+receiver", out)
    if not m:
        raise RuntimeError("iperf3 printed no result:\n" + out)
    value, unit = m[-1]
    return float(value) / (1000 if unit == "M" else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ulsp", default=os.path.join(HERE, "..", "build", "ulsp", "core", "ulsp"))
    ap.add_argument("--connect-bench", default=os.path.join(HERE, "..", "build", "bench", "connect_bench"))
    ap.add_argument("--connects", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["connect", "throughput"])
    args = ap.parse_args()
    ulsp = os.path.abspath(args.ulsp)
    cb = os.path.abspath(args.connect_bench)
    work = tempfile.mkdtemp(prefix="ulsp-netbench.")
    procs, netns = [], []
    total0, steal0 = cpu_times()
    try:
        if args.only != "throughput":
            port = free_port()
            server = subprocess.Popen([cb, "serve", str(port)], stdout=subprocess.PIPE, text=True)
            procs.append(server)
            server.stdout.readline()
            pol = os.path.join(work, "connect.toml")
            policy(pol, [port])
            native, floor, group = [], [], []
            for r in range(args.rounds):
                out = subprocess.run([cb, "connect", "127.0.0.1", str(port), str(args.connects)],
                                     check=True, capture_output=True, text=True).stdout
                native.append(connect_figures(out))
                out = subprocess.run([cb, "floor", "127.0.0.1", str(port), str(args.connects)],
                                     check=True, capture_output=True, text=True).stdout
                floor.append(connect_figures(out))
                out = subprocess.run([ulsp, "run", "--policy", pol, "--", cb, "connect", "127.0.0.1", str(port),
                                      str(args.connects)], check=True, capture_output=True, text=True).stdout
                group.append(connect_figures(out))
                print(f"round {r + 1}: connect p50 native {native[-1][0]:.1f} us, CONTINUE-only supervisor "
                      f"{floor[-1][0]:.1f} us, in a group {group[-1][0]:.1f} us", flush=True)
            n_c = statistics.median(x[0] for x in native)
            f_c = statistics.median(x[0] for x in floor)
            g_c = statistics.median(x[0] for x in group)
            n_w = statistics.median(x[1] for x in native)
            g_w = statistics.median(x[1] for x in group)
            print()
            print(f"connect, p50 of {args.connects} per round, median of {args.rounds} rounds:")
            print(f"  native                          {n_c:8.1f} us   socket+connect+close {n_w:8.1f} us")
            print(f"  seccomp notification, CONTINUE  {f_c:8.1f} us   (adds {f_c - n_c:.1f} us: the floor)")
            print(f"  in an ulsp group                {g_c:8.1f} us   socket+connect+close {g_w:8.1f} us")
            print(f"  added by ulsp                   {g_c - n_c:8.1f} us   (target <= 15 us: "
                  f"{'met' if g_c - n_c <= 15 else 'NOT met'}); {(g_c - n_c) / max(0.1, f_c - n_c):.1f}x the floor;"
                  f" socket+connect+close adds {g_w - n_w:.1f} us")
            print()

        if args.only != "connect":
            port = free_port()
            iperf_server = subprocess.Popen(["iperf3", "-s", "-p", str(port), "--bind", "127.0.0.1"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(iperf_server)
            time.sleep(0.5)
            pol = os.path.join(work, "iperf.toml")
            policy(pol, [port])
            # slirp4netns and pasta each serve a network namespace of their own; both
            # map an address of theirs to the host's loopback.
            subprocess.run(["ip", "netns", "add", "ulspbench-slirp"], check=True)
            netns.append("ulspbench-slirp")
            procs.append(subprocess.Popen(["slirp4netns", "--configure", "--mtu=65520", "--netns-type=path",
                                           "/run/netns/ulspbench-slirp", "tap0"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            subprocess.run(["ip", "netns", "add", "ulspbench-pasta"], check=True)
            netns.append("ulspbench-pasta")
            subprocess.run(["pasta", "--runas", "0", "--config-net", "-q", "--netns", "ulspbench-pasta"], check=True)
            time.sleep(1)
            gw = subprocess.run(["ip", "netns", "exec", "ulspbench-pasta", "ip", "route", "show", "default"],
                                check=True, capture_output=True, text=True).stdout.split()[2]
            client = ["iperf3", "-c", "{host}", "-p", str(port), "-t", str(args.seconds)]
            subjects = {
                "native": ("127.0.0.1", []),
                "ulsp group": ("127.0.0.1", [ulsp, "run", "--policy", pol, "--"]),
                "slirp4netns": ("10.0.2.2", ["ip", "netns", "exec", "ulspbench-slirp"]),
                "pasta": (gw, ["ip", "netns", "exec", "ulspbench-pasta"]),
            }
            results = {k: [] for k in subjects}
            for r in range(args.rounds):
                line = []
                for name, (host, prefix) in subjects.items():
                    cmd = prefix + [c.format(host=host) for c in client]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=args.seconds + 60).stdout
                    results[name].append(iperf_gbits(out))
                    line.append(f"{name} {results[name][-1]:.2f}")
                print(f"round {r + 1}: Gbit/s " + ", ".join(line), flush=True)
            med = {k: statistics.median(v) for k, v in results.items()}
            print()
            print(f"bulk TCP throughput (iperf3, {args.seconds} s, median of {args.rounds} rounds), to the host's loopback:")
            for k, v in med.items():
                print(f"  {k:<12} {v:7.2f} Gbit/s   {v / med['native']:5.2f}x native")
            ratio_native = med["ulsp group"] / med["native"]
            ratio_slirp = med["ulsp group"] / med["slirp4netns"]
            print(f"  ulsp group / native      {ratio_native:.2f}  (target >= 0.95: {'met' if ratio_native >= 0.95 else 'NOT met'})")
            print(f"  ulsp group / slirp4netns {ratio_slirp:.2f}  (target >= 3: {'met' if ratio_slirp >= 3 else 'NOT met'})")
            print(f"  ulsp group / pasta       {med['ulsp group'] / med['pasta']:.2f}")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["pkill", "-f", "pasta.*ulspbench-pasta"], stderr=subprocess.DEVNULL)
        for ns in netns:
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", work])
    total1, steal1 = cpu_times()
    print(f"\nCPU time stolen by the hypervisor during the run: {100 * (steal1 - steal0) / max(1, total1 - total0):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
