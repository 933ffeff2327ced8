"""Transformer building blocks shared by the models: attention, MLP, a pre-LayerNorm block.

Activations are (batch, seqlen, n_embd). Attention heads are laid out (batch, seqlen, heads, head_dim),
the layout of ``longctx.ops.attention``, so no transpose is needed around the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longctx.models.approx import APPROX_ATTNS, build_approx_attention
from longctx.ops import attention
from longctx.ops.blocksparse import block_mask_from_pattern, parse_pattern

# The implementation that runs block-sparse attention (attn="blocksparse"): the flash kernels on CUDA
# in fp16/bf16, else the tiled reference; both skip the dropped blocks.
BLOCKSPARSE_IMPL = "auto"


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    ``impl`` names the attention implementation (see ``longctx.ops.attention``); the choice never
    changes the function computed, only its speed and memory. ``impl="blocksparse"`` is the
    exception: it restricts attention to the blocks of ``attn_pattern`` (a pattern spec, see
    ``longctx.ops.blocksparse``), whose block mask is built once per sequence length. The
    approximate attentions of ``longctx.models.approx`` (``impl`` in APPROX_ATTNS: linformer,
    performer, linear, local, reformer) change the function too; ``approx`` holds their
    hyper-parameters (``model.approx``) and ``max_positions`` is Linformer's projection length.
    Reformer shares queries and keys, so its fused projection makes q and v only.
    """

    def __init__(self, n_embd: int, n_head: int, *, dropout: float = 0.0, bias: bool = True,
                 causal: bool = True, impl: str = "auto", attn_pattern: str | None = None,
                 approx: dict | None = None, max_positions: int | None = None) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        if (impl == "blocksparse") != (attn_pattern is not None):
            raise ValueError(f"attn_pattern must be given exactly when attn='blocksparse', got attn={impl!r} "
                             f"and attn_pattern={attn_pattern!r}")
        if attn_pattern is not None:
            parse_pattern(attn_pattern)  # a bad spec fails at construction, not at the first step
            impl = BLOCKSPARSE_IMPL
        self.attn_pattern = attn_pattern
        self._block_masks: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.causal, self.impl, self.dropout = causal, impl, dropout
        self.approx = (build_approx_attention(impl, self.head_dim, causal=causal, max_len=max_positions,
                                              approx=approx) if impl in APPROX_ATTNS else None)
        n_proj = 2 if self.approx is not None and self.approx.shared_qk else 3
        self.qkv = nn.Linear(n_embd, n_proj * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        """x: (batch, seqlen, n_embd), or packed (total_tokens, n_embd) with int32 ``cu_seqlens``
        (batch + 1,) and ``max_seqlen`` (sequences attend only within themselves) -> x's shape."""
        lead = x.shape[:-1]
        qkv = self.qkv(x).view(*lead, -1, self.n_head, self.head_dim).unbind(dim=-3)
        if self.approx is not None:
            q, k, v = qkv if len(qkv) == 3 else (qkv[0], None, qkv[1])
            y = self.approx(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        else:
            q, k, v = qkv
            y = attention(q, k, v, causal=self.causal, dropout_p=self.dropout if self.training else 0.0,
                          cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                          max_seqlen_k=max_seqlen, block_mask=self._block_mask(x, max_seqlen), impl=self.impl)
        return self.resid_dropout(self.proj(y.reshape(*lead, -1)))

    def _block_mask(self, x: torch.Tensor, max_seqlen: int | None) -> torch.Tensor | None:
        """attn_pattern's bool (1, 1, ceil(S / 128), ceil(S / 128)) block mask for x (B, S, n_embd), or
        for a packed batch S = max_seqlen (each sequence uses the mask's top-left corner, in its own
        coordinates); cached per (S, device); None without a pattern."""
        if self.attn_pattern is None:
            return None
        seqlen = max_seqlen if max_seqlen is not None else x.shape[1]
        key = (seqlen, x.device)
        if key not in self._block_masks:
            self._block_masks[key] = block_mask_from_pattern(
                self.attn_pattern, seqlen, seqlen, causal=self.causal, device=x.device)
        return self._block_masks[key]


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(4x) -> GELU (tanh approximation, as GPT-2) -> Linear."""

    def __init__(self, n_embd: int, *, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, *, dropout: float = 0.0, bias: bool = True,
                 causal: bool = True, attn_impl: str = "auto", attn_pattern: str | None = None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, dropout=dropout, bias=bias, causal=causal, impl=attn_impl,
                                  attn_pattern=attn_pattern)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout=dropout, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))
