"""BERT: published size, configs build, padding-free forward equals per-sequence forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from longctx.models import build_model
from longctx.models.bert import Bert, BertConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def _tiny(attn: str = "reference", positions_skip_padding: bool = False) -> Bert:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=101, n_layer=2, n_head=4, n_embd=32, intermediate_size=48,
                        max_positions=40, dropout=0.0, attn=attn,
                        positions_skip_padding=positions_skip_padding)
    model = Bert(config).eval()
    with torch.no_grad():  # nonzero LayerNorm parameters and biases, so a dropped term shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p) + 0.05)
    return model


def test_bert_base_has_the_published_parameter_count():
    with torch.device("meta"):
        model = Bert(BertConfig())
    e, v = model.config.n_embd, model.config.vocab_size
    mlm_head = e * e + e + 2 * e + v
    # Hugging Face's BertModel("bert-base-uncased") has 109,482,240 parameters (with its pooler).
    assert model.num_params() - mlm_head == 109_482_240


@pytest.mark.parametrize("name", ["bert-tiny", "bert-base", "bert-large"])
def test_configs_build(name):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, Bert) and model.config.n_layer == cfg["n_layer"]


@pytest.mark.parametrize("attn", ["reference", "standard"])
def test_padding_free_equals_each_sequence_alone(attn):
    model = _tiny(attn)
    lengths = [7, 19, 1, 12]
    ids = torch.randint(1, 101, (4, 19))
    types = torch.randint(0, 2, (4, 19))
    mask = torch.arange(19)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        packed = model(ids, attention_mask=mask.long(), token_type_ids=types)
        for i, n in enumerate(lengths):
            alone = model(ids[i : i + 1, :n], token_type_ids=types[i : i + 1, :n])
            torch.testing.assert_close(packed[i, :n], alone[0], atol=1e-5, rtol=1e-5)
            assert (packed[i, n:] == 0).all()


@pytest.mark.parametrize("skip", [True, False])
def test_left_padded_rows_equal_each_sequence_alone_when_positions_skip_padding(skip):
    model = _tiny(positions_skip_padding=skip)
    lengths = [19, 6, 11]
    ids = torch.randint(1, 101, (3, 19))
    mask = torch.arange(19).flip(0)[None] < torch.tensor(lengths)[:, None]  # real tokens at the right
    with torch.no_grad():
        packed = model(ids, attention_mask=mask.long())
        for i, n in enumerate(lengths):
            alone = model(ids[i : i + 1, 19 - n :])[0]
            # Without skipping, a left-padded row's positions start at its pad count, not at 0.
            assert torch.allclose(packed[i, 19 - n :], alone, atol=1e-5, rtol=1e-5) == (skip or n == 19)
            assert (packed[i, : 19 - n] == 0).all()


def test_bidirectional_and_heads_have_their_shapes():
    model = _tiny()
    ids = torch.randint(1, 101, (2, 16))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 101
    with torch.no_grad():
        a, b = model(ids), model(changed)
        assert not torch.allclose(a[:, 0], b[:, 0])  # the first token sees the last one
        assert model.pool(a).shape == (2, 32)
        assert model.mlm_logits(a).shape == (2, 16, 101)


def test_too_long_input_is_rejected():
    with pytest.raises(ValueError, match="max_positions"):
        _tiny()(torch.zeros(1, 41, dtype=torch.long))
