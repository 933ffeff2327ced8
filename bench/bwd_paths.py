"""Quick look at the backward paths on this GPU: for a few shapes, the max error of dq / dk / dv of
the default path (on Hopper: kernels/flash_bwd_sm90.cuh) and of the stage-1 kernels
(LONGCTX_SM90=0) against an fp32 oracle, next to PyTorch's same-dtype error. A diagnostic for
kernel work (which gradient is off, and where); the GPU tests are the pass/fail check.

    python bench/bwd_paths.py [--head-dims 64 128] [--seqlens 128 1000]
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from longctx.ops import flash


def oracle_grads(q, k, v, dout, causal: bool, dtype: torch.dtype) -> list[torch.Tensor]:
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
    qh, kh, vh = (x.transpose(1, 2) for x in leaves)
    s = (qh @ kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        hidden = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
        s = s.masked_fill(hidden, -math.inf)
    (torch.softmax(s, -1) @ vh).transpose(1, 2).backward(dout.to(dtype))
    return [x.grad.float() for x in leaves]


def kernel_grads(q, k, v, dout, causal: bool, stage1: bool) -> list[torch.Tensor]:
    os.environ["LONGCTX_SM90"] = "0" if stage1 else "1"
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    flash.flash_attention(*leaves, causal=causal).backward(dout)
    return [x.grad.float() for x in leaves]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--seqlens", nargs="+", type=int, default=[128, 1000])
    args = parser.parse_args()
    print(
        f"{'D':>4} {'S':>5} {'causal':>6} {'grad':>4} | {'torch bf16':>10} {'default':>9} {'stage1':>9} |"
        " worst (batch, row, head, col) of default"
    )
    for d in args.head_dims:
        for s in args.seqlens:
            for causal in (False, True):
                g = torch.Generator(device="cuda").manual_seed(s + d)
                q, k, v, dout = (
                    torch.randn(2, s, 2, d, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)
                )
                truth = oracle_grads(q, k, v, dout, causal, torch.float32)
                low = oracle_grads(q, k, v, dout, causal, torch.bfloat16)
                new = kernel_grads(q, k, v, dout, causal, stage1=False)
                old = kernel_grads(q, k, v, dout, causal, stage1=True)
                for name, t, lo, a, b in zip(("dq", "dk", "dv"), truth, low, new, old):
                    err = (a - t).abs()
                    worst = torch.nonzero(err == err.max())[0].tolist()  # (batch, row, head, col)
                    print(
                        f"{d:>4} {s:>5} {causal!s:>6} {name:>4} | {(lo - t).abs().max():10.4f} "
                        f"{err.max():9.4f} {(b - t).abs().max():9.4f} | {worst}"
                    )
    os.environ.pop("LONGCTX_SM90", None)


if __name__ == "__main__":
    main()
