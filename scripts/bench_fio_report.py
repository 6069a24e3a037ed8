#!/usr/bin/env python3
"""Table and plot of a scripts/bench-fio.sh run.

    scripts/bench_fio_report.py OUT_DIR

Reads OUT_DIR/results.jsonl (one line per job, filesystem and round, plus one peak-RSS line
per filesystem) and OUT_DIR/env.txt; prints a markdown table (medians over rounds) and writes
OUT_DIR/plot.svg with the same figures. Standard library only.
"""

import json
import statistics
import sys
from html import escape
from pathlib import Path

# What each job's headline figure is.
UNITS = {
    "seq-write-1m": "MB/s",
    "seq-read-1m": "MB/s",
    "rand-read-4k": "IOPS",
    "rand-read-4k-qd16": "IOPS",
    "rand-write-4k": "IOPS",
    "rand-write-4k-qd16": "IOPS",
    "seq-write-4k": "IOPS",
    "parallel-4": "IOPS",
    "metadata": "s",
}
ORDER = ["raw", "cmkfs", "cmkfs-base", "gocryptfs", "passthrough"]
COLORS = {
    "cmkfs": "#1f5fa8",
    "cmkfs-base": "#8fb5de",
    "gocryptfs": "#e8842a",
    "passthrough": "#3a9a48",
    "raw": "#777777",
}
GIB = 1 << 30


def load(out):
    rows, rss = [], {}
    for line in (out / "results.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "peak_rss_kib" in r:
            rss[r["fs"]] = r["peak_rss_kib"]
        else:
            rows.append(r)
    return rows, rss


def figure(r):
    """The headline figure of one run: MB/s, IOPS or seconds."""
    unit = UNITS.get(r["job"], "MB/s")
    if unit == "s":
        return r["seconds"]
    if unit == "IOPS":
        return r["iops"]
    return r["bytes"] / r["seconds"] / 1e6 if r["seconds"] else 0.0


def cpu(r):
    """Daemon CPU: seconds per GiB moved (seconds in total for the metadata job)."""
    s = r["cpu_ticks"] / r["hz"]
    if UNITS.get(r["job"]) == "s":
        return s
    return s / (r["bytes"] / GIB) if r["bytes"] else 0.0


def medians(rows):
    by = {}
    for r in rows:
        if r["seconds"] <= 0:
            continue
        by.setdefault((r["job"], r["fs"]), []).append(r)
    return {
        k: (
            statistics.median(figure(r) for r in v),
            statistics.median(cpu(r) for r in v),
            len(v),
        )
        for k, v in by.items()
    }


def fmt(v, unit):
    if v is None:
        return "–"
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "IOPS":
        return f"{v / 1000:.1f}k" if v >= 10000 else f"{v:.0f}"
    return f"{v:.0f}"


def ratio(a, b, unit):
    """How much better a is than b (>1: better): throughput a/b, time b/a."""
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return b / a if unit == "s" else a / b


def stage_medians(rows, fss):
    """Median seconds of each stage of the metadata job, per filesystem."""
    out = {}
    for f in fss:
        runs = [r["stages"] for r in rows if r["fs"] == f and r.get("stages")]
        if runs:
            out[f] = {
                k: statistics.median(s[k] for s in runs) for k in runs[0] if k != "backing_kib"
            }
    return out


def table(jobs, fss, med, rss, env, rows):
    others = [f for f in fss if f not in ("raw",)]
    head = ["job", "unit"] + fss
    if "gocryptfs" in fss:
        head.append("cmkfs / gocryptfs")
    head.append("cmkfs / raw")
    if "cmkfs-base" in fss:
        head.append("cmkfs / base")
    head += [f"CPU {f}" for f in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for job in jobs:
        unit = UNITS.get(job, "MB/s")
        val = {f: med.get((job, f), (None, None, 0))[0] for f in fss}
        row = [job, unit] + [("**" + fmt(val[f], unit) + "**") if f == "cmkfs" else fmt(val[f], unit) for f in fss]
        rs = []
        if "gocryptfs" in fss:
            rs.append(ratio(val["cmkfs"], val["gocryptfs"], unit))
        rs.append(ratio(val["cmkfs"], val["raw"], unit))
        if "cmkfs-base" in fss:
            rs.append(ratio(val["cmkfs"], val["cmkfs-base"], unit))
        row += ["–" if x is None else f"{x:.2f}x" for x in rs]
        for f in others:
            c = med.get((job, f), (None, None, 0))[1]
            row.append("–" if c is None else (f"{c:.2f} s" if unit == "s" else f"{c:.2f}"))
        lines.append("| " + " | ".join(row) + " |")
    out = "\n".join(lines)
    out += (
        "\n\nRatios: how many times better cmkfs is (throughput over throughput; for the "
        "metadata job, time over time, so >1 means faster). CPU: daemon user+system seconds "
        "per GiB moved (metadata: seconds for the whole job), from /proc/PID/stat.\n"
    )
    stages = stage_medians(rows, fss)
    if stages:
        out += "\nMetadata job by stage (seconds, medians): " + "; ".join(
            f + " " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()) for f, st in stages.items()
        ) + ".\n"
    if rss:
        out += "\nPeak RSS of each daemon over the whole run (VmHWM): " + ", ".join(
            f"{f} {rss[f] / 1024:.0f} MiB" for f in fss if f in rss and f != "raw"
        ) + ".\n"
    if env:
        out += "\n" + "\n".join(f"- {l}" for l in env.splitlines()) + "\n"
    return out


def svg(jobs, fss, med, rss, env_line):
    bars = [f for f in fss if f != "raw"]
    row_h = 12 * len(bars) + 10
    left, width = 150, 420
    top1 = 58
    h1 = row_h * len(jobs)
    cpu_jobs = [j for j in jobs if UNITS.get(j) != "s"]
    top2 = top1 + h1 + 70
    h2 = row_h * len(cpu_jobs)
    total_h = top2 + h2 + 70
    total_w = left + width + 2 * 150 + 40
    rel = {}
    for job in jobs:
        unit = UNITS.get(job, "MB/s")
        raw = med.get((job, "raw"), (None,))[0]
        for f in bars:
            v = med.get((job, f), (None,))[0]
            rel[(job, f)] = ratio(v, raw, unit)
    xmax = max([1.2] + [v for v in rel.values() if v]) * 1.08
    cmax = max([0.6] + [med.get((j, f), (0, 0))[1] or 0 for j in cpu_jobs for f in bars]) * 1.08
    o = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{total_w}" height="{total_h}" fill="white"/>',
        f'<text x="10" y="20" font-size="14" font-weight="bold">cmkfs, gocryptfs and a FUSE passthrough '
        f"against the raw backing directory (scripts/bench-fio.sh)</text>",
        f'<text x="10" y="38" fill="#555">{escape(env_line)}</text>',
        f'<text x="{left}" y="{top1 - 6}" font-weight="bold">throughput relative to raw '
        f"(metadata: raw time / time); higher is better</text>",
    ]

    def axis(top, h, vmax, ticks, label_fmt):
        for t in ticks:
            x = left + width * t / vmax
            o.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + h}" stroke="#ddd"/>')
            o.append(f'<text x="{x:.1f}" y="{top + h + 14}" text-anchor="middle" fill="#555">{label_fmt(t)}</text>')

    step = 0.25 if xmax <= 2 else 0.5 if xmax <= 4 else 1.0
    axis(top1, h1, xmax, [i * step for i in range(int(xmax / step) + 1)], lambda t: f"{t:g}x")
    x1 = left + width * 1.0 / xmax
    o.append(f'<line x1="{x1:.1f}" y1="{top1 - 2}" x2="{x1:.1f}" y2="{top1 + h1}" stroke="#333" stroke-dasharray="4 3"/>')
    for i, job in enumerate(jobs):
        y = top1 + i * row_h
        o.append(f'<text x="{left - 8}" y="{y + row_h / 2 + 3:.1f}" text-anchor="end">{job}</text>')
        unit = UNITS.get(job, "MB/s")
        for k, f in enumerate(bars):
            v = rel.get((job, f))
            by = y + 5 + k * 12
            if v is None:
                continue
            w = width * v / xmax
            absval = fmt(med[(job, f)][0], unit)
            o.append(f'<rect x="{left}" y="{by}" width="{w:.1f}" height="10" fill="{COLORS.get(f, "#999")}"/>')
            o.append(f'<text x="{left + w + 4:.1f}" y="{by + 9}" fill="#333">{v:.2f}x ({absval} {unit})</text>')
    o.append(
        f'<text x="{left}" y="{top2 - 6}" font-weight="bold">daemon CPU seconds per GiB moved '
        f"(user + system); lower is better; target 0.5</text>"
    )
    cstep = 0.25 if cmax <= 2 else 0.5 if cmax <= 5 else 1.0
    axis(top2, h2, cmax, [i * cstep for i in range(int(cmax / cstep) + 1)], lambda t: f"{t:g}")
    xt = left + width * 0.5 / cmax
    o.append(f'<line x1="{xt:.1f}" y1="{top2 - 2}" x2="{xt:.1f}" y2="{top2 + h2}" stroke="#b00" stroke-dasharray="4 3"/>')
    for i, job in enumerate(cpu_jobs):
        y = top2 + i * row_h
        o.append(f'<text x="{left - 8}" y="{y + row_h / 2 + 3:.1f}" text-anchor="end">{job}</text>')
        for k, f in enumerate(bars):
            c = med.get((job, f), (None, None))[1]
            by = y + 5 + k * 12
            if c is None:
                continue
            w = width * c / cmax
            o.append(f'<rect x="{left}" y="{by}" width="{w:.1f}" height="10" fill="{COLORS.get(f, "#999")}"/>')
            o.append(f'<text x="{left + w + 4:.1f}" y="{by + 9}" fill="#333">{c:.2f}</text>')
    lx = left + width + 150
    for k, f in enumerate(bars):
        ly = top1 + k * 16
        label = f
        if f in rss:
            label += f" (peak RSS {rss[f] / 1024:.0f} MiB)"
        o.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{COLORS.get(f, "#999")}"/>')
        o.append(f'<text x="{lx + 14}" y="{ly + 9}">{escape(label)}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def main():
    out = Path(sys.argv[1])
    rows, rss = load(out)
    env = (out / "env.txt").read_text() if (out / "env.txt").exists() else ""
    present = {r["fs"] for r in rows}
    fss = [f for f in ORDER if f in present] + sorted(present - set(ORDER))
    jobs = []
    for r in rows:
        if r["job"] not in jobs:
            jobs.append(r["job"])
    med = medians(rows)
    print(table(jobs, fss, med, rss, env, rows))
    env_line = "; ".join(l for l in env.splitlines() if l.startswith(("kernel", "size", "load")))
    (out / "plot.svg").write_text(svg(jobs, fss, med, rss, env_line))


if __name__ == "__main__":
    main()
