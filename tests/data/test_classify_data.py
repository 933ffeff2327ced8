"""ClassifyDataModule: label vocabulary, encoding layout, and bad rows named by file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longctx.data.classify import ClassifyDataModule, read_jsonl, wordpiece_tokenizer


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _module(tmp_path: Path, train: list, val: list, test: list | None = None, **kwargs) -> ClassifyDataModule:
    paths = {"train": _write(tmp_path / "train.jsonl", train), "val": _write(tmp_path / "val.jsonl", val),
             "test": _write(tmp_path / "test.jsonl", test if test is not None else val)}
    return ClassifyDataModule(paths, seqlen=kwargs.pop("seqlen", 8), batch_size=2, **kwargs)


TRAIN = [{"text": "red apple pie", "label": "fruit"}, {"text": "fast red car", "label": "car"},
         {"text": "green apple tree", "label": "fruit"}, {"text": "old blue bus", "label": "bus"}]


def test_label_vocab_sorted_from_train_and_batches(tmp_path: Path) -> None:
    data = _module(tmp_path, TRAIN, [{"text": "blue car", "label": "car"}, {"text": "bus", "label": "bus"}])
    data.setup()
    assert data.labels == ["bus", "car", "fruit"] and data.num_labels == 3 and not data.multi_label
    batch = next(iter(data.val_dataloader()))
    assert batch["labels"].tolist() == [1, 0]
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].shape == (2, 8)
    tok = data.tokenizer
    cls, sep, pad = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    ids, mask = batch["input_ids"][0].tolist(), batch["attention_mask"][0].tolist()
    n = sum(mask)
    assert ids[0] == cls and ids[n - 1] == sep and ids[n:] == [pad] * (8 - n)
    assert mask == [1] * n + [0] * (8 - n)
    assert tok.decode(ids[1:n - 1]) == "blue car"


def test_truncation_keeps_sep_last(tmp_path: Path) -> None:
    data = _module(tmp_path, TRAIN, [{"text": "red " * 20, "label": "car"}], seqlen=5)
    data.setup()
    ids = data.datasets["val"].tensors["input_ids"][0].tolist()
    sep = data.tokenizer.token_to_id("[SEP]")
    assert len(ids) == 5 and ids[-1] == sep and data.datasets["val"].tensors["attention_mask"].sum() == 5


def test_multi_label_multi_hot(tmp_path: Path) -> None:
    train = [{"text": "a b", "labels": ["x", "y"]}, {"text": "c", "labels": ["z"]},
             {"text": "d", "labels": []}]
    data = _module(tmp_path, train, [{"text": "a c", "labels": ["z", "x"]}])
    data.setup()
    assert data.multi_label and data.labels == ["x", "y", "z"]
    assert torch.equal(data.datasets["val"].tensors["labels"], torch.tensor([[1.0, 0.0, 1.0]]))
    assert data.datasets["train"].tensors["labels"][2].tolist() == [0.0, 0.0, 0.0]


def test_unknown_label_names_file_and_line(tmp_path: Path) -> None:
    data = _module(tmp_path, TRAIN, [{"text": "x", "label": "car"}, "", {"text": "y", "label": "boat"}])
    with pytest.raises(ValueError, match=r"val\.jsonl:3: label 'boat' does not occur in the train split"):
        data.setup()


@pytest.mark.parametrize("row, message", [
    ('{"text": "broken', "broken JSON"),
    ('{"label": "car"}', "missing or non-string 'text'"),
    ('{"text": 3, "label": "car"}', "missing or non-string 'text'"),
    ('{"text": "no label"}', "needs exactly one of 'label'"),
    ('["text", "car"]', "expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = _write(tmp_path / "bad.jsonl", [TRAIN[0], TRAIN[1], row])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {message}"):
        read_jsonl(path)


def test_paths_required_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.paths is required"):
        ClassifyDataModule(None)
    with pytest.raises(ValueError, match="no test file"):
        ClassifyDataModule({"train": "a", "val": "b"})
    data = ClassifyDataModule({"train": tmp_path / "none.jsonl", "val": "b", "test": "c"})
    with pytest.raises(ValueError, match="data.paths.train: no such file"):
        data.setup()


def test_vocab_file_tokenizer(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "apple", "##s"]) + "\n")
    tok = wordpiece_tokenizer(vocab)
    assert tok.encode("Red apples pear").ids == [2, 5, 6, 7, 1, 3]
