"""Shared by the task tests: train.py killed with SIGKILL mid-run, resumed, compared to a straight run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss from metrics.jsonl, the last line for a step winning (a resumed run rewrites
    the steps after its checkpoint)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def _train(args: list[str], env: dict[str, str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def kill_and_resume(args: list[str], tmp_path: Path, steps: int, ckpt_every: int,
                    data_root: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(per-step train losses of an uninterrupted run, those of a run SIGKILLed after its first
    checkpoint and resumed with resume=true). ``args`` must set trainer.max_steps=steps,
    trainer.ckpt_every_n_steps=ckpt_every and trainer.log_every_n_steps=1, and no run_dir."""
    env = {**os.environ, "LONGCTX_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _train([*args, f"run_dir={straight}"], env, tmp_path)

    child = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args, f"run_dir={killed}"], env=env,
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while max(train_losses(killed), default=0) < ckpt_every + 2:  # past the first checkpoint, mid-way
        assert child.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert max(train_losses(killed)) < steps, "the run must be killed before it finishes"
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] >= ckpt_every

    _train(["resume=true", f"run_dir={killed}"], env, tmp_path)
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    return train_losses(straight), train_losses(killed)


@pytest.fixture
def assert_resume_reproduces(tmp_path: Path) -> Callable[..., None]:
    """Runs :func:`kill_and_resume` and asserts that every step's loss is the straight run's."""

    def check(args: list[str], steps: int, ckpt_every: int, data_root: Path) -> None:
        reference, resumed = kill_and_resume(args, tmp_path, steps, ckpt_every, data_root)
        assert sorted(reference) == sorted(resumed) == list(range(1, steps + 1))
        for step in range(1, steps + 1):
            assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step

    return check
