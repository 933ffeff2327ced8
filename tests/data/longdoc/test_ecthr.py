"""ECtHR in the LexGLUE format from .jsonl and .parquet fixtures: paragraphs joined, class ids mapped
to articles, bad records named by file and line (or row), or skipped and counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from longctx.data.classify import BadRows
from longctx.data.longdoc import LongDocDataModule
from longctx.data.longdoc.ecthr import ARTICLES, EcthrSource

FIXTURES = Path(__file__).parent / "fixtures"
ECTHR = FIXTURES / "ecthr"


def _rows(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def test_jsonl_root_joins_paragraphs_and_maps_class_ids(tmp_path: Path) -> None:
    assert EcthrSource(root=ECTHR).convert(tmp_path, BadRows()) == list(ARTICLES)
    train = _rows(tmp_path, "train")
    assert train[0] == {"text": "1. The applicant was born in 1970 and lives in Ankara.\n2. On 3 May 1999 he "
                                "was arrested and held in police custody for eight days.",
                        "labels": ["3", "5"]}
    assert [r["labels"] for r in train] == [["3", "5"], ["6"], ["P1-1"], []]
    assert [r["labels"] for r in _rows(tmp_path, "val")] == [["5", "6"], ["8"]]


def test_parquet_gives_the_same_rows_as_jsonl(tmp_path: Path) -> None:
    paths = {"train": ECTHR / "train.jsonl", "val": ECTHR / "validation.jsonl",
             "test": FIXTURES / "ecthr_parquet" / "test-00000-of-00001.parquet"}
    EcthrSource(paths=paths).convert(tmp_path / "parquet", BadRows())
    EcthrSource(root=ECTHR).convert(tmp_path / "jsonl", BadRows())
    assert _rows(tmp_path / "parquet", "test") == _rows(tmp_path / "jsonl", "test")
    assert _rows(tmp_path / "parquet", "test")[1]["labels"] == ["6", "14"]


@pytest.mark.parametrize("line, message", [
    ('{"text": ["x"], "labels": [12]}', "label 12 is not an article"),
    ('{"text": ["x"], "labels": ["7"]}', "label '7' is not an article"),
    ('{"text": [], "labels": [1]}', "missing or empty 'text'"),
    ('{"labels": [1]}', "missing or empty 'text'"),
    ('{"text": ["x"], "labels": 3}', "'labels' must be a list"),
    ('{"text": ["x"], "lab', "broken JSON"),
])
def test_bad_records_name_file_and_line_or_are_skipped(tmp_path: Path, line: str, message: str) -> None:
    root = tmp_path / "root"
    shutil.copytree(ECTHR, root)
    with (root / "train.jsonl").open("a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=rf"train\.jsonl:5: {message}"):
        EcthrSource(root=root).convert(tmp_path / "error", BadRows())
    policy = BadRows("skip")
    EcthrSource(root=root).convert(tmp_path / "skip", policy)
    assert len(policy.skipped) == 1 and len(_rows(tmp_path / "skip", "train")) == 4


def test_string_articles_and_missing_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(ECTHR, root)
    (root / "train.jsonl").write_text('{"text": "one string", "labels": ["P1-1", "6"]}\n')
    EcthrSource(root=root).convert(tmp_path / "out", BadRows())
    assert _rows(tmp_path / "out", "train") == [{"text": "one string", "labels": ["P1-1", "6"]}]
    (root / "validation.jsonl").unlink()
    with pytest.raises(ValueError, match="expected one validation/dev/val"):
        EcthrSource(root=root)
    with pytest.raises(ValueError, match="data.subset='ecthr_c' is unknown; choose from: ecthr_a, ecthr_b"):
        EcthrSource(root=ECTHR, subset="ecthr_c")


def test_data_module_uses_the_ten_articles_in_order(tmp_path: Path) -> None:
    data = LongDocDataModule(EcthrSource(root=ECTHR), seqlen=32, batch_size=4, vocab_size=300,
                             cache_dir=tmp_path)
    data.setup()
    assert data.labels == list(ARTICLES) and data.num_labels == 10 and data.multi_label
    batch = next(iter(data.val_dataloader()))
    assert batch["labels"].tolist() == [[0, 0, 1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]]
    assert batch["input_ids"].shape == (2, 32)
