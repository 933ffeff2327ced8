"""Warm start (task.init_from) and the gridwise position duplication of the Path-X / Path-256 recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longctx.config import compose
from longctx.tasks import build_task
from longctx.tasks.warm_start import upscale_position_grid, warm_start

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("side, factor", [(4, 2), (3, 3), (5, 1)])
def test_grid_upscale_equals_an_explicit_loop(side, factor):
    table = torch.randn(side * side, 6, dtype=torch.float64) + 0.5
    big = side * factor
    expected = torch.empty(big * big, 6, dtype=torch.float64)
    for r in range(big):
        for c in range(big):
            expected[r * big + c] = table[(r // factor) * side + c // factor]
    assert torch.equal(upscale_position_grid(table, factor), expected)


def test_grid_upscale_bad_input():
    with pytest.raises(ValueError, match="square number of positions, got 10"):
        upscale_position_grid(torch.zeros(10, 4), 2)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        upscale_position_grid(torch.zeros(16, 4), 0)


def _task(positions: int) -> torch.nn.Module:
    cfg = compose(["experiment=lra-pathfinder", f"model.max_positions={positions}",
                   f"data.seqlen={positions}", "model.attn=reference"])
    return build_task(cfg)


def test_warm_start_copies_weights_and_upscales_positions(tmp_path):
    small = _task(16)  # a 4x4 grid
    ckpt = tmp_path / "small.ckpt"
    torch.save({"state_dict": small.state_dict()}, ckpt)
    big = _task(64)  # 8x8
    warm_start(big, ckpt, position_grid_upscale=2)
    wpe_small, wpe_big = small.encoder.wpe.weight.detach(), big.encoder.wpe.weight.detach()
    for r in range(8):
        for c in range(8):
            assert torch.equal(wpe_big[r * 8 + c], wpe_small[(r // 2) * 4 + c // 2])
    ref, got = small.state_dict(), big.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref if k != "encoder.wpe.weight")
    with pytest.raises(ValueError, match=r"encoder.wpe.weight has shape \(16, 64\), the model \(64, 64\)"):
        warm_start(_task(64), ckpt, position_grid_upscale=1)
    with pytest.raises(ValueError, match="no such checkpoint file"):
        warm_start(big, tmp_path / "missing.ckpt")


@pytest.mark.slow
def test_train_py_starts_from_init_from(tmp_path):
    """A tiny ListOps run, then train.py started from its checkpoint at lr 0: the weights it saves
    are the checkpoint's, so they were loaded; a checkpoint that does not fit is a one-line error."""
    env = {**os.environ, "LONGCTX_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "2"}
    common = ["experiment=lra-listops", "data.n_train=16", "data.n_val=4", "data.n_test=4",
              "data.min_length=5", "data.max_length=60", "seqlen=64", "data.num_workers=0", "data.num_proc=1",
              "data.batch_size=4",
              "model.attn=reference", "trainer.max_steps=2", "trainer.val_every_n_steps=2",
              "trainer.progress_bar=false", "task.warmup_steps=1"]

    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "train.py"), *common, *args], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=600)

    proc = train(f"run_dir={tmp_path / 'first'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    proc = train(f"task.init_from={ckpt}", "task.lr=0.0", f"run_dir={tmp_path / 'second'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = torch.load(ckpt, weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    bad = train(f"task.init_from={ckpt}", "task.position_grid_upscale=2", f"run_dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "a square number of positions, got 2000" in bad.stderr, bad.stderr[-2000:]
