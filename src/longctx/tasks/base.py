"""What every longctx task shares: the optimiser (AdamW with GPT-2's decay groups, linear warmup
then cosine), gradient clipping, and the run config carried in every checkpoint."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn


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


class Task(L.LightningModule):
    """Base of the tasks: holds ``self.config`` (the whole run config, sections copied to dicts),
    ``self.task_cfg`` (its task section, the same dict, so what a task records there reaches every
    checkpoint) and ``self.max_steps``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
        self.task_cfg: dict[str, Any] = self.config["task"]
        self.max_steps: int = self.config["trainer"]["max_steps"]

    def summed_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """x summed elementwise over the training processes (x itself in a single process)."""
        if self.trainer.world_size == 1:
            return x
        return self.all_gather(x).reshape(-1, *x.shape).sum(0)

    def _log_eval(self, split: str) -> None:
        """Log the metrics of the evaluation pass just finished on `split` ("val" or "test") from the
        sums the task accumulated since on_validation_epoch_start."""
        raise NotImplementedError

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def configure_model(self) -> None:
        """Under trainer.strategy=fsdp (Lightning's ModelParallelStrategy, which sets the device
        mesh): shard the transformer blocks with FSDP2 (longctx.distributed). Other strategies: nothing."""
        if self._device_mesh is not None:
            from longctx.distributed import shard_blocks

            shard_blocks(self, self._device_mesh["data_parallel"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The run config travels in every checkpoint, so eval.py needs only the file."""
        checkpoint["longctx_config"] = self.config

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradient norm here rather than through the Trainer, whose mixed-precision
        plugin refuses to clip for fused optimizers (bf16 has no grad scaler, so nothing is lost)."""
        max_norm = self.config["trainer"].get("grad_clip")
        if max_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
            self.log("train/grad_norm", norm)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.task_cfg
        optimizer = torch.optim.AdamW(decay_groups(self, cfg["weight_decay"]), lr=cfg["lr"],
                                      betas=tuple(cfg["betas"]), eps=cfg.get("eps", 1e-8),
                                      fused=self.device.type == "cuda")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
            step, cfg["warmup_steps"], self.max_steps, cfg["min_lr_ratio"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
