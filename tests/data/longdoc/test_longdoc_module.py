"""The longdoc data kind end to end: config -> data module -> cached JSONL -> batches; JSONL bad rows
skipped and reported; train.py + eval.py with the tuned threshold in eval.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.config import compose
from longctx.data import build_datamodule
from longctx.data.longdoc import LongDocDataModule, build_longdoc
from longctx.data.longdoc.synthetic import SyntheticSpec

REPO = Path(__file__).resolve().parents[3]
SMALL = ["data.num_train=12", "data.num_val=4", "data.num_test=4", "data.min_words=120", "data.max_words=160",
         "data.num_labels=3", "data.min_mentions=3", "data.max_mentions=4", "data.max_decoys=1",
         "data.vocab_size=500"]


def test_synthetic_config_to_batches_and_cache_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCTX_DATA", str(tmp_path))
    cfg = compose(["model=bert-tiny", "task=classify", "data=synthetic_longdoc", "seqlen=64",
                   "data.batch_size=4", *SMALL])
    data = build_datamodule(cfg)
    assert isinstance(data, LongDocDataModule)
    data.setup()
    assert data.labels == SyntheticSpec(num_labels=3).labels and data.multi_label
    folder = data.cache_folder()
    assert folder.parent == tmp_path / "cache" / "longdoc" and (folder / "meta.json").is_file()
    rows = [json.loads(line) for line in (folder / "val.jsonl").read_text().splitlines()]
    batch = next(iter(data.val_dataloader()))
    assert batch["input_ids"].shape == (4, 64)
    expected = [[float(code in row["labels"]) for code in data.labels] for row in rows]
    assert batch["labels"].tolist() == expected
    stamp = (folder / "train.jsonl").stat().st_mtime_ns
    again = build_datamodule(cfg)
    again.setup()
    assert again.cache_folder() == folder and (folder / "train.jsonl").stat().st_mtime_ns == stamp


def test_jsonl_bad_rows_skipped_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"text": "fever and cough", "labels": ["a"]}, {"text": "rash", "labels": ["b"]},
            {"text": "cough", "labels": ["a", "b"]}]
    for split in ("train", "val", "test"):
        lines = [json.dumps(r) for r in rows]
        if split == "val":
            lines += ['{"text": "broken', json.dumps({"text": "new", "labels": ["z"]})]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    paths = {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "val", "test")}
    section = {"source": "jsonl", "paths": paths, "seqlen": 16, "batch_size": 2, "vocab_size": 100}
    with pytest.raises(ValueError, match=r"val\.jsonl:4: broken JSON"):
        build_longdoc(dict(section), seed=0).setup()
    data = build_longdoc({**section, "bad_rows": "skip"}, seed=0)
    data.setup()
    assert len(data.datasets["val"]) == 3 and data.labels == ["a", "b"]
    out = capsys.readouterr().out
    assert "skipped 2 bad rows (data.bad_rows=skip)" in out and "val.jsonl:5: label 'z' does not occur" in out
    with pytest.raises(ValueError, match="data.source='mimic' is unknown; choose from: mimic3, ecthr, jsonl"):
        build_longdoc({"source": "mimic"}, seed=0)
    with pytest.raises(ValueError, match="data.bad_rows='ignore' is unknown; choose from: error, skip"):
        build_longdoc({**section, "bad_rows": "ignore"}, seed=0)


@pytest.mark.slow
def test_train_and_eval_write_the_tuned_threshold(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "LONGCTX_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "2"}
    args = ["experiment=longdoc-512", "model=bert-tiny", "seqlen=64", "model.n_layer=1", "model.n_embd=32",
            "model.intermediate_size=64", "model.vocab_size=500", "data.batch_size=4",
            "trainer.global_batch_size=4", "trainer.max_steps=4", "trainer.val_every_n_steps=4",
            "trainer.progress_bar=false", "task.warmup_steps=1", f"run_dir={run_dir}", *SMALL]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ev = subprocess.run([sys.executable, str(REPO / "eval.py"), f"ckpt={ckpt}"], capture_output=True,
                        text=True, env=env, cwd=tmp_path, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((run_dir / "eval.json").read_text())
    assert 0 < result["val_threshold"] < 1 and result["test_threshold"] == result["val_threshold"]
    assert {"val_micro_f1", "val_macro_f1", "test_micro_f1", "test_macro_f1"} <= set(result)
