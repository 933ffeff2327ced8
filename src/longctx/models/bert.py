"""BERT (Devlin et al. 2019): token + position + segment embeddings, post-LayerNorm blocks, exact GELU.

Blocks compute x = LN(x + attn(x)), then x = LN(x + mlp(x)), as the original BERT (not GPT-2's
pre-LayerNorm). ``BertConfig.norm_position="pre"`` gives instead the encoder of the Nystromformer
LRA reproduction (Xiong et al. 2021): no LayerNorm on the embeddings, blocks x = x + attn(LN(x)),
x = x + mlp(LN(x)), and a final LayerNorm after the last block.

With an ``attention_mask`` the forward is padding-free: the real tokens are packed into one
(total_tokens, n_embd) tensor, every layer (attention through the varlen path of
``longctx.ops.attention``) runs on them only, and the result is scattered back to (batch, seqlen).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longctx.config import NORM_POSITIONS  # BertConfig.norm_position
from longctx.models.layers import SelfAttention


@dataclass
class BertConfig:
    """BERT-base by default. ``attn`` is a ``longctx.ops.attention`` impl; the padding-free forward
    (an attention_mask given) needs one with varlen support: auto, flash, reference or standard.

    ``positions_skip_padding``: False (BERT) numbers a token by its index in the padded row; True
    (RoBERTa) counts only the real tokens before it, so a left-padded row starts at position 0.
    The two agree on right-padded and unpadded batches.

    ``norm_position``: "post" (BERT: LayerNorm after each residual sum, and on the embeddings) or
    "pre" (LayerNorm at the input of each sublayer and once after the last block; none on the
    embeddings, as the Nystromformer LRA encoder). Hugging Face BERT/RoBERTa are post-LN."""

    vocab_size: int = 30522
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    attn: str = "auto"
    approx: dict | None = None  # attn in longctx.models.approx: its hyper-parameters (model.approx)
    attn_pattern: str | None = None  # attn="blocksparse" only: a spec of longctx.ops.blocksparse
    positions_skip_padding: bool = False
    norm_position: str = "post"

    def __post_init__(self) -> None:
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {list(NORM_POSITIONS)}, "
                             f"got {self.norm_position!r}")


class BertBlock(nn.Module):
    """Encoder block. Post-LayerNorm (BERT): x = LN(x + attn(x)); x = LN(x + fc2(gelu_erf(fc1(x)))).
    Pre-LayerNorm: x = x + attn(LN(x)); x = x + fc2(gelu_erf(fc1(LN(x)))). Both drop out the output
    of each sublayer (attn's inside SelfAttention)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config.n_embd, config.n_head, dropout=config.dropout, causal=False,
                                  impl=config.attn, approx=config.approx, max_positions=config.max_positions,
                                  attn_pattern=config.attn_pattern)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.fc = nn.Linear(config.n_embd, config.intermediate_size)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.pre_norm = config.norm_position == "pre"

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        """x: (batch, seqlen, n_embd), or packed (total_tokens, n_embd) with cu_seqlens/max_seqlen."""
        if self.pre_norm:
            x = x + self.attn(self.ln_1(x), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            return x + self._mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen))
        return self.ln_2(x + self._mlp(x))


class Bert(nn.Module):
    """BERT encoder with its pooler (tanh on [CLS]) and masked-LM head (decoder tied to ``wte``).

    ``forward`` returns the last hidden states; ``pool`` and ``mlm_logits`` apply the heads to them.
    Positions start at 0 (see ``BertConfig.positions_skip_padding``); RoBERTa's offset of
    padding_idx + 1 is folded into the weights when loading (see ``longctx.models.hf``).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.max_positions, config.n_embd)
        self.wtt = nn.Embedding(config.type_vocab_size, config.n_embd)
        # Post-LN normalises the embeddings and each block's output; pre-LN normalises each sublayer's
        # input and, once, the last block's output (ln_f), so the heads see normalised features.
        # Identity has no parameters: a post-LN state dict is the same as before pre-LN existed.
        pre = config.norm_position == "pre"
        norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.ln_emb = nn.Identity() if pre else norm
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(BertBlock(config) for _ in range(config.n_layer))
        self.ln_f = norm if pre else nn.Identity()
        self.pooler = nn.Linear(config.n_embd, config.n_embd)
        self.mlm_dense = nn.Linear(config.n_embd, config.n_embd)
        self.mlm_ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor,
               token_type_ids: torch.Tensor) -> torch.Tensor:
        """Ids, positions and segments of equal shape (...) -> LN(sum of embeddings), (..., n_embd);
        pre-LN: the sum itself."""
        return self.drop(self.ln_emb(self.wte(input_ids) + self.wpe(positions) + self.wtt(token_type_ids)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (1 = real token), token_type_ids: (batch, seqlen) ->
        hidden states (batch, seqlen, n_embd); rows at padding (mask 0) are zero."""
        b, s = input_ids.shape
        if s > self.config.max_positions:
            raise ValueError(f"sequence length {s} exceeds max_positions={self.config.max_positions}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is not None and self.config.positions_skip_padding:
            positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
        else:
            positions = torch.arange(s, device=input_ids.device).expand(b, s)
        if attention_mask is None:
            x = self._embed(input_ids, positions, token_type_ids)
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x)
        # Padding-free path: pack the real tokens, run on them only, scatter back.
        mask = attention_mask.bool()
        keep = mask.flatten().nonzero().squeeze(1)  # (total_tokens,) flat indices of real tokens
        lengths = mask.sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        max_seqlen = int(lengths.max())
        x = self._embed(input_ids.flatten()[keep], positions.flatten()[keep], token_type_ids.flatten()[keep])
        for block in self.blocks:
            x = block(x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        out = x.new_zeros(b * s, x.shape[-1])
        out[keep] = self.ln_f(x)
        return out.view(b, s, -1)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (batch, seqlen, n_embd) -> tanh(W h_[CLS] + b), (batch, n_embd)."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., n_embd) -> masked-LM logits (..., vocab_size), decoder tied to wte."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(hidden)))
        return F.linear(h, self.wte.weight, self.mlm_bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

