"""The logic behind ``train.py`` and ``eval.py``.

A run lives in one directory (``runs/<name>-<timestamp>`` unless ``run_dir=`` is given)::

    config.yaml         the resolved config (the one to resume with)
    checkpoints/        last.ckpt (every trainer.ckpt_every_n_steps and at the end), best.ckpt (val loss)
    metrics.jsonl       every logged metric, one JSON line per log step
    eval.json           written by eval.py
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from longctx.config import ConfigError, apply_overrides, compose, parse_argv, to_yaml, validate

RUNS = Path("runs")
RUN_DIR_ENV = "LONGCTX_RUN_DIR"  # set for the processes Lightning launches, so all ranks share the run


def _new_run_dir(cfg: DictConfig) -> Path:
    """runs/<experiment or model>-<timestamp>; refused under an external multi-process launcher
    (torchrun, srun), whose processes would each pick their own timestamp."""
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1:
        raise ConfigError("a multi-process launch (torchrun, srun) needs run_dir=PATH, the same for every "
                          "process")
    return RUNS / f"{cfg.get('experiment') or cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _newest_run() -> Path:
    runs = sorted(RUNS.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ConfigError(f"resume=true but no run under {RUNS}/ has checkpoints/last.ckpt; "
                          "pass run_dir=PATH")
    return runs[-1].parent.parent


def resolve_run(argv: Sequence[str]) -> tuple[DictConfig, Path, Path | None]:
    """Config, run directory and checkpoint to resume from (None for a fresh run).

    ``resume=true`` reloads the run's saved config and applies only dotted overrides on top (e.g. a
    larger ``trainer.max_steps``); changing a group of a run in progress is refused.
    """
    pairs = dict(parse_argv(argv))
    resume = pairs.get("resume", False)
    if resume not in (True, False):
        raise ConfigError(f"resume expects true or false, got '{resume}'")
    if not resume:
        cfg = compose(argv)
        run_dir = Path(cfg.run_dir or os.environ.get(RUN_DIR_ENV) or _new_run_dir(cfg))
        if (run_dir / "checkpoints" / "last.ckpt").exists():
            raise ConfigError(f"run_dir={run_dir} already holds a run; pass resume=true to continue it "
                              "or choose another run_dir")
        cfg.run_dir = str(run_dir)
        return cfg, run_dir, None

    run_dir = Path(str(pairs["run_dir"])) if pairs.get("run_dir") else _newest_run()
    ckpt, saved = run_dir / "checkpoints" / "last.ckpt", run_dir / "config.yaml"
    if not ckpt.is_file() or not saved.is_file():
        raise ConfigError(f"run_dir={run_dir} has no checkpoints/last.ckpt and config.yaml to resume from")
    group_changes = [k for k in pairs if k in ("model", "data", "task", "trainer", "experiment", "seqlen")]
    if group_changes:
        raise ConfigError(f"cannot change {', '.join(group_changes)} when resuming; only dotted keys "
                          "(e.g. trainer.max_steps=2000)")
    cfg = OmegaConf.load(saved)
    apply_overrides(cfg, [(k, v) for k, v in parse_argv(argv) if k not in ("resume", "run_dir")])
    validate(cfg)
    return cfg, run_dir, ckpt


def _precision(cfg: DictConfig) -> str:
    import torch

    precision = str(cfg.trainer.precision)
    if precision != "auto":
        return precision
    use_cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if use_cuda else "32-true"


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: Sequence[Any] = ()) -> Any:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from longctx import callbacks as cb
    from longctx.distributed import accumulation, build_strategy

    t = cfg.trainer
    accumulate = accumulation(cfg)
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=t.ckpt_every_n_steps, save_last=True,
                        save_top_k=0),
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                        enable_version_counter=False, auto_insert_metric_name=False),
        cb.Throughput(t.get("peak_tflops")), cb.MetricsLog(run_dir / "metrics.jsonl"), cb.StepSeed(cfg.seed),
        cb.ElasticResume(cfg.data.batch_size), cb.FinalStepCheckpoint(ckpt_dir / "last.ckpt"),
        *extra_callbacks,
    ]
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(cfg),
        precision=_precision(cfg), max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=accumulate,  # gradient clipping: the task's own
        val_check_interval=t.val_every_n_steps * accumulate, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar, callbacks=callbacks, logger=False,
        plugins=[cb.AtomicCheckpointIO()], use_distributed_sampler=False, default_root_dir=str(run_dir),
        num_sanity_val_steps=0,
    )


def _reuse_freed_cpu_memory() -> None:
    """On glibc, serve large CPU tensors from the heap and never trim it.

    By default glibc mmaps every allocation over 32 MiB and unmaps it on free, so each training
    step on CPU faults in its big tensors (the (tokens x vocab) logits and their gradient) page by
    page again: measured here, half of a tiny GPT-2 step was kernel time. Reusing freed memory
    halves the step. No effect elsewhere (macOS, musl) or on GPU memory.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def train(argv: Sequence[str]) -> dict[str, float]:
    """Train per the config; returns the final validation metrics."""
    try:
        cfg, run_dir, ckpt = resolve_run(argv)
        import lightning as L

        from longctx.data import build_datamodule
        from longctx.distributed import accumulation, apply_model_options
        from longctx.tasks import build_task

        accumulation(cfg)  # a global batch that does not divide fails here, in one line
        data = build_datamodule(cfg)
        data.prepare_data()  # tokenize and cache now, so a data error is one line, not a traceback
    except (ConfigError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    print(to_yaml(cfg), end="")
    run_dir.mkdir(parents=True, exist_ok=True)
    if ckpt is None and L.pytorch.utilities.rank_zero_only.rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print(f"run directory: {run_dir}" + (f" (resuming from {ckpt})" if ckpt else ""))

    _reuse_freed_cpu_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = build_task(cfg)
    if ckpt is None and cfg.task.get("init_from"):  # fine-tune from another run's weights
        from longctx.tasks.warm_start import warm_start

        try:
            warm_start(task, cfg.task.init_from, cfg.task.get("position_grid_upscale", 1))
        except ValueError as err:
            _fail(str(err))
    apply_model_options(task, cfg.trainer)
    trainer = build_trainer(cfg, run_dir)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        trainer.fit(task, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    last = run_dir / "checkpoints" / "last.ckpt"  # FinalStepCheckpoint saved it at max_steps
    if trainer.global_step < cfg.trainer.max_steps or not last.exists():
        trainer.save_checkpoint(last)  # stopped before max_steps: keep where it stopped
    if "val/loss" not in trainer.callback_metrics:
        trainer.validate(task, datamodule=data, verbose=False)
    val_loss = float(trainer.callback_metrics["val/loss"])
    result = {"step": trainer.global_step, "val_loss": val_loss, "val_ppl": _ppl(val_loss)}
    unigram = getattr(data, "unigram_perplexity", None)
    if unigram is not None:
        result["val_unigram_ppl"] = unigram("val")
        print(f"validation perplexity {result['val_ppl']:.2f} (unigram perplexity of the same split: "
              f"{result['val_unigram_ppl']:.2f}) at step {result['step']}")
    else:
        print(f"validation perplexity {result['val_ppl']:.2f} at step {result['step']}")
    print(f"checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}")
    return result


def evaluate(argv: Sequence[str]) -> dict[str, Any]:
    """``eval.py ckpt=PATH [splits=[val,test]] [out=PATH] [KEY=VALUE ...]``: every ``{split}/NAME``
    metric the task logs (loss and perplexity; accuracy or F1 for classification) as ``{split}_NAME``,
    printed and written as JSON (default: eval.json in the run directory)."""
    try:
        pairs = dict(parse_argv(argv))
        if "ckpt" not in pairs:
            raise ConfigError("eval.py needs ckpt=PATH (e.g. runs/NAME/checkpoints/last.ckpt)")
        ckpt = Path(str(pairs.pop("ckpt")))
        if not ckpt.is_file():
            raise ConfigError(f"ckpt: no such checkpoint file: {ckpt}")
        splits = pairs.pop("splits", ["val", "test"])
        splits = [splits] if isinstance(splits, str) else list(splits)
        bad = [s for s in splits if s not in ("val", "test")]
        if bad:
            raise ConfigError(f"splits: unknown split {bad[0]}; choose from: val, test")
        run_dir = ckpt.parent.parent
        out = Path(str(pairs.pop("out", run_dir / "eval.json")))
        import torch

        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        cfg = OmegaConf.create(state["longctx_config"])
        apply_overrides(cfg, list(pairs.items()))
        validate(cfg)
        from longctx.data import build_datamodule
        from longctx.tasks import build_task

        data = build_datamodule(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        _fail(str(err))

    import lightning as L

    _reuse_freed_cpu_memory()
    task = build_task(cfg)
    task.load_state_dict(state["state_dict"])
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=_precision(cfg),
                        logger=False, enable_progress_bar=cfg.trainer.progress_bar,
                        limit_val_batches=cfg.trainer.limit_val_batches,
                        limit_test_batches=cfg.trainer.limit_val_batches)
    result: dict[str, Any] = {"ckpt": str(ckpt), "step": state.get("global_step")}
    for split in splits:
        run = trainer.validate if split == "val" else trainer.test
        metrics = run(task, datamodule=data, verbose=False)[0]
        logged = {k.partition("/")[2]: float(v) for k, v in metrics.items() if k.startswith(f"{split}/")}
        result.update({f"{split}_{name}": value for name, value in logged.items()})
        print(f"{split} " + ", ".join(f"{name} {value:.4f}" for name, value in sorted(logged.items())))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return result
