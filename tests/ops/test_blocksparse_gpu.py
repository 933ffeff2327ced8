"""Block-sparse flash kernels (kernels/block_mask.cuh in the forward and backward) against fp32 oracles.

The oracle is dense attention with the dropped blocks at -inf (the mask expanded to elements, ANDed
with causal), on upcast inputs; PyTorch's same-dtype computation of the same function is the
yardstick (flash_cases: at most 2x its error forward, 3x backward). Rows that see no key must give
zeros, with zero gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from flash_cases import assert_within, cu_seqlens, dtype_id, make_qkv
from torch import Tensor

from longctx.ops import attention
from longctx.ops.blocksparse import block_mask_from_pattern, expand_block_mask, random_blocks
from longctx.ops.common import causal_visible

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("kernel_path")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from longctx.ops import flash  # noqa: E402

if not flash.is_available():
    pytest.skip(f"flash kernels unavailable: {flash._load_error()}", allow_module_level=True)

PATTERNS = ("local:1", "global:1", "strided:2", "butterfly", "random:0.4:7", "local:1+global:1+strided:3")
SHAPES = ((1000, 1000), (257, 257), (300, 700), (700, 300), (1025, 2047))  # (Sq, Sk)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> Tensor:
    """Dense attention in q's dtype where only `visible` (B|1, H|1, Sq, Sk) keys count; rows with
    no visible key give 0 and a zero gradient."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    s = (qh @ kh.transpose(-1, -2)) * scale
    has_key = visible.any(-1, keepdim=True)
    s = torch.where(has_key, s.masked_fill(~visible, -math.inf), 0.0)
    p = torch.where(has_key, torch.softmax(s, dim=-1), 0.0)
    return (p @ vh).transpose(1, 2)


def element_mask(block_mask: Tensor, seqlen_q: int, seqlen_k: int, causal: bool) -> Tensor:
    visible = expand_block_mask(block_mask, seqlen_q, seqlen_k)
    if causal:
        visible = visible & causal_visible(range(seqlen_q), range(seqlen_k), seqlen_q, seqlen_k, "cuda")
    return visible


def check(q, k, v, block_mask, *, causal: bool, name: str) -> None:
    """Forward (2x) and backward (3x) of the flash kernels vs the oracle, same-dtype yardstick."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    visible = element_mask(block_mask, q.shape[1], k.shape[1], causal)
    g = torch.Generator(device="cuda").manual_seed(99)
    dout = (torch.randn(q.shape, generator=g, device="cuda") + 0.5).to(q.dtype)

    def run(fn, inputs):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        out = fn(*leaves)
        out.backward(dout.to(out.dtype))
        return out.detach(), [x.grad for x in leaves]

    def kernel(a, b, c):
        return attention(a, b, c, causal=causal, block_mask=block_mask, impl="flash")

    got, got_grads = run(kernel, (q, k, v))
    oracle, oracle_grads = run(lambda a, b, c: masked_attention(a, b, c, visible, scale),
                               (q.float(), k.float(), v.float()))
    low, low_grads = run(lambda a, b, c: masked_attention(a, b, c, visible, scale), (q, k, v))
    assert_within(f"{name} out", got, oracle, low, 2.0)
    for g_name, a, o, lo in zip(("dq", "dk", "dv"), got_grads, oracle_grads, low_grads):
        assert_within(f"{name} {g_name}", a, o, lo, 3.0)
    empty_rows = ~visible.any(-1)  # (B|1, H|1, Sq)
    if empty_rows.any():
        rows = empty_rows.expand(q.shape[0], q.shape[2], -1).transpose(1, 2)  # (B, Sq, H)
        assert (got[rows] == 0).all() and (got_grads[0][rows] == 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns(pattern, causal, shape):
    sq, sk = shape
    q, k, v = make_qkv(2, sq, sk, 2, 2, 64, torch.bfloat16, seed=sq + sk)
    mask = block_mask_from_pattern(pattern, sq, sk, causal=causal, device="cuda")
    check(q, k, v, mask, causal=causal, name=f"{pattern} {sq}x{sk}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 80])
def test_head_dims_and_per_head_masks(head_dim, dtype):
    """A different random mask per (batch, head), grouped-query heads, every instance."""
    sq = sk = 777
    q, k, v = make_qkv(2, sq, sk, 4, 2, head_dim, dtype, seed=head_dim)
    nq, nk = -(-sq // 128), -(-sk // 128)
    mask = torch.stack([random_blocks(sq, sk, 0.5, seed=i, device="cuda")[0, 0] for i in range(8)])
    mask = mask.view(2, 4, nq, nk)
    check(q, k, v, mask, causal=False, name=f"D{head_dim}")
    check(q, k, v, mask, causal=True, name=f"D{head_dim} causal")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_many_tiles_per_block(head_dim):
    """240 tiles: more than multiprocessors, so that the persistent forward runs several in a row per
    block (the cases above run one), each with its own mask row staged in the tile slots."""
    sq = sk = 1800
    q, k, v = make_qkv(2, sq, sk, 8, 4, head_dim, torch.bfloat16, seed=21)
    nb = -(-sq // 128)
    mask = torch.stack([random_blocks(sq, sk, 0.5, seed=50 + i, device="cuda")[0, 0] for i in range(16)])
    mask = mask.view(2, 8, nb, nb)
    check(q, k, v, mask, causal=False, name=f"D{head_dim} many tiles")
    check(q, k, v, mask, causal=True, name=f"D{head_dim} many tiles causal")


def test_empty_and_full_masks():
    q, k, v = make_qkv(1, 513, 513, 2, 2, 64, torch.float16, seed=3)
    nb = -(-513 // 128)
    check(q, k, v, torch.ones(1, 1, nb, nb, dtype=torch.bool, device="cuda"), causal=True, name="full")
    none = torch.zeros(1, 1, nb, nb, dtype=torch.bool, device="cuda")
    none[0, 0, 1:, 0] = True  # the first query block sees nothing
    check(q, k, v, none, causal=False, name="first block empty")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_causal_rows_empty_until_a_fully_visible_tile(head_dim):
    """Sq = Sk + 1, causal, every block kept: in the block-sparse Hopper forward (two consumers and the
    speculative softmax at both head dims) the first row of some consumers sees nothing of the first
    visited tile and all of the next, which must run the exact softmax (test_flash_gpu.py has the dense
    case, speculative only at head dim 128)."""
    q, k, v = make_qkv(2, 1025, 1024, 3, 3, head_dim, torch.bfloat16, seed=19)
    ones = torch.ones(1, 1, math.ceil(1025 / 128), 1024 // 128, dtype=torch.bool, device="cuda")
    check(q, k, v, ones, causal=True, name="Sq = Sk + 1")


def test_full_mask_equals_dense_bitwise():
    """An all-ones mask visits the dense kernel's key tiles in the same order: identical results. At head
    dim 64 the dense Hopper instance has three consumers (192-row tiles) and the block-sparse one two
    (128-row tiles, speculative softmax); a row's arithmetic does not depend on that, and with these
    scores no row's reference max moves after its first tile, where both compute the same P."""
    q, k, v = make_qkv(2, 1000, 1000, 2, 2, 64, torch.bfloat16, seed=4)
    nb = -(-1000 // 128)
    ones = torch.ones(1, 1, nb, nb, dtype=torch.bool, device="cuda")
    for causal in (False, True):
        dense = attention(q, k, v, causal=causal, impl="flash")
        sparse = attention(q, k, v, causal=causal, block_mask=ones, impl="flash")
        assert torch.equal(dense, sparse)


def test_deterministic_backward():
    q, k, v = make_qkv(1, 900, 900, 2, 2, 64, torch.bfloat16, seed=5)
    mask = block_mask_from_pattern("local:1+global:1", 900, 900, causal=True, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    dout = (torch.randn(q.shape, generator=g, device="cuda") + 0.5).to(q.dtype)

    def grads():
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        attention(*leaves, causal=True, block_mask=mask, deterministic=True, impl="flash").backward(dout)
        return [x.grad for x in leaves]

    first = grads()
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))
    check(q, k, v, mask, causal=True, name="deterministic (non-deterministic path)")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dropout_matches_reference_with_same_seed(head_dim, causal):
    """Dropout composes with the mask: flash and the reference (same Philox stream) agree, forward and
    gradients (head dim 128 runs the block-sparse dropout tile of its own)."""
    q, k, v = make_qkv(1, 600, 600, 2, 2, head_dim, torch.float32, seed=6)
    mask = block_mask_from_pattern("local:1+strided:2", 600, 600, causal=causal, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(7)
    dout = torch.randn(q.shape, generator=g, device="cuda") + 0.5

    def run(inputs, impl, dropout_p):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        torch.manual_seed(11)
        out = attention(*leaves, causal=causal, dropout_p=dropout_p, block_mask=mask, impl=impl)
        out.backward(dout.to(out.dtype))
        return [out.detach(), *(x.grad for x in leaves)]

    low = [x.bfloat16() for x in (q, k, v)]
    got = run(low, "flash", 0.2)
    ref = run((q, k, v), "reference", 0.2)
    # Yardstick: bf16 error of the same function without dropout, scaled by 1 / (1 - p).
    base_low = run(low, "standard", 0.0)
    base_ref = run((q, k, v), "standard", 0.0)
    factors = (2, 3, 3, 3)  # forward, then the gradients
    for name, a, r, bl, br, factor in zip(("out", "dq", "dk", "dv"), got, ref, base_low, base_ref, factors):
        err = (a.float() - r).abs().max().item()
        base = (bl.float() - br).abs().max().item()
        assert err <= factor / 0.8 * base + 1e-5, f"dropout {name}: {err:.3g} vs yardstick {base:.3g}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_each_sequence_uses_its_own_mask(causal):
    """Packed sequences, one random mask each in its own coordinates: the oracle runs each sequence
    alone with its mask cropped to its blocks."""
    lengths = [700, 129, 1000, 1]
    total, max_len = sum(lengths), max(lengths)
    q, k, v = (x[0] for x in make_qkv(1, total, total, 4, 2, 64, torch.bfloat16, seed=21))
    cu = cu_seqlens(lengths)
    nb = -(-max_len // 128)
    g = torch.Generator(device="cuda").manual_seed(3)
    mask = torch.rand(len(lengths), 4, nb, nb, generator=g, device="cuda") < 0.5
    scale = 1.0 / math.sqrt(64)
    dout = (torch.randn(q.shape, generator=g, device="cuda") + 0.5).to(q.dtype)

    def packed(a, b, c):
        return attention(a, b, c, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                         max_seqlen_k=max_len, block_mask=mask, impl="flash")

    def per_sequence(a, b, c):
        outs = []
        for i, n in enumerate(lengths):
            s = slice(int(cu[i]), int(cu[i + 1]))
            visible = element_mask(mask[i : i + 1], n, n, causal)
            outs.append(masked_attention(a[None, s], b[None, s], c[None, s], visible, scale)[0])
        return torch.cat(outs)

    def run(fn, inputs):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        out = fn(*leaves)
        out.backward(dout.to(out.dtype))
        return out.detach(), [x.grad for x in leaves]

    got, got_grads = run(packed, (q, k, v))
    oracle, oracle_grads = run(per_sequence, (q.float(), k.float(), v.float()))
    low, low_grads = run(per_sequence, (q, k, v))
    assert_within("varlen out", got, oracle, low, 2.0)
    for name, a, o, lo in zip(("dq", "dk", "dv"), got_grads, oracle_grads, low_grads):
        assert_within(f"varlen {name}", a, o, lo, 3.0)
