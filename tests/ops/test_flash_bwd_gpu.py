"""The CUDA backward kernels (longctx.ops.flash, kernels/flash_bwd.cuh) against fp32 oracles.

Method (FlashAttention's): the gradients of an fp32 oracle (autograd through plain attention on
upcast inputs) are the truth; PyTorch's same-dtype attention backward is the yardstick; each of
dq, dk, dv may be off by at most 3x the yardstick's max error (plus flash_cases.ABS_FLOOR).
Dropout gradients use the mask from the independent PyTorch Philox copy in longctx.ops.common.
"""

from __future__ import annotations

import math

import pytest
import torch
from flash_cases import (
    DTYPES,
    HEAD_DIMS,
    SEQLEN_PAIRS,
    SEQLENS,
    assert_within,
    attention_fp32,
    attention_lowp,
    cu_seqlens,
    dtype_id,
    make_qkv,
    random_cu_seqlens,
)
from torch import Tensor

from longctx.ops.common import batch_head_index, causal_visible, dropout_keep_mask

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("kernel_path")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from longctx.ops import flash  # noqa: E402

if not flash.is_available():
    pytest.skip(f"flash kernels unavailable: {flash._load_error()}", allow_module_level=True)

BWD_FACTOR = 3.0


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float,
              keep: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:  # fmt: skip
    """Plain attention in q's dtype, differentiable everywhere: rows with no visible key give 0
    and a zero gradient (never NaN). q (B, Sq, Hq, D), k, v (B, Sk, Hk, D); keep (B, Hq, Sq, Sk)."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    s = (qh @ kh.transpose(-1, -2)) * scale
    if causal:
        visible = causal_visible(range(q.shape[1]), range(k.shape[1]), q.shape[1], k.shape[1], q.device)
        has_key = visible.any(-1)[:, None]
        s = torch.where(has_key, s.masked_fill(~visible, -math.inf), 0.0)
        p = torch.where(has_key, torch.softmax(s, dim=-1), 0.0)
    else:
        p = torch.softmax(s, dim=-1)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return (p @ vh).transpose(1, 2)


def grads(fn, inputs: tuple[Tensor, ...], dout: Tensor) -> list[Tensor]:
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    fn(*leaves).backward(dout.to(leaves[0].dtype))
    return [x.grad for x in leaves]


def check_grads(name: str, got: list[Tensor], q, k, v, dout, *, causal: bool, scale: float,
                keep: Tensor | None = None, dropout_p: float = 0.0) -> None:  # fmt: skip
    """got = [dq, dk, dv] from the kernel vs the fp32 oracle, with the same-dtype yardstick."""

    def fn(a, b, c):
        return attention(a, b, c, causal=causal, scale=scale, keep=keep, dropout_p=dropout_p)

    oracle = grads(fn, (q.float(), k.float(), v.float()), dout.float())
    low = grads(fn, (q, k, v), dout)
    for g_name, g, o, lo in zip(("dq", "dk", "dv"), got, oracle, low):
        assert g.shape == o.shape and g.dtype == q.dtype, f"{name} {g_name}: shape/dtype"
        assert_within(f"{name} {g_name}", g, o, lo, BWD_FACTOR)


def flash_grads(q, k, v, dout, **kwargs) -> list[Tensor]:
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    flash.flash_attention(*leaves, **kwargs).backward(dout)
    return [x.grad for x in leaves]


def run_case(batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, dtype, causal, seed=0):
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, dtype, seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    dout = (torch.randn(q.shape, generator=g, device="cuda") + 0.5).to(dtype)
    scale = 1.0 / math.sqrt(head_dim)
    got = flash_grads(q, k, v, dout, causal=causal, softmax_scale=scale)
    check_grads("grad", got, q, k, v, dout, causal=causal, scale=scale)


@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_backward_square(head_dim, dtype, causal, seqlen):
    batch = 2 if seqlen <= 1025 else 1
    run_case(batch, seqlen, seqlen, 2, 2, head_dim, dtype, causal, seed=seqlen + head_dim)


@pytest.mark.parametrize("seqlens", SEQLEN_PAIRS, ids=lambda p: f"{p[0]}x{p[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_backward_rectangular(head_dim, dtype, causal, seqlens):
    run_case(2, seqlens[0], seqlens[1], 2, 2, head_dim, dtype, causal, seed=seqlens[0])


@pytest.mark.parametrize("heads", [(8, 2), (6, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_grouped_query(head_dim, causal, heads):
    run_case(2, 300, 257, heads[0], heads[1], head_dim, torch.bfloat16, causal, seed=11)


@pytest.mark.parametrize("head_dim, batch, heads", [(64, 3, 12), (128, 2, 9)])
def test_backward_causal_block_windows(head_dim, batch, heads):
    # The Hopper backward launches causal key blocks in windows of (head, batch) pairs whose Q, dO and
    # dq_accum fit 32 MB of L2 (kernels/tile_order.cuh), longest first within a window: for 2k queries
    # 32 pairs at head dim 64, 16 at 128. 36 and 18 pairs: two windows, the second one partial.
    run_case(batch, 2048, 2048, heads, heads, head_dim, torch.bfloat16, True, seed=17)


def test_backward_padded_head_dim_and_scale():
    q, k, v = make_qkv(1, 200, 333, 2, 2, 48, torch.float16, seed=5)
    dout = torch.randn_like(q) + 0.5
    got = flash_grads(q, k, v, dout, causal=True, softmax_scale=0.37)
    check_grads("d48", got, q, k, v, dout, causal=True, scale=0.37)


def test_backward_rows_without_keys_are_zero():
    q, k, v = make_qkv(2, 512, 256, 2, 2, 64, torch.bfloat16, seed=3)
    dout = torch.randn_like(q) + 0.5
    dq, dk, dv = flash_grads(q, k, v, dout, causal=True)
    assert not any(torch.isnan(x).any() for x in (dq, dk, dv))
    assert (dq[:, :256] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
def test_backward_varlen(head_dim, causal):
    batch, heads_q, heads_k, dtype = 5, 4, 2, torch.bfloat16
    cu_q, max_q = random_cu_seqlens(batch, 300, seed=head_dim)
    cu_k, max_k = random_cu_seqlens(batch, 300, seed=head_dim + 1)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = (x[0] for x in make_qkv(1, total_q, total_k, heads_q, heads_k, head_dim, dtype, seed=head_dim))
    dout = torch.randn_like(q) + 0.5
    scale = 1.0 / math.sqrt(head_dim)
    dq, dk, dv = flash_grads(q, k, v, dout, causal=causal, softmax_scale=scale, cu_seqlens_q=cu_q,
                             cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)  # fmt: skip
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for b in range(batch):
        sq, sk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        got = [dq[None, sq], dk[None, sk], dv[None, sk]]
        qb, kb, vb, dob = q[None, sq], k[None, sk], v[None, sk], dout[None, sq]
        check_grads(f"seq{b}", got, qb, kb, vb, dob, causal=causal, scale=scale)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
def test_backward_dropout_uses_the_forward_mask(head_dim, causal):
    batch, heads, sq, sk, p, dtype = 2, 3, 203, 300, 0.17, torch.bfloat16
    seed, offset = 0x1234_5678_9ABC, 7
    q, k, v = make_qkv(batch, sq, sk, heads, heads, head_dim, dtype, seed=head_dim)
    dout = torch.randn_like(q) + 0.5
    scale = 1.0 / math.sqrt(head_dim)
    rng = torch.tensor([seed, offset], dtype=torch.int64, device="cuda")
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out, _ = flash.flash_fwd(*leaves, None, None, sq, sk, p, scale, causal, rng, False, None)
    out.backward(dout)
    bh = batch_head_index(0, batch, heads, q.device)
    keep = dropout_keep_mask(seed, offset, bh, range(sq), range(sk), p)
    got = [x.grad for x in leaves]
    check_grads("dropout", got, q, k, v, dout, causal=causal, scale=scale, keep=keep, dropout_p=p)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_deterministic_backward_is_correct_and_bit_identical(head_dim, causal):
    q, k, v = make_qkv(2, 777, 777, 4, 2, head_dim, torch.bfloat16, seed=21)
    dout = torch.randn_like(q) + 0.5
    first = flash_grads(q, k, v, dout, causal=causal, deterministic=True)
    check_grads("deterministic", first, q, k, v, dout, causal=causal, scale=1.0 / math.sqrt(head_dim))
    for _ in range(19):
        again = flash_grads(q, k, v, dout, causal=causal, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), "deterministic backward changed"


def test_deterministic_dropout_varlen():
    cu, max_len = random_cu_seqlens(3, 200, seed=4)
    total = int(cu[-1])
    q, k, v = (x[0] for x in make_qkv(1, total, total, 2, 2, 64, torch.float16, seed=4))
    dout = torch.randn_like(q) + 0.5
    kwargs = dict(causal=True, dropout_p=0.1, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                  max_seqlen_k=max_len, deterministic=True)  # fmt: skip
    torch.manual_seed(0)
    first = flash_grads(q, k, v, dout, **kwargs)
    torch.manual_seed(0)
    again = flash_grads(q, k, v, dout, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.isnan(x).any() for x in first)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_varlen_with_empty_sequences(head_dim, causal):
    """Packed sequences of length 0 on either side (tiles with nothing to visit, blocks with no query
    tile), grouped-query heads: the others match the oracle; queries without keys give 0 and lse -inf,
    keys without queries get zero gradients."""
    lens_q, lens_k = [0, 37, 0, 200, 1, 130], [5, 0, 0, 130, 64, 200]
    cu_q = cu_seqlens(lens_q)
    cu_k = cu_seqlens(lens_k)
    total_q, total_k = sum(lens_q), sum(lens_k)
    q, k, v = (x[0] for x in make_qkv(1, total_q, total_k, 4, 2, head_dim, torch.bfloat16, seed=head_dim))
    dout = torch.randn_like(q) + 0.5
    scale = 1.0 / math.sqrt(head_dim)
    kwargs = dict(causal=causal, softmax_scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))  # fmt: skip
    out, lse = flash.flash_attention(q, k, v, return_lse=True, **kwargs)
    dq, dk, dv = flash_grads(q, k, v, dout, **kwargs)
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        sq, sk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        if lq > 0 and lk == 0:
            assert (out[sq] == 0).all() and (dq[sq] == 0).all(), f"seq{b}"
            assert torch.isneginf(lse[:, sq]).all(), f"seq{b} lse"
        elif lk > 0 and lq == 0:
            assert (dk[sk] == 0).all() and (dv[sk] == 0).all(), f"seq{b}"
        elif lq > 0:
            qb, kb, vb, dob = q[None, sq], k[None, sk], v[None, sk], dout[None, sq]
            ref, _ = attention_fp32(qb, kb, vb, causal=causal, softmax_scale=scale)
            low = attention_lowp(qb, kb, vb, causal=causal, softmax_scale=scale)
            assert_within(f"seq{b} out", out[None, sq], ref, low, 2.0)
            check_grads(f"seq{b}", [dq[None, sq], dk[None, sk], dv[None, sk]], qb, kb, vb, dob, causal=causal,
                        scale=scale)  # fmt: skip


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_sequences_never_read_their_neighbours_rows(head_dim, causal, deterministic):
    """Packed sequences are independent: one sequence of NaN (q, k, v and dout) leaves every other
    sequence's output and gradients finite and equal to the oracle's. The kernels' last tiles of the
    sequence before it reach into its rows (lengths are not multiples of the 128-row tiles)."""
    lens_q, lens_k = [150, 70, 200, 130], [90, 190, 250, 60]
    poisoned = 2
    cu_q = cu_seqlens(lens_q)
    cu_k = cu_seqlens(lens_k)
    q, k, v = (x[0] for x in make_qkv(1, sum(lens_q), sum(lens_k), 4, 2, head_dim, torch.bfloat16, seed=5))
    dout = torch.randn_like(q) + 0.5
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    sq_bad = slice(starts_q[poisoned], starts_q[poisoned + 1])
    sk_bad = slice(starts_k[poisoned], starts_k[poisoned + 1])
    for x, rows in ((q, sq_bad), (k, sk_bad), (v, sk_bad), (dout, sq_bad)):
        x[rows] = math.nan
    scale = 1.0 / math.sqrt(head_dim)
    kwargs = dict(causal=causal, softmax_scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
                  deterministic=deterministic)  # fmt: skip
    with torch.no_grad():
        out = flash.flash_attention(q, k, v, **kwargs)
    dq, dk, dv = flash_grads(q, k, v, dout, **kwargs)
    for b in range(len(lens_q)):
        if b == poisoned:
            continue
        sq, sk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        qb, kb, vb, dob = q[None, sq], k[None, sk], v[None, sk], dout[None, sq]
        ref, _ = attention_fp32(qb, kb, vb, causal=causal, softmax_scale=scale)
        low = attention_lowp(qb, kb, vb, causal=causal, softmax_scale=scale)
        assert torch.isfinite(out[sq]).all(), f"seq{b} out: NaN from sequence {poisoned}"
        assert_within(f"seq{b} out", out[None, sq], ref, low, 2.0)
        got = [dq[None, sq], dk[None, sk], dv[None, sk]]
        assert all(torch.isfinite(g).all() for g in got), f"seq{b} grads: NaN from sequence {poisoned}"
        check_grads(f"seq{b}", got, qb, kb, vb, dob, causal=causal, scale=scale)
