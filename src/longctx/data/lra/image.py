"""LRA Image: CIFAR-10 (Krizhevsky 2009) classified from its 1024 grayscale pixels as a sequence.

A 32x32 image becomes 1024 tokens, one per pixel in row-major order, each the 8-bit gray value
(vocabulary 256): gray = 0.2989 R + 0.5870 G + 0.1140 B rounded half up (computed exactly in
integers), the luminance weights of ``tf.image.rgb_to_grayscale`` that LRA used. 10 labels
(airplane ... truck).

Source: CIFAR-10's python version as published, the folder ``cifar-10-batches-py`` extracted from
``cifar-10-python.tar.gz`` (or the .tar.gz itself): pickled batches ``data_batch_1`` ...
``data_batch_5`` and ``test_batch``, each a dict with ``data`` (n, 3072) uint8 — the 1024 red,
then green, then blue values of a row-major image — and ``labels`` (n,). Splits as LRA: the last
``val_fraction`` (10%) of the training images validate, ``test_batch`` tests. The pickles are
read with an unpickler that accepts numpy arrays and plain containers only. Reading takes about a
second, so nothing is cached.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from longctx.data.lra.common import PathLike, TokenClassifyDataModule

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
LUMA = (2989, 5870, 1140)  # ten-thousandths: tf.image.rgb_to_grayscale's 0.2989, 0.5870, 0.1140
PIXELS = 32 * 32


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtin containers; refuses any other global (a pickle can run code)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode")}  # how Python 3 writes bytes in protocol 2 (harmless)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not a CIFAR-10 batch)")


def parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A pickled CIFAR-10 batch -> (rgb uint8 (n, 3072), labels int64 (n,)); ValueError naming
    ``where`` (the file) and the record for a malformed batch."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{where}: not a CIFAR-10 python batch ({err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{where}: expected a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * PIXELS:
        raise ValueError(f"{where}: data must be uint8 (n, {3 * PIXELS}), got {data.dtype} {data.shape}")
    if len(labels) != len(data):
        raise ValueError(f"{where}: {len(data)} images but {len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if len(bad):
        raise ValueError(f"{where}: record {bad[0]}: label {labels[bad[0]]} is not in 0..9")
    return data, labels


def grayscale(rgb: np.ndarray) -> np.ndarray:
    """(n, 3072) planar RGB uint8 -> (n, 1024) gray uint8 by LUMA, rounded half up."""
    planes = rgb.reshape(len(rgb), 3, PIXELS).astype(np.int64)
    gray = (np.tensordot(np.asarray(LUMA), planes, axes=([0], [1])) + 5000) // 10000
    return np.clip(gray, 0, 255).astype(np.uint8)


def read_cifar10(path: PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": ..., "test": ...} as (gray pixels uint8 (n, 1024), labels int64 (n,)) from the
    cifar-10-batches-py folder or cifar-10-python.tar.gz; train is data_batch_1..5 in order."""
    path = Path(path)
    names = (*TRAIN_BATCHES, TEST_BATCH)
    raw: dict[str, bytes] = {}
    if path.is_dir():
        for name in names:
            if not (path / name).is_file():
                raise ValueError(f"data.path: no {name} in {path} (expected the cifar-10-batches-py folder)")
            raw[name] = (path / name).read_bytes()
        where = {name: str(path / name) for name in names}
    elif path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for name in names:
                if name not in members:
                    raise ValueError(f"data.path: no {name} in {path}")
                raw[name] = tar.extractfile(members[name]).read()
        where = {name: f"{path}:{members[name].name}" for name in names}
    else:
        raise ValueError(f"data.path: no such folder or .tar.gz: {path}")
    parsed = {name: parse_batch(raw[name], where[name]) for name in names}
    train = [parsed[name] for name in TRAIN_BATCHES]
    test_rgb, test_labels = parsed[TEST_BATCH]
    train_rgb, train_labels = (np.concatenate(arrays) for arrays in zip(*train))
    return {"train": (grayscale(train_rgb), train_labels), "test": (grayscale(test_rgb), test_labels)}


class ImageDataModule(TokenClassifyDataModule):
    """LRA Image batches for ``longctx.tasks.classify`` (10 labels, 256 gray levels, 1024 tokens).

    Args:
        path: the cifar-10-batches-py folder or cifar-10-python.tar.gz.
        seqlen: tokens per row; 1024 is the whole image.
        val_fraction: the last fraction of the training images that validates (LRA: 0.1).
    """

    num_labels = 10
    vocab_size = 256

    def __init__(self, path: PathLike | None = None, seqlen: int = PIXELS, batch_size: int = 256,
                 num_workers: int = 0, val_fraction: float = 0.1, seed: int = 0) -> None:
        super().__init__(seqlen, batch_size, num_workers, seed, pad_id=0)
        if not path:
            raise ValueError("data.path is required: the cifar-10-batches-py folder "
                             "(or cifar-10-python.tar.gz)")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.path, self.val_fraction = Path(path), val_fraction
        self._splits: dict[str, dict[str, np.ndarray]] | None = None

    def load_splits(self) -> dict[str, dict[str, np.ndarray]]:
        if self._splits is None:
            data = read_cifar10(self.path)
            pixels, labels = data["train"]
            cut = len(labels) - int(round(len(labels) * self.val_fraction))
            self._splits = {"train": {"tokens": pixels[:cut], "labels": labels[:cut]},
                            "val": {"tokens": pixels[cut:], "labels": labels[cut:]},
                            "test": {"tokens": data["test"][0], "labels": data["test"][1]}}
        return self._splits
