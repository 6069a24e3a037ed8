#!/usr/bin/env bash
# What the mount daemon spends per workload, for before/after comparisons of two builds in
# one run: daemon CPU time (user + system, from /proc, so a busy machine distorts it far less
# than wall-clock throughput) and the system calls it makes (strace -c). Runs are interleaved
# (A, B, A, B, ...) and the median is printed.
#
#   scripts/bench-daemon.sh BIN_A BIN_B [ROUNDS]    e.g. an older release and target/release/cmkfs
#
# Workloads: 512 MiB written in 1 MiB blocks + fsync; read back cold; 20000 random 4 KiB
# writes and reads (O_DIRECT, so each is one FUSE request); a metadata job (create, stat,
# open+read, rename, unlink of 400 files 8 directories deep, cold caches). Needs root.
set -euo pipefail
A=$(realpath "$1")
B=$(realpath "$2")
ROUNDS=${3:-3}
command -v strace >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace
}
W=$(mktemp -d "${TMPDIR:-/tmp}/cmkfs-benchd-XXXXXX")
export CMKFS_HOME=$W/home
# The embedded vault is sealed under a passphrase: a random one for this run (0600).
(umask 077 && head -c 24 /dev/urandom | base64 >"$W/passphrase")
export CMKFS_PASSPHRASE_FILE=$W/passphrase
cleanup() {
    for m in "$W"/mnt-*; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT

ticks() { # pid -> utime+stime in clock ticks (all threads)
    awk '{print $14 + $15}' "/proc/$1/stat"
}

daemon_of() { # mountpoint -> pid
    local f
    f=$(grep -l "\"mountpoint\": \"$1\"" "$CMKFS_HOME"/run/mount-*.json | grep -v status | head -1)
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f"
}

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

work() { # dir job
    local d=$1
    case $2 in
    write) dd if=/dev/zero of="$d/big" bs=1M count=512 conv=fsync status=none ;;
    read) drop; dd if="$d/big" of=/dev/null bs=1M status=none ;;
    rand4k) python3 - "$d" <<'EOF'
import os, random, sys, mmap
p = os.path.join(sys.argv[1], "r4k")
with open(p, "wb") as f:
    f.truncate(64 << 20)
fd = os.open(p, os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
rng = random.Random(1)
for i in range(10000):
    os.pwritev(fd, [buf], rng.randrange(0, 16384) * 4096)
for i in range(10000):
    os.preadv(fd, [buf], rng.randrange(0, 16384) * 4096)
os.close(fd)
os.unlink(p)
EOF
        ;;
    meta) python3 - "$d" <<'EOF'
import os, sys
d = os.path.join(sys.argv[1], "meta")
for i in range(8):
    d = os.path.join(d, "level%d" % i)
os.makedirs(d)
names = [os.path.join(d, "f%04d" % i) for i in range(400)]
for n in names:
    fd = os.open(n, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    os.write(fd, b"x" * 100)
    os.close(fd)
os.sync()
open("/proc/sys/vm/drop_caches", "w").write("3")
for n in names:
    os.stat(n)
    fd = os.open(n, os.O_RDONLY)
    os.read(fd, 200)
    os.close(fd)
    os.rename(n, n + ".r")
    os.unlink(n + ".r")
EOF
        rm -rf "$d/meta"
        ;;
    esac
}

jobs=(write read rand4k meta)
declare -A cpu
for bin in A B; do
    exe=${!bin}
    "$exe" init --key-size 2048 "$W/cipher-$bin" >/dev/null 2>&1
    mkdir -p "$W/mnt-$bin"
    "$exe" mount "$W/cipher-$bin" "$W/mnt-$bin" >/dev/null
done
for ((r = 0; r < ROUNDS; r++)); do
    for job in "${jobs[@]}"; do
        for bin in A B; do
            pid=$(daemon_of "$W/mnt-$bin")
            t0=$(ticks "$pid")
            work "$W/mnt-$bin" "$job"
            cpu[$bin,$job]+="$(($(ticks "$pid") - t0)) "
        done
    done
    rm -f "$W"/mnt-*/big
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
hz=$(getconf CLK_TCK)
printf "daemon CPU seconds, median of %d (A = %s, B = %s)\n" "$ROUNDS" "$A" "$B"
printf "%-8s %8s %8s %8s\n" job A B B/A
for job in "${jobs[@]}"; do
    a=$(echo "${cpu[A,$job]}" | median)
    b=$(echo "${cpu[B,$job]}" | median)
    awk -v j="$job" -v a="$a" -v b="$b" -v hz="$hz" \
        'BEGIN {printf "%-8s %8.2f %8.2f %8.2f\n", j, a/hz, b/hz, (a > 0 ? b/a : 0)}'
done
echo "clock ticks per round (1/$hz s), A | B:"
for job in "${jobs[@]}"; do
    printf "  %-8s %s| %s\n" "$job" "${cpu[A,$job]}" "${cpu[B,$job]}"
done

# System calls of the daemon per workload (one run each, under strace: slow, counts only).
echo
echo "daemon system calls per workload (strace -c -f), A / B"
for job in "${jobs[@]}"; do
    for bin in A B; do
        pid=$(daemon_of "$W/mnt-$bin")
        strace -f -c -q -p "$pid" -o "$W/strace-$bin-$job" &
        sp=$!
        sleep 1
        work "$W/mnt-$bin" "$job"
        kill -INT "$sp"
        wait "$sp" 2>/dev/null || true
    done
    [[ $job == write ]] || rm -f "$W"/mnt-*/big
    printf "%s:\n" "$job"
    join -a1 -a2 -e0 -o 0,1.2,2.2 \
        <(awk '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ {print $NF, $4}' "$W/strace-A-$job" | sort) \
        <(awk '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ {print $NF, $4}' "$W/strace-B-$job" | sort) |
        awk '{printf "  %-20s %9d %9d\n", $1, $2, $3}'
done
for bin in A B; do
    "${!bin}" umount "$W/mnt-$bin" >/dev/null
done
