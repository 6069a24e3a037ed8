#!/usr/bin/env bash
# Re-encryption throughput (issue 13) beside a plain copy of the same backing tree on the same
# disk: ROUNDS trials (default 3), each `cmkfs volume reencrypt` of the volume (offline, then
# online through a mount), and `cp -a` of its backing directory to a sibling directory followed
# by `sync -f` (a re-encryption makes its batches durable too), back to back so that both see
# the same load. Prints per trial the MB/s of each (backing bytes / wall seconds) and the
# ratio reencrypt / cp, then the median ratio. Root and FUSE needed for the online trials.
#
#   scripts/bench-reencrypt.sh [MIB] [ROUNDS]        (default 256 MiB of files, 3 rounds)
#
# CMKFS: the binary (default target/release/cmkfs, built if missing). BENCH_DIR: where the
# volume lives (default a temp dir under /var/tmp, i.e. the root disk). CMKFS_BASELINE:
# another cmkfs binary (e.g. a build of an older commit) whose offline re-encryption is timed
# in the same rounds, for a before/after ratio taken under the same load. BENCH_ONLINE=1:
# the online trials too, otherwise they are skipped.
set -euo pipefail

mib=${1:-256}
rounds=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
cmkfs=${CMKFS:-$root/target/release/cmkfs}
if [[ ! -x $cmkfs ]]; then
    (cd "$root" && cargo build --release --quiet)
fi
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/cmkfs-bench-reencrypt.XXXXXX")
export CMKFS_HOME="$work/home"
# The embedded vault is sealed under a passphrase: a random one for this run (0600).
(umask 077 && head -c 24 /dev/urandom | base64 >"$work/passphrase")
export CMKFS_PASSPHRASE_FILE=$work/passphrase
cleanup() {
    "$cmkfs" umount "$work/mnt" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/mnt"
"$cmkfs" init "$work/cipher" --key-size 2048 >/dev/null 2>&1
"$cmkfs" mount "$work/cipher" "$work/mnt" >/dev/null

# A tree like a home directory: many small files, some medium, a few large (sizes drawn
# from a fixed seed), filled with random data through the mount.
python3 "$(dirname "${BASH_SOURCE[0]}")/reencrypt_bench_tree.py" "$work/mnt" "$mib"
"$cmkfs" umount "$work/mnt" >/dev/null
bytes=$(du -sb "$work/cipher" | cut -f1)
files=$(find "$work/cipher" -type f | wc -l)
echo "backing tree: $files files, $((bytes >> 20)) MiB ($(df -T "$work" | awk 'NR==2{print $2}') on $(df "$work" | awk 'NR==2{print $1}')), $(nproc) cores"

now() { date +%s.%N; }
mbs() { python3 -c "import sys; print('%.0f' % ($bytes / 1e6 / (float(sys.argv[2]) - float(sys.argv[1]))))" "$1" "$2"; }
copy() {
    rm -rf "$work/copy"
    local t0 t1
    t0=$(now)
    cp -a "$work/cipher" "$work/copy"
    sync -f "$work/copy"
    t1=$(now)
    rm -rf "$work/copy"
    mbs "$t0" "$t1"
}
# Wall-clock MB/s of the whole command (unsealing the vault, unwrapping included); the
# command's own report (`seconds`: the re-encryption alone) goes to $work/last.json.
reencrypt() {
    local t0 t1
    t0=$(now)
    "${bin:-$cmkfs}" volume reencrypt "$work/cipher" "$@" --json >"$work/last.json"
    t1=$(now)
    mbs "$t0" "$t1"
}
baseline=${CMKFS_BASELINE:-}
inner() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('%.0f' % ($bytes / 1e6 / r['seconds']))" "$work/last.json"; }

ratios=()
online_ratios=()
inner_ratios=()
printf '%-6s %11s %13s %7s %15s %7s %12s %7s\n' round "cp -a MB/s" "offline MB/s" ratio "(inner MB/s)" ratio "online MB/s" ratio
for r in $(seq 1 "$rounds"); do
    sync
    c=$(copy)
    off=$(reencrypt)
    in=$(inner)
    if [[ ${BENCH_ONLINE:-0} == 1 ]]; then
        "$cmkfs" mount "$work/cipher" "$work/mnt" >/dev/null
        on=$(reencrypt --online)
        "$cmkfs" umount "$work/mnt" >/dev/null
        oratio=$(python3 -c "print('%.2f' % ($on / $c))")
        online_ratios+=("$oratio")
    else
        on=- oratio=-
    fi
    ratio=$(python3 -c "print('%.2f' % ($off / $c))")
    iratio=$(python3 -c "print('%.2f' % ($in / $c))")
    ratios+=("$ratio")
    inner_ratios+=("$iratio")
    printf '%-6s %11s %13s %7s %15s %7s %12s %7s\n' "$r" "$c" "$off" "$ratio" "$in" "$iratio" "$on" "$oratio"
    if [[ -n $baseline ]]; then
        b=$(bin=$baseline reencrypt)
        bi=$(inner)
        printf '%-6s baseline %s: offline %s MB/s (%s / cp -a), the re-encryption alone %s MB/s (%s)\n' \
            "$r" "$(basename "$baseline")" "$b" "$(python3 -c "print('%.2f' % ($b / $c))")" \
            "$bi" "$(python3 -c "print('%.2f' % ($bi / $c))")"
    fi
done
python3 - "${ratios[*]}" "${inner_ratios[*]}" "${online_ratios[*]}" <<'EOF'
import statistics, sys
off, inner, on = ([float(x) for x in a.split()] for a in sys.argv[1:4])
online = f"{statistics.median(on):.2f}" if on else "not run"
print(f"median reencrypt / cp -a: offline {statistics.median(off):.2f} (the re-encryption "
      f"alone {statistics.median(inner):.2f}), online {online} (target >= 0.50)")
EOF
"$cmkfs" fsck "$work/cipher" >/dev/null && echo "fsck: clean"
