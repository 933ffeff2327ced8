"""Trainer configs and the multi-device machinery (longctx.distributed, ElasticResume): global batch
-> accumulation, refused combinations, activation checkpointing, and (slow, CPU, gloo) DDP and FSDP2
runs whose weights match a one-device run, including a DDP run resumed on one device."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from longctx.callbacks import ElasticResume
from longctx.cli import resolve_run
from longctx.config import ConfigError, available, compose
from longctx.distributed import accumulation, apply_model_options, build_strategy, transformer_blocks
from longctx.models.gpt2 import GPT2, GPT2Config

REPO = Path(__file__).resolve().parents[1]


def _keys(cfg) -> set[str]:
    return set(OmegaConf.to_container(cfg).keys())


@pytest.mark.parametrize("name", available("trainer"))
def test_every_trainer_config_composes_with_the_default_keys(name: str) -> None:
    """A dotted override that works with one trainer config works with all of them."""
    cfg = compose([f"trainer={name}"])
    assert _keys(cfg.trainer) - {"name"} == _keys(compose([]).trainer) - {"name"}


@pytest.mark.parametrize(("devices", "nodes", "batch", "global_batch", "expected"), [
    (1, 1, 4, 32, 8), (2, 1, 4, 32, 4), (2, 2, 4, 32, 2), (4, 2, 4, 32, 1), ([0, 1], 1, 2, 8, 2)])
def test_global_batch_sets_the_accumulation(devices, nodes, batch, global_batch, expected) -> None:
    cfg = compose([f"trainer.global_batch_size={global_batch}", f"data.batch_size={batch}"])
    cfg.trainer.devices, cfg.trainer.num_nodes = devices, nodes
    assert accumulation(cfg) == expected
    assert expected * batch * (len(devices) if isinstance(devices, list) else devices) * nodes == global_batch


def test_a_global_batch_that_does_not_divide_is_one_line() -> None:
    cfg = compose(["trainer.global_batch_size=20", "data.batch_size=4", "trainer.devices=2"])
    with pytest.raises(ConfigError, match=r"global_batch_size=20 is not a multiple .* = 8$"):
        accumulation(cfg)


@pytest.mark.parametrize(("argv", "fragment"), [
    (["trainer.global_batch_size=16", "trainer.accumulate_grad_batches=2"], "not both"),
    (["trainer.global_batch_size=0"], "positive number of sequences"),
    (["trainer=fsdp", "trainer.compile=true"], "not supported"),
    (["trainer=fsdp", "trainer.precision=16-mixed"], "does not run with trainer.strategy=fsdp"),
    (["model=bert-tiny", "task=masked_lm", "data=shakespeare_mlm", "trainer.activation_checkpointing=true"],
     "supports model.arch gpt2"),
])
def test_bad_combinations_are_refused(argv: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        compose(argv)


def test_fsdp_is_fsdp2_over_every_device_of_every_node() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    cfg = compose(["trainer=fsdp", "trainer.devices=2", "trainer.num_nodes=3"])
    strategy = build_strategy(cfg)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (6, 1)
    assert build_strategy(compose(["trainer=ddp"])) == "ddp"


def test_activation_checkpointing_recomputes_blocks_and_keeps_the_gradients() -> None:
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=300, n_layer=2, n_head=2, n_embd=32, max_positions=16, dropout=0.1))
    x = torch.randint(0, 300, (2, 16))
    calls = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # the recompute may stop early

    def loss_and_grads(checkpointing: bool) -> tuple[float, list[torch.Tensor], int]:
        apply_model_options(model, OmegaConf.create({"activation_checkpointing": checkpointing}))
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)  # the same dropout masks
        loss = model.loss(x, x)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()], len(calls)

    plain_loss, plain_grads, plain_calls = loss_and_grads(False)
    ckpt_loss, ckpt_grads, ckpt_calls = loss_and_grads(True)
    assert (plain_calls, ckpt_calls) == (2, 4)  # each block runs again in the backward
    assert ckpt_loss == plain_loss
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_compile_option_compiles_each_block_in_place() -> None:
    model = GPT2(GPT2Config(vocab_size=300, n_layer=3, n_head=2, n_embd=32, max_positions=16))
    keys = list(model.state_dict())
    apply_model_options(model, OmegaConf.create({"compile": True}))
    assert len(transformer_blocks(model)) == 3
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert list(model.state_dict()) == keys


def _loop_checkpoint(ready: int, completed: int, samples_per_batch: int, accumulate: int) -> dict:
    counts = {"ready": ready, "started": ready, "processed": ready, "completed": completed}
    progress = {"current": dict(counts), "total": dict(counts)}
    return {"loops": {"fit_loop": {"epoch_loop.batch_progress": progress}},
            ElasticResume.KEY: {"samples_per_batch": samples_per_batch, "accumulate": accumulate}}


def test_elastic_resume_rescales_the_batch_counters_to_the_same_sample() -> None:
    # Saved on 2 devices x 4 sequences, no accumulation, after 3 steps (batch 3 in flight: completed 2).
    checkpoint = _loop_checkpoint(3, 2, samples_per_batch=8, accumulate=1)
    trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=2)
    ElasticResume(micro_batch=4).on_load_checkpoint(trainer, None, checkpoint)
    current = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert current == {"ready": 6, "started": 6, "processed": 6, "completed": 5}  # 24 samples = 6 x 4

    unchanged = _loop_checkpoint(3, 2, samples_per_batch=4, accumulate=2)
    ElasticResume(micro_batch=4).on_load_checkpoint(trainer, None, unchanged)
    assert unchanged["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"] == 3


def test_elastic_resume_refuses_a_different_global_batch() -> None:
    checkpoint = _loop_checkpoint(3, 2, samples_per_batch=8, accumulate=1)
    trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1)
    with pytest.raises(ValueError, match="pass trainer.global_batch_size=8"):
        ElasticResume(micro_batch=4).on_load_checkpoint(trainer, None, checkpoint)


def test_external_multi_process_launch_needs_run_dir(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LONGCTX_RUN_DIR", raising=False)
    with pytest.raises(ConfigError, match="needs run_dir=PATH"):
        resolve_run([])


# --- DDP / FSDP on two CPU processes (gloo) --------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ["the", "king", "queen", "speaks", "to", "a", "lord", "of", "night", "and", "day", "my"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 150))) + "." for _ in range(60)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


def _train(corpus: Path, run_dir: Path, *extra: str) -> None:
    args = [f"run_dir={run_dir}"] if "resume=true" in extra else [
        "data=textfiles", f"data.paths=[{corpus}]", "data.batch_size=4", "seqlen=32", "model.n_layer=2",
        "model.n_embd=32", "model.n_head=2", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.global_batch_size=8", "trainer.max_steps=3", "trainer.ckpt_every_n_steps=100",
        "trainer.val_every_n_steps=100", "trainer.limit_val_batches=1", "trainer.progress_bar=false",
        f"run_dir={run_dir}"]
    env = {**os.environ, "LONGCTX_DATA": str(corpus.parent / "data"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args, *extra], capture_output=True,
                          text=True, env=env, cwd=run_dir.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _max_weight_diff(a: dict, b: dict) -> float:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    return max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory) -> Path:
    """3 steps of 8 sequences on two gloo processes (4 each, no accumulation)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    _train(corpus, run_dir, "trainer.strategy=ddp", "trainer.devices=2")
    return run_dir


@pytest.mark.slow
def test_ddp_run_resumed_on_one_device_matches_a_one_device_run(corpus, ddp_run, tmp_path) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(ddp_run, resumed)
    _train(corpus, resumed, "resume=true", "trainer.strategy=auto", "trainer.devices=1",
           "trainer.max_steps=6")
    one = tmp_path / "one"
    _train(corpus, one, "trainer.max_steps=6")  # 1 device: 4 sequences x accumulation 2
    a, b = _last(resumed), _last(one)
    assert a["global_step"] == b["global_step"] == 6
    assert a["loops"]["fit_loop"]["state_dict"] == b["loops"]["fit_loop"]["state_dict"]  # same data position
    assert _max_weight_diff(a, b) < 1e-5


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_ddp(corpus, ddp_run, tmp_path) -> None:
    fsdp = tmp_path / "fsdp"
    _train(corpus, fsdp, "trainer=fsdp", "trainer.devices=2")  # activation checkpointing on, as fsdp.yaml
    a, b = _last(fsdp), _last(ddp_run)
    assert a["global_step"] == b["global_step"] == 3
    assert _max_weight_diff(a, b) < 1e-5  # full (unsharded) weights in one file
