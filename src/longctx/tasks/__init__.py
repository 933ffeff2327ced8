"""Lightning tasks and the registry that maps ``task.arch`` to them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from longctx.tasks.causal_lm import CausalLM
from longctx.tasks.classify import Classify
from longctx.tasks.masked_lm import MaskedLM

TASKS: dict[str, type[L.LightningModule]] = {
    "causal_lm": CausalLM,
    "masked_lm": MaskedLM,
    "classify": Classify,
}


def build_task(cfg: DictConfig | Mapping[str, Any]) -> L.LightningModule:
    """The LightningModule for a whole run config (it reads model, task and trainer sections)."""
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    arch = config["task"]["arch"]
    if arch not in TASKS:
        raise ValueError(f"task.arch='{arch}' is unknown; choose from: {', '.join(TASKS)}")
    return TASKS[arch](config)
