"""The dropout RNG (Philox4x32-10 known answers, the keep-mask convention of kernels/philox.cuh) and
the check of packed-batch offsets."""

import pytest
import torch
from torch import Tensor

from longctx.ops.common import (
    Dropout,
    causal_visible,
    check_cu_seqlens,
    dropout_keep_mask,
    keep_threshold,
    philox4x32_10,
)


def _words(counter: tuple[int, int, int, int], key: tuple[int, int]) -> list[int]:
    tensors = tuple(torch.tensor(c, dtype=torch.int64) for c in counter)
    return [int(w) for w in philox4x32_10(tensors, key)]


def test_philox_known_answers() -> None:
    # Random123's kat_vectors for philox4x32_10.
    assert _words((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _words((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09,
        0x94FDCCEB,
        0x5001E420,
        0x24126EA1,
    ]


def test_philox_vectorises_like_scalar_calls() -> None:
    counters = torch.tensor([[0, 0, 0, 0], [7, 3, 2**32 - 1, 5], [2**31, 1, 0, 2**32 - 1]], dtype=torch.int64)
    batched = torch.stack(philox4x32_10(tuple(counters.T), (12345, 2**32 - 7)), dim=-1)
    for row, expected in zip(counters.tolist(), batched.tolist()):
        assert _words(tuple(row), (12345, 2**32 - 7)) == expected


def test_keep_threshold_rounds_keep_probability_to_float32() -> None:
    assert keep_threshold(0.0) == 0xFFFFFFFF
    assert keep_threshold(0.5) == 2**31
    assert keep_threshold(0.1) == 15099494 * 256  # float32(0.9) = 15099494 / 2**24


def test_keep_mask_element_is_the_documented_philox_word() -> None:
    seed, offset, p = 0x0123456789ABCDEF, 5, 0.3
    mask = dropout_keep_mask(seed, offset, torch.tensor([0, 7]), range(3, 9), range(0, 13), p)
    for bh_index, bh in enumerate((0, 7)):
        for i in range(3, 9):
            for j in range(13):
                words = _words((j // 4, i, bh, offset), (seed & 0xFFFFFFFF, seed >> 32))
                assert bool(mask[bh_index, i - 3, j]) == (words[j % 4] < keep_threshold(p))


def test_keep_mask_of_a_tile_is_a_slice_of_the_whole_mask() -> None:
    whole = dropout_keep_mask(99, 0, torch.arange(3), range(0, 50), range(0, 61), 0.4)
    tile = dropout_keep_mask(99, 0, 2, range(13, 29), range(5, 38), 0.4)
    assert torch.equal(tile, whole[2, 13:29, 5:38])


def test_keep_fraction_and_seed_dependence() -> None:
    heads, rows, cols = torch.arange(8), range(256), range(256)
    mask = dropout_keep_mask(2024, 0, heads, rows, cols, 0.2)
    assert abs(mask.double().mean().item() - 0.8) < 0.005
    for other in (
        dropout_keep_mask(2025, 0, heads, rows, cols, 0.2),  # seed
        dropout_keep_mask(2024 + 2**32, 0, heads, rows, cols, 0.2),  # high seed word
        dropout_keep_mask(2024, 1, heads, rows, cols, 0.2),  # offset
    ):
        assert abs((mask != other).double().mean().item() - 2 * 0.2 * 0.8) < 0.01
    assert (mask[0] != mask[1]).any()  # heads draw different streams


def test_dropout_seed_comes_from_the_default_generator() -> None:
    torch.manual_seed(7)
    first = Dropout.draw(0.1)
    torch.manual_seed(7)
    assert Dropout.draw(0.1) == first
    assert first is not None and first.offset == 0 and first.seed != Dropout.draw(0.1).seed
    assert Dropout.draw(0.0) is None


def test_causal_visible_is_bottom_right_aligned() -> None:
    rows, cols = range(4), range(6)
    expected = torch.tensor([[j <= i + 2 for j in cols] for i in rows])
    assert torch.equal(causal_visible(rows, cols, 4, 6, torch.device("cpu")), expected)
    # More queries than keys: the first two rows see nothing.
    assert not causal_visible(range(5), range(3), 5, 3, torch.device("cpu"))[:2].any()


def test_cu_seqlens_are_read_back_once_per_tensor(monkeypatch) -> None:
    """Layers share one cu_seqlens: its values are checked (a host read) once, then remembered until
    the tensor changes in place."""
    x = torch.zeros(7, 2, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    reads = []
    original = Tensor.tolist
    monkeypatch.setattr(Tensor, "tolist", lambda self: reads.append(1) or original(self))
    for _ in range(3):
        check_cu_seqlens("q", cu, 8, x, 3)
    assert len(reads) == 1
    cu[1] = 5  # modified in place: checked again (still valid)
    check_cu_seqlens("q", cu, 8, x, 3)
    assert len(reads) == 2
    cu[1] = 8  # now the lengths are 8 and -1
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens("q", cu, 8, x, 3)


def test_cu_seqlens_check_works_in_inference_mode() -> None:
    with torch.inference_mode():
        x = torch.zeros(7, 2, 8)
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        check_cu_seqlens("k", cu, 4, x, 3)
        check_cu_seqlens("k", cu, 4, x, 3)
        with pytest.raises(ValueError, match="max_seqlen_k must be >= the longest length 4"):
            check_cu_seqlens("k", cu, 3, x, 3)
