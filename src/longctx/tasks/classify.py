"""Sequence classification: an encoder (BERT) plus a :class:`ClassificationHead`.

Batches are dicts {input_ids, attention_mask, token_type_ids: (batch, seqlen); labels: (batch,)
class indices, or (batch, num_labels) multi-hot}. The number of labels and the mode come from
``task.num_labels`` / ``task.multi_label`` or, when those are null, from the datamodule at setup;
they are then written into the config that travels in every checkpoint, so eval.py rebuilds the
same head from the file alone.

Evaluation metrics are computed from counts accumulated over the whole split, never averaged
per batch: loss = summed loss / count, accuracy = correct / examples; multi-label micro-F1 from
the label-summed TP/FP/FN and macro-F1 as the mean of per-label F1 = 2TP / (2TP + FP + FN)
(0 for a label with no TP, FP or FN), predictions at ``task.threshold``. ``{split}/ppl`` =
exp(loss) is logged too, for tools that read it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from longctx.models import build_model
from longctx.models.heads import ClassificationHead
from longctx.tasks.base import Task


def label_counts(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-label true positives, false positives and false negatives of 0/1 matrices preds and
    targets (batch, num_labels) -> int64 (3, num_labels)."""
    preds, targets = preds.bool(), targets.bool()
    return torch.stack([(preds & targets).sum(0), (preds & ~targets).sum(0),
                        (~preds & targets).sum(0)]).long()


def f1_scores(counts: torch.Tensor) -> tuple[float, float]:
    """(micro-F1, macro-F1) from per-label counts (3, num_labels) of TP, FP, FN.

    F1 = 2TP / (2TP + FP + FN), taken as 0 where the denominator is 0 (a label never predicted
    nor present), as scikit-learn's ``zero_division=0``.
    """
    tp, fp, fn = counts.double()

    def f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        denom = 2 * tp + fp + fn
        return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom))

    return float(f1(tp.sum(), fp.sum(), fn.sum())), float(f1(tp, fp, fn).mean())


class Classify(Task):
    """The encoder of ``config['model']`` and a classification head, trained with cross-entropy
    (single-label) or BCE with logits (multi-label) and the optimiser of ``config['task']``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
        self.task_cfg, self.max_steps = self.config["task"], config["trainer"]["max_steps"]
        self.encoder = build_model(config["model"])
        self.head: ClassificationHead | None = None
        if self.task_cfg.get("num_labels"):
            self._build_head(int(self.task_cfg["num_labels"]), bool(self.task_cfg.get("multi_label")))
        self._sums: dict[str, Any] = {}

    def _build_head(self, num_labels: int, multi_label: bool) -> None:
        self.task_cfg["num_labels"], self.task_cfg["multi_label"] = num_labels, multi_label
        self.head = ClassificationHead(self.encoder.config.n_embd, num_labels, self.task_cfg["pooling"],
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
        vocab = self.encoder.config.vocab_size
        if data.tokenizer_vocab_size > vocab:
            raise ValueError(f"the data's tokenizer has {data.tokenizer_vocab_size} tokens, more than "
                             f"model.vocab_size={vocab}")

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Batch dict -> logits (batch, num_labels)."""
        assert self.head is not None, "the head is built in __init__ or setup"
        mask = batch["attention_mask"]
        hidden = self.encoder(batch["input_ids"], mask, batch.get("token_type_ids"))
        pooled = None
        if self.head.pooling == "cls" and hasattr(self.encoder, "pool"):
            pooled = self.encoder.pool(hidden)
        return self.head(hidden, mask, pooled)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.head.loss(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _reset(self) -> None:
        num_labels = self.head.classifier.out_features
        self._sums = {"loss": 0.0, "count": 0, "correct": 0, "examples": 0,
                      "labels": torch.zeros(3, num_labels, dtype=torch.long, device=self.device)}

    def on_validation_epoch_start(self) -> None:
        self._reset()

    def on_test_epoch_start(self) -> None:
        self._reset()

    def _accumulate(self, batch: Mapping[str, torch.Tensor]) -> None:
        logits, labels = self(batch), batch["labels"]
        s = self._sums
        s["loss"] += self.head.loss(logits, labels, reduction="sum").item()
        s["count"] += labels.numel()
        s["examples"] += labels.shape[0]
        preds = self.head.predict(logits, self.task_cfg.get("threshold", 0.5))
        if self.head.multi_label:
            s["labels"] += label_counts(preds, labels)
        else:
            s["correct"] += int((preds == labels).sum())

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(batch)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate(batch)

    def _log_eval(self, split: str) -> None:
        s = self._sums
        totals = torch.tensor([s["loss"], s["count"], s["correct"], s["examples"]], dtype=torch.float64,
                              device=self.device)
        counts = s["labels"]
        if self.trainer.world_size > 1:
            totals = self.all_gather(totals).reshape(-1, 4).sum(0)
            counts = self.all_gather(counts).reshape(-1, *counts.shape).sum(0)
        loss = (totals[0] / totals[1].clamp_min(1)).item()
        metrics = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if self.head.multi_label:
            metrics["micro_f1"], metrics["macro_f1"] = f1_scores(counts)
        else:
            metrics["accuracy"] = (totals[2] / totals[3].clamp_min(1)).item()
        for name, value in metrics.items():
            self.log(f"{split}/{name}", value, prog_bar=name != "ppl", sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")
