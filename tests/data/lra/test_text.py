"""LRA Text (IMDb as bytes): the aclImdb folder and the HF parquet layout, read back byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from longctx.data import DATA
from longctx.data.lra import text as text_module
from longctx.data.lra.text import TextDataModule

ACL = Path(__file__).parent / "fixtures" / "aclImdb"


def _expected(split: str) -> list[tuple[bytes, int]]:
    """The reviews of a split in the loader's order (neg then pos, files by name), read directly."""
    return [(f.read_bytes(), label) for label, name in ((0, "neg"), (1, "pos"))
            for f in sorted((ACL / split / name).glob("*.txt"))]


def _rows(data: TextDataModule, split: str) -> list[tuple[bytes, int]]:
    data.setup()
    out = []
    for item in data.datasets[split]:
        ids, mask = item["input_ids"], item["attention_mask"]
        assert (ids[mask == 0] == 0).all() and (mask.cumsum(0) == torch.arange(1, len(mask) + 1)
                                                 .clamp_max(int(mask.sum()))).all()  # real tokens first
        out.append((bytes(ids[mask == 1].tolist()), int(item["labels"])))
    return out


def test_aclimdb_reviews_are_their_bytes_and_folder_labels(tmp_path):
    data = TextDataModule(ACL, seqlen=128, cache_dir=tmp_path)
    assert _rows(data, "train") == _expected("train")
    assert _rows(data, "test") == _expected("test")
    assert _rows(data, "val") == _expected("test")  # LRA validates on the test split
    assert data.num_labels == 2 and data.tokenizer_vocab_size == 256
    assert "caf\u00e9".encode() in b"".join(r for r, _ in _rows(data, "train"))  # UTF-8 kept as bytes


def test_long_reviews_are_truncated_to_seqlen(tmp_path):
    data = TextDataModule(ACL, seqlen=10, cache_dir=tmp_path)
    assert [r for r, _ in _rows(data, "train")] == [r[:10] for r, _ in _expected("train")]


def test_val_fraction_holds_out_part_of_train(tmp_path):
    data = TextDataModule(ACL, seqlen=128, val_fraction=0.5, split_seed=3, cache_dir=tmp_path)
    train, val = _rows(data, "train"), _rows(data, "val")
    assert len(train) == len(val) == 3
    assert sorted(train + val) == sorted(_expected("train"))
    assert _rows(data, "test") == _expected("test")


def test_cache_is_reused_and_follows_edits(tmp_path, monkeypatch):
    root = tmp_path / "aclImdb"
    shutil.copytree(ACL, root)
    cache = tmp_path / "cache"
    first = _rows(TextDataModule(root, seqlen=128, cache_dir=cache), "train")
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # one file, no temporary left behind

    def fail(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(text_module, "read_imdb", fail)
    assert _rows(TextDataModule(root, seqlen=128, cache_dir=cache), "train") == first
    monkeypatch.undo()
    (root / "train" / "neg" / "0_1.txt").write_bytes(b"Edited review.")
    edited = _rows(TextDataModule(root, seqlen=128, cache_dir=cache), "train")
    assert edited[0] == (b"Edited review.", 0)


def test_hf_parquet_layout_matches_the_same_reviews(tmp_path):
    import pyarrow as pa  # a dependency of datasets, which longctx requires
    import pyarrow.parquet as pq

    folder = tmp_path / "imdb" / "plain_text"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        reviews = _expected(split)
        table = pa.table({"text": [r.decode() for r, _ in reviews], "label": [y for _, y in reviews]})
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    data = TextDataModule(tmp_path / "imdb", seqlen=128, cache_dir=tmp_path / "cache")
    assert _rows(data, "train") == _expected("train")
    assert _rows(data, "test") == _expected("test")

    bad = pa.table({"text": ["fine", "also fine"], "label": [1, 7]})
    pq.write_table(bad, folder / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"test-00000-of-00001.parquet: row 1: label must be 0 or 1, got 7"):
        TextDataModule(tmp_path / "imdb", seqlen=128, cache_dir=tmp_path / "cache").setup()


def test_malformed_sources_name_the_file(tmp_path):
    root = tmp_path / "aclImdb"
    shutil.copytree(ACL, root)
    (root / "train" / "pos" / "3_9.txt").write_bytes(b"  \n")
    with pytest.raises(ValueError, match=r"3_9.txt: empty review"):
        TextDataModule(root, cache_dir=tmp_path / "cache").setup()
    shutil.rmtree(root / "test" / "neg")
    with pytest.raises(ValueError, match=r"test/neg: no such folder"):
        TextDataModule(root, cache_dir=tmp_path / "cache").setup()
    with pytest.raises(ValueError, match="data.path is required"):
        TextDataModule(None)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        TextDataModule(ACL, val_fraction=1.5)


def test_registered_and_batched_for_the_classify_task(tmp_path):
    data = DATA["lra_text"]({"path": str(ACL), "seqlen": 32, "batch_size": 4, "cache_dir": str(tmp_path)}, 0)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 32)
    assert batch["input_ids"].dtype == torch.long and batch["labels"].shape == (4,)
