"""Training callbacks: throughput in the progress bar, a metrics log per run, atomic checkpoints,
and per-step seeding so that a resumed run continues exactly."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class Throughput(L.Callback):
    """Logs tokens/s over the optimizer steps since the last log, and peak GPU memory."""

    def __init__(self) -> None:
        self._tokens = 0
        self._start: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tokens = batch["input_ids"] if isinstance(batch, dict) else batch[1]  # dict batches: encoders
        self._tokens += tokens.numel() * trainer.world_size
        if trainer.global_step % trainer.log_every_n_steps or self._start is None:
            return
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        elapsed = time.perf_counter() - self._start
        module.log("train/tokens_per_s", self._tokens / max(elapsed, 1e-9), prog_bar=True)
        if module.device.type == "cuda":
            module.log("train/peak_mem_gib", torch.cuda.max_memory_allocated(module.device) / 2**30)
        self._tokens, self._start = 0, time.perf_counter()


class MetricsLog(L.Callback):
    """Appends every logged metric to ``<run_dir>/metrics.jsonl`` (one line per log step, flushed),
    so that loss curves survive a killed run and can be read without a logger."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _write(self, trainer: L.Trainer, prefix: str) -> None:
        if trainer.global_rank != 0:
            return
        row: dict[str, Any] = {"step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix):
                row[key] = float(value)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._write(trainer, "train/")

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, "val/")


class StepSeed(L.Callback):
    """Seeds torch before every training micro-batch from (seed, rank, global step, micro-batch).

    Dropout masks then depend on where the run is, not on how many random numbers something else
    drew before (a DataLoader draws one each time it is iterated, validation included), so a
    resumed run repeats the uninterrupted one exactly, and no RNG state has to be checkpointed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        micro = batch_idx % trainer.accumulate_grad_batches
        mixed = np.random.SeedSequence([self.seed, trainer.global_rank, trainer.global_step, micro])
        torch.manual_seed(int(mixed.generate_state(1, dtype=np.uint64)[0] >> 1))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, so a run killed while
    saving leaves the previous checkpoint intact instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with tmp.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
