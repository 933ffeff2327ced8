"""Long-document multi-label classification: MIMIC-III ICD-9 coding, ECtHR, any {text, labels}
JSONL, and a synthetic MIMIC-style task where longer context measurably helps.

Every source but ``jsonl`` is converted once into ``{train,val,test}.jsonl`` (one
``{"text", "labels"}`` object per document) under ``<data root>/cache/longdoc/<source>-<key>/``,
with ``meta.json`` (the label set, row counts) written last to mark the cache complete; ``key``
hashes the inputs (paths, sizes, mtimes) and the options, so a change rebuilds and nothing else
does. From there :class:`~longctx.data.classify.ClassifyDataModule` reads, checks, tokenizes
(WordPiece) and batches the documents, truncated to ``seqlen`` tokens.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Protocol

from longctx.data.assets import data_root
from longctx.data.classify import SPLITS, BadRows, ClassifyDataModule, PathLike
from longctx.data.longdoc.ecthr import EcthrSource
from longctx.data.longdoc.jsonl import JsonlSource, write_jsonl
from longctx.data.longdoc.mimic3 import Mimic3Source
from longctx.data.longdoc.synthetic import SyntheticSource

CACHE_FORMAT = 1  # bump when the layout of the converted files changes


class ConvertedSource(Protocol):
    """A source in its own format, converted once to JSONL."""

    name: str
    labels: list[str] | None

    def identity(self) -> dict[str, Any]: ...

    def convert(self, folder: Path, bad_rows: BadRows) -> list[str]: ...


SOURCES: dict[str, type] = {
    "mimic3": Mimic3Source,
    "ecthr": EcthrSource,
    "jsonl": JsonlSource,
    "synthetic": SyntheticSource,
}


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


class LongDocDataModule(ClassifyDataModule):
    """ClassifyDataModule over a long-document source (batches as there: input_ids,
    attention_mask, token_type_ids (batch, seqlen) and multi-hot labels (batch, num_labels)).

    Args:
        source: a JsonlSource (files used as they are) or a ConvertedSource (converted and cached).
        cache_dir: where converted sources go; default ``<data root>/cache/longdoc``.
        The rest: see :class:`~longctx.data.classify.ClassifyDataModule`.
    """

    def __init__(self, source: JsonlSource | ConvertedSource, seqlen: int = 512, batch_size: int = 8,
                 num_workers: int = 0, *, vocab_path: PathLike | None = None, vocab_size: int = 8000,
                 lowercase: bool = True, seed: int = 0, bad_rows: str = "error",
                 cache_dir: PathLike | None = None) -> None:
        self.source = source
        self.cache_dir = Path(cache_dir) if cache_dir is not None else data_root() / "cache" / "longdoc"
        super().__init__(None, seqlen, batch_size, num_workers, vocab_path=vocab_path, vocab_size=vocab_size,
                         lowercase=lowercase, seed=seed, labels=source.labels, bad_rows=bad_rows)

    def _check_paths(self, paths: Any) -> dict[str, Path]:
        return {}  # the files come from the source, in split_files

    def cache_folder(self) -> Path:
        """``<cache_dir>/<source>-<16 hex digits of sha256 over format, source identity, bad_rows>``."""
        payload = {"format": CACHE_FORMAT, "source": self.source.name, "identity": self.source.identity(),
                   "bad_rows": self.bad_rows.policy}
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.source.name}-{key}"

    def split_files(self) -> dict[str, Path]:
        """The source's JSONL files; a converted source is converted first unless its cache is complete."""
        if isinstance(self.source, JsonlSource):
            return self.source.files()
        folder = self.cache_folder()
        meta_path = folder / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta["skipped"]:
                print(f"{folder}: built with {meta['skipped']} bad rows skipped (data.bad_rows=skip)")
        else:
            print(f"converting {self.source.name} into {folder}")
            labels = self.source.convert(folder, self.bad_rows)
            meta = {"labels": labels, "skipped": len(self.bad_rows.skipped),
                    "rows": {s: _count_lines(folder / f"{s}.jsonl") for s in SPLITS}}
            write_jsonl(meta_path, [meta])
        self.fixed_labels = list(meta["labels"])
        return {split: folder / f"{split}.jsonl" for split in SPLITS}


def build_longdoc(section: dict[str, Any], seed: int) -> LongDocDataModule:
    """The data module of a config's ``data`` section (``source`` picks the source; each of the
    source and the module takes the keys its signature names)."""
    name = section.get("source")
    if name not in SOURCES:
        raise ValueError(f"data.source='{name}' is unknown; choose from: {', '.join(SOURCES)}")
    source_cls = SOURCES[name]
    accepted = set(inspect.signature(source_cls).parameters)
    source = source_cls(**{k: v for k, v in section.items() if k in accepted})
    accepted = set(inspect.signature(LongDocDataModule).parameters) - {"source"}
    return LongDocDataModule(source, seed=seed, **{k: v for k, v in section.items() if k in accepted})
