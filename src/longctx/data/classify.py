"""Text classification data from JSONL: one ``{"text": ..., "label": ...}`` object per line
(single-label) or ``{"text": ..., "labels": [...]}`` (multi-label), one file per split.

The label vocabulary is the sorted set of the train split's labels (compared as strings), or a
fixed list given as ``labels``; a label outside it is an error, as is a row without text or a
broken line — each named by file and line number. With ``bad_rows="skip"`` such rows are left out
instead, counted, and reported once the splits are read. Texts are WordPiece-tokenized as BERT
does ([CLS] text [SEP], truncated then padded to ``seqlen``), with the vocabulary of a BERT
``vocab.txt`` or, for tests and demos without one, a WordPiece trained on the train split's texts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader, Dataset

from longctx.data.lm import resumable_train_loader

SPLITS = ("train", "val", "test")
BAD_ROWS = ("error", "skip")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PathLike = str | os.PathLike[str]


@dataclass
class Example:
    """One row: its text and its labels (one for single-label rows)."""

    text: str
    labels: list[str]
    line: int


def _parse_row(line: str, path: Path, number: int, multi: bool | None) -> tuple[Example, bool]:
    """Line ``number`` of ``path`` -> (its Example, whether it is multi-label); ValueError naming
    ``path:number``. ``multi``: what the file's earlier rows were (None before the first)."""
    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: broken JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with text and label")
    if not isinstance(row.get("text"), str):
        raise ValueError(f"{where}: missing or non-string 'text'")
    if ("label" in row) == ("labels" in row):
        raise ValueError(f"{where}: needs exactly one of 'label' (single-label) or 'labels' (a list)")
    row_multi = "labels" in row
    if multi is not None and row_multi != multi:
        raise ValueError(f"{where}: mixes 'label' and 'labels' rows in one file")
    if row_multi:
        if not isinstance(row["labels"], list):
            raise ValueError(f"{where}: 'labels' must be a list")
        labels = [str(x) for x in row["labels"]]
    else:
        if row["label"] is None:
            raise ValueError(f"{where}: 'label' is null")
        labels = [str(row["label"])]
    return Example(row["text"], labels, number), row_multi


def read_jsonl(path: PathLike, on_bad: Callable[[str], None] | None = None) -> tuple[list[Example], bool]:
    """Rows of a classification JSONL file and whether it is multi-label ("labels" lists).

    Blank lines are skipped. A bad row — broken JSON, not an object, a missing or non-string text,
    a missing label, or a file mixing "label" and "labels" — raises ValueError naming
    ``path:line``, or, when ``on_bad`` is given, is passed to it as that message and left out.
    """
    path = Path(path)
    examples: list[Example] = []
    multi: bool | None = None
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                example, multi = _parse_row(line, path, number, multi)
            except ValueError as err:
                if on_bad is None:
                    raise
                on_bad(str(err))
                continue
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no rows")
    return examples, bool(multi)


class BadRows:
    """The ``bad_rows`` policy of a loader: ``"error"`` raises at the first bad row; ``"skip"``
    leaves bad rows out and keeps their messages for one report when reading is done."""

    def __init__(self, policy: str = "error") -> None:
        if policy not in BAD_ROWS:
            raise ValueError(f"data.bad_rows='{policy}' is unknown; choose from: {', '.join(BAD_ROWS)}")
        self.policy = policy
        self.skipped: list[str] = []

    @property
    def handler(self) -> Callable[[str], None] | None:
        """For ``read_jsonl``'s on_bad: None (raise) or a collector."""
        return self.skipped.append if self.policy == "skip" else None

    def __call__(self, message: str) -> None:
        """A bad row: raise its one-line message, or count it."""
        if self.policy == "error":
            raise ValueError(message)
        self.skipped.append(message)

    def report(self) -> None:
        """Print how many rows were skipped and the first few reasons (nothing when none were)."""
        if self.skipped:
            shown = "; ".join(self.skipped[:3]) + ("; ..." if len(self.skipped) > 3 else "")
            print(f"skipped {len(self.skipped)} bad rows (data.bad_rows=skip): {shown}")


def wordpiece_tokenizer(vocab_path: PathLike | None = None, texts: Iterable[str] = (),
                        vocab_size: int = 2000, lowercase: bool = True) -> Tokenizer:
    """BERT's tokenizer: BERT normalizer and pre-tokenizer, WordPiece with ``##`` continuations,
    post-processing to ``[CLS] text [SEP]``.

    ``vocab_path``: a BERT vocab.txt (one token per line); None trains a WordPiece of at most
    ``vocab_size`` tokens on ``texts`` (for tests and demos; a local helper until a shared trainer
    exists). Ids of [PAD], [UNK], [CLS], [SEP], [MASK] are 0..4 for a trained vocabulary.
    """
    if vocab_path is not None:
        if not Path(vocab_path).is_file():
            raise ValueError(f"data.vocab_path: no such file: {vocab_path}")
        tokenizer = Tokenizer(models.WordPiece.from_file(str(vocab_path), unk_token="[UNK]"))
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if vocab_path is None:
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                            show_progress=False)
        tokenizer.train_from_iterator(texts, trainer=trainer)
    for token in ("[CLS]", "[SEP]", "[PAD]"):
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"WordPiece vocabulary {vocab_path} has no {token} token")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str], seqlen: int) -> dict[str, torch.Tensor]:
    """Texts -> input_ids, attention_mask, token_type_ids, each int64 (len(texts), seqlen):
    ``[CLS] text [SEP]`` truncated to seqlen (keeping [SEP] last), then padded with [PAD]."""
    if seqlen < 2:
        raise ValueError(f"data.seqlen must be at least 2 for [CLS] and [SEP], got {seqlen}")
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # leave the caller's padding settings alone
    tokenizer.enable_truncation(max_length=seqlen)
    tokenizer.enable_padding(length=seqlen, pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
    }


class ClassifyDataset(Dataset):
    """Pre-tokenized examples: item i is a dict of (seqlen,) tensors and its ``labels``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class ClassifyDataModule(L.LightningDataModule):
    """Batches {input_ids, attention_mask, token_type_ids: int64 (batch, seqlen); labels: int64
    (batch,) class indices, or float (batch, num_labels) multi-hot for multi-label data}.

    Args:
        paths: ``{train: file, val: file, test: file}`` JSONL files (see the module docstring).
        seqlen: tokens per example, [CLS] and [SEP] included.
        batch_size, num_workers: per-device DataLoader settings.
        vocab_path: a BERT vocab.txt; None trains a WordPiece of ``vocab_size`` on the train texts.
        lowercase: BERT's uncased normalisation.
        seed: order of the training examples (reshuffled every epoch).
        labels: the label vocabulary in order; None: the sorted labels of the train split.
        bad_rows: ``"error"`` (a bad row ends reading with its file:line) or ``"skip"`` (left out,
            counted, reported).
    """

    def __init__(self, paths: Mapping[str, PathLike] | None = None, seqlen: int = 128, batch_size: int = 16,
                 num_workers: int = 0, *, vocab_path: PathLike | None = None, vocab_size: int = 2000,
                 lowercase: bool = True, seed: int = 0, labels: Sequence[str] | None = None,
                 bad_rows: str = "error") -> None:
        super().__init__()
        self.bad_rows = BadRows(bad_rows)
        self.fixed_labels = [str(label) for label in labels] if labels is not None else None
        self.seqlen, self.batch_size, self.num_workers = seqlen, batch_size, num_workers
        self.vocab_path, self.vocab_size, self.lowercase, self.seed = vocab_path, vocab_size, lowercase, seed
        self.labels: list[str] = []
        self.multi_label = False
        self.tokenizer: Tokenizer | None = None
        self.datasets: dict[str, ClassifyDataset] = {}
        self.paths = self._check_paths(paths)

    @staticmethod
    def _check_paths(paths: Mapping[str, PathLike] | None) -> dict[str, Path]:
        """The JSONL file of every split; subclasses that build those files override this."""
        if not paths:
            raise ValueError("data.paths is required: "
                             "data.paths={train: a.jsonl, val: b.jsonl, test: c.jsonl}")
        missing = [s for s in SPLITS if not paths.get(s)]
        if missing:
            raise ValueError(f"data.paths has no {', '.join(missing)} file; "
                             "give data.paths={train: ..., val: ..., test: ...}")
        return {s: Path(paths[s]) for s in SPLITS}

    def split_files(self) -> dict[str, Path]:
        """The JSONL file of each split; subclasses convert their source format into these first."""
        return self.paths

    @property
    def num_labels(self) -> int:
        self.setup()
        return len(self.labels)

    def prepare_data(self) -> None:
        """Read and check every split now, so that a bad row fails before training starts."""
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        """Read the splits, build the label vocabulary and tokenizer, tokenize everything (once)."""
        if self.datasets:
            return
        self.paths = self.split_files()
        rows = {}
        for split in SPLITS:
            if not self.paths[split].is_file():
                raise ValueError(f"data.paths.{split}: no such file: {self.paths[split]}")
            rows[split] = read_jsonl(self.paths[split], self.bad_rows.handler)
        train, self.multi_label = rows["train"]
        for split in ("val", "test"):
            if rows[split][1] != self.multi_label:
                kind = "multi-label ('labels')" if self.multi_label else "single-label ('label')"
                raise ValueError(f"{self.paths[split]}: train is {kind} but this file is not")
        self.labels = self.fixed_labels or sorted({label for ex in train for label in ex.labels})
        index = {label: i for i, label in enumerate(self.labels)}
        examples = {split: self._known(rows[split][0], index, split) for split in SPLITS}
        self.bad_rows.report()
        self.tokenizer = wordpiece_tokenizer(self.vocab_path, (ex.text for ex in examples["train"]),
                                             self.vocab_size, self.lowercase)
        for split in SPLITS:
            targets = self._targets(examples[split], index)
            tensors = encode(self.tokenizer, [ex.text for ex in examples[split]], self.seqlen)
            self.datasets[split] = ClassifyDataset({**tensors, "labels": targets})

    def _known(self, examples: list[Example], index: Mapping[str, int], split: str) -> list[Example]:
        """The examples whose labels are all in the vocabulary; another is a bad row."""
        kept = []
        where = "the given labels" if self.fixed_labels else "the train split"
        for ex in examples:
            unknown = [label for label in ex.labels if label not in index]
            if unknown:
                self.bad_rows(f"{self.paths[split]}:{ex.line}: label {unknown[0]!r} does not "
                              f"occur in {where} ({len(index)} labels)")
            else:
                kept.append(ex)
        if not kept:
            raise ValueError(f"{self.paths[split]}: no usable rows")
        return kept

    def _targets(self, examples: list[Example], index: Mapping[str, int]) -> torch.Tensor:
        """Class indices (n,) int64, or multi-hot (n, num_labels) float32 for multi-label data."""
        multi_hot = torch.zeros(len(examples), len(index))
        for i, ex in enumerate(examples):
            for label in ex.labels:
                multi_hot[i, index[label]] = 1.0
        if self.multi_label:
            return multi_hot
        return torch.tensor([index[ex.labels[0]] for ex in examples], dtype=torch.long)

    @property
    def tokenizer_vocab_size(self) -> int:
        self.setup()
        return self.tokenizer.get_vocab_size() if self.tokenizer is not None else 0

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        return DataLoader(self.datasets[split], batch_size=self.batch_size, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """This rank's share of a (seed, epoch)-shuffled order, positioned by the trainer's progress
        so that a resumed run continues at the next batch (longctx.data.lm.resumable_train_loader)."""
        self.setup()
        return resumable_train_loader(
            self.datasets["train"], self.seed, self.trainer, batch_size=self.batch_size,
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

