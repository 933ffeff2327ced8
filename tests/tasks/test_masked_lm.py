"""The masked-LM task: its loss against a hand-computed cross-entropy, config composition, and a tiny
end-to-end train.py / eval.py run on a local corpus (CPU)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from longctx.config import ConfigError, compose
from longctx.data import build_datamodule
from longctx.tasks import build_task
from longctx.tasks.masked_lm import MaskedLM, mlm_loss_sums

REPO = Path(__file__).resolve().parents[2]


def _config(vocab: int = 50) -> dict:
    return {"model": {"arch": "bert", "vocab_size": vocab, "n_layer": 1, "n_head": 2, "n_embd": 16,
                      "intermediate_size": 32, "max_positions": 16, "dropout": 0.0, "attn": "reference"},
            "task": {"arch": "masked_lm", "lr": 1e-3, "min_lr_ratio": 0.1, "weight_decay": 0.01,
                     "betas": [0.9, 0.999], "warmup_steps": 2},
            "trainer": {"max_steps": 10, "grad_clip": 1.0}}


def test_loss_and_accuracy_equal_a_hand_computed_cross_entropy_on_labeled_positions():
    torch.manual_seed(0)
    task = MaskedLM(_config()).eval()
    ids = torch.randint(5, 50, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.int64)
    mask[1, 7:], mask[2, 4:] = 0, 0
    ids[mask == 0] = 0
    labels = torch.full((3, 12), -100)
    for b, s in [(0, 1), (0, 5), (0, 11), (1, 2), (1, 6), (2, 3)]:
        labels[b, s] = int(ids[b, s])
        ids[b, s] = 4
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": labels}
    with torch.no_grad():
        logits = task(batch).double()  # (3, 12, 50) every position
        loss_sum, correct, count = mlm_loss_sums(task.model, batch)
    terms, hits = [], 0
    for b, s in zip(*torch.nonzero(labels != -100, as_tuple=True)):
        row = logits[b, s].tolist()
        log_z = math.log(sum(math.exp(v) for v in row))
        terms.append(log_z - row[labels[b, s]])
        hits += max(range(50), key=row.__getitem__) == labels[b, s]
    assert count == 6 and int(correct) == hits
    assert loss_sum.item() / count == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_goal_command_composes_and_model_follows_the_data_vocabulary():
    cfg = compose(["model=bert-tiny", "task=masked_lm", "data=shakespeare_mlm"])
    assert cfg.model.vocab_size == cfg.data.vocab_size == 8000
    assert compose(["model=bert-tiny", "task=masked_lm", "data=shakespeare_mlm",
                    "data.vocab_size=500"]).model.vocab_size == 500
    with pytest.raises(ConfigError, match="model.vocab_size=900 must equal data.vocab_size=8000"):
        compose(["model=bert-tiny", "task=masked_lm", "data=shakespeare_mlm", "model.vocab_size=900"])
    with pytest.raises(ConfigError, match="model.arch"):
        compose(["model=gpt2-tiny", "task=masked_lm", "data=shakespeare_mlm"])
    # The command names no data: masked_lm then reads the MLM corpus, not the LM default.
    assert compose(["model=bert-tiny", "task=masked_lm"]).data.name == "shakespeare_mlm"
    with pytest.raises(ConfigError, match="reads data of kind mlm; data=shakespeare is kind lm"):
        compose(["model=bert-tiny", "task=masked_lm", "data=shakespeare"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ["the", "king", "queen", "speaks", "to", "a", "lord", "of", "night", "and", "day", "my",
             "heart", "is", "true", "thou", "art", "fair", "what", "light", "breaks", "yonder"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "." for _ in range(150)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


def test_train_then_eval_end_to_end_lowers_val_loss(corpus, tmp_path, monkeypatch):
    data_root, run_dir = tmp_path / "data", tmp_path / "run"
    args = ["model=bert-tiny", "task=masked_lm", "data=shakespeare_mlm", "data.corpus=files",
            f"data.paths=[{corpus}]", "data.vocab_size=200", "seqlen=32", "data.batch_size=8",
            "model.n_embd=32", "model.intermediate_size=64", "task.lr=3e-3", "task.warmup_steps=5",
            "trainer.max_steps=40", "trainer.val_every_n_steps=40", "trainer.progress_bar=false"]
    # Step 0: the same seeded initialisation that train.py builds, validated in process.
    monkeypatch.setenv("LONGCTX_DATA", str(data_root))
    cfg = compose(args)
    L.seed_everything(cfg.seed, verbose=False)
    task, data = build_task(cfg), build_datamodule(cfg)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    initial = trainer.validate(task, datamodule=data, verbose=False)[0]["val/loss"]

    env = {**os.environ, "LONGCTX_DATA": str(data_root), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args, f"run_dir={run_dir}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r["val/loss"] for r in rows if "val/loss" in r][-1]
    assert final < initial - 0.5, (initial, final)

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ev = subprocess.run([sys.executable, str(REPO / "eval.py"), f"ckpt={ckpt}"], capture_output=True,
                        text=True, env=env, cwd=tmp_path, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["val_loss"] == pytest.approx(final, rel=1e-4)
    assert result["val_ppl"] == pytest.approx(math.exp(final), rel=1e-4)
    assert 0.0 < result["val_accuracy"] <= 1.0 and result["test_loss"] > 0.0


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses(corpus, tmp_path, assert_resume_reproduces):
    # Dropout on, and fresh masks each epoch: the ~13-batch epoch ends between the kill and step 20.
    args = ["model=bert-tiny", "task=masked_lm", "data=shakespeare_mlm", "data.corpus=files",
            f"data.paths=[{corpus}]", "data.vocab_size=200", "seqlen=32", "data.batch_size=16",
            "model.n_embd=32", "model.intermediate_size=64", "model.dropout=0.1", "task.warmup_steps=5",
            "trainer.max_steps=20", "trainer.ckpt_every_n_steps=5", "trainer.val_every_n_steps=20",
            "trainer.log_every_n_steps=1", "trainer.progress_bar=false"]
    assert_resume_reproduces(args, steps=20, ckpt_every=5, data_root=tmp_path / "data")
