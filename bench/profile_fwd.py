"""Forward (or forward + backward) calls of longctx flash and of an sdpa backend, for Nsight Compute
to compare.

    ncu --kernel-name regex:flash_fwd --launch-skip 2 --launch-count 2 --section SpeedOfLight ... \
        python bench/profile_fwd.py --head-dim 128 --seqlen 1024
    ncu --kernel-name regex:'dkdv|bprop|bwd' ... python bench/profile_fwd.py --backward --peer cudnn
FlashAttention's benchmark shapes (16k tokens, hidden 2048), bf16; each impl runs 3 times (the third
between cudaProfilerStart / Stop, for `ncu --profile-from-start off`).

    ncu --kernel-name regex:flash_fwd_sm90 ... python bench/profile_fwd.py --head-dim 64 --seqlen 16384 \
        --density 0.5      # block-sparse: bench/blocksparse.py's seeded random 128 x 128 mask per head
        [--pattern checker|stripes]   # or bench/sparse_ratio.py's regular masks of that density
    python bench/profile_fwd.py --backward --peer cudnn --kernel-times   # no ncu: torch.profiler's
        GPU time per kernel, the mean of 5 calls of each impl after the 2 warm-up ones (which kernels a
        call launches, what each costs; L2 warm, unlike the bench, which flushes it before every call)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sparse_ratio import pattern_mask  # noqa: E402  (bench/, this script's directory)

from longctx.ops import flash  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backward", action="store_true", help="forward + backward")
    parser.add_argument("--peer", choices=["flash", "cudnn"], default="flash", help="sdpa backend")
    parser.add_argument("--density", type=float, default=1.0, help="block-sparse below 1 (see --pattern)")
    parser.add_argument(
        "--pattern", choices=("random", "checker", "stripes"), default="random", help="block-sparse masks"
    )
    parser.add_argument("--kernel-times", action="store_true", help="GPU time per kernel (torch.profiler)")
    args = parser.parse_args()
    batch, heads = max(1, 16384 // args.seqlen), 2048 // args.head_dim
    q, k, v = (
        torch.randn(
            batch,
            args.seqlen,
            heads,
            args.head_dim,
            device="cuda",
            dtype=torch.bfloat16,
            requires_grad=args.backward,
        )
        for _ in range(3)
    )
    dout = torch.randn_like(q)

    def run(out: torch.Tensor) -> None:
        if args.backward:
            out.backward(dout if out.shape == dout.shape else dout.transpose(1, 2))

    backend = SDPBackend.FLASH_ATTENTION if args.peer == "flash" else SDPBackend.CUDNN_ATTENTION

    block_mask = None
    if args.density < 1.0:
        block_mask = pattern_mask(args.pattern, args.seqlen, heads, args.density)

    def ours() -> None:
        run(flash.flash_attention(q, k, v, causal=args.causal, block_mask=block_mask))

    def peer() -> None:
        with sdpa_kernel(backend):
            run(
                F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=args.causal
                )
            )

    def both() -> None:
        ours()
        peer()

    for _ in range(2):  # warm-up (JIT build, cuDNN plans, autotuning)
        both()
    torch.cuda.synchronize()
    if args.kernel_times:
        for name, fn in (("longctx", ours), (f"sdpa {args.peer}", peer)):
            print_kernel_times(name, fn, args)
        return
    # The third call of each is the one `ncu --profile-from-start off` sees; plain ncu sees all three.
    torch.cuda.profiler.start()
    both()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def print_kernel_times(name: str, fn, args: argparse.Namespace) -> None:
    """GPU time of each kernel one call of fn launches (the mean of 5 profiled calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and ev.count > 0:
            rows.append((ev.device_time_total / 5, ev.count // 5, ev.key))
    total = sum(r[0] for r in rows)
    what = "fwd+bwd" if args.backward else "fwd"
    print(
        f"== {name}: {what}, head dim {args.head_dim}, seqlen {args.seqlen}, causal {args.causal}: "
        f"{total:.0f} us per call"
    )
    for us, count, key in sorted(rows, reverse=True):
        print(f"  {us:9.1f} us {100 * us / total:5.1f}%  x{count}  {key[:110]}")


if __name__ == "__main__":
    main()
