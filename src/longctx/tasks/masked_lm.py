"""Masked language modelling (BERT): cross-entropy on the masked positions, AdamW + warmup/cosine.

Batches are dicts of int64 (batch, seqlen) tensors: input_ids, attention_mask (1 = real token, so
BERT's padding-free path skips pads), token_type_ids and labels (the original id at the positions
chosen for prediction, -100 elsewhere; see longctx.data.mlm). The MLM head runs on the labeled
positions only. Validation loss, perplexity and masked-token accuracy are summed over every
labeled token of the split and divided once, so a short last batch is weighted correctly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from longctx.models import build_model
from longctx.ops.cross_entropy import cross_entropy
from longctx.tasks.base import Task


def mlm_loss_sums(model: torch.nn.Module,
                  batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed cross-entropy over labeled positions, number of them correctly predicted by argmax,
    number of labeled positions) for one batch of (batch, seqlen) tensors."""
    hidden = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    labeled = batch["labels"] != -100  # (batch, seqlen)
    targets = batch["labels"][labeled]  # (M,)
    logits = model.mlm_logits(hidden[labeled])  # (M, vocab)
    loss_sum = cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return loss_sum, correct, targets.numel()


class MaskedLM(Task):
    """The BERT of ``config['model']`` trained on masked-token prediction with the optimiser of
    ``config['task']``. The whole run config travels in every checkpoint, so eval.py needs only the file."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.model = build_model(config["model"])
        self._sums = [0.0, 0, 0]  # loss sum, correct, labeled tokens

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """MLM logits (batch, seqlen, vocab) for every position."""
        hidden = self.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return self.model.mlm_logits(hidden)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, _, count = mlm_loss_sums(self.model, batch)
        loss = loss_sum / max(count, 1)  # a batch without labels gives 0, not NaN
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._sums = [0.0, 0, 0]

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(batch)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(batch)

    def _accumulate(self, batch: Mapping[str, torch.Tensor]) -> None:
        loss_sum, correct, count = mlm_loss_sums(self.model, batch)
        self._sums[0] += loss_sum.item()
        self._sums[1] += int(correct)
        self._sums[2] += count

    def _log_eval(self, split: str) -> None:
        totals = torch.tensor([float(s) for s in self._sums], dtype=torch.float64, device=self.device)
        totals = self.summed_over_ranks(totals)
        count = totals[2].clamp_min(1)
        loss = (totals[0] / count).item()
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{split}/ppl", math.exp(min(loss, 50.0)), prog_bar=True, sync_dist=False)
        self.log(f"{split}/accuracy", (totals[1] / count).item(), prog_bar=True, sync_dist=False)
