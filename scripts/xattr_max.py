#!/usr/bin/env python3
"""Largest xattr value each directory takes, per name: a binary search of setxattr on a
file created in each (README, "POSIX conformance"). Usage: xattr_max.py DIR..."""
import os, sys
def mx(p, name):
    lo, hi = 0, 70000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            os.setxattr(p, name, b'v' * mid); os.removexattr(p, name); lo = mid
        except OSError: hi = mid - 1
    return lo
for d in sys.argv[1:]:
    p = d + '/xf'; open(p, 'w').close()
    print(d, [(n, mx(p, n)) for n in ('user.a', 'user.' + 'n' * 20, 'user.' + 'n' * 100)])
    os.unlink(p)
