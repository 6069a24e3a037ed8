#!/usr/bin/env bash
# cmkfs end to end, for a new user on a fresh Debian 12 machine (as root, or with sudo):
# installs what is missing, builds, creates a demo volume on the embedded vault, mounts it,
# writes a file, and shows the plaintext view beside the ciphertext in the backing directory.
#
#   scripts/demo.sh            # run the demo, unmount at the end
#   scripts/demo.sh --keep     # leave the volume mounted to play with
#
# Environment:
#   DEMO_DIR    where the demo lives (default /tmp/cmkfs-demo): cipher/ (backing directory),
#               plain/ (mountpoint) and, unless CMKFS_HOME is set, home/ (the vault).
#   CMKFS_HOME  cmkfs state directory (vault) to use instead of $DEMO_DIR/home.
#   CMKFS_PASSPHRASE_FILE  the vault passphrase (default: a random one the demo writes to
#               $DEMO_DIR/passphrase, 0600).
#
# Re-running is safe: an existing demo volume is reused, a leftover mount is unmounted first.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

KEEP=0
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h | --help)
            sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "demo.sh: unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() {
    printf '$ %s\n' "$*"
    "$@"
}

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO=(sudo)
fi

DEMO_DIR="${DEMO_DIR:-/tmp/cmkfs-demo}"
CIPHER="$DEMO_DIR/cipher"
PLAIN="$DEMO_DIR/plain"
export CMKFS_HOME="${CMKFS_HOME:-$DEMO_DIR/home}"
# The embedded vault is sealed at rest under a passphrase. A real user types it (cmkfs asks on
# the terminal) or keeps it where a service reads it; the demo makes a random one in a 0600
# file in its own directory, beside (not inside) the vault, unless one is given.
if [[ -z "${CMKFS_PASSPHRASE_FILE:-}" ]]; then
    mkdir -p "$DEMO_DIR"
    if [[ ! -s "$DEMO_DIR/passphrase" ]]; then
        (umask 077 && head -c 24 /dev/urandom | base64 >"$DEMO_DIR/passphrase")
    fi
    export CMKFS_PASSPHRASE_FILE="$DEMO_DIR/passphrase"
fi

# ---------------------------------------------------------------------------------------------
step "Installing what is missing"
# ---------------------------------------------------------------------------------------------
missing=()
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
command -v hexdump >/dev/null 2>&1 || missing+=(bsdextrautils)
if [[ ${#missing[@]} -gt 0 ]]; then
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "fuse3 and hexdump are present"
fi
if [[ ! -c /dev/fuse ]]; then
    "${SUDO[@]}" modprobe fuse 2>/dev/null || true
fi
[[ -c /dev/fuse ]] || {
    echo "demo.sh: /dev/fuse is missing: this machine (or container) has no FUSE" >&2
    exit 1
}
if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || {
    echo "demo.sh: cargo not found; install Rust >= 1.89 from https://rustup.rs and re-run" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
step "Building cmkfs (release)"
# ---------------------------------------------------------------------------------------------
cargo build --release --quiet --bin cmkfs
# Where cargo put it (CARGO_TARGET_DIR, when set, moves the target directory).
target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$target_dir" = /* ]] || target_dir="$PWD/$target_dir"
CMKFS="$target_dir/release/cmkfs"
echo "built $CMKFS"

is_mounted() { grep -qF " $1 " /proc/self/mountinfo; }

mkdir -p "$CIPHER" "$PLAIN"
if is_mounted "$PLAIN"; then
    echo "(a previous demo left $PLAIN mounted: unmounting it first)"
    "$CMKFS" umount "$PLAIN"
fi

# ---------------------------------------------------------------------------------------------
step "Creating the volume (vault: $CMKFS_HOME)"
# ---------------------------------------------------------------------------------------------
if [[ -f "$CIPHER/cmkfs.volume.json" ]]; then
    echo "$CIPHER is already a cmkfs volume: reusing it"
elif [[ -n "$(ls -A "$CIPHER")" ]]; then
    echo "demo.sh: $CIPHER is not empty and not a cmkfs volume; remove it or set DEMO_DIR" >&2
    exit 1
else
    # The first init also creates the embedded vault and its default RSA key.
    run "$CMKFS" init "$CIPHER"
fi

# ---------------------------------------------------------------------------------------------
step "Mounting $CIPHER at $PLAIN"
# ---------------------------------------------------------------------------------------------
run "$CMKFS" mount "$CIPHER" "$PLAIN"
if [[ "$KEEP" -eq 0 ]]; then
    # Whatever happens from here on, do not leave the demo mounted.
    trap 'is_mounted "$PLAIN" && "$CMKFS" umount "$PLAIN"' EXIT
fi

SENTENCE="Attack at dawn: the eagle lands at the old mill ($(date -u +%Y-%m-%dT%H:%M:%SZ))."
printf '%s\n' "$SENTENCE" >"$PLAIN/hello.txt"

# ---------------------------------------------------------------------------------------------
step "What applications see: the plaintext view ($PLAIN)"
# ---------------------------------------------------------------------------------------------
run ls -la "$PLAIN"
run cat "$PLAIN/hello.txt"

# ---------------------------------------------------------------------------------------------
step "What reaches the disk: the backing directory ($CIPHER)"
# ---------------------------------------------------------------------------------------------
run ls -la "$CIPHER"
# Every name that is not cmkfs metadata is an encrypted file name; show the file's bytes:
# a small per-file header, then AES-256-XTS ciphertext exactly as long as the plaintext.
for f in "$CIPHER"/*; do
    name="$(basename "$f")"
    [[ -f "$f" && "$name" != cmkfs.* && "$name" != .cmkfs* ]] || continue
    echo
    echo "--- $name ($(stat -c %s "$f") bytes on disk for a $(stat -c %s "$PLAIN/hello.txt")-byte file)"
    hexdump -C "$f" | head -n 8
done
echo
if grep -rqF "eagle lands" "$CIPHER"; then
    echo "UNEXPECTED: the sentence is readable in the backing directory" >&2
    exit 1
fi
echo "grep -r 'eagle lands' $CIPHER: no match: the sentence never reaches the disk in the clear."

# ---------------------------------------------------------------------------------------------
step "The volume header (the data key is stored only wrapped by the vault's RSA key)"
# ---------------------------------------------------------------------------------------------
run "$CMKFS" info "$CIPHER"
echo "The vault's RSA private key at rest is sealed (AES-256-GCM under the vault master key,"
echo "itself wrapped by the Argon2id-stretched passphrase):"
run head -c 160 "$(ls "$CMKFS_HOME"/vault/keys/default/*.pk8 | head -n 1)"
echo

# ---------------------------------------------------------------------------------------------
if [[ "$KEEP" -eq 1 ]]; then
    step "Done: left mounted"
    cat <<EOF
The volume stays mounted at $PLAIN. Try:
  echo secret > $PLAIN/note.txt; ls -la $CIPHER
  CMKFS_HOME=$CMKFS_HOME $CMKFS umount $PLAIN      # when done
EOF
else
    step "Unmounting"
    run "$CMKFS" umount "$PLAIN"
    trap - EXIT
    step "Done"
    cat <<EOF
What happened:
  - the embedded vault in $CMKFS_HOME holds an RSA key (created on first run);
  - $CIPHER is a volume: its data key is random and stored only wrapped by that key;
  - mounting unwrapped the data key through the vault and served $PLAIN in the clear,
    while every byte and name written to $CIPHER was encrypted.
Re-run with --keep to leave it mounted; run it again any time (the volume is reused).
EOF
fi
