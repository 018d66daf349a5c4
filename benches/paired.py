#!/usr/bin/env python3
"""benches/paired.py RAW.csv - issue 11's goals, read pairwise from one peers.sh run.

peers.sh prints medians of each target's rate. On this shared host the rate of every
target swings by 20-50 % from one minute to the next, so two medians taken minutes apart
can disagree by more than the difference being measured. Within one repetition the
targets run back to back (seconds apart); this script divides geoproxy's rate by its
rival's in the same repetition, and reports the median of those ratios and how many
repetitions geoproxy won. Rivals, per goal: twemproxy (nutcracker) for (a) and (d),
geoproxy with multiplex = false for (b) and (c); p99 latency against HAProxy's.

Usage: benches/paired.py /tmp/run/raw.csv   (the raw.csv that peers.sh writes in $RUN)
"""
import csv
import statistics
import sys
from collections import defaultdict

RIVAL = {"a": "nutcracker", "b": "geoproxy_1to1", "c": "geoproxy_1to1", "d": "nutcracker"}


def main(path):
    # (workload, test) -> rep -> target -> row
    runs = defaultdict(lambda: defaultdict(dict))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            runs[(row["workload"], row["test"])][row["rep"]][row["target"]] = row
    print("| workload | test | rival | reps | rate / rival's, median (min-max) | reps won "
          "| p99 / HAProxy's, median | reps with p99 <= HAProxy's |")
    print("|---|---|---|---:|---|---:|---:|---:|")
    for (workload, test), reps in sorted(runs.items()):
        rival = RIVAL.get(workload)
        ratios, p99s = [], []
        for targets in reps.values():
            ours = targets.get("geoproxy")
            theirs = targets.get(rival)
            if ours and theirs:
                ratios.append(float(ours["rps"]) / float(theirs["rps"]))
            if ours and "haproxy" in targets:
                p99s.append(float(ours["p99_ms"]) / float(targets["haproxy"]["p99_ms"]))
        if not ratios:
            continue
        won = sum(r >= 1.0 for r in ratios)
        p99_ok = sum(p <= 1.0 for p in p99s)
        p99 = f"{statistics.median(p99s):.2f}" if p99s else "-"
        print(f"| {workload} | {test} | {rival} | {len(ratios)} "
              f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
              f"| {won}/{len(ratios)} | {p99} | {p99_ok}/{len(p99s)} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
