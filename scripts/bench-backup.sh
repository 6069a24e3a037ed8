#!/usr/bin/env bash
# Backup and restore throughput beside plain `tar` of the same backing tree, on the same disk,
# in one run (issue 13, figures in README "Backup and restore").
#
#   scripts/bench-backup.sh [CMKFS_BINARY] [DATA_MB]
#
# Makes a volume with DATA_MB of data (a few large files, many small ones, one sparse file),
# then times, with the page cache dropped before each step:
#   cmkfs backup        vs  tar --sparse --xattrs -cf   (of the backing directory)
#   cmkfs restore       vs  tar --xattrs -xf            (into a new directory)
#   cmkfs restore --new-dek
# then rewrites ~1% of the files (every 100th 16 KiB file) through a mount and
# times, on that changed volume:
#   cmkfs backup --incremental-from (the first archive)  vs  a full cmkfs backup
#   cmkfs restore of the chain (full + incremental)     vs  cmkfs restore of the full backup
# and prints MB/s of data (the volume's backing bytes) for each, the ratios, the archive
# sizes, and `uptime` before and after (other load on the machine skews the figures).
# Run it as root on an otherwise idle machine; it cleans up after itself.
set -euo pipefail

BIN=${1:-target/release/cmkfs}
MB=${2:-256}
BIN=$(readlink -f "$BIN")
[ -x "$BIN" ] || { echo "no cmkfs binary at $BIN (cargo build --release)" >&2; exit 2; }
command -v tar >/dev/null || { echo "needs GNU tar" >&2; exit 2; }

W=$(mktemp -d "${TMPDIR:-/tmp}/cmkfs-bench-backup.XXXXXX")
cleanup() {
    for m in "$W/mnt"; do mountpoint -q "$m" 2>/dev/null && "$BIN" umount "$m" >/dev/null 2>&1 || true; done
    rm -rf "$W"
}
trap cleanup EXIT
export CMKFS_HOME=$W/home CMKFS_PASSPHRASE_FILE=$W/pp CMKFS_VAULT_KDF=test
mkdir -m 700 "$W/home" "$W/cipher" "$W/mnt"
echo "bench passphrase" > "$W/pp"; chmod 600 "$W/pp"

c() { "$BIN" "$@"; }
c init "$W/cipher" --key-size 2048 >/dev/null
c vault config --purge-protection on >/dev/null
c vault key create bkey --key-size 2048 >/dev/null
c vault key create dkey --key-size 2048 >/dev/null
c des create d --key dkey >/dev/null

c mount "$W/cipher" "$W/mnt" >/dev/null
big=$(( MB * 3 / 4 / 4 ))
for i in 1 2 3 4; do head -c "${big}M" /dev/urandom > "$W/mnt/big$i"; done
mkdir -p "$W/mnt/small"
n=$(( MB * 1024 / 4 / 16 ))   # a quarter of the data in 16 KiB files
for i in $(seq 1 "$n"); do head -c 16384 /dev/urandom > "$W/mnt/small/f$i"; done
truncate -s 1G "$W/mnt/sparse"; echo tail >> "$W/mnt/sparse"
c umount "$W/mnt" >/dev/null

data=$(du -sb --apparent-size "$W/cipher" | cut -f1)
alloc=$(( $(du -sk "$W/cipher" | cut -f1) * 1024 ))
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
t() { local s e; drop; s=$(date +%s.%N); "$@" >/dev/null; sync; e=$(date +%s.%N); awk "BEGIN{print $e - $s}"; }
mbs() { awk "BEGIN{printf \"%.0f\", $alloc / $1 / 1000000}"; }

echo "before: $(uptime)"
tb=$(t c backup "$W/cipher" "$W/a.tar" --key bkey)
tt=$(t tar --sparse --xattrs --xattrs-include='*' -cf "$W/p.tar" -C "$W/cipher" .)
tr=$(t c restore "$W/a.tar" "$W/r1" --des d)
mkdir "$W/r2"
tx=$(t tar --xattrs --xattrs-include='*' -xf "$W/p.tar" -C "$W/r2")
tn=$(t c restore "$W/a.tar" "$W/r3" --des d --new-dek)

printf 'volume: %s MB of backing data (%s MB allocated; a 1 GiB sparse file besides)\n' \
    "$((data / 1000000))" "$((alloc / 1000000))"
printf 'archive: cmkfs %s MB, tar %s MB\n' "$(( $(stat -c %s "$W/a.tar") / 1000000 ))" \
    "$(( $(stat -c %s "$W/p.tar") / 1000000 ))"
printf '%-26s %8s %8s\n' step seconds 'MB/s'
printf '%-26s %8.2f %8s\n' 'cmkfs backup' "$tb" "$(mbs "$tb")"
printf '%-26s %8.2f %8s\n' 'tar -c (same tree)' "$tt" "$(mbs "$tt")"
printf '%-26s %8.2f %8s\n' 'cmkfs restore' "$tr" "$(mbs "$tr")"
printf '%-26s %8.2f %8s\n' 'tar -x (same tree)' "$tx" "$(mbs "$tx")"
printf '%-26s %8.2f %8s\n' 'cmkfs restore --new-dek' "$tn" "$(mbs "$tn")"
awk "BEGIN{printf \"ratios (speed vs tar): backup %.2f, restore %.2f, restore --new-dek %.2f\\n\", \
    $tt / $tb, $tx / $tr, $tx / $tn}"

# ~1% of the files changed: every 100th small file rewritten.
rm -rf "$W/r1" "$W/r2" "$W/r3"
c mount "$W/cipher" "$W/mnt" >/dev/null
changed=0
for i in $(seq 1 100 "$n"); do head -c 16384 /dev/urandom > "$W/mnt/small/f$i"; changed=$((changed + 1)); done
c umount "$W/mnt" >/dev/null
ti=$(t c backup "$W/cipher" "$W/i.tar" --key bkey --incremental-from "$W/a.tar")
tf=$(t c backup "$W/cipher" "$W/f2.tar" --key bkey)
tc=$(t c restore "$W/a.tar" "$W/i.tar" "$W/r4" --des d)
tg=$(t c restore "$W/f2.tar" "$W/r5" --des d)
si=$(stat -c %s "$W/i.tar"); sf=$(stat -c %s "$W/f2.tar")
printf '\nafter rewriting %s of %s files:\n' "$changed" "$((n + 5))"
printf '%-34s %8s %10s\n' step seconds 'archive MB'
printf '%-34s %8.2f %10.1f\n' 'cmkfs backup --incremental-from' "$ti" "$(awk "BEGIN{print $si / 1e6}")"
printf '%-34s %8.2f %10.1f\n' 'cmkfs backup (full, same state)' "$tf" "$(awk "BEGIN{print $sf / 1e6}")"
printf '%-34s %8.2f\n' 'cmkfs restore full + incremental' "$tc"
printf '%-34s %8.2f\n' 'cmkfs restore full (same state)' "$tg"
awk "BEGIN{printf \"incremental/full: size %.4f, backup time %.3f; chain/full restore time %.2f\\n\", \
    $si / $sf, $ti / $tf, $tc / $tg}"
echo "after: $(uptime)"
