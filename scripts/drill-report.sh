#!/usr/bin/env bash
# Runs N revocation drills (default 20) per revoke method against a fresh demo volume on the
# embedded vault, with and without push notifications, and prints median and worst cut-off
# and heal times. This is what the README's revocation table comes from.
#
#   scripts/drill-report.sh [N]          (needs root and /dev/fuse; builds release)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
cargo build --release --quiet
B=$PWD/target/release/cmkfs
WORK=$(mktemp -d /tmp/cmkfs-drill-XXXXXX)
export CMKFS_HOME=$WORK/home
mkdir -p "$WORK/plain"
cleanup() { "$B" umount "$WORK/plain" 2>/dev/null || umount -l "$WORK/plain" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
"$B" init "$WORK/cipher" --key-size 3072 >/dev/null 2>&1
"$B" vault identity create drill --credential-file "$WORK/drill.cred" >/dev/null
"$B" vault policy set drill --key default --permissions get,wrapKey,unwrapKey >/dev/null

run_set() { # label, mount args...
  local label=$1; shift
  "$B" mount "$WORK/cipher" "$WORK/plain" "$@" >/dev/null
  for how in disable policy delete; do
    for _ in $(seq "$N"); do
      "$B" drill "$WORK/plain" --revoke "$how" --restore --json --timeout 60s
    done > "$WORK/$label-$how.json"
  done
  "$B" umount "$WORK/plain"
}
run_set push --credential "$WORK/drill.cred"
run_set nopush --credential "$WORK/drill.cred" --no-push --key-check-interval 5s

python3 - "$WORK" "$N" <<'PY'
import json, statistics, sys, glob, os
work, n = sys.argv[1], sys.argv[2]
def load(path):
    dec, out, s = json.JSONDecoder(), [], open(path).read()
    i = 0
    while i < len(s):
        if s[i].isspace(): i += 1; continue
        o, i = dec.raw_decode(s, i); out.append(o)
    return out
print(f"{'mode':8} {'revoke':8} {'runs':>4} {'pass':>4} {'cut-off median':>15} {'cut-off worst':>14} {'heal median':>12} {'heal worst':>11} {'leaked':>7}")
for mode in ["push", "nopush"]:
    for how in ["disable", "policy", "delete"]:
        rs = load(os.path.join(work, f"{mode}-{how}.json"))
        cut = [r["cutoff_ms"] for r in rs if r["cutoff_ms"] is not None]
        heal = [r["heal_ms"] for r in rs if r["heal_ms"] is not None]
        ok = sum(r["verdict"] == "PASS" for r in rs)
        leaked = sum(r["leaked_bytes"] for r in rs)
        f = lambda v: f"{v:.1f} ms"
        print(f"{mode:8} {how:8} {len(rs):>4} {ok:>4} {f(statistics.median(cut)):>15} {f(max(cut)):>14} {f(statistics.median(heal)):>12} {f(max(heal)):>11} {leaked:>7}")
PY
