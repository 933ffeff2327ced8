"""Where a training step's GPU time goes: torch.profiler over a few steps of bench/training.py's
step (same model, batch and precision), the kernels sorted by total CUDA time, for each impl asked.

    python bench/profile_train.py --model gpt2 --seqlen 8192 --impls longctx hf-sdpa [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training import IMPLS, MODELS, training_step  # noqa: E402


def profile_impl(impl: str, model: str, seqlen: int, tokens: int, steps: int, rows: int) -> str:
    step, batch = training_step(impl, model, seqlen, tokens, torch.device("cuda"))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total_ms = sum(e.self_device_time_total for e in events) / 1000 / steps
    table = events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)
    return f"== {impl} {model} seqlen {seqlen} batch {batch}: {total_ms:.1f} ms of GPU time per step\n{table}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=list(MODELS), default="gpt2")
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=["longctx", "hf-sdpa"])
    parser.add_argument("--out", type=Path, help="also write the tables to OUT/profile_<model>_<seqlen>.txt")
    args = parser.parse_args()
    text = "\n".join(
        profile_impl(impl, args.model, args.seqlen, args.tokens, args.steps, args.rows) for impl in args.impls
    )
    print(text)
    torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile_{args.model}_{args.seqlen}.txt").write_text(text)


if __name__ == "__main__":
    main()
