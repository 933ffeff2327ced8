"""GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm blocks, GELU MLP, tied embeddings.

The attention implementation is a config value (``attn``); everything else follows GPT-2, including
its initialisation (N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longctx.models.layers import Block
from longctx.ops.cross_entropy import cross_entropy


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    max_positions: int = 1024
    dropout: float = 0.0
    bias: bool = True
    attn: str = "auto"
    attn_pattern: str | None = None  # attn="blocksparse" only: a spec of longctx.ops.blocksparse

    @property
    def padded_vocab_size(self) -> int:
        """The embedding's row count, rounded up to a multiple of 64 for fast matmuls; the extra rows
        are never targets and their logits are cut off before the loss."""
        return math.ceil(self.vocab_size / 64) * 64


class GPT2(nn.Module):
    """``activation_checkpointing = True`` (trainer.activation_checkpointing) keeps only each block's
    input during training and recomputes the block in the backward: activation memory of one block
    instead of all, for about a third more compute."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.max_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config.n_embd, config.n_head, dropout=config.dropout, bias=config.bias, causal=True,
                  attn_impl=config.attn, attn_pattern=config.attn_pattern)
            for _ in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (batch, seqlen) token ids -> logits (batch, seqlen, vocab_size)."""
        seqlen = idx.shape[1]
        if seqlen > self.config.max_positions:
            raise ValueError(f"sequence length {seqlen} exceeds max_positions={self.config.max_positions}")
        pos = torch.arange(seqlen, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied with the token embedding
        return logits[..., : self.config.vocab_size]

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy in fp32; targets (batch, seqlen)."""
        logits = self(idx)
        return cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
