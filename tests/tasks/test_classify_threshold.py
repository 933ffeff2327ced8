"""task.threshold=tune: the validation split picks the threshold of best micro-F1 (recomputed here in
plain Python over the same grid), the test split uses it, and fixed thresholds keep their behaviour."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import lightning as L
import pytest
import torch

from longctx.config import ConfigError, compose
from longctx.tasks import build_task
from longctx.tasks.classify import Classify


class _FixedLogits(Classify):
    """The task with the encoder bypassed: logits come with the batch."""

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return batch["logits"]


def _task(threshold: str) -> _FixedLogits:
    cfg = compose(["model=bert-tiny", "task=classify", "data=jsonl_classify", "task.num_labels=5",
                   "task.multi_label=true", f"task.threshold={threshold}", "model.n_layer=1",
                   "model.n_embd=8", "model.n_head=2", "model.intermediate_size=8"])
    return _FixedLogits(build_task(cfg).config)


def _split(seed: int, n: int = 60, labels: int = 5) -> tuple[list[list[float]], list[list[int]]]:
    """Probabilities (k + 0.5) / 200, never within 0.0025 of a grid point, and targets that agree
    with them more often than not, so the best threshold is neither end of the grid."""
    rng = random.Random(seed)
    probs = [[(rng.randrange(200) + 0.5) / 200 for _ in range(labels)] for _ in range(n)]
    targets = [[int(rng.random() < 0.2 + 0.6 * p) for p in row] for row in probs]
    return probs, targets


def _f1s(probs: list[list[float]], targets: list[list[int]], t: float) -> tuple[float, float]:
    """(micro, macro) F1 at threshold t, counted one prediction at a time."""
    labels = len(targets[0])
    tp, fp, fn = [0] * labels, [0] * labels, [0] * labels
    for prow, trow in zip(probs, targets):
        for j, (p, y) in enumerate(zip(prow, trow)):
            pred = p >= t
            tp[j] += pred and y
            fp[j] += pred and not y
            fn[j] += (not pred) and y

    def f1(a: int, b: int, c: int) -> float:
        return 2 * a / (2 * a + b + c) if 2 * a + b + c else 0.0

    return f1(sum(tp), sum(fp), sum(fn)), sum(f1(*x) for x in zip(tp, fp, fn)) / labels


def _loader(probs: list[list[float]], targets: list[list[int]]) -> torch.utils.data.DataLoader:
    logits = torch.tensor([[math.log(p / (1 - p)) for p in row] for row in probs], dtype=torch.float64)
    logits = logits.float()
    rows = [{"logits": logits[i], "labels": torch.tensor(targets[i], dtype=torch.float32)}
            for i in range(len(probs))]
    return torch.utils.data.DataLoader(rows, batch_size=7)


def _trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_tune_picks_the_best_val_threshold_and_test_uses_it() -> None:
    val_probs, val_targets = _split(0)
    grid = [i / 100 for i in range(1, 100)]
    scores = [_f1s(val_probs, val_targets, t)[0] for t in grid]
    best = grid[scores.index(max(scores))]  # the first (lowest) threshold among ties
    assert 0.05 < best < 0.95
    task = _task("tune")
    trainer = _trainer()
    val = trainer.validate(task, dataloaders=_loader(val_probs, val_targets), verbose=False)[0]
    assert val["val/threshold"] == pytest.approx(best)
    micro, macro = _f1s(val_probs, val_targets, best)
    assert val["val/micro_f1"] == pytest.approx(micro) and val["val/macro_f1"] == pytest.approx(macro)
    assert micro > _f1s(val_probs, val_targets, 0.5)[0] or best == 0.5
    assert task.config["task"]["tuned_threshold"] == pytest.approx(best)  # travels in the checkpoint

    test_probs, test_targets = _split(1)
    test = trainer.test(task, dataloaders=_loader(test_probs, test_targets), verbose=False)[0]
    micro, macro = _f1s(test_probs, test_targets, best)
    assert test["test/threshold"] == pytest.approx(best)
    assert test["test/micro_f1"] == pytest.approx(micro) and test["test/macro_f1"] == pytest.approx(macro)


def test_a_number_keeps_its_threshold_on_every_split() -> None:
    probs, targets = _split(2)
    task = _task("0.3")
    val = _trainer().validate(task, dataloaders=_loader(probs, targets), verbose=False)[0]
    micro, macro = _f1s(probs, targets, 0.3)
    assert val["val/threshold"] == pytest.approx(0.3)
    assert val["val/micro_f1"] == pytest.approx(micro) and val["val/macro_f1"] == pytest.approx(macro)
    assert "tuned_threshold" not in task.config["task"]


def test_tune_without_validation_and_bad_values_are_one_line_errors() -> None:
    probs, targets = _split(3)
    with pytest.raises(ValueError, match="task.threshold=tune but no validation has chosen a threshold"):
        _trainer().test(_task("tune"), dataloaders=_loader(probs, targets), verbose=False)
    with pytest.raises(ConfigError, match="task.threshold expects a number or tune, got 'best'"):
        _task("best")
    with pytest.raises(ConfigError, match=r"task.threshold=1.5 must be 'tune' or a number in \(0, 1\)"):
        _task("1.5")
