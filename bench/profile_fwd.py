"""One forward call of longctx flash and of sdpa's FLASH backend, for Nsight Compute to compare.

    ncu --kernel-name regex:flash_fwd --launch-skip 2 --launch-count 2 --section SpeedOfLight ... \
        python bench/profile_fwd.py --head-dim 128 --seqlen 1024
FlashAttention's benchmark shapes (16k tokens, hidden 2048), bf16; each impl runs 3 times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longctx.ops import flash  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    batch, heads = max(1, 16384 // args.seqlen), 2048 // args.head_dim
    q, k, v = (
        torch.randn(batch, args.seqlen, heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
        for _ in range(3)
    )
    for _ in range(3):
        flash.flash_attention(q, k, v, causal=args.causal)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for _ in range(3):
            F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=args.causal
            )
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
