"""LRA Retrieval (AAN pairs TSV): both documents as bytes, labels, malformed lines, the two-tower task."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from longctx.config import compose
from longctx.data.lra.retrieval import RetrievalDataModule
from longctx.models.heads import PairClassificationHead

AAN = Path(__file__).parent / "fixtures" / "aan"
FILES = {"train": "new_aan_pairs.train.tsv", "val": "new_aan_pairs.eval.tsv",
         "test": "new_aan_pairs.test.tsv"}


def _expected(split: str, limit: int) -> list[tuple[bytes, bytes, int]]:
    """(text1, text2, label) of each non-blank line, split by hand."""
    out = []
    for line in (AAN / FILES[split]).read_bytes().splitlines():
        if line.strip():
            label, _, _, t1, t2 = line.split(b"\t")
            out.append((t1[:limit], t2[:limit], int(float(label))))
    return out


def _rows(data: RetrievalDataModule, split: str) -> list[tuple[bytes, bytes, int]]:
    data.setup()
    out = []
    for item in data.datasets[split]:
        docs = [bytes(item[f"input_ids{s}"][item[f"attention_mask{s}"] == 1].tolist()) for s in ("", "_2")]
        out.append((*docs, int(item["labels"])))
    return out


@pytest.mark.parametrize("seqlen", [16, 200])
def test_pairs_are_both_documents_as_bytes(tmp_path, seqlen):
    data = RetrievalDataModule(AAN, seqlen=seqlen, cache_dir=tmp_path)
    for split in FILES:
        assert _rows(data, split) == _expected(split, seqlen)
    assert data.pair and data.num_labels == 2
    # a second module reads the atomically written cache: same rows, and no temporary file left
    assert len(list(tmp_path.iterdir())) == 1
    again = RetrievalDataModule(AAN, seqlen=seqlen, cache_dir=tmp_path)
    assert _rows(again, "train") == _expected("train", seqlen)


@pytest.mark.parametrize("line, message", [
    (b"1\tA\tB\tonly four fields\n", r"new_aan_pairs.eval.tsv:3: expected 5 tab-separated fields"),
    (b"2\tA\tB\tx\ty\n", r"new_aan_pairs.eval.tsv:3: label must be 0 or 1, got b'2'"),
    (b"yes\tA\tB\tx\ty\n", r"new_aan_pairs.eval.tsv:3: label must be 0 or 1"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    root = tmp_path / "tsv"
    shutil.copytree(AAN, root)
    with (root / FILES["val"]).open("ab") as f:
        f.write(line)
    with pytest.raises(ValueError, match=message):
        RetrievalDataModule(root, seqlen=16, cache_dir=tmp_path / "cache").setup()


def test_missing_split_file_is_named(tmp_path):
    root = tmp_path / "tsv"
    shutil.copytree(AAN, root)
    (root / FILES["test"]).unlink()
    with pytest.raises(ValueError, match=r"no new_aan_pairs.test.tsv in .* \(the test split\)"):
        RetrievalDataModule(root, cache_dir=tmp_path / "cache").setup()


def test_pair_head_combines_pooled_documents_as_lra():
    """Logits = classifier(relu(dense([u, v, u*v, u-v]))) of the two masked means, by hand."""
    torch.manual_seed(0)
    head = PairClassificationHead(6, 2, pooling="mean", dropout=0.0).eval()
    hidden = torch.randn(4, 5, 6) + 0.5  # two pairs: rows 0-1 first documents, rows 2-3 second ones
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    means = torch.stack([hidden[i, mask[i] == 1].mean(0) for i in range(4)])
    u, v = means[:2], means[2:]
    features = torch.cat([u, v, u * v, u - v], dim=-1)
    expect = head.classifier(torch.relu(head.dense(features)))
    torch.testing.assert_close(head(hidden, mask), expect)
    assert head.dense.in_features == 24 and head.classifier.in_features == 12


def test_two_tower_experiment_trains_and_evaluates_through_the_cli(tmp_path, monkeypatch):
    """train.py's experiment=lra-retrieval (task.pair=true) with an approximate attention, then eval.py
    (in-process, as the scripts call them)."""
    from longctx.cli import evaluate, train

    monkeypatch.setenv("LONGCTX_DATA", str(tmp_path / "data"))
    run_dir = tmp_path / "run"
    train(["experiment=lra-retrieval", f"data.path={AAN}", "seqlen=48", "data.batch_size=2",
           "data.num_workers=0", "model.attn=performer", "model.approx.features=16", "trainer.max_steps=4",
           "trainer.val_every_n_steps=4", "trainer.ckpt_every_n_steps=4", "trainer.progress_bar=false",
           "task.warmup_steps=1", f"run_dir={run_dir}"])
    result = evaluate([f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "splits=[test]"])
    assert result["step"] == 4 and 0.0 <= result["test_accuracy"] <= 1.0
    assert math.isfinite(result["test_loss"])
    assert json.loads((run_dir / "eval.json").read_text())["test_accuracy"] == result["test_accuracy"]


def test_retrieval_data_without_pair_task_is_refused():
    from longctx.tasks.classify import Classify

    class Trainer:
        datamodule = RetrievalDataModule(AAN, seqlen=16)

    task = Classify(dict(compose(["model=bert-tiny", "task=classify", "model.vocab_size=256"])))
    task._trainer = Trainer()
    with pytest.raises(ValueError, match="task.pair=False but the data gives document pairs"):
        task.setup("fit")
