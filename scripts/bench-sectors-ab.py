#!/usr/bin/env python3
# Interleaved `cmkfs bench sectors` runs of several builds or CMKFS_XTS settings: the median
# MB per CPU-second of each (op, size), one thread, and the ratio of the first to the last.
#
#   scripts/bench-sectors-ab.py ROUNDS LABEL:BIN:[CMKFS_XTS] ...
#   e.g. scripts/bench-sectors-ab.py 5 vaes:target/release/cmkfs: ni:target/release/cmkfs:aes-ni
import json, os, subprocess, sys, statistics
runs = []  # (label, bin, env)
for spec in sys.argv[2:]:
    label, binp, xts = spec.split(":")
    runs.append((label, binp, xts))
rounds = int(sys.argv[1])
res = {}
for r in range(rounds):
    for label, binp, xts in runs:
        env = dict(os.environ)
        env.pop("CMKFS_XTS", None)
        if xts:
            env["CMKFS_XTS"] = xts
        out = subprocess.run([binp, "bench", "sectors", "--threads", "1", "--rounds", "1",
                              "--seconds", "0.5", "--no-openssl", "--json"],
                             env=env, capture_output=True, text=True, check=True).stdout
        j = json.loads(out)
        for m in j["results"]:
            res.setdefault((label, j["implementation"], m["op"], m["size"]), []).append(m["mb_per_cpu_s"])
keys = sorted({(k[2], k[3]) for k in res})
labels = [(l, impl) for (l, impl, o, s) in res if (o, s) == keys[0]]
print("op size " + " ".join(f"{l}({i})" for l, i in labels) + "  ratio(first/last)")
for o, s in keys:
    meds = [statistics.median(res[(l, i, o, s)]) for l, i in labels]
    print(f"{o} {s} " + " ".join(f"{m:.0f}" for m in meds) + f"  {meds[0]/meds[-1]:.2f}")
