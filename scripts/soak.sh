#!/usr/bin/env bash
# Long randomized runs for soak testing (issue 6 items 4 and 5): the model test
# (tests/suite/model.rs) over many seeds and operations, and the SIGKILL crash tests
# (tests/suite/crash.rs) over many rounds. Every seed is printed; a failure prints the seed and
# the last operations, and replays with the command it shows.
#
#   scripts/soak.sh                       # defaults below
#   SOAK_SEEDS=200 SOAK_OPS=5000 scripts/soak.sh
#   SOAK_SEED_BASE=1000 scripts/soak.sh   # seeds 1000..1000+SOAK_SEEDS-1 (default: random base)
#   SOAK_CRASH_RUNS=0 scripts/soak.sh     # model test only
#
# Environment:
#   SOAK_SEEDS        model seeds to run (default 20)
#   SOAK_OPS          operations per model seed (default 5000)
#   SOAK_SEED_BASE    first model seed (default: random); seeds run in batches of SOAK_BATCH
#   SOAK_BATCH        seeds per test process (default 5): one fresh volume per seed
#   SOAK_CRASH_RUNS   runs of the crash tests, each with a fresh random seed (default 5)
#   SOAK_CRASH_ROUNDS kill rounds per crash run (default 20)
#   SOAK_PROFILE      cargo profile flag, e.g. --release (default: debug, like CI)
#
# Needs what scripts/test.sh needs (root, /dev/fuse). Runs the test binaries directly, not
# through nextest, so its per-test time limit does not apply; the harness watchdog is raised
# to match the run length.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SEEDS="${SOAK_SEEDS:-20}"
OPS="${SOAK_OPS:-5000}"
BATCH="${SOAK_BATCH:-5}"
BASE="${SOAK_SEED_BASE:-$(( $(od -An -N4 -tu4 /dev/urandom) ))}"
CRASH_RUNS="${SOAK_CRASH_RUNS:-5}"
CRASH_ROUNDS="${SOAK_CRASH_ROUNDS:-20}"
PROFILE=(${SOAK_PROFILE:-})

# One operation takes a few milliseconds through FUSE; give each mount (one per half seed)
# ample time.
export CMKFS_TEST_WATCHDOG_SECS=$(( 600 + OPS / 20 ))

# Test temp dirs in a directory of this run's own, cleaned up on exit (scripts/test-run-dir.sh).
source scripts/test-run-dir.sh
test_run_dir_start

echo "building test binaries"
cargo build "${PROFILE[@]+"${PROFILE[@]}"}" --tests --bin cmkfs

failed=0
echo "model: $SEEDS seeds from $BASE, $OPS operations each"
for (( first = BASE; first < BASE + SEEDS; first += BATCH )); do
    last=$(( first + BATCH - 1 ))
    (( last >= BASE + SEEDS )) && last=$(( BASE + SEEDS - 1 ))
    list=$(seq -s, "$first" "$last")
    echo "---- model seeds $list"
    if ! CMKFS_MODEL_SEEDS="$list" CMKFS_MODEL_OPS="$OPS" \
        cargo test "${PROFILE[@]+"${PROFILE[@]}"}" -q --test suite model:: -- --nocapture --test-threads=1; then
        echo "FAILED: model seeds $list (replay one with CMKFS_MODEL_SEEDS=<seed> CMKFS_MODEL_OPS=$OPS)"
        failed=1
    fi
done

for (( run = 1; run <= CRASH_RUNS; run++ )); do
    seed=$(( $(od -An -N4 -tu4 /dev/urandom) ))
    echo "---- crash run $run/$CRASH_RUNS: seed $seed, $CRASH_ROUNDS rounds"
    if ! CMKFS_TEST_SEED="$seed" CMKFS_CRASH_ROUNDS="$CRASH_ROUNDS" \
        cargo test "${PROFILE[@]+"${PROFILE[@]}"}" -q --test suite crash::sigkill -- --nocapture --test-threads=1; then
        echo "FAILED: crash run with CMKFS_TEST_SEED=$seed CMKFS_CRASH_ROUNDS=$CRASH_ROUNDS"
        failed=1
    fi
done

if [[ "$failed" -ne 0 ]]; then
    echo "soak: FAILURES (see above)"
    exit 1
fi
echo "soak: all passed"
