"""Pathfinder generator: labels against the recorded geometry, balance, sizes, pixels, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longctx.data.lra.pathfinder import SPECS, PathfinderDataModule, draw_image, generate, split_sizes


def contour_ends(contour: np.ndarray) -> list[np.ndarray]:
    """The two free ends of a recorded contour (P, 2, 2) with NaN rows past its length."""
    paddles = contour[~np.isnan(contour[:, 0, 0])]
    return [paddles[0, 0], paddles[-1, 1]]


def link_distance(c1: np.ndarray, c2: np.ndarray, samples: int = 25) -> float:
    """Smallest distance between two contours' chains (each paddle and the gap after it), brute force."""
    def chain(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = c[~np.isnan(c[:, 0, 0])].astype(np.float64)
        return p[:, 0], np.concatenate([p[1:, 0], p[-1:, 1]])

    (a1, b1), (a2, b2) = chain(c1), chain(c2)
    t = np.linspace(0, 1, samples)[None, :, None]
    points = (a1[:, None] + t * (b1 - a1)[:, None]).reshape(-1, 2)
    best = np.inf
    for a, b in zip(a2, b2):
        ab = b - a
        s = np.clip(((points - a) @ ab) / (ab @ ab), 0, 1)
        best = min(best, np.linalg.norm(points - (a + s[:, None] * ab), axis=1).min())
    return best


@pytest.fixture(scope="module")
def pf32() -> dict[str, np.ndarray]:
    return generate(32, 60, gen_seed=11, num_proc=1, progress=False)


def test_labels_agree_with_the_recorded_geometry(pf32):
    for i, label in enumerate(pf32["labels"]):
        contours, markers = pf32["contours"][i], pf32["markers"][i]
        # which contours have each marker on one of their ends, found from the geometry alone
        on = [{c for c in range(len(contours)) if not np.isnan(contours[c, 0, 0, 0])
               and any(np.allclose(m, e, atol=1e-4) for e in contour_ends(contours[c]))} for m in markers]
        assert on[0] and on[1], f"image {i}: a marker is not on the end of any contour"
        both_ends = [c for c in on[0] & on[1] if not np.allclose(*contour_ends(contours[c]))]
        if label == 1:
            assert both_ends, f"image {i}: label 1 but no contour has the markers on its two ends"
            assert not np.allclose(markers[0], markers[1])
        else:
            assert not both_ends, f"image {i}: label 0 but one contour carries both markers"
        assert set(pf32["marker_contour"][i]) <= on[0] | on[1]  # the recorded owners agree


def test_classes_balanced_and_splits_80_10_10(pf32):
    sizes = split_sizes(60)
    assert sizes == {"train": 48, "val": 6, "test": 6}
    start = 0
    for n in sizes.values():
        assert abs(pf32["labels"][start:start + n].mean() - 0.5) <= 0.02
        start += n


def test_markers_and_paddles_are_drawn(pf32):
    spec = SPECS[32]
    for image, contours, markers in zip(pf32["images"], pf32["contours"], pf32["markers"]):
        assert image.shape == (32, 32) and image.dtype == np.uint8
        ys, xs = np.mgrid[0:32, 0:32] + 0.5
        for m in markers:  # every pixel centre inside the disk (less the anti-aliasing ramp) is white
            inside = np.hypot(xs - m[0], ys - m[1]) <= spec.marker_radius - 0.5
            assert inside.any() and (image[inside] == 255).all()
        paddles = contours.reshape(-1, 2, 2)
        for a, b in paddles[~np.isnan(paddles[:, 0, 0])]:
            mid = (a + b) / 2
            assert image[int(mid[1]), int(mid[0])] > 0
        assert (image == 0).mean() > 0.5  # mostly background


def test_contours_keep_apart(pf32):
    spec = SPECS[32]
    for contours in pf32["contours"][:20]:
        present = [c for c in contours if not np.isnan(c[0, 0, 0])]
        for i in range(len(present)):
            for j in range(i + 1, len(present)):
                assert link_distance(present[i], present[j]) >= spec.thickness + 1.0


@pytest.mark.parametrize("size", sorted(SPECS))
def test_every_size_draws_its_spec(size):
    spec = SPECS[size]
    for label in (0, 1):
        out = draw_image(np.random.default_rng([5, label]), spec, label)
        assert out["image"].shape == (size, size)
        assert out["contours"].shape == (2 + spec.num_distractors, spec.contour_length, 2, 2)
        long = out["contours"][:2]
        assert not np.isnan(long).any()
        gaps = np.linalg.norm(long[:, 1:, 0] - long[:, :-1, 1], axis=-1)  # between consecutive paddles
        assert np.all(np.isin(np.round(gaps, 3), np.round(spec.margins, 3)))
        lengths = np.linalg.norm(long[:, :, 1] - long[:, :, 0], axis=-1)
        np.testing.assert_allclose(lengths, spec.paddle_length, rtol=1e-5)
        assert (out["marker_contour"][0] == out["marker_contour"][1]) == bool(label)


def test_independent_of_process_count_and_seeded():
    one = generate(32, 66, gen_seed=2, num_proc=1, progress=False)  # two chunks of work
    two = generate(32, 66, gen_seed=2, num_proc=2, progress=False)
    for name in one:
        np.testing.assert_array_equal(one[name], two[name])
    other = generate(32, 4, gen_seed=3, num_proc=1, progress=False)
    assert not np.array_equal(one["images"][:4], other["images"])


def test_datamodule_batches_pixels_as_tokens(tmp_path):
    dm = PathfinderDataModule(size=32, n_images=20, seqlen=1024, batch_size=2, num_proc=1, cache_dir=tmp_path,
                              gen_seed=4)
    dm.prepare_data()
    mtime = dm.path.stat().st_mtime_ns
    data = dm.load_data()
    batch = next(iter(dm.test_dataloader()))
    assert batch["input_ids"].shape == (2, 1024) and batch["attention_mask"].all()
    test_start = split_sizes(20)["train"] + split_sizes(20)["val"]
    expected = torch.from_numpy(data["images"][test_start:test_start + 2].reshape(2, -1).astype(np.int64))
    assert torch.equal(batch["input_ids"], expected)  # row-major pixels, values 0..255
    assert batch["labels"].tolist() == data["labels"][test_start:test_start + 2].tolist()
    assert dm.num_labels == 2 and dm.tokenizer_vocab_size == 256
    again = PathfinderDataModule(size=32, n_images=20, seqlen=1024, num_proc=1, cache_dir=tmp_path,
                                 gen_seed=4)
    np.testing.assert_array_equal(again.load_data()["contours"], data["contours"])
    assert dm.path.stat().st_mtime_ns == mtime  # read from the cache, not generated again


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"must be size \* size = 4096"):
        PathfinderDataModule(size=64, seqlen=1024)
    with pytest.raises(ValueError, match="choose from: 32, 64, 128, 256"):
        PathfinderDataModule(size=48, seqlen=48 * 48)
