"""bench/attention.py's rounds: interleaved order, medians, per-round ratios (the timing needs a GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import attention  # noqa: E402

CASE = {"head_dim": 128, "causal": True, "seqlen": 2048, "batch": 8, "heads": 16}


def row(impl: str, fwd_ms: float, bwd_ms: float | None = None, **extra) -> dict:
    r = {"impl": impl, **CASE, "fwd_ms": fwd_ms, **extra}
    if bwd_ms is not None:
        r["bwd_ms"] = bwd_ms
    return r


def test_odd_rounds_reverse_the_impls():
    impls = ["longctx", "longctx_sm80", "sdpa_cudnn"]
    assert attention.round_impls(impls, 0) == impls
    assert attention.round_impls(impls, 1) == impls[::-1]
    assert attention.round_impls(impls, 2) == impls


def test_median_row_takes_each_time_median_and_keeps_the_rounds():
    rounds = [row("longctx", 0.30, 1.4), row("longctx", 0.50, 1.0), row("longctx", 0.20, 1.2)]
    med = attention.median_row(rounds)
    assert med["fwd_ms"] == 0.30 and med["bwd_ms"] == 1.2
    assert med["fwd_ms_rounds"] == [0.30, 0.50, 0.20] and med["rounds"] == 3
    assert rounds[0]["fwd_ms"] == 0.30 and "rounds" not in rounds[0]  # inputs untouched


def test_median_row_of_one_round_is_that_round():
    assert attention.median_row([row("longctx", 0.3, 1.0)]) == row("longctx", 0.3, 1.0)


def test_a_round_that_failed_is_listed_and_the_others_count():
    failed = {"impl": "longctx", **CASE, "error": "OOM"}
    med = attention.median_row([failed, row("longctx", 0.4, 1.0), row("longctx", 0.2, 1.0)])
    assert med["fwd_ms"] == pytest.approx(0.3)
    assert med["error_rounds"] == ["OOM"] and "error" not in med


def test_a_case_that_failed_in_every_round_keeps_its_error():
    failed = {"impl": "longctx", **CASE, "error": "OOM"}
    med = attention.median_row([failed, dict(failed)])
    assert med["error"] == "OOM" and "fwd_ms" not in med


def test_tflops_follow_the_median_times():
    med = attention.with_tflops(attention.median_row([row("longctx", 0.25, 0.5), row("longctx", 0.75, 1.5)]))
    flops = 4 * 8 * 16 * 2048 * 2048 * 128 / 2  # causal halves the forward FLOPs
    assert med["fwd_tflops"] == pytest.approx(flops / 0.5e-3 / 1e12)
    assert med["bwd_tflops"] == pytest.approx(2.5 * flops / 1.0e-3 / 1e12)
    assert med["fwdbwd_ms"] == pytest.approx(1.5)


def test_round_ratios_pair_the_rounds_of_two_impls():
    ours = attention.median_row([row("longctx", 1.0), row("longctx", 2.0)])
    peer = attention.median_row([row("sdpa_cudnn", 1.1), row("sdpa_cudnn", 1.8)])
    assert attention.round_ratios(ours, peer, "fwd") == pytest.approx([1.1, 0.9])
    assert attention.ratio_spread(ours, peer, "fwd") == "0.90-1.10"
    assert attention.round_ratios(ours, peer, "bwd") == []  # no backward rounds
    single = attention.median_row([row("sdpa_cudnn", 1.0)])
    assert attention.ratio_spread(ours, single, "fwd") == "-"
