"""Training callbacks: throughput and MFU in the progress bar, a metrics log per run, atomic
checkpoints (and one at the last step), per-step seeding so that a resumed run continues exactly,
and resuming on a different number of devices."""

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

from longctx.flops import model_flops_per_token, peak_tflops


class Throughput(L.Callback):
    """Tokens/s, achieved TFLOP/s per device, MFU and peak GPU memory, logged every
    trainer.log_every_n_steps optimizer steps (tokens/s and MFU also in the progress bar).

    Rates cover the training time since the last log, validation excluded. FLOPs are the model's
    (longctx.flops.model_flops_per_token at each batch's sequence length); MFU divides the achieved
    TFLOP/s per device by ``peak_tflops``, else the dense bf16 peak of the GPU looked up by name.
    A CPU run, or a GPU missing from the table, logs no MFU.
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_override = peak_tflops
        self.peak: float | None = None
        self._flops_per_token: dict[int, float | None] = {}
        self._tokens, self._flops, self._elapsed = 0, 0.0, 0.0
        self._start: float | None = None
        self._last_logged = -1

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.peak = self.peak_override
        if self.peak is None and module.device.type == "cuda":
            self.peak = peak_tflops(torch.cuda.get_device_name(module.device))

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._start is not None:  # pause the clock
            self._sync(module)
            self._elapsed += time.perf_counter() - self._start
            self._start = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tokens = batch["input_ids"] if isinstance(batch, dict) else batch[1]  # dict batches: encoders
        seqlen = tokens.shape[-1]
        if seqlen not in self._flops_per_token:
            self._flops_per_token[seqlen] = model_flops_per_token(module, seqlen)
        count = tokens.numel() * trainer.world_size
        self._tokens += count
        self._flops += count * (self._flops_per_token[seqlen] or 0.0)
        step = trainer.global_step
        if not step or step % trainer.log_every_n_steps or step == self._last_logged or self._start is None:
            return  # a step is logged once, at its last micro-batch
        self._sync(module)
        elapsed = max(self._elapsed + time.perf_counter() - self._start, 1e-9)
        module.log("train/tokens_per_s", self._tokens / elapsed, prog_bar=True)
        if all(self._flops_per_token.values()):
            tflops = self._flops / elapsed / trainer.world_size / 1e12
            module.log("train/tflops_per_device", tflops)
            if self.peak:
                module.log("train/mfu", tflops / self.peak, prog_bar=True)
        if module.device.type == "cuda":
            module.log("train/peak_mem_gib", torch.cuda.max_memory_allocated(module.device) / 2**30)
        self._tokens, self._flops, self._elapsed = 0, 0.0, 0.0
        self._start, self._last_logged = time.perf_counter(), step


class MetricsLog(L.Callback):
    """Appends every logged metric to ``<run_dir>/metrics.jsonl`` (one line per log step, flushed),
    so that loss curves survive a killed run and can be read without a logger."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._last_step = -1

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        # A run killed while writing a line leaves it unterminated: drop it before appending, so the
        # resumed run's rows start on a line of their own.
        if trainer.global_rank == 0 and self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                self.path.write_bytes(data[: data.rfind(b"\n") + 1])

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
        step = trainer.global_step  # written once, at the micro-batch that completed the step
        if step and step % trainer.log_every_n_steps == 0 and step != self._last_step:
            self._write(trainer, "train/")
            self._last_step = step

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


class ElasticResume(L.Callback):
    """Lets a run resume on a different number of devices (or micro-batch size) at the same global
    batch, continuing from the same sample.

    The train loader stores its position as samples consumed by all ranks together, but Lightning
    counts micro-batches per rank and steps the optimizer every ``accumulate`` of them. A
    checkpoint therefore records the samples per micro-batch (``micro_batch x world size``); when a
    resumed run has another, the fit loop's batch counters are rescaled so that the next micro-batch,
    the next optimizer step and the loader's position line up again. A resume that changes the
    samples per optimizer step (the global batch) is refused: the learning-rate schedule and the
    data order would no longer match the run's.
    """

    KEY = "longctx_batch_layout"

    def __init__(self, micro_batch: int) -> None:
        self.micro_batch = micro_batch

    def _layout(self, trainer: L.Trainer) -> dict[str, int]:
        return {"samples_per_batch": self.micro_batch * trainer.world_size,
                "accumulate": trainer.accumulate_grad_batches}

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[self.KEY] = self._layout(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        saved, now = checkpoint.get(self.KEY), self._layout(trainer)
        if saved is None or saved["samples_per_batch"] == now["samples_per_batch"]:
            return
        old_step = saved["samples_per_batch"] * saved["accumulate"]
        new_step = now["samples_per_batch"] * now["accumulate"]
        if old_step != new_step:
            raise ValueError(f"resuming with {now['samples_per_batch']} sequences per micro-batch over all "
                             f"devices and accumulation {now['accumulate']} makes {new_step} sequences a "
                             f"step; the run used {old_step}: pass trainer.global_batch_size={old_step}")
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        for part in ("current", "total"):
            counts = progress[part]
            samples = counts["ready"] * saved["samples_per_batch"]
            if part == "current" and samples % now["samples_per_batch"]:
                raise ValueError(f"cannot resume at {samples} samples into the epoch with "
                                 f"{now['samples_per_batch']} sequences per micro-batch over all devices")
            shift = round(samples / now["samples_per_batch"]) - counts["ready"]
            for key in ("ready", "started", "processed", "completed"):
                counts[key] += shift  # keeps a batch that was in flight at the save in flight


class FinalStepCheckpoint(L.Callback):
    """Saves ``path`` at the optimizer step that reaches trainer.max_steps, from inside the training
    loop. A checkpoint saved after fit() returns records the epoch as finished, so a run resumed
    from it to train longer would start the next epoch and skip the rest of this one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == trainer.max_steps:  # true once: the loop stops after this batch
            trainer.save_checkpoint(self.path)


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
