"""Shared cases and oracles for the flash kernel tests (forward here, backward in test_flash_bwd_gpu).

Tolerance, FlashAttention's own method: compare the kernel and PyTorch's same-dtype computation
(attention_lowp: fp16/bf16 matmuls and softmax) with an fp32 oracle on the same inputs
(longctx.ops.reference.standard_attention on upcast copies); the kernel's max error may be at most
`factor` times PyTorch's (2 forward, 3 backward) plus a small absolute floor.
Inputs are randn + 0.5, so a wrongly zero or averaged output cannot pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longctx.ops.common import causal_visible

HEAD_DIMS = (32, 64, 96, 128)
PADDED_HEAD_DIMS = (80,)  # runs on the next instance with zero padding
DTYPES = (torch.float16, torch.bfloat16)
SEQLENS = (97, 128, 257, 512, 1023, 1025, 2048, 4096)
SEQLEN_PAIRS = ((113, 203), (1, 147), (1023, 1024), (512, 256))  # (Sq, Sk)
ABS_FLOOR = 1e-5


def dtype_id(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def make_qkv(
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    heads_q: int,
    heads_k: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    requires_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, Sq, Hq, D), k and v (B, Sk, Hk, D) on CUDA, randn + 0.5, from a fixed seed."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def draw(s: int, h: int) -> Tensor:
        x = torch.randn(batch, s, h, head_dim, generator=g, device="cuda") + 0.5
        return x.to(dtype).requires_grad_(requires_grad)

    return draw(seqlen_q, heads_q), draw(seqlen_k, heads_k), draw(seqlen_k, heads_k)


def cu_seqlens(lengths, device: str = "cuda") -> Tensor:
    """int32 prefix sums [0, l0, l0 + l1, ...] of packed sequence lengths (a list or tensor)."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.as_tensor(lengths), 0)
    return cu.to(device)


def random_cu_seqlens(batch: int, max_len: int, seed: int, min_len: int = 1) -> tuple[Tensor, int]:
    """int32 CUDA prefix sums of `batch` random lengths in [min_len, max_len], and the longest."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    return cu_seqlens(lengths), int(lengths.max())


def attention_lowp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """PyTorch's same-dtype attention on a padded batch (no upcast): the error yardstick.

    keep: optional bool (B, Hq, Sq, Sk) dropout keep mask. Rows that see no key give 0.
    """
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    s = (qh @ kh.transpose(-1, -2)) * softmax_scale
    if causal:
        visible = causal_visible(range(q.shape[1]), range(k.shape[1]), q.shape[1], k.shape[1], q.device)
        s = s.masked_fill(~visible, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return (p @ vh).transpose(1, 2)


def attention_fp32(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The fp32 oracle on upcast copies: (out, lse) of a padded batch, with an optional keep mask."""
    if keep is None:
        from longctx.ops.reference import standard_attention

        return standard_attention(
            q.float(),
            k.float(),
            v.float(),
            causal=causal,
            dropout_p=0.0,
            softmax_scale=softmax_scale,
            cu_seqlens_q=None,
            cu_seqlens_k=None,
            max_seqlen_q=None,
            max_seqlen_k=None,
            deterministic=False,
            return_lse=True,
        )
    out = attention_lowp(
        q.float(),
        k.float(),
        v.float(),
        causal=causal,
        softmax_scale=softmax_scale,
        keep=keep,
        dropout_p=dropout_p,
    )
    return out, torch.empty(0)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_within(name: str, got: Tensor, oracle: Tensor, yardstick: Tensor, factor: float) -> None:
    """max|got - oracle| <= factor * max|yardstick - oracle| + ABS_FLOOR, and no NaN in got."""
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output"
    err, base = max_err(got, oracle), max_err(yardstick, oracle)
    assert err <= factor * base + ABS_FLOOR, f"{name}: max error {err:.3g} > {factor} x pytorch's {base:.3g}"
