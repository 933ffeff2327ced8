"""The CUDA forward kernel (longctx.ops.flash) against fp32 oracles, on a GPU.

Oracles are independent of the kernels: the fp32 standard attention of longctx.ops.reference on
upcast inputs, PyTorch's same-dtype attention as the error yardstick (flash_cases), and the
PyTorch Philox copy in longctx.ops.common for dropout masks.
"""

from __future__ import annotations

import math

import pytest
import torch
from flash_cases import (
    DTYPES,
    HEAD_DIMS,
    PADDED_HEAD_DIMS,
    SEQLEN_PAIRS,
    SEQLENS,
    assert_within,
    attention_fp32,
    attention_lowp,
    dtype_id,
    make_qkv,
    random_cu_seqlens,
)

from longctx.ops.common import batch_head_index, dropout_keep_mask

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("kernel_path")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from longctx.ops import flash  # noqa: E402

if not flash.is_available():
    pytest.skip(f"flash kernels unavailable: {flash._load_error()}", allow_module_level=True)

FWD_FACTOR = 2.0


def check_forward(batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, dtype, causal, seed=0, scale=None):
    q, k, v = make_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, dtype, seed)
    compare_forward(q, k, v, causal, scale)


def compare_forward(q, k, v, causal, scale=None):
    batch, seqlen_q, heads_q, head_dim = q.shape
    dtype = q.dtype
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    out, lse = flash.flash_attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    ref, ref_lse = attention_fp32(q, k, v, causal=causal, softmax_scale=scale)
    low = attention_lowp(q, k, v, causal=causal, softmax_scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_within("out", out, ref, low, FWD_FACTOR)
    assert lse.shape == (batch, heads_q, seqlen_q) and lse.dtype == torch.float32
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf exactly where no key is visible"
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS + PADDED_HEAD_DIMS)
def test_forward_square(head_dim, dtype, causal, seqlen):
    batch = 2 if seqlen <= 1025 else 1
    check_forward(batch, seqlen, seqlen, 3, 3, head_dim, dtype, causal, seed=seqlen + head_dim)


@pytest.mark.parametrize("seqlens", SEQLEN_PAIRS, ids=lambda p: f"{p[0]}x{p[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS + PADDED_HEAD_DIMS)
def test_forward_rectangular(head_dim, dtype, causal, seqlens):
    check_forward(2, seqlens[0], seqlens[1], 2, 2, head_dim, dtype, causal, seed=seqlens[0])


@pytest.mark.parametrize("heads", [(8, 2), (6, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_grouped_query(head_dim, causal, heads):
    check_forward(2, 300, 257, heads[0], heads[1], head_dim, torch.bfloat16, causal, seed=7)


def test_softmax_scale_and_odd_head_dims():
    check_forward(1, 200, 333, 2, 2, 48, torch.float16, True, scale=0.37)
    check_forward(1, 129, 65, 2, 1, 17, torch.bfloat16, False, scale=2.0)


def test_fully_masked_rows_are_zero():
    q, k, v = make_qkv(2, 512, 256, 2, 2, 64, torch.bfloat16, seed=3)
    out, lse = flash.flash_attention(q, k, v, causal=True, return_lse=True)
    assert not torch.isnan(out).any()
    assert (out[:, :256] == 0).all() and torch.isneginf(lse[:, :, :256]).all()
    assert torch.isfinite(lse[:, :, 256:]).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_one_by_one_problem(head_dim, causal):
    check_forward(1, 1, 1, 1, 1, head_dim, torch.bfloat16, causal, seed=5)


# The Hopper forward runs a persistent grid (a block per multiprocessor) that hands a block several
# tiles in a row only when there are more tiles than multiprocessors; the cases above have fewer (one tile
# per block). These have 256-1024 tiles: tiles with rows but no visible keys (Sq > Sk, causal), tiles
# whose last consumer's rows lie past the end, both Q buffers, the epilogue of one tile under the next.
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "seqlens, heads", [((1500, 1500), (8, 8)), ((2048, 1000), (16, 4))], ids=["square", "sq_gt_sk_gqa"]
)
def test_many_tiles_per_block(head_dim, causal, seqlens, heads):
    check_forward(4, seqlens[0], seqlens[1], heads[0], heads[1], head_dim, torch.bfloat16, causal, seed=11)


@pytest.mark.parametrize("head_dim, batch, heads", [(64, 5, 14), (128, 3, 12)])
def test_causal_tile_windows(head_dim, batch, heads):
    # The Hopper forward takes causal tiles in windows of (head, batch) pairs whose K / V fit 32 MB of L2
    # (kernels/tile_order.cuh), longest first within a window: for 2k keys 64 pairs at head dim 64, 32 at
    # 128. 70 and 36 pairs: two windows, the second one partial.
    check_forward(batch, 2048, 2048, heads, heads, head_dim, torch.bfloat16, True, seed=13)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_scores_that_jump_between_key_tiles(head_dim, dtype, causal):
    # Each 128-key tile of each head gets its own key scale (log-uniform over 0.25-16), so tile maxima
    # differ by anything from nothing to ~60 log2 units, in random order along the kernels' walk: the
    # lazy rescale's reference moves on some tiles and stays (P up to 2^8) on others.
    batch, seqlen, heads = 2, 1400, 3
    q, k, v = make_qkv(batch, seqlen, seqlen, heads, heads, head_dim, dtype, seed=7)
    gen = torch.Generator().manual_seed(11)
    n_tiles = math.ceil(seqlen / 128)
    log_scale = torch.empty(batch, n_tiles, heads).uniform_(math.log(0.25), math.log(16.0), generator=gen)
    tile_scale = torch.exp(log_scale)
    key_scale = tile_scale.repeat_interleave(128, dim=1)[:, :seqlen, :, None]
    k = (k.float() * key_scale.to(k.device)).to(dtype)
    compare_forward(q, k, v, causal)


@pytest.mark.parametrize("seqlens", [(1025, 1024), (1089, 1024)], ids=lambda p: f"{p[0]}x{p[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_causal_rows_empty_until_a_fully_visible_tile(head_dim, dtype, seqlens):
    # Causal with Sq - Sk = 1 or 65: in some 64-row consumer the first row sees exactly the keys up to a
    # tile boundary, so it sees nothing of the diagonal tile the walk starts with and all of the next
    # one. The Hopper forward's speculative softmax needs a finite reference per row; that tile must run
    # the exact one (dense: head dim 128; at 64 the dense instance is exact throughout, and
    # test_blocksparse_gpu.py's test of the same name covers the speculative one).
    q, k, v = make_qkv(2, seqlens[0], seqlens[1], 3, 3, head_dim, dtype, seed=17)
    compare_forward(q, k, v, causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_forward_is_bitwise_repeatable(head_dim, causal):
    # Many more tiles than multiprocessors: which block runs which tile changes from call to call (the
    # blocks claim tiles from a counter); the output must not depend on it.
    q, k, v = make_qkv(4, 1500, 1500, 8, 8, head_dim, torch.bfloat16, seed=11)
    first = flash.flash_attention(q, k, v, causal=causal, return_lse=True)
    for _ in range(3):
        again = flash.flash_attention(q, k, v, causal=causal, return_lse=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), "forward output changed between calls"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_varlen(head_dim, causal):
    check_varlen(5, 300, 4, 2, head_dim, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_many_tiles_per_block(head_dim, causal):
    # 40 sequences x 8 heads: several tiles per persistent block, padding tiles of the shorter
    # sequences between them.
    check_varlen(40, 400, 8, 4, head_dim, causal)


def check_varlen(batch, max_len, heads_q, heads_k, head_dim, causal):
    dtype = torch.float16
    cu_q, max_q = random_cu_seqlens(batch, max_len, seed=head_dim)
    cu_k, max_k = random_cu_seqlens(batch, max_len, seed=head_dim + 1)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = make_qkv(1, total_q, total_k, heads_q, heads_k, head_dim, dtype, seed=head_dim)
    q, k, v = q[0], k[0], v[0]
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = flash.flash_attention(
        q,
        k,
        v,
        causal=causal,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        return_lse=True,
    )
    assert out.shape == q.shape and lse.shape == (heads_q, total_q)
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for b in range(batch):
        sq, sk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        qb, kb, vb = q[None, sq], k[None, sk], v[None, sk]
        ref, ref_lse = attention_fp32(qb, kb, vb, causal=causal, softmax_scale=scale)
        low = attention_lowp(qb, kb, vb, causal=causal, softmax_scale=scale)
        assert_within(f"out[{b}]", out[None, sq], ref, low, FWD_FACTOR)
        got_lse = lse[None, :, sq]
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(got_lse), finite)
        torch.testing.assert_close(got_lse[finite], ref_lse[finite], atol=2e-3, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# dropout


def _rng(seed: int, offset: int) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64, device="cuda")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dropout_mask_matches_philox_copy(head_dim, causal):
    p, seed, offset = 0.17, 0x1234_5678_9ABC_DEF, 5
    q, k, v = make_qkv(2, 113, 203, 3, 3, head_dim, torch.bfloat16, seed=11)
    keep = flash.flash_dropout_mask(q, k, v, p, 0.125, causal, _rng(seed, offset))
    bh = batch_head_index(0, 2, 3, q.device)
    expected = dropout_keep_mask(seed, offset, bh, range(113), range(203), p)
    if causal:
        from longctx.ops.common import causal_visible

        expected &= causal_visible(range(113), range(203), 113, 203, q.device)
    assert keep.shape == expected.shape
    assert torch.equal(keep, expected)


def test_dropout_keep_fraction():
    p = 0.3
    q, k, v = make_qkv(2, 512, 512, 4, 4, 64, torch.float16, seed=12)
    keep = flash.flash_dropout_mask(q, k, v, p, 0.125, False, _rng(99, 0))
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
def test_dropout_output_uses_that_mask(head_dim, causal):
    p, seed, offset = 0.25, 2024, 3
    q, k, v = make_qkv(2, 257, 300, 2, 2, head_dim, torch.bfloat16, seed=13)
    scale = 1.0 / math.sqrt(head_dim)
    rng = _rng(seed, offset)
    out, lse = torch.ops.longctx.flash_fwd(q, k, v, None, None, 257, 300, p, scale, causal, rng, False, None)
    keep = flash.flash_dropout_mask(q, k, v, p, scale, causal, rng)
    ref, _ = attention_fp32(q, k, v, causal=causal, softmax_scale=scale, keep=keep, dropout_p=p)
    low = attention_lowp(q, k, v, causal=causal, softmax_scale=scale, keep=keep, dropout_p=p)
    assert_within("out", out, ref, low, FWD_FACTOR)
    _, ref_lse = attention_fp32(q, k, v, causal=causal, softmax_scale=scale)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=1e-4)  # lse ignores dropout


def test_dropout_same_mask_as_reference_for_a_manual_seed():
    from longctx.ops.reference import reference_attention

    q, k, v = make_qkv(1, 200, 200, 2, 2, 64, torch.float16, seed=14)
    torch.manual_seed(5)
    out = flash.flash_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(5)
    ref = reference_attention(
        q.float(),
        k.float(),
        v.float(),
        causal=False,
        dropout_p=0.2,
        softmax_scale=0.125,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        max_seqlen_q=None,
        max_seqlen_k=None,
        deterministic=False,
        return_lse=False,
    )
    assert (out.float() - ref).abs().max().item() < 2e-2


# --------------------------------------------------------------------------------------------
# operator machinery


def test_opcheck():
    q, k, v = make_qkv(2, 65, 80, 4, 2, 64, torch.float16, seed=15)
    torch.library.opcheck(
        torch.ops.longctx.flash_fwd.default,
        (q, k, v, None, None, 65, 80, 0.0, 0.125, True, None, False, None),
    )
    cu, max_len = random_cu_seqlens(3, 50, seed=1)
    total = int(cu[-1])
    qv, kv, vv = (x[0] for x in make_qkv(1, total, total, 2, 2, 32, torch.bfloat16, seed=16))
    torch.library.opcheck(
        torch.ops.longctx.flash_fwd.default,
        (qv, kv, vv, cu, cu, max_len, max_len, 0.0, 0.2, False, None, False, None),
    )
    torch.library.opcheck(
        torch.ops.longctx.flash_dropout_mask.default, (q, k, v, 0.1, 0.125, False, _rng(1, 2))
    )


def test_compile_fullgraph_no_graph_break():
    q, k, v = make_qkv(2, 256, 256, 4, 4, 64, torch.bfloat16, seed=17)

    def f(q, k, v):
        return flash.flash_attention(q * 2, k, v, causal=True) + 1

    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0, [str(b) for b in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_cuda_graph_replay():
    q, k, v = make_qkv(1, 256, 256, 2, 2, 64, torch.float16, seed=18)
    static_out = flash.flash_attention(q, k, v)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = flash.flash_attention(q, k, v)
    q.copy_(q * 0.5)
    graph.replay()
    torch.testing.assert_close(static_out, flash.flash_attention(q, k, v), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_value_error_naming_the_argument():
    q, k, v = make_qkv(1, 64, 64, 2, 2, 64, torch.float16, seed=19)
    with pytest.raises(ValueError, match="q dtype"):
        flash.flash_attention(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="k must match"):
        flash.flash_attention(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        flash.flash_attention(q.cpu(), k, v)
    with pytest.raises(ValueError, match="v shape"):
        flash.flash_attention(q, k, v[:, :32])
    with pytest.raises(ValueError, match="q must be"):
        flash.flash_attention(q[0], k, v)
    nc = torch.randn(1, 64, 2, 128, device="cuda", dtype=torch.float16)[..., ::2]
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        flash.flash_attention(nc, k, v)
    big = torch.randn(1, 64, 2, 160, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head_dim"):
        flash.flash_attention(big, big, big)
    with pytest.raises(ValueError, match="k heads"):
        flash.flash_attention(torch.randn(1, 64, 3, 64, device="cuda", dtype=torch.float16), k, v)
    cu = torch.tensor([0, 30, 60], dtype=torch.int32, device="cuda")  # ends at 60, not 64
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        flash.flash_attention(
            q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=30, max_seqlen_k=30
        )
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        flash.flash_attention(
            q[0], k[0], v[0], cu_seqlens_q=cu.long(), cu_seqlens_k=cu, max_seqlen_q=30, max_seqlen_k=30
        )
    with pytest.raises(ValueError, match="dropout_p"):
        flash.flash_attention(q, k, v, dropout_p=1.0)


_CPP_CHECK = """
import sys, torch
from longctx.ops import flash
assert flash.is_available()
big = torch.randn(1, 64, 2, 160, device="cuda", dtype=torch.float16)
try:
    torch.ops.longctx_C.fwd(big, big, big, None, None, 64, 64, 0.0, 0.1, False, None, False, None, 0)
except ValueError as err:
    print("ValueError:", err)
    sys.exit(0)
sys.exit(5)
"""


@pytest.mark.xfail(
    reason="on the GPU image the extension segfaults when its C++ check throws (a minimal TORCH_CHECK_VALUE "
    "extension on the same image raises fine, and this binding raises fine with CPU torch); under "
    "investigation. flash_attention validates in Python first, so users get the ValueError.",
    strict=False,
)
def test_cpp_boundary_raises_value_error():
    """The C++ side checks its inputs too (run apart: a crash must fail this test, not the session)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CPP_CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "head_dim" in done.stdout, (
        done.returncode,
        done.stdout,
        done.stderr[-3000:],
    )


def test_a_side_stream_gives_the_default_streams_results():
    qkv = make_qkv(2, 700, 700, 4, 4, 128, torch.bfloat16, seed=21)
    grad = torch.randn_like(qkv[0])

    def run():  # fresh leaves on the stream that runs: their autograd nodes belong to it
        leaves = [x.detach().requires_grad_() for x in qkv]
        out = flash.flash_attention(*leaves, causal=True, deterministic=True)  # dQ in a fixed order
        return (out, *torch.autograd.grad(out, leaves, grad))

    expected = run()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run()
    torch.cuda.current_stream().wait_stream(side)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_a_stream_other_than_the_current_one_is_refused():
    q, k, v = make_qkv(1, 64, 64, 2, 2, 64, torch.float16, seed=22)
    other = torch.cuda.Stream()
    with pytest.raises(ValueError, match="stream: must be the current CUDA stream"):
        torch.ops.longctx_C.fwd(
            q, k, v, None, None, 64, 64, 0.0, 0.125, False, None, False, None, other.cuda_stream
        )
