#!/usr/bin/env python3
"""The tree the re-encryption benchmarks fill through a mount (scripts/bench-reencrypt.sh,
scripts/bench-reencrypt-cpu.sh): like a home directory, many small files, some medium, a few
large, sizes drawn from a fixed seed, random data.

    reencrypt_bench_tree.py MOUNTPOINT MIB
"""
import os, random, sys
mnt, mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(13)
left = mib << 20
i = 0
chunk = os.urandom(1 << 20)
while left > 0:
    kind = rng.random()
    size = rng.randrange(0, 16 << 10) if kind < 0.6 else \
        rng.randrange(16 << 10, 1 << 20) if kind < 0.95 else rng.randrange(4 << 20, 32 << 20)
    size = min(size, left)
    d = os.path.join(mnt, "d%02d" % (i % 37))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        done = 0
        while done < size:
            n = min(size - done, len(chunk))
            f.write(chunk[:n] if done else os.urandom(min(n, 64)) + chunk[64:n])
            done += n
    left -= size
    i += 1
print(f"{i} files, {mib} MiB", file=sys.stderr)
