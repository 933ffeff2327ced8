"""SM clock and board power while an attention forward (with --backward: backward) runs: each
implementation is called in a loop for a few seconds, in the pattern bench/attention.py times
(triton's do_bench: a 256 MB cache flush before every call) and back to back, while `nvidia-smi`
samples clocks.sm and power.draw every 20 ms. Shows whether two kernels that run at different speeds
also run at different clocks (power limits).

    python bench/power_probe.py [--seqlens 2048 16384] [--head-dims 128] [--seconds 3] [--out DIR]
    python bench/power_probe.py --backward --causal no    # the backward (autograd.grad of a kept graph)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import CAUSAL_CHOICES  # noqa: E402
from l2_probe import probe_cases, write_rows  # noqa: E402


def sampled(run, seconds: float) -> dict:
    """Calls run() for `seconds` while nvidia-smi samples the SM clock (MHz) and power (W)."""
    with tempfile.NamedTemporaryFile("r", suffix=".csv") as log:
        smi = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=clocks.sm,power.draw",
                "--format=csv,noheader,nounits",
                "-lms",
                "20",
                "-f",
                log.name,
            ]
        )
        time.sleep(0.3)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(20):
                run()
            calls += 20
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        smi.terminate()
        smi.wait()
        samples = [line.split(",") for line in log.read().splitlines() if line.strip()]
    clocks = [float(s[0]) for s in samples[10:]]  # skip the idle samples before the loop
    power = [float(s[1]) for s in samples[10:]]
    return {
        "ms_per_call": 1e3 * elapsed / calls,
        "sm_mhz": statistics.median(clocks),
        "watts": statistics.median(power),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--backward", action="store_true", help="loop the backward instead of the forward")
    parser.add_argument("--causal", choices=list(CAUSAL_CHOICES), default="both")
    args = parser.parse_args()
    causals = CAUSAL_CHOICES[args.causal]
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    rows = []
    header = ("impl", "D", "causal", "seqlen", "pattern", "ms/call", "MHz", "W")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (10, 4, 6, 6, 12, 8, 6, 5))))
    cases = probe_cases(args.head_dims, args.seqlens, causals=causals, requires_grad=args.backward)
    for head_dim, causal, seqlen, name, call in cases:
        if args.backward:  # dq, dk, dv of one forward's graph, kept: every call is the backward alone
            out, leaves = call(), call.args[:3]
            grad = torch.randn_like(out)
            call = functools.partial(torch.autograd.grad, out, leaves, grad, retain_graph=True)
        patterns = {"flush+call": lambda c=call: (flush.zero_(), c()), "back-to-back": call}
        for pattern, run in patterns.items():
            with torch.set_grad_enabled(args.backward):
                row = dict(impl=name, head_dim=head_dim, causal=causal, seqlen=seqlen, pattern=pattern)
                row["phase"] = "bwd" if args.backward else "fwd"
                row.update(sampled(run, args.seconds))
            rows.append(row)
            print(
                f"{name:>10} {head_dim:>4} {causal!s:>6} {seqlen:>6} {pattern:>12} "
                f"{row['ms_per_call']:>8.3f} {row['sm_mhz']:>6.0f} {row['watts']:>5.0f}"
            )
    write_rows(args.out, f"power_probe_{'bwd' if args.backward else 'fwd'}.json", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
