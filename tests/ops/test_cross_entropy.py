"""longctx.ops.cross_entropy against F.cross_entropy on fp32 copies of the logits (the reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx.ops.cross_entropy import cross_entropy


def reference(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> tuple[torch.Tensor, ...]:
    leaf = logits.detach().float().requires_grad_(True)
    loss = F.cross_entropy(leaf, targets, reduction=reduction, ignore_index=-100)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), leaf.grad


def check(device: str, dtype: torch.dtype, reduction: str, atol: float) -> None:
    g = torch.Generator().manual_seed(0)
    padded = (torch.randn(96, 1040, generator=g) * 4).to(device=device, dtype=dtype)
    logits = padded[:, :1000]  # a padded-vocabulary slice, as GPT-2's head returns it: not contiguous
    targets = torch.randint(0, 1000, (96,), generator=g).to(device)
    targets[::7] = -100  # ignored positions
    want, want_grad = reference(logits, targets, reduction)
    leaf = logits.detach().clone().requires_grad_(True)
    got = cross_entropy(leaf, targets, reduction=reduction)
    got.backward(torch.ones_like(got))
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)
    assert leaf.grad.dtype == dtype
    torch.testing.assert_close(leaf.grad.float(), want_grad, atol=atol, rtol=1e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_matches_fp32_reference(reduction):
    check("cpu", torch.bfloat16, reduction, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_compiled_cuda_matches_fp32_reference(dtype, reduction):
    # The loss is fp32 either way; the gradient is rounded once to the logits' dtype.
    check("cuda", dtype, reduction, atol=1e-4 if reduction != "sum" else 1e-3)
