#!/usr/bin/env bash
# Does syncfs(2) on a cmkfs mount wait for the kernel's write-back of its cached pages?
# (docs/ARCHITECTURE.md, "What sync(2) and syncfs(2) promise on FUSE".)
#
#   scripts/syncfs-probe.sh [BIN] [TRIES] [MIB] [MOUNT ARGS...]
#
# Mounts a fresh volume (BIN, default target/debug/cmkfs; the default writeback cache), then
# TRIES times: writes MIB MiB (default 16) into a new file without closing it, calls
# syncfs(2) on its descriptor, then fsync(2), then closes. The kernel's fuse tracepoints
# (fuse_request_send / fuse_request_end, this mount's connection only, in a private tracefs
# instance, with markers around each call) say, per try: the FUSE requests syncfs sent (a
# FUSE_SYNCFS among them?), how many WRITE bytes were sent but not yet answered when syncfs
# returned, and how many were still dirty then (sent only by the fsync). Counted from the
# kernel's own events, so the verdict does not depend on timing; DELAY_US=N (default 0)
# makes the daemon's every pwrite take N µs longer (strace fault injection) so that a
# syncfs that waited could not return early by luck. Needs root and the fuse tracepoints.
set -euo pipefail
BIN=${1:-target/debug/cmkfs}
TRIES=${2:-10}
MIB=${3:-16}
shift $(($# < 3 ? $# : 3))
T=/sys/kernel/tracing
[[ -d $T/events ]] || mount -t tracefs nodev $T
[[ -d $T/events/fuse/fuse_request_send ]] || {
    echo "syncfs-probe.sh: this kernel has no fuse tracepoints" >&2
    exit 1
}
W=$(mktemp -d /tmp/cmkfs-syncfs-XXXXXX)
I=$T/instances/cmkfs-syncfs-$$
export CMKFS_HOME=$W/home
(umask 077 && head -c 24 /dev/urandom | base64 >"$W/passphrase")
export CMKFS_PASSPHRASE_FILE=$W/passphrase
PID= SP=
cleanup() {
    set +e
    [[ -n $SP ]] && kill "$SP" 2>/dev/null && wait "$SP" 2>/dev/null
    [[ -d $I ]] && {
        echo 0 >"$I/events/fuse/enable"
        rmdir "$I"
    }
    umount "$W/m" 2>/dev/null || umount -l "$W/m" 2>/dev/null
    [[ -n $PID ]] && timeout 30 tail --pid="$PID" -f /dev/null
    rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/c" "$W/m" "$I"
echo 65536 >"$I/buffer_size_kb"
"$BIN" init --key-size 2048 "$W/c" >/dev/null 2>&1
"$BIN" mount "$@" "$W/c" "$W/m" >/dev/null
f=$(grep -l "\"mountpoint\": \"$W/m\"" "$CMKFS_HOME"/run/mount-*.json | grep -v status | head -1)
PID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f")
DEV=$(mountpoint -d "$W/m")
for e in fuse_request_send fuse_request_end; do
    echo "connection == ${DEV#*:}" >"$I/events/fuse/$e/filter"
done
echo 1 >"$I/events/fuse/enable"
if [[ ${DELAY_US:-0} != 0 ]]; then
    strace -f -q -o /dev/null -p "$PID" -e trace=pwrite64,pwritev,pwritev2 \
        -e inject=pwrite64,pwritev,pwritev2:delay_enter="$DELAY_US" &
    SP=$!
    sleep 1
fi
echo "syncfs-probe: $BIN $*; kernel $(uname -r); $TRIES tries of $MIB MiB; DELAY_US=${DELAY_US:-0}; load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$W/m" "$I/trace_marker" "$TRIES" "$MIB" <<'EOF'
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
mnt, marker, tries, mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
mark = open(marker, "w", buffering=1)
buf = os.urandom(1 << 20)
for i in range(tries):
    fd = os.open(f"{mnt}/f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for _ in range(mib):
        os.write(fd, buf)
    mark.write(f"probe syncfs-start {i}\n")
    if libc.syncfs(fd) != 0:
        sys.exit(f"syncfs: {os.strerror(ctypes.get_errno())}")
    mark.write(f"probe syncfs-end {i}\n")
    os.fsync(fd)
    mark.write(f"probe fsync-end {i}\n")
    os.close(fd)
EOF
echo 0 >"$I/events/fuse/enable"
python3 - "$I/trace" "$MIB" <<'EOF'
import re, sys
sent, phase, tries = {}, None, []
for line in open(sys.argv[1]):
    m = re.search(r"probe (\S+) (\d+)", line)
    if m:
        what, i = m.group(1), int(m.group(2))
        if what == "syncfs-start":
            tries.append({"ops": {}, "inflight": 0, "later": 0})
            phase = "syncfs"
        elif what == "syncfs-end":
            t = tries[-1]
            t["inflight"] = sum(l for (op, l, p) in sent.values() if op == 16)
            phase = "fsync"
        else:
            phase = None
        continue
    m = re.search(r"req (\d+) opcode (\d+) \((\w+)\) len (\d+)", line)
    if m:
        u, op, name, ln = int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4))
        sent[u] = (op, ln, phase)
        if phase == "syncfs":
            tries[-1]["ops"][name] = tries[-1]["ops"].get(name, 0) + 1
        if phase == "fsync" and op == 16:
            tries[-1]["later"] += ln
        continue
    m = re.search(r"req (\d+) len", line)
    if m:
        sent.pop(int(m.group(1)), None)
mib = 1 << 20
for i, t in enumerate(tries):
    ops = " ".join(f"{k}={v}" for k, v in sorted(t["ops"].items())) or "none"
    print(f"try {i}: requests sent during syncfs: {ops}; at its return: "
          f"{t['inflight'] / mib:.2f} MiB of WRITEs unanswered, "
          f"{t['later'] / mib:.2f} MiB still dirty (sent by the fsync)")
n = len(tries)
early = sum(1 for t in tries if t["inflight"] or t["later"])
syncfs_req = sum(t["ops"].get("FUSE_SYNCFS", 0) for t in tries)
print(f"summary: {early}/{n} syncfs calls returned before the file's write-back was done; "
      f"FUSE_SYNCFS requests: {syncfs_req}")
EOF
