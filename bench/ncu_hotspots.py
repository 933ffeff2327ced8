"""The SASS instructions of one profiled kernel with the most sampled warp stalls, and the share of the
samples in ranges of the instruction listing (where a kernel's warps spend their time).

    ncu --kernel-name regex:flash_fwd_sm90 --launch-skip 3 --launch-count 1 --section SourceCounters \\
        --section WarpStateStats -o /tmp/rep ./fwd_tune          # kernels/tune/fwd_tune.cu, -DHDIM=128
    ncu -i /tmp/rep.ncu-rep --page source --csv --print-source sass > /tmp/src.csv
    python bench/ncu_hotspots.py /tmp/src.csv --top 40 --ranges 56:900 900:4400 4400:5904
"""

from __future__ import annotations

import argparse
import csv


def _num(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("csv_path", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--ranges", nargs="*", default=[], help="instruction index ranges a:b to sum")
    args = parser.parse_args()
    with open(args.csv_path, newline="") as f:
        rows = list(csv.reader(f))
    start = next(i for i, row in enumerate(rows) if "Address" in row)
    header = rows[start]
    body = [row for row in rows[start + 1 :] if len(row) == len(header)]
    source, samples = header.index("Source"), header.index("Warp Stall Sampling (All Samples)")
    total = sum(_num(row[samples]) for row in body) or 1.0
    print(f"{len(body)} instructions, {total:.0f} stall samples")
    for span in args.ranges:
        a, b = (int(x) for x in span.split(":"))
        share = sum(_num(row[samples]) for row in body[a:b]) / total
        print(f"instructions {a}..{b}: {100 * share:.1f}% of the samples")
    ranked = sorted(range(len(body)), key=lambda k: -_num(body[k][samples]))[: args.top]
    for k in ranked:
        print(f"{k:6d} {100 * _num(body[k][samples]) / total:5.1f}%  {body[k][source].strip()[:90]}")


if __name__ == "__main__":
    main()
