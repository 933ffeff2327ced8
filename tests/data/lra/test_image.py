"""LRA Image (CIFAR-10 python batches -> grayscale pixel tokens) against exact decimal arithmetic."""

from __future__ import annotations

import collections
import pickle
import shutil
import tarfile
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest
import torch

from longctx.data import DATA
from longctx.data.lra.image import ImageDataModule, read_cifar10

CIFAR = Path(__file__).parent / "fixtures" / "cifar-10-batches-py"
WEIGHTS = (Decimal("0.2989"), Decimal("0.5870"), Decimal("0.1140"))


def _expected(names: list[str]) -> tuple[list[list[int]], list[int]]:
    """Gray images (row-major lists) and labels of the given batches, pixel by pixel in Decimal."""
    images, labels = [], []
    for name in names:
        with (CIFAR / name).open("rb") as f:
            batch = pickle.load(f, encoding="bytes")  # our own fixture: trusted
        for rgb, label in zip(batch[b"data"], batch[b"labels"]):
            gray = []
            for p in range(1024):
                value = sum(w * int(rgb[c * 1024 + p]) for c, w in enumerate(WEIGHTS))
                gray.append(int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP)))
            images.append(gray)
            labels.append(int(label))
    return images, labels


def _split(data: ImageDataModule, split: str) -> tuple[list[list[int]], list[int]]:
    data.setup()
    items = list(data.datasets[split])
    assert all(bool(item["attention_mask"].all()) for item in items)  # no padding at seqlen 1024
    return [item["input_ids"].tolist() for item in items], [int(item["labels"]) for item in items]


def test_pixels_are_luminance_of_the_planar_rgb_and_splits_follow_lra():
    data = ImageDataModule(CIFAR)
    train_images, train_labels = _expected([f"data_batch_{i}" for i in range(1, 6)])
    # LRA: the first 90% of the training images train, the last 10% validate
    assert _split(data, "train") == (train_images[:9], train_labels[:9])
    assert _split(data, "val") == (train_images[9:], train_labels[9:])
    assert _split(data, "test") == _expected(["test_batch"])
    assert data.num_labels == 10 and data.tokenizer_vocab_size == 256
    assert _split(data, "train")[0][0] == [76] * 1024  # the fixture's pure red image: 0.2989 * 255


def test_reads_the_published_tar_gz_too(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(CIFAR, arcname="cifar-10-batches-py")
    from_tar, from_dir = read_cifar10(archive), read_cifar10(CIFAR)
    for split in ("train", "test"):
        for a, b in zip(from_tar[split], from_dir[split]):
            np.testing.assert_array_equal(a, b)


def _write(folder: Path, name: str, obj: object) -> None:
    with (folder / name).open("wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize("broken, message", [
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 12]},
     r"data_batch_3: record 1: label 12 is not in 0..9"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [3, 1]},
     r"data_batch_3: data must be uint8 \(n, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3]}, r"data_batch_3: 2 images but 1 labels"),
    ({b"labels": [3]}, r"data_batch_3: expected a dict with b'data' and b'labels'"),
    (collections.OrderedDict(), r"data_batch_3: not a CIFAR-10 python batch \(refusing to load collections"),
])
def test_malformed_batches_name_file_and_record(tmp_path, broken, message):
    root = tmp_path / "cifar-10-batches-py"
    shutil.copytree(CIFAR, root)
    _write(root, "data_batch_3", broken)
    with pytest.raises(ValueError, match=message):
        ImageDataModule(root).setup()


def test_missing_batch_and_bad_settings_are_refused(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    shutil.copytree(CIFAR, root)
    (root / "test_batch").unlink()
    with pytest.raises(ValueError, match="no test_batch in"):
        ImageDataModule(root).setup()
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        ImageDataModule(CIFAR, val_fraction=0)
    with pytest.raises(ValueError, match="data.path is required"):
        ImageDataModule()


def test_registered_and_batched_for_the_classify_task():
    data = DATA["lra_image"]({"path": str(CIFAR), "batch_size": 4, "num_workers": 0}, 0)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (4, 1024) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].shape == (4,) and int(batch["input_ids"].max()) <= 255
