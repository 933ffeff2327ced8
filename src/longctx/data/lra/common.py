"""What the LRA tasks share: cached integer token sequences -> sequence-classification batches.

A task's data is, per split, token sequences (ragged: a flat token array plus offsets, or one
fixed-length row per example) and one class label each. :class:`TokenClassifyDataModule` turns
them into the batches of ``longctx.tasks.classify``: ``input_ids``, ``attention_mask``,
``token_type_ids`` int64 (batch, seqlen) and ``labels`` int64 (batch,). Sequences are truncated to
``seqlen`` and padded with ``pad_id`` (mask 0) up to it, as LRA does.

Generated data is cached under ``<data root>/cache/lra/<task>-<key>.npz`` (one file, all splits),
where ``key`` hashes every generation parameter; the file is written to a temporary name and
renamed, so a killed generator never leaves a file that a later run would read.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from longctx.data.assets import data_root, log
from longctx.data.lm import _atomic_write, resumable_train_loader

SPLITS = ("train", "val", "test")
PathLike = str | os.PathLike[str]


def ordered_map(fn: Callable[[Any], Any], tasks: Iterable[Any], num_proc: int) -> Iterator[Any]:
    """``map(fn, tasks)`` over ``num_proc`` processes, results in task order.

    Workers are forked where the platform allows (they inherit the imported modules instead of
    importing torch and lightning again, seconds per worker), else spawned. ``fn`` must be a
    module-level function; the pool is closed when the iterator is exhausted or dropped.
    """
    if num_proc <= 1:
        yield from map(fn, tasks)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(num_proc)
    try:
        yield from pool.imap(fn, tasks)
    finally:
        pool.terminate()


def default_num_proc(num_proc: int | None, chunks: int) -> int:
    """Processes to use: ``num_proc`` or the CPU count, at most 16 and at most one per chunk."""
    return max(1, min(num_proc or os.cpu_count() or 1, 16, chunks))


def cache_file(task: str, params: Mapping[str, Any], cache_dir: PathLike | None = None) -> Path:
    """``<cache_dir>/<task>-<16 hex digits of sha256(params)>.npz``; cache_dir defaults to
    ``<data root>/cache/lra``. ``params`` must be JSON-serialisable and hold every input of the
    generator (including a format version), so a changed recipe never reads an old file."""
    folder = Path(cache_dir) if cache_dir is not None else data_root() / "cache" / "lra"
    key = hashlib.sha256(json.dumps(dict(params), sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{task}-{key}.npz"


def save_npz(path: Path, arrays: Mapping[str, np.ndarray], compressed: bool = True) -> None:
    """Write ``arrays`` to ``path`` as an .npz, atomically (temp file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compressed else np.savez
    _atomic_write(path, lambda f: save(f, **arrays))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, read into memory."""
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


class TokenSequences(Dataset):
    """Examples of one split as classification items, truncated/padded to ``seqlen``.

    Args:
        tokens: (n, length) fixed-length rows, or a flat (total,) array with ``offsets`` (n + 1,)
            such that example i is ``tokens[offsets[i]:offsets[i + 1]]``.
        labels: (n,) class indices.
        seqlen: length of every item; longer examples are truncated, shorter ones padded.
        pad_id: the padding token (attention_mask 0 there).
    """

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, seqlen: int, pad_id: int = 0,
                 offsets: np.ndarray | None = None) -> None:
        if seqlen < 1:
            raise ValueError(f"data.seqlen must be positive, got {seqlen}")
        count = len(offsets) - 1 if offsets is not None else len(tokens)
        if count != len(labels):
            raise ValueError(f"{count} token sequences but {len(labels)} labels")
        self.tokens, self.offsets, self.labels = tokens, offsets, labels
        self.seqlen, self.pad_id = seqlen, pad_id

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.offsets is None:
            row = self.tokens[i].reshape(-1)[:self.seqlen]
        else:
            row = self.tokens[self.offsets[i]:min(self.offsets[i + 1], self.offsets[i] + self.seqlen)]
        ids = torch.full((self.seqlen,), self.pad_id, dtype=torch.long)
        ids[:len(row)] = torch.from_numpy(row.astype(np.int64))
        mask = torch.zeros(self.seqlen, dtype=torch.long)
        mask[:len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                "labels": torch.tensor(int(self.labels[i]), dtype=torch.long)}


class TokenClassifyDataModule(L.LightningDataModule):
    """Sequence classification over generated/cached token sequences (see the module docstring).

    Subclasses give ``num_labels``, ``vocab_size`` and :meth:`load_splits`; this class does the
    batching. The train loader reshuffles each epoch from (seed, epoch) and resumes at the next
    batch (``longctx.data.lm.resumable_train_loader``).
    """

    num_labels: int
    vocab_size: int
    multi_label = False

    def __init__(self, seqlen: int, batch_size: int, num_workers: int, seed: int, pad_id: int = 0) -> None:
        super().__init__()
        self.seqlen, self.batch_size, self.num_workers = seqlen, batch_size, num_workers
        self.seed, self.pad_id = seed, pad_id
        self.datasets: dict[str, TokenSequences] = {}

    @property
    def tokenizer_vocab_size(self) -> int:
        """Checked against model.vocab_size by the classify task."""
        return self.vocab_size

    @abstractmethod
    def load_splits(self) -> dict[str, dict[str, np.ndarray]]:
        """``{split: {"tokens", "labels"[, "offsets"]}}``, generating and caching on first use."""

    def prepare_data(self) -> None:
        """Generate (or find) the cache now, so that errors show before training starts."""
        self.load_splits()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split, arrays in self.load_splits().items():
            self.datasets[split] = TokenSequences(arrays["tokens"], arrays["labels"], self.seqlen,
                                                  self.pad_id, arrays.get("offsets"))
        log.info("longctx: %s", ", ".join(f"{s} {len(d)}" for s, d in self.datasets.items()))

    def _loader_kwargs(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "num_workers": self.num_workers,
                "pin_memory": torch.cuda.is_available(), "persistent_workers": self.num_workers > 0}

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return resumable_train_loader(self.datasets["train"], self.seed, self.trainer,
                                      **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.datasets["val"], shuffle=False, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.datasets["test"], shuffle=False, **self._loader_kwargs())
