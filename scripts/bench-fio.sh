#!/usr/bin/env bash
# Throughput and daemon cost per byte: the same fio jobs, in one run, on the raw backing
# directory, a cmkfs mount, a gocryptfs mount and a FUSE passthrough (FUSE's own cost: the
# same fuser setup as cmkfs, no encryption; examples/passthrough.rs). Prints a markdown table
# (MB/s, IOPS, seconds; ratios to gocryptfs and to raw; daemon CPU seconds per GiB; peak RSS)
# and draws the same as an SVG plot. Needs root and /dev/fuse; installs fio and gocryptfs if
# missing; builds the release binaries.
#
#   scripts/bench-fio.sh [--quick] [--size MIB] [--runtime SEC] [--rounds N] [--out DIR]
#                        [--svg FILE] [--only JOB,JOB] [--no-gocryptfs] [--no-passthrough]
#
#   --quick          development mode: 128 MiB files, short random jobs, a small tarball
#   --size MIB       file size of the sequential and random jobs (default 1024)
#   --runtime SEC    seconds of each time-based random job (default 20; 5 with --quick)
#   --rounds N       repeat every job N times (filesystems interleaved, their order rotated each round); medians are shown
#   --out DIR        where results.jsonl, table.md and plot.svg go (default target/bench-fio/<time>)
#   --svg FILE       also copy the plot there (e.g. docs/bench/fio.svg)
#   --only JOBS      run only these jobs (names as in the table's first column)
#   CMKFS_BIN=path   the cmkfs binary to measure (default: target/release/cmkfs, built here)
#   PT_BIN=path      the passthrough binary (default: examples/passthrough.rs, built here)
#   CMKFS_BASELINE=path  also mount this cmkfs binary (an older build) as "cmkfs-base", for
#                    before/after ratios in the same run
#   CMKFS_MOUNT_ARGS="..."  extra `cmkfs mount` options (e.g. tuning switches to compare)
#   CMKFS_BASELINE_ARGS="..."  the same for the baseline (it may be the same binary)
#   PASSTHROUGH_ARGS="..."  options of examples/passthrough.rs (e.g. --no-writeback-cache)
#   TARBALL=path     the tarball of the metadata job (default: aws-lc-sys from the cargo cache)
#   BENCH_DIR=dir    where the raw directory and the backing stores go (default /var/tmp): put
#                    it on the filesystem to measure (e.g. a journaled ext4, see PERFORMANCE.md)
#
# Jobs (fio, one job unless said; caches dropped before every read job, so reads are cold):
#   seq-write-1m     sequential 1 MiB writes of SIZE, fsync at the end (in the time)
#   seq-read-1m      sequential 1 MiB reads of that file
#   rand-read-4k     random 4 KiB reads, psync, RUNTIME seconds
#   rand-read-4k-qd16  the same with libaio, O_DIRECT, 16 in flight
#   rand-write-4k    random 4 KiB writes (SIZE/4 of them in bytes), psync, fsync at the end
#   rand-write-4k-qd16 the same with libaio, O_DIRECT, 16 in flight
#   seq-write-4k     sequential 4 KiB writes of SIZE/4 to a new file, fsync at the end
#   parallel-4       4 jobs at once, each on its own file: random 4 KiB reads and writes
#                    (half each), psync, RUNTIME seconds, cold
#   metadata         extract a real source tarball, ls -lR, sha256 of every file (cold), rm -rf;
#                    also records what the extraction added to `du -sk` of the backing store
#                    (stages.backing_kib in results.jsonl, and a line per filesystem at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

SIZE=1024
RUNTIME=20
ROUNDS=1
OUT=""
SVG=""
ONLY=""
GOCRYPTFS=1
PASSTHROUGH=1
QUICK=0
while [[ $# -gt 0 ]]; do
    case $1 in
    --quick) QUICK=1 SIZE=128 RUNTIME=5 ;;
    --size) SIZE=$2; shift ;;
    --runtime) RUNTIME=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --svg) SVG=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --no-gocryptfs) GOCRYPTFS=0 ;;
    --no-passthrough) PASSTHROUGH=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-fio.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $SIZE =~ ^[0-9]+$ && $SIZE -ge 16 ]] || { echo "bench-fio.sh: --size wants MiB >= 16" >&2; exit 2; }
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || { echo "bench-fio.sh: --runtime wants seconds >= 1" >&2; exit 2; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "bench-fio.sh: --rounds wants a positive number" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "bench-fio.sh: run as root (drop_caches, mounts)" >&2; exit 1; }

need=()
command -v fio >/dev/null || need+=(fio)
[[ $GOCRYPTFS -eq 0 ]] || command -v gocryptfs >/dev/null || need+=(gocryptfs)
command -v fusermount3 >/dev/null || need+=(fuse3)
if [[ ${#need[@]} -gt 0 ]]; then
    echo "installing: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [[ -z "${CMKFS_BIN:-}" ]]; then
    cargo build --release --quiet --bin cmkfs
    CMKFS_BIN=$ROOT/target/release/cmkfs
fi
CMKFS_BIN=$(realpath "$CMKFS_BIN")
if [[ $PASSTHROUGH -eq 1 && -z "${PT_BIN:-}" ]]; then
    cargo build --release --quiet --example passthrough
    PT_BIN=$ROOT/target/release/examples/passthrough
fi

if [[ -z "${TARBALL:-}" ]]; then
    pattern='aws-lc-sys-*.crate'
    [[ $QUICK -eq 1 ]] && pattern='tokio-1.*.crate'
    TARBALL=$(ls -S "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/$pattern 2>/dev/null | head -1 || true)
    [[ -n $TARBALL ]] || TARBALL=$(ls -S "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/*.crate | head -1)
fi
[[ -f $TARBALL ]] || { echo "bench-fio.sh: no tarball for the metadata job (set TARBALL=...)" >&2; exit 1; }

W=$(mktemp -d "${BENCH_DIR:-/var/tmp}"/cmkfs-fio-XXXXXX)
[[ -n $OUT ]] || OUT=$ROOT/target/bench-fio/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
export CMKFS_HOME=$W/home
# The embedded vault is sealed under a passphrase: a random one for this run (0600).
(umask 077 && head -c 24 /dev/urandom | base64 >"$W/passphrase")
export CMKFS_PASSPHRASE_FILE=$W/passphrase

declare -A PID
FSS=()
cleanup() {
    set +e
    for fs in "${FSS[@]}"; do
        [[ $fs == raw ]] && continue
        umount "$W/$fs" 2>/dev/null || umount -l "$W/$fs" 2>/dev/null
    done
    for fs in "${FSS[@]}"; do
        p=${PID[$fs]:-}
        [[ -n $p ]] && timeout 30 tail --pid="$p" -f /dev/null
    done
    rm -rf "$W"
}
trap cleanup EXIT

wait_mounted() { # dir
    for _ in $(seq 200); do
        mountpoint -q "$1" && return 0
        sleep 0.05
    done
    echo "bench-fio.sh: $1 did not get mounted" >&2
    return 1
}

backing_dir() { # fs -> the directory holding its backing store ("" if unknown)
    case $1 in
    raw) echo "$W/raw" ;;
    gocryptfs) echo "$W/gc-cipher" ;;
    cmkfs | cmkfs-base) echo "$W/$1-cipher" ;;
    passthrough) echo "$W/pt-backing" ;;
    *) echo "" ;;
    esac
}

cmkfs_pid() { # bin mountpoint -> daemon pid (from its run record)
    local f
    f=$(grep -l "\"mountpoint\": \"$2\"" "$CMKFS_HOME"/run/mount-*.json | grep -v status | head -1)
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f"
}

mkdir -p "$W/raw"
FSS+=(raw)
mount_cmkfs() { # name bin args
    local name=$1 bin=$2 args=$3
    "$bin" init --key-size 2048 "$W/$name-cipher" >/dev/null 2>&1
    mkdir -p "$W/$name"
    # shellcheck disable=SC2086
    "$bin" mount $args "$W/$name-cipher" "$W/$name" >/dev/null
    FSS+=("$name")
    PID[$name]=$(cmkfs_pid "$bin" "$W/$name")
}
mount_cmkfs cmkfs "$CMKFS_BIN" "${CMKFS_MOUNT_ARGS:-}"
if [[ -n "${CMKFS_BASELINE:-}" ]]; then
    mount_cmkfs cmkfs-base "$(realpath "$CMKFS_BASELINE")" "${CMKFS_BASELINE_ARGS:-}"
fi
if [[ $GOCRYPTFS -eq 1 ]]; then
    mkdir -p "$W/gocryptfs" "$W/gc-cipher"
    gocryptfs -q -init -extpass "echo bench" -scryptn 10 "$W/gc-cipher" >/dev/null
    gocryptfs -q -fg -extpass "echo bench" "$W/gc-cipher" "$W/gocryptfs" &
    PID[gocryptfs]=$!
    FSS+=(gocryptfs)
    wait_mounted "$W/gocryptfs"
fi
if [[ $PASSTHROUGH -eq 1 ]]; then
    mkdir -p "$W/passthrough" "$W/pt-backing"
    # shellcheck disable=SC2086
    "$PT_BIN" "$W/pt-backing" "$W/passthrough" ${PASSTHROUGH_ARGS:-} &
    PID[passthrough]=$!
    FSS+=(passthrough)
    wait_mounted "$W/passthrough"
fi

ticks() { # fs -> utime+stime of its daemon in clock ticks, all threads (0 for raw)
    local p=${PID[$1]:-}
    if [[ -z $p ]]; then echo 0; else awk '{print $14 + $15}' "/proc/$p/stat"; fi
}
hwm_kib() { # fs -> peak resident set of its daemon, KiB
    local p=${PID[$1]:-}
    if [[ -z $p ]]; then echo 0; else awk '/^VmHWM:/ {print $2}' "/proc/$p/status"; fi
}
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# One fio run; prints "bytes seconds iops" (reads and writes summed over jobs).
fio_run() { # dir name [fio options...]
    local dir=$1 name=$2
    shift 2
    fio --name="$name" --directory="$dir" --output-format=json --group_reporting "$@" 2>"$W/fio.err" |
        python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
b = j["read"]["io_bytes"] + j["write"]["io_bytes"]
ops = j["read"]["total_ios"] + j["write"]["total_ios"]
# Per direction, runtime is that of the longest job, in ms; it includes end_fsync.
secs = max(j["read"]["runtime"], j["write"]["runtime"]) / 1000
print(b, secs, ops / secs if secs else 0)' || {
        echo "fio failed: $(tail -3 "$W/fio.err")" >&2
        echo "0 0 0"
    }
}

SEQ4K=$((SIZE / 4))
RANDIO=$((SIZE / 4))
run_job() { # job fs -> "bytes seconds iops"
    local d=$W/$2
    case $1 in
    seq-write-1m)
        rm -f "$d/bench.dat"
        fio_run "$d" sw --filename=bench.dat --rw=write --bs=1M --size="${SIZE}M" --ioengine=psync --end_fsync=1 ;;
    seq-read-1m)
        drop
        fio_run "$d" sr --filename=bench.dat --rw=read --bs=1M --size="${SIZE}M" --ioengine=psync ;;
    rand-read-4k)
        drop
        fio_run "$d" rr --filename=bench.dat --rw=randread --bs=4k --size="${SIZE}M" --ioengine=psync \
            --runtime="$RUNTIME" --time_based ;;
    rand-read-4k-qd16)
        drop
        fio_run "$d" rrq --filename=bench.dat --rw=randread --bs=4k --size="${SIZE}M" --ioengine=libaio \
            --iodepth=16 --direct=1 --runtime="$RUNTIME" --time_based ;;
    rand-write-4k)
        fio_run "$d" rw --filename=bench.dat --rw=randwrite --bs=4k --size="${SIZE}M" --io_size="${RANDIO}M" \
            --ioengine=psync --end_fsync=1 ;;
    rand-write-4k-qd16)
        fio_run "$d" rwq --filename=bench.dat --rw=randwrite --bs=4k --size="${SIZE}M" --io_size="${RANDIO}M" \
            --ioengine=libaio --iodepth=16 --direct=1 --end_fsync=1 ;;
    seq-write-4k)
        rm -f "$d/seq4k.dat"
        fio_run "$d" s4 --filename=seq4k.dat --rw=write --bs=4k --size="${SEQ4K}M" --ioengine=psync --end_fsync=1
        rm -f "$d/seq4k.dat" ;;
    parallel-4)
        # Lay the four files out first (not timed), then run cold.
        fio --name=p4 --directory="$d" --numjobs=4 --size="$((SIZE / 4))M" --rw=write --bs=1M \
            --create_only=1 >/dev/null 2>&1 || true
        drop
        fio_run "$d" p4 --numjobs=4 --rw=randrw --rwmixread=50 --bs=4k --size="$((SIZE / 4))M" --ioengine=psync \
            --runtime="$RUNTIME" --time_based
        rm -f "$d"/p4.* ;;
    metadata)
        local t0 t1 t2 t3 t4 bytes kib0=0 kib=0 bdir
        rm -rf "$d/tree"
        mkdir "$d/tree"
        bdir=$(backing_dir "$2")
        sync
        [[ -n $bdir && -d $bdir ]] && kib0=$(du -sk "$bdir" | cut -f1)
        t0=$(date +%s.%N)
        tar -xzf "$TARBALL" -C "$d/tree"
        t1=$(date +%s.%N)
        drop
        # Space the extracted tree takes in the backing store (du after the drop's sync minus
        # du before; not timed): the cost of a format's per-file overhead (v3's header area).
        [[ -n $bdir && -d $bdir ]] && kib=$(($(du -sk "$bdir" | cut -f1) - kib0))
        t2=$(date +%s.%N)
        ls -lR "$d/tree" >/dev/null
        drop
        t3=$(date +%s.%N)
        bytes=$(find "$d/tree" -type f -print0 | xargs -0 cat | wc -c)
        find "$d/tree" -type f -print0 | xargs -0 sha256sum >/dev/null
        t4=$(date +%s.%N)
        rm -rf "$d/tree"
        local t5
        t5=$(date +%s.%N)
        # Seconds of the four stages (not the cache drops); bytes: what was extracted.
        python3 -c '
import json, sys
a = [float(x) for x in sys.argv[1:7]]
st = {"extract": a[1] - a[0], "ls": a[3] - a[2], "sum": a[4] - a[3], "rm": a[5] - a[4]}
print(int(sys.argv[7]), sum(st.values()), 0,
      json.dumps(dict(st, backing_kib=int(sys.argv[8])), separators=(",", ":")))' \
            "$t0" "$t1" "$t2" "$t3" "$t4" "$t5" "$bytes" "$kib" ;;
    *) echo "unknown job $1" >&2; return 1 ;;
    esac
}

JOBS=(seq-write-1m seq-read-1m rand-read-4k rand-read-4k-qd16 rand-write-4k rand-write-4k-qd16 seq-write-4k parallel-4 metadata)
if [[ -n $ONLY ]]; then
    IFS=, read -r -a JOBS <<<"$ONLY"
    # The read and random write jobs work on the file seq-write-1m leaves.
    if [[ " ${JOBS[*]} " =~ \ (seq-read-1m|rand-read-4k|rand-read-4k-qd16|rand-write-4k|rand-write-4k-qd16)\  &&
        " ${JOBS[*]} " != *" seq-write-1m "* ]]; then
        JOBS=(seq-write-1m "${JOBS[@]}")
    fi
fi

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
echo "bench-fio: ${FSS[*]}; jobs ${JOBS[*]}; ${SIZE} MiB, ${ROUNDS} round(s); load $LOAD0; results in $OUT"
for ((r = 1; r <= ROUNDS; r++)); do
    # Each round starts one filesystem further on: what runs right after another pays for
    # some of the disk work that one left (the metadata job took 1.15-1.2x its time in the
    # slot after raw, session 10), so no filesystem keeps the same neighbour in every round.
    ORDER=()
    for ((i = 0; i < ${#FSS[@]}; i++)); do ORDER+=("${FSS[$(((i + r - 1) % ${#FSS[@]}))]}"); done
    for job in "${JOBS[@]}"; do
        for fs in "${ORDER[@]}"; do
            c0=$(ticks "$fs")
            read -r bytes secs iops stages < <(run_job "$job" "$fs")
            c1=$(ticks "$fs")
            printf '{"round":%d,"job":"%s","fs":"%s","bytes":%s,"seconds":%s,"iops":%s,"cpu_ticks":%d,"hz":%d,"stages":%s}\n' \
                "$r" "$job" "$fs" "$bytes" "$secs" "$iops" "$((c1 - c0))" "$(getconf CLK_TCK)" "${stages:-null}" >>"$RESULTS"
            printf '  round %d %-20s %-12s %8.1f MB/s %9.0f IOPS %7.2f s\n' "$r" "$job" "$fs" \
                "$(python3 -c "print($bytes / max($secs, 1e-9) / 1e6)")" "$iops" "$secs"
        done
    done
    for fs in "${FSS[@]}"; do rm -f "$W/$fs/bench.dat"; done
done
for fs in "${FSS[@]}"; do
    printf '{"fs":"%s","peak_rss_kib":%d}\n' "$fs" "$(hwm_kib "$fs")" >>"$RESULTS"
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
{
    echo "kernel $(uname -r); $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
    echo "fio $(fio --version); $(gocryptfs -version 2>/dev/null | head -1 || echo 'no gocryptfs')"
    echo "cmkfs $CMKFS_BIN ${CMKFS_MOUNT_ARGS:-}; baseline ${CMKFS_BASELINE:-none} ${CMKFS_BASELINE_ARGS:-}"
    echo "size ${SIZE} MiB, random jobs ${RUNTIME} s / ${RANDIO} MiB, rounds ${ROUNDS}; tarball $(basename "$TARBALL")"
    echo "load average before: $LOAD0; after: $LOAD1; $(date -u +%Y-%m-%dT%H:%MZ)"
} >"$OUT/env.txt"
python3 "$ROOT/scripts/bench_fio_report.py" "$OUT" | tee "$OUT/table.md"
python3 - "$RESULTS" <<'PY' | tee -a "$OUT/table.md"
import json, statistics, sys
kib = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    st = r.get("stages") or {}
    if r.get("job") == "metadata" and "backing_kib" in st:
        kib.setdefault(r["fs"], []).append(st["backing_kib"])
if kib:
    print("\nwhat the metadata job's extraction added to the backing store (du -sk, KiB, median): "
          + ", ".join(f"{fs} {int(statistics.median(v))}" for fs, v in kib.items()))
PY
if [[ -n $SVG ]]; then
    mkdir -p "$(dirname "$SVG")"
    cp "$OUT/plot.svg" "$SVG"
    echo "plot: $SVG"
fi
