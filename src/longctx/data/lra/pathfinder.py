"""Pathfinder (Linsley et al. 2018) as used by the Long Range Arena: Pathfinder-32/64, Path-X (128)
and Path-256, the "hard" setting (contours of 14 paddles).

An image holds two long contours, a few short distractor contours and two round markers. A contour
is a chain of short line segments ("paddles") separated by small gaps; the direction turns by a
uniform angle of at most ``max_turn`` degrees from one paddle to the next. Label 1: the markers sit
on the two ends of the same long contour; label 0: one marker sits on an end of each long contour.
Both classes show the same number of contours, so only following a contour tells them apart.
Contours keep a clearance from each other and from themselves (no crossings, no touching), and the
distractors keep clear of the markers.

Per-size parameters (:data:`SPECS`) follow LRA's generator settings where its builders state them
(paddle thickness, marker radius, gap, the number of distractors = total / (contour_length / 3)
with contour_length // 3 paddles each) and scale the paddle length with the image so that a
contour spans about 1.3 image widths at every size.

Rasterisation is numpy, anti-aliased: a pixel's value is its coverage by a paddle of the given
width (or a marker disk), with a one-pixel linear ramp at the edge, times 255. An image becomes a
sequence of ``size * size`` tokens, its grayscale values 0..255 in row-major order.

The geometry is recorded with every image (see :func:`generate`), so labels can be checked from
it. Classes are exactly balanced: image i has label ``i % 2`` and is drawn from its own RNG seeded
by (gen_seed, i), so the data does not depend on the number of processes. Splits are 80/10/10 of
``n_images`` (contiguous ranges), cached together as one compressed .npz.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from longctx.data.assets import log
from longctx.data.lra.common import (
    SPLITS,
    PathLike,
    TokenClassifyDataModule,
    cache_file,
    default_num_proc,
    load_npz,
    ordered_map,
    save_npz,
)

FORMAT = 1  # bump when the generator or the cache layout changes
CHUNK = 64  # images per task handed to a worker process
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class PathfinderSpec:
    """One image size's drawing parameters; lengths in pixels.

    size: image side. paddle_length, margins (the gap between paddles: one value drawn per contour),
    thickness (paddle width), marker_radius: as LRA's builders name them. max_turn: largest change
    of direction between consecutive paddles, degrees. contour_length: paddles of the two long
    contours; distractor_length and num_distractors: the short contours.
    """

    size: int
    paddle_length: float
    margins: tuple[float, ...]
    thickness: float
    marker_radius: float
    num_distractors: int
    contour_length: int = 14
    distractor_length: int = 14 // 3
    max_turn: float = 30.0


SPECS = {
    32: PathfinderSpec(32, paddle_length=2.0, margins=(1.0,), thickness=0.5, marker_radius=1.5,
                       num_distractors=20 // 4),
    64: PathfinderSpec(64, paddle_length=5.0, margins=(1.0,), thickness=1.0, marker_radius=2.5,
                       num_distractors=int(22 / (14 / 3))),
    128: PathfinderSpec(128, paddle_length=9.0, margins=(2.0, 3.0), thickness=1.5, marker_radius=3.0,
                        num_distractors=int(35 / (14 / 3))),
    256: PathfinderSpec(256, paddle_length=21.0, margins=(3.0,), thickness=2.0, marker_radius=5.0,
                        num_distractors=int(30 / (14 / 3))),
}


class _Stuck(Exception):
    """No room for the contour being drawn; the image is started again."""


class _Canvas:
    """Where contours may still go, on a grid of 1/RES-pixel cells: ``blocked`` marks the cells
    within the clearance (thickness + 1.5 px) of every placed paddle and around the markers."""

    RES = 2

    def __init__(self, spec: PathfinderSpec) -> None:
        self.spec = spec
        self.cells = spec.size * self.RES
        self.blocked = np.zeros((self.cells, self.cells), dtype=bool)
        self.clearance = spec.thickness + 1.5
        self.low = spec.marker_radius + 0.5  # every paddle point stays this far inside the image
        self.high = spec.size - self.low
        steps = max(2, math.ceil((spec.paddle_length + max(spec.margins)) * self.RES) + 1)
        self.fractions = np.linspace(0.0, 1.0, steps)[:, None]  # samples of a chain link, <= 1 cell apart

    def block_disks(self, centres: np.ndarray, radius: float) -> None:
        """Block the cells whose centres lie within ``radius`` of any of the points (n, 2)."""
        reach = math.ceil(radius * self.RES)
        dy, dx = np.mgrid[-reach:reach + 1, -reach:reach + 1]
        cells = np.floor(centres * self.RES).astype(int)  # (n, 2) as (x, y)
        xs, ys = cells[:, None, 0] + dx.ravel(), cells[:, None, 1] + dy.ravel()  # (n, K)
        inside = np.hypot((xs + 0.5) / self.RES - centres[:, None, 0],
                          (ys + 0.5) / self.RES - centres[:, None, 1]) <= radius
        inside &= (xs >= 0) & (xs < self.cells) & (ys >= 0) & (ys < self.cells)
        self.blocked[ys[inside], xs[inside]] = True

    def block_contour(self, points: np.ndarray) -> None:
        """Block the clearance around a contour given by points (..., 2) <= 1 cell apart along it."""
        self.block_disks(points.reshape(-1, 2), self.clearance)

    def free(self, points: np.ndarray) -> np.ndarray:
        """Per leading index of points (n, m, 2): whether none of its m points is in a blocked cell."""
        cells = (points * self.RES).astype(int)
        return ~self.blocked[cells[..., 1], cells[..., 0]].any(axis=-1)


def segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance from points p to segments a -> b (all (..., 2), broadcast) -> (...)."""
    ab, ap = b - a, p - a
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    off = ap - t[..., None] * ab
    return np.sqrt((off * off).sum(-1))


def _contour(rng: np.random.Generator, canvas: _Canvas, paddles: int, rounds: int = 30, shapes: int = 64,
             placements: int = 16) -> np.ndarray:
    """Place a contour of ``paddles`` paddles; returns its (paddles, 2, 2) [start, end] points.

    Shapes first, position second: a round draws ``shapes`` random contours at the origin (a
    uniform direction, then turns uniform in [-max_turn, max_turn]; one gap per contour from
    ``margins``), keeps those whose bounding box fits the image and that keep their own clearance
    (links two or more apart never come closer than ``clearance``, a link being a paddle and
    the gap after it), and tries ``placements`` uniform translations of each that keep it inside
    the image; the first whose links all stay off ``blocked`` wins, and its clearance is blocked.
    """
    spec = canvas.spec
    turn = math.radians(spec.max_turn)
    for _ in range(rounds):
        margin = spec.margins[rng.integers(len(spec.margins))]
        turns = rng.uniform(-turn, turn, size=(shapes, paddles - 1))
        angles = rng.uniform(0.0, 2 * math.pi, size=(shapes, 1)) + np.cumsum(
            np.concatenate([np.zeros((shapes, 1)), turns], axis=1), axis=1)
        directions = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (shapes, paddles, 2)
        starts = np.concatenate([np.zeros((shapes, 1, 2)), np.cumsum(
            (spec.paddle_length + margin) * directions[:, :-1], axis=1)], axis=1)
        candidates = np.stack([starts, starts + spec.paddle_length * directions], axis=2)  # (S, P, 2, 2)
        lo, hi = candidates.min(axis=(1, 2)), candidates.max(axis=(1, 2))  # (S, 2)
        room = (canvas.high - canvas.low) - (hi - lo)
        fit = np.flatnonzero((room >= 0).all(axis=1))[:4]  # a few suffice; the distances below are costly
        if not len(fit):
            continue
        # Chain links: each paddle with the gap after it, so no contour passes through another's gaps.
        a = candidates[fit, :, 0]  # (F, P, 2)
        b = np.concatenate([a[:, 1:], candidates[fit, -1:, 1]], axis=1)
        points = a[:, :, None] + canvas.fractions[None, None] * (b - a)[:, :, None]  # (F, P, m, 2)
        # d[f, i, j]: how close link i of shape f comes to link j
        d = segment_distance(points[:, :, :, None], a[:, None, None], b[:, None, None]).min(axis=2)
        apart = np.abs(np.arange(paddles)[:, None] - np.arange(paddles)[None, :]) >= 2
        self_clear = (d >= canvas.clearance)[:, apart].all(axis=1)
        keep = np.flatnonzero(self_clear)
        if not len(keep):
            continue
        i = fit[keep]  # every kept shape at ``placements`` random positions, tested at once
        shift = rng.uniform(0.0, 1.0, size=(len(i), placements, 2))
        offsets = canvas.low - lo[i, None] + shift * room[i, None]
        free = canvas.free(points[keep].reshape(len(i), 1, -1, 2) + offsets[:, :, None])  # (kept, placements)
        if free.any():
            j, k = np.unravel_index(np.argmax(free), free.shape)
            canvas.block_contour(points[keep[j]] + offsets[j, k])
            return candidates[i[j]] + offsets[j, k]
    raise _Stuck


def _markers_clear(spec: PathfinderSpec, contours: np.ndarray, markers: np.ndarray,
                   owners: tuple[int, int], ends: tuple[int, int]) -> bool:
    """Each marker disk keeps clear of the long contours' paddles but the two of its own contour
    nearest to it."""
    need = spec.marker_radius + spec.thickness / 2 + 0.5
    for marker, c, end in zip(markers, owners, ends):
        near = (0, 1) if end == 0 else (spec.contour_length - 2, spec.contour_length - 1)
        keep = np.ones((2, spec.contour_length), dtype=bool)
        keep[c, list(near)] = False
        paddles = contours[:2][keep]  # (n, 2, 2)
        if segment_distance(marker, paddles[:, 0], paddles[:, 1]).min() < need:
            return False
    return True


def draw_image(rng: np.random.Generator, spec: PathfinderSpec, label: int) -> dict[str, np.ndarray]:
    """One image and its geometry (see :func:`generate` for the fields)."""
    n_contours = 2 + spec.num_distractors
    for _ in range(200):
        canvas = _Canvas(spec)
        contours = np.full((n_contours, spec.contour_length, 2, 2), np.nan)
        try:
            for c in (0, 1):
                contours[c] = _contour(rng, canvas, spec.contour_length)
        except _Stuck:
            continue
        ends = (0, 1) if label else tuple(int(e) for e in rng.integers(0, 2, size=2))
        owners = (0, 0) if label else (0, 1)
        markers = np.stack([contours[c, 0, 0] if e == 0 else contours[c, -1, 1]
                            for c, e in zip(owners, ends)])
        if not _markers_clear(spec, contours, markers, owners, ends):
            continue
        canvas.block_disks(markers, spec.marker_radius + spec.thickness / 2 + 1.0)
        for c in range(2, n_contours):  # a distractor that finds no room is left out (NaN geometry)
            try:
                contours[c, :spec.distractor_length] = _contour(rng, canvas, spec.distractor_length)
            except _Stuck:
                pass
        return {"image": rasterize(spec, contours, markers), "contours": contours.astype(np.float32),
                "markers": markers.astype(np.float32), "marker_contour": np.array(owners, dtype=np.int8),
                "marker_end": np.array(ends, dtype=np.int8)}
    raise RuntimeError(f"Pathfinder-{spec.size}: found no layout in 200 attempts; the spec is too crowded")


def rasterize(spec: PathfinderSpec, contours: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Anti-aliased grayscale image uint8 (size, size) of contours (C, P, 2, 2) [NaN = absent] and
    marker centres (k, 2); points are (x, y) = (column, row), pixel (i, j) covers [j, j+1] x [i, i+1].

    A pixel's value is 255 times its largest coverage: 1 within half the thickness of a paddle
    (or within the radius of a marker), falling linearly to 0 over the next pixel.
    """
    paddles = contours.reshape(-1, 2, 2)
    paddles = paddles[~np.isnan(paddles).any(axis=(1, 2))]
    image = np.zeros((spec.size, spec.size))
    half, r = spec.thickness / 2, spec.marker_radius
    a, b = paddles[:, None, None, 0], paddles[:, None, None, 1]
    width = math.ceil(spec.paddle_length + spec.thickness) + 4  # a paddle's box with the ramp, and rounding
    _stamp(image, np.minimum(paddles[:, 0], paddles[:, 1]) - half - 1, width,
           lambda p: half + 0.5 - segment_distance(p, a, b))
    m = markers[:, None, None]
    _stamp(image, markers - r - 1, math.ceil(2 * r) + 4, lambda p: r + 0.5 - np.linalg.norm(p - m, axis=-1))
    return np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _stamp(image: np.ndarray, corners: np.ndarray, width: int,
           coverage: Callable[[np.ndarray], np.ndarray]) -> None:
    """image = max(image, coverage) over K windows of width x width pixels whose top-left pixels
    hold the points corners (K, 2); coverage maps pixel centres (K, width, width, 2) to (K, width, width)."""
    origin = np.floor(corners).astype(int)
    dy, dx = np.mgrid[0:width, 0:width]
    xs, ys = origin[:, 0, None, None] + dx, origin[:, 1, None, None] + dy  # (K, width, width)
    values = coverage(np.stack([xs, ys], axis=-1) + 0.5)
    inside = (xs >= 0) & (xs < image.shape[1]) & (ys >= 0) & (ys < image.shape[0]) & (values > 0)
    np.maximum.at(image, (ys[inside], xs[inside]), values[inside])


def _chunk_task(args: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
    size, gen_seed, first, count = args
    spec = SPECS[size]
    drawn = [draw_image(np.random.default_rng([gen_seed, i]), spec, i % 2)
             for i in range(first, first + count)]
    out = {name: np.stack([d[name] for d in drawn]) for name in drawn[0]}
    out["images"] = out.pop("image")
    out["labels"] = np.arange(first, first + count, dtype=np.int64) % 2
    return out


def generate(size: int, n_images: int, gen_seed: int = 0, num_proc: int | None = None,
             progress: bool = True) -> dict[str, np.ndarray]:
    """``n_images`` Pathfinder images of side ``size`` (a key of :data:`SPECS`) with their geometry.

    Returns arrays over images i = 0..n-1:
        images uint8 (n, size, size); labels int64 (n,) = i % 2;
        contours float32 (n, C, P, 2, 2): contour c's paddle k runs from [..., c, k, 0] to
            [..., c, k, 1], (x, y) points; c = 0, 1 are the long contours (P = contour_length
            paddles), c >= 2 the distractors (rows past distractor_length, and distractors that
            found no room, are NaN);
        markers float32 (n, 2, 2): the two marker centres (x, y);
        marker_contour int8 (n, 2): the contour each marker sits on; marker_end int8 (n, 2): on
            its first paddle's start (0) or its last paddle's end (1).
    """
    if size not in SPECS:
        raise ValueError(f"Pathfinder size {size} is not available; choose from: "
                         f"{', '.join(map(str, SPECS))}")
    if n_images < 1:
        raise ValueError(f"Pathfinder n_images must be positive, got {n_images}")
    tasks = [(size, gen_seed, first, min(CHUNK, n_images - first)) for first in range(0, n_images, CHUNK)]
    parts = []
    with tqdm(total=n_images, desc=f"generating Pathfinder-{size}", unit="img", disable=not progress) as bar:
        for part in ordered_map(_chunk_task, tasks, default_num_proc(num_proc, len(tasks))):
            parts.append(part)
            bar.update(len(part["labels"]))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def split_sizes(n_images: int) -> dict[str, int]:
    """80/10/10 split of ``n_images`` (train takes the rounding remainder)."""
    val, test = (round(n_images * f) for f in SPLIT_FRACTIONS[1:])
    return {"train": n_images - val - test, "val": val, "test": test}


class PathfinderDataModule(TokenClassifyDataModule):
    """Pathfinder batches for ``longctx.tasks.classify``: 2 labels, 256 pixel-value tokens,
    ``seqlen`` = size * size, no padding.

    Args:
        size: 32, 64, 128 (Path-X) or 256 (Path-256).
        n_images: images in all (split 80/10/10).
        gen_seed: which images (kept apart from ``seed``, the training order).
        num_proc: generator processes (default: CPU count, at most 16).
        cache_dir: where the .npz goes (default ``<data root>/cache/lra``).
    """

    num_labels = 2
    vocab_size = 256

    def __init__(self, size: int = 32, n_images: int = 200000, gen_seed: int = 0, seqlen: int = 1024,
                 batch_size: int = 256, num_workers: int = 0, num_proc: int | None = None,
                 cache_dir: PathLike | None = None, seed: int = 0) -> None:
        if size not in SPECS:
            raise ValueError(f"data.size={size} is not a Pathfinder size; choose from: "
                             f"{', '.join(map(str, SPECS))}")
        if seqlen != size * size:
            raise ValueError(f"data.seqlen={seqlen} must be size * size = {size * size} for "
                             f"Pathfinder-{size} (one token per pixel)")
        super().__init__(seqlen, batch_size, num_workers, seed)
        self.size, self.n_images, self.gen_seed, self.num_proc = size, n_images, gen_seed, num_proc
        spec = asdict(SPECS[size])
        spec["margins"] = list(spec["margins"])
        self.path = cache_file(f"pathfinder{size}", {"format": FORMAT, "n_images": n_images,
                                                      "gen_seed": gen_seed, "spec": spec}, cache_dir)
        self._data: dict[str, np.ndarray] | None = None

    def load_data(self) -> dict[str, np.ndarray]:
        """Every image and its geometry (the fields of :func:`generate`), from the cache or generated."""
        if self._data is None:
            if self.path.is_file():
                log.info("longctx: using cached Pathfinder-%d in %s", self.size, self.path)
                self._data = load_npz(self.path)
            else:
                self._data = generate(self.size, self.n_images, self.gen_seed, self.num_proc)
                save_npz(self.path, self._data)
                log.info("longctx: wrote %s", self.path)
        return self._data

    def load_splits(self) -> dict[str, dict[str, np.ndarray]]:
        data, start, out = self.load_data(), 0, {}
        for split, n in split_sizes(self.n_images).items():
            out[split] = {"tokens": data["images"][start:start + n],
                          "labels": data["labels"][start:start + n]}
            start += n
        assert tuple(out) == SPLITS
        return out
