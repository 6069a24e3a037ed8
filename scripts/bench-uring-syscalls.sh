#!/usr/bin/env bash
# System calls and daemon CPU ticks per FUSE request, with and without FUSE over io_uring:
# one cmkfs binary mounted twice (`--io-uring` and not), fio psync O_DIRECT 4 KiB random
# read and write (one FUSE request per I/O), each job once plain (ticks from /proc/PID/stat)
# and once under `strace -c -f -p DAEMON` (system calls per request). As root; switches the
# fuse module's enable_uring on for the run and puts back what it found.
#
#   scripts/bench-uring-syscalls.sh BIN [MiB of I/O per job, default 32]
set -euo pipefail
BIN=$(realpath "$1"); IO=${2:-32}
PARAM=/sys/module/fuse/parameters/enable_uring
[[ -r $PARAM ]] || { echo "bench-uring-syscalls.sh: no $PARAM (kernel without FUSE over io_uring)" >&2; exit 1; }
WAS=$(cat "$PARAM")
echo Y >"$PARAM"
W=$(mktemp -d /var/tmp/cmkfs-uring-XXXXXX)
export CMKFS_HOME=$W/home
(umask 077 && head -c 24 /dev/urandom | base64 >"$W/pass"); export CMKFS_PASSPHRASE_FILE=$W/pass
cleanup() {
    set +e
    for v in uring base; do umount "$W/$v" 2>/dev/null; done
    sleep 1
    rm -rf "$W"
    echo "$WAS" >"$PARAM"
}
trap cleanup EXIT
pid_of() { local f; f=$(grep -l "\"mountpoint\": \"$1\"" "$CMKFS_HOME"/run/mount-*.json | grep -v status | head -1)
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for v in uring base; do "$BIN" init --key-size 2048 "$W/$v-c" >/dev/null 2>&1; mkdir -p "$W/$v"; done
"$BIN" mount --io-uring "$W/uring-c" "$W/uring"
"$BIN" mount "$W/base-c" "$W/base"
for v in uring base; do
  fio --name=prep --filename="$W/$v/f" --size=64M --rw=write --bs=1M --direct=1 --ioengine=psync >/dev/null
done
printf '%-6s %-10s %8s %8s %10s %s\n' fs job ios ticks sc/req "top syscalls per request"
for job in randread randwrite; do
  for v in uring base; do
    p=$(pid_of "$W/$v")
    run() { fio --name=j --filename="$W/$v/f" --size=64M --rw=$job --bs=4k --direct=1 --ioengine=psync \
            --io_size=${IO}M --randseed=7 --output-format=json; }
    t0=$(ticks "$p"); out=$(run); t1=$(ticks "$p")
    ios=$(python3 -c 'import json,sys; j=json.loads(sys.stdin.read())["jobs"][0]; print(j["read"]["total_ios"]+j["write"]["total_ios"])' <<<"$out")
    strace -c -f -q -p "$p" -o "$W/$v-$job.st" & sp=$!; sleep 1
    run >/dev/null
    sleep 0.3; kill -INT $sp; wait $sp 2>/dev/null || true
    total=$(awk '$NF=="total"{print $4}' "$W/$v-$job.st")
    top=$(awk -v n="$ios" '$1 ~ /^[0-9.]+$/ && NF>=5 {c=$4; s=$NF; if (s != "total" && c/n >= 0.05) printf "%s %.2f, ", s, c/n}' "$W/$v-$job.st")
    printf '%-6s %-10s %8d %8d %10.2f %s\n' "$v" "$job" "$ios" $((t1 - t0)) "$(python3 -c "print($total/$ios)")" "$top"
  done
done
