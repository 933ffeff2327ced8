"""Approximate-attention baselines of the Long Range Arena: Linformer, Performer, linear, local, Reformer.

FlashAttention is exact; these are the approximations it was compared with (Tay et al. 2021,
Xiong et al. 2021). Each is a small module selected by ``model.attn=<name>`` and computes
multi-head attention from projected q, k, v laid out (batch, seqlen, heads, head_dim), like
``longctx.ops.attention``, with the softmax scale 1/sqrt(head_dim):

- ``linformer`` (Wang et al. 2020): keys and values projected along the sequence to ``proj_len``
  rows by learned E, F (proj_len, max_len), sliced to the batch's length; non-causal only.
- ``performer`` (Choromanski et al. 2021): FAVOR+ positive orthogonal random features approximate
  the softmax kernel exp(q.k / sqrt(d)); the ``features`` projections are redrawn every ``redraw``
  training forwards (0: never).
- ``linear`` (Katharopoulos et al. 2020): the kernel elu(x) + 1, no approximation of softmax.
- ``local``: exact softmax attention restricted to keys at most ``window`` positions away.
- ``reformer`` (Kitaev et al. 2020): shared QK (keys are the queries, unit-normalised), ``n_hashes``
  rounds of angular LSH into ``buckets`` buckets by random rotations, sorted and cut into chunks
  that attend to themselves and the previous chunk; a token attends to itself only when it sees
  nothing else. Rotations are redrawn at every training forward and fixed in eval.

Causal variants (for GPT-2; LRA's encoders are bidirectional) never read a later token's value,
but as in the original methods the computation is not fully blind to later tokens: Performer's key
stabiliser is one max over the whole sequence (it cancels exactly in exact arithmetic) and
Reformer's chunks depend on where later tokens hash. GPT-2 configs have no ``model.approx``
section, so GPT-2 uses APPROX_DEFAULTS.

Padding: the modules compute on padded batches with a key mask (True = real token). BERT's
padding-free path hands attention packed (total_tokens, heads, head_dim) tokens with cu_seqlens;
:class:`ApproxAttention` pads those to (batch, max_seqlen), runs, and packs the result again, so
padding never reaches a key (Reformer sorts padding after every bucket, but its chunk length,
ceil(padded length / buckets), still follows the batch's longest sequence). No
attention-probability dropout is applied (the kernelised methods have no probabilities); the
block's residual dropout still is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longctx.config import APPROX_ATTNS

# Hyper-parameters of ``model.approx`` and their defaults (LRA's settings: 256 features / projected
# length, 2 hash rounds).
APPROX_DEFAULTS: dict[str, int] = {"features": 256, "proj_len": 256, "window": 256, "buckets": 32,
                                   "n_hashes": 2, "redraw": 1000}
# Score of a token against itself in Reformer's shared-QK attention: it loses to every other key
# but keeps a row that sees no other key defined (Kitaev et al. 2020, section 2).
SELF_SCORE = -1e5


def masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float,
                             self_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention over the last two dims: q (..., Sq, D), k and v (..., Sk, D), ``allowed``
    bool broadcastable to (..., Sq, Sk) -> out (..., Sq, D) and the fp32 log-sum-exp (..., Sq).

    Scores are taken in fp32 at least. ``self_mask`` (same broadcast) marks scores replaced by SELF_SCORE.
    A row with no allowed key gets output 0 and a very negative lse (finite, so that rows can be
    combined by their lse without NaN).
    """
    scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    if self_mask is not None:
        scores = scores.masked_fill(self_mask, SELF_SCORE)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    if allowed is not None:
        probs = probs * allowed.any(dim=-1, keepdim=True)
    return (probs.to(v.dtype) @ v), lse


def kernel_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool,
                     key_mask: Tensor | None) -> Tensor:
    """Kernelised attention out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j) in O(S).

    phi_q, phi_k: non-negative features (B, S, H, M); v (B, S, H, D); key_mask (B, S) bool or None.
    Causal sums run over j <= i by prefix sums, holding (B, S, H, M, D) — fine for LRA sizes.
    """
    if key_mask is not None:
        phi_k = phi_k * key_mask[:, :, None, None].to(phi_k.dtype)
    if causal:
        kv = torch.einsum("bshm,bshd->bshmd", phi_k, v).cumsum(dim=1)
        num = torch.einsum("bshm,bshmd->bshd", phi_q, kv)
        den = torch.einsum("bshm,bshm->bsh", phi_q, phi_k.cumsum(dim=1))
    else:
        num = torch.einsum("bshm,bhmd->bshd", phi_q, torch.einsum("bshm,bshd->bhmd", phi_k, v))
        den = torch.einsum("bshm,bhm->bsh", phi_q, phi_k.sum(dim=1))
    return num / den.unsqueeze(-1).clamp_min(torch.finfo(den.dtype).tiny)


def orthogonal_gaussian(rows: int, dim: int, *, device: torch.device | None = None) -> Tensor:
    """(rows, dim) random projections: blocks of ``dim`` orthonormal rows (Haar, from the QR of a
    Gaussian), each row rescaled to the norm of an independent Gaussian vector, so every row is
    marginally N(0, I) while rows within a block are exactly orthogonal (FAVOR+'s lower-variance
    estimator)."""
    blocks = []
    for _ in range(math.ceil(rows / dim)):
        basis, r = torch.linalg.qr(torch.randn(dim, dim, device=device))
        blocks.append((basis * r.diagonal().sign()).T)  # sign fix: LAPACK's Q alone is not uniform
    norms = torch.randn(rows, dim, device=device).norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:rows] * norms


class ApproxAttention(nn.Module):
    """Base: ``attend`` works on padded (B, S, H, D) with a key mask; ``forward`` also accepts
    packed varlen tokens (total, H, D) with int32 cu_seqlens (B + 1,) and max_seqlen."""

    shared_qk = False  # True: the module takes q and v only (k=None); keys are derived from q

    def attend(self, q: Tensor, k: Tensor | None, v: Tensor, key_mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, q: Tensor, k: Tensor | None, v: Tensor, *, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None) -> Tensor:
        """q, k, v (B, S, H, D) -> (B, S, H, D); or packed (total, H, D) with cu_seqlens -> (total, H, D)."""
        if (k is None) != self.shared_qk:
            want = "None (queries and keys are shared)" if self.shared_qk else "a tensor"
            raise ValueError(f"{type(self).__name__}: k must be {want}")
        if cu_seqlens is None:
            return self.attend(q, k, v, None)
        if max_seqlen is None:
            raise ValueError("max_seqlen is required with cu_seqlens")
        lengths = cu_seqlens.diff().long()
        batch = lengths.numel()
        row = torch.repeat_interleave(torch.arange(batch, device=q.device), lengths, output_size=q.shape[0])
        col = torch.arange(q.shape[0], device=q.device) - cu_seqlens[row].long()
        flat = row * max_seqlen + col  # where packed token t sits in the flattened (B * max_seqlen) batch

        def pad(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            out = x.new_zeros(batch * max_seqlen, *x.shape[1:])
            out[flat] = x
            return out.view(batch, max_seqlen, *x.shape[1:])

        key_mask = torch.zeros(batch * max_seqlen, dtype=torch.bool, device=q.device)
        key_mask[flat] = True
        out = self.attend(pad(q), pad(k), pad(v), key_mask.view(batch, max_seqlen))
        return out.flatten(0, 1)[flat]


class LinformerAttention(ApproxAttention):
    """Linformer: softmax(q (E k)^T / sqrt(d)) (F v), E and F learned (proj_len, max_len), shared
    by the heads of a layer. Padded keys and values are zeroed before the projection."""

    def __init__(self, head_dim: int, *, max_len: int, proj_len: int) -> None:
        super().__init__()
        self.scale = head_dim ** -0.5
        self.max_len = max_len
        self.E = nn.Parameter(nn.init.xavier_normal_(torch.empty(proj_len, max_len)))
        self.F = nn.Parameter(nn.init.xavier_normal_(torch.empty(proj_len, max_len)))

    def attend(self, q: Tensor, k: Tensor | None, v: Tensor, key_mask: Tensor | None) -> Tensor:
        seqlen = k.shape[1]
        if seqlen > self.max_len:
            raise ValueError(f"attn='linformer' was built for at most {self.max_len} tokens "
                             f"(model.max_positions), got {seqlen}")
        if key_mask is not None:
            keep = key_mask[:, :, None, None].to(k.dtype)
            k, v = k * keep, v * keep
        k = torch.einsum("ps,bshd->bhpd", self.E[:, :seqlen].to(k.dtype), k)  # (B, H, proj_len, D)
        v = torch.einsum("ps,bshd->bhpd", self.F[:, :seqlen].to(v.dtype), v)
        out, _ = masked_softmax_attention(q.transpose(1, 2), k, v, None, self.scale)
        return out.transpose(1, 2)


class PerformerAttention(ApproxAttention):
    """Performer FAVOR+: phi(x) = exp(w_i.x - |x|^2 / 2) / sqrt(m) for m orthogonal random w_i, with
    x = q or k scaled by d^(-1/4), so that E[phi(q).phi(k)] = exp(q.k / sqrt(d)) (positive, unbiased).

    The projections are a buffer (saved with checkpoints, broadcast by DDP); ``redraw_features``
    draws new ones, which ``forward`` does every ``redraw`` training calls (0: never).
    """

    def __init__(self, head_dim: int, *, features: int, causal: bool, redraw: int) -> None:
        super().__init__()
        self.causal, self.redraw, self.head_dim = causal, redraw, head_dim
        self.register_buffer("projection", orthogonal_gaussian(features, head_dim))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def redraw_features(self) -> None:
        """Fresh random features (a new, independent estimator)."""
        self.projection.copy_(orthogonal_gaussian(*self.projection.shape, device=self.projection.device))

    def features(self, x: Tensor, key_mask: Tensor | None, is_query: bool) -> Tensor:
        """x (B, S, H, D) -> phi(x) (B, S, H, m). Each query row and each (batch, head) of keys is
        shifted by its max exponent, a constant that cancels between numerator and denominator."""
        x = x * self.head_dim ** -0.25
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = (x @ self.projection.to(x.dtype).T).to(dtype) - x.to(dtype).pow(2).sum(-1, keepdim=True) / 2
        if is_query:
            shift = logits.amax(dim=-1, keepdim=True)
        else:
            if key_mask is not None:
                logits = logits.masked_fill(~key_mask[:, :, None, None], -math.inf)
            shift = logits.amax(dim=(1, 3), keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, 0.0).detach()
        return (torch.exp(logits - shift) / math.sqrt(self.projection.shape[0])).to(x.dtype)

    def attend(self, q: Tensor, k: Tensor | None, v: Tensor, key_mask: Tensor | None) -> Tensor:
        if self.training and self.redraw:
            if int(self.calls) % self.redraw == 0 and int(self.calls) > 0:
                self.redraw_features()
            self.calls += 1
        return kernel_attention(self.features(q, None, True), self.features(k, key_mask, False), v,
                                causal=self.causal, key_mask=key_mask)


class LinearAttention(ApproxAttention):
    """Linear transformer: kernel phi(x) = elu(x) + 1 in place of exp(q.k / sqrt(d))."""

    def __init__(self, *, causal: bool) -> None:
        super().__init__()
        self.causal = causal

    def attend(self, q: Tensor, k: Tensor | None, v: Tensor, key_mask: Tensor | None) -> Tensor:
        return kernel_attention(F.elu(q) + 1, F.elu(k) + 1, v, causal=self.causal, key_mask=key_mask)


class LocalAttention(ApproxAttention):
    """Exact softmax attention where query i sees key j only if |i - j| <= window (and j <= i
    when causal). Blocks of ``window`` queries attend to their own and the two neighbouring key
    blocks, so memory is O(S * 3 * window) rather than O(S^2)."""

    def __init__(self, head_dim: int, *, window: int, causal: bool) -> None:
        super().__init__()
        self.scale, self.window, self.causal = head_dim ** -0.5, window, causal

    def attend(self, q: Tensor, k: Tensor | None, v: Tensor, key_mask: Tensor | None) -> Tensor:
        b, s, h, d = q.shape
        w = min(self.window, s)
        nb = math.ceil(s / w)
        if key_mask is None:
            key_mask = torch.ones(b, s, dtype=torch.bool, device=q.device)

        def context(x: Tensor) -> Tensor:
            """(B, S, ...) -> (B, nb, 3w, ...): keys of blocks b-1, b, b+1 for each query block b."""
            x = F.pad(x.movedim(1, -1), (w, (nb + 1) * w - s))  # sequence last, one block each side
            return x.unfold(-1, 3 * w, w).movedim(-2, 1).movedim(-1, 2)

        qb = F.pad(q, (0, 0, 0, 0, 0, nb * w - s)).view(b, nb, w, h, d).permute(0, 3, 1, 2, 4)
        kb, vb = (context(x).permute(0, 3, 1, 2, 4) for x in (k, v))  # (B, H, nb, 3w, D)
        dev = q.device
        q_pos = torch.arange(nb * w, device=dev).view(nb, w, 1)
        k_pos = (torch.arange(nb, device=dev).view(nb, 1, 1) - 1) * w + torch.arange(3 * w, device=dev)
        allowed = (q_pos - k_pos).abs() <= self.window
        if self.causal:
            allowed = allowed & (k_pos <= q_pos)
        allowed = allowed & context(key_mask).unsqueeze(2)  # (B, nb, w, 3w); out-of-range keys pad to False
        out, _ = masked_softmax_attention(qb, kb, vb, allowed.unsqueeze(1), self.scale)
        return out.permute(0, 2, 3, 1, 4).reshape(b, nb * w, h, d)[:, :s]


class ReformerAttention(ApproxAttention):
    """Reformer LSH attention with shared QK (see the module docstring); k must be None."""

    shared_qk = True

    def __init__(self, head_dim: int, *, buckets: int, n_hashes: int, causal: bool) -> None:
        super().__init__()
        self.scale, self.buckets, self.n_hashes, self.causal = head_dim ** -0.5, buckets, n_hashes, causal
        self.register_buffer("rotations", torch.randn(n_hashes, head_dim, max(buckets // 2, 1)))

    def hash(self, x: Tensor) -> Tensor:
        """x (B, S, H, D) -> bucket ids (B, H, n_hashes, S): argmax over [xR, -xR] per round."""
        if self.buckets == 1:
            return torch.zeros(x.shape[0], x.shape[2], self.n_hashes, x.shape[1], dtype=torch.long,
                               device=x.device)
        rotated = torch.einsum("bshd,rdk->bhrsk", x.float(), self.rotations.float())
        return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)

    def attend(self, q: Tensor, k: Tensor | None, v: Tensor, key_mask: Tensor | None) -> Tensor:
        if self.training:
            self.rotations.normal_()
        b, s, h, d = q.shape
        chunk = math.ceil(s / self.buckets)
        n_chunks = math.ceil(s / chunk)
        padded = n_chunks * chunk
        real = torch.arange(padded, device=q.device) < s
        key_mask = real.expand(b, padded) if key_mask is None else F.pad(key_mask, (0, padded - s)) & real
        q, v = (F.pad(x, (0, 0, 0, 0, 0, padded - s)) for x in (q, v))
        keys = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6)

        # Sort every round by (bucket, position), padding last (an extra bucket), and gather
        # everything into that order.
        pos = torch.arange(padded, device=q.device)
        bucket = self.hash(q).masked_fill(~key_mask[:, None, None, :], self.buckets)
        order = (bucket * padded + pos).argsort(dim=-1)  # (B, H, R, padded)
        r = self.n_hashes

        def sort(x: Tensor) -> Tensor:  # (B, padded, H, D) -> (B, H, R, n_chunks, chunk, D)
            x = x.transpose(1, 2).unsqueeze(2).expand(b, h, r, padded, x.shape[-1])
            idx = order.unsqueeze(-1).expand(b, h, r, padded, x.shape[-1])
            return x.gather(3, idx).view(b, h, r, n_chunks, chunk, -1)

        sq, sk, sv = sort(q), sort(keys), sort(v)
        s_pos = order.view(b, h, r, n_chunks, chunk)
        s_real = key_mask[:, None, None, :].expand(b, h, r, padded).gather(3, order)
        s_real = s_real.view(b, h, r, n_chunks, chunk)

        def look_back(x: Tensor) -> Tensor:  # each chunk sees itself and the previous chunk (cyclic)
            return x if n_chunks == 1 else torch.cat([x, x.roll(1, dims=3)], dim=4)

        k_pos, k_real = look_back(s_pos), look_back(s_real)
        allowed = k_real.unsqueeze(-2).expand(*s_pos.shape, k_pos.shape[-1])
        if self.causal:
            allowed = allowed & (k_pos.unsqueeze(-2) <= s_pos.unsqueeze(-1))
        is_self = k_pos.unsqueeze(-2) == s_pos.unsqueeze(-1)
        out, lse = masked_softmax_attention(sq, look_back(sk), look_back(sv), allowed, self.scale, is_self)

        # Undo the sort, then combine the rounds weighted by each round's share of the softmax mass.
        undo = order.argsort(dim=-1)
        out = out.view(b, h, r, padded, d).gather(3, undo.unsqueeze(-1).expand(b, h, r, padded, d))
        lse = lse.view(b, h, r, padded).gather(3, undo)
        weights = torch.softmax(lse, dim=2).unsqueeze(-1).to(out.dtype)
        return (out * weights).sum(dim=2).transpose(1, 2)[:, :s]


def approx_settings(attn: str, approx: Mapping[str, Any] | None, *, causal: bool,
                    max_len: int | None) -> dict[str, int]:
    """``model.approx`` merged over APPROX_DEFAULTS and checked for ``attn``; ValueError (one line,
    naming the key and what is allowed) for an unknown key, a non-positive value or a bad combination."""
    settings = dict(APPROX_DEFAULTS)
    for key, value in (approx or {}).items():
        if key not in APPROX_DEFAULTS:
            raise ValueError(f"model.approx.{key} is unknown; choose from: {', '.join(APPROX_DEFAULTS)}")
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "redraw" else 1):
            raise ValueError(f"model.approx.{key} must be a positive integer, got {value!r}")
        settings[key] = value
    if attn == "linformer":
        if causal:
            raise ValueError("attn='linformer' projects along the sequence and cannot be causal; "
                             "use it with bidirectional models (bert)")
        if max_len is None:
            raise ValueError("attn='linformer' needs the model's max_positions (its projections' length)")
        if settings["proj_len"] > max_len:
            raise ValueError(f"model.approx.proj_len={settings['proj_len']} exceeds model.max_positions="
                             f"{max_len}; Linformer projects the sequence down, not up")
    if attn == "reformer" and settings["buckets"] > 1 and settings["buckets"] % 2:
        raise ValueError(f"model.approx.buckets must be 1 or even for attn='reformer' (angular LSH "
                         f"hashes to [xR, -xR]), got {settings['buckets']}")
    return settings


def build_approx_attention(attn: str, head_dim: int, *, causal: bool, max_len: int | None = None,
                           approx: Mapping[str, Any] | None = None) -> ApproxAttention:
    """The module for ``model.attn=attn`` with hyper-parameters from ``model.approx``."""
    cfg = approx_settings(attn, approx, causal=causal, max_len=max_len)
    if attn == "linformer":
        return LinformerAttention(head_dim, max_len=max_len, proj_len=cfg["proj_len"])
    if attn == "performer":
        return PerformerAttention(head_dim, features=cfg["features"], causal=causal, redraw=cfg["redraw"])
    if attn == "linear":
        return LinearAttention(causal=causal)
    if attn == "local":
        return LocalAttention(head_dim, window=cfg["window"], causal=causal)
    if attn == "reformer":
        return ReformerAttention(head_dim, buckets=cfg["buckets"], n_hashes=cfg["n_hashes"], causal=causal)
    raise ValueError(f"attn='{attn}' is not an approximate attention; choose from: {', '.join(APPROX_ATTNS)}")

