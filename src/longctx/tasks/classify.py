"""Sequence classification: an encoder (BERT) plus a :class:`ClassificationHead`.

Batches are dicts {input_ids, attention_mask, token_type_ids: (batch, seqlen); labels: (batch,)
class indices, or (batch, num_labels) multi-hot}. The number of labels and the mode come from
``task.num_labels`` / ``task.multi_label`` or, when those are null, from the datamodule at setup;
they are then written into the config that travels in every checkpoint, so eval.py rebuilds the
same head from the file alone. With ``task.pair: true`` (LRA Retrieval) a batch also holds
``input_ids_2`` / ``attention_mask_2``, each example's second document, and the head is the
two-tower :class:`PairClassificationHead`.

Evaluation metrics are computed from counts accumulated over the whole split, never averaged
per batch: loss = summed loss / count, accuracy = correct / examples; multi-label micro-F1 from
the label-summed TP/FP/FN and macro-F1 as the mean of per-label F1 = 2TP / (2TP + FP + FN)
(0 for a label with no TP, FP or FN), predictions at ``task.threshold``. ``{split}/ppl`` =
exp(loss) is logged too, for tools that read it.

``task.threshold: tune`` chooses the multi-label threshold on the validation split: the counts
are kept for every threshold of ``THRESHOLD_GRID`` at once, and the one with the best validation
micro-F1 (the lowest among ties) is logged as ``val/threshold``, gives the logged val F1s, and is
stored in the config as ``task.tuned_threshold``, which the test split then uses (and which
travels in the checkpoint, so ``eval.py splits=[test]`` reuses it). A number keeps that threshold
fixed; ``{split}/threshold`` is logged either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from longctx.models import build_model
from longctx.models.heads import ClassificationHead, PairClassificationHead
from longctx.tasks.base import Task

THRESHOLD_GRID = tuple(round(0.01 * i, 2) for i in range(1, 100))  # 0.01, 0.02, ..., 0.99


def label_counts(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-label true positives, false positives and false negatives of 0/1 matrices preds
    (..., batch, num_labels) and targets (batch, num_labels) -> int64 (..., 3, num_labels)."""
    preds, targets = preds.bool(), targets.bool()
    return torch.stack([(preds & targets).sum(-2), (preds & ~targets).sum(-2),
                        (~preds & targets).sum(-2)], dim=-2).long()


def _f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom))


def f1_scores(counts: torch.Tensor) -> tuple[float, float]:
    """(micro-F1, macro-F1) from per-label counts (3, num_labels) of TP, FP, FN.

    F1 = 2TP / (2TP + FP + FN), taken as 0 where the denominator is 0 (a label never predicted
    nor present), as scikit-learn's ``zero_division=0``.
    """
    tp, fp, fn = counts.double()
    return float(_f1(tp.sum(), fp.sum(), fn.sum())), float(_f1(tp, fp, fn).mean())


def best_threshold(counts: torch.Tensor, thresholds: tuple[float, ...]) -> int:
    """Index of the threshold with the highest micro-F1 (the first, i.e. lowest, among ties) given
    counts (len(thresholds), 3, num_labels) taken at each threshold."""
    tp, fp, fn = counts.double().sum(-1).unbind(-1)
    micro = _f1(tp, fp, fn)
    return int((micro == micro.max()).nonzero()[0])


class Classify(Task):
    """The encoder of ``config['model']`` and a classification head, trained with cross-entropy
    (single-label) or BCE with logits (multi-label) and the optimiser of ``config['task']``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.encoder = build_model(config["model"])
        self.head: ClassificationHead | None = None
        if self.task_cfg.get("num_labels"):
            self._build_head(int(self.task_cfg["num_labels"]), bool(self.task_cfg.get("multi_label")))
        self._sums: dict[str, Any] = {}

    def _build_head(self, num_labels: int, multi_label: bool) -> None:
        self.task_cfg["num_labels"], self.task_cfg["multi_label"] = num_labels, multi_label
        head = PairClassificationHead if self.task_cfg.get("pair") else ClassificationHead
        self.head = head(self.encoder.config.n_embd, num_labels, self.task_cfg["pooling"],
                         self.task_cfg["dropout"], multi_label)

    def setup(self, stage: str) -> None:
        """Build the head from the datamodule's labels when the config did not fix them, and check
        that the data's tokenizer fits the encoder's embedding table."""
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is None or not hasattr(data, "num_labels"):
            if self.head is None:
                raise ValueError("task.num_labels is null and the datamodule gives no labels")
            return
        if self.head is None:
            self._build_head(data.num_labels, data.multi_label)
        elif (self.head.classifier.out_features, self.head.multi_label) != (data.num_labels,
                                                                            data.multi_label):
            raise ValueError(f"task.num_labels={self.head.classifier.out_features} (multi_label="
                             f"{self.head.multi_label}) but the data has {data.num_labels} labels "
                             f"(multi_label={data.multi_label})")
        if bool(getattr(data, "pair", False)) != bool(self.task_cfg.get("pair")):
            raise ValueError(f"task.pair={bool(self.task_cfg.get('pair'))} but the data "
                             f"{'gives' if getattr(data, 'pair', False) else 'does not give'} document pairs")
        vocab = self.encoder.config.vocab_size
        if data.tokenizer_vocab_size > vocab:
            raise ValueError(f"the data's tokenizer has {data.tokenizer_vocab_size} tokens, more than "
                             f"model.vocab_size={vocab}")

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Batch dict -> logits (batch, num_labels)."""
        assert self.head is not None, "the head is built in __init__ or setup"
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        if self.task_cfg.get("pair"):  # two documents per example: one encoder call on both, stacked
            ids, mask = torch.cat([ids, batch["input_ids_2"]]), torch.cat([mask, batch["attention_mask_2"]])
            types = None
        hidden = self.encoder(ids, mask, types)
        pooled = None
        if self.head.pooling == "cls" and hasattr(self.encoder, "pool"):
            pooled = self.encoder.pool(hidden)
        return self.head(hidden, mask, pooled)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.head.loss(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _thresholds(self, split: str) -> tuple[float, ...]:
        """The thresholds to count predictions at: the grid when tuning on val, else one."""
        threshold = self.task_cfg.get("threshold", 0.5)
        if threshold != "tune":
            return (float(threshold),)
        if split == "val":
            return THRESHOLD_GRID
        if self.task_cfg.get("tuned_threshold") is None:
            raise ValueError("task.threshold=tune but no validation has chosen a threshold yet; "
                             "evaluate val first (eval.py splits=[val,test]) or set task.threshold=NUMBER")
        return (float(self.task_cfg["tuned_threshold"]),)

    def _reset(self, split: str) -> None:
        num_labels = self.head.classifier.out_features
        thresholds = self._thresholds(split) if self.head.multi_label else (0.5,)
        counts = torch.zeros(len(thresholds), 3, num_labels, dtype=torch.long, device=self.device)
        self._sums = {"loss": 0.0, "count": 0, "correct": 0, "examples": 0, "thresholds": thresholds,
                      "labels": counts}

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def on_test_epoch_start(self) -> None:
        self._reset("test")

    def _accumulate(self, batch: Mapping[str, torch.Tensor]) -> None:
        logits, labels = self(batch), batch["labels"]
        s = self._sums
        s["loss"] += self.head.loss(logits, labels, reduction="sum").item()
        s["count"] += labels.numel()
        s["examples"] += labels.shape[0]
        if self.head.multi_label:
            thresholds = torch.tensor(s["thresholds"], device=logits.device)
            probs = torch.sigmoid(logits.float())
            s["labels"] += label_counts(probs >= thresholds.view(-1, 1, 1), labels)
        else:
            s["correct"] += int((self.head.predict(logits) == labels).sum())

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(batch)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(batch)

    def _log_eval(self, split: str) -> None:
        s = self._sums
        totals = torch.tensor([s["loss"], s["count"], s["correct"], s["examples"]], dtype=torch.float64,
                              device=self.device)
        counts = s["labels"]
        totals, counts = self.summed_over_ranks(totals), self.summed_over_ranks(counts)
        loss = (totals[0] / totals[1].clamp_min(1)).item()
        metrics = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if self.head.multi_label:
            best = best_threshold(counts, s["thresholds"])
            metrics["micro_f1"], metrics["macro_f1"] = f1_scores(counts[best])
            metrics["threshold"] = s["thresholds"][best]
            if split == "val" and len(s["thresholds"]) > 1:
                self.task_cfg["tuned_threshold"] = metrics["threshold"]
        else:
            metrics["accuracy"] = (totals[2] / totals[3].clamp_min(1)).item()
        for name, value in metrics.items():
            self.log(f"{split}/{name}", value, prog_bar=name != "ppl", sync_dist=False)
