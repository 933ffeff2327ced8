"""Cross-entropy over a large vocabulary in fp32 without an fp32 copy of the logits.

``F.cross_entropy(logits.float(), targets)`` on bf16 logits of (tokens, 50257) writes an fp32 copy,
a log-softmax and, in the backward, a zero-filled fp32 gradient that is scattered into and cast back:
about 11 ms of an 80 ms GPT-2 step at 16k tokens on an H100 (bench/profile_train.py). On CUDA this
runs the same expression through torch.compile, whose generated kernels upcast inside the reduction
(logits read in bf16, log-sum-exp in fp32) and write the gradient once in the logits' dtype. The
result is the same fp32 loss; elsewhere (CPU, or inside an outer torch.compile) it is the plain
expression.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _fp32_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str,
                        ignore_index: int) -> torch.Tensor:  # fmt: skip
    return F.cross_entropy(logits.float(), targets, reduction=reduction, ignore_index=ignore_index)


@functools.cache
def _compiled():
    # Not fullgraph: past dynamo's recompile limit (new dtypes / reductions / shapes) a call falls
    # back to the plain expression instead of failing.
    return torch.compile(_fp32_cross_entropy)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                  ignore_index: int = -100) -> torch.Tensor:  # fmt: skip
    """F.cross_entropy of ``logits`` (N, C) in fp32 against int64 ``targets`` (N,)."""
    if logits.is_cuda and not torch.compiler.is_compiling():
        return _compiled()(logits, targets, reduction, ignore_index)
    return _fp32_cross_entropy(logits, targets, reduction, ignore_index)
