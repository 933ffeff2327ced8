"""LRA Text: IMDb movie-review sentiment (Maas et al. 2011) classified from raw bytes.

LRA reads each review as a byte string and classifies it from at most 4k byte tokens (no
tokenizer, so the model must compose characters into words). A token is the byte's value
(vocabulary 256); id 0 (the NUL byte, which text does not contain) pads, with attention_mask 0.
Labels: 0 negative, 1 positive.

Sources, both local (IMDb cannot ship with the repository):

- the ``aclImdb`` folder of ``aclImdb_v1.tar.gz`` as published: ``train/pos/*.txt``,
  ``train/neg/*.txt``, ``test/pos/*.txt``, ``test/neg/*.txt`` (``unsup`` is ignored); files are
  read in name order;
- the Hugging Face ``imdb`` dataset as parquet (``train-*.parquet`` and ``test-*.parquet`` with
  columns ``text`` and ``label``, anywhere under the given folder), read with pyarrow.

Splits: LRA validates on the test set (IMDb has no validation split); ``val_fraction > 0`` holds
out that fraction of train instead (seeded by ``split_seed``). The byte tokens of every review
are cached once per source (``<data root>/cache/lra/text-<key>.npz``, written atomically); the
key covers the folder and its files' names, sizes and modification times, so an edited copy is
read again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from longctx.data.assets import log
from longctx.data.lra.common import PathLike, TokenClassifyDataModule, cache_file, load_npz, save_npz

PAD_ID = 0  # the NUL byte
BYTE_VOCAB = 256
FORMAT = 1  # bump when the cached layout changes


def byte_tokens(text: bytes | str) -> np.ndarray:
    """UTF-8 bytes of ``text`` -> token ids uint8 (the byte values)."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(raw, dtype=np.uint8).copy()


def ragged(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of tokens -> (flat tokens, offsets (n + 1,) int64): row i is flat[offsets[i]:offsets[i + 1]]."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.uint8)
    return flat.astype(np.uint8), offsets


def source_fingerprint(files: list[Path]) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of each file: part of a cache key, so edited sources are re-read."""
    out = []
    for f in files:
        st = f.stat()
        out.append((f.name, st.st_size, st.st_mtime_ns))
    return out


def _acl_files(root: Path) -> dict[str, list[tuple[Path, int]]]:
    """{train, test: [(file, label)]} of an aclImdb folder; ValueError naming a missing folder."""
    splits = {}
    for split in ("train", "test"):
        files = []
        for label, name in ((0, "neg"), (1, "pos")):
            folder = root / split / name
            if not folder.is_dir():
                raise ValueError(f"{folder}: no such folder; data.path must be the aclImdb folder "
                                 "(train/pos, train/neg, test/pos, test/neg of aclImdb_v1.tar.gz)")
            files.extend((f, label) for f in sorted(folder.glob("*.txt")))
        if not files:
            raise ValueError(f"{root / split}: no reviews (*.txt) in pos/ or neg/")
        splits[split] = files
    return splits


def _parquet_files(root: Path) -> dict[str, list[Path]]:
    """{train, test: [parquet files]} under a folder of the Hugging Face imdb dataset."""
    found = {split: sorted(root.rglob(f"{split}-*.parquet")) for split in ("train", "test")}
    for split, files in found.items():
        if not files:
            raise ValueError(f"{root}: no {split}-*.parquet file (the Hugging Face imdb layout)")
    return found


def read_imdb(path: PathLike) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """{train, test: (byte-token rows, labels int64)} from an aclImdb folder or a folder of the
    Hugging Face imdb parquet files. ValueError naming the file (and parquet row) of an empty
    review or a label other than 0/1."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data.path: no such folder: {root}")
    out = {}
    if (root / "train").is_dir():
        for split, files in _acl_files(root).items():
            rows = []
            for f, _ in tqdm(files, desc=f"IMDb {split}", unit="review", leave=False):
                raw = f.read_bytes()
                if not raw.strip():
                    raise ValueError(f"{f}: empty review")
                rows.append(byte_tokens(raw))
            out[split] = (rows, np.array([label for _, label in files], dtype=np.int64))
        return out
    import pyarrow.parquet as pq

    for split, files in _parquet_files(root).items():
        rows, labels = [], []
        for f in files:
            table = pq.read_table(f)
            missing = {"text", "label"} - set(table.column_names)
            if missing:
                raise ValueError(f"{f}: no column {', '.join(sorted(missing))} (expected text, label)")
            for i, (text, label) in enumerate(zip(table.column("text").to_pylist(),
                                                  table.column("label").to_pylist())):
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"{f}: row {i}: empty or missing text")
                if label not in (0, 1):
                    raise ValueError(f"{f}: row {i}: label must be 0 or 1, got {label!r}")
                rows.append(byte_tokens(text))
                labels.append(label)
        out[split] = (rows, np.array(labels, dtype=np.int64))
    return out


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) of a seeded random ``fraction`` of n examples (both sorted)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction))
    return np.sort(perm[cut:]), np.sort(perm[:cut])


def take(tokens: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ragged rows ``index`` of (tokens, offsets), as a new (tokens, offsets)."""
    return ragged([tokens[offsets[i]:offsets[i + 1]] for i in index])


class TextDataModule(TokenClassifyDataModule):
    """LRA Text batches for ``longctx.tasks.classify`` (2 labels, 256 byte tokens, pad 0).

    Args:
        path: an aclImdb folder or a folder of the Hugging Face imdb parquet files (module docstring).
        seqlen: byte tokens per row (LRA: 4000); longer reviews are truncated.
        val_fraction: 0 validates on the test split, as LRA; else that fraction of train, held out.
        split_seed: which training reviews are held out.
        cache_dir: where the .npz goes (default ``<data root>/cache/lra``).
    """

    num_labels = 2
    vocab_size = BYTE_VOCAB

    def __init__(self, path: PathLike | None = None, seqlen: int = 4000, batch_size: int = 32,
                 num_workers: int = 0, val_fraction: float = 0.0, split_seed: int = 0,
                 cache_dir: PathLike | None = None, seed: int = 0) -> None:
        super().__init__(seqlen, batch_size, num_workers, seed, PAD_ID)
        if not path:
            raise ValueError("data.path is required: the aclImdb folder (or the HF imdb parquet folder)")
        self.path, self.val_fraction, self.split_seed = Path(path), val_fraction, split_seed
        holdout(1, val_fraction, split_seed)  # a bad fraction fails here, not after reading 50k files
        self.cache_dir = cache_dir
        self._splits: dict[str, dict[str, np.ndarray]] | None = None

    def _cache_path(self) -> Path:
        if not self.path.is_dir():
            raise ValueError(f"data.path: no such folder: {self.path}")
        files = sorted(p for p in self.path.rglob("*") if p.suffix in (".txt", ".parquet")
                       and "unsup" not in p.relative_to(self.path).parts)
        return cache_file("text", {"format": FORMAT, "path": str(self.path.resolve()),
                                   "files": source_fingerprint(files)}, self.cache_dir)

    def load_splits(self) -> dict[str, dict[str, np.ndarray]]:
        if self._splits is not None:
            return self._splits
        cache = self._cache_path()
        if cache.is_file():
            log.info("longctx: using cached IMDb bytes in %s", cache)
            flat = load_npz(cache)
        else:
            flat = {}
            for split, (rows, labels) in read_imdb(self.path).items():
                flat[f"{split}_tokens"], flat[f"{split}_offsets"] = ragged(rows)
                flat[f"{split}_labels"] = labels
            save_npz(cache, flat)
            log.info("longctx: wrote %s", cache)
        test = {k: flat[f"test_{k}"] for k in ("tokens", "offsets", "labels")}
        train = {k: flat[f"train_{k}"] for k in ("tokens", "offsets", "labels")}
        if self.val_fraction > 0:
            keep, held = holdout(len(train["labels"]), self.val_fraction, self.split_seed)
            parts = {}
            for name, index in (("train", keep), ("val", held)):
                tokens, offsets = take(train["tokens"], train["offsets"], index)
                parts[name] = {"tokens": tokens, "offsets": offsets, "labels": train["labels"][index]}
            self._splits = {**parts, "test": test}
        else:
            self._splits = {"train": train, "val": test, "test": test}
        return self._splits
