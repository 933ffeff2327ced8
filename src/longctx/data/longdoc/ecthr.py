"""ECtHR (Chalkidis et al. 2019/2021) in the LexGLUE format: ``ecthr_a`` (articles found violated)
and ``ecthr_b`` (articles allegedly violated), multi-label over the same 10 ECHR articles.

Each record has ``text``, the case's facts as a list of paragraphs (joined here with newlines; a
plain string is taken as it is), and ``labels``, a list of articles: integers index
:data:`ARTICLES` (the hub's class ids), strings name an article ("6", "P1-1"). Records come from
local ``.jsonl`` or ``.parquet`` files (``paths: {train, val, test}``, or a ``root`` folder holding
files named train*, validation*/dev*/val* and test*), or from the hub (``hub: true``, online:
``coastalcph/lex_glue``, config ``subset``).

Bad records — broken JSON, no text or an empty one, a label that is not one of the articles —
raise a ValueError naming ``file:line`` (``file:row N`` for parquet), or are skipped and counted
with ``bad_rows: skip``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from longctx.data.classify import SPLITS, BadRows, PathLike
from longctx.data.lm import _file_identity
from longctx.data.longdoc.jsonl import write_jsonl

ARTICLES = ("2", "3", "5", "6", "8", "9", "10", "11", "14", "P1-1")
SUBSETS = ("ecthr_a", "ecthr_b")
HUB_DATASET = "coastalcph/lex_glue"
_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "dev", "val"), "test": ("test",)}
_SUFFIXES = (".jsonl", ".parquet")


def _find_split(folder: Path, split: str) -> Path:
    """The one .jsonl/.parquet file of ``split`` in ``folder`` (by file-name prefix)."""
    found = sorted(p for p in folder.iterdir() if p.suffix in _SUFFIXES
                   and p.name.lower().startswith(_SPLIT_NAMES[split]))
    if len(found) != 1:
        names = "/".join(_SPLIT_NAMES[split])
        raise ValueError(f"data.root: expected one {names}*.jsonl or .parquet file in {folder}, found "
                         f"{len(found)}; or give data.paths={{train: ..., val: ..., test: ...}}")
    return found[0]


def _records(path: Path, bad: Callable[[str], None]) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a .jsonl (where = path:line) or .parquet (path:row N) file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}:row {number}", row
        return
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                bad(f"{path}:{number}: broken JSON ({err.msg})")


def convert_record(row: Any, where: str) -> dict[str, Any]:
    """A LexGLUE ECtHR record -> ``{"text": joined paragraphs, "labels": [article, ...]}``;
    ValueError naming ``where`` for a bad one."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with text and labels")
    text = row.get("text")
    if isinstance(text, list) and all(isinstance(p, str) for p in text):
        text = "\n".join(p.strip() for p in text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: missing or empty 'text' (a list of paragraphs)")
    labels = row.get("labels")
    if not isinstance(labels, list):
        raise ValueError(f"{where}: 'labels' must be a list of articles")
    articles = []
    for label in labels:
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(ARTICLES):
            articles.append(ARTICLES[label])
        elif isinstance(label, str) and label in ARTICLES:
            articles.append(label)
        else:
            raise ValueError(f"{where}: label {label!r} is not an article: class ids 0..{len(ARTICLES) - 1} "
                             f"or one of {', '.join(ARTICLES)}")
    return {"text": text, "labels": articles}


class EcthrSource:
    """ECtHR (LexGLUE) from local files or the hub; see the module docstring.

    Args:
        paths: ``{train, val, test}`` .jsonl / .parquet files.
        root: a folder holding them (used when paths is None).
        subset: ecthr_a or ecthr_b (names the hub config; local files carry their own labels).
        hub: read ``coastalcph/lex_glue`` with ``datasets`` instead (needs the network once).
    """

    name = "ecthr"
    labels = list(ARTICLES)

    def __init__(self, paths: Mapping[str, PathLike] | None = None, root: PathLike | None = None,
                 subset: str = "ecthr_a", hub: bool = False) -> None:
        if subset not in SUBSETS:
            raise ValueError(f"data.subset='{subset}' is unknown; choose from: {', '.join(SUBSETS)}")
        self.subset, self.hub = subset, hub
        self.files: dict[str, Path] = {}
        if hub:
            return
        if paths:
            missing = [s for s in SPLITS if not paths.get(s)]
            if missing:
                raise ValueError(f"data.paths has no {', '.join(missing)} file; "
                                 "give data.paths={train: ..., val: ..., test: ...}")
            self.files = {s: Path(paths[s]) for s in SPLITS}
        elif root is not None:
            if not Path(root).is_dir():
                raise ValueError(f"data.root: no such folder: {root}")
            self.files = {s: _find_split(Path(root), s) for s in SPLITS}
        else:
            raise ValueError("ECtHR needs data.paths={train, val, test} (.jsonl/.parquet), data.root=FOLDER, "
                             "or data.hub=true (online)")
        for split, path in self.files.items():
            if not path.is_file() or path.suffix not in _SUFFIXES:
                raise ValueError(f"data.paths.{split}: expected an existing .jsonl or .parquet file, "
                                 f"got {path}")

    def identity(self) -> dict[str, Any]:
        if self.hub:
            return {"hub": HUB_DATASET, "subset": self.subset}
        return {"files": {s: _file_identity(p) for s, p in self.files.items()}}

    def _split_records(self, split: str, bad: Callable[[str], None]) -> Iterator[tuple[str, Any]]:
        if not self.hub:
            yield from _records(self.files[split], bad)
            return
        import datasets

        name = {"train": "train", "val": "validation", "test": "test"}[split]
        try:
            dataset = datasets.load_dataset(HUB_DATASET, self.subset, split=name)
        except Exception as err:  # offline, or the hub refused: one line with the fix
            raise ValueError(f"could not load {HUB_DATASET}/{self.subset} from the hub "
                             f"({type(err).__name__}); offline, download it once elsewhere and pass "
                             "data.root or data.paths") from None
        for number, row in enumerate(dataset, start=1):
            yield f"{HUB_DATASET}/{self.subset}/{name}:row {number}", row

    def convert(self, folder: Path, bad_rows: BadRows) -> list[str]:
        """Write {train,val,test}.jsonl ({text, labels}) into ``folder``; returns the 10 articles."""

        def rows(split: str) -> Iterator[dict[str, Any]]:
            for where, record in self._split_records(split, bad_rows):
                try:
                    yield convert_record(record, where)
                except ValueError as err:
                    bad_rows(str(err))

        for split in SPLITS:
            write_jsonl(folder / f"{split}.jsonl", rows(split))
        return list(ARTICLES)
