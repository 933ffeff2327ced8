"""Causal language modelling: next-token cross-entropy, AdamW with GPT-2's decay groups, warmup + cosine.

Batches are ``(x, y)`` token windows of shape (batch, seqlen) with ``y`` shifted by one. Validation
perplexity is exp of the mean loss over every validation token (summed losses / token count, so a
short last batch is weighted correctly).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from longctx.models import build_model


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """GPT-2 style: weight decay on the matrices of Linear layers only; biases, LayerNorm and
    embedding weights are not decayed."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1, then cosine decay to ``min_lr_ratio`` at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLM(L.LightningModule):
    """The model of ``config['model']`` trained on next-token prediction with the optimiser of
    ``config['task']``. The whole run config travels in every checkpoint, so eval.py needs only the file."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        self.task_cfg, self.max_steps = dict(config["task"]), config["trainer"]["max_steps"]
        self.model = build_model(config["model"])
        self._val_loss_sum = 0.0
        self._val_tokens = 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["longctx_config"] = self.config

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
        totals = self.all_gather(totals).reshape(-1, 2).sum(0) if self.trainer.world_size > 1 else totals
        loss = (totals[0] / totals[1].clamp_min(1)).item()
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{split}/ppl", math.exp(min(loss, 50.0)), prog_bar=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradient norm here rather than through the Trainer, whose mixed-precision
        plugin refuses to clip for fused optimizers (bf16 has no grad scaler, so nothing is lost)."""
        max_norm = self.config["trainer"].get("grad_clip")
        if max_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
            self.log("train/grad_norm", norm)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.task_cfg
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(decay_groups(self.model, cfg["weight_decay"]), lr=cfg["lr"],
                                      betas=tuple(cfg["betas"]), eps=cfg.get("eps", 1e-8), fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
            step, cfg["warmup_steps"], self.max_steps, cfg["min_lr_ratio"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
