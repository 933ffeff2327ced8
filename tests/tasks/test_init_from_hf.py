"""task.init_from with a Hugging Face BERT directory: the encoder matches transformers' own model on
the checkpoint's positions, and its position table is repeated beyond them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longctx.config import compose
from longctx.tasks import build_task
from longctx.tasks.warm_start import warm_start

transformers = pytest.importorskip("transformers")

SIZES = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "type_vocab_size": 2}


def _hf_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(max_position_embeddings=64, **SIZES)).eval()
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def _task(positions: int, **sizes: int) -> torch.nn.Module:
    cfg = compose(["experiment=longdoc-512", "model=bert-tiny", f"model.max_positions={positions}",
                   f"data.seqlen={positions}", "model.vocab_size=300",
                   "model.n_embd=32", "model.n_layer=2", "model.n_head=2", "model.intermediate_size=64",
                   "model.attn=reference", "model.dropout=0.0", "task.num_labels=3", "task.multi_label=true",
                   *[f"model.{k}={v}" for k, v in sizes.items()]])
    return build_task(cfg).eval()


def test_encoder_equals_transformers_and_positions_repeat(tmp_path: Path) -> None:
    path, hf = _hf_dir(tmp_path)
    task = _task(160)
    warm_start(task, path)
    table = hf.embeddings.position_embeddings.weight.detach()
    wpe = task.encoder.wpe.weight.detach()
    assert wpe.shape == (160, 32)
    assert all(torch.equal(wpe[j], table[j % 64]) for j in range(160))
    ids = torch.randint(5, 300, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = task.encoder(ids, mask)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-4)


def test_a_different_size_is_a_one_line_error(tmp_path: Path) -> None:
    path, _ = _hf_dir(tmp_path)
    with pytest.raises(ValueError, match=r"has intermediate_size=64 but model.intermediate_size=128"):
        warm_start(_task(64, intermediate_size=128), path)
