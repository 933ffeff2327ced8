"""Attention backends written in plain PyTorch; they run on CPU and CUDA.

- standard_attention: materialises the (Sq, Sk) score matrix (the FlashAttention paper's
  baseline) with differentiable torch ops. It is the readable correctness oracle.
- reference_attention: the FlashAttention algorithm itself (Dao et al. 2022, Algorithms 2 and 4,
  with FlashAttention-2's loop order), tile by tile with an online softmax. It saves only q, k, v,
  out, lse and the dropout seed, and recomputes the scores tile by tile in the backward, so its
  extra memory is linear in the sequence length. The CUDA kernels are checked against it.
- sdpa_attention: torch's scaled_dot_product_attention behind the same interface, for comparison.

Every backend takes the keyword arguments that longctx.ops.attention validated, with
softmax_scale already resolved to a float. Layouts: q (B, Sq, Hq, D), k and v (B, Sk, Hk, D), or
packed varlen q (total_q, Hq, D), k and v (total_k, Hk, D) with int32 cu_seqlens. Query head h
reads key/value head h // (Hq // Hk). The log-sum-exp is in natural log, fp32 for fp16/bf16/fp32
inputs and fp64 for fp64 inputs, shaped (B, Hq, Sq) or (Hq, total_q) for varlen; rows that see no
key give output 0 and lse -inf.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from longctx.ops.blocksparse import BLOCK_SIZE, expand_block_mask
from longctx.ops.common import (
    Dropout,
    batch_head_index,
    causal_visible,
    compute_dtype,
    sequence_spans,
)

BLOCK_Q = 128
BLOCK_K = 128


def _split_heads(x: Tensor, num_kv_heads: int) -> Tensor:
    """View (B, S, H, D) as (B, Hk, H // Hk, S, D): head h = hk * (H // Hk) + g sits at [:, hk, g].

    Applied to k or v (H == Hk) it gives (B, Hk, 1, S, D), which broadcasts over a query group.
    """
    b, s, h, d = x.shape
    return x.view(b, s, num_kv_heads, h // num_kv_heads, d).permute(0, 2, 3, 1, 4)


def _no_key_rows_to_zero(m: Tensor) -> Tensor:
    """Row maxima/LSEs with -inf (a row that sees no key yet) replaced by 0, so exp(s - m) is 0."""
    return m.masked_fill(m == -math.inf, 0.0)


# --------------------------------------------------------------------------------------------
# standard attention


def _standard_one_batch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    batch_start: int,
    causal: bool,
    scale: float,
    dropout: Dropout | None,
    block_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Padded batch: q (B, Sq, Hq, D), k and v (B, Sk, Hk, D) -> out like q, lse (B, Hq, Sq).

    block_mask (B|1, Hq|1, ceil(Sq / 128), ceil(Sk / 128)) is expanded to elements: masked blocks at -inf.
    """
    (_, seqlen_q, num_heads_q, _), (_, seqlen_k, num_heads_k, _) = q.shape, k.shape
    dtype = compute_dtype(q.dtype)
    group = num_heads_q // num_heads_k
    qh = q.to(dtype).transpose(1, 2)  # (B, Hq, Sq, D)
    kh = k.to(dtype).repeat_interleave(group, dim=2).transpose(1, 2)  # (B, Hq, Sk, D)
    vh = v.to(dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if causal:
        visible = causal_visible(range(seqlen_q), range(seqlen_k), seqlen_q, seqlen_k, q.device)
    else:
        visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if block_mask is not None:
        visible = visible & expand_block_mask(block_mask, seqlen_q, seqlen_k)  # (B|1, Hq|1, Sq, Sk)
    has_key = visible.any(dim=-1, keepdim=True)  # (Sq, 1) or (B|1, Hq|1, Sq, 1)
    # Rows without a visible key keep their (finite) scores through the softmax and are zeroed after,
    # so that neither the output nor the gradient ever sees -inf - (-inf).
    scores = scores.masked_fill(~(visible | ~has_key), -math.inf)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse) * has_key
    if dropout is not None:
        bh = batch_head_index(batch_start, q.shape[0], num_heads_q, q.device)
        probs = probs * dropout.scaled_keep(bh, range(seqlen_q), range(seqlen_k), dtype)
    out = (probs @ vh).transpose(1, 2).to(q.dtype)
    return out, lse.squeeze(-1).masked_fill(~has_key.squeeze(-1), -math.inf)


def standard_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    deterministic: bool,
    return_lse: bool,
    block_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + mask) v with the (Sq, Sk) matrix in memory; O(N^2) memory.

    Varlen batches run one sequence at a time. max_seqlen_* and deterministic are unused.
    block_mask: bool (B|1, Hq|1, ceil(Sq / 128), ceil(Sk / 128)); varlen: per sequence, in its own
    coordinates, of ceil(max_seqlen / 128) blocks.
    """
    dropout = Dropout.draw(dropout_p)
    options = {"causal": causal, "scale": softmax_scale, "dropout": dropout}
    if cu_seqlens_q is None:
        out, lse = _standard_one_batch(q, k, v, batch_start=0, block_mask=block_mask, **options)
    else:
        pieces = [
            _standard_one_batch(q[sq][None], k[sk][None], v[sk][None], batch_start=b,
                                block_mask=sequence_block_mask(block_mask, b), **options)
            for b, sq, sk in sequence_spans(cu_seqlens_q, cu_seqlens_k)
        ]
        out = torch.cat([o[0] for o, _ in pieces], dim=0)  # (total_q, Hq, D)
        lse = torch.cat([lse[0] for _, lse in pieces], dim=1)  # (Hq, total_q)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# reference (tiled FlashAttention)


def _tiles(start: int, stop: int, size: int) -> list[range]:
    """[start, stop) cut into ranges of size (the last one shorter)."""
    return [range(i, min(i + size, stop)) for i in range(start, stop, size)]


def _block_span(r: range) -> slice:
    """The block-mask blocks (of BLOCK_SIZE) that the index range r overlaps."""
    return slice(r.start // BLOCK_SIZE, (r.stop - 1) // BLOCK_SIZE + 1)


def _block_of(r: range, device: torch.device) -> Tensor:
    """int64 (len(r),): the block of each index of r, counted from the first block r overlaps."""
    return torch.arange(r.start, r.stop, device=device) // BLOCK_SIZE - r.start // BLOCK_SIZE


class _Tiling:
    """The tile loops shared by forward and backward for one padded batch of sequences.

    Query row i sees key column j iff not causal or j <= i + shift, shift = seqlen_k - seqlen_q
    (bottom-right alignment). Tiles above the diagonal are skipped; tiles on it are masked.

    With a block mask, grouped as (B|1, Hk|1, G|1, nq, nk) over BLOCK_SIZE x BLOCK_SIZE blocks, a tile
    is visited only if some of the blocks it overlaps are on for some batch and head, and is masked
    elementwise unless all of them are on. Tiles of any size work; with the default 128 x 128 tiles
    each tile is exactly one block, so the work follows the mask's density.
    """

    def __init__(
        self,
        seqlen_q: int,
        seqlen_k: int,
        causal: bool,
        block_q: int,
        block_k: int,
        block_mask: Tensor | None = None,
    ) -> None:
        self.seqlen_q, self.seqlen_k, self.causal = seqlen_q, seqlen_k, causal
        self.block_q, self.block_k = block_q, block_k
        self.shift = seqlen_k - seqlen_q
        self.block_mask = block_mask

    def row_tiles(self, first_row: int = 0) -> list[range]:
        """Query tiles of the grid from the one holding first_row on."""
        return _tiles(first_row // self.block_q * self.block_q, self.seqlen_q, self.block_q)

    def col_tiles(self, rows: range) -> list[range]:
        """Key tiles up to the last key visible to some query of rows."""
        end = min(self.seqlen_k, rows.stop + self.shift) if self.causal else self.seqlen_k
        return _tiles(0, end, self.block_k)

    def first_row_seeing(self, cols: range) -> int:
        """The first query row that sees any key of cols (rows before it are skipped)."""
        return max(0, cols.start - self.shift) if self.causal else 0

    def _blocks(self, rows: range, cols: range) -> Tensor:
        """The block mask's blocks overlapping the tile: bool (B|1, Hk|1, G|1, nrow_blocks, ncol_blocks)."""
        return self.block_mask[..., _block_span(rows), _block_span(cols)]

    def visits(self, rows: range, cols: range) -> bool:
        """Whether the tile overlaps a block that is on for some batch and head (always without a mask)."""
        return self.block_mask is None or bool(self._blocks(rows, cols).any())

    def mask(self, rows: range, cols: range, device: torch.device) -> Tensor | None:
        """Bool (len(rows), len(cols)), or (B|1, Hk|1, G|1, len(rows), len(cols)) with a block mask, of
        visible pairs; None when the whole tile is visible."""
        visible = None
        if self.causal and cols.stop - 1 > rows.start + self.shift:
            visible = causal_visible(rows, cols, self.seqlen_q, self.seqlen_k, device)
        if self.block_mask is not None:
            blocks = self._blocks(rows, cols)
            if not bool(blocks.all()):
                elements = blocks[..., _block_of(rows, device), :][..., _block_of(cols, device)]
                visible = elements if visible is None else visible & elements
        return visible


def _tile_scores(qs: Tensor, kt: Tensor, mask: Tensor | None) -> Tensor:
    """Scores of a tile: qs (.., Tq, D) already scaled, kt (.., Tk, D) -> (.., Tq, Tk), -inf if hidden."""
    scores = qs @ kt.transpose(-1, -2)
    return scores if mask is None else scores.masked_fill(~mask, -math.inf)


def _reference_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    batch_start: int,
    tiling: _Tiling,
    scale: float,
    dropout: Dropout | None,
) -> None:
    """Fills out (B, Sq, Hq, D) and lse (B, Hq, Sq) from q (B, Sq, Hq, D), k and v (B, Sk, Hk, D).

    For each query tile, the key tiles stream through an online softmax: m is the running row
    maximum, l the running sum of exp(s - m), acc the running unnormalised output; each new tile
    rescales them by exp(m_old - m_new). Nothing of size Sq x Sk exists at any time.
    """
    batch, _, num_heads_q, head_dim = q.shape
    num_heads_k = k.shape[2]
    dtype = compute_dtype(q.dtype)
    qh, kh, vh = _split_heads(q, num_heads_k), _split_heads(k, num_heads_k), _split_heads(v, num_heads_k)
    out_h = _split_heads(out, num_heads_k)
    lse_h = lse.view(batch, num_heads_k, num_heads_q // num_heads_k, q.shape[1])  # (B, Hk, G, Sq)
    bh = batch_head_index(batch_start, batch, num_heads_q, q.device).view(lse_h.shape[:-1])
    for rows in tiling.row_tiles():
        qs = qh[..., rows.start : rows.stop, :].to(dtype) * scale  # (B, Hk, G, Tq, D)
        m = torch.full(qs.shape[:-1], -math.inf, dtype=dtype, device=q.device)  # (B, Hk, G, Tq)
        row_sum = torch.zeros_like(m)
        acc = torch.zeros(*qs.shape[:-1], head_dim, dtype=dtype, device=q.device)
        for cols in tiling.col_tiles(rows):
            if not tiling.visits(rows, cols):
                continue
            kt = kh[..., cols.start : cols.stop, :].to(dtype)  # (B, Hk, 1, Tk, D)
            vt = vh[..., cols.start : cols.stop, :].to(dtype)
            scores = _tile_scores(qs, kt, tiling.mask(rows, cols, q.device))
            m_new = torch.maximum(m, scores.amax(dim=-1))
            m_safe = _no_key_rows_to_zero(m_new)
            probs = torch.exp(scores - m_safe[..., None])
            rescale = torch.exp(m - m_safe)
            row_sum = row_sum * rescale + probs.sum(dim=-1)
            if dropout is not None:  # dropped after the sum: lse is of the undropped softmax
                probs = probs * dropout.scaled_keep(bh, rows, cols, dtype)
            acc = acc * rescale[..., None] + probs @ vt
            m = m_new
        out_h[..., rows.start : rows.stop, :] = acc / torch.where(row_sum == 0, 1.0, row_sum)[..., None]
        lse_h[..., rows.start : rows.stop] = _no_key_rows_to_zero(m) + torch.log(row_sum)


def _reference_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    lse: Tensor,
    delta: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    *,
    batch_start: int,
    tiling: _Tiling,
    scale: float,
    dropout: Dropout | None,
) -> None:
    """Fills dq (fp32/fp64 accumulator like q), dk and dv (like k) for one padded batch.

    lse and delta are (B, Hq, Sq). Recomputes P = exp(s - lse) per tile; with the precomputed
    delta = rowsum(dO * O), dS = P * (dP - delta) needs no reduction over the full key range
    (FlashAttention Algorithm 4). Outer loop over key tiles (dK, dV finished per tile), inner
    over query tiles (dQ accumulated).
    """
    batch, seqlen_q, num_heads_q, _ = q.shape
    num_heads_k = k.shape[2]
    dtype = compute_dtype(q.dtype)
    qh, kh, vh, dout_h, dq_h, dk_h, dv_h = [_split_heads(x, num_heads_k) for x in (q, k, v, dout, dq, dk, dv)]
    by_group = (batch, num_heads_k, num_heads_q // num_heads_k, seqlen_q)
    lse_h = _no_key_rows_to_zero(lse.reshape(by_group))
    delta = delta.reshape(by_group)
    bh = batch_head_index(batch_start, batch, num_heads_q, q.device).view(by_group[:-1])
    for cols in tiling.col_tiles(range(tiling.seqlen_q)):
        kt = kh[..., cols.start : cols.stop, :].to(dtype)  # (B, Hk, 1, Tk, D)
        vt = vh[..., cols.start : cols.stop, :].to(dtype)
        dk_acc, dv_acc = torch.zeros_like(kt), torch.zeros_like(vt)
        for rows in tiling.row_tiles(tiling.first_row_seeing(cols)):
            if not tiling.visits(rows, cols):
                continue
            qs = qh[..., rows.start : rows.stop, :].to(dtype) * scale  # (B, Hk, G, Tq, D)
            dot = dout_h[..., rows.start : rows.stop, :].to(dtype)
            scores = _tile_scores(qs, kt, tiling.mask(rows, cols, q.device))
            probs = torch.exp(scores - lse_h[..., rows.start : rows.stop, None])  # (B, Hk, G, Tq, Tk)
            keep = None if dropout is None else dropout.scaled_keep(bh, rows, cols, dtype)
            dropped = probs if keep is None else probs * keep  # what the forward multiplied v by
            dv_acc += (dropped.transpose(-1, -2) @ dot).sum(dim=2, keepdim=True)  # summed over the group
            dprobs = dot @ vt.transpose(-1, -2)
            if keep is not None:
                dprobs = dprobs * keep
            dscores = probs * (dprobs - delta[..., rows.start : rows.stop, None])
            dq_h[..., rows.start : rows.stop, :] += (dscores @ kt) * scale
            dk_acc += (dscores.transpose(-1, -2) @ qs).sum(dim=2, keepdim=True)
        dk_h[..., cols.start : cols.stop, :] = dk_acc
        dv_h[..., cols.start : cols.stop, :] = dv_acc


def _batches(
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    by_q: list[Tensor],
    by_k: list[Tensor],
    lses: list[Tensor],
) -> list[tuple[int, list[Tensor], list[Tensor], list[Tensor]]]:
    """Padded: one batch of all sequences. Varlen: one batch of one sequence per entry.

    by_q are laid out like q, by_k like k, lses like lse; each comes back as a padded-layout view
    (a leading batch dim of 1 for varlen) so the tile loops handle both layouts.
    """
    if cu_seqlens_q is None:
        return [(0, by_q, by_k, lses)]
    return [
        (b, [x[sq][None] for x in by_q], [x[sk][None] for x in by_k], [x[:, sq][None] for x in lses])
        for b, sq, sk in sequence_spans(cu_seqlens_q, cu_seqlens_k)
    ]


def sequence_block_mask(block_mask: Tensor | None, b: int) -> Tensor | None:
    """Sequence b's mask (1, H|1, nq, nk) of a varlen batch's (B|1, H|1, nq, nk) block mask."""
    if block_mask is None or block_mask.shape[0] == 1:
        return block_mask
    return block_mask[b : b + 1]


def _group_block_mask(block_mask: Tensor | None, num_heads_k: int) -> Tensor | None:
    """(B|1, Hq|1, nq, nk) -> (B|1, Hk|1, G|1, nq, nk), the head layout of _split_heads."""
    if block_mask is None:
        return None
    batch, heads, nq, nk = block_mask.shape
    if heads == 1:
        return block_mask[:, :, None]
    return block_mask.view(batch, num_heads_k, heads // num_heads_k, nq, nk)


class _ReferenceAttention(torch.autograd.Function):
    """Tiled FlashAttention forward and backward; saves q, k, v, out, lse and the dropout seed."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens_q: Tensor | None,
        cu_seqlens_k: Tensor | None,
        causal: bool,
        scale: float,
        dropout: Dropout | None,
        block_q: int,
        block_k: int,
        block_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        out = torch.empty_like(q)
        lse_shape = (*q.shape[:-3], q.shape[-2], q.shape[-3])  # (B, Hq, Sq) or varlen (Hq, total_q)
        lse = torch.empty(lse_shape, dtype=compute_dtype(q.dtype), device=q.device)
        ctx.tiling = (causal, block_q, block_k, _group_block_mask(block_mask, k.shape[-2]))
        ctx.numerics = {"scale": scale, "dropout": dropout}
        ctx.varlen = cu_seqlens_q is not None
        for b, (qb, outb), (kb, vb), (lseb,) in _batches(cu_seqlens_q, cu_seqlens_k, [q, out], [k, v], [lse]):
            tiling = _ReferenceAttention.tiling_of(ctx, b, qb.shape[1], kb.shape[1])
            _reference_forward(qb, kb, vb, outb, lseb, batch_start=b, tiling=tiling, **ctx.numerics)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def tiling_of(ctx: torch.autograd.function.FunctionCtx, b: int, seqlen_q: int, seqlen_k: int) -> _Tiling:
        """The tiling of batch entry b (a whole padded batch, or sequence b of a varlen one)."""
        causal, block_q, block_k, block_mask = ctx.tiling
        if ctx.varlen:
            block_mask = sequence_block_mask(block_mask, b)
        return _Tiling(seqlen_q, seqlen_k, causal, block_q, block_k, block_mask)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, dout: Tensor | None, dlse: Tensor | None) -> tuple:
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dtype = compute_dtype(q.dtype)
        dout = torch.zeros_like(out) if dout is None else dout
        # delta = rowsum(dO * O), laid out like lse. A gradient dlse into the returned lse adds
        # P * dlse to dS (d lse / d s = P), which is the same as subtracting dlse from delta.
        delta = (dout.to(dtype) * out.to(dtype)).sum(dim=-1).movedim(-1, -2)
        if dlse is not None:
            delta = delta - dlse
        dq = torch.zeros_like(q, dtype=dtype)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        for b, (qb, doutb, dqb), (kb, vb, dkb, dvb), (lseb, deltab) in _batches(
            cu_seqlens_q, cu_seqlens_k, [q, dout, dq], [k, v, dk, dv], [lse, delta]
        ):
            tiling = _ReferenceAttention.tiling_of(ctx, b, qb.shape[1], kb.shape[1])
            _reference_backward(
                qb, kb, vb, doutb, lseb, deltab, dqb, dkb, dvb, batch_start=b, tiling=tiling, **ctx.numerics
            )
        return dq.to(q.dtype), dk, dv, *([None] * 8)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    deterministic: bool,
    return_lse: bool,
    block_mask: Tensor | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> Tensor | tuple[Tensor, Tensor]:
    """FlashAttention in PyTorch: tiles of block_q queries x block_k keys, O(N) extra memory.

    Same results as standard_attention (to rounding) and the same dropout mask for the same
    torch.manual_seed. max_seqlen_* and deterministic are unused (the loops are deterministic).
    block_mask: bool (B|1, Hq|1, ceil(Sq / 128), ceil(Sk / 128)) (varlen: per sequence, in its own
    coordinates, of ceil(max_seqlen / 128) blocks); tiles overlapping no nonzero block are skipped in
    the forward and the backward.
    """
    dropout = Dropout.draw(dropout_p)
    out, lse = _ReferenceAttention.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, dropout, block_q, block_k, block_mask
    )
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# sdpa (torch's kernels), for comparison


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    dropout_p: float,
    softmax_scale: float,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    deterministic: bool,
    return_lse: bool,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention on a padded batch.

    Padded layouts only and no lse (attention() rejects the rest). Causal is passed as an explicit
    bottom-right mask (sdpa's own is_causal is top-left aligned). Dropout uses torch's RNG, not the
    Philox stream, so its mask differs from the other backends'.
    """
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    mask = causal_visible(range(seqlen_q), range(seqlen_k), seqlen_q, seqlen_k, q.device) if causal else None
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(group, dim=2).transpose(1, 2),
        v.repeat_interleave(group, dim=2).transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        scale=softmax_scale,
    )
    return out.transpose(1, 2)
