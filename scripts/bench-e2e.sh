#!/usr/bin/env bash
# End-to-end throughput through the mounted filesystem: cmkfs beside gocryptfs (the reference
# encrypted FUSE filesystem) and the plain backing directory, with fio, plus a metadata job
# (create, stat, open+read, rename, unlink of small files in a tree 8 deep). Caches are
# dropped before every read job so reads really go through the filesystem.
#
#   scripts/bench-e2e.sh [SIZE_MIB]      (default 512; needs root, /dev/fuse; builds release)
#
#   CMKFS_BASELINE=/path/to/old/cmkfs    also mount this cmkfs binary (e.g. the previous
#                                        release) in the same run, for before/after ratios
#   NO_GOCRYPTFS=1                       skip gocryptfs (and do not install it)
#   ROUNDS=N                             repeat the whole table N times (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-512}
ROUNDS=${ROUNDS:-1}
need=()
command -v fio >/dev/null || need+=(fio)
[[ -n "${NO_GOCRYPTFS:-}" ]] || command -v gocryptfs >/dev/null || need+=(gocryptfs)
command -v fusermount3 >/dev/null || need+=(fuse3)
if [[ ${#need[@]} -gt 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
cargo build --release --quiet
B=$PWD/target/release/cmkfs
W=$(mktemp -d /tmp/cmkfs-bench-XXXXXX)
export CMKFS_HOME=$W/home
# The embedded vault is sealed under a passphrase: a random one for this run (0600).
(umask 077 && head -c 24 /dev/urandom | base64 >"$W/passphrase")
export CMKFS_PASSPHRASE_FILE=$W/passphrase
cleanup() {
    "$B" umount "$W/cmkfs" 2>/dev/null || umount -l "$W/cmkfs" 2>/dev/null || true
    "$B" umount "$W/baseline" 2>/dev/null || umount -l "$W/baseline" 2>/dev/null || true
    fusermount3 -u "$W/gocryptfs" 2>/dev/null || umount -l "$W/gocryptfs" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
fss=(plain cmkfs)
mkdir -p "$W/plain" "$W/cmkfs"
"$B" init "$W/cmkfs-cipher" >/dev/null 2>&1
"$B" mount "$W/cmkfs-cipher" "$W/cmkfs" >/dev/null
if [[ -n "${CMKFS_BASELINE:-}" ]]; then
    mkdir -p "$W/baseline"
    "$CMKFS_BASELINE" init "$W/baseline-cipher" >/dev/null 2>&1
    "$CMKFS_BASELINE" mount "$W/baseline-cipher" "$W/baseline" >/dev/null
    fss+=(baseline)
fi
if [[ -z "${NO_GOCRYPTFS:-}" ]]; then
    mkdir -p "$W/gocryptfs" "$W/gc-cipher"
    gocryptfs -q -init -extpass "echo bench" -scryptn 10 "$W/gc-cipher" >/dev/null
    gocryptfs -q -extpass "echo bench" "$W/gc-cipher" "$W/gocryptfs"
    fss+=(gocryptfs)
fi

job() { # dir name rw bs [extra...]
    local dir=$1 name=$2 rw=$3 bs=$4; shift 4
    [[ $rw == read || $rw == randread ]] && { sync; echo 3 >/proc/sys/vm/drop_caches; }
    fio --name="$name" --directory="$dir" --filename=bench.dat --rw="$rw" --bs="$bs" --size="${SIZE}M" \
        --ioengine=psync --numjobs=1 --output-format=json "$@" 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; r=j["read"] if j["read"]["io_bytes"] else j["write"]; print("%.0f %.0f" % (r["bw_bytes"]/1e6, r["iops"]))'
}

# Metadata operations per second: 8 directories deep, 400 files, each created (with 100
# bytes), stat'ed, opened and read, renamed, and unlinked; caches dropped before the stats.
meta() { # dir
    python3 - "$1" <<'EOF'
import os, sys, time
base = os.path.join(sys.argv[1], "meta")
d = base
for i in range(8):
    d = os.path.join(d, "level%d" % i)
os.makedirs(d)
names = [os.path.join(d, "f%04d" % i) for i in range(400)]
ops = 0
t0 = time.perf_counter()
for n in names:
    fd = os.open(n, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    os.write(fd, b"x" * 100)
    os.close(fd)
    ops += 1
t_create = time.perf_counter() - t0
os.sync()
open("/proc/sys/vm/drop_caches", "w").write("3")
t0 = time.perf_counter()
for n in names:
    os.stat(n)
    fd = os.open(n, os.O_RDONLY)
    os.read(fd, 200)
    os.close(fd)
    os.rename(n, n + ".r")
    os.unlink(n + ".r")
    ops += 4
elapsed = t_create + time.perf_counter() - t0
print("%.0f" % (ops / elapsed))
EOF
    rm -rf "$1/meta"
}

for ((r = 1; r <= ROUNDS; r++)); do
    printf "%-10s %16s %16s %18s %18s %14s\n" fs "seq write MB/s" "seq read MB/s" "rand 4k write IOPS" "rand 4k read IOPS" "metadata op/s"
    for fs in "${fss[@]}"; do
        d=$W/$fs
        sw=$(job "$d" sw write 1M --end_fsync=1)
        sr=$(job "$d" sr read 1M)
        rw=$(job "$d" rw randwrite 4k --runtime=10 --time_based)
        rr=$(job "$d" rr randread 4k --runtime=10 --time_based)
        rm -f "$d/bench.dat"
        md=$(meta "$d")
        printf "%-10s %16s %16s %18s %18s %14s\n" "$fs" "${sw% *}" "${sr% *}" "${rw#* }" "${rr#* }" "$md"
    done
done
echo "(fio psync, 1 job, ${SIZE} MiB file; $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%Y-%m-%d))"
