"""JSONL: the format every long-document source ends in, and a source of its own.

Each converted source (MIMIC-III, ECtHR, synthetic) writes one ``{"text": ..., "labels": [...]}``
object per line and per split with :func:`write_jsonl`; :class:`JsonlSource` takes such files
from the user as they are. Reading and checking them is ``longctx.data.classify.read_jsonl``'s job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from longctx.data.classify import SPLITS, ClassifyDataModule, PathLike
from longctx.data.lm import _atomic_write


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` as JSON lines to ``path`` atomically (temp file, fsync, rename); returns the
    number of rows."""
    count = 0

    def write(f: Any) -> None:
        nonlocal count
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
            count += 1

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, write)
    return count


class JsonlSource:
    """The user's own ``{text, labels}`` (or ``{text, label}``) JSONL files, one per split; nothing
    to convert. ``labels``: a fixed label vocabulary (None: the sorted labels of train)."""

    name = "jsonl"

    def __init__(self, paths: Mapping[str, PathLike] | None = None, labels: list[str] | None = None) -> None:
        self.paths = ClassifyDataModule._check_paths(paths)
        self.labels = labels

    def files(self) -> dict[str, Path]:
        return {split: self.paths[split] for split in SPLITS}
