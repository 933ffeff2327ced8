"""LRA Retrieval: do two ACL Anthology Network papers cite one another? (Radev et al. 2013)

Each example is a pair of documents, read as bytes like LRA Text (token = byte value, 0 pads),
at most ``seqlen`` bytes each (LRA: 4000). The model encodes both with one shared encoder and
classifies the pair from the two pooled vectors (``task.pair: true``, the two-tower
``longctx.models.heads.PairClassificationHead``). Labels: 1 = citation link, 0 = none.

Source: LRA's release ``lra_release/tsv_data/`` with ``new_aan_pairs.train.tsv``, ``.eval.tsv``
(validation) and ``.test.tsv``: one pair per line, five tab-separated fields ``label, id1, id2,
text1, text2``, no header and no quoting (as LRA's reader). The truncated byte tokens are cached
per source and seqlen (``<data root>/cache/lra/retrieval-<key>.npz``, written atomically).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from longctx.data.assets import log
from longctx.data.lra.common import (
    PathLike,
    TokenClassifyDataModule,
    TokenSequences,
    cache_file,
    load_npz,
    save_npz,
)
from longctx.data.lra.text import BYTE_VOCAB, PAD_ID, byte_tokens, ragged, source_fingerprint

SPLIT_FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv",
               "test": "new_aan_pairs.test.tsv"}
FIELDS = ("label", "id1", "id2", "text1", "text2")
FORMAT = 1  # bump when the cached layout changes


def read_pairs(path: PathLike, max_bytes: int) -> dict[str, np.ndarray]:
    """One TSV file -> {tokens, offsets, tokens_2, offsets_2, labels}: each pair's two documents
    as byte tokens (first ``max_bytes`` bytes) in ragged form, labels int64 (n,).

    Blank lines are skipped. ValueError naming ``path:line`` for a line without exactly five
    tab-separated fields or a label that is not 0 or 1 (LRA writes them as 0/1 or 0.0/1.0).
    """
    path = Path(path)
    first, second, labels = [], [], []
    with path.open("rb") as f:
        for number, line in enumerate(tqdm(f, desc=path.name, unit=" pairs", leave=False), start=1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            fields = line.split(b"\t")
            if len(fields) != len(FIELDS):
                raise ValueError(f"{path}:{number}: expected {len(FIELDS)} tab-separated fields "
                                 f"({', '.join(FIELDS)}), got {len(fields)}")
            try:
                label = float(fields[0])
            except ValueError:
                label = None
            if label not in (0.0, 1.0):
                raise ValueError(f"{path}:{number}: label must be 0 or 1, got {fields[0][:20]!r}")
            labels.append(int(label))
            first.append(byte_tokens(fields[3][:max_bytes]))
            second.append(byte_tokens(fields[4][:max_bytes]))
    if not labels:
        raise ValueError(f"{path}: no pairs")
    tokens, offsets = ragged(first)
    tokens_2, offsets_2 = ragged(second)
    return {"tokens": tokens, "offsets": offsets, "tokens_2": tokens_2, "offsets_2": offsets_2,
            "labels": np.array(labels, dtype=np.int64)}


class PairSequences(Dataset):
    """Items of two aligned TokenSequences as one: the first document's keys plus
    ``input_ids_2`` / ``attention_mask_2`` of the second."""

    def __init__(self, first: TokenSequences, second: TokenSequences) -> None:
        if len(first) != len(second):
            raise ValueError(f"{len(first)} first documents but {len(second)} second documents")
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        other = self.second[i]
        return {**self.first[i], "input_ids_2": other["input_ids"],
                "attention_mask_2": other["attention_mask"]}


class RetrievalDataModule(TokenClassifyDataModule):
    """LRA Retrieval batches: {input_ids, attention_mask, input_ids_2, attention_mask_2: int64
    (batch, seqlen); labels (batch,)} (2 labels, 256 byte tokens, pad 0; ``pair`` is True).

    Args:
        path: the folder holding the three new_aan_pairs.*.tsv files.
        seqlen: bytes per document (LRA: 4000).
        cache_dir: where the .npz goes (default ``<data root>/cache/lra``).
    """

    num_labels = 2
    vocab_size = BYTE_VOCAB
    pair = True

    def __init__(self, path: PathLike | None = None, seqlen: int = 4000, batch_size: int = 32,
                 num_workers: int = 0, cache_dir: PathLike | None = None, seed: int = 0) -> None:
        super().__init__(seqlen, batch_size, num_workers, seed, PAD_ID)
        if not path:
            raise ValueError("data.path is required: the folder of new_aan_pairs.{train,eval,test}.tsv "
                             "(lra_release/tsv_data)")
        self.path, self.cache_dir = Path(path), cache_dir
        self._splits: dict[str, dict[str, np.ndarray]] | None = None

    def load_splits(self) -> dict[str, dict[str, np.ndarray]]:
        if self._splits is not None:
            return self._splits
        files = {split: self.path / name for split, name in SPLIT_FILES.items()}
        for split, f in files.items():
            if not f.is_file():
                raise ValueError(f"data.path: no {f.name} in {self.path} (the {split} split)")
        params = {"format": FORMAT, "path": str(self.path.resolve()), "seqlen": self.seqlen,
                  "files": source_fingerprint(list(files.values()))}
        cache = cache_file("retrieval", params, self.cache_dir)
        if cache.is_file():
            log.info("longctx: using cached AAN pairs in %s", cache)
            flat = load_npz(cache)
        else:
            flat = {f"{split}_{k}": v for split, f in files.items()
                    for k, v in read_pairs(f, self.seqlen).items()}
            save_npz(cache, flat)
            log.info("longctx: wrote %s", cache)
        keys = ("tokens", "offsets", "tokens_2", "offsets_2", "labels")
        self._splits = {split: {k: flat[f"{split}_{k}"] for k in keys} for split in SPLIT_FILES}
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split, a in self.load_splits().items():
            first = TokenSequences(a["tokens"], a["labels"], self.seqlen, self.pad_id, a["offsets"])
            second = TokenSequences(a["tokens_2"], a["labels"], self.seqlen, self.pad_id, a["offsets_2"])
            self.datasets[split] = PairSequences(first, second)
