#!/bin/bash
# What an isolated mount's files-without-a-name support costs (docs/vfs.md, "Isolated
# mode"): on a fresh isolated passthrough mount, from python, the mean of
#  - open+close of one file, 20,000 times;
#  - create, close, unlink, 5,000 times (no file open at the unlink);
#  - create, unlink, close, 5,000 times (the file open at the unlink: without kernel
#    passthrough the mount asks the server to lend its descriptor first, kLend).
# Usage: bench/isolated_unlink_bench.sh ULSP_BINARY kpt|nokpt
# Run two binaries alternately for an A/B: the machine's noise is larger than the
# difference of one round trip.
set -eu
B=${1:?usage: $0 ULSP_BINARY kpt|nokpt}
case ${2:-} in
  kpt) opt="" ;;
  nokpt) opt=--no-kernel-passthrough ;;
  *) echo "usage: $0 ULSP_BINARY kpt|nokpt" >&2; exit 2 ;;
esac
D=$(mktemp -d /tmp/ulsp-unlink-bench.XXXXXX)
trap '"$B" umount "$D/mnt" 2>/dev/null || true; rm -rf "$D"' EXIT
mkdir "$D/src" "$D/mnt"
echo x > "$D/src/f"
"$B" mount --isolated $opt --stack "passthrough:$D/src" "$D/mnt"
/usr/bin/python3 - "$D/mnt" <<'PY'
import os, sys, time
m = sys.argv[1]
def t(n, f):
    f(); s = time.perf_counter()
    for i in range(n): f()
    return (time.perf_counter() - s) / n * 1e6
p = m + "/f"
oc = t(20000, lambda: os.close(os.open(p, os.O_RDONLY)))
def closed_unlink():
    q = m + "/g"; fd = os.open(q, os.O_WRONLY | os.O_CREAT, 0o644); os.close(fd); os.unlink(q)
def open_unlink():
    q = m + "/h"; fd = os.open(q, os.O_WRONLY | os.O_CREAT, 0o644); os.unlink(q); os.close(fd)
cu = t(5000, closed_unlink)
ou = t(5000, open_unlink)
print(f"open+close {oc:.1f} us; create,close,unlink {cu:.1f} us; create,unlink,close {ou:.1f} us")
PY
