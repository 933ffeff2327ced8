"""Classify: F1 and accuracy from whole-split counts against hand-computed confusions, and a tiny
end-to-end train.py + eval.py run where the label is a keyword in the text."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import pytest
import torch

from longctx.config import compose
from longctx.tasks import build_task
from longctx.tasks.classify import Classify, f1_scores, label_counts

REPO = Path(__file__).resolve().parents[2]

# 4 examples x 3 labels. Label 0: TP 2, FP 1, FN 0 -> F1 4/5; label 1: TP 1, FP 0, FN 1 -> 2/3;
# label 2 is never predicted: TP 0, FP 0, FN 2 -> 0. Micro: TP 3, FP 1, FN 3 -> 6/10.
TARGETS = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
PREDS = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]])
MICRO, MACRO = 0.6, (4 / 5 + 2 / 3 + 0) / 3


def test_f1_against_hand_computed_confusion() -> None:
    counts = label_counts(PREDS, TARGETS)
    assert counts.tolist() == [[2, 1, 0], [1, 0, 0], [0, 1, 2]]  # rows TP, FP, FN; columns labels
    micro, macro = f1_scores(counts)
    assert micro == pytest.approx(MICRO) and macro == pytest.approx(MACRO)


class _FixedLogits(Classify):
    """The task with the encoder bypassed: logits come with the batch."""

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return batch["logits"]


def _validate(num_labels: int, multi_label: bool, logits: torch.Tensor, labels: torch.Tensor,
              threshold: float = 0.5) -> dict[str, float]:
    cfg = compose(["model=bert-tiny", "task=classify", "data=jsonl_classify", f"task.num_labels={num_labels}",
                   f"task.multi_label={str(multi_label).lower()}", f"task.threshold={threshold}",
                   "model.n_layer=1", "model.n_embd=8", "model.n_head=2", "model.intermediate_size=8"])
    task = _FixedLogits(build_task(cfg).config)
    rows = [{"logits": logits[i], "labels": labels[i]} for i in range(len(labels))]
    loader = torch.utils.data.DataLoader(rows, batch_size=2)  # batches of 2, 2 (and 1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    return trainer.validate(task, dataloaders=loader, verbose=False)[0]


def test_multi_label_metrics_accumulate_over_the_split() -> None:
    # logit +2 where predicted, -2 elsewhere: sigmoid 0.88 / 0.12 against threshold 0.5.
    logits = PREDS.float() * 4 - 2
    metrics = _validate(3, True, logits, TARGETS.float())
    # Per-batch averaging would give other numbers: batch 2 alone has micro 2/3, macro (2/3+0+0)/3.
    assert metrics["val/micro_f1"] == pytest.approx(MICRO) and metrics["val/macro_f1"] == pytest.approx(MACRO)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), TARGETS.double())
    assert metrics["val/loss"] == pytest.approx(bce.item(), rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(torch.exp(bce).item(), rel=1e-5)
    high = _validate(3, True, logits, TARGETS.float(), threshold=0.95)  # nothing predicted
    assert high["val/micro_f1"] == 0.0 and high["val/macro_f1"] == 0.0


def test_single_label_accuracy_over_the_split() -> None:
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 0])  # correct, wrong | correct: 2/3 (per-batch mean would be 3/4)
    metrics = _validate(2, False, logits, labels)
    assert metrics["val/accuracy"] == pytest.approx(2 / 3)
    ce = torch.nn.functional.cross_entropy(logits.double(), labels)
    assert metrics["val/loss"] == pytest.approx(ce.item(), rel=1e-5)


KEYWORDS = {"sports": "football", "politics": "election", "science": "physics", "music": "guitar"}


def _fixture(folder: Path) -> dict[str, Path]:
    """Filler sentences with one keyword that names the label (4 labels: chance is 1/4)."""
    rng = random.Random(0)
    filler = "the a of and to in is it that was for on are with as be at by this had from or".split()
    paths = {}
    for split, n in (("train", 400), ("val", 80), ("test", 80)):
        paths[split] = folder / f"{split}.jsonl"
        with paths[split].open("w") as f:
            for _ in range(n):
                label = rng.choice(sorted(KEYWORDS))
                words = [rng.choice(filler) for _ in range(rng.randint(8, 20))]
                words.insert(rng.randrange(len(words) + 1), KEYWORDS[label])
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return paths


def test_train_and_eval_end_to_end(tmp_path: Path) -> None:
    paths = _fixture(tmp_path)
    run_dir = tmp_path / "run"
    env = {**os.environ, "LONGCTX_DATA": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    args = ["model=bert-tiny", "task=classify", "data=jsonl_classify",
            f"data.paths={{train: {paths['train']}, val: {paths['val']}, test: {paths['test']}}}",
            "seqlen=32", "data.batch_size=16", "model.n_embd=64", "model.intermediate_size=128",
            "trainer.max_steps=60", "trainer.val_every_n_steps=60", "trainer.progress_bar=false",
            "task.warmup_steps=5", "task.lr=3e-3", f"run_dir={run_dir}"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ev = subprocess.run([sys.executable, str(REPO / "eval.py"), f"ckpt={ckpt}", "splits=[val,test]"],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["step"] == 60
    assert result["test_accuracy"] > 0.6 and result["val_accuracy"] > 0.6, result  # chance: 0.25
    assert {"val_loss", "val_ppl", "test_loss", "test_ppl"} <= set(result)


def test_missing_paths_is_a_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "model=bert-tiny", "task=classify",
                           "data=jsonl_classify"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "LONGCTX_DATA": str(tmp_path)})
    assert proc.returncode == 2 and "data.paths is required" in proc.stderr


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses(tmp_path: Path, assert_resume_reproduces) -> None:
    # 400 examples in batches of 32: the 12-batch epoch ends between the kill and step 20, so the
    # resumed run continues mid-epoch and then reshuffles.
    paths = _fixture(tmp_path)
    args = ["model=bert-tiny", "task=classify", "data=jsonl_classify",
            f"data.paths={{train: {paths['train']}, val: {paths['val']}, test: {paths['test']}}}",
            "seqlen=32", "data.batch_size=32", "model.n_embd=32", "model.intermediate_size=64",
            "model.dropout=0.1", "task.warmup_steps=5", "trainer.max_steps=20",
            "trainer.ckpt_every_n_steps=5", "trainer.val_every_n_steps=20", "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false"]
    assert_resume_reproduces(args, steps=20, ckpt_every=5, data_root=tmp_path / "cache")
