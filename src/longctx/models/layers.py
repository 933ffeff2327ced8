"""Transformer building blocks shared by the models: attention, MLP, a pre-LayerNorm block.

Activations are (batch, seqlen, n_embd). Attention heads are laid out (batch, seqlen, heads, head_dim),
the layout of ``longctx.ops.attention``, so no transpose is needed around the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longctx.ops import attention


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    ``impl`` names the attention implementation (see ``longctx.ops.attention``); the choice never
    changes the function computed, only its speed and memory.
    """

    def __init__(self, n_embd: int, n_head: int, *, dropout: float = 0.0, bias: bool = True,
                 causal: bool = True, impl: str = "auto") -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head, self.head_dim = n_head, n_embd // n_head
        self.causal, self.impl, self.dropout = causal, impl, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_head, self.head_dim).unbind(dim=2)
        y = attention(q, k, v, causal=self.causal, dropout_p=self.dropout if self.training else 0.0,
                      impl=self.impl)
        return self.resid_dropout(self.proj(y.reshape(b, s, -1)))


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
                 causal: bool = True, attn_impl: str = "auto") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, dropout=dropout, bias=bias, causal=causal, impl=attn_impl)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout=dropout, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))
