#!/usr/bin/env bash
# Changed-chunk incrementals (archive version 3; README "Backup and restore"): the size and
# time of an incremental backup after changing 1% of the data units (4 KiB sectors) of one
# large file, beside a full backup of the same state, and the restore of the chain beside
# the restore of the full backup; also what `restore --new-dek` spends giving every
# directory, file and long target a fresh id (F7).
#
#   scripts/bench-delta.sh [CMKFS_BINARY] [FILE_MB]
#
# Writes one FILE_MB file of random data through a mount, takes a full backup, rewrites
# 1% of its sectors (chosen at random, 100 bytes each) through the mount, takes an
# incremental backup and a full one of the changed volume, restores both, restores the full
# archive with --new-dek, and prints seconds and archive sizes (page cache dropped before
# each step) and `uptime` before and after. Run it as root; it cleans up after itself.
set -euo pipefail

BIN=${1:-target/release/cmkfs}
MB=${2:-512}
BIN=$(readlink -f "$BIN")
[ -x "$BIN" ] || { echo "no cmkfs binary at $BIN (cargo build --release)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "needs python3" >&2; exit 2; }

W=$(mktemp -d "${TMPDIR:-/tmp}/cmkfs-bench-delta.XXXXXX")
cleanup() {
    mountpoint -q "$W/mnt" 2>/dev/null && "$BIN" umount "$W/mnt" >/dev/null 2>&1 || true
    rm -rf "$W"
}
trap cleanup EXIT
export CMKFS_HOME=$W/home CMKFS_PASSPHRASE_FILE=$W/pp CMKFS_VAULT_KDF=test
mkdir -m 700 "$W/home" "$W/cipher" "$W/mnt"
echo "bench passphrase" > "$W/pp"; chmod 600 "$W/pp"

c() { "$BIN" "$@"; }
c init "$W/cipher" --key-size 2048 >/dev/null
c vault config --purge-protection on >/dev/null
c vault key create dkey --key-size 2048 >/dev/null
c des create d --key dkey >/dev/null
c mount "$W/cipher" "$W/mnt" >/dev/null
head -c "${MB}M" /dev/urandom > "$W/mnt/big"
c umount "$W/mnt" >/dev/null

drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
t() { local s e; drop; s=$(date +%s.%N); "$@" >/dev/null; sync; e=$(date +%s.%N); awk "BEGIN{print $e - $s}"; }
size() { awk "BEGIN{printf \"%.2f\", $(stat -c %s "$1") / 1000000}"; }

echo "before: $(uptime)"
t0=$(t c backup "$W/cipher" "$W/full0.tar")
c mount "$W/cipher" "$W/mnt" >/dev/null
# 1% of the sectors, at random, 100 bytes each.
python3 - "$W/mnt/big" "$MB" <<'PY'
import os, random, sys
path, mb = sys.argv[1], int(sys.argv[2])
sectors = mb * 256
fd = os.open(path, os.O_WRONLY)
for s in random.Random(13).sample(range(sectors), sectors // 100):
    os.pwrite(fd, os.urandom(100), s * 4096 + 1000)
os.close(fd)
PY
c umount "$W/mnt" >/dev/null
ti=$(t c backup "$W/cipher" "$W/inc1.tar" --incremental-from "$W/full0.tar")
tf=$(t c backup "$W/cipher" "$W/full1.tar")
tri=$(t c restore "$W/full0.tar" "$W/inc1.tar" "$W/r-chain" --des d)
trf=$(t c restore "$W/full1.tar" "$W/r-full" --des d)
c restore "$W/full1.tar" "$W/r-new" --des d --new-dek --json > "$W/new.json"
echo "after: $(uptime)"

printf 'file: %s MiB; 1%% of its %s sectors changed (%s)\n' "$MB" "$((MB * 256))" "$((MB * 256 / 100))"
printf '%-44s %8s %10s\n' step seconds 'archive MB'
printf '%-44s %8.2f %10s\n' 'cmkfs backup (full, before the change)' "$t0" "$(size "$W/full0.tar")"
printf '%-44s %8.2f %10s\n' 'cmkfs backup --incremental-from (changed)' "$ti" "$(size "$W/inc1.tar")"
printf '%-44s %8.2f %10s\n' 'cmkfs backup (full, changed)' "$tf" "$(size "$W/full1.tar")"
printf '%-44s %8.2f\n' 'cmkfs restore full0 + inc1' "$tri"
printf '%-44s %8.2f\n' 'cmkfs restore full1' "$trf"
awk "BEGIN{printf \"incremental: %.2f%% of the full archive's size, %.2f of its time\\n\", \
    100 * $(stat -c %s "$W/inc1.tar") / $(stat -c %s "$W/full1.tar"), $ti / $tf}"
python3 - "$W/new.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
n, i = r["new_dek"], r["new_ids"]
print(f"restore --new-dek: fresh ids {i['seconds']:.2f} s ({i['bytes']/1e6:.0f} MB re-tweaked, "
      f"{i['files']} files, {i['dirs']} dirs), re-encryption {n['seconds']:.2f} s, "
      f"whole restore {r['seconds']:.2f} s")
PY
