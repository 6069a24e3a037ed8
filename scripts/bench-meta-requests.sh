#!/usr/bin/env bash
# What each stage of bench-fio.sh's metadata job costs a FUSE daemon, in the two measures a
# busy machine does not change: the FUSE requests the kernel sends, by opcode (the kernel's
# fuse:fuse_request_send tracepoint, filtered on this mount's connection, read from a private
# tracefs instance), and the daemon's system calls (strace -c -f). Also the daemon's CPU
# ticks and the wall seconds of each stage (those do move with the load).
#
#   scripts/bench-meta-requests.sh BIN|gocryptfs|passthrough [MOUNT ARGS...]
#
# `passthrough` mounts examples/passthrough.rs (PT_BIN, default target/release/examples/passthrough):
# FUSE's own cost on the same fuser setup, no encryption.
#
# Stages: extract TARBALL (default: aws-lc-sys from the cargo cache), ls -lR (cold),
# sha256sum of every file, rm -rf. STRACE=0 skips strace (it slows the daemon); TOPN=N
# prints the N most frequent system calls of each stage. Needs root and a kernel with the
# fuse tracepoints (6.x). BENCH_DIR=dir puts the backing store there (default /tmp).
set -euo pipefail
BIN=$1
shift
TARBALL=${TARBALL:-$(ls -S "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/aws-lc-sys-*.crate 2>/dev/null | head -1 || true)}
[[ -f $TARBALL ]] || { echo "bench-meta-requests.sh: no tarball (set TARBALL=...)" >&2; exit 1; }
command -v strace >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace
}
T=/sys/kernel/tracing
[[ -d $T/events ]] || mount -t tracefs nodev $T
[[ -d $T/events/fuse/fuse_request_send ]] || {
    echo "bench-meta-requests.sh: this kernel has no fuse tracepoints" >&2
    exit 1
}
W=$(mktemp -d "${BENCH_DIR:-/tmp}"/cmkfs-benchm-XXXXXX)
I=$T/instances/cmkfs-benchm-$$
export CMKFS_HOME=$W/home
# The embedded vault is sealed under a passphrase: a random one for this run (0600).
(umask 077 && head -c 24 /dev/urandom | base64 >"$W/passphrase")
export CMKFS_PASSPHRASE_FILE=$W/passphrase
PID=
cleanup() {
    set +e
    [[ -d $I ]] && { echo 0 >"$I/events/fuse/fuse_request_send/enable"; rmdir "$I"; }
    umount "$W/m" 2>/dev/null || umount -l "$W/m" 2>/dev/null
    [[ -n $PID ]] && timeout 30 tail --pid="$PID" -f /dev/null
    rm -rf "$W"
}
trap cleanup EXIT
mkdir "$I"
echo 16384 >"$I/buffer_size_kb"
mkdir -p "$W/c" "$W/m"
if [[ $BIN == gocryptfs ]]; then
    gocryptfs -q -init -extpass "echo bench" -scryptn 10 "$W/c" >/dev/null
    gocryptfs -q -fg -extpass "echo bench" "$W/c" "$W/m" &
    PID=$!
    for _ in $(seq 200); do mountpoint -q "$W/m" && break; sleep 0.05; done
elif [[ $BIN == passthrough ]]; then
    PT_BIN=${PT_BIN:-$(dirname "$0")/../target/release/examples/passthrough}
    [[ -x $PT_BIN ]] || { echo "bench-meta-requests.sh: no passthrough binary at $PT_BIN (cargo build --release --example passthrough)" >&2; exit 1; }
    "$PT_BIN" "$W/c" "$W/m" "$@" &
    PID=$!
    for _ in $(seq 200); do mountpoint -q "$W/m" && break; sleep 0.05; done
else
    "$BIN" init --key-size 2048 "$W/c" >/dev/null 2>&1
    "$BIN" mount "$@" "$W/c" "$W/m" >/dev/null
    f=$(grep -l "\"mountpoint\": \"$W/m\"" "$CMKFS_HOME"/run/mount-*.json | grep -v status | head -1)
    PID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f")
fi
DEV=$(mountpoint -d "$W/m")
ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

stage() { # name command...
    local name=$1 sp= tp c0 c1 t0 t1
    shift
    echo "connection == ${DEV#*:}" >"$I/events/fuse/fuse_request_send/filter"
    echo 1 >"$I/events/fuse/fuse_request_send/enable"
    cat "$I/trace_pipe" >"$W/trace.$name" &
    tp=$!
    if [[ ${STRACE:-1} == 1 ]]; then
        strace -c -f -q -o "$W/strace.$name" -p "$PID" &
        sp=$!
        sleep 0.5
    fi
    c0=$(ticks)
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    c1=$(ticks)
    sleep 0.2
    [[ -n $sp ]] && { kill -INT "$sp"; wait "$sp" || true; }
    echo 0 >"$I/events/fuse/fuse_request_send/enable"
    kill "$tp"
    wait "$tp" 2>/dev/null || true
    printf '=== %s: %.2f s (strace %s), daemon cpu ticks %d\n' "$name" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" "${STRACE:-1}" "$((c1 - c0))"
    grep -o 'opcode [0-9]* ([A-Z_0-9]*)' "$W/trace.$name" | awk '{print $3}' | sort | uniq -c | sort -rn |
        awk '{n += $1; s = s " " $2 "=" $1} END {print "   requests " n ":" s}'
    if [[ -n $sp ]]; then
        echo "   system calls: $(awk '$NF == "total" {print $4}' "$W/strace.$name")"
        awk -v n="${TOPN:-0}" 'NR > 2 && $NF != "total" && $1 !~ /^-/ && k++ < n {print "   " $0}' "$W/strace.$name"
    fi
}

echo "bench-meta-requests: $BIN $*; tarball $(basename "$TARBALL"); load $(cut -d' ' -f1-3 /proc/loadavg)"
mkdir "$W/m/tree"
stage extract tar -xzf "$TARBALL" -C "$W/m/tree"
drop
stage ls sh -c "ls -lR '$W/m/tree' >/dev/null"
drop
stage sum sh -c "find '$W/m/tree' -type f -print0 | xargs -0 sha256sum >/dev/null"
stage rm rm -rf "$W/m/tree"
