"""Wall-clock timing of training steps, shared by the end-to-end benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def seconds_per_step(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Run `warmup` untimed steps, then the mean wall time of `steps` steps between two device
    synchronisations (so queued GPU work is counted)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps
