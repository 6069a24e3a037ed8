#!/usr/bin/env bash
# Runs every check of the project: the one command CI runs (.ci/run) and the one a new
# contributor runs on a fresh Debian 12 machine, as root (or with sudo).
#
#   scripts/test.sh                 # install what is missing, fmt, clippy, all tests
#   scripts/test.sh -- FILTER...    # extra arguments after -- go to the test runner
#
# The integration tests mount real FUSE filesystems (/dev/fuse, root). Each test unmounts what
# it mounted even when it fails and has time limits (tests/suite/common/mod.rs); this script adds a
# per-test kill switch (.config/nextest.toml) and, on exit, lazily unmounts anything a killed
# test of this run left behind (scripts/test-run-dir.sh).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n==== %s ====\n' "$*"; }

runner_args=()
if [[ "${1:-}" == "--" ]]; then
    shift
    runner_args=("$@")
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO=(sudo)
fi

# ---------------------------------------------------------------------------------------------
section "system packages"
# ---------------------------------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    if [[ "$APT_UPDATED" -eq 0 ]]; then
        "${SUDO[@]}" apt-get update -qq
        APT_UPDATED=1
    fi
    echo "installing: $*"
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "$@"
}

missing=()
# fuse3: fusermount3, for mounting as a non-root user (as root cmkfs calls mount(2) itself).
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
# openssl: reference numbers and test fixtures.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# cc: the Rust toolchain links with it; tests/suite/security.rs also builds a marker PKCS#11 module
# with it (to show that a module named by a volume header is never loaded).
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
# softhsm2: the PKCS#11 vault backend's tests run against throwaway SoftHSM2 tokens.
command -v softhsm2-util >/dev/null 2>&1 || missing+=(softhsm2)
# python3 + venv: the Azure Key Vault SDK compatibility test (tests/sdk).
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
fi
# POSIX tests against real tools: setfacl/getfacl (acl), setfattr/getfattr (attr), setcap/getcap
# (libcap2-bin), rsync -aHAX (rsync).
command -v setfacl >/dev/null 2>&1 || missing+=(acl)
command -v setfattr >/dev/null 2>&1 || missing+=(attr)
command -v setcap >/dev/null 2>&1 || missing+=(libcap2-bin)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
# strace: mount_format_v3 checks the offsets of the daemon's backing pwrites, mount_dirid_sync
# the order of its fsyncs and renames.
command -v strace >/dev/null 2>&1 || missing+=(strace)
# e2fsprogs: mount_dirid_sync makes small ext4 images (with and without a journal).
command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
# Later issues add their tools here, e.g.:
#   comparison benches:   command -v gocryptfs >/dev/null 2>&1 || missing+=(gocryptfs)
#                         command -v fio >/dev/null 2>&1 || missing+=(fio)
if [[ ${#missing[@]} -gt 0 ]]; then
    apt_install "${missing[@]}"
else
    echo "all present"
fi

# Python venv for the SDK interoperability test: created once, reinstalled only when
# tests/sdk/requirements.txt changes (its copy in the venv is the stamp).
SDK_VENV=target/sdk-venv
if ! cmp -s tests/sdk/requirements.txt "$SDK_VENV/requirements.txt" 2>/dev/null; then
    echo "creating $SDK_VENV (azure-keyvault-keys)"
    rm -rf "$SDK_VENV"
    python3 -m venv "$SDK_VENV"
    "$SDK_VENV/bin/pip" install -q --disable-pip-version-check -r tests/sdk/requirements.txt
    cp tests/sdk/requirements.txt "$SDK_VENV/requirements.txt"
else
    echo "$SDK_VENV is up to date"
fi

if [[ ! -c /dev/fuse ]]; then
    "${SUDO[@]}" modprobe fuse 2>/dev/null || true
fi
if [[ ! -c /dev/fuse ]]; then
    echo "error: /dev/fuse is missing; the mount tests need FUSE (modprobe fuse, or run the" \
        "container with --device /dev/fuse --cap-add SYS_ADMIN)" >&2
    exit 1
fi
# fusectl lets the test harness abort a hung FUSE connection instead of hanging.
if [[ -d /sys/fs/fuse/connections ]] && ! grep -q ' - fusectl ' /proc/self/mountinfo; then
    "${SUDO[@]}" mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null || true
fi

# ---------------------------------------------------------------------------------------------
section "toolchain"
# ---------------------------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust >= 1.89 with rustup (https://rustup.rs):" >&2
    echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            rustup component add "$component"
        else
            echo "error: cargo ${component/rustfmt/fmt} is missing and rustup is not available" >&2
            exit 1
        fi
    fi
done
cargo --version

# ---------------------------------------------------------------------------------------------
# This run's test temp dirs live under a directory of its own ($CMKFS_TEST_RUN_DIR); on exit,
# whatever a killed test left mounted there is aborted and detached, and the directory removed.
# Mounts of a suite running beside this one are not touched (scripts/test-run-dir.sh).
# ---------------------------------------------------------------------------------------------
# shellcheck source=scripts/test-run-dir.sh
source scripts/test-run-dir.sh
test_run_dir_start

# ---------------------------------------------------------------------------------------------
section "cargo fmt --check"
# ---------------------------------------------------------------------------------------------
cargo fmt --all -- --check

# ---------------------------------------------------------------------------------------------
section "cargo clippy -D warnings"
# ---------------------------------------------------------------------------------------------
cargo clippy --all-targets -- -D warnings

# ---------------------------------------------------------------------------------------------
section "tests"
# ---------------------------------------------------------------------------------------------
if cargo nextest --version >/dev/null 2>&1; then
    # Per-test timeouts and the mount test group live in .config/nextest.toml.
    cargo nextest run --no-fail-fast "${runner_args[@]}"
    # nextest does not run doctests.
    cargo test --doc
else
    echo "(cargo-nextest not installed: using cargo test; no per-test kill switch)"
    cargo test --no-fail-fast -- --test-threads=2 "${runner_args[@]}"
fi

# ---------------------------------------------------------------------------------------------
section "Azure Key Vault SDK against cmkfs vault serve"
# ---------------------------------------------------------------------------------------------
# The test run above built target/debug/cmkfs (integration tests use it); a separate
# `cargo build` would compile the dependency tree again with other features.
[[ -x target/debug/cmkfs ]] || cargo build --bin cmkfs
CMKFS_BIN=target/debug/cmkfs timeout 300 "$SDK_VENV/bin/python" tests/sdk/test_keyvault_sdk.py

section "all checks passed"
