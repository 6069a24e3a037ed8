#!/usr/bin/env bash
# End-to-end throughput through the mounted filesystem: cmkfs beside gocryptfs (the reference
# encrypted FUSE filesystem) and the plain backing directory, with fio. Caches are dropped
# before every read job so reads really go through the filesystem.
#
#   scripts/bench-e2e.sh [SIZE_MIB]      (default 512; needs root, /dev/fuse; builds release)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-512}
need=()
command -v fio >/dev/null || need+=(fio)
command -v gocryptfs >/dev/null || need+=(gocryptfs)
command -v fusermount3 >/dev/null || need+=(fuse3)
if [[ ${#need[@]} -gt 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
cargo build --release --quiet
B=$PWD/target/release/cmkfs
W=$(mktemp -d /tmp/cmkfs-bench-XXXXXX)
export CMKFS_HOME=$W/home
cleanup() {
    "$B" umount "$W/cmkfs" 2>/dev/null || umount -l "$W/cmkfs" 2>/dev/null || true
    fusermount3 -u "$W/gocryptfs" 2>/dev/null || umount -l "$W/gocryptfs" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/plain" "$W/cmkfs" "$W/gocryptfs" "$W/gc-cipher"
"$B" init "$W/cmkfs-cipher" >/dev/null 2>&1
"$B" mount "$W/cmkfs-cipher" "$W/cmkfs" >/dev/null
gocryptfs -q -init -extpass "echo bench" -scryptn 10 "$W/gc-cipher" >/dev/null
gocryptfs -q -extpass "echo bench" "$W/gc-cipher" "$W/gocryptfs"

job() { # dir name rw bs [extra...]
    local dir=$1 name=$2 rw=$3 bs=$4; shift 4
    [[ $rw == read || $rw == randread ]] && { sync; echo 3 >/proc/sys/vm/drop_caches; }
    fio --name="$name" --directory="$dir" --filename=bench.dat --rw="$rw" --bs="$bs" --size="${SIZE}M" \
        --ioengine=psync --numjobs=1 --output-format=json "$@" 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; r=j["read"] if j["read"]["io_bytes"] else j["write"]; print("%.0f %.0f" % (r["bw_bytes"]/1e6, r["iops"]))'
}
printf "%-10s %16s %16s %18s %18s\n" fs "seq write MB/s" "seq read MB/s" "rand 4k write IOPS" "rand 4k read IOPS"
for fs in plain cmkfs gocryptfs; do
    d=$W/$fs
    sw=$(job "$d" sw write 1M --end_fsync=1)
    sr=$(job "$d" sr read 1M)
    rw=$(job "$d" rw randwrite 4k --runtime=10 --time_based)
    rr=$(job "$d" rr randread 4k --runtime=10 --time_based)
    printf "%-10s %16s %16s %18s %18s\n" "$fs" "${sw% *}" "${sr% *}" "${rw#* }" "${rr#* }"
    rm -f "$d/bench.dat"
done
echo "(fio psync, 1 job, ${SIZE} MiB file; $(nproc) cores; $(date -u +%Y-%m-%d))"
