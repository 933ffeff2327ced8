"""Approximate attentions against independent fp64 formulas written out in the tests."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longctx.config import ATTN_IMPLS, ConfigError, compose
from longctx.models.approx import (
    APPROX_ATTNS,
    LinformerAttention,
    PerformerAttention,
    ReformerAttention,
    build_approx_attention,
    orthogonal_gaussian,
)
from longctx.models.bert import Bert, BertConfig
from longctx.models.layers import SelfAttention

B, S, H, D = 2, 23, 2, 8


def _qkv(seed: int = 0, s: int = S, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(B, s, H, D, generator=g, dtype=torch.float64) + 0.3 for _ in range(3))


def _softmax_attention(q, k, v, allowed=None):
    """Plain fp64 attention per (batch, head): q (B, Sq, H, D), k/v (B, Sk, H, D), allowed (Sq, Sk)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)


def _packed(lengths, seed=0):
    """Packed q, k, v (total, H, D) of sequences with the given lengths, and cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, H, D, generator=g, dtype=torch.float64) + 0.3 for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def test_config_accepts_every_approx_name():
    assert set(APPROX_ATTNS) <= set(ATTN_IMPLS)
    for name in APPROX_ATTNS:
        module = build_approx_attention(name, D, causal=False, max_len=512)
        assert module.shared_qk == (name == "reformer")


# ------------------------------------------------------------------------------------------ Linformer


def test_linformer_with_identity_projections_is_softmax_attention():
    q, k, v = _qkv()
    attn = LinformerAttention(D, max_len=S, proj_len=S).double()
    with torch.no_grad():
        attn.E.copy_(torch.eye(S))
        attn.F.copy_(torch.eye(S))
    torch.testing.assert_close(attn(q, k, v), _softmax_attention(q, k, v), rtol=1e-10, atol=1e-10)


def test_linformer_matches_projected_formula_per_packed_sequence():
    attn = LinformerAttention(D, max_len=30, proj_len=6).double()
    lengths = [7, 19, 1]
    q, k, v, cu = _packed(lengths)
    out = attn(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))
    for i, n in enumerate(lengths):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        kp = torch.einsum("ps,shd->phd", attn.E[:, :n].detach(), k[sl])
        vp = torch.einsum("ps,shd->phd", attn.F[:, :n].detach(), v[sl])
        expect = _softmax_attention(q[sl][None], kp[None], vp[None])[0]
        torch.testing.assert_close(out[sl], expect, rtol=1e-10, atol=1e-10)


def test_linformer_refuses_bad_settings():
    with pytest.raises(ValueError, match="at most 10 tokens"):
        LinformerAttention(D, max_len=10, proj_len=4)(*_qkv(s=11))
    with pytest.raises(ValueError, match="cannot be causal"):
        build_approx_attention("linformer", D, causal=True, max_len=64)
    with pytest.raises(ValueError, match="proj_len=256 exceeds model.max_positions=64"):
        build_approx_attention("linformer", D, causal=False, max_len=64, approx={"proj_len": 256})
    with pytest.raises(ValueError, match="model.approx.feature is unknown"):
        build_approx_attention("performer", D, causal=False, approx={"feature": 3})
    with pytest.raises(ValueError, match="buckets must be 1 or even"):
        build_approx_attention("reformer", D, causal=False, approx={"buckets": 3})


# ------------------------------------------------------------------------------------------ Performer


def test_orthogonal_features_are_orthogonal_within_a_block():
    torch.manual_seed(0)
    w = orthogonal_gaussian(20, 8).double()
    gram = w[:8] @ w[:8].T
    torch.testing.assert_close(gram - torch.diag(gram.diag()), torch.zeros(8, 8, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert w.shape == (20, 8)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_converges_to_softmax_attention(causal):
    """FAVOR+ is an unbiased estimator of the softmax kernel: its error shrinks as features grow."""
    q, k, v = _qkv(seed=1, scale=0.3)
    allowed = torch.ones(S, S, dtype=torch.bool).tril() if causal else None
    exact = _softmax_attention(q, k, v, allowed)
    errors = {}
    for m in (16, 256, 4096):
        errs = []
        for seed in range(3):
            torch.manual_seed(seed)
            attn = PerformerAttention(D, features=m, causal=causal, redraw=0).double()
            errs.append(((attn(q, k, v) - exact).norm() / exact.norm()).item())
        errors[m] = sum(errs) / len(errs)
    # Relative error ~ 1/sqrt(m): 16x the features -> about 4x smaller; allow 2x per step.
    assert errors[4096] * 2 < errors[256] and errors[256] * 2 < errors[16], errors
    assert errors[4096] < 0.008, errors


def test_performer_redraws_every_interval_in_training_only():
    torch.manual_seed(0)
    attn = PerformerAttention(D, features=16, causal=False, redraw=2)
    q, k, v = (x.float() for x in _qkv())
    first = attn.projection.clone()
    attn.eval()
    for _ in range(3):
        attn(q, k, v)
    assert torch.equal(attn.projection, first)
    attn.train()
    attn(q, k, v)
    attn(q, k, v)
    assert torch.equal(attn.projection, first)  # calls 0 and 1 use the initial draw
    attn(q, k, v)
    assert not torch.equal(attn.projection, first)


# ------------------------------------------------------------------------------------------ linear


def _linear_reference(q, k, v, causal, allowed=None):
    """O(N^2) form: A_ij = phi(q_i).phi(k_j) (masked), out = A v / A 1, phi = elu + 1."""
    a = torch.einsum("bqhd,bkhd->bhqk", F.elu(q) + 1, F.elu(k) + 1)
    if causal:
        a = a * torch.ones(a.shape[-2], a.shape[-1], dtype=a.dtype).tril()
    return torch.einsum("bhqk,bkhd->bqhd", a / a.sum(-1, keepdim=True), v)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_matches_quadratic_formula(causal):
    q, k, v = _qkv()
    out = build_approx_attention("linear", D, causal=causal)(q, k, v)
    torch.testing.assert_close(out, _linear_reference(q, k, v, causal), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ local


@pytest.mark.parametrize("window", [1, 3, 5, 8, 40])
@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_is_banded_softmax_attention(window, causal):
    q, k, v = _qkv()
    i, j = torch.arange(S).view(-1, 1), torch.arange(S).view(1, -1)
    band = (i - j).abs() <= window
    if causal:
        band = band & (j <= i)
    out = build_approx_attention("local", D, causal=causal, approx={"window": window})(q, k, v)
    torch.testing.assert_close(out, _softmax_attention(q, k, v, band), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ Reformer


def _shared_qk_reference(q, v, allowed):
    """Shared-QK attention: keys are q / |q|; a token sees itself only when it sees nothing else."""
    keys = q / q.norm(dim=-1, keepdim=True)
    n = q.shape[1]
    eye = torch.eye(n, dtype=torch.bool)
    others = allowed & ~eye
    alone = ~others.any(-1, keepdim=True)
    return _softmax_attention(q, keys, v, others | (eye & alone))


@pytest.mark.parametrize("causal", [False, True])
def test_reformer_with_one_bucket_is_full_shared_qk_attention(causal):
    q, _, v = _qkv(seed=2)
    attn = build_approx_attention("reformer", D, causal=causal, approx={"buckets": 1, "n_hashes": 1})
    allowed = torch.ones(S, S, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    out = attn.double().eval()(q, None, v)
    torch.testing.assert_close(out, _shared_qk_reference(q, v, allowed), rtol=1e-8, atol=1e-8)


def test_reformer_matches_bucket_and_chunk_rule_reference():
    """An explicit re-implementation: per round, sort by (bucket, position), cut into chunks of
    ceil(S / buckets), attend to own + previous chunk (self only when alone); combine rounds by lse."""
    torch.manual_seed(3)
    buckets, rounds = 4, 3
    attn = ReformerAttention(D, buckets=buckets, n_hashes=rounds, causal=False).double().eval()
    q, _, v = _qkv(seed=3)
    out = attn(q, None, v)
    keys = q / q.norm(dim=-1, keepdim=True)
    rotated = torch.einsum("bshd,rdk->bhrsk", q, attn.rotations.double())
    hashes = torch.cat([rotated, -rotated], -1).argmax(-1)  # (B, H, R, S)
    chunk = math.ceil(S / buckets)
    expect = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            outs, lses = [], []
            for r in range(rounds):
                order = sorted(range(S), key=lambda t: (int(hashes[b, h, r, t]), t))
                chunk_of = {t: idx // chunk for idx, t in enumerate(order)}
                n_chunks = math.ceil(S / chunk)
                o, lse = torch.zeros(S, D, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
                for i in range(S):
                    mine = chunk_of[i]
                    seen = {mine, (mine - 1) % n_chunks}
                    ks = [j for j in range(S) if chunk_of[j] in seen and j != i] or [i]
                    scores = torch.stack([q[b, i, h] @ keys[b, j, h] for j in ks]) / math.sqrt(D)
                    if ks == [i]:
                        scores = scores * 0 - 1e5
                    p = torch.softmax(scores, 0)
                    o[i] = sum(p[n] * v[b, j, h] for n, j in enumerate(ks))
                    lse[i] = torch.logsumexp(scores, 0)
                outs.append(o)
                lses.append(lse)
            w = torch.softmax(torch.stack(lses), 0)
            expect[b, :, h] = (torch.stack(outs) * w.unsqueeze(-1)).sum(0)
    torch.testing.assert_close(out, expect, rtol=1e-8, atol=1e-8)


def test_reformer_causal_never_reads_future_values_and_redraws_in_training():
    torch.manual_seed(4)
    attn = ReformerAttention(D, buckets=4, n_hashes=2, causal=True).double().eval()
    q, _, v = _qkv(seed=4)
    out = attn(q, None, v)
    assert out.shape == q.shape
    v2 = v.clone()
    v2[:, 12:] += 5.0
    torch.testing.assert_close(attn(q, None, v2)[:, :12], out[:, :12], rtol=0, atol=0)
    assert not torch.allclose(attn(q, None, v2)[:, 12:], out[:, 12:])
    rotations = attn.rotations.clone()
    attn.train()(q, None, v)
    assert not torch.equal(attn.rotations, rotations)


# ------------------------------------------------------------------------------------------ in models


@pytest.mark.parametrize("name", APPROX_ATTNS)
def test_packed_varlen_equals_each_sequence_alone(name):
    """BERT's padding-free path packs sequences; padding must never reach a key. (Reformer with
    several buckets depends on the padded length through its chunk size, so it runs with one.)"""
    torch.manual_seed(5)
    approx = {"proj_len": 8, "features": 32, "window": 3, "buckets": 1, "n_hashes": 1}
    attn = build_approx_attention(name, D, causal=False, max_len=32, approx=approx).double().eval()
    lengths = [9, 20, 4]
    q, k, v, cu = _packed(lengths, seed=5)
    if attn.shared_qk:
        k = None
    out = attn(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))
    for i in range(len(lengths)):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        alone = attn(q[sl][None], None if k is None else k[sl][None], v[sl][None])[0]
        torch.testing.assert_close(out[sl], alone, rtol=1e-10, atol=1e-10)


def test_reformer_attention_projects_q_and_v_only():
    layer = SelfAttention(32, 4, causal=False, impl="reformer")
    assert layer.qkv.out_features == 64
    x = torch.randn(2, 10, 32)
    assert layer(x).shape == x.shape


@pytest.mark.parametrize("name", APPROX_ATTNS)
def test_bert_trains_with_every_approx_attention(name):
    torch.manual_seed(6)
    approx = {"proj_len": 8, "features": 16, "window": 4, "buckets": 4}
    config = BertConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, intermediate_size=32, max_positions=24,
                        dropout=0.0, attn=name, approx=approx)
    model = Bert(config)
    ids = torch.randint(0, 50, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, 15:] = 0
    hidden = model(ids, mask)
    hidden.sum().backward()
    assert torch.isfinite(hidden).all() and (hidden[1, 15:] == 0).all()
    grads = [p.grad for p in model.blocks.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_config_reports_bad_approx_combinations():
    with pytest.raises(ConfigError, match="linformer.*cannot be causal"):
        compose(["model=gpt2-tiny", "model.attn=linformer"])
    cfg = compose(["model=bert-tiny", "task=classify", "model.attn=performer"])
    assert cfg.model.attn == "performer"
