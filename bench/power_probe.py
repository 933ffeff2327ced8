"""SM clock and board power while an attention forward runs: each implementation is called in a loop
for a few seconds, in the pattern bench/attention.py times (triton's do_bench: a 256 MB cache flush
before every call) and back to back, while `nvidia-smi` samples clocks.sm and power.draw every 20 ms.
Shows whether two kernels that run at different speeds also run at different clocks (power limits).

    python bench/power_probe.py [--seqlens 2048 16384] [--head-dims 128] [--seconds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


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
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longctx.ops import flash

    def cudnn(q, k, v, causal):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )

    impls = {"longctx": lambda q, k, v, c: flash.flash_attention(q, k, v, causal=c), "sdpa_cudnn": cudnn}
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    rows = []
    header = ("impl", "D", "causal", "seqlen", "pattern", "ms/call", "MHz", "W")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (10, 4, 6, 6, 12, 8, 6, 5))))
    for head_dim in args.head_dims:
        for causal in (False, True):
            for seqlen in args.seqlens:
                batch, heads = max(1, 16384 // seqlen), 2048 // head_dim
                q, k, v = (
                    torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in range(3)
                )
                for name, impl in impls.items():
                    with torch.no_grad():
                        call = functools.partial(impl, q, k, v, causal)
                        patterns = {"flush+call": lambda c=call: (flush.zero_(), c()), "back-to-back": call}
                        for pattern, run in patterns.items():
                            row = dict(
                                impl=name,
                                head_dim=head_dim,
                                causal=causal,
                                seqlen=seqlen,
                                pattern=pattern,
                                **sampled(run, args.seconds),
                            )
                            rows.append(row)
                            print(
                                f"{name:>10} {head_dim:>4} {causal!s:>6} {seqlen:>6} {pattern:>12} "
                                f"{row['ms_per_call']:>8.3f} {row['sm_mhz']:>6.0f} {row['watts']:>5.0f}"
                            )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "power_probe.json").write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
