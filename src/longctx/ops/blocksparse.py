"""Block-sparse attention masks: layout, pattern builders, a pattern-spec parser, FlexAttention interop.

A block mask is a bool tensor (B or 1, H or 1, ceil(Sq / 128), ceil(Sk / 128)): entry [b, h, i, j]
says whether query block i (rows 128 i .. 128 i + 127) of batch b and query head h may attend to key
block j. Masked blocks are never visited by the block-sparse kernels (and by the tiled reference);
the last block of an odd length is simply shorter. The mask combines with causal=True by AND: a
block mask never makes an element visible that the causal rule hides.

Pattern builders return (1, 1, nq, nk) masks that broadcast over batch and heads. For Sq != Sk they
follow the bottom-right alignment of causal attention: the "diagonal" key block of query block i is
the block holding the last key that i's last row sees under the causal rule, so a local band of
width 0 combined with causal is exactly the causal diagonal.

Pattern spec (the model config's ``attn_pattern``), a union of terms joined by "+":

    spec  := term ("+" term)*
    term  := "full"                     every block
           | "local:" W                 key blocks within W blocks of the diagonal (W >= 0)
           | "global:" G                the first G query blocks see all keys, and all queries see
                                        the first G key blocks (G >= 1)
           | "strided:" S               key blocks whose distance to the diagonal is a multiple of S
                                        (a dilated band, S >= 1)
           | "butterfly"                the flat block butterfly of the FlashAttention paper:
                                        blocks whose index differs from the diagonal's in at most one bit
           | "random:" D [":" SEED]     round(D * nq * nk) blocks drawn uniformly without replacement
                                        (0 <= D <= 1; SEED an int, default 0)

e.g. "local:2+global:1", "butterfly+random:0.1:7". Whitespace around terms is ignored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128

PATTERN_GRAMMAR = "'+'-joined terms: full, local:W, global:G, strided:S, butterfly, random:D[:SEED]"


def num_blocks(seqlen: int) -> int:
    """ceil(seqlen / BLOCK_SIZE): the number of 128-token blocks covering a sequence."""
    return -(-seqlen // BLOCK_SIZE)


def check_block_mask(
    block_mask: object, *, batch: int, heads: int, seqlen_q: int, seqlen_k: int, device: torch.device
) -> None:
    """Raise ValueError unless block_mask is a bool tensor (batch or 1, heads or 1, nq, nk) on device."""
    expected = f"(batch {batch} or 1, heads {heads} or 1, {num_blocks(seqlen_q)}, {num_blocks(seqlen_k)})"
    if not isinstance(block_mask, Tensor):
        raise ValueError(
            f"block_mask must be a torch.Tensor of shape {expected}, got {type(block_mask).__name__}"
        )
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must have dtype torch.bool, got {block_mask.dtype}")
    shape = tuple(block_mask.shape)
    fits = (
        len(shape) == 4
        and shape[0] in (1, batch)
        and shape[1] in (1, heads)
        and shape[2:] == (num_blocks(seqlen_q), num_blocks(seqlen_k))
    )
    if not fits:
        raise ValueError(
            f"block_mask must have shape {expected} (blocks of {BLOCK_SIZE} queries x {BLOCK_SIZE} keys), "
            f"got {shape}"
        )
    if block_mask.device != device:
        raise ValueError(f"block_mask must be on q's device ({device}), got {block_mask.device}")


def expand_block_mask(block_mask: Tensor, seqlen_q: int, seqlen_k: int) -> Tensor:
    """The element mask: (B|1, H|1, nq, nk) -> bool (B|1, H|1, seqlen_q, seqlen_k)."""
    rows = torch.arange(seqlen_q, device=block_mask.device) // BLOCK_SIZE
    cols = torch.arange(seqlen_k, device=block_mask.device) // BLOCK_SIZE
    return block_mask[..., rows, :][..., cols]


# --------------------------------------------------------------------------------------------
# pattern builders: each returns bool (1, 1, nq, nk)


def _diagonal(seqlen_q: int, seqlen_k: int, device: torch.device | str | None) -> Tensor:
    """int64 (nq,): the key block holding the last key each query block's last row sees causally.

    Query row r sees key c iff c <= r + seqlen_k - seqlen_q (bottom-right); may be negative when
    a whole query block sees no key.
    """
    last_row = (
        torch.clamp(torch.arange(1, num_blocks(seqlen_q) + 1, device=device) * BLOCK_SIZE, max=seqlen_q) - 1
    )
    return torch.div(last_row + seqlen_k - seqlen_q, BLOCK_SIZE, rounding_mode="floor")


def _offsets(seqlen_q: int, seqlen_k: int, device: torch.device | str | None) -> Tensor:
    """int64 (1, 1, nq, nk): key block index minus the diagonal block of the query block."""
    cols = torch.arange(num_blocks(seqlen_k), device=device)
    return (cols[None, :] - _diagonal(seqlen_q, seqlen_k, device)[:, None])[None, None]


def causal_blocks(seqlen_q: int, seqlen_k: int, device: torch.device | str | None = None) -> Tensor:
    """Blocks holding at least one element visible under the (bottom-right) causal rule."""
    return _offsets(seqlen_q, seqlen_k, device) <= 0


def full_blocks(seqlen_q: int, seqlen_k: int, device: torch.device | str | None = None) -> Tensor:
    """Every block (dense attention)."""
    return torch.ones(1, 1, num_blocks(seqlen_q), num_blocks(seqlen_k), dtype=torch.bool, device=device)


def local_blocks(
    seqlen_q: int, seqlen_k: int, width: int, device: torch.device | str | None = None
) -> Tensor:
    """A band: key blocks at most width blocks from the diagonal, on either side (2 width + 1 wide)."""
    return _offsets(seqlen_q, seqlen_k, device).abs() <= width


def global_blocks(
    seqlen_q: int, seqlen_k: int, count: int, device: torch.device | str | None = None
) -> Tensor:
    """Global blocks: query blocks < count see every key; every query sees key blocks < count."""
    rows = torch.arange(num_blocks(seqlen_q), device=device)[:, None] < count
    cols = torch.arange(num_blocks(seqlen_k), device=device)[None, :] < count
    return (rows | cols)[None, None]


def strided_blocks(
    seqlen_q: int, seqlen_k: int, stride: int, device: torch.device | str | None = None
) -> Tensor:
    """Dilated band: key blocks whose offset from the diagonal is a multiple of stride."""
    return _offsets(seqlen_q, seqlen_k, device) % stride == 0


def butterfly_blocks(seqlen_q: int, seqlen_k: int, device: torch.device | str | None = None) -> Tensor:
    """The flat block butterfly (Dao et al. 2022, Pixelated Butterfly; FlashAttention section 3.3).

    The sum of the butterfly factors I + B_1 + B_2 + ..., where factor B_s pairs block i with
    block i xor 2^s: block (i, j) is on iff i and j differ in at most one bit, with i the query
    block's diagonal key block (so the pattern follows the bottom-right alignment).
    """
    cols = torch.arange(num_blocks(seqlen_k), device=device)[None, :]
    diff = _diagonal(seqlen_q, seqlen_k, device)[:, None] ^ cols
    return ((diff >= 0) & ((diff & (diff - 1)) == 0))[None, None]


def random_blocks(
    seqlen_q: int, seqlen_k: int, density: float, seed: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """round(density * nq * nk) blocks drawn without replacement by a generator seeded with seed."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"random block density must be in [0, 1], got {density}")
    nq, nk = num_blocks(seqlen_q), num_blocks(seqlen_k)
    chosen = torch.randperm(nq * nk, generator=torch.Generator().manual_seed(seed))[
        : round(density * nq * nk)
    ]
    mask = torch.zeros(nq * nk, dtype=torch.bool)
    mask[chosen] = True
    return mask.view(1, 1, nq, nk).to(device)


def union(*masks: Tensor) -> Tensor:
    """Elementwise OR of broadcastable block masks."""
    if not masks:
        raise ValueError("union needs at least one block mask")
    out = masks[0]
    for mask in masks[1:]:
        out = out | mask
    return out


# --------------------------------------------------------------------------------------------
# pattern spec

_BUILDERS: dict[str, tuple[Callable[..., Tensor], tuple[type, ...], int]] = {
    # name: (builder, argument types, number of required arguments)
    "full": (full_blocks, (), 0),
    "local": (local_blocks, (int,), 1),
    "global": (global_blocks, (int,), 1),
    "strided": (strided_blocks, (int,), 1),
    "butterfly": (butterfly_blocks, (), 0),
    "random": (random_blocks, (float, int), 1),
}


def _check_term(name: str, args: tuple[int | float, ...], term: str) -> None:
    """Ranges of the arguments of one term."""
    bad = (
        (name == "local" and args[0] < 0)
        or (name in ("global", "strided") and args[0] < 1)
        or (name == "random" and not 0.0 <= args[0] <= 1.0)
    )
    if bad:
        raise ValueError(
            f"attn_pattern term {term!r} is out of range ({PATTERN_GRAMMAR}; W >= 0, G, S >= 1, 0 <= D <= 1)"
        )


def parse_pattern(spec: str) -> list[tuple[str, tuple[int | float, ...]]]:
    """Parse a pattern spec (grammar in the module docstring) into [(name, args), ...].

    Raises ValueError naming the offending term and the grammar.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"attn_pattern must be a non-empty string of {PATTERN_GRAMMAR}, got {spec!r}")
    terms = []
    for term in (t.strip() for t in spec.split("+")):
        name, *raw = term.split(":")
        if name not in _BUILDERS:
            raise ValueError(f"attn_pattern term {term!r} is not one of {PATTERN_GRAMMAR}")
        _, types, required = _BUILDERS[name]
        if not required <= len(raw) <= len(types):
            raise ValueError(
                f"attn_pattern term {term!r} has the wrong number of arguments ({PATTERN_GRAMMAR})"
            )
        try:
            args = tuple(kind(value) for kind, value in zip(types, raw))
        except ValueError:
            raise ValueError(
                f"attn_pattern term {term!r} has a non-numeric argument ({PATTERN_GRAMMAR})"
            ) from None
        _check_term(name, args, term)
        terms.append((name, args))
    return terms


def block_mask_from_pattern(
    spec: str, seqlen_q: int, seqlen_k: int, *, causal: bool = False, device: torch.device | str | None = None
) -> Tensor:
    """The bool (1, 1, nq, nk) block mask of a pattern spec: the union of its terms, AND the causal
    blocks when causal (so that no block lies above the diagonal)."""
    masks = [
        _BUILDERS[name][0](seqlen_q, seqlen_k, *args, device=device) for name, args in parse_pattern(spec)
    ]
    mask = union(*masks)
    return mask & causal_blocks(seqlen_q, seqlen_k, device) if causal else mask


# --------------------------------------------------------------------------------------------
# torch FlexAttention interop


def to_flex_block_mask(block_mask: Tensor, seqlen_q: int, seqlen_k: int) -> BlockMask:
    """Our (B|1, H|1, nq, nk) bool mask as a FlexAttention BlockMask with 128 x 128 blocks.

    Every nonzero block is a "full" block (no mask_mod inside it), which is what our mask means;
    combine with causal in FlexAttention through a mask_mod if needed.
    """
    batch, heads = (
        block_mask.shape[:2] if isinstance(block_mask, Tensor) and block_mask.dim() == 4 else (1, 1)
    )
    check_block_mask(
        block_mask, batch=batch, heads=heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k, device=block_mask.device
    )
    counts = block_mask.sum(dim=-1, dtype=torch.int32)  # (B, H, nq)
    # Indices of the nonzero key blocks first (in order), then the others as padding.
    indices = torch.argsort(block_mask.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(
        torch.zeros_like(counts),
        indices,
        full_kv_num_blocks=counts,
        full_kv_indices=indices,
        BLOCK_SIZE=BLOCK_SIZE,
        seq_lengths=(seqlen_q, seqlen_k),
    )


def from_flex_block_mask(flex_mask: BlockMask) -> Tensor:
    """A FlexAttention BlockMask (128 x 128 blocks) as our bool (B, H, nq, nk) mask.

    Partial and full blocks both count as visited; a partial block's mask_mod is not kept.
    """
    if tuple(flex_mask.BLOCK_SIZE) != (BLOCK_SIZE, BLOCK_SIZE):
        raise ValueError(f"flex_mask must use {BLOCK_SIZE} x {BLOCK_SIZE} blocks, got {flex_mask.BLOCK_SIZE}")
    return flex_mask.to_dense().to(torch.bool)


__all__ = [
    "BLOCK_SIZE",
    "block_mask_from_pattern",
    "butterfly_blocks",
    "causal_blocks",
    "check_block_mask",
    "expand_block_mask",
    "from_flex_block_mask",
    "full_blocks",
    "global_blocks",
    "local_blocks",
    "num_blocks",
    "parse_pattern",
    "random_blocks",
    "strided_blocks",
    "to_flex_block_mask",
    "union",
]
