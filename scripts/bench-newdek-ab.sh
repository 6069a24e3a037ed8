#!/usr/bin/env bash
# `cmkfs restore --new-dek` by two cmkfs binaries (before / after a change) beside plain
# `tar -x` of the same backing tree, alternated in rounds on one archive, so that each
# round's ratios see the same load (issue 13). The volume is scripts/bench-backup.sh's: four
# large files, many 16 KiB ones, a 1 GiB sparse file. Prints per round the seconds of each
# and the allocated size of each restored tree (holes must stay holes).
#
#   scripts/bench-newdek-ab.sh BASE_BINARY NEW_BINARY [DATA_MB] [ROUNDS]
set -euo pipefail
BASE=$(readlink -f "$1"); NEW=$(readlink -f "$2"); MB=${3:-256}; ROUNDS=${4:-2}
W=$(mktemp -d "${TMPDIR:-/tmp}/cmkfs-bench-newdek.XXXXXX")
trap '"$NEW" umount "$W/mnt" >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
export CMKFS_HOME=$W/home CMKFS_PASSPHRASE_FILE=$W/pp CMKFS_VAULT_KDF=test
mkdir -m 700 "$W/home" "$W/cipher" "$W/mnt"
echo "bench passphrase" > "$W/pp"; chmod 600 "$W/pp"
c() { "$NEW" "$@"; }
c init "$W/cipher" --key-size 2048 >/dev/null
c vault config --purge-protection on >/dev/null
c vault key create bkey --key-size 2048 >/dev/null
c vault key create dkey --key-size 2048 >/dev/null
c des create d --key dkey >/dev/null
c mount "$W/cipher" "$W/mnt" >/dev/null
big=$(( MB * 3 / 4 / 4 ))
for i in 1 2 3 4; do head -c "${big}M" /dev/urandom > "$W/mnt/big$i"; done
mkdir -p "$W/mnt/small"
n=$(( MB * 1024 / 4 / 16 ))
for i in $(seq 1 "$n"); do head -c 16384 /dev/urandom > "$W/mnt/small/f$i"; done
truncate -s 1G "$W/mnt/sparse"; echo tail >> "$W/mnt/sparse"
c umount "$W/mnt" >/dev/null
c backup "$W/cipher" "$W/a.tar" --key bkey >/dev/null
tar --sparse --xattrs --xattrs-include='*' -cf "$W/p.tar" -C "$W/cipher" .
alloc=$(( $(du -sk "$W/cipher" | cut -f1) * 1024 ))
t() { local s e; sync; s=$(date +%s.%N); "$@" >/dev/null; sync; e=$(date +%s.%N); awk "BEGIN{print $e - $s}"; }
for r in $(seq 1 "$ROUNDS"); do
  rm -rf "$W"/r*; mkdir "$W/rx"
  tx=$(t tar --xattrs --xattrs-include='*' -xf "$W/p.tar" -C "$W/rx")
  tb=$(t "$BASE" restore "$W/a.tar" "$W/rb" --des d --new-dek)
  tn=$(t "$NEW" restore "$W/a.tar" "$W/rn" --des d --new-dek)
  tr=$(t "$NEW" restore "$W/a.tar" "$W/rp" --des d)
  awk "BEGIN{printf \"round $r: tar -x %.2f s; restore %.2f s (%.2f x tar); restore --new-dek: before %.2f s (%.2f x tar), after %.2f s (%.2f x tar); after/before speed %.2f\\n\", $tx, $tr, $tx/$tr, $tb, $tx/$tb, $tn, $tx/$tn, $tb/$tn}"
  echo "  allocated KiB: tar $(du -sk "$W/rx" | cut -f1), before $(du -sk "$W/rb" | cut -f1), after $(du -sk "$W/rn" | cut -f1)"
done
