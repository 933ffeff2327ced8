"""End to end through train.py / eval.py on a tiny model and a small local corpus (CPU).

The kill-and-resume test is the contract of resumable runs: a run SIGKILLed mid-epoch and resumed
with ``resume=true`` reaches the same global step with the same per-step losses as a run that was
never interrupted (dropout on, so the RNG state must travel in the checkpoint too).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """150 documents of seeded pseudo-text (~15k words): 40 steps of 4 x 32 tokens cross an epoch."""
    rng = random.Random(0)
    words = ["the", "king", "queen", "speaks", "to", "a", "lord", "of", "night", "and", "day", "my",
             "heart", "is", "true", "thou", "art", "fair", "what", "light", "breaks", "yonder"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 150))) + "." for _ in range(150)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


def _args(corpus: Path, run_dir: Path, cache: Path) -> list[str]:
    return [
        "data=textfiles", f"data.paths=[{corpus}]", "data.batch_size=4", "data.num_workers=0",
        "seqlen=32", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.dropout=0.1",
        f"trainer.max_steps={STEPS}", "trainer.ckpt_every_n_steps=10", "trainer.val_every_n_steps=20",
        "trainer.log_every_n_steps=1", "trainer.progress_bar=false", "task.warmup_steps=5",
        f"run_dir={run_dir}",
    ]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "LONGCTX_DATA": str(cache), "OMP_NUM_THREADS": "1"}


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss, the last line for a step winning (a resumed run rewrites steps after its
    checkpoint)."""
    out = {}
    text = (run_dir / "metrics.jsonl").read_text()
    for line in text[: text.rfind("\n") + 1].splitlines():  # complete lines (the run may be writing one)
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def _train(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          env=_env(cache), cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses_and_eval_reproduces(corpus, tmp_path):
    cache = tmp_path / "data"
    straight = tmp_path / "straight"
    proc = _train(_args(corpus, straight, cache), cache, tmp_path)
    reference = _losses(straight)
    assert sorted(reference) == list(range(1, STEPS + 1))

    # The uninterrupted run's printed perplexity is reproduced by eval.py on its checkpoint.
    printed = float(re.search(r"validation perplexity ([0-9.]+)", proc.stdout).group(1))
    ckpt = straight / "checkpoints" / "last.ckpt"
    ev = subprocess.run([sys.executable, str(REPO / "eval.py"), f"ckpt={ckpt}"], capture_output=True,
                        text=True, env=_env(cache), cwd=tmp_path, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((straight / "eval.json").read_text())
    assert result["val_ppl"] == pytest.approx(printed, rel=0.01)
    assert result["test_ppl"] > 1.0 and result["step"] == STEPS

    # Kill a second run with SIGKILL after its step-20 checkpoint, mid-epoch, then resume it.
    killed = tmp_path / "killed"
    args = _args(corpus, killed, cache)
    child = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=_env(cache), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        done = _losses(killed) if (killed / "metrics.jsonl").exists() else {}
        if max(done, default=0) >= 25:
            break
        assert child.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert max(_losses(killed)) < STEPS, "the run must be killed before it finishes"
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] >= 20

    _train(["resume=true", f"run_dir={killed}"], cache, tmp_path)
    resumed = _losses(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    final = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == STEPS
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_a_second_fresh_run_into_the_same_dir_is_refused(corpus, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), f"run_dir={run_dir}"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "pass resume=true" in proc.stderr


def test_resume_refuses_group_changes(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run_dir / "config.yaml").write_text("seed: 1\n")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "resume=true", f"run_dir={run_dir}",
                           "model=gpt2"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "cannot change model when resuming" in proc.stderr
