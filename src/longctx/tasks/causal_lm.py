"""Causal language modelling: next-token cross-entropy, AdamW with GPT-2's decay groups, warmup + cosine.

Batches are ``(x, y)`` token windows of shape (batch, seqlen) with ``y`` shifted by one. Validation
perplexity is exp of the mean loss over every validation token (summed losses / token count, so a
short last batch is weighted correctly).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from longctx.models import build_model
from longctx.tasks.base import Task


class CausalLM(Task):
    """The model of ``config['model']`` trained on next-token prediction with the optimiser of
    ``config['task']``. The whole run config travels in every checkpoint, so eval.py needs only the file."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.model = build_model(config["model"])
        self._val_loss_sum = 0.0
        self._val_tokens = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.model.loss(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum, self._val_tokens = 0.0, 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._accumulate_eval_loss(batch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._accumulate_eval_loss(batch)

    def _accumulate_eval_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        self._val_loss_sum += self.model.loss(x, y, reduction="sum").item()
        self._val_tokens += y.numel()

    def _log_eval(self, split: str) -> None:
        totals = torch.tensor([self._val_loss_sum, float(self._val_tokens)], dtype=torch.float64,
                              device=self.device)
        totals = self.summed_over_ranks(totals)
        loss = (totals[0] / totals[1].clamp_min(1)).item()
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{split}/ppl", math.exp(min(loss, 50.0)), prog_bar=True, sync_dist=False)
