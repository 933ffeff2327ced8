"""ClassificationHead: pooling against hand computation, losses against torch's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.models.heads import ClassificationHead, masked_mean


def _hidden() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 4, 3, dtype=torch.float64) + 0.5


def test_masked_mean_by_hand() -> None:
    hidden = _hidden()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = masked_mean(hidden, mask)
    expected_0 = [(hidden[0, 0, d] + hidden[0, 1, d]).item() / 2 for d in range(3)]
    expected_1 = [sum(hidden[1, t, d].item() for t in range(4)) / 4 for d in range(3)]
    assert out[0].tolist() == pytest.approx(expected_0)
    assert out[1].tolist() == pytest.approx(expected_1)
    assert masked_mean(hidden, None)[0].tolist() == pytest.approx(
        [sum(hidden[0, t, d].item() for t in range(4)) / 4 for d in range(3)])


def test_cls_pooling_uses_first_token_or_encoder_pooled() -> None:
    hidden = _hidden()
    head = ClassificationHead(3, 2, pooling="cls", dropout=0.0).double()
    assert torch.equal(head.pool(hidden), hidden[:, 0])
    pooled = torch.full((2, 3), 7.0, dtype=torch.float64)
    assert torch.equal(head.pool(hidden, pooled=pooled), pooled)
    w, b = head.classifier.weight, head.classifier.bias
    logits = head(hidden)
    by_hand = [[sum(w[c, d].item() * hidden[i, 0, d].item() for d in range(3)) + b[c].item()
                for c in range(2)] for i in range(2)]
    assert logits.tolist()[0] == pytest.approx(by_hand[0]) and logits.tolist()[1] == pytest.approx(by_hand[1])


def test_mean_pooling_ignores_padding() -> None:
    hidden = _hidden()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    head = ClassificationHead(3, 2, pooling="mean", dropout=0.0).double()
    changed = hidden.clone()
    changed[0, 2:] = 100.0  # padding positions must not matter
    assert torch.allclose(head(hidden, mask), head(changed, mask))


def test_single_label_loss_is_cross_entropy() -> None:
    head = ClassificationHead(3, 3, dropout=0.0)
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    by_hand = [-(logits[i, labels[i]] - torch.logsumexp(logits[i], 0)).item() for i in range(2)]
    assert head.loss(logits, labels).item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    assert head.predict(logits).tolist() == [0, 2]


def test_multi_label_loss_is_bce_with_logits() -> None:
    head = ClassificationHead(3, 2, dropout=0.0, multi_label=True)
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])

    def bce(x: float, y: float) -> float:
        p = 1 / (1 + math.exp(-x))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    terms = [bce(logits[i, j].item(), targets[i, j].item()) for i in range(2) for j in range(2)]
    assert head.loss(logits, targets).item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    assert head.loss(logits, targets, reduction="sum").item() == pytest.approx(sum(terms), rel=1e-6)
    assert head.predict(logits, threshold=0.5).tolist() == [[1, 0], [1, 1]]
    assert head.predict(logits, threshold=0.7).tolist() == [[1, 0], [0, 0]]


def test_bad_pooling_is_refused() -> None:
    with pytest.raises(ValueError, match="pooling='max'"):
        ClassificationHead(3, 2, pooling="max")
