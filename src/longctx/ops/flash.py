"""The CUDA FlashAttention kernels (kernels/) as PyTorch custom operators.

Operators (torch.library, so torch.compile, CUDA graphs and FSDP see opaque, well-typed ops):

- ``longctx::flash_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
  dropout_p, softmax_scale, causal, rng_state, deterministic, block_mask) -> (out, lse)``
- ``longctx::flash_bwd(dout, q, k, v, out, lse, ..., rng_state, deterministic, block_mask) -> (dq, dk, dv)``
- ``longctx::flash_dropout_mask(q, k, v, dropout_p, softmax_scale, causal, rng_state) -> keep``
  (debug: the forward's dropout keep mask, bool (B, Hq, Sq, Sk); False where a key is not visible)

They take head dims 32, 64, 96 and 128 (the compiled instances); ``flash_attention`` zero-pads
any other head dim up to 128 to the next instance (zero columns change no dot product) and slices
the output. Each op launches on the current CUDA stream, passed to the C++ side as an integer.

Dropout: the kernels read ``rng_state = {seed, offset}`` (int64, on the GPU) when they run.
``flash_attention`` fills it as every longctx backend does (common.Dropout.draw: a 64-bit seed from
torch's default CPU generator, offset 0), so ``torch.manual_seed`` gives flash and the reference
the same mask. Inside a CUDA-graph capture or torch.compile a host draw would be frozen into the
graph, so there it draws {seed, offset} on the device from torch's CUDA generator instead
(``torch.randint``), which graph replays advance: every replay drops a fresh mask.

Block-sparse: ``block_mask`` (bool (B or 1, Hq or 1, ceil(Sq / 128), ceil(Sk / 128)), or None for
dense) makes both kernels visit only the kept 128 x 128 blocks (kernels/block_mask.cuh).

The log-sum-exp output is not differentiable through this op (its gradient is treated as zero).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from longctx.ops.common import Dropout, causal_visible, check_cu_seqlens

HEAD_DIMS = (32, 64, 96, 128)
MAX_HEAD_DIM = HEAD_DIMS[-1]
_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _load_error() -> str | None:
    """Build/load the extension once; None on success, else why it is unavailable."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from longctx.ops import build

        build.load()
    except Exception as err:  # a missing toolchain or a compile error: report, don't crash imports
        return f"{type(err).__name__}: {err}"
    return None


@torch.compiler.assume_constant_result
def is_available() -> bool:
    """True when CUDA is present and the kernels are built (building them on first call)."""
    return _load_error() is None


def _require_kernels() -> None:
    error = _load_error()
    if error is not None:
        raise RuntimeError(f"longctx flash kernels unavailable: {error}")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _aligned(x: Tensor) -> Tensor:
    """x itself if the kernels' 16-byte copies can read it in place, else a contiguous copy.

    Called inside the operators (never traced), where the data pointer is real.
    """
    strides_ok = all(st % 8 == 0 or n == 1 for st, n in zip(x.stride()[:-1], x.shape[:-1]))
    return x if strides_ok and x.data_ptr() % 16 == 0 else x.contiguous()


def _lse_shape(q: Tensor, varlen: bool) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


# --------------------------------------------------------------------------------------------
# operators


@torch.library.custom_op("longctx::flash_fwd", mutates_args=(), device_types="cuda")
def flash_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    rng_state: Tensor | None,
    deterministic: bool,
    block_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """out like q (contiguous) and fp32 lse, (B, Hq, Sq) or (Hq, total_q) for varlen."""
    _require_kernels()
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out, lse, _ = torch.ops.longctx_C.fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        rng_state,
        False,
        block_mask,
        _stream(q.device),
    )
    return out, lse


@flash_fwd.register_fake
def _flash_fwd_fake(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    rng_state,
    deterministic,
    block_mask,
):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


@torch.library.custom_op("longctx::flash_bwd", mutates_args=(), device_types="cuda")
def flash_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    rng_state: Tensor | None,
    deterministic: bool,
    block_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq like q, dk and dv like k (grouped-query gradients summed over each group)."""
    _require_kernels()
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    return torch.ops.longctx_C.bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        rng_state,
        deterministic,
        block_mask,
        _stream(q.device),
    )


@flash_bwd.register_fake
def _flash_bwd_fake(
    dout,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    rng_state,
    deterministic,
    block_mask,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, rng_state, deterministic, block_mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng_state, block_mask)
    ctx.options = (max_q, max_k, dropout_p, scale, causal, deterministic)
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse, cu_q, cu_k, rng_state, block_mask = ctx.saved_tensors
    max_q, max_k, dropout_p, scale, causal, deterministic = ctx.options
    dq, dk, dv = flash_bwd(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, rng_state, deterministic,
        block_mask,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


flash_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@torch.library.custom_op("longctx::flash_dropout_mask", mutates_args=(), device_types="cuda")
def flash_dropout_mask(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float, causal: bool, rng_state: Tensor
) -> Tensor:
    """Debug: bool (B, Hq, Sq, Sk), the keep decisions the forward drew (padded batches only)."""
    _require_kernels()
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    _, _, mask = torch.ops.longctx_C.fwd(
        q,
        k,
        v,
        None,
        None,
        q.shape[1],
        k.shape[1],
        dropout_p,
        softmax_scale,
        causal,
        rng_state,
        True,
        None,
        _stream(q.device),
    )
    keep = mask.bool()
    if causal:
        keep &= causal_visible(range(q.shape[1]), range(k.shape[1]), q.shape[1], k.shape[1], q.device)
    return keep


@flash_dropout_mask.register_fake
def _flash_dropout_mask_fake(q, k, v, dropout_p, softmax_scale, causal, rng_state):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# the backend entry


def padded_head_dim(head_dim: int) -> int:
    """The compiled instance a head dim runs on: the smallest of HEAD_DIMS that holds it."""
    for d in HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM} for impl='flash', got {head_dim}")


def _check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor | None,
    cu_k: Tensor | None,
    max_q: int | None,
    max_k: int | None,
) -> None:
    """ValueError naming the argument for anything the kernels cannot take."""
    varlen = cu_q is not None
    if (cu_k is not None) != varlen:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (packed varlen) or not at all")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_cuda:
            raise ValueError(f"{name} must be a CUDA tensor for impl='flash', got device {x.device}")
        if x.dtype not in _DTYPES:
            raise ValueError(
                f"{name} dtype must be torch.float16 or torch.bfloat16 for impl='flash', got {x.dtype}"
            )
        if x.dim() != (3 if varlen else 4):
            layout = (
                "(total, heads, head_dim) with cu_seqlens" if varlen else "(batch, seqlen, heads, head_dim)"
            )
            raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
        if x.shape[-1] > 0 and x.stride(-1) != 1:
            raise ValueError(
                f"{name} must have a contiguous last dimension (stride 1), got stride {x.stride(-1)}"
            )
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"{name} must match q's dtype and device ({q.dtype}, {q.device}), got {x.dtype}, {x.device}"
            )
    if k.shape != v.shape:
        raise ValueError(f"v shape must equal k's {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head_dim must equal q's ({q.shape[-1]}), got {k.shape[-1]}")
    if not 0 < q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM} for impl='flash', got {q.shape[-1]}")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"k heads must divide q heads (MQA/GQA), got q {q.shape[-2]}, k {k.shape[-2]}")
    if not varlen:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k batch size must equal q's ({q.shape[0]}), got {k.shape[0]}")
        return
    for which, cu, max_len, x in (("q", cu_q, max_q, q), ("k", cu_k, max_k, k)):
        check_cu_seqlens(which, cu, max_len, x, cu_q.numel() if isinstance(cu_q, Tensor) else 0)


def rng_state_for(dropout_p: float, device: torch.device) -> Tensor | None:
    """The {seed, offset} int64 device tensor for one call (see the module docstring)."""
    if dropout_p == 0.0:
        return None
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)
    drop = Dropout.draw(dropout_p)
    seed = drop.seed - 2**64 if drop.seed >= 2**63 else drop.seed  # as a signed int64
    return torch.tensor([seed, drop.offset], dtype=torch.int64).to(device, non_blocking=True)


def flash_attention(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention on the CUDA kernels; same arguments and results as longctx.ops.attention.

    q (B, Sq, Hq, D) or (total_q, Hq, D); k, v (B, Sk, Hk, D) or (total_k, Hk, D); fp16/bf16 on
    CUDA, D <= 128. Returns out shaped like q, or (out, lse) with lse fp32 (B, Hq, Sq) or
    (Hq, total_q).
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    head_dim = q.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if not (softmax_scale > 0 and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be positive and finite, got {softmax_scale}")
    varlen = cu_seqlens_q is not None
    if not varlen:
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
    padded = padded_head_dim(head_dim)
    if padded != head_dim:
        q, k, v = (F.pad(x, (0, padded - head_dim)) for x in (q, k, v))
    rng_state = rng_state_for(dropout_p, q.device)
    out, lse = flash_fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        float(dropout_p),
        float(softmax_scale),
        bool(causal),
        rng_state,
        bool(deterministic),
        block_mask,
    )
    if padded != head_dim:
        out = out[..., :head_dim]
    return (out, lse) if return_lse else out
