"""Hugging Face interop: tiny random transformers models, weights copied across, logits compared."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longctx.models.hf import (  # noqa: E402
    bert_from_hf,
    bert_to_hf,
    classification_head_from_hf,
    extend_positions,
    gpt2_from_hf,
    gpt2_to_hf,
)

ATOL = 1e-4
BERT_SIZES = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves LayerNorms at 1/0 and biases at 0; move them so a missed copy shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p) + 0.02)
    return model.eval()


def _padded_batch(vocab: int, lengths: list[int], pad: int = 0,
                  side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    seqlen = max(lengths)
    mask = (torch.arange(seqlen)[None] < torch.tensor(lengths)[:, None]).long()
    if side == "left":
        mask = mask.flip(1)
    ids = torch.randint(pad + 1, vocab, (len(lengths), seqlen)).masked_fill(mask == 0, pad)
    return ids, mask


def _gpt2_hf() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    return _perturb(transformers.GPT2LMHeadModel(config))


def test_gpt2_logits_match_transformers(tmp_path):
    hf = _gpt2_hf()
    hf.save_pretrained(tmp_path)
    ours = gpt2_from_hf(tmp_path, attn="reference").eval()
    assert ours.wte.weight.shape[0] == 128 and (ours.wte.weight[101:] == 0).all()
    idx = torch.randint(0, 101, (2, 48))
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(ours(idx), expected, atol=ATOL, rtol=0)


def test_gpt2_export_round_trips(tmp_path):
    hf = _gpt2_hf()
    hf.save_pretrained(tmp_path / "hf")
    ours = gpt2_from_hf(tmp_path / "hf", attn="reference").eval()
    gpt2_to_hf(ours, tmp_path / "out")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, hf(idx).logits, atol=0, rtol=0)
    again = gpt2_from_hf(tmp_path / "out")
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def _bert_hf(cls: type, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return _perturb(cls(transformers.BertConfig(max_position_embeddings=40, **BERT_SIZES, **extra)))


def test_bert_mlm_matches_transformers_on_a_padded_batch(tmp_path):
    hf = _bert_hf(transformers.BertForMaskedLM)
    hf.save_pretrained(tmp_path)
    ours = bert_from_hf(tmp_path, attn="reference").eval()
    ids, mask = _padded_batch(99, [40, 13, 27, 1])
    types = torch.randint(0, 2, ids.shape)
    real = mask.bool()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        hidden = ours(ids, attention_mask=mask, token_type_ids=types)
        torch.testing.assert_close(ours.mlm_logits(hidden)[real], expected[real], atol=ATOL, rtol=0)
        # Unmasked full-length rows take the padded path.
        full = ours(ids[:1], token_type_ids=types[:1])
        torch.testing.assert_close(ours.mlm_logits(full)[0], expected[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("cls", ["BertModel", "BertForSequenceClassification"])
def test_bert_backbone_and_pooler_match_transformers(tmp_path, cls):
    hf = _bert_hf(getattr(transformers, cls))
    hf.save_pretrained(tmp_path)
    ours = bert_from_hf(tmp_path, attn="standard").eval()
    ids, mask = _padded_batch(99, [20, 9])
    base = hf if cls == "BertModel" else hf.bert
    with torch.no_grad():
        out = base(input_ids=ids, attention_mask=mask)
        hidden = ours(ids, attention_mask=mask)
        real = mask.bool()
        torch.testing.assert_close(hidden[real], out.last_hidden_state[real], atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.pool(hidden), out.pooler_output, atol=ATOL, rtol=0)


def _roberta_hf(cls: type, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.RobertaConfig(max_position_embeddings=42, pad_token_id=1, type_vocab_size=1,
                                        **BERT_SIZES, **extra)
    return _perturb(cls(config))


@pytest.mark.parametrize("side", ["right", "left"])
def test_roberta_mlm_matches_transformers_and_round_trips(tmp_path, side):
    # RoBERTa counts positions over real tokens only: a left-padded row starts at position 0 too.
    hf = _roberta_hf(transformers.RobertaForMaskedLM)
    hf.save_pretrained(tmp_path)
    ours = bert_from_hf(tmp_path, attn="reference").eval()
    assert ours.config.max_positions == 40
    ids, mask = _padded_batch(99, [40, 17, 3], pad=1, side=side)
    real = mask.bool()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours.mlm_logits(ours(ids, attention_mask=mask))
        torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    bert_to_hf(ours, tmp_path / "out", model_type="roberta", pad_token_id=1)
    reloaded = transformers.RobertaForMaskedLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(again[real], expected[real], atol=0, rtol=0)
    for (name, x), y in zip(ours.state_dict().items(), bert_from_hf(tmp_path / "out").state_dict().values()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="positions_skip_padding=True"):
        bert_to_hf(ours, tmp_path / "as_bert", model_type="bert")


def test_bert_left_padding_keeps_row_index_positions(tmp_path):
    # BERT, unlike RoBERTa, numbers a token by its index in the padded row, pads included.
    hf = _bert_hf(transformers.BertForMaskedLM)
    hf.save_pretrained(tmp_path)
    ours = bert_from_hf(tmp_path, attn="reference").eval()
    ids, mask = _padded_batch(99, [30, 11], side="left")
    real = mask.bool()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours.mlm_logits(ours(ids, attention_mask=mask))
        torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification"])
def test_sequence_classifier_matches_transformers(tmp_path, kind, problem):
    make = _bert_hf if kind == "bert" else _roberta_hf
    cls = getattr(transformers, f"{'Bert' if kind == 'bert' else 'Roberta'}ForSequenceClassification")
    hf = make(cls, num_labels=3, problem_type=problem, classifier_dropout=0.3)
    hf.save_pretrained(tmp_path)
    encoder = bert_from_hf(tmp_path, attn="reference").eval()
    head = classification_head_from_hf(tmp_path).eval()
    assert head.classifier.out_features == 3 and head.drop.p == 0.3
    assert head.multi_label == (problem == "multi_label_classification")
    ids, mask = _padded_batch(99, [33, 8, 20], pad=1 if kind == "roberta" else 0)
    with torch.no_grad():
        hidden = encoder(ids, attention_mask=mask)
        got = head(hidden, mask, encoder.pool(hidden))
        torch.testing.assert_close(got, hf(input_ids=ids, attention_mask=mask).logits, atol=ATOL, rtol=0)


def test_classification_head_needs_a_classifier_checkpoint(tmp_path):
    _bert_hf(transformers.BertForMaskedLM).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no sequence classifier"):
        classification_head_from_hf(tmp_path)


def test_bert_export_round_trips_and_bin_weights_load(tmp_path):
    hf = _bert_hf(transformers.BertForMaskedLM)
    hf.save_pretrained(tmp_path / "hf")
    ours = bert_from_hf(tmp_path / "hf").eval()
    with torch.no_grad():
        ours.pooler.weight.normal_()
    bert_to_hf(ours, tmp_path / "out")
    reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = _padded_batch(99, [25, 10])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                                   hf(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    pooler = transformers.BertModel.from_pretrained(tmp_path / "out").pooler.dense.weight
    assert torch.equal(pooler, ours.pooler.weight)
    again = bert_from_hf(tmp_path / "out")
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    # The same weights as a legacy pytorch_model.bin.
    legacy = tmp_path / "bin"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "out" / "config.json").read_text())
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "out" / "model.safetensors"), legacy / "pytorch_model.bin")
    from_bin = bert_from_hf(legacy)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), from_bin.state_dict().values()))


def test_extend_positions_values():
    table = torch.arange(8.0).view(4, 2)  # rows (0,1), (2,3), (4,5), (6,7)
    repeated = extend_positions(table, 10, "repeat")
    torch.testing.assert_close(repeated, table[[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]])
    interpolated = extend_positions(table, 7, "interpolate")  # positions 0, 0.5, 1, ..., 3
    expected = torch.stack([torch.arange(0, 6.5, 1.0), torch.arange(1, 7.5, 1.0)], dim=1)
    torch.testing.assert_close(interpolated, expected)
    with pytest.raises(ValueError, match="mode"):
        extend_positions(table, 8, "nearest")


@pytest.mark.parametrize("mode", ["repeat", "interpolate"])
def test_loading_with_longer_positions(tmp_path, mode):
    hf = _bert_hf(transformers.BertModel)
    hf.save_pretrained(tmp_path)
    ours = bert_from_hf(tmp_path, max_positions=100, position_mode=mode, attn="reference").eval()
    table = hf.embeddings.position_embeddings.weight.detach()
    assert ours.wpe.weight.shape == (100, 32)
    if mode == "repeat":
        torch.testing.assert_close(ours.wpe.weight, torch.cat([table, table, table[:20]]), atol=0, rtol=0)
    else:  # end points kept; row 33 sits at 33 * 39 / 99 = 13.0
        torch.testing.assert_close(ours.wpe.weight[[0, 33, 99]], table[[0, 13, 39]])
    with torch.no_grad():
        assert ours(torch.randint(1, 99, (1, 100))).shape == (1, 100, 32)


def test_a_hub_name_loads_through_huggingface_hub(tmp_path, monkeypatch):
    # Offline: snapshot_download is replaced by a stand-in that serves a local save_pretrained folder.
    hf = _bert_hf(transformers.BertModel)
    hf.save_pretrained(tmp_path / "snapshot")
    asked = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        asked.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    ours = bert_from_hf("someone/tiny-bert", attn="reference")
    assert asked[0][0] == "someone/tiny-bert" and "*.safetensors" in asked[0][1]
    assert torch.equal(ours.wte.weight, hf.embeddings.word_embeddings.weight)

    def offline(repo_id: str, allow_patterns: list[str]) -> str:
        raise OSError("we are offline")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="nobody/missing is not a local directory.*we are offline"):
        bert_from_hf("nobody/missing")
