"""LM data: work-level splits, packing, the atomic cache, windows, sampler/resume, unigram baseline.

Most tests use a byte-level vocabulary written in GPT-2's file format (256 byte tokens, no merges,
``<|endoftext|>`` = 256), so the expected token ids are simply the UTF-8 bytes of the text.
"""

from __future__ import annotations

import json
import math
import pickle
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import datasets
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from longctx.data import assets, lm
from longctx.data.assets import shakespeare_texts
from longctx.data.lm import (
    EpochShuffleSampler,
    LMDataModule,
    LMWindows,
    cache_key,
    pack_tokens,
    split_by_work,
    token_dtype,
    unigram_perplexity,
)
from longctx.data.tokenizers import EOT, gpt2_tokenizer

BYTE_EOT = 256


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as in OpenAI's encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture
def byte_vocab(tmp_path: Path) -> Path:
    """A folder with encoder.json + vocab.bpe of a byte-level vocabulary (ids = bytes, EOT = 256)."""
    folder = tmp_path / "bytevocab"
    folder.mkdir()
    encoder = {ch: b for b, ch in _bytes_to_unicode().items()} | {EOT: BYTE_EOT}
    (folder / "encoder.json").write_text(json.dumps(encoder))
    (folder / "vocab.bpe").write_text("#version: 0.2\n")
    return folder


def _expected(docs: list[str]) -> list[int]:
    return [t for doc in docs for t in [*doc.encode("utf-8"), BYTE_EOT]]


def _write_docs(folder: Path, docs: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        paths.append(folder / f"doc{i}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    return paths


DOCS = [f"Document {i}: " + "ünïcödé ✓ words " * (i + 3) for i in range(12)]


# --- splits -------------------------------------------------------------------------------------

def _fake_works(folder: Path, sizes: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        (folder / f"work{i:02d}_gut.txt").write_text(f"WORK {i}\n" + "x" * size)
        (folder / f"work{i:02d}_gut_f.txt").write_text("folio spelling")
    return shakespeare_texts(folder)


def test_split_by_work_is_a_deterministic_partition(tmp_path: Path) -> None:
    works = _fake_works(tmp_path / "texts", [1000 + 137 * i for i in range(30)])
    assert all("_gut_f" not in p.name for p in works) and len(works) == 30
    splits = split_by_work(works, 0.05, 0.05, seed=0)
    sets = {k: set(v) for k, v in splits.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(works)
    assert all(splits[k] for k in ("train", "val", "test"))
    assert split_by_work(works, 0.05, 0.05, seed=0) == splits
    assert split_by_work(works, 0.05, 0.05, seed=1) != splits
    total = sum(p.stat().st_size for p in works)
    for split in ("val", "test"):  # within one work of the 5% quota
        share = sum(p.stat().st_size for p in splits[split]) / total
        assert abs(share - 0.05) <= max(p.stat().st_size for p in works) / total / 2


def _no_network(*args: object) -> None:
    raise OSError("network disabled in tests")


def test_real_shakespeare_split_has_no_play_on_two_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "_pip_download", _no_network)
    try:
        works = shakespeare_texts()
    except ValueError as err:
        pytest.skip(f"Shakespeare corpus not available offline: {err}")
    assert len(works) == 42 and not any(p.name.endswith("_gut_f.txt") for p in works)
    splits = split_by_work(works, 0.05, 0.05, seed=0)
    names = {k: {p.name for p in v} for k, v in splits.items()}
    assert sum(len(v) for v in names.values()) == 42
    assert not (names["train"] & names["val"] or names["train"] & names["test"]
                or names["val"] & names["test"])


def test_shakespeare_datamodule_packs_whole_works(tmp_path: Path, byte_vocab: Path) -> None:
    works = _fake_works(tmp_path / "texts", [400 + 50 * i for i in range(20)])
    dm = LMDataModule("shakespeare", seqlen=8, batch_size=2, corpus_path=str(tmp_path / "texts"),
                      tokenizer_path=str(byte_vocab), cache_dir=tmp_path / "cache")
    dm.setup()
    splits = split_by_work(works, 0.05, 0.05, seed=0)
    for split, paths in splits.items():
        assert dm.tokens[split].tolist() == _expected([p.read_text() for p in paths])


# --- packing and dtype -----------------------------------------------------------------------------

def test_token_dtype_boundary() -> None:
    # ids run 0..vocab_size-1, so uint16 holds every id of a vocabulary of up to 65536 tokens
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(50257).str == "<u2"


@pytest.mark.parametrize(("vocab_size", "itemsize"), [(65536, 2), (65537, 4)])
def test_pack_tokens_dtype_holds_the_largest_id(tmp_path: Path, vocab_size: int, itemsize: int) -> None:
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {EOT: vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tmp_path / "train.bin"
    top = vocab_size - 2
    n = pack_tokens(datasets.Dataset.from_dict({"text": [f"w1 w{top}", "w7"]}), tok, out)
    assert n == 5 and out.stat().st_size == 5 * itemsize
    eot = vocab_size - 1
    assert np.fromfile(out, dtype=token_dtype(vocab_size)).tolist() == [1, top, eot, 7, eot]


def test_pack_tokens_equals_direct_bytes(tmp_path: Path, byte_vocab: Path) -> None:
    docs = ["Hello\nworld", "naïve 東京 🤖", "", "tail"]
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "split.bin"
    n = pack_tokens(datasets.Dataset.from_dict({"text": docs}), gpt2_tokenizer(byte_vocab), out)
    assert np.fromfile(out, dtype="<u2").tolist() == _expected(docs) and n == len(_expected(docs))
    assert [p.name for p in out.parent.iterdir()] == ["split.bin"]  # no temp file left


# --- cache -----------------------------------------------------------------------------------------

def _files_dm(tmp_path: Path, byte_vocab: Path, paths: list[Path], **kw: object) -> LMDataModule:
    return LMDataModule("files", seqlen=4, batch_size=2, paths=[str(p) for p in paths],
                        tokenizer_path=str(byte_vocab), cache_dir=tmp_path / "cache", **kw)


def test_cache_is_reused_and_stale_temp_files_ignored(tmp_path: Path, byte_vocab: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _write_docs(tmp_path / "docs", DOCS)
    dm = _files_dm(tmp_path, byte_vocab, paths)
    cache = tmp_path / "cache" / f"files-{cache_key(dm.corpus.identity(), dm.tokenizer)}"
    cache.mkdir(parents=True)
    (cache / "train.bin.tmp-999-dead").write_bytes(b"\xff" * 10)  # left by a killed run
    (cache / "train.bin").write_bytes(b"\xff" * 6)  # renamed, but the run died before meta.json

    calls: list[str] = []
    real_pack = lm.pack_tokens
    def counting_pack(docs: datasets.Dataset, tok: Tokenizer, out: Path) -> int:
        calls.append(out.name)
        return real_pack(docs, tok, out)

    monkeypatch.setattr(lm, "pack_tokens", counting_pack)
    dm.setup()
    assert calls == ["train.bin", "val.bin", "test.bin"]
    all_tokens = sum((dm.tokens[s].tolist() for s in ("train", "val", "test")), [])
    assert sorted(Counter(all_tokens).items()) == sorted(Counter(_expected(DOCS)).items())
    assert dm.tokens["train"][-1] == BYTE_EOT
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.bin")}

    again = _files_dm(tmp_path, byte_vocab, paths)
    again.prepare_data()
    again.setup()
    assert calls == ["train.bin", "val.bin", "test.bin"]  # not tokenized again
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.bin")} == mtimes
    assert again.tokens["val"].tolist() == dm.tokens["val"].tolist()


def test_truncated_cache_file_is_rebuilt(tmp_path: Path, byte_vocab: Path) -> None:
    paths = _write_docs(tmp_path / "docs", DOCS)
    dm = _files_dm(tmp_path, byte_vocab, paths)
    dm.setup()
    expected = dm.tokens["train"].tolist()
    cache = Path(dm.tokens["train"].filename).parent
    with (cache / "train.bin").open("r+b") as f:
        f.truncate(10)
    again = _files_dm(tmp_path, byte_vocab, paths)
    again.setup()
    assert again.tokens["train"].tolist() == expected


def test_cache_key_follows_the_inputs(tmp_path: Path, byte_vocab: Path) -> None:
    paths = _write_docs(tmp_path / "docs", DOCS)
    tokenizer = gpt2_tokenizer(byte_vocab)

    def key(**kw: object) -> str:
        return cache_key(_files_dm(tmp_path, byte_vocab, paths, **kw).corpus.identity(), tokenizer)

    first = key()
    assert key() == first and key(split_seed=1) != first
    paths[0].write_text(DOCS[0] + " changed")
    assert key() != first


# --- sources ---------------------------------------------------------------------------------------

def test_missing_file_is_value_error_naming_it(tmp_path: Path, byte_vocab: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=str(missing)):
        _files_dm(tmp_path, byte_vocab, [missing]).prepare_data()


def test_jsonl_and_parquet_with_explicit_splits(tmp_path: Path, byte_vocab: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS[:8])))
    val = tmp_path / "val.parquet"
    datasets.Dataset.from_dict({"body": DOCS[8:10]}).to_parquet(str(val))
    test = _write_docs(tmp_path / "test", DOCS[10:])
    dm = LMDataModule("files", seqlen=4, batch_size=2, text_column="body", tokenizer_path=str(byte_vocab),
                      paths={"train": str(train), "validation": [val], "test": [str(p) for p in test]},
                      cache_dir=tmp_path / "cache")
    dm.setup()
    assert dm.tokens["train"].tolist() == _expected(DOCS[:8])
    assert dm.tokens["val"].tolist() == _expected(DOCS[8:10])
    assert dm.tokens["test"].tolist() == _expected(DOCS[10:])


def test_wrong_text_column_names_the_columns(tmp_path: Path, byte_vocab: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    with pytest.raises(ValueError, match=r"no text column 'text'.*body"):
        _files_dm(tmp_path, byte_vocab, [train]).prepare_data()


def test_hub_dataset_without_validation_gets_one_carved(tmp_path: Path, byte_vocab: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": DOCS})})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: fake)
    dm = LMDataModule("someone/corpus", seqlen=4, batch_size=2, text_column="content", val_fraction=0.25,
                      test_fraction=0.1, tokenizer_path=str(byte_vocab), cache_dir=tmp_path / "cache")
    dm.setup()
    docs = json.loads((Path(dm.tokens["train"].filename).parent / "meta.json").read_text())["documents"]
    assert docs == {"train": 8, "val": 3, "test": 1}
    assert Path(dm.tokens["train"].filename).parent.name.startswith("someone_corpus-")


def test_hub_dataset_offline_is_value_error(tmp_path: Path, byte_vocab: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, config: str | None = None) -> None:
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    dm = LMDataModule("openwebtext", tokenizer_path=str(byte_vocab), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"cannot load HF dataset 'openwebtext'.*offline"):
        dm.prepare_data()


# --- windows ---------------------------------------------------------------------------------------

def test_windows_shift_and_cover() -> None:
    tokens = np.arange(23, dtype=np.uint16)
    windows = LMWindows(tokens, seqlen=5)
    assert len(windows) == 4  # targets 1..20; the tail 21, 22 is shorter than seqlen
    ys = []
    for i in range(len(windows)):
        x, y = windows[i]
        assert x.dtype == torch.int64 and x.shape == (5,)
        assert x.tolist() == list(range(5 * i, 5 * i + 5)) and y.tolist() == list(range(5 * i + 1, 5 * i + 6))
        ys += y.tolist()
    assert ys == list(range(1, 21))  # non-overlapping, contiguous targets
    with pytest.raises(IndexError):
        windows[4]


@pytest.mark.parametrize(("n", "seqlen", "stride", "count"),
                         [(6, 5, None, 1), (5, 5, None, 0), (12, 4, 2, 4)])
def test_window_count(n: int, seqlen: int, stride: int | None, count: int) -> None:
    windows = LMWindows(np.arange(n), seqlen, stride)
    assert len(windows) == count
    if count:
        assert windows[count - 1][1][-1].item() == ((count - 1) * (stride or seqlen)) + seqlen


def test_windows_pickle_memmap_by_name(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    np.arange(100_000, dtype="<u4").tofile(path)
    windows = LMWindows(np.memmap(path, dtype="<u4", mode="r"), seqlen=7)
    blob = pickle.dumps(windows)
    assert len(blob) < 2000
    assert pickle.loads(blob)[3][0].tolist() == list(range(21, 28))


# --- sampler ---------------------------------------------------------------------------------------

def test_sampler_depends_only_on_seed_and_epoch() -> None:
    data = list(range(50))
    a, b = EpochShuffleSampler(data, seed=3), EpochShuffleSampler(data, seed=3)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    b.set_epoch(1)  # never iterated epoch 0
    assert list(b) == second != first and sorted(first) == data
    assert list(EpochShuffleSampler(data, seed=4)) != first


def test_sampler_ranks_partition_and_resume() -> None:
    data = list(range(50))
    ranks = [EpochShuffleSampler(data, seed=0, epoch=2, num_replicas=3, rank=r) for r in range(3)]
    shares = [list(s) for s in ranks]
    assert all(len(s) == 16 for s in shares) and len(set(sum(shares, []))) == 48
    full = ranks[0].permutation(2).tolist()
    assert all(shares[r][i] == full[3 * i + r] for i in range(16) for r in range(3))
    ranks[1].resume(epoch=2, samples_done=12)
    assert list(ranks[1]) == shares[1][4:]
    assert list(ranks[1]) == shares[1]  # the skip applies to one iteration only
    assert len(ranks[1]) == 16


# --- unigram baseline ------------------------------------------------------------------------------

def test_unigram_perplexity_by_hand() -> None:
    # train [0, 0, 1] over V = 3: add-one p = (2+1, 1+1, 0+1) / (3+3) = 1/2, 1/3, 1/6
    train_counts = np.bincount([0, 0, 1], minlength=3)
    assert unigram_perplexity(train_counts, np.array([0, 2], dtype=np.uint16)) == pytest.approx(math.sqrt(12))
    assert unigram_perplexity(train_counts, np.array([1], dtype=np.uint16)) == pytest.approx(3.0)


def test_datamodule_unigram_perplexity(tmp_path: Path, byte_vocab: Path) -> None:
    dm = _files_dm(tmp_path, byte_vocab, _write_docs(tmp_path / "docs", DOCS))
    dm.setup()
    train, val = Counter(dm.tokens["train"].tolist()), dm.tokens["val"].tolist()
    n, v = sum(train.values()), 257
    expected = math.exp(-sum(math.log((train[t] + 1) / (n + v)) for t in val) / len(val))
    assert dm.unigram_perplexity("val") == pytest.approx(expected)


# --- resume through Lightning ----------------------------------------------------------------------

class _Recorder(L.LightningModule):
    """Records every training batch's inputs; learns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[list[list[int]]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[0].tolist())
        return self.w * 1.0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.w)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path: Path, dm: LMDataModule, max_steps: int = -1, max_epochs: int = -1,
         ckpt: Path | None = None) -> list[list[list[int]]]:
    """Train a _Recorder like the CLI does (by steps, validating every 3) or by epochs; return its batches.

    Checkpoints: ``ckpt/step=N.ckpt`` after every step and ``ckpt/epoch=E.ckpt`` at every epoch end.
    """
    model = _Recorder()
    by_steps = {"val_check_interval": 3, "check_val_every_n_epoch": None} if max_steps > 0 else {}
    callbacks = [
        ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1),
        ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", every_n_epochs=1, save_top_k=-1,
                        save_on_train_epoch_end=True),
    ]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=max_epochs, num_sanity_val_steps=0,
        limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, default_root_dir=str(tmp_path), callbacks=callbacks, **by_steps)
    trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    return model.seen


@pytest.fixture(params=[0, 2], ids=["in-process", "2-workers"])
def resume_dm(request: pytest.FixtureRequest, tmp_path: Path, byte_vocab: Path) -> Callable[[], LMDataModule]:
    """Fresh LMDataModules over one corpus; with workers, the loader draws its first batch early."""
    paths = [str(p) for p in _write_docs(tmp_path / "docs", DOCS)]
    return lambda: LMDataModule("files", seqlen=64, batch_size=4, num_workers=request.param, paths=paths,
                                seed=7, tokenizer_path=str(byte_vocab), cache_dir=tmp_path / "cache")


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # each resumed run writes elsewhere
@pytest.mark.filterwarnings("error:You're resuming from a checkpoint")  # Lightning: loader not resumable
def test_resume_by_steps_continues_at_the_next_batch(tmp_path: Path,
                                                     resume_dm: Callable[[], LMDataModule]) -> None:
    per_epoch = len(resume_dm().train_dataloader())
    total = 2 * per_epoch + 3
    full = _fit(tmp_path / "full", resume_dm(), max_steps=total)
    assert len(full) == total and full[:per_epoch] != full[per_epoch:2 * per_epoch]
    for step in (2, per_epoch, per_epoch + 1, 2 * per_epoch + 1):  # mid-epoch, boundary, later epochs
        ckpt = tmp_path / "full" / "ckpt" / f"step={step}.ckpt"
        assert _fit(tmp_path / f"r{step}", resume_dm(), max_steps=total, ckpt=ckpt) == full[step:], step


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # each resumed run writes elsewhere
@pytest.mark.filterwarnings("error:You're resuming from a checkpoint")  # Lightning: loader not resumable
def test_resume_by_epochs_from_epoch_end(tmp_path: Path, resume_dm: Callable[[], LMDataModule]) -> None:
    per_epoch = len(resume_dm().train_dataloader())
    full = _fit(tmp_path / "full", resume_dm(), max_epochs=3)
    assert len(full) == 3 * per_epoch
    ckpt = tmp_path / "full" / "ckpt" / "epoch=0.ckpt"
    assert _fit(tmp_path / "r", resume_dm(), max_epochs=3, ckpt=ckpt) == full[per_epoch:]
