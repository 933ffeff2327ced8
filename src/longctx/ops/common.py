"""Small math shared by the attention backends (backends never import each other).

- the causal visibility rule (bottom-right aligned),
- the split of a packed variable-length batch into its sequences,
- the dropout RNG: a PyTorch copy of the Philox4x32-10 stream that the CUDA kernels draw from
  (kernels/philox.cuh), so every backend drops exactly the same attention elements for a seed,
- the check of packed-batch offsets (cu_seqlens), shared by attention() and the flash entry.
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and accumulators use: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_visible(rows: range, cols: range, seqlen_q: int, seqlen_k: int, device: torch.device) -> Tensor:
    """Bool (len(rows), len(cols)): may query row i attend to key column j under the causal mask?

    Bottom-right aligned (FlashAttention 2.1+): query i sees key j iff j <= i + seqlen_k - seqlen_q,
    so the last query always sees the last key; when seqlen_q > seqlen_k the first
    seqlen_q - seqlen_k queries see no key at all.
    """
    i = torch.arange(rows.start, rows.stop, device=device)
    j = torch.arange(cols.start, cols.stop, device=device)
    return j[None, :] <= i[:, None] + (seqlen_k - seqlen_q)


def sequence_spans(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor) -> list[tuple[int, slice, slice]]:
    """(b, token slice of q, token slice of k) for each sequence b of a packed varlen batch.

    Reads the int32 prefix sums (length batch + 1) back to the host, once per call.
    """
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [
        (b, slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1]))
        for b in range(len(starts_q) - 1)
    ]


def batch_head_index(batch_start: int, batch: int, num_heads_q: int, device: torch.device) -> Tensor:
    """int64 (batch, num_heads_q): the dropout stream index b * num_heads_q + h of each (b, h).

    batch_start is the index of the first sequence (nonzero when a varlen batch is processed one
    sequence at a time).
    """
    b = torch.arange(batch_start, batch_start + batch, device=device)
    h = torch.arange(num_heads_q, device=device)
    return b[:, None] * num_heads_q + h[None, :]


# --------------------------------------------------------------------------------------------
# Dropout RNG


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of the 64-bit product a * b, for a < 2**32 and int64 b in [0, 2**32).

    The full product overflows int64, so b is split into 16-bit halves: with x = a * b_lo and
    y = a * b_hi (both < 2**48), a * b = y * 2**16 + x.
    """
    x = a * (b & 0xFFFF)
    y = a * (b >> 16)
    hi = (y + (x >> 16)) >> 16
    lo = (((y & 0xFFFF) << 16) + x) & _MASK32
    return hi, lo


def philox4x32_10(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int]) -> list[Tensor]:
    """Philox4x32-10 (Salmon et al. 2011), exactly as kernels/philox.cuh, on int64 tensors.

    counter: four broadcastable int64 tensors holding 32-bit words; key: two 32-bit ints.
    Returns the four 32-bit output words (int64, broadcast shape).
    """
    x, y, z, w = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], x)
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], z)
        x, y, z, w = hi1 ^ y ^ k0, lo1, hi0 ^ w ^ k1, lo0
        k0 = (k0 + _PHILOX_WEYL[0]) & _MASK32
        k1 = (k1 + _PHILOX_WEYL[1]) & _MASK32
    return list(torch.broadcast_tensors(x, y, z, w))


def _float32(x: float) -> float:
    """x rounded to the nearest float32 (the kernels receive p_dropout as a float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def keep_threshold(p_drop: float) -> int:
    """The 32-bit threshold below which a draw keeps its element, as keep_threshold() in philox.cuh.

    The kernels evaluate keep_threshold(1.0f - p_dropout) with p_dropout a float, so the keep
    probability is rounded to float32 the same way here before scaling by 2**32.
    """
    p_keep = _float32(_float32(1.0) - _float32(p_drop))
    t = p_keep * 4294967296.0
    return _MASK32 if t >= 4294967295.0 else int(t)


def dropout_keep_mask(
    seed: int,
    offset: int,
    bh: int | Tensor,
    rows: range,
    cols: range,
    p_drop: float,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bool (*bh.shape, len(rows), len(cols)): is attention element (bh, i, j) kept by dropout?

    bh = b * num_heads_q + h (an int or an int64 tensor of such indices), rows and columns are
    counted within their own sequence. As in philox.cuh, the four consecutive columns
    4g .. 4g + 3 of a row share one Philox call with counter {g, i, bh, offset} and key
    {seed_lo, seed_hi}; column j takes output word j % 4 and is kept iff it is below
    keep_threshold(p_drop). A tile is generated whole (rows x column groups) in one vectorised call.
    The mask is made on bh's device, or on device when bh is an int.
    """
    if not isinstance(bh, Tensor):
        bh = torch.tensor(bh, dtype=torch.int64, device=device)
    first_group, end_group = cols.start // 4, (cols.stop + 3) // 4
    groups = torch.arange(first_group, end_group, dtype=torch.int64, device=bh.device)
    row_index = torch.arange(rows.start, rows.stop, dtype=torch.int64, device=bh.device)[:, None]
    counter = (groups, row_index, bh[..., None, None], torch.tensor(offset & _MASK32, device=bh.device))
    words = philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    draws = torch.stack(words, dim=-1).flatten(-2)  # (*bh, rows, 4 * groups): column 4g + word
    start = cols.start - 4 * first_group
    return draws[..., start : start + len(cols)] < keep_threshold(p_drop)


@dataclass(frozen=True)
class Dropout:
    """The dropout of one attention call: probability p and the Philox seed and offset."""

    p: float
    seed: int
    offset: int

    @classmethod
    def draw(cls, p: float) -> Dropout | None:
        """None for p == 0; else a fresh 64-bit seed from the default CPU generator, offset 0.

        Drawing from torch's default generator makes torch.manual_seed(s) reproduce a call, and
        gives every backend the same mask for the same manual seed.
        """
        if p == 0.0:
            return None
        lo, hi = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
        return cls(p=p, seed=lo | hi << 32, offset=0)

    def scaled_keep(self, bh: Tensor, rows: range, cols: range, dtype: torch.dtype) -> Tensor:
        """(*bh.shape, len(rows), len(cols)) of 1 / (1 - p) where kept and 0 where dropped."""
        keep = dropout_keep_mask(self.seed, self.offset, bh, rows, cols, self.p)
        return keep.to(dtype) / (1.0 - self.p)


# Offsets already checked: id -> (weak reference, version counter, max_seqlen, token count). A model
# passes the same cu_seqlens to every layer; reading it back to the host once per forward, not once
# per layer, keeps the layers free of device synchronisations.
_CHECKED_OFFSETS: dict[int, tuple[weakref.ref, int, int, int]] = {}


def _device_reads_allowed(x: Tensor) -> bool:
    """False while torch.compile traces or a CUDA graph captures: a device-to-host read breaks both."""
    return not (torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()))


def check_cu_seqlens(
    which: str, cu_seqlens: object, max_seqlen: int | None, x: Tensor, batch_plus_one: int
) -> None:
    """cu_seqlens_{which}: int32 1-D prefix sums of length batch + 1 (>= 2), on x's device, from 0 to
    the token count of x, no length above max_seqlen_{which}; ValueError naming what is wrong.

    The values are read back to the host once per tensor (until it is modified in place), and never
    under torch.compile tracing or CUDA graph capture, where only the layout is checked.
    """
    name = f"cu_seqlens_{which}"
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError(f"{name} must be a 1-D torch.int32 tensor of length batch + 1")
    if cu_seqlens.device != x.device:
        raise ValueError(f"{name} must be on q's device ({x.device}), got {cu_seqlens.device}")
    if cu_seqlens.numel() != batch_plus_one or batch_plus_one < 2:
        raise ValueError(
            f"{name} must have length batch + 1 (as cu_seqlens_q, at least 2), got {cu_seqlens.numel()}"
        )
    if max_seqlen is None or max_seqlen <= 0:
        raise ValueError(f"max_seqlen_{which} must be a positive int with {name}, got {max_seqlen}")
    if not _device_reads_allowed(cu_seqlens):
        return
    seen = _CHECKED_OFFSETS.get(id(cu_seqlens))
    # Inference tensors (torch.inference_mode, e.g. Lightning's validation) keep no version counter;
    # one of them changed in place inside inference mode would not be checked again.
    version = -1 if cu_seqlens.is_inference() else cu_seqlens._version
    key = (version, max_seqlen, x.shape[0])
    if seen is not None and seen[0]() is cu_seqlens and seen[1:] == key:
        return
    starts = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(starts, starts[1:])]
    if starts[0] != 0 or min(lengths) < 0:
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {starts}")
    if starts[-1] != x.shape[0]:
        raise ValueError(f"{name} must end at the total token count {x.shape[0]}, got {starts[-1]}")
    if max_seqlen < max(lengths):
        raise ValueError(f"max_seqlen_{which} must be >= the longest length {max(lengths)}, got {max_seqlen}")
    if len(_CHECKED_OFFSETS) > 64:
        _CHECKED_OFFSETS.clear()
    _CHECKED_OFFSETS[id(cu_seqlens)] = (weakref.ref(cu_seqlens), *key)
