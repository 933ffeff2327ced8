"""The PyTorch attention backends and the attention() entry.

Oracles, each independent of the code under test: a naive per-head softmax(q k^T * scale + mask) v
written here in float64 checks standard_attention; standard_attention (the N x N formula) checks
reference_attention (the tiled FlashAttention algorithm), outputs and q/k/v gradients to 1e-10
relative in float64; torch.autograd.gradcheck checks reference's hand-written backward.
Inputs have a nonzero mean so that wrongly zero or averaged outputs fail.
"""

from __future__ import annotations

import itertools
import math
import sys
import types
import weakref
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import longctx.ops
from longctx.ops import attention
from longctx.ops.common import Dropout, dropout_keep_mask
from longctx.ops.reference import reference_attention, standard_attention

attention_module = sys.modules["longctx.ops.attention"]
TOL = 1e-10
SMALL_BLOCKS = {"block_q": 32, "block_k": 16}  # many tiles, with remainders, on short sequences


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These tests run many tiny ops, where intra-op threads only add synchronisation (and stall
    badly on a busy machine); run them on one thread and restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# helpers


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()


def padded_qkv(b: int, sq: int, sk: int, hq: int, hk: int, d: int, seed: int = 0) -> tuple[Tensor, ...]:
    q = randn(b, sq, hq, d, seed=seed)
    return q, randn(b, sk, hk, d, seed=seed + 1), randn(b, sk, hk, d, seed=seed + 2)


def varlen_qkv(lengths_q: list[int], lengths_k: list[int], hq: int, hk: int, d: int) -> tuple:
    """q, k, v packed, and the varlen kwargs."""
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q, k, v = randn(total_q, hq, d, seed=10), randn(total_k, hk, d, seed=11), randn(total_k, hk, d, seed=12)
    kwargs = {
        "cu_seqlens_q": torch.tensor([0, *itertools.accumulate(lengths_q)], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, *itertools.accumulate(lengths_k)], dtype=torch.int32),
        "max_seqlen_q": max(lengths_q),
        "max_seqlen_k": max(lengths_k),
    }
    return q, k, v, kwargs


def backend_kwargs(**overrides: object) -> dict:
    """The keyword arguments attention() passes to every backend."""
    kwargs = {
        "causal": False,
        "dropout_p": 0.0,
        "softmax_scale": None,
        "cu_seqlens_q": None,
        "cu_seqlens_k": None,
        "max_seqlen_q": None,
        "max_seqlen_k": None,
        "deterministic": False,
        "return_lse": False,
    }
    kwargs.update(overrides)
    return kwargs


def out_and_grads(out: Tensor, inputs: tuple[Tensor, ...], seed: int = 99) -> tuple[Tensor, ...]:
    """out and the gradients of <out, dout> for a fixed random dout (nonzero mean)."""
    dout = randn(*out.shape, seed=seed).detach().to(out.dtype)
    return (out, *torch.autograd.grad(out, inputs, dout))


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float = TOL) -> None:
    """max |actual - expected| <= tol * max(max |expected|, 1), both finite, same shape and dtype.

    The floor of 1 (the inputs' scale) covers quantities that are exactly zero in exact arithmetic,
    e.g. dq and dk when each query sees a single key.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"relative error {err / scale:.3e} > {tol}"


def assert_all_close(actual: tuple[Tensor, ...], expected: tuple[Tensor, ...], tol: float = TOL) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_rel_close(a, e, tol)


def visible_mask(sq: int, sk: int, causal: bool) -> Tensor:
    i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    return j <= i + sk - sq if causal else torch.ones(sq, sk, dtype=torch.bool)


def naive_scores(q: Tensor, k: Tensor, *, causal: bool, scale: float) -> Tensor:
    """(B, Hq, Sq, Sk) masked scores, head h reading kv head h // (Hq // Hk), one head at a time."""
    group = q.shape[2] // k.shape[2]
    mask = visible_mask(q.shape[1], k.shape[1], causal)
    per_head = [
        torch.stack([(q[b, :, h] @ k[b, :, h // group].T) * scale for h in range(q.shape[2])])
        for b in range(q.shape[0])
    ]
    return torch.stack(per_head).masked_fill(~mask, -math.inf)


def naive_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, keep: Tensor | None = None, p: float = 0.0
) -> Tensor:
    """softmax(q k^T * scale + mask) v per (batch, head) in float64; keep (B, Hq, Sq, Sk) for dropout.

    Rows with no visible key (softmax of all -inf is NaN) are set to zero.
    """
    group = q.shape[2] // k.shape[2]
    probs = torch.softmax(naive_scores(q, k, causal=causal, scale=scale), dim=-1)
    probs = torch.where(torch.isnan(probs), 0.0, probs)
    if keep is not None:
        probs = probs * keep / (1 - p)
    heads = [
        torch.stack([probs[b, h] @ v[b, :, h // group] for h in range(q.shape[2])], dim=1)
        for b in range(q.shape[0])
    ]
    return torch.stack(heads)


# (batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim)
SHAPES = [
    pytest.param((2, 97, 97, 2, 2, 32), id="odd-square"),
    pytest.param((1, 113, 203, 2, 2, 16), id="sq<sk"),
    pytest.param((1, 203, 113, 2, 2, 16), id="sq>sk"),
    pytest.param((1, 1, 147, 2, 2, 16), id="one-query"),
    pytest.param((1, 147, 1, 2, 2, 16), id="one-key"),
    pytest.param((2, 65, 77, 6, 2, 16), id="gqa"),
    pytest.param((1, 70, 70, 4, 1, 16), id="mqa"),
    pytest.param((1, 300, 300, 1, 1, 8), id="three-tiles"),
]


def has_rows_without_keys(shape: tuple[int, ...], causal: bool) -> bool:
    return causal and shape[1] > shape[2]


# --------------------------------------------------------------------------------------------
# standard attention against the naive formula


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_standard_matches_naive_formula(shape: tuple[int, ...], causal: bool) -> None:
    q, k, v = padded_qkv(*shape)
    scale = 1 / math.sqrt(shape[-1])
    out = standard_attention(q, k, v, **backend_kwargs(causal=causal, softmax_scale=scale))
    expected = naive_attention(q, k, v, causal=causal, scale=scale)
    if has_rows_without_keys(shape, causal):  # the naive softmax's backward is NaN there
        assert_rel_close(out, expected)
    else:
        assert_all_close(out_and_grads(out, (q, k, v)), out_and_grads(expected, (q, k, v)))


def test_standard_softmax_scale_and_lse_match_naive() -> None:
    q, k, v = padded_qkv(2, 40, 57, 4, 2, 16)
    out, lse = standard_attention(q, k, v, **backend_kwargs(causal=True, softmax_scale=0.3, return_lse=True))
    assert_rel_close(out, naive_attention(q, k, v, causal=True, scale=0.3))
    assert_rel_close(lse, torch.logsumexp(naive_scores(q, k, causal=True, scale=0.3), dim=-1))


# --------------------------------------------------------------------------------------------
# reference (tiled) against standard


@pytest.mark.parametrize("blocks", [{}, SMALL_BLOCKS], ids=["128x128", "32x16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_standard(shape: tuple[int, ...], causal: bool, blocks: dict) -> None:
    q, k, v = padded_qkv(*shape)
    kwargs = backend_kwargs(causal=causal, softmax_scale=1 / math.sqrt(shape[-1]), return_lse=True)
    out, lse = reference_attention(q, k, v, **kwargs, **blocks)
    expected_out, expected_lse = standard_attention(q, k, v, **kwargs)
    assert_all_close(out_and_grads(out, (q, k, v)), out_and_grads(expected_out, (q, k, v)))
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_rel_close(lse[finite], expected_lse[finite])


@pytest.mark.parametrize("causal", [False, True])
def test_attention_entry_reference_with_softmax_scale(causal: bool) -> None:
    q, k, v = padded_qkv(2, 150, 131, 4, 2, 24)
    out = attention(q, k, v, causal=causal, softmax_scale=0.37, impl="reference")
    expected = standard_attention(q, k, v, **backend_kwargs(causal=causal, softmax_scale=0.37))
    assert_all_close(out_and_grads(out, (q, k, v)), out_and_grads(expected, (q, k, v)))


def test_reference_lse_is_logsumexp_of_scores() -> None:
    q, k, v = padded_qkv(2, 203, 113, 4, 2, 16)
    _, lse = attention(q, k, v, causal=True, softmax_scale=0.2, return_lse=True, impl="reference")
    expected = torch.logsumexp(naive_scores(q, k, causal=True, scale=0.2), dim=-1)  # (B, Hq, Sq)
    assert lse.shape == (2, 4, 203) and lse.dtype == torch.float64
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected))
    assert torch.isneginf(lse[:, :, :90]).all() and torch.isfinite(lse[:, :, 90:]).all()
    assert_rel_close(lse[:, :, 90:], expected[:, :, 90:])


def test_gradient_through_lse_matches_standard() -> None:
    q, k, v = padded_qkv(1, 70, 90, 4, 2, 16)
    weight = randn(1, 4, 70, seed=5).detach()
    grads = []
    for backend in (reference_attention, standard_attention):
        out, lse = backend(q, k, v, **backend_kwargs(causal=True, softmax_scale=0.25, return_lse=True))
        loss = (out * out.detach().sin()).sum() + (lse * weight).sum()
        grads.append(torch.autograd.grad(loss, (q, k, v)))
    assert_all_close(grads[0], grads[1])
    only_lse = reference_attention(q, k, v, **backend_kwargs(softmax_scale=0.25, return_lse=True))[1]
    expected = standard_attention(q, k, v, **backend_kwargs(softmax_scale=0.25, return_lse=True))[1]
    assert_all_close(torch.autograd.grad(only_lse.sum(), (q, k)), torch.autograd.grad(expected.sum(), (q, k)))


@pytest.mark.parametrize("impl", ["reference", "standard"])
def test_rows_without_visible_keys_are_zero_not_nan(impl: str) -> None:
    q, k, v = padded_qkv(1, 203, 113, 2, 1, 16)
    out, lse = attention(q, k, v, causal=True, return_lse=True, impl=impl)
    assert torch.equal(out[:, :90], torch.zeros_like(out[:, :90]))
    assert (out[:, 90:].abs().sum(-1) > 0).all()
    assert torch.isneginf(lse[:, :, :90]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][:, :90], torch.zeros_like(grads[0][:, :90]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_accumulates_in_fp32(dtype: torch.dtype) -> None:
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in padded_qkv(1, 130, 140, 2, 2, 32))
    out, lse = attention(q, k, v, causal=True, return_lse=True, impl="reference")
    assert out.dtype == dtype and lse.dtype == torch.float32
    exact_inputs = (x.detach().double() for x in (q, k, v))
    exact = standard_attention(*exact_inputs, **backend_kwargs(causal=True, softmax_scale=32**-0.5))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_rel_close(out.double(), exact, tol)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------------
# packed variable-length batches


def per_sequence_standard(q: Tensor, k: Tensor, v: Tensor, kwargs: dict, causal: bool) -> Tensor:
    """Each sequence as its own padded batch of one, concatenated: an independent varlen oracle."""
    bounds_q, bounds_k = kwargs["cu_seqlens_q"].tolist(), kwargs["cu_seqlens_k"].tolist()
    outs = [
        standard_attention(
            q[bounds_q[b] : bounds_q[b + 1]][None],
            k[bounds_k[b] : bounds_k[b + 1]][None],
            v[bounds_k[b] : bounds_k[b + 1]][None],
            **backend_kwargs(causal=causal, softmax_scale=0.25),
        )[0]
        for b in range(len(bounds_q) - 1)
    ]
    return torch.cat(outs)


def random_lengths(n: int, seed: int) -> list[int]:
    return torch.randint(1, 160, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("same_lengths", [True, False], ids=["sq=sk", "sq!=sk"])
def test_varlen_reference_matches_standard_per_sequence(causal: bool, same_lengths: bool) -> None:
    lengths_q = random_lengths(4, seed=1) + [0, 3]
    lengths_k = lengths_q if same_lengths else random_lengths(4, seed=2) + [5, 0]
    q, k, v, varlen = varlen_qkv(lengths_q, lengths_k, hq=4, hk=2, d=16)
    kwargs = backend_kwargs(causal=causal, softmax_scale=0.25, **varlen)
    expected = out_and_grads(per_sequence_standard(q, k, v, varlen, causal), (q, k, v))
    tiled = reference_attention(q, k, v, **kwargs, **SMALL_BLOCKS)
    assert_all_close(out_and_grads(tiled, (q, k, v)), expected)
    assert_all_close(out_and_grads(standard_attention(q, k, v, **kwargs), (q, k, v)), expected)


def test_varlen_lse_layout_and_values() -> None:
    lengths_q, lengths_k = [37, 1, 130], [50, 20, 131]
    q, k, v, varlen = varlen_qkv(lengths_q, lengths_k, hq=2, hk=2, d=16)
    _, lse = attention(q, k, v, causal=True, softmax_scale=0.5, return_lse=True, impl="reference", **varlen)
    assert lse.shape == (2, sum(lengths_q))
    bounds_q, bounds_k = varlen["cu_seqlens_q"].tolist(), varlen["cu_seqlens_k"].tolist()
    for b in range(len(lengths_q)):
        rows, cols = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
        scores = naive_scores(q[None, rows], k[None, cols], causal=True, scale=0.5)
        assert_rel_close(lse[:, rows], torch.logsumexp(scores, dim=-1)[0])


def test_varlen_sequence_without_keys_gives_zeros() -> None:
    q, k, v, varlen = varlen_qkv([20, 30], [0, 25], hq=2, hk=1, d=8)
    out, lse = attention(q, k, v, return_lse=True, impl="reference", **varlen)
    assert torch.equal(out[:20], torch.zeros_like(out[:20])) and torch.isneginf(lse[:, :20]).all()
    assert torch.isfinite(lse[:, 20:]).all()


# --------------------------------------------------------------------------------------------
# dropout


def explicit_keep(
    seed: int, batch: int, heads_q: int, sq: int, sk: int, p: float, batch_start: int = 0
) -> Tensor:
    """(B, Hq, Sq, Sk) keep mask of the documented convention: stream b * Hq + h, row i, column j."""
    bh = torch.arange(batch_start, batch_start + batch)[:, None] * heads_q + torch.arange(heads_q)
    return dropout_keep_mask(seed, 0, bh, range(sq), range(sk), p)


def test_standard_dropout_is_the_documented_philox_mask() -> None:
    q, k, v = padded_qkv(2, 45, 61, 4, 2, 16)
    torch.manual_seed(123)
    out = standard_attention(q, k, v, **backend_kwargs(causal=True, dropout_p=0.3, softmax_scale=0.25))
    torch.manual_seed(123)
    seed = Dropout.draw(0.3).seed
    keep = explicit_keep(seed, 2, 4, 45, 61, 0.3)
    expected = naive_attention(q, k, v, causal=True, scale=0.25, keep=keep, p=0.3)
    assert_all_close(out_and_grads(out, (q, k, v)), out_and_grads(expected, (q, k, v)))


def test_varlen_dropout_streams_are_per_sequence() -> None:
    lengths_q, lengths_k = [33, 50], [40, 50]
    q, k, v, varlen = varlen_qkv(lengths_q, lengths_k, hq=2, hk=2, d=8)
    torch.manual_seed(5)
    kwargs = backend_kwargs(dropout_p=0.25, softmax_scale=0.3, **varlen)
    out = reference_attention(q, k, v, **kwargs, **SMALL_BLOCKS)
    torch.manual_seed(5)
    seed = Dropout.draw(0.25).seed
    keep = explicit_keep(seed, 1, 2, 50, 50, 0.25, batch_start=1)
    second = (q[None, 33:], k[None, 40:], v[None, 40:])
    expected = naive_attention(*second, causal=False, scale=0.3, keep=keep, p=0.25)
    assert_rel_close(out[33:], expected[0])


@pytest.mark.parametrize(
    "shape, causal",
    [((2, 97, 97, 2, 2, 16), True), ((1, 113, 203, 4, 2, 16), True), ((1, 203, 113, 2, 1, 16), False)],
)
def test_reference_dropout_matches_standard_with_same_seed(shape: tuple[int, ...], causal: bool) -> None:
    q, k, v = padded_qkv(*shape)
    kwargs = backend_kwargs(causal=causal, dropout_p=0.2, softmax_scale=0.25, return_lse=True)
    torch.manual_seed(42)
    out, lse = reference_attention(q, k, v, **kwargs, **SMALL_BLOCKS)
    torch.manual_seed(42)
    expected_out, expected_lse = standard_attention(q, k, v, **kwargs)
    assert_all_close(out_and_grads(out, (q, k, v)), out_and_grads(expected_out, (q, k, v)))
    finite = torch.isfinite(expected_lse)  # lse is of the undropped softmax
    assert_rel_close(lse[finite], expected_lse[finite])
    assert_rel_close(lse[finite], torch.logsumexp(naive_scores(q, k, causal=causal, scale=0.25), -1)[finite])


def test_varlen_dropout_reference_matches_standard() -> None:
    q, k, v, varlen = varlen_qkv(random_lengths(3, seed=7), random_lengths(3, seed=8), hq=4, hk=2, d=16)
    kwargs = backend_kwargs(causal=True, dropout_p=0.4, softmax_scale=0.25, **varlen)
    torch.manual_seed(3)
    out = reference_attention(q, k, v, **kwargs)
    torch.manual_seed(3)
    expected = standard_attention(q, k, v, **kwargs)
    assert_all_close(out_and_grads(out, (q, k, v)), out_and_grads(expected, (q, k, v)))


def test_dropout_keep_fraction_and_seed() -> None:
    q, k, v = (x.detach() for x in padded_qkv(1, 256, 256, 4, 4, 8))
    v = torch.ones_like(v)  # out = rowsum of the dropped, rescaled probabilities: 1 on average
    torch.manual_seed(0)
    first = attention(q, k, v, dropout_p=0.3, impl="reference")
    torch.manual_seed(0)
    assert torch.equal(attention(q, k, v, dropout_p=0.3, impl="reference"), first)
    torch.manual_seed(1)
    assert (attention(q, k, v, dropout_p=0.3, impl="reference") - first).abs().max() > 0.1
    assert abs(first.mean().item() - 1.0) < 0.02
    torch.manual_seed(0)
    keep = explicit_keep(Dropout.draw(0.3).seed, 1, 4, 256, 256, 0.3)
    assert abs(keep.double().mean().item() - 0.7) < 0.005


# --------------------------------------------------------------------------------------------
# gradcheck of the hand-written backward


@pytest.mark.parametrize(
    "shape, causal, dropout_p",
    [((1, 6, 9, 2, 1, 3), True, 0.0), ((2, 7, 5, 2, 2, 3), False, 0.0), ((1, 6, 7, 2, 1, 3), True, 0.3)],
)
def test_reference_gradcheck(shape: tuple[int, ...], causal: bool, dropout_p: float) -> None:
    q, k, v = padded_qkv(*shape)

    def run(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        torch.manual_seed(0)  # the same dropout mask on every call
        kwargs = backend_kwargs(causal=causal, dropout_p=dropout_p, softmax_scale=0.7, return_lse=True)
        return reference_attention(q, k, v, **kwargs, block_q=2, block_k=3)

    assert torch.autograd.gradcheck(run, (q, k, v))


def test_reference_gradcheck_varlen() -> None:
    q, k, v, varlen = varlen_qkv([3, 5], [4, 6], hq=2, hk=1, d=3)

    def run(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kwargs = backend_kwargs(causal=True, softmax_scale=0.7, return_lse=True, **varlen)
        return reference_attention(q, k, v, **kwargs, block_q=2, block_k=2)

    assert torch.autograd.gradcheck(run, (q, k, v))


# --------------------------------------------------------------------------------------------
# memory and work


class LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by ops run under this mode and still alive.

    Every op's outputs are inspected; a storage that is not one of the op's inputs' storages is a
    new allocation (views and in-place results share their input's). Its nbytes count until its
    last tensor dies (a weakref finalizer on the storage object, which torch keeps alive exactly as
    long as the storage). Tensors created outside the mode are not counted, so the inputs are
    created inside it. This is what torch allocates for tensors, not the process's RSS.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.counted: set[int] = set()
        self.ops: list[str] = []

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.counted.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            if id(storage) in inputs or id(storage) in self.counted:
                continue
            self.counted.add(id(storage))
            self.live += storage.nbytes()
            weakref.finalize(storage, self._release, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def forward_backward_under(mode: LiveStorageBytes, seqlen: int, impl: str, causal: bool) -> None:
    torch.manual_seed(0)
    with mode:
        q, k, v = ((torch.randn(1, seqlen, 1, 64) + 0.5).requires_grad_() for _ in range(3))
        out = attention(q, k, v, causal=causal, impl=impl)
        out.backward(torch.randn_like(out) + 0.5)


def peak_bytes(seqlen: int, impl: str) -> int:
    mode = LiveStorageBytes()
    forward_backward_under(mode, seqlen, impl, causal=True)  # causal: half the tiles to run
    return mode.peak


def test_reference_memory_is_linear_in_sequence_length() -> None:
    # Single head, D = 64, fp32, causal forward + backward, inputs and gradients included.
    ratio = peak_bytes(4096, "reference") / peak_bytes(1024, "reference")
    assert 3.0 <= ratio <= 6.0, f"reference peak grew {ratio:.2f}x for 4x the tokens"
    assert peak_bytes(4096, "standard") / peak_bytes(1024, "standard") > 12.0  # the measure sees N^2


def test_reference_causal_skips_tiles_above_the_diagonal() -> None:
    def matmuls(causal: bool) -> int:
        mode = LiveStorageBytes()
        forward_backward_under(mode, 1024, "reference", causal=causal)
        return sum("mm" in op for op in mode.ops)

    # 8 x 8 tiles of 128: causal visits the 36 on or below the diagonal.
    assert 0.5 <= matmuls(True) / matmuls(False) <= 0.6


# --------------------------------------------------------------------------------------------
# attention(): validation and dispatch


def valid_padded() -> dict:
    q, k, v = (x.detach() for x in padded_qkv(2, 8, 8, 4, 2, 16))
    return {"q": q, "k": k, "v": v}


def valid_varlen() -> dict:
    q, k, v, varlen = varlen_qkv([3, 5], [4, 4], hq=2, hk=2, d=8)
    return {"q": q.detach(), "k": k.detach(), "v": v.detach(), **varlen}


def _with(base: dict, **changes: object) -> dict:
    return {**base, **changes}


def _cu(*values: int, dtype: torch.dtype = torch.int32) -> Tensor:
    return torch.tensor(values, dtype=dtype)


def invalid_calls() -> list:
    """(kwargs, the message it must raise) for every rejected input."""
    p, vl = valid_padded(), valid_varlen()
    q, k = p["q"], p["k"]
    three_heads = k[:, :, :1].expand(2, 8, 3, 16)
    impls = r"\['auto', 'flash', 'reference', 'standard', 'sdpa'\]"
    cases = {
        "impl": (_with(p, impl="triton"), rf"impl must be one of {impls}, got 'triton'"),
        "q-type": (_with(p, q=q.numpy()), "q must be a torch.Tensor"),
        "q-rank": (_with(p, q=q[0]), r"q must be \(batch, seqlen, heads, head_dim\)"),
        "v-rank-varlen": (_with(vl, v=vl["v"][None]), r"v must be \(total_tokens, heads, head_dim\)"),
        "k-batch": (_with(p, k=k[:1], v=k[:1]), "k batch size"),
        "k-head-dim": (_with(p, k=k[..., :8]), "k head dim"),
        "v-shape": (_with(p, v=k[..., :8]), "v shape must equal k's"),
        "v-seqlen": (_with(p, v=k[:, :5]), "v shape must equal k's"),
        "heads": (_with(p, k=three_heads, v=three_heads), "k heads must divide q heads"),
        "q-dtype": (_with(p, q=q.int(), k=k.int(), v=k.int()), "q dtype must be one of"),
        "k-dtype": (_with(p, k=k.float()), r"k dtype must equal q's \(torch.float64\)"),
        "v-dtype": (_with(p, v=k.half()), "v dtype must equal q's"),
        "v-device": (_with(p, v=k.to("meta")), "v must be on q's device"),
        "cu-alone": (_with(p, cu_seqlens_q=_cu(0, 8)), "cu_seqlens_q and cu_seqlens_k must be given"),
        "cu-dtype": (_with(vl, cu_seqlens_q=_cu(0, 3, 8, dtype=torch.int64)), "cu_seqlens_q must be a 1-D"),
        "cu-rank": (_with(vl, cu_seqlens_k=_cu(0, 4, 8)[None]), "cu_seqlens_k must be a 1-D torch.int32"),
        "cu-length": (_with(vl, cu_seqlens_k=_cu(0, 8)), r"cu_seqlens_k must have length batch \+ 1"),
        "cu-one": (_with(vl, cu_seqlens_q=_cu(8), cu_seqlens_k=_cu(8)), "cu_seqlens_q must have length"),
        "cu-decreasing": (_with(vl, cu_seqlens_q=_cu(0, 6, 5, 8)), "cu_seqlens_q must .* be non-decreasing"),
        "cu-start": (_with(vl, cu_seqlens_k=_cu(1, 4, 8)), "cu_seqlens_k must start at 0"),
        "cu-total": (_with(vl, cu_seqlens_q=_cu(0, 3, 7)), "cu_seqlens_q must end at the total token count"),
        "max-missing": (_with(vl, max_seqlen_k=None), "max_seqlen_k must be a positive int"),
        "max-short": (_with(vl, max_seqlen_q=4), "max_seqlen_q must be >= the longest length 5"),
        "max-padded": (_with(p, max_seqlen_q=8), "max_seqlen_q / max_seqlen_k are only allowed with"),
        "dropout-high": (_with(p, dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
        "dropout-neg": (_with(p, dropout_p=-0.1), r"dropout_p must be in \[0, 1\)"),
        "block-mask": (_with(p, block_mask=torch.ones(1, 1, dtype=torch.bool)), "block_mask must have shape"),
        "sdpa-varlen": (_with(vl, impl="sdpa"), "impl='sdpa' takes padded batches"),
        "sdpa-lse": (_with(p, impl="sdpa", return_lse=True), "impl='sdpa' takes .* without return_lse"),
    }
    return [pytest.param(kwargs, match, id=name) for name, (kwargs, match) in cases.items()]


@pytest.mark.parametrize("kwargs, match", invalid_calls())
def test_invalid_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attention(**kwargs)


def test_cu_seqlens_values_are_not_read_while_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = fake_flash(monkeypatch, available=True)  # a backend that never reads cu_seqlens either
    bad_values = _with(valid_varlen(), cu_seqlens_q=_cu(0, 6, 5), impl="flash")
    attention(**bad_values)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="cu_seqlens_q must be a 1-D"):  # the layout is still checked
        attention(**_with(bad_values, cu_seqlens_q=_cu(0, 3, 8, dtype=torch.int64)))


@pytest.fixture
def no_flash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(longctx.ops, "flash", raising=False)
    monkeypatch.setitem(sys.modules, "longctx.ops.flash", None)  # import raises ImportError


def fake_flash(monkeypatch: pytest.MonkeyPatch, available: bool) -> list[dict]:
    """Install a stand-in longctx.ops.flash; returns the list its flash_attention records calls in."""
    calls: list[dict] = []
    module = types.ModuleType("longctx.ops.flash")
    module.is_available = lambda: available
    module.flash_attention = lambda q, k, v, **kwargs: calls.append(kwargs) or q
    monkeypatch.setitem(sys.modules, "longctx.ops.flash", module)
    monkeypatch.setattr(longctx.ops, "flash", module, raising=False)
    return calls


@pytest.mark.usefixtures("no_flash")
def test_flash_without_a_cuda_build_raises() -> None:
    with pytest.raises(ValueError, match="impl='flash' needs a CUDA build"):
        attention(**valid_padded(), impl="flash")


def test_flash_unavailable_raises_instead_of_falling_back(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_flash(monkeypatch, available=False)
    with pytest.raises(ValueError, match="impl='flash' needs a CUDA build"):
        attention(**valid_padded(), impl="flash")


def test_flash_gets_the_backend_keyword_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_flash(monkeypatch, available=True)
    attention(**valid_padded(), causal=True, deterministic=True, impl="flash")
    assert calls == [backend_kwargs(causal=True, deterministic=True, softmax_scale=0.25)]
    assert isinstance(calls[0]["softmax_scale"], float)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_auto_picks_reference_off_cuda(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    flash_calls = fake_flash(monkeypatch, available=True)
    picked: list[dict] = []
    backends = attention_module._TORCH_BACKENDS
    monkeypatch.setitem(backends, "reference", lambda q, k, v, **kw: picked.append(kw) or q)
    inputs = {name: x.to(dtype) for name, x in valid_padded().items()}
    attention(**inputs, softmax_scale=2)
    assert flash_calls == [] and picked == [backend_kwargs(softmax_scale=2.0)]


def test_every_torch_impl_agrees() -> None:
    q, k, v = padded_qkv(2, 60, 75, 4, 2, 16)
    expected = out_and_grads(naive_attention(q, k, v, causal=True, scale=0.25), (q, k, v))
    for impl in ("auto", "reference", "standard", "sdpa"):
        out = attention(q, k, v, causal=True, impl=impl)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_all_close(out_and_grads(out, (q, k, v)), expected)


def test_return_lse_only_when_asked() -> None:
    inputs = valid_padded()
    assert isinstance(attention(**inputs), Tensor)
    out, lse = attention(**inputs, return_lse=True)
    assert out.shape == inputs["q"].shape and lse.shape == (2, 4, 8)
