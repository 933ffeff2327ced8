"""attention(): the one public entry to every attention implementation.

It only validates and dispatches. Bad input raises ValueError naming the argument and what is
allowed, before any backend runs, so no backend sees a shape, dtype or layout it must guess about.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from longctx.ops.blocksparse import check_block_mask
from longctx.ops.common import check_cu_seqlens
from longctx.ops.reference import reference_attention, sdpa_attention, standard_attention

IMPLS = ("auto", "flash", "reference", "standard", "sdpa")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_TORCH_BACKENDS: dict[str, Callable[..., Tensor | tuple[Tensor, Tensor]]] = {
    "reference": reference_attention,
    "standard": standard_attention,
    "sdpa": sdpa_attention,
}


def _flash_backend() -> Callable[..., Tensor | tuple[Tensor, Tensor]] | None:
    """longctx.ops.flash.flash_attention if that module imports and reports its kernels available."""
    try:
        from longctx.ops import flash
    except ImportError:
        return None
    return flash.flash_attention if flash.is_available() else None


def _check_tensors(q: Tensor, k: Tensor, v: Tensor, varlen: bool) -> None:
    """Types, ranks, dtypes, devices and shapes of q, k, v (padded or packed varlen layout)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    layout = (
        "(total_tokens, heads, head_dim) with cu_seqlens" if varlen else "(batch, seqlen, heads, head_dim)"
    )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != (3 if varlen else 4):
            raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype must be one of {[str(d) for d in _DTYPES]}, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} dtype must equal q's ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {x.device}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k batch size must equal q's ({q.shape[0]}), got {k.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head dim must equal q's ({q.shape[-1]}), got {k.shape[-1]}")
    if v.shape != k.shape:
        raise ValueError(f"v shape must equal k's {tuple(k.shape)}, got {tuple(v.shape)}")
    num_heads_q, num_heads_k = q.shape[-2], k.shape[-2]
    if num_heads_k == 0 or num_heads_q % num_heads_k != 0:
        raise ValueError(f"k heads must divide q heads (MQA/GQA), got q {num_heads_q}, k {num_heads_k}")


def _check_block_mask_call(
    q: Tensor, block_mask: object, batch: int, seqlens: tuple[int, int], impl: str
) -> None:
    """block_mask's layout for `batch` sequences of at most seqlens = (Sq, Sk), and that impl takes it."""
    if impl == "sdpa":
        raise ValueError("block_mask (block-sparse attention) runs on impl='flash', 'reference', "
                         "'standard' or 'auto', not on 'sdpa'")
    check_block_mask(block_mask, batch=batch, heads=q.shape[-2], seqlen_q=seqlens[0], seqlen_k=seqlens[1],
                     device=q.device)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    block_mask: Tensor | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact scaled dot-product attention, softmax(q k^T * softmax_scale + mask) v.

    Args:
        q: (B, Sq, Hq, D), or packed varlen (total_q, Hq, D) with cu_seqlens_q.
        k, v: (B, Sk, Hk, D), or (total_k, Hk, D); Hq % Hk == 0 (multi-/grouped-query attention:
            query head h reads key/value head h // (Hq // Hk)). fp16, bf16, fp32 or fp64.
        causal: query i sees key j iff j <= i + Sk - Sq (bottom-right aligned, per sequence).
            Rows that see no key give output 0 and lse -inf.
        dropout_p: probability of dropping an attention weight, in [0, 1); kept weights are
            scaled by 1 / (1 - dropout_p). The mask is the Philox stream of kernels/philox.cuh,
            seeded from torch's default CPU generator, so torch.manual_seed reproduces it.
        softmax_scale: defaults to 1 / sqrt(D).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) prefix sums of the packed sequence lengths.
        max_seqlen_q, max_seqlen_k: the longest sequence of each (required with cu_seqlens).
        block_mask: block-sparse attention, bool (B or 1, Hq or 1, ceil(Sq / 128), ceil(Sk / 128)):
            query block i may attend to key block j iff [b, h, i, j] (blocks of 128 x 128; see
            longctx.ops.blocksparse for builders); ANDed with causal. Varlen: one mask per sequence
            (or one for all), (B|1, Hq|1, ceil(max_seqlen_q / 128), ceil(max_seqlen_k / 128)), in
            each sequence's own coordinates. Any impl but "sdpa"; flash and reference skip the
            dropped blocks. Rows that see no key give output 0 and lse -inf.
        deterministic: ask the flash backward for a deterministic reduction order.
        return_lse: also return the softmax log-sum-exp (natural log, fp32, or fp64 for fp64
            inputs), (B, Hq, Sq) or (Hq, total_q) for varlen.
        impl: "flash" (CUDA kernels), "reference" (tiled PyTorch FlashAttention, O(N) memory),
            "standard" (materialises the N x N scores), "sdpa" (torch's, padded only, no lse), or
            "auto": flash for CUDA fp16/bf16 when its kernels are available, else reference.

    Returns:
        out shaped like q, or (out, lse) when return_lse.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (packed varlen) or not at all")
    varlen = cu_seqlens_q is not None
    _check_tensors(q, k, v, varlen)
    if varlen:
        batch_plus_one = cu_seqlens_q.numel() if isinstance(cu_seqlens_q, Tensor) else 0
        check_cu_seqlens("q", cu_seqlens_q, max_seqlen_q, q, batch_plus_one)
        check_cu_seqlens("k", cu_seqlens_k, max_seqlen_k, k, batch_plus_one)
    elif max_seqlen_q is not None or max_seqlen_k is not None:
        raise ValueError("max_seqlen_q / max_seqlen_k are only allowed with cu_seqlens_q / cu_seqlens_k")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if block_mask is not None:
        batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
        seqlens = (max_seqlen_q, max_seqlen_k) if varlen else (q.shape[1], k.shape[1])
        _check_block_mask_call(q, block_mask, batch, seqlens, impl)
    if impl == "sdpa" and (varlen or return_lse):
        raise ValueError("impl='sdpa' takes padded batches without return_lse; use 'reference' or 'standard'")

    kwargs = {
        "causal": causal,
        "dropout_p": float(dropout_p),
        "softmax_scale": float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1]),
        "cu_seqlens_q": cu_seqlens_q,
        "cu_seqlens_k": cu_seqlens_k,
        "max_seqlen_q": max_seqlen_q,
        "max_seqlen_k": max_seqlen_k,
        "deterministic": deterministic,
        "return_lse": return_lse,
    }
    if block_mask is not None:
        kwargs["block_mask"] = block_mask
    if impl == "auto":
        use_flash = q.is_cuda and q.dtype in _FLASH_DTYPES and _flash_backend() is not None
        impl = "flash" if use_flash else "reference"
    if impl == "flash":
        flash = _flash_backend()
        if flash is None:
            raise ValueError("impl='flash' needs a CUDA build of longctx.ops.flash; use impl='reference'")
        return flash(q, k, v, **kwargs)
    return _TORCH_BACKENDS[impl](q, k, v, **kwargs)
