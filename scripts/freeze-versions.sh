#!/usr/bin/env bash
# A backup's write freeze between two cmkfs versions (control::FrozenAnswer), by hand: the
# OLD build's daemon read by the NEW build's `cmkfs backup`, and the other way round, each
# with an exact freeze and with one whose drain misses a file (a daemon without
# CAP_DAC_READ_SEARCH, a file open whose only name the mount never looked up). Prints each
# backup's exit code, `point_in_time` and warning. Needs root, setpriv; not run by CI (it
# needs an old build).
#
#   scripts/freeze-versions.sh OLD_BIN NEW_BIN     e.g. a d62fd71 build and target/debug/cmkfs
#
# What NEW must show: an OLD daemon's freeze is never point_in_time: true (OLD answers
# {"frozen":true} without `exact`); NEW's inexact freeze is refused by an OLD client that
# predates `exact` (or point_in_time: false with --force).
set -uo pipefail
OLD=$(realpath "$1")
NEW=$(realpath "$2")
W=$(mktemp -d "${TMPDIR:-/tmp}/cmkfs-fv-XXXXXX")
trap 'umount -l "$W/m" 2>/dev/null; rm -rf "$W"' EXIT
mkdir -p "$W/c" "$W/m"
printf 'test-pass\n' >"$W/pass"
chmod 600 "$W/pass"
export CMKFS_HOME=$W/home CMKFS_PASSPHRASE_FILE=$W/pass CMKFS_VAULT_KDF=test
"$OLD" init "$W/c" --key-size 2048 >/dev/null || exit 1

backup() { # CLIENT TAG [ARGS...]
    local c=$1 tag=$2
    shift 2
    "$c" backup "$W/c" "$W/$tag.tar" --json "$@" >"$W/out.json" 2>"$W/err.txt"
    echo "  rc=$? $(grep -o '"point_in_time": [a-z]*' "$W/out.json") $(cut -c1-160 "$W/err.txt")"
}

for d in OLD NEW; do
    eval "daemon=\$$d"
    "$daemon" mount "$W/c" "$W/m" >/dev/null || exit 1
    echo x >"$W/m/f-$d"
    for c in OLD NEW; do
        eval "client=\$$c"
        echo "daemon $d (exact), client $c:"
        backup "$client" "e-$d-$c"
    done
    "$NEW" umount "$W/m"
done

# An inexact drain: a daemon without CAP_DAC_READ_SEARCH, `h` open through the mount, its
# only name left `h2`, which this mount never looked up.
"$NEW" mount "$W/c" "$W/m" >/dev/null && echo old >"$W/m/h" && ln "$W/m/h" "$W/m/h2"
"$NEW" umount "$W/m"
for d in OLD NEW; do
    eval "daemon=\$$d"
    setpriv --bounding-set -dac_read_search "$daemon" mount "$W/c" "$W/m" --foreground \
        2>"$W/daemon-$d.log" &
    for _ in $(seq 100); do mountpoint -q "$W/m" && break; sleep 0.1; done
    (exec 3>>"$W/m/h"; rm "$W/m/h"; echo new >&3; sleep 60) &
    hold=$!
    sleep 0.5
    for c in OLD NEW; do
        eval "client=\$$c"
        echo "daemon $d (inexact), client $c:"
        backup "$client" "i-$d-$c"
        echo "  with --force:"
        backup "$client" "f-$d-$c" --force
    done
    kill $hold
    wait $hold 2>/dev/null
    "$NEW" umount "$W/m"
    wait
    # `h` is gone now; make it again (open, then unlinked: its name `h2` is left).
    "$NEW" mount "$W/c" "$W/m" >/dev/null && ln "$W/m/h2" "$W/m/h"
    "$NEW" umount "$W/m"
done
