"""Masked-LM data: a WordPiece vocabulary trained on train -> [CLS] ... [SEP] sequences -> BERT masking.

Vocabulary: BERT's recipe with `tokenizers` (BertNormalizer lowercasing, BertPreTokenizer, WordPiece
with "##" continuations), special tokens [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, trained on
the corpus's TRAIN split only, so held-out text never shapes it. It is cached as
``<cache_dir>/<corpus>-<key>/vocab.txt`` (one token a line, line i = id i; key hashes the corpus
identity and ``vocab_size``), written atomically, or read from a given vocab.txt. A small corpus
may give fewer than ``vocab_size`` tokens; the model's extra embedding rows are then never used.

Sequences: each document is tokenized and cut into pieces of at most seqlen - 2 tokens, each
wrapped as [CLS] piece [SEP] (a long document spans several sequences; sequences never mix
documents). A split is stored like lm.py's caches: ``{split}.bin`` holds all sequences back to back
(uint16/uint32), ``{split}.idx`` their int64 start offsets (n + 1 of them), ``meta.json`` last.

Masking (Devlin et al. 2019): each non-special token is selected with probability ``mask_prob``;
a selected token becomes [MASK] with probability 0.8, a uniformly random non-special token with
0.1, and stays unchanged with 0.1. Labels are the original ids at selected positions, -100
elsewhere. The masks of example i in epoch e come from a generator seeded by (seed, e, i), so they
do not depend on worker count or iteration history and a resumed run sees the same masks.
Validation and test use epoch 0: fixed masks, comparable losses across evaluations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch.utils.data import DataLoader, Dataset

from longctx.data.assets import data_root, log
from longctx.data.lm import (
    SPLITS,
    Corpus,
    EpochShuffleSampler,
    FilePaths,
    PathLike,
    ResumableLoader,
    _atomic_write,
    _read_meta,
    cache_key,
    make_corpus,
    resumable_train_loader,
    token_dtype,
)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
N_SPECIAL = len(SPECIAL_TOKENS)
"""Ids below N_SPECIAL are special: never selected for masking, never drawn as random replacements."""
IGNORE_INDEX = -100
VOCAB_FORMAT = 1  # bump when the vocabulary recipe changes


def _wordpiece_pipeline(model: models.WordPiece) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def train_wordpiece(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A BERT-style WordPiece tokenizer trained on ``texts``; the special tokens get ids 0..4."""
    tokenizer = _wordpiece_pipeline(models.WordPiece(unk_token="[UNK]"))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_wordpiece(vocab_path: PathLike) -> Tokenizer:
    """The WordPiece tokenizer of a vocab.txt (line i = id i); its first five lines must be
    [PAD] [UNK] [CLS] [SEP] [MASK] in that order (ValueError otherwise)."""
    tokenizer = _wordpiece_pipeline(models.WordPiece.from_file(str(vocab_path), unk_token="[UNK]"))
    found = tuple(tokenizer.id_to_token(i) for i in range(N_SPECIAL))
    if found != SPECIAL_TOKENS:
        raise ValueError(f"{vocab_path}: ids 0..4 must be {list(SPECIAL_TOKENS)}, got {list(found)}")
    return tokenizer


def _write_vocab(tokenizer: Tokenizer, path: Path) -> None:
    """vocab.txt of ``tokenizer`` (line i = token of id i), written atomically."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    _atomic_write(path, lambda f: f.write("".join(t + "\n" for t in tokens).encode()))


def wordpiece_for_corpus(corpus: Corpus, vocab_size: int, cache_dir: Path) -> Tokenizer:
    """The corpus's WordPiece tokenizer: loaded from ``<cache_dir>/<corpus>-<key>/vocab.txt`` when
    present, else trained on the train split and cached there (key: corpus identity, vocab_size)."""
    payload = {"format": VOCAB_FORMAT, "corpus": corpus.identity(), "vocab_size": vocab_size}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"{corpus.name}-wordpiece-{key}" / "vocab.txt"
    if path.is_file():
        log.info("longctx: using cached WordPiece vocabulary %s", path)
        return load_wordpiece(path)
    log.info("longctx: training a %d-token WordPiece vocabulary into %s", vocab_size, path)
    train = corpus.documents()["train"]
    tokenizer = train_wordpiece((row["text"] for row in train), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_vocab(tokenizer, path)
    return load_wordpiece(path)


def pack_sequences(docs: datasets.Dataset, tokenizer: Tokenizer,
                   seqlen: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``docs["text"]`` and cut each document into [CLS] piece [SEP] sequences.

    Returns (tokens, offsets): tokens (N,) of ``token_dtype(vocab)``, all sequences back to back;
    offsets (n + 1,) int64, sequence j = tokens[offsets[j]:offsets[j + 1]], of length <= seqlen.
    Empty documents give no sequence.
    """
    if seqlen < 3:
        raise ValueError(f"seqlen must be >= 3 to hold [CLS] x [SEP], got {seqlen}")
    body = seqlen - 2
    dtype = token_dtype(tokenizer.get_vocab_size())
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    for batch in docs.iter(batch_size=1024):
        for enc in tokenizer.encode_batch(batch["text"], add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.int64)
            for start in range(0, len(ids), body):
                seq = np.concatenate([[CLS_ID], ids[start:start + body], [SEP_ID]]).astype(dtype)
                pieces.append(seq)
                lengths.append(len(seq))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return tokens, offsets


def build_sequence_cache(corpus: Corpus, tokenizer: Tokenizer, seqlen: int, cache_dir: Path) -> Path:
    """Return ``<cache_dir>/<corpus>-mlm-<key>`` with every split packed, building it only if absent."""
    identity = {"corpus": corpus.identity(), "seqlen": seqlen, "layout": "cls-piece-sep"}
    cache = cache_dir / f"{corpus.name}-mlm-{cache_key(identity, tokenizer)}"
    if _read_meta(cache) is not None:
        return cache
    log.info("longctx: packing %s into %s", corpus.name, cache)
    cache.mkdir(parents=True, exist_ok=True)
    docs = corpus.documents()
    counts, sequences = {}, {}
    for split in SPLITS:
        tokens, offsets = pack_sequences(docs[split], tokenizer, seqlen)
        _atomic_write(cache / f"{split}.bin", lambda f, t=tokens: f.write(t.tobytes()))
        _atomic_write(cache / f"{split}.idx", lambda f, o=offsets: f.write(o.astype("<i8").tobytes()))
        counts[split], sequences[split] = len(tokens), len(offsets) - 1
    meta = {"dtype": token_dtype(tokenizer.get_vocab_size()).str, "vocab_size": tokenizer.get_vocab_size(),
            "seqlen": seqlen, "tokens": counts, "sequences": sequences, "corpus": identity["corpus"]}
    _atomic_write(cache / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return cache


def load_sequences(cache: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of ``split`` from a complete cache, as in :func:`pack_sequences`."""
    meta = _read_meta(cache)
    if meta is None:
        raise ValueError(f"{cache} is not a complete sequence cache")
    tokens = np.fromfile(cache / f"{split}.bin", dtype=np.dtype(meta["dtype"]))
    offsets = np.fromfile(cache / f"{split}.idx", dtype="<i8")
    if len(offsets) != meta["sequences"][split] + 1:
        raise ValueError(f"{cache / f'{split}.idx'} is truncated")
    return tokens, offsets


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator determined by (seed, epoch, index) alone."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


def mask_tokens(ids: torch.Tensor, vocab_size: int, mask_prob: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of int64 ``ids`` of any shape (...) -> (inputs, labels), both (...) int64.

    Tokens with id >= N_SPECIAL are selected with probability ``mask_prob``; selected ones become
    [MASK] (80%), a uniform random id in [N_SPECIAL, vocab_size) (10%) or stay (10%). Labels hold
    the original id at selected positions and -100 elsewhere.
    """
    selected = (torch.rand(ids.shape, generator=generator) < mask_prob) & (ids >= N_SPECIAL)
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(N_SPECIAL, vocab_size, ids.shape, generator=generator)
    inputs = torch.where(selected & (action < 0.8), MASK_ID, ids)
    inputs = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    labels = torch.where(selected, ids, IGNORE_INDEX)
    return inputs, labels


class MaskedSequences(Dataset[dict[str, torch.Tensor]]):
    """Packed sequences, padded to ``seqlen`` and masked per (seed, epoch, index).

    Item ``i`` (epoch 0) or ``(epoch, i)`` is a dict of int64 tensors of shape (seqlen,):
    input_ids, attention_mask (1 on real tokens, 0 on [PAD]), token_type_ids (zeros) and labels.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, seqlen: int, vocab_size: int,
                 mask_prob: float, seed: int) -> None:
        self.tokens, self.offsets, self.seqlen = tokens, offsets, seqlen
        self.vocab_size, self.mask_prob, self.seed = vocab_size, mask_prob, seed

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range [0, {len(self)})")
        seq = torch.from_numpy(self.tokens[self.offsets[i]:self.offsets[i + 1]].astype(np.int64))
        inputs, labels = mask_tokens(seq, self.vocab_size, self.mask_prob,
                                     example_generator(self.seed, epoch, i))
        pad = self.seqlen - len(seq)
        return {"input_ids": torch.nn.functional.pad(inputs, (0, pad), value=PAD_ID),
                "attention_mask": torch.nn.functional.pad(torch.ones_like(seq), (0, pad)),
                "token_type_ids": torch.zeros(self.seqlen, dtype=torch.int64),
                "labels": torch.nn.functional.pad(labels, (0, pad), value=IGNORE_INDEX)}


class EpochTaggedSampler(EpochShuffleSampler):
    """EpochShuffleSampler that yields ``(epoch, index)``, so that the masks of an example depend on
    the epoch even inside DataLoader workers (which hold their own copy of the dataset)."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


class MLMDataModule(L.LightningDataModule):
    """Masked-LM batches: dicts of int64 (batch_size, seqlen) input_ids, attention_mask,
    token_type_ids, labels (see the module docstring).

    Args:
        corpus, corpus_path, paths, dataset_config, text_column, split_seed, val_fraction,
            test_fraction: the documents and their split, as in LMDataModule.
        seqlen: tokens per sequence, [CLS] and [SEP] included.
        vocab_size: WordPiece vocabulary to train (an upper bound: a small corpus gives fewer);
            must equal model.vocab_size. vocab_path: a vocab.txt to use instead of training one.
        mask_prob: share of non-special tokens selected for prediction.
        seed: training order and masks. cache_dir: default ``<data root>/cache/mlm``.

    Resume: as LMDataModule's train loader (EpochShuffleSampler + ResumableLoader), and since the
    masks are a function of (seed, epoch, index), a resumed run sees the same masked batches.
    """

    def __init__(self, corpus: str = "shakespeare", seqlen: int = 128, batch_size: int = 8,
                 num_workers: int = 0, *, corpus_path: str | None = None, paths: FilePaths | None = None,
                 dataset_config: str | None = None, text_column: str = "text", vocab_size: int = 8000,
                 vocab_path: str | None = None, mask_prob: float = 0.15, seed: int = 0, split_seed: int = 0,
                 val_fraction: float = 0.05, test_fraction: float = 0.05,
                 cache_dir: PathLike | None = None) -> None:
        super().__init__()
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.seqlen, self.batch_size, self.num_workers = seqlen, batch_size, num_workers
        self.vocab_size, self.vocab_path, self.mask_prob, self.seed = vocab_size, vocab_path, mask_prob, seed
        self.cache_dir = Path(cache_dir) if cache_dir is not None else data_root() / "cache" / "mlm"
        self.corpus = make_corpus(corpus, corpus_path=corpus_path, paths=paths, text_column=text_column,
                                  dataset_config=dataset_config, val_fraction=val_fraction,
                                  test_fraction=test_fraction, split_seed=split_seed,
                                  hf_cache=self.cache_dir.parent / "hf")
        self.sequences: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The WordPiece tokenizer (trained and cached on first use, or read from vocab_path)."""
        if self._tokenizer is None:
            tokenizer = (load_wordpiece(self.vocab_path) if self.vocab_path
                         else wordpiece_for_corpus(self.corpus, self.vocab_size, self.cache_dir))
            if tokenizer.get_vocab_size() > self.vocab_size:
                raise ValueError(f"the WordPiece vocabulary has {tokenizer.get_vocab_size()} tokens, more "
                                 f"than data.vocab_size={self.vocab_size}; set data.vocab_size to it")
            self._tokenizer = tokenizer
        return self._tokenizer

    def prepare_data(self) -> None:
        """Train/cache the vocabulary and pack the splits (one process per node)."""
        build_sequence_cache(self.corpus, self.tokenizer, self.seqlen, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.sequences:
            return
        cache = build_sequence_cache(self.corpus, self.tokenizer, self.seqlen, self.cache_dir)
        self.sequences = {split: load_sequences(cache, split) for split in SPLITS}
        for split, (_, offsets) in self.sequences.items():
            if len(offsets) < 2:
                raise ValueError(f"split {split!r} has no sequences; lower the held-out fractions")

    def dataset(self, split: str) -> MaskedSequences:
        """The masked sequences of ``split`` (train, val or test)."""
        if not self.sequences:
            self.setup()
        tokens, offsets = self.sequences[split]
        return MaskedSequences(tokens, offsets, self.seqlen, self.tokenizer.get_vocab_size(), self.mask_prob,
                               self.seed)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "num_workers": self.num_workers,
                "pin_memory": torch.cuda.is_available(), "persistent_workers": self.num_workers > 0}

    def train_dataloader(self) -> ResumableLoader:
        return resumable_train_loader(self.dataset("train"), self.seed, self.trainer, EpochTaggedSampler,
                                      **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), shuffle=False, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("test"), shuffle=False, **self._loader_kwargs())
