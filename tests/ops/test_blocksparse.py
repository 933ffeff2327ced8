"""Block-sparse attention: masks, pattern builders, FlexAttention interop, and the two PyTorch backends.

Oracles, each independent of the code under test: a naive float64 softmax written here with the
element mask expanded by repeat_interleave checks standard_attention; standard_attention checks
reference_attention (outputs, lse, q/k/v gradients to 1e-10 in float64); pattern properties are
checked against index arithmetic written here (band |i - j| <= W, i xor j a power of two, ...).
Inputs have a nonzero mean so that wrongly zero or averaged outputs fail.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

import longctx.ops.reference as reference_module
from longctx.models.bert import Bert, BertConfig
from longctx.models.gpt2 import GPT2, GPT2Config
from longctx.models.layers import SelfAttention
from longctx.ops import attention
from longctx.ops.blocksparse import (
    block_mask_from_pattern,
    butterfly_blocks,
    from_flex_block_mask,
    global_blocks,
    local_blocks,
    parse_pattern,
    random_blocks,
    strided_blocks,
    to_flex_block_mask,
)
from longctx.ops.reference import reference_attention

TOL = 1e-10
PATTERNS = [
    "full",
    "local:1",
    "global:1",
    "strided:2",
    "butterfly",
    "random:0.4:3",
    "local:0+global:1+random:0.2:5",
]
LENGTHS = [(300, 300), (257, 300), (300, 257)]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Many tiny ops: intra-op threads only add synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _blocks(n: int) -> int:
    return (n + 127) // 128


def _inputs(seqlen_q: int, seqlen_k: int, heads_q: int = 4, heads_k: int = 2, batch: int = 2) -> list[Tensor]:
    g = torch.Generator().manual_seed(seqlen_q * 1000 + seqlen_k)
    q = torch.randn(batch, seqlen_q, heads_q, 16, generator=g, dtype=torch.float64) + 0.5
    k = torch.randn(batch, seqlen_k, heads_k, 16, generator=g, dtype=torch.float64) + 0.5
    v = torch.randn(batch, seqlen_k, heads_k, 16, generator=g, dtype=torch.float64) + 0.5
    return [x.requires_grad_() for x in (q, k, v)]


def _run(impl: str, q: Tensor, k: Tensor, v: Tensor, **kwargs: object) -> tuple[Tensor, Tensor, list[Tensor]]:
    """out, lse and the q/k/v gradients of a loss touching both out and (the finite part of) lse."""
    out, lse = attention(q, k, v, impl=impl, return_lse=True, **kwargs)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_lse = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    loss = (out * w_out).sum() + (lse.masked_fill(lse.isinf(), 0.0) * w_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), lse.detach(), list(grads)


def _assert_lse_equal(a: Tensor, b: Tensor) -> None:
    assert torch.equal(a == -math.inf, b == -math.inf)
    torch.testing.assert_close(a.masked_fill(a.isinf(), 0), b.masked_fill(b.isinf(), 0), rtol=TOL, atol=TOL)


def _naive(q: Tensor, k: Tensor, v: Tensor, block_mask: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """float64 softmax(q k^T / sqrt(D) + mask) v per head, element mask by repeat_interleave."""
    seqlen_q, seqlen_k, group = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    elem = block_mask.repeat_interleave(128, dim=2).repeat_interleave(128, dim=3)[:, :, :seqlen_q, :seqlen_k]
    if causal:
        i, j = torch.arange(seqlen_q)[:, None], torch.arange(seqlen_k)[None, :]
        elem = elem & (j <= i + seqlen_k - seqlen_q)
    qh = q.transpose(1, 2)
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    elem = elem.expand(scores.shape)
    weights = torch.where(elem, torch.exp(scores), torch.zeros_like(scores))
    total = weights.sum(-1, keepdim=True)
    out = weights @ vh / torch.where(total == 0, 1.0, total)
    return out.transpose(1, 2), torch.log(total.squeeze(-1))


# --------------------------------------------------------------------------------------------
# backends


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", LENGTHS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_matches_standard(pattern: str, seqlens: tuple[int, int], causal: bool) -> None:
    q, k, v = _inputs(*seqlens)
    mask = block_mask_from_pattern(pattern, *seqlens, causal=causal)
    ref = _run("reference", q, k, v, block_mask=mask, causal=causal)
    std = _run("standard", q, k, v, block_mask=mask, causal=causal)
    torch.testing.assert_close(ref[0], std[0], rtol=TOL, atol=TOL)
    _assert_lse_equal(ref[1], std[1])
    for a, b in zip(ref[2], std[2]):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["reference", "standard"])
def test_varlen_uses_each_sequences_mask_in_its_own_coordinates(impl: str, causal: bool) -> None:
    """Packed sequences of lengths 300, 129, 260 with a different (1, Hq, 3, 3) mask each equal the
    naive formula run on each sequence alone with its mask cropped to its blocks."""
    lengths = [300, 129, 260]
    q, k, v = (x.detach()[0] for x in _inputs(sum(lengths), sum(lengths), batch=1))
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(3, 4, 3, 3, generator=g) < 0.6
    cu = torch.tensor([0, 300, 429, 689], dtype=torch.int32)
    out = attention(q, k, v, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=300,
                    max_seqlen_k=300, block_mask=mask, impl=impl)
    for b, n in enumerate(lengths):
        span = slice(int(cu[b]), int(cu[b + 1]))
        nb = _blocks(n)
        want, _ = _naive(q[None, span], k[None, span], v[None, span], mask[b : b + 1, :, :nb, :nb], causal)
        torch.testing.assert_close(out[span], want[0], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tiles", [(128, 128), (64, 192), (32, 256)])
def test_per_batch_head_mask_and_other_tile_sizes(tiles: tuple[int, int], causal: bool) -> None:
    """A mask that differs per batch and query head (GQA), and tiles that are not the blocks."""
    q, k, v = _inputs(300, 257)
    mask = torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(2)) < 0.5
    mask[0, 0] = False  # a head that sees nothing: output 0, lse -inf
    std = _run("standard", q, k, v, block_mask=mask, causal=causal)
    options = {
        "causal": causal,
        "dropout_p": 0.0,
        "softmax_scale": 0.25,
        "cu_seqlens_q": None,
        "cu_seqlens_k": None,
        "max_seqlen_q": None,
        "max_seqlen_k": None,
        "deterministic": False,
        "return_lse": True,
        "block_mask": mask,
        "block_q": tiles[0],
        "block_k": tiles[1],
    }
    out, lse = reference_attention(q, k, v, **options)
    torch.testing.assert_close(out, std[0], rtol=TOL, atol=TOL)
    _assert_lse_equal(lse.detach(), std[1])
    assert (out[0, :, 0] == 0).all() and (lse[0, 0] == -math.inf).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", LENGTHS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_standard_matches_naive_formula(seqlens: tuple[int, int], causal: bool) -> None:
    q, k, v = (x.detach() for x in _inputs(*seqlens))
    mask = torch.rand(
        2, 1, _blocks(seqlens[0]), _blocks(seqlens[1]), generator=torch.Generator().manual_seed(3)
    )
    mask = mask < 0.6
    mask[1, 0, -1] = False  # a query block that sees nothing
    out, lse = attention(q, k, v, block_mask=mask, causal=causal, impl="standard", return_lse=True)
    want_out, want_lse = _naive(q, k, v, mask, causal)
    torch.testing.assert_close(out, want_out, rtol=TOL, atol=TOL)
    _assert_lse_equal(lse, want_lse)
    assert (out[1, 256:] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_reference_visits_only_nonzero_blocks(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    """Count the tile score matmuls: one per nonzero (and, if causal, causally visible) block in the
    forward and one in the backward, so the work follows the mask's density."""
    calls = []
    original = reference_module._tile_scores
    monkeypatch.setattr(reference_module, "_tile_scores", lambda *a: calls.append(1) or original(*a))
    q, k, v = _inputs(640, 640, heads_q=2, heads_k=2, batch=1)
    mask = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(4)) < 0.3
    visited = mask[0, 0] & (torch.ones(5, 5, dtype=torch.bool).tril() if causal else True)
    out = attention(q, k, v, block_mask=mask, causal=causal, impl="reference")
    assert len(calls) == int(visited.sum()) > 0
    out.sum().backward()
    assert len(calls) == 2 * int(visited.sum())


def test_all_ones_mask_equals_no_mask() -> None:
    q, k, v = _inputs(300, 257)
    ones = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    for causal in (False, True):
        a = attention(q, k, v, causal=causal, impl="reference", block_mask=ones)
        b = attention(q, k, v, causal=causal, impl="standard")
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


# --------------------------------------------------------------------------------------------
# FlexAttention interop


@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (2, 3, 4, 2), (2, 1, 1, 1)])
def test_flex_block_mask_round_trip_is_exact(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(5)) < 0.5
    seqlen_q, seqlen_k = shape[2] * 128 - 27, shape[3] * 128
    flex = to_flex_block_mask(mask, seqlen_q, seqlen_k)
    assert isinstance(flex, BlockMask) and tuple(flex.BLOCK_SIZE) == (128, 128)
    assert flex.seq_lengths == (seqlen_q, seqlen_k)
    assert torch.equal(flex.full_kv_num_blocks, mask.sum(-1).int())
    assert torch.equal(from_flex_block_mask(flex), mask)


def test_from_flex_block_mask_reads_partial_blocks() -> None:
    """A BlockMask built independently (partial blocks listed by index) reads back as its blocks."""
    indices = torch.tensor([[[[2, 0, 1], [1, 0, 0]]]], dtype=torch.int32)
    counts = torch.tensor([[[2, 1]]], dtype=torch.int32)
    flex = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=128, seq_lengths=(256, 384))
    want = torch.tensor([[[[True, False, True], [False, True, False]]]])
    assert torch.equal(from_flex_block_mask(flex), want)
    odd = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=64)
    with pytest.raises(ValueError, match="128 x 128 blocks"):
        from_flex_block_mask(odd)


# --------------------------------------------------------------------------------------------
# patterns


def _grid(n_q: int, n_k: int) -> tuple[Tensor, Tensor]:
    return torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]


@pytest.mark.parametrize("width", [0, 1, 3])
def test_local_band(width: int) -> None:
    mask = local_blocks(1024, 1024, width)[0, 0]
    i, j = _grid(8, 8)
    assert torch.equal(mask, (i - j).abs() <= width)
    assert mask[4].sum() == min(2 * width + 1, 8)


def test_global_rows_and_columns_are_all_ones() -> None:
    mask = global_blocks(700, 1000, 2)[0, 0]
    assert mask.shape == (6, 8)
    assert mask[:2].all() and mask[:, :2].all() and not mask[2:, 2:].any()


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_strided_is_a_dilated_band(stride: int) -> None:
    i, j = _grid(8, 8)
    assert torch.equal(strided_blocks(1024, 1024, stride)[0, 0], (i - j) % stride == 0)


def test_butterfly_is_the_flat_block_butterfly() -> None:
    """I + sum_s B_s with B_s pairing block i with i xor 2^s: log2(n) + 1 blocks per row, symmetric."""
    n = 16
    mask = butterfly_blocks(n * 128, n * 128)[0, 0]
    want = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        want[i, i] = True
        for s in range(4):
            want[i, i ^ (1 << s)] = True
    assert torch.equal(mask, want)
    assert (mask.sum(-1) == 5).all() and torch.equal(mask, mask.T)


def test_random_density_and_seed() -> None:
    a = random_blocks(1280, 2560, 0.25, seed=7)
    assert a.shape == (1, 1, 10, 20) and int(a.sum()) == 50
    assert torch.equal(a, random_blocks(1280, 2560, 0.25, seed=7))
    assert not torch.equal(a, random_blocks(1280, 2560, 0.25, seed=8))
    assert not random_blocks(1280, 2560, 0.0).any() and random_blocks(1280, 2560, 1.0).all()


def test_union_is_or() -> None:
    want = local_blocks(1000, 1000, 1) | global_blocks(1000, 1000, 1) | random_blocks(1000, 1000, 0.3, seed=2)
    assert torch.equal(block_mask_from_pattern("local:1 + global:1 + random:0.3:2", 1000, 1000), want)
    assert block_mask_from_pattern("full", 300, 257).all()


@pytest.mark.parametrize("seqlens", [(1000, 1000), (300, 700), (700, 300), (257, 129)])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_causal_combination_keeps_exactly_the_causally_visible_blocks(pattern: str, seqlens: tuple) -> None:
    """With causal, a block is on iff the pattern has it and it holds an element that the causal rule
    shows (bottom-right aligned): no block above the diagonal, none lost below it."""
    seqlen_q, seqlen_k = seqlens
    i, j = _grid(seqlen_q, seqlen_k)
    visible = torch.zeros(_blocks(seqlen_q) * 128, _blocks(seqlen_k) * 128, dtype=torch.bool)
    visible[:seqlen_q, :seqlen_k] = j <= i + seqlen_k - seqlen_q
    per_block = visible.view(_blocks(seqlen_q), 128, _blocks(seqlen_k), 128).any(dim=3).any(dim=1)
    plain = block_mask_from_pattern(pattern, seqlen_q, seqlen_k)
    assert torch.equal(
        block_mask_from_pattern(pattern, seqlen_q, seqlen_k, causal=True)[0, 0], plain[0, 0] & per_block
    )


def test_parse_pattern() -> None:
    assert parse_pattern(" local:2 +global:1+butterfly+random:0.5") == [
        ("local", (2,)),
        ("global", (1,)),
        ("butterfly", ()),
        ("random", (0.5,)),
    ]
    assert parse_pattern("random:0.1:9") == [("random", (0.1, 9))]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "non-empty string"),
        ("local", "wrong number of arguments"),
        ("butterfly:2", "wrong number of arguments"),
        ("local:x", "non-numeric"),
        ("local:-1", "out of range"),
        ("strided:0", "out of range"),
        ("random:1.5", "out of range"),
        ("dilated:2", "is not one of"),
        ("local:1++global:1", "is not one of"),
    ],
)
def test_bad_pattern_specs_raise(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_pattern(spec)


# --------------------------------------------------------------------------------------------
# validation


def _bad_calls() -> list:
    q, k, v = (x.detach() for x in _inputs(300, 257))
    good = torch.ones(2, 4, 3, 3, dtype=torch.bool)
    cu = torch.tensor([0, 300], dtype=torch.int32)
    packed = {
        "q": q[0],
        "k": k[0, :257],
        "v": v[0, :257],
        "cu_seqlens_q": cu,
        "cu_seqlens_k": torch.tensor([0, 257], dtype=torch.int32),
        "max_seqlen_q": 300,
        "max_seqlen_k": 257,
    }
    shape = r"block_mask must have shape \(batch 2 or 1, heads 4 or 1, 3, 3\)"
    cases = {
        "blocks-q": ({"block_mask": good[:, :, :2]}, shape),
        "blocks-k": ({"block_mask": torch.ones(2, 4, 3, 4, dtype=torch.bool)}, shape),
        "batch": ({"block_mask": torch.ones(3, 4, 3, 3, dtype=torch.bool)}, shape),
        "heads": ({"block_mask": torch.ones(2, 2, 3, 3, dtype=torch.bool)}, shape),
        "rank": ({"block_mask": good[0]}, shape),
        "dtype": ({"block_mask": good.float()}, "block_mask must have dtype torch.bool"),
        "type": ({"block_mask": good.tolist()}, "block_mask must be a torch.Tensor"),
        "device": ({"block_mask": good.to("meta")}, "block_mask must be on q's device"),
        "sdpa": ({"block_mask": good, "impl": "sdpa"}, "not on 'sdpa'"),
        "varlen": ({**packed, "block_mask": good}, r"block_mask must have shape \(batch 1 or 1, heads 4"),
    }
    return [pytest.param({"q": q, "k": k, "v": v, **kw}, m, id=name) for name, (kw, m) in cases.items()]


@pytest.mark.parametrize("kwargs, match", _bad_calls())
def test_bad_block_masks_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attention(**kwargs)


# --------------------------------------------------------------------------------------------
# model


def test_blocksparse_gpt2_with_a_full_pattern_equals_reference() -> None:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=101, n_layer=2, n_head=2, n_embd=32, max_positions=320, attn="reference")
    base = GPT2(cfg).double()
    sparse = GPT2(GPT2Config(**{**cfg.__dict__, "attn": "blocksparse", "attn_pattern": "full"})).double()
    sparse.load_state_dict(base.state_dict())
    idx, targets = torch.randint(0, 101, (2, 300)), torch.randint(0, 101, (2, 300))
    loss_a, loss_b = base.loss(idx, targets), sparse.loss(idx, targets)
    torch.testing.assert_close(loss_a, loss_b, rtol=TOL, atol=0)
    assert (300, torch.device("cpu")) in sparse.blocks[0].attn._block_masks


def test_blocksparse_gpt2_with_a_local_pattern_is_sparse() -> None:
    """local:0 with causal: position 299 (block 2) no longer sees positions < 256 (blocks 0, 1)."""
    torch.manual_seed(0)
    model = GPT2(
        GPT2Config(
            vocab_size=101,
            n_layer=1,
            n_head=2,
            n_embd=32,
            max_positions=320,
            attn="blocksparse",
            attn_pattern="local:0",
        )
    ).double()
    idx = torch.randint(0, 101, (1, 300))
    changed = idx.clone()
    changed[:, :256] = torch.randint(0, 101, (1, 256))
    torch.testing.assert_close(model(idx)[:, 256:], model(changed)[:, 256:], rtol=TOL, atol=TOL)


def test_blocksparse_bert_padding_free_equals_padded() -> None:
    """BERT with attn=blocksparse: the packed (padding-free) path runs each row with the pattern in
    its own coordinates, so row 0 (unpadded) equals the same row run alone without a mask, and a
    local:0 pattern stops block 2 from seeing blocks 0 and 1."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=101, n_layer=1, n_head=2, n_embd=32, intermediate_size=64, max_positions=400,
                     dropout=0.0, attn="blocksparse", attn_pattern="local:0")
    model = Bert(cfg).double().eval()
    ids = torch.randint(0, 101, (2, 300))
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, 200:] = 0
    packed = model(ids, attention_mask=mask)
    alone = model(ids[:1])  # no attention_mask: the padded path
    torch.testing.assert_close(packed[0], alone[0], rtol=TOL, atol=TOL)
    changed = ids.clone()
    changed[:, :256] = torch.randint(0, 101, (2, 256))
    after = model(changed, attention_mask=mask)
    torch.testing.assert_close(after[0, 256:], packed[0, 256:], rtol=TOL, atol=TOL)


@pytest.mark.parametrize(
    "impl, pattern, match",
    [
        ("blocksparse", None, "attn_pattern must be given"),
        ("reference", "local:1", "attn_pattern must be given"),
        ("blocksparse", "local", "wrong number of arguments"),
    ],
)
def test_self_attention_rejects_bad_pattern_config(impl: str, pattern: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SelfAttention(32, 2, impl=impl, attn_pattern=pattern)
