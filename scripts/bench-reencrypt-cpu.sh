#!/usr/bin/env bash
# CPU time and wall time of offline re-encryptions by one or more cmkfs binaries, interleaved
# round by round on one volume (issue 13: a before/after comparison that the machine's load
# disturbs less than wall-clock MB/s: `perf stat`'s task-clock is the CPU the command used).
#
#   scripts/bench-reencrypt-cpu.sh MIB ROUNDS BIN [BIN...]
#
# The volume is made with the first binary (the tree of scripts/bench-reencrypt.sh); each
# round runs every binary once. Prints per run the re-encryption's own seconds (its report)
# and the task-clock (ms). Needs perf, root and FUSE.
set -euo pipefail
mib=$1; rounds=$2; shift 2
cmkfs=$1
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/cmkfs-bench-cpu.XXXXXX")
export CMKFS_HOME="$work/home"
(umask 077 && head -c 24 /dev/urandom | base64 >"$work/passphrase")
export CMKFS_PASSPHRASE_FILE=$work/passphrase
trap '"$cmkfs" umount "$work/mnt" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
mkdir -p "$work/mnt"
"$cmkfs" init "$work/cipher" --key-size 2048 >/dev/null 2>&1
"$cmkfs" mount "$work/cipher" "$work/mnt" >/dev/null
python3 "$(dirname "${BASH_SOURCE[0]}")/reencrypt_bench_tree.py" "$work/mnt" "$mib"
"$cmkfs" umount "$work/mnt" >/dev/null
sync
for r in $(seq 1 "$rounds"); do
  for b in "$@"; do
    s=$(perf stat -x, -e task-clock "$b" volume reencrypt "$work/cipher" --json 2>&1 >"$work/out.json" | awk -F, '{printf "%s=%s ", $3, $1}')
    sec=$(python3 -c "import json; print(round(json.load(open('$work/out.json'))['seconds'],3))")
    echo "round $r $(basename "$b"): inner ${sec}s $s"
  done
done
