"""GPT-2: size matches the published model, causality, init, and attention implementations agree."""

from __future__ import annotations

import pytest
import torch

from longctx.models.gpt2 import GPT2, GPT2Config


def test_gpt2_small_has_the_published_parameter_count():
    with torch.device("meta"):
        model = GPT2(GPT2Config())
    padding_rows = (model.config.padded_vocab_size - model.config.vocab_size) * model.config.n_embd
    # Hugging Face's GPT2LMHeadModel("gpt2") has 124,439,808 parameters (tied head).
    assert model.num_params(non_embedding=False) - padding_rows == 124_439_808


def test_logits_are_causal():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=97, n_layer=2, n_head=2, n_embd=32, max_positions=64,
                            attn="reference")).eval()
    idx = torch.randint(0, 97, (2, 40))
    changed = idx.clone()
    changed[:, 25:] = torch.randint(0, 97, (2, 15))
    a, b = model(idx), model(changed)
    assert a.shape == (2, 40, 97)
    torch.testing.assert_close(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_initialisation_follows_gpt2():
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=8, n_embd=256, n_head=4, max_positions=128))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    proj = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks])
    assert proj.std().item() == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)
    assert all((b.attn.qkv.bias == 0).all() for b in model.blocks)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_attention_implementations_compute_the_same_model(impl):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=101, n_layer=2, n_head=4, n_embd=64, max_positions=80, attn="standard")
    base = GPT2(cfg).double()
    other = GPT2(GPT2Config(**{**cfg.__dict__, "attn": impl})).double()
    other.load_state_dict(base.state_dict())
    idx = torch.randint(0, 101, (3, 77))
    targets = torch.randint(0, 101, (3, 77))
    loss_a, loss_b = base.loss(idx, targets), other.loss(idx, targets)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-10, atol=0)
    for (name, pa), pb in zip(base.named_parameters(), other.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_sequence_longer_than_positions_is_rejected():
    model = GPT2(GPT2Config(vocab_size=50, n_layer=1, n_head=1, n_embd=8, max_positions=16))
    with pytest.raises(ValueError, match="max_positions=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
