"""How a run spreads over devices and nodes: the Lightning strategy, gradient accumulation from a
global batch, FSDP2 sharding of the transformer blocks, and the per-model options (activation
checkpointing, torch.compile) that the trainer section turns on.

trainer.strategy names:
- ``auto``, ``ddp`` (and Lightning's other strategy strings): passed to Lightning as they are;
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's ModelParallelStrategy,
  one FSDP unit per transformer block plus the root (embeddings, final norm); parameters,
  gradients and optimizer state are sharded over all ranks, and checkpoints are written as one
  full file on rank 0 (so they load on any number of devices, and into eval.py).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

from longctx.config import ConfigError


def devices_per_node(trainer_cfg: DictConfig) -> int:
    """How many devices trainer.devices asks for on each node (-1 / ``auto``: every visible GPU on
    a GPU run, else 1)."""
    devices = trainer_cfg.devices
    if isinstance(devices, (list, ListConfig)):
        return len(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if devices in ("auto", -1, "-1"):
        gpu = trainer_cfg.accelerator in ("gpu", "cuda") or (
            trainer_cfg.accelerator == "auto" and torch.cuda.is_available())
        return max(torch.cuda.device_count(), 1) if gpu else 1
    raise ConfigError(f"trainer.devices={devices}: expected a positive count, a list of device ids, "
                      "-1 or auto")


def accumulation(cfg: DictConfig) -> int:
    """Micro-batches per optimizer step: trainer.global_batch_size (sequences per step over all
    devices and nodes) / (data.batch_size * devices * num_nodes) when it is set, else
    trainer.accumulate_grad_batches."""
    t = cfg.trainer
    if t.get("global_batch_size") is None:
        return int(t.accumulate_grad_batches)
    per_step = cfg.data.batch_size * devices_per_node(t) * t.num_nodes
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not a multiple of data.batch_size "
            f"({cfg.data.batch_size}) x devices ({devices_per_node(t)}) x num_nodes ({t.num_nodes}) "
            f"= {per_step}")
    return t.global_batch_size // per_step


def build_strategy(cfg: DictConfig) -> Any:
    """The ``strategy`` argument of the Lightning Trainer for trainer.strategy."""
    t = cfg.trainer
    if t.strategy != "fsdp":
        return t.strategy
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=devices_per_node(t) * t.num_nodes, tensor_parallel_size=1,
                                 save_distributed_checkpoint=False)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of a longctx model: the entries of every ModuleList named ``blocks``."""
    return [block for name, child in model.named_modules()
            if name.rsplit(".", 1)[-1] == "blocks" and isinstance(child, nn.ModuleList) for block in child]


def shard_blocks(task: nn.Module, mesh: Any) -> None:
    """FSDP2 over the 1-D data-parallel ``mesh``: each transformer block is one unit (its
    parameters are gathered just before it runs and freed after), and each direct child of the
    task (the model, a classification head) another for the rest. Idempotent, as Lightning calls
    configure_model again for a validate after a fit."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if any(isinstance(m, FSDPModule) for m in task.modules()):
        return
    for block in transformer_blocks(task):
        fully_shard(block, mesh=mesh)
    for child in task.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)


def apply_model_options(module: nn.Module, trainer_cfg: DictConfig) -> None:
    """trainer.activation_checkpointing (recompute each block in the backward; models with an
    ``activation_checkpointing`` switch, GPT-2) and trainer.compile (torch.compile each block in
    place, so state-dict keys do not change) on a task or model; config.validate refuses the
    combinations that cannot work."""
    for model in module.modules():
        if hasattr(model, "activation_checkpointing"):
            model.activation_checkpointing = bool(trainer_cfg.get("activation_checkpointing"))
    if trainer_cfg.get("compile"):
        for block in transformer_blocks(module):
            block.compile()
