# Sourced by scripts/test.sh and scripts/soak.sh: a directory of this run's own for the test
# temp dirs (tests/suite/common: `$CMKFS_TEST_RUN_DIR/cmkfs-test-*`), and the exit cleanup of
# the mounts a killed test left in it. Only this run's: a suite running beside this one (another
# checkout, another helper) keeps its mounts.
#
#   test_run_dir_start    # makes the directory, exports CMKFS_TEST_RUN_DIR, sets the EXIT trap

# The directory is short (`$TMPDIR/cmkfs-run-XXXXXX`) because a mount's control socket lives
# 55 bytes deeper and a unix socket path holds 107 (the harness checks it).
test_run_dir_start() {
    local tmp="${TMPDIR:-/tmp}"
    tmp="${tmp%/}"
    CMKFS_TEST_RUN_DIR="$(mktemp -d "$tmp/cmkfs-run-XXXXXX")"
    # Traversable like the temp dir it stands in for (mktemp makes it 0700): tests that act as
    # an unprivileged user open their own root (0700 otherwise) to reach a volume in it.
    chmod 755 "$CMKFS_TEST_RUN_DIR"
    # Canonical, as mountinfo shows mount points.
    CMKFS_TEST_RUN_DIR="$(cd "$CMKFS_TEST_RUN_DIR" && pwd -P)"
    export CMKFS_TEST_RUN_DIR
    trap test_run_dir_cleanup EXIT
}

# A test killed by the runner (timeout, SIGKILL) cannot run its own cleanup. Abort the FUSE
# connection (so nothing stays blocked on a dead daemon), detach the mount, then remove the
# run's directory (never crossing into a mount that would not detach).
test_run_dir_cleanup() {
    local dir="${CMKFS_TEST_RUN_DIR:-}"
    [[ -n "$dir" && -d "$dir" ]] || return 0
    # mountinfo: field 3 is major:minor, field 5 the mount point; the fstype follows " - ".
    awk -v dir="$dir/" '
        { split($0, halves, " - "); split(halves[2], right, " ") }
        right[1] ~ /^fuse/ && index($5, dir) == 1 { print $3, $5 }
    ' /proc/self/mountinfo | sort -r -k2 | while read -r devno mnt; do
        local major="${devno%%:*}" minor="${devno##*:}"
        local conn=$(( (major << 20) | minor ))
        echo "cleanup: stale mount $mnt (FUSE connection $conn)"
        if [[ -w "/sys/fs/fuse/connections/$conn/abort" ]]; then
            echo 1 >"/sys/fs/fuse/connections/$conn/abort" || true
        fi
        ${SUDO:+"${SUDO[@]}"} umount -l "$mnt" 2>/dev/null || true
    done
    rm -rf --one-file-system "$dir" 2>/dev/null || true
}
