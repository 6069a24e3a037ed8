#!/bin/bash
# How long `cmkfs backup` of a mounted volume freezes it while a writer runs, with and without
# the writeback cache (the same binary, one run): `freeze_seconds` of `cmkfs backup --json`
# (from the freeze being granted) and the wall time of the whole backup (the drain included).
#
#   CMKFS_BIN=target/release/cmkfs scripts/bench-freeze.sh [ROUNDS]
#
# The writer rewrites a 64 MiB file without pause in random 4 KiB..1 MiB pieces. Needs root
# (FUSE) and python3. Everything lives in a temp dir removed at the end.
set -euo pipefail
B=$(realpath "${CMKFS_BIN:-target/release/cmkfs}")
ROUNDS=${1:-3}
W=$(mktemp -d /tmp/cmkfs-bench-freeze.XXXXXX)
trap '"$B" umount "$W/m" >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
printf 'bench passphrase\n' > "$W/pw"; chmod 600 "$W/pw"
export CMKFS_HOME=$W/home CMKFS_PASSPHRASE_FILE=$W/pw CMKFS_VAULT_KDF=test
"$B" init "$W/c" --key-size 2048 >/dev/null
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for mode in --writeback-cache --no-writeback-cache; do
  mkdir -p "$W/m"
  "$B" mount "$W/c" "$W/m" "$mode" >/dev/null
  python3 - "$W/m/f" <<'PY' &
import os, random, sys
f = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
r = random.Random(1)
while True:
    n = 4096 << r.randrange(0, 9)
    os.pwrite(f, bytes([r.randrange(1, 255)]) * n, r.randrange(0, 64 << 20))
PY
  wp=$!
  sleep 2
  for i in $(seq "$ROUNDS"); do
    rm -f "$W/a.tar"
    t0=$(date +%s.%N)
    s=$("$B" backup "$W/c" "$W/a.tar" --json | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["freeze_seconds"], 3))')
    t1=$(date +%s.%N)
    echo "$mode backup $i: freeze_seconds $s, wall $(python3 -c "print(round($t1 - $t0, 3))") s"
  done
  kill "$wp"; wait "$wp" 2>/dev/null || true
  "$B" umount "$W/m"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
