"""bench/blocksparse.py's round order (the timing itself needs a GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import blocksparse  # noqa: E402

DENSITIES = [1.0, 0.5, 0.25]
IMPLS = ["longctx", "flex"]


@pytest.mark.parametrize("order", ["density", "impl"])
def test_a_round_times_every_case_once(order):
    cases = blocksparse.round_order(DENSITIES, IMPLS, order)
    assert sorted(cases) == sorted((i, d) for i in IMPLS for d in DENSITIES)


def test_impl_order_keeps_each_impl_together():
    cases = blocksparse.round_order(DENSITIES, IMPLS, "impl")
    assert [i for i, _ in cases] == ["longctx"] * 3 + ["flex"] * 3
    assert [d for i, d in cases if i == "longctx"] == DENSITIES


def test_density_order_alternates_impls():
    cases = blocksparse.round_order(DENSITIES, IMPLS, "density")
    assert cases[:2] == [("longctx", 1.0), ("flex", 1.0)]
    assert [d for _, d in cases] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_unknown_order_is_a_value_error():
    with pytest.raises(ValueError, match="order must be"):
        blocksparse.round_order(DENSITIES, IMPLS, "random")
