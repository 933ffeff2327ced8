"""The causal-LM task's optimiser pieces: GPT-2 decay groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.models.gpt2 import GPT2, GPT2Config
from longctx.tasks.base import decay_groups, warmup_cosine


def test_only_linear_weights_are_decayed():
    model = GPT2(GPT2Config(vocab_size=64, n_layer=2, n_head=2, n_embd=16, max_positions=8))
    decay, no_decay = decay_groups(model, 0.1)
    linear_weights = {id(layer.weight) for b in model.blocks
                      for layer in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)}
    assert {id(p) for p in decay["params"]} == linear_weights and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert id(model.wte.weight) in {id(p) for p in no_decay["params"]}  # tied embedding: not decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_then_cosine_to_the_floor():
    warm, total, floor = 10, 110, 0.1
    assert warmup_cosine(0, warm, total, floor) == pytest.approx(0.1)
    assert warmup_cosine(9, warm, total, floor) == pytest.approx(1.0)
    assert warmup_cosine(10, warm, total, floor) == pytest.approx(1.0)
    assert warmup_cosine(60, warm, total, floor) == pytest.approx(floor + (1 - floor) * 0.5)
    assert warmup_cosine(110, warm, total, floor) == pytest.approx(floor)
    assert warmup_cosine(500, warm, total, floor) == pytest.approx(floor)
    mid = 10 + 25
    expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4))
    assert warmup_cosine(mid, warm, total, floor) == pytest.approx(expected)


def test_gradients_are_clipped_to_the_configured_norm():
    from longctx.config import compose
    from longctx.tasks import build_task

    cfg = compose(["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "trainer.grad_clip=0.5"])
    task = build_task(cfg)
    task.log = lambda *args, **kwargs: None  # no Trainer attached
    x = torch.randint(0, 50257, (2, 16))
    (task.model.loss(x, x) * 1000).backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in task.parameters()])
    assert norm > 0.5
    task.on_before_optimizer_step(None)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in task.parameters()])
    assert clipped == pytest.approx(0.5, rel=1e-4)
