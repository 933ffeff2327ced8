"""Classification heads on top of any encoder's hidden states.

One head covers single-label classification (softmax + cross-entropy over ``num_labels`` classes)
and multi-label classification (one independent sigmoid per label, binary cross-entropy with
logits); the pooling turns (batch, seqlen, n_embd) hidden states into one vector per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("cls", "mean")


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of hidden (batch, seqlen, n_embd) over the real tokens (attention_mask (batch, seqlen),
    1 = real) -> (batch, n_embd). No mask: the mean over every position. A row with no real token
    pools to zeros rather than NaN."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seqlen, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class ClassificationHead(nn.Module):
    """Pool, dropout, linear: hidden states -> logits (batch, num_labels).

    Args:
        n_embd: width of the encoder's hidden states.
        num_labels: classes (single-label) or independent labels (multi-label).
        pooling: ``"cls"``: the encoder's pooled [CLS] vector when the caller passes one
            (BERT's tanh pooler), else the first token's hidden state; ``"mean"``: the mean over
            real tokens (see :func:`masked_mean`).
        dropout: applied to the pooled vector before the classifier.
        multi_label: loss = binary cross-entropy with logits against multi-hot targets instead of
            cross-entropy against class indices.
    """

    def __init__(self, n_embd: int, num_labels: int, pooling: str = "cls", dropout: float = 0.1,
                 multi_label: bool = False) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling='{pooling}' is unknown; choose from: {', '.join(POOLINGS)}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be positive, got {num_labels}")
        self.pooling, self.multi_label = pooling, multi_label
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(n_embd, num_labels)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             pooled: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (batch, seqlen, n_embd) -> (batch, n_embd). ``pooled`` (batch, n_embd): the
        encoder's own [CLS] pooling, used by ``pooling="cls"`` when given."""
        if self.pooling == "mean":
            return masked_mean(hidden, attention_mask)
        return pooled if pooled is not None else hidden[:, 0]

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (batch, seqlen, n_embd), attention_mask (batch, seqlen) -> logits (batch, num_labels)."""
        return self.classifier(self.drop(self.pool(hidden, attention_mask, pooled)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """logits (batch, num_labels); labels: class indices (batch,) int64, or multi-hot targets
        (batch, num_labels) for multi-label. ``reduction="mean"`` averages over examples
        (single-label) or over every (example, label) pair (multi-label), as torch's losses do."""
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction=reduction)
        return F.cross_entropy(logits, labels, reduction=reduction)

    def predict(self, logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """Class indices (batch,) for single-label; a 0/1 int64 matrix (batch, num_labels) for
        multi-label, label on where sigmoid(logit) >= threshold."""
        if self.multi_label:
            return (torch.sigmoid(logits) >= threshold).long()
        return logits.argmax(dim=-1)


class PairClassificationHead(ClassificationHead):
    """LRA's two-tower head for a pair of documents (Retrieval): each document is pooled alone and
    the pair is classified from [u, v, u * v, u - v] by Linear(4 n_embd, mlp_dim) -> ReLU -> dropout
    -> Linear(mlp_dim, num_labels). ``mlp_dim`` defaults to 2 n_embd (the Nystromformer LRA setup).

    ``forward`` takes both documents' hidden states stacked along the batch: rows [0, B) are the
    first documents, rows [B, 2B) the second ones, so one encoder call serves both towers.
    """

    def __init__(self, n_embd: int, num_labels: int, pooling: str = "cls", dropout: float = 0.1,
                 multi_label: bool = False, mlp_dim: int | None = None) -> None:
        mlp_dim = mlp_dim or 2 * n_embd
        super().__init__(mlp_dim, num_labels, pooling, dropout, multi_label)
        self.dense = nn.Linear(4 * n_embd, mlp_dim)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (2B, seqlen, n_embd), attention_mask (2B, seqlen), pooled (2B, n_embd) or None ->
        logits (B, num_labels)."""
        if hidden.shape[0] % 2:
            raise ValueError(f"a pair head needs both documents stacked (2B rows), got {hidden.shape[0]}")
        u, v = self.pool(hidden, attention_mask, pooled).chunk(2)
        return self.classifier(self.drop(F.relu(self.dense(torch.cat([u, v, u * v, u - v], dim=-1)))))
