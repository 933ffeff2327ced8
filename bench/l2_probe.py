"""How much of an attention forward's time depends on what the L2 cache holds when it starts: the
median of triton's do_bench (which zeroes a 256 MB buffer before every call, so the call starts with
a cold, dirty L2) beside back-to-back calls timed by CUDA events (each call starts where the previous
one left the L2) and beside do_bench's pattern with the host's launch time hidden (the GPU sleeps
before each call), with the host time of one call, for longctx and SDPA's cuDNN backend on the same
tensors (FlashAttention's shapes: 16k tokens, hidden 2048, bf16; times in ms unless marked).

    python bench/l2_probe.py [--seqlens 2048 4096 16384] [--head-dims 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench_ms  # noqa: E402


def _median_event_ms(fn, before, warmup: int, calls: int) -> float:
    """Median time of `calls` calls of fn, each between two CUDA events, with before() enqueued ahead of
    each call's start event (untimed)."""
    for _ in range(warmup):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)
    ]
    for start, end in events:
        before()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(start.elapsed_time(end) for start, end in events)[calls // 2]


def back_to_back_ms(fn, calls: int = 50) -> float:
    """Median of `calls` back-to-back calls, each between two CUDA events (no cache flush)."""
    return _median_event_ms(fn, lambda: None, warmup=10, calls=calls)


def hidden_launch_ms(fn, calls: int = 50) -> float:
    """Like do_bench (a 256 MB cache flush before every call), but the GPU also sleeps ~1 ms before
    each call's start event, so that the host's time to launch the call cannot show in its timing."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def flush_and_sleep():
        flush.zero_()
        torch.cuda._sleep(2_000_000)

    return _median_event_ms(fn, flush_and_sleep, warmup=5, calls=calls)


def host_us(fn, calls: int = 20) -> float:
    """Median host time of one call (its launch), the GPU idle and synchronised around each."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return 1e6 * sorted(times)[calls // 2]


def probe_cases(
    head_dims: list[int],
    seqlens: list[int],
    with_raw: bool = False,
    causals: tuple[bool, ...] = (False, True),
    requires_grad: bool = False,
):
    """(head_dim, causal, seqlen, impl name, call) for each case and implementation, on fresh
    FlashAttention-shaped inputs (16k tokens, hidden 2048, bf16; leaves that require grad if asked):
    longctx, (with_raw) its C++ operator without the Python custom op around it, and SDPA's cuDNN
    backend. call is a functools.partial of (q, k, v, causal)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longctx.ops import flash

    def cudnn(q, k, v, causal):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )

    def raw(q, k, v, causal):
        stream = torch.cuda.current_stream().cuda_stream
        scale = q.shape[-1] ** -0.5
        args = (None, None, q.shape[1], k.shape[1], 0.0, scale, causal, None, False, None, stream)
        return torch.ops.longctx_C.fwd(q, k, v, *args)[0]

    impls = {"longctx": lambda q, k, v, c: flash.flash_attention(q, k, v, causal=c)}
    if with_raw:
        impls["longctx_C"] = raw
    impls["sdpa_cudnn"] = cudnn
    for head_dim in head_dims:
        for causal in causals:
            for seqlen in seqlens:
                batch, heads = max(1, 16384 // seqlen), 2048 // head_dim
                q, k, v = (
                    torch.randn(
                        batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                        requires_grad=requires_grad,
                    )
                    for _ in range(3)
                )
                for name, impl in impls.items():
                    yield head_dim, causal, seqlen, name, functools.partial(impl, q, k, v, causal)


def write_rows(out: Path | None, file_name: str, rows: list[dict]) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / file_name).write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    header = ("impl", "D", "causal", "seqlen", "do_bench", "b2b", "hidden", "host us")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (10, 4, 6, 6, 8, 6, 6, 7))))
    for head_dim, causal, seqlen, name, fn in probe_cases(args.head_dims, args.seqlens, with_raw=True):
        with torch.no_grad():
            cold, warm = bench_ms(fn), back_to_back_ms(fn)
            hidden, host = hidden_launch_ms(fn), host_us(fn)
        rows.append(
            dict(
                impl=name,
                head_dim=head_dim,
                causal=causal,
                seqlen=seqlen,
                do_bench_ms=cold,
                back_to_back_ms=warm,
                hidden_launch_ms=hidden,
                host_us=host,
            )
        )
        print(
            f"{name:>10} {head_dim:>4} {causal!s:>6} {seqlen:>6} {cold:>8.3f} {warm:>6.3f} "
            f"{hidden:>6.3f} {host:>7.0f}"
        )
    write_rows(args.out, "l2_probe.json", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
