#!/usr/bin/env bash
# What the format v2 tail rule costs (issue 10): small appends, 1-byte writes, stat and
# shrinking truncates through a mount of one cmkfs against a mount of another, interleaved on
# the same disk, median of ROUNDS rounds each. Root and FUSE needed.
#
#   scripts/bench-tails.sh OLD_CMKFS NEW_CMKFS [ROUNDS]
#
# e.g. OLD_CMKFS built from c00a716 (format v1), NEW_CMKFS = target/release/cmkfs (format v2).
# Prints one line per workload: operations per second for each, and NEW/OLD.
set -euo pipefail

old=$(readlink -f "$1")
new=$(readlink -f "$2")
rounds=${3:-5}
work=$(mktemp -d /tmp/cmkfs-bench-tails.XXXXXX)
cleanup() {
    for side in old new; do
        CMKFS_HOME="$work/$side/home" "${!side}" umount "$work/$side/mnt" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

for side in old new; do
    mkdir -p "$work/$side/mnt"
    CMKFS_HOME="$work/$side/home" "${!side}" init "$work/$side/cipher" --key-size 2048 >/dev/null 2>&1
    CMKFS_HOME="$work/$side/home" "${!side}" mount "$work/$side/cipher" "$work/$side/mnt" >/dev/null
done

python3 - "$work/old/mnt" "$work/new/mnt" "$rounds" <<'EOF'
import os, random, statistics, sys, time

old, new, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])

def appends(d):
    """20000 appends of 100-byte records (a log): every one rewrites the last unit."""
    p = os.path.join(d, "log")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    rec = os.urandom(100)
    t = time.perf_counter()
    for _ in range(20000):
        os.write(fd, rec)
    dt = time.perf_counter() - t
    os.close(fd)
    return 20000 / dt

def one_byte_files(d):
    """3000 x the issue's loop: open O_TRUNC, write 1 byte, close."""
    p = os.path.join(d, "one")
    t = time.perf_counter()
    for i in range(3000):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, bytes([i & 255]))
        os.close(fd)
    return 3000 / (time.perf_counter() - t)

def one_byte_pwrites(d):
    """20000 one-byte pwrites at random offsets of a 1 MiB + 7 file (read-modify-write)."""
    p = os.path.join(d, "rmw")
    with open(p, "wb") as f:
        f.write(os.urandom((1 << 20) + 7))
    fd = os.open(p, os.O_WRONLY)
    rng = random.Random(1)
    t = time.perf_counter()
    for _ in range(20000):
        os.pwrite(fd, b"x", rng.randrange((1 << 20) + 7))
    dt = time.perf_counter() - t
    os.close(fd)
    return 20000 / dt

def stats(d):
    """stat of 2000 files of odd sizes, dentry and inode caches dropped first (each stat is a
    LOOKUP that stats the backing file and decodes its length)."""
    sub = os.path.join(d, "many")
    if not os.path.isdir(sub):
        os.mkdir(sub)
        for i in range(2000):
            with open(os.path.join(sub, f"f{i}"), "wb") as f:
                f.write(os.urandom(i % 97 + 1))
    names = [os.path.join(sub, f"f{i}") for i in range(2000)]
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    t = time.perf_counter()
    for n in names:
        os.stat(n)
    return 2000 / (time.perf_counter() - t)

def shrinks(d):
    """5000 shrinking ftruncates of a 4 MiB file by 1..100 bytes (odd sizes)."""
    p = os.path.join(d, "shrink")
    with open(p, "wb") as f:
        f.write(os.urandom(4 << 20))
    fd = os.open(p, os.O_WRONLY)
    size = 4 << 20
    rng = random.Random(2)
    t = time.perf_counter()
    for _ in range(5000):
        size -= rng.randrange(1, 101)
        os.ftruncate(fd, size)
    dt = time.perf_counter() - t
    os.close(fd)
    return 5000 / dt

for name, fn in [("small appends (100 B)", appends), ("1-byte O_TRUNC files", one_byte_files),
                 ("1-byte pwrites in 1 MiB", one_byte_pwrites), ("stat, cold", stats),
                 ("shrinking ftruncate", shrinks)]:
    res = {"old": [], "new": []}
    for r in range(rounds):
        order = (("old", old), ("new", new))
        for side, d in (order if r % 2 == 0 else order[::-1]):
            res[side].append(fn(d))
    o, n = statistics.median(res["old"]), statistics.median(res["new"])
    print(f"{name:26s} old {o:9.0f}/s   new {n:9.0f}/s   new/old {n / o:5.2f}")
EOF
