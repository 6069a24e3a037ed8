#!/usr/bin/env bash
# A/B of fuser's request wipe: write throughput through a mount, same machine, same run,
# interleaved. Usage: scripts/ab-request-wipe.sh UNPATCHED-CMKFS PATCHED-CMKFS [ROUNDS]
# (docs/SECURITY.md, section 5: the cost of wiping fuser's request buffers).
set -euo pipefail
A=$1; B=$2; N=${3:-3}
W=$(mktemp -d /tmp/m2ab.XXXX)
export CMKFS_HOME=$W/home CMKFS_VAULT_KDF=test CMKFS_PASSPHRASE_FILE=$W/pass
umask 077; echo "ab test passphrase" > $W/pass
head -c $((256<<20)) /dev/urandom > /dev/shm/m2ab.src
"$A" init $W/c --key-size 2048 >/dev/null
mkdir -p $W/m
run() { # bin bs count
  "$1" mount $W/c $W/m >/dev/null
  local t0=$(date +%s.%N)
  dd if=/dev/shm/m2ab.src of=$W/m/f bs=$2 count=$3 conv=fsync status=none
  local t1=$(date +%s.%N)
  "$1" umount $W/m >/dev/null
  echo "$t0 $t1" | awk -v n=$(( $3 )) -v bs=$2 '{printf "%.1f", (n*bs/1048576)/($2-$1)}'
}
for r in $(seq $N); do
  for which in A B; do
    bin=$A; [[ $which == B ]] && bin=$B
    big=$(run $bin 1048576 256); small=$(run $bin 4096 16384)
    echo "round $r $which: 1 MiB writes ${big} MiB/s, 4 KiB writes ${small} MiB/s"
  done
done
rm -rf $W /dev/shm/m2ab.src
