"""Masked-LM data: BERT masking statistics, exact labels, determinism, WordPiece cache, packing."""

from __future__ import annotations

import os
import random
from typing import Any

import datasets
import numpy as np
import pytest
import torch

import longctx.data.lm as lm
from longctx.data.lm import Corpus
from longctx.data.mlm import (
    CLS_ID,
    MASK_ID,
    N_SPECIAL,
    SEP_ID,
    SPECIAL_TOKENS,
    MaskedSequences,
    MLMDataModule,
    mask_tokens,
    pack_sequences,
    wordpiece_for_corpus,
)

WORDS = ["the", "king", "queen", "speaks", "to", "a", "lord", "of", "night", "and", "day", "my", "heart",
         "is", "true", "thou", "art", "fair", "what", "light", "breaks", "yonder"]


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))) + "." for _ in range(n)]


class ListCorpus(Corpus):
    """Documents from Python lists; counts how often they are loaded."""

    name = "listcorpus"

    def __init__(self, splits: dict[str, list[str]]) -> None:
        self.splits, self.loads = splits, 0

    def identity(self) -> dict[str, Any]:
        return {"corpus": self.name, "docs": self.splits}

    def documents(self) -> dict[str, datasets.Dataset]:
        self.loads += 1
        return {s: datasets.Dataset.from_dict({"text": docs}) for s, docs in self.splits.items()}


@pytest.fixture
def corpus() -> ListCorpus:
    return ListCorpus({"train": _docs(60), "val": _docs(8, 1), "test": _docs(8, 2)})


def test_masking_statistics_follow_bert():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(N_SPECIAL, 1000, (400, 512), generator=g)
    ids[:, 0], ids[:, -1], ids[:, 100:140] = CLS_ID, SEP_ID, 0  # [CLS], [SEP], [PAD]
    inputs, labels = mask_tokens(ids, 1000, 0.15, torch.Generator().manual_seed(1))
    special = ids < N_SPECIAL
    selected = labels != -100
    assert not selected[special].any() and torch.equal(inputs[special], ids[special])
    assert selected[~special].double().mean().item() == pytest.approx(0.15, abs=0.01)
    assert torch.equal(labels[selected], ids[selected])  # labels are the original ids
    assert (labels[~selected] == -100).all()
    assert torch.equal(inputs[~selected], ids[~selected])  # nothing else changes
    n = selected.sum().item()
    masked = (inputs[selected] == MASK_ID).sum().item() / n
    kept = (inputs[selected] == ids[selected]).sum().item() / n
    replaced = inputs[selected][(inputs[selected] != MASK_ID) & (inputs[selected] != ids[selected])]
    assert masked == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / 995, abs=0.02)  # unchanged, or a random draw of itself
    assert len(replaced) / n == pytest.approx(0.1, abs=0.02)
    assert replaced.min().item() >= N_SPECIAL and replaced.max().item() < 1000


def _dataset(seed: int = 7) -> MaskedSequences:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 33, size=50)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(N_SPECIAL, 300, size=offsets[-1]).astype(np.uint16)
    tokens[offsets[:-1]], tokens[offsets[1:] - 1] = CLS_ID, SEP_ID
    return MaskedSequences(tokens, offsets, 32, 300, 0.3, seed)


def test_items_are_padded_and_deterministic_in_seed_epoch_and_index():
    data = _dataset()
    item = data[(3, 10)]
    length = int(data.offsets[11] - data.offsets[10])
    assert all(v.shape == (32,) and v.dtype == torch.int64 for v in item.values())
    assert item["attention_mask"].tolist() == [1] * length + [0] * (32 - length)
    assert (item["input_ids"][length:] == 0).all() and (item["labels"][length:] == -100).all()
    assert (item["token_type_ids"] == 0).all()
    for key, value in item.items():
        assert torch.equal(value, _dataset()[(3, 10)][key])  # a fresh copy: same masks
    assert torch.equal(data[10]["labels"], data[(0, 10)]["labels"])  # plain index = epoch 0
    assert not torch.equal(data[(4, 10)]["labels"], item["labels"])  # next epoch: new masks
    assert not torch.equal(_dataset(seed=8)[(3, 10)]["labels"], item["labels"])


def test_pack_sequences_cuts_documents_into_cls_sep_pieces(corpus, tmp_path):
    tokenizer = wordpiece_for_corpus(corpus, 100, tmp_path)
    docs = ["the king speaks to the queen " * 7, "", "night."]
    tokens, offsets = pack_sequences(datasets.Dataset.from_dict({"text": docs}), tokenizer, 10)
    seqs = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    first = tokenizer.encode(docs[0], add_special_tokens=False).ids
    expected = [first[i:i + 8] for i in range(0, len(first), 8)]
    expected.append(tokenizer.encode(docs[2], add_special_tokens=False).ids)
    assert [s[1:-1] for s in seqs] == expected
    assert all(s[0] == CLS_ID and s[-1] == SEP_ID and len(s) <= 10 for s in seqs)


def test_wordpiece_is_trained_on_train_cached_atomically_and_reused(corpus, tmp_path, monkeypatch):
    real_replace = os.replace

    def crash(*args: Any) -> None:
        raise OSError("killed")

    monkeypatch.setattr(lm.os, "replace", crash)
    with pytest.raises(OSError):
        wordpiece_for_corpus(corpus, 120, tmp_path)
    assert not list(tmp_path.rglob("vocab.txt*"))  # no partial vocabulary, no temp left
    monkeypatch.setattr(lm.os, "replace", real_replace)

    tokenizer = wordpiece_for_corpus(corpus, 120, tmp_path)
    loads = corpus.loads
    (vocab,) = tmp_path.rglob("vocab.txt")
    lines = vocab.read_text().splitlines()
    assert tuple(lines[:N_SPECIAL]) == SPECIAL_TOKENS and len(lines) == tokenizer.get_vocab_size() <= 120
    assert [tokenizer.token_to_id(t) for t in lines] == list(range(len(lines)))
    assert tokenizer.encode("The KING", add_special_tokens=False).tokens == ["the", "king"]
    again = wordpiece_for_corpus(corpus, 120, tmp_path)
    assert corpus.loads == loads and again.get_vocab() == tokenizer.get_vocab()  # reused, not retrained
    wordpiece_for_corpus(corpus, 100, tmp_path)
    assert len(list(tmp_path.rglob("vocab.txt"))) == 2  # another size: another cache entry

    held_out = ListCorpus({"train": ["alpha beta"] * 20, "val": ["zebra"], "test": ["zebra"]})
    assert "zebra" not in wordpiece_for_corpus(held_out, 200, tmp_path).get_vocab()


def test_datamodule_batches_and_resumed_train_order(tmp_path, monkeypatch):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "{d}"}}\n' for d in _docs(120)))
    dm = MLMDataModule("files", seqlen=24, batch_size=4, paths=[str(path)], vocab_size=150, seed=3,
                       cache_dir=tmp_path / "cache")
    dm.prepare_data()
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert all(v.shape == (4, 24) and v.dtype == torch.int64 for v in batch.values())
    assert torch.equal(batch["attention_mask"].bool(), batch["input_ids"] != 0)

    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    full = [b["input_ids"] for b in loader]
    loader.load_state_dict({"epoch": 2, "samples_done": 3 * 4})
    resumed = [b["input_ids"] for b in loader]
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:]))


def test_worker_processes_mask_by_the_sampler_epoch(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "{d}"}}\n' for d in _docs(60)))
    dm = MLMDataModule("files", seqlen=24, batch_size=4, num_workers=2, paths=[str(path)], vocab_size=150,
                       seed=3, cache_dir=tmp_path / "cache")
    loader = dm.train_dataloader()
    for epoch in (0, 5):
        loader.sampler.set_epoch(epoch)
        first = next(iter(loader))
        order = loader.sampler.permutation(epoch)[:4].tolist()
        expected = torch.stack([dm.dataset("train")[(epoch, i)]["labels"] for i in order])
        assert torch.equal(first["labels"], expected)
