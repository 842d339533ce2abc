#!/usr/bin/python3
"""Translation-agent benchmark (issue 5): two hosts on this machine, network
namespaces A and B joined by a veth pair. A real tree (a copy of /usr/include) lies
on B's side; from A it is read through

  local         `ulsp mount TREE` (passthrough, no network: the floor)
  remote        `ulsp mount --remote B:7700/tree`, agent on B, shared token (plain TCP)
  remote-tls    the same with mutual TLS (an encrypted link, as sshfs's is)
  sshfs         sshfs root@B:TREE, sshd started by this script in B (Debian's defaults,
                but no_contain_symlinks: Debian's sshfs refuses absolute and `..`
                symlink targets by default, and ulsp hands them on as they are)

Workloads: `find -printf %s` (lstat of every file) and `tar c` of the whole tree into
a pipe (every byte read). Every measurement is on a fresh mount, so no subject gains
from a cache an earlier one warmed; B's page cache is warm for all. Rounds alternate
between subjects; medians. Target: remote >= 1.5x faster than sshfs on both. Needs
root, iproute2, openssl, sshfs and openssh-server.

  bench/agent_bench.py [--ulsp build/ulsp/core/ulsp] [--rounds 3] [--tree /usr/include]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = "/var/tmp/ulsp-agent-bench"
A, B, VA, VB = "ulspbenchA", "ulspbenchB", "ulspbva", "ulspbvb"
ADDR_A, ADDR_B = "10.198.7.1", "10.198.7.2"


def sh(cmd, check=True, **kw):
    return subprocess.run(cmd, shell=True, check=check, **kw)


def in_a(cmd):
    return f"nsenter --net=/run/netns/{A} {cmd}"


def setup_hosts():
    teardown_hosts()
    sh(f"ip netns add {A} && ip netns add {B} && ip link add {VA} type veth peer name {VB} && "
       f"ip link set {VA} netns {A} && ip link set {VB} netns {B} && "
       f"ip -n {A} addr add {ADDR_A}/24 dev {VA} && ip -n {B} addr add {ADDR_B}/24 dev {VB} && "
       f"ip -n {A} link set {VA} up && ip -n {B} link set {VB} up && ip -n {A} link set lo up && ip -n {B} link set lo up")


def teardown_hosts():
    sh(f"ip netns del {A} 2>/dev/null; ip netns del {B} 2>/dev/null", check=False)


def make_keys():
    d = WORK
    ssl = "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
    sh(f"{ssl} -x509 -days 2 -subj /CN=bench-ca -keyout {d}/ca.key -out {d}/ca.pem 2>/dev/null")
    for name in ("agent", "client"):
        sh(f"{ssl} -subj /CN={name} -keyout {d}/{name}.key -out {d}/{name}.csr 2>/dev/null && "
           f"printf 'subjectAltName=IP:{ADDR_B},DNS:{ADDR_B}' > {d}/{name}.ext && "
           f"openssl x509 -req -in {d}/{name}.csr -CA {d}/ca.pem -CAkey {d}/ca.key -CAcreateserial -days 2 "
           f"-extfile {d}/{name}.ext -out {d}/{name}.pem 2>/dev/null")
    with open(f"{d}/token", "w") as f:
        f.write("bench-token\n")
    # Secrets are their owner's alone, or ulsp refuses them (as ssh does a private key).
    sh(f"chmod 600 {d}/token {d}/*.key")
    sh(f"ssh-keygen -q -t ed25519 -N '' -f {d}/host_key && ssh-keygen -q -t ed25519 -N '' -f {d}/user_key")
    shutil.copy(f"{d}/user_key.pub", f"{d}/authorized_keys")
    with open(f"{d}/sshd_config", "w") as f:
        f.write(f"ListenAddress {ADDR_B}:22\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
                "Subsystem sftp internal-sftp\nPidFile none\n")


def start_servers(ulsp, tree):
    os.makedirs("/run/sshd", exist_ok=True)
    procs = []
    log = open(f"{WORK}/servers.log", "w")
    procs.append(subprocess.Popen(["ip", "netns", "exec", B, "/usr/sbin/sshd", "-D", "-e", "-f", f"{WORK}/sshd_config"],
                                  stdout=log, stderr=log))
    procs.append(subprocess.Popen(["ip", "netns", "exec", B, ulsp, "agent", "serve", "--listen", f"{ADDR_B}:7700",
                                   "--export", f"tree=passthrough:{tree}", "--token-file", f"{WORK}/token"],
                                  stdout=log, stderr=log))
    procs.append(subprocess.Popen(["ip", "netns", "exec", B, ulsp, "agent", "serve", "--listen", f"{ADDR_B}:7701",
                                   "--export", f"tree=passthrough:{tree}", "--tls-cert", f"{WORK}/agent.pem",
                                   "--tls-key", f"{WORK}/agent.key", "--tls-ca", f"{WORK}/ca.pem"],
                                  stdout=log, stderr=log))
    for port in (22, 7700, 7701):
        for _ in range(250):
            if sh(f"ip netns exec {B} ss -ltn | grep -q '{ADDR_B}:{port} '", check=False).returncode == 0:
                break
            time.sleep(0.02)
        else:
            raise SystemExit(f"agent_bench: nothing listens on {ADDR_B}:{port}; see {WORK}/servers.log")
    return procs


def mount_cmds(ulsp, tree, mnt):
    return {
        "local": f"{ulsp} mount {tree} {mnt}",
        "remote": in_a(f"{ulsp} mount --remote {ADDR_B}:7700/tree --token-file {WORK}/token {mnt}"),
        "remote-tls": in_a(f"{ulsp} mount --remote {ADDR_B}:7701/tree --tls-cert {WORK}/client.pem "
                           f"--tls-key {WORK}/client.key --tls-ca {WORK}/ca.pem {mnt}"),
        "sshfs": in_a(f"sshfs -o IdentityFile={WORK}/user_key,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,"
                      f"LogLevel=ERROR,no_contain_symlinks root@{ADDR_B}:{tree} {mnt}"),
    }


def unmount(mnt):
    for _ in range(100):
        if sh(f"umount {mnt} 2>/dev/null", check=False).returncode == 0 or not os.path.ismount(mnt):
            break
        time.sleep(0.05)
    if os.path.ismount(mnt):
        sh(f"umount -l {mnt}", check=False)


WORKLOADS = {
    "stat every file": "find {mnt} -printf '%s\\n' > /dev/null",
    "tar c": "set -o pipefail; tar -C {mnt} -cf - . | cat > /dev/null",
}


def measure(subject, mount, mnt, workload):
    sh(mount)
    try:
        t0 = time.perf_counter()
        run = subprocess.run(["bash", "-c", workload.format(mnt=mnt)], capture_output=True, text=True)
        took = time.perf_counter() - t0
        if run.returncode != 0:
            raise SystemExit(f"agent_bench: {subject}: '{workload.format(mnt=mnt)}' failed ({run.returncode}):\n"
                             + run.stderr[-2000:])
        print(f"  {subject}: {took:.3f} s", file=sys.stderr, flush=True)
        return took
    finally:
        unmount(mnt)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ulsp", default=os.path.join(HERE, "..", "build", "ulsp", "core", "ulsp"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", default="/usr/include")
    args = ap.parse_args()
    ulsp = os.path.abspath(args.ulsp)
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK + "/mnt")
    os.chmod(WORK, 0o700)
    tree, mnt = WORK + "/tree", WORK + "/mnt"
    sh(f"cp -a {args.tree} {tree}")
    files = int(subprocess.run(f"find {tree} | wc -l", shell=True, capture_output=True, text=True).stdout)
    size = subprocess.run(f"du -sh {tree} | cut -f1", shell=True, capture_output=True, text=True).stdout.strip()
    procs = []
    try:
        setup_hosts()
        make_keys()
        procs = start_servers(ulsp, tree)
        mounts = mount_cmds(ulsp, tree, mnt)
        results = {}
        for wname, workload in WORKLOADS.items():
            for k, m in mounts.items():  # warm B's page cache and the programs
                measure(k, m, mnt, workload)
            times = {k: [] for k in mounts}
            for _ in range(args.rounds):
                for k, m in mounts.items():
                    times[k].append(measure(k, m, mnt, workload))
            results[wname] = {k: statistics.median(v) for k, v in times.items()}
            med = results[wname]
            print(f"{wname}: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()), flush=True)
        print()
        print(f"tree: a copy of {args.tree}, {files} entries, {size}; veth between two network namespaces")
        print(f"median of {args.rounds} alternating rounds, each on a fresh mount; seconds")
        print(f"  {'workload':<16} {'local':>7} {'remote':>7} {'r-tls':>7} {'sshfs':>7}   "
              f"{'sshfs/remote':>12} {'sshfs/r-tls':>11} {'remote/local':>12}")
        for wname, med in results.items():
            plain = med["sshfs"] / med["remote"]
            tls = med["sshfs"] / med["remote-tls"]
            print(f"  {wname:<16} {med['local']:7.3f} {med['remote']:7.3f} {med['remote-tls']:7.3f} {med['sshfs']:7.3f}   "
                  f"{plain:11.2f}x {tls:10.2f}x {med['remote'] / med['local']:11.2f}x   "
                  f"{'(met)' if min(plain, tls) >= 1.5 else '(NOT met)'}")
        print("  target: remote >= 1.5x faster than sshfs on both (judged on the slower of token and TLS)")
    finally:
        if os.path.ismount(mnt):
            unmount(mnt)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        teardown_hosts()
        shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
