"""BERT: published size, configs build, padding-free forward equals per-sequence forward, post- and
pre-LayerNorm blocks against a hand-written forward, pre-LN refused where Hugging Face weights go."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from longctx.config import compose
from longctx.models import build_model
from longctx.models.bert import Bert, BertConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def _tiny(attn: str = "reference", positions_skip_padding: bool = False, norm_position: str = "post") -> Bert:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=101, n_layer=2, n_head=4, n_embd=32, intermediate_size=48,
                        max_positions=40, dropout=0.0, attn=attn,
                        positions_skip_padding=positions_skip_padding, norm_position=norm_position)
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


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("attn", ["reference", "standard"])
def test_padding_free_equals_each_sequence_alone(attn, norm_position):
    model = _tiny(attn, norm_position=norm_position)
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


def _reference_forward(sd: dict[str, torch.Tensor], ids: torch.Tensor, types: torch.Tensor, n_head: int,
                       n_layer: int, eps: float, pre: bool) -> torch.Tensor:
    """BERT's encoder written out with torch ops on a state dict (no attention mask): post-LN
    x = LN(x + sublayer(x)) with LN on the embeddings, or pre-LN x = x + sublayer(LN(x)) with a final LN."""

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def attention(x: torch.Tensor, block: str) -> torch.Tensor:
        b, s, e = x.shape
        q, k, v = (t.view(b, s, n_head, e // n_head).transpose(1, 2)
                   for t in linear(x, f"{block}.attn.qkv").split(e, dim=-1))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // n_head), dim=-1)
        return linear((weights @ v).transpose(1, 2).reshape(b, s, e), f"{block}.attn.proj")

    def mlp(x: torch.Tensor, block: str) -> torch.Tensor:
        h = linear(x, f"{block}.fc")
        return linear(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), f"{block}.proj")  # exact GELU

    positions = torch.arange(ids.shape[1])
    x = sd["wte.weight"][ids] + sd["wpe.weight"][positions] + sd["wtt.weight"][types]
    if not pre:
        x = ln(x, "ln_emb")
    for i in range(n_layer):
        block = f"blocks.{i}"
        if pre:
            x = x + attention(ln(x, f"{block}.ln_1"), block)
            x = x + mlp(ln(x, f"{block}.ln_2"), block)
        else:
            x = ln(x + attention(x, block), f"{block}.ln_1")
            x = ln(x + mlp(x, block), f"{block}.ln_2")
    return ln(x, "ln_f") if pre else x


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_forward_equals_a_hand_written_encoder(norm_position):
    model = _tiny(norm_position=norm_position)
    c = model.config
    ids, types = torch.randint(0, 101, (3, 17)), torch.randint(0, 2, (3, 17))
    with torch.no_grad():
        expected = _reference_forward(model.state_dict(), ids, types, c.n_head, c.n_layer, c.layer_norm_eps,
                                      pre=norm_position == "pre")
        torch.testing.assert_close(model(ids, token_type_ids=types), expected, atol=1e-5, rtol=1e-5)


def test_pre_ln_has_a_final_norm_and_none_on_the_embeddings_and_post_ln_keeps_its_parameters():
    post, pre = _tiny(norm_position="post").state_dict(), _tiny(norm_position="pre").state_dict()
    assert {"ln_emb.weight", "ln_emb.bias"} <= set(post) and not any(k.startswith("ln_f.") for k in post)
    assert {"ln_f.weight", "ln_f.bias"} <= set(pre) and not any(k.startswith("ln_emb.") for k in pre)
    assert set(post) - {"ln_emb.weight", "ln_emb.bias"} == set(pre) - {"ln_f.weight", "ln_f.bias"}


def test_bad_norm_position_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"norm_position must be one of \['post', 'pre'\], got 'middle'"):
        BertConfig(norm_position="middle")


def test_norm_position_flows_from_the_configs():
    def built(argv: list[str]) -> Bert:
        with torch.device("meta"):
            return build_model(compose(argv).model)

    assert built(["experiment=lra-listops"]).config.norm_position == "post"
    assert built(["experiment=lra-listops-preln"]).config.norm_position == "pre"
    assert built(["experiment=lra-listops", "model.norm_position=pre"]).config.norm_position == "pre"
    assert built(["experiment=bert-base-mlm", "model.norm_position=pre"]).config.norm_position == "pre"


def test_hugging_face_export_refuses_pre_ln(tmp_path):
    pytest.importorskip("transformers")
    from longctx.models.hf import bert_to_hf

    with pytest.raises(ValueError, match="post-LayerNorm.*norm_position='pre'.*allowed: 'post'"):
        bert_to_hf(_tiny(norm_position="pre"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hugging_face_warm_start_refuses_a_pre_ln_encoder(tmp_path):
    pytest.importorskip("transformers")
    from longctx.models.hf import bert_to_hf
    from longctx.tasks.warm_start import warm_start

    bert_to_hf(_tiny(norm_position="post"), tmp_path / "hf")  # a post-LN BERT directory, as HF's are
    task = nn.Module()
    task.encoder = _tiny(norm_position="pre")
    with pytest.raises(ValueError, match="has norm_position=post but model.norm_position=pre"):
        warm_start(task, tmp_path / "hf")
