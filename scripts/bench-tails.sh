#!/usr/bin/env bash
# What the format v2 tail rule costs (issue 10): small appends, 1-byte writes, stat and
# shrinking truncates through a mount of one cmkfs against a mount of another, interleaved on
# the same disk: ROUNDS short trials each (default 15), old and new back to back, and the median
# of the per-trial ratios (so both sides see the same load). Root and FUSE needed.
#
#   scripts/bench-tails.sh OLD_CMKFS NEW_CMKFS [ROUNDS]
#
# e.g. OLD_CMKFS built from c00a716 (format v1), NEW_CMKFS = target/release/cmkfs (format v2).
# Prints, per workload, the median operations per second of each and NEW/OLD with the middle
# half of the per-trial ratios; then, exactly, the system calls each daemon makes on the
# backing store per operation (strace), which the machine's load does not change.
set -euo pipefail

old=$(readlink -f "$1")
new=$(readlink -f "$2")
rounds=${3:-15}
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

python3 - "$work" "$rounds" <<'EOF'
import glob, json, os, random, re, signal, statistics, subprocess, sys, time

work, rounds = sys.argv[1], int(sys.argv[2])
mnt = {side: os.path.join(work, side, "mnt") for side in ("old", "new")}

def nothing(d):
    pass

def appends(d, n):
    """Appends of 100-byte records (a log): every one rewrites the last unit."""
    fd = os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    rec = os.urandom(100)
    t = time.perf_counter()
    for _ in range(n):
        os.write(fd, rec)
    dt = time.perf_counter() - t
    os.close(fd)
    return n / dt

def one_byte_files(d, n):
    """The issue's loop: open O_TRUNC, write 1 byte, close."""
    p = os.path.join(d, "one")
    t = time.perf_counter()
    for i in range(n):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, bytes([i & 255]))
        os.close(fd)
    return n / (time.perf_counter() - t)

def rmw_file(d):
    p = os.path.join(d, "rmw")
    if not os.path.exists(p):
        with open(p, "wb") as f:
            f.write(os.urandom((1 << 20) + 7))

def one_byte_pwrites(d, n):
    """One-byte pwrites at random offsets of a 1 MiB + 7 file (read-modify-write of a unit)."""
    fd = os.open(os.path.join(d, "rmw"), os.O_WRONLY)
    rng = random.Random(1)
    t = time.perf_counter()
    for _ in range(n):
        os.pwrite(fd, b"x", rng.randrange((1 << 20) + 7))
    dt = time.perf_counter() - t
    os.close(fd)
    return n / dt

def many_files(d):
    sub = os.path.join(d, "many")
    if not os.path.isdir(sub):
        os.mkdir(sub)
        for i in range(2000):
            with open(os.path.join(sub, f"f{i}"), "wb") as f:
                f.write(os.urandom(i % 97 + 1))
        os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")

def stats(d, n):
    """stat of files of odd sizes, dentry and inode caches dropped first (each stat is a
    LOOKUP: the daemon stats the backing file and decodes the size from its length)."""
    names = [os.path.join(d, "many", f"f{i}") for i in range(min(n, 2000))]
    t = time.perf_counter()
    for p in names:
        os.stat(p)
    return len(names) / (time.perf_counter() - t)

def shrink_file(d):
    with open(os.path.join(d, "shrink"), "wb") as f:
        f.write(os.urandom(1 << 20))

def shrinks(d, n):
    """Shrinking ftruncates of a 1 MiB file by 1..100 bytes (odd sizes)."""
    fd = os.open(os.path.join(d, "shrink"), os.O_WRONLY)
    size = 1 << 20
    rng = random.Random(2)
    t = time.perf_counter()
    for _ in range(n):
        size -= rng.randrange(1, 101)
        os.ftruncate(fd, size)
    dt = time.perf_counter() - t
    os.close(fd)
    return n / dt

# (name, untimed setup, measured run, operations per trial)
WORKLOADS = [("small appends (100 B)", nothing, appends, 4000),
             ("1-byte O_TRUNC files", nothing, one_byte_files, 600),
             ("1-byte pwrites in 1 MiB", rmw_file, one_byte_pwrites, 4000),
             ("stat, cold", many_files, stats, 2000),
             ("shrinking ftruncate", shrink_file, shrinks, 1500)]

# 1. Time: short trials, old and new back to back (order alternating), so both see the same
#    load; the figure is the median of the per-trial ratios, with their middle half.
print("throughput (operations/s, median of trials; new/old: median of per-trial ratios)")
for name, setup, fn, n in WORKLOADS:
    for side in ("old", "new"):  # warm-up
        setup(mnt[side])
        fn(mnt[side], n)
    res = {"old": [], "new": []}
    for r in range(rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for side in order:
            setup(mnt[side])
            res[side].append(fn(mnt[side], n))
    ratios = sorted(b / a for a, b in zip(res["old"], res["new"]))
    q = len(ratios) // 4
    print(f"  {name:26s} old {statistics.median(res['old']):9.0f}   new {statistics.median(res['new']):9.0f}"
          f"   new/old {statistics.median(ratios):5.2f} (middle half {ratios[q]:.2f}-{ratios[-1 - q]:.2f})")

# 2. Work per operation, exact: the daemon's system calls on the backing store (strace).
def daemon_pid(side):
    for rec in glob.glob(os.path.join(work, side, "home", "run", "mount-*.json")):
        if not rec.endswith(".status.json"):
            return json.load(open(rec))["pid"]

CALLS = "pread64,pwrite64,ftruncate,fstat,statx,newfstatat,openat,fsync,fdatasync"
print("backing-store system calls per operation (bytes read / written per operation)")
for name, setup, fn, n in WORKLOADS:
    n = min(n, 300)
    line = f"  {name:26s}"
    for side in ("old", "new"):
        setup(mnt[side])
        out = os.path.join(work, f"strace-{side}")
        st = subprocess.Popen(["strace", "-f", "-qq", "-e", f"trace={CALLS}", "-p", str(daemon_pid(side)), "-o", out])
        time.sleep(1.0)
        fn(mnt[side], n)
        time.sleep(0.5)
        st.send_signal(signal.SIGINT)
        st.wait()
        calls, rbytes, wbytes = {}, 0, 0
        for l in open(out):
            m = re.search(r"(\w+)\(.*\)\s+=\s+(-?\d+)", l)
            if not m or "/dev/fuse" in l:
                continue
            c = m.group(1)
            calls[c] = calls.get(c, 0) + 1
            if c == "pread64":
                rbytes += max(int(m.group(2)), 0)
            elif c == "pwrite64":
                wbytes += max(int(m.group(2)), 0)
        summary = " ".join(f"{c} {k / n:.1f}" for c, k in sorted(calls.items()))
        line += f"   {side}: {summary} ({rbytes / n:.0f} B / {wbytes / n:.0f} B)"
    print(line)
EOF
