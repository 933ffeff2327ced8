"""MIMIC-III ICD-9 coding from the user's PhysioNet files, as set up by CAML (Mullenbach et al. 2018).

Inputs (``root``: the MIMIC-III folder; each file may also be gzipped, ``NAME.csv.gz``):
- ``NOTEEVENTS.csv``: ROW_ID, SUBJECT_ID, HADM_ID, CHARTDATE, CHARTTIME, STORETIME, CATEGORY,
  DESCRIPTION, CGID, ISERROR, TEXT (TEXT a quoted, multi-line field);
- ``DIAGNOSES_ICD.csv``, ``PROCEDURES_ICD.csv``: ROW_ID, SUBJECT_ID, HADM_ID, SEQ_NUM, ICD9_CODE;
- optional ``split_dir`` with CAML's ``train_50_hadm_ids.csv``, ``dev_50_hadm_ids.csv`` and
  ``test_50_hadm_ids.csv`` (one HADM_ID per line; ``*_full_hadm_ids.csv`` with ``top_k: null``).

What is built: the discharge summaries (CATEGORY "Discharge summary", notes marked ISERROR=1 left
out) of each admission, joined in ROW_ID order; its ICD-9 diagnosis and procedure codes with the
decimal point restored (:func:`format_icd9`); the label set = the ``top_k`` most frequent codes
over admissions that have a discharge summary (ties by code; null keeps every code). Without
split files, admissions with none of those codes are dropped (CAML's "50" setting) and the rest are
split by patient, a seeded hash of SUBJECT_ID sending about ``val_fraction`` / ``test_fraction``
of patients to val / test. Rows with an empty ICD9_CODE are ignored (MIMIC-III has a few).

Bad rows — a broken CSV record, a wrong number of fields, a discharge summary without text or
HADM_ID, a non-numeric HADM_ID, a split-file admission without a discharge summary — raise a
ValueError naming ``file:line`` (the record's first line), or are skipped and counted with
``bad_rows: skip``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from longctx.data.classify import SPLITS, BadRows, PathLike
from longctx.data.lm import _file_identity
from longctx.data.longdoc.jsonl import write_jsonl

CLEANING = ("deid", "punctuation", "numbers", "lowercase")
_DEID = re.compile(r"\[\*\*.*?\*\*\]", re.DOTALL)
_WORD = re.compile(r"\w+")
_SPLIT_FILES = {"train": "train_{}_hadm_ids.csv", "val": "dev_{}_hadm_ids.csv",
                "test": "test_{}_hadm_ids.csv"}
_NOTE_COLUMNS = ("SUBJECT_ID", "HADM_ID", "CATEGORY", "ISERROR", "TEXT")
_CODE_COLUMNS = ("HADM_ID", "ICD9_CODE")


def format_icd9(code: str, diagnosis: bool) -> str:
    """MIMIC stores ICD-9 codes without their decimal point; put it back as CAML does.

    Diagnoses: after the 3rd character, or the 4th for E codes (E8190 -> E819.0, 4280 -> 428.0,
    V1046 -> V10.46); procedures: after the 2nd (3961 -> 39.61). Codes no longer than the prefix
    stay as they are (486, E849)."""
    code = code.strip().replace(".", "")
    cut = (4 if code.startswith("E") else 3) if diagnosis else 2
    return code[:cut] + "." + code[cut:] if len(code) > cut else code


def clean_text(text: str, steps: Sequence[str]) -> str:
    """The usual MIMIC preprocessing, each step optional (``CLEANING``): ``deid`` removes the
    de-identification brackets [** ... **]; ``punctuation`` keeps only word tokens (\\w+);
    ``numbers`` drops tokens made only of digits; ``lowercase``. Whitespace always collapses to
    single spaces."""
    unknown = [s for s in steps if s not in CLEANING]
    if unknown:
        raise ValueError(f"data.clean: unknown step '{unknown[0]}'; choose from: {', '.join(CLEANING)}")
    if "deid" in steps:
        text = _DEID.sub(" ", text)
    tokens = _WORD.findall(text) if "punctuation" in steps else text.split()
    if "numbers" in steps:
        tokens = [t for t in tokens if not t.isdigit()]
    text = " ".join(tokens)
    return text.lower() if "lowercase" in steps else text


def _find(folder: Path, name: str) -> Path:
    """folder/name, or its gzipped twin; ValueError naming both when neither exists."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"data.root: no {name} or {name}.gz in {folder}")


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def read_csv(path: Path, columns: Sequence[str], bad: Callable[[str], None],
             progress: bool = False) -> Iterator[tuple[int, dict[str, str]]]:
    """(first line of the record, {column: value}) for each record of a CSV file with a header.

    Quoted fields may span lines (NOTEEVENTS' TEXT). A header lacking one of ``columns`` is always
    an error; a record the csv module cannot parse or with the wrong number of fields goes to
    ``bad`` with its ``path:line``. ``progress``: a tqdm bar over the characters read (against the
    file size, for an uncompressed file).
    """
    total = None if path.suffix == ".gz" else path.stat().st_size
    with _open(path) as f, tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr,
                                desc=f"reading {path.name}", disable=not progress) as bar:

        def lines() -> Iterator[str]:
            for line in f:
                bar.update(len(line))
                yield line

        reader = csv.reader(lines(), strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty file, expected a header with {', '.join(columns)}") from None
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}:1: header has no column {missing[0]} (needs {', '.join(columns)})")
        start = reader.line_num + 1
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                bad(f"{path}:{start}: broken CSV record ({err})")
                start = reader.line_num + 1
                continue
            if record and len(record) != len(header):
                bad(f"{path}:{start}: {len(record)} fields where the header has {len(header)}")
            elif record:
                yield start, dict(zip(header, record))
            start = reader.line_num + 1


def _hadm(value: str, where: str, bad: Callable[[str], None]) -> int | None:
    """An integer HADM_ID, or None after reporting the row as bad."""
    try:
        return int(float(value))
    except ValueError:
        bad(f"{where}: HADM_ID {value!r} is not a number")
        return None


class Mimic3Source:
    """MIMIC-III discharge summaries and their ICD-9 codes (see the module docstring).

    Args:
        root: the folder with NOTEEVENTS, DIAGNOSES_ICD and PROCEDURES_ICD (.csv or .csv.gz).
        split_dir: a folder with CAML's {train,dev,test}_{50|full}_hadm_ids.csv, or None.
        top_k: size of the label set (most frequent codes); None keeps every code.
        clean: the :func:`clean_text` steps applied to the text.
        val_fraction, test_fraction, split_seed: the patient split used without split files.
    """

    name = "mimic3"
    labels = None  # the label set comes out of conversion

    def __init__(self, root: PathLike | None = None, split_dir: PathLike | None = None,
                 top_k: int | None = 50, clean: Sequence[str] = CLEANING, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, split_seed: int = 0) -> None:
        if root is None:
            raise ValueError("data.root is required: the folder with NOTEEVENTS.csv, DIAGNOSES_ICD.csv "
                             "and PROCEDURES_ICD.csv (or their .csv.gz)")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data.root: no such folder: {root}")
        self.files = {"notes": _find(self.root, "NOTEEVENTS.csv"),
                      "diagnoses": _find(self.root, "DIAGNOSES_ICD.csv"),
                      "procedures": _find(self.root, "PROCEDURES_ICD.csv")}
        if top_k is not None and top_k < 1:
            raise ValueError(f"data.top_k must be positive or null (every code), got {top_k}")
        if split_dir is not None:
            setting = "50" if top_k == 50 else "full"
            folder = Path(split_dir)
            for split, pattern in _SPLIT_FILES.items():
                path = folder / pattern.format(setting)
                if not path.is_file():
                    raise ValueError(f"data.split_dir: no {path.name} in {folder}")
                self.files[f"split_{split}"] = path
        clean_text("", clean)  # an unknown step fails here, before any reading
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} "
                             "must be in [0, 1) with a sum below 1")
        self.split_dir, self.top_k, self.clean = split_dir, top_k, list(clean)
        self.fractions, self.split_seed = (val_fraction, test_fraction), split_seed

    def identity(self) -> dict[str, Any]:
        """What the cache depends on: every input file (path, size, mtime) and every option."""
        return {"files": {k: _file_identity(p) for k, p in sorted(self.files.items())}, "top_k": self.top_k,
                "clean": self.clean, "fractions": list(self.fractions), "split_seed": self.split_seed}

    def _notes(self, bad: Callable[[str], None]) -> tuple[dict[int, list[str]], dict[int, str]]:
        """Discharge summaries per HADM_ID (in file order, i.e. ROW_ID order) and each admission's
        SUBJECT_ID."""
        texts: dict[int, list[str]] = defaultdict(list)
        subjects: dict[int, str] = {}
        path = self.files["notes"]
        for line, row in read_csv(path, _NOTE_COLUMNS, bad, progress=True):
            if row["CATEGORY"].strip() != "Discharge summary" or row["ISERROR"].strip() == "1":
                continue
            where = f"{path}:{line}"
            if not row["HADM_ID"].strip():
                bad(f"{where}: discharge summary without HADM_ID")
                continue
            if not row["TEXT"].strip():
                bad(f"{where}: discharge summary with empty TEXT")
                continue
            hadm = _hadm(row["HADM_ID"], where, bad)
            if hadm is not None:
                texts[hadm].append(row["TEXT"])
                subjects[hadm] = row["SUBJECT_ID"]
        return texts, subjects

    def _codes(self, bad: Callable[[str], None]) -> dict[int, list[str]]:
        """ICD-9 codes per HADM_ID, diagnoses then procedures, decimal points restored, no repeats."""
        codes: dict[int, list[str]] = defaultdict(list)
        for key, diagnosis in (("diagnoses", True), ("procedures", False)):
            path = self.files[key]
            for line, row in read_csv(path, _CODE_COLUMNS, bad):
                if not row["ICD9_CODE"].strip():
                    continue
                hadm = _hadm(row["HADM_ID"], f"{path}:{line}", bad)
                code = format_icd9(row["ICD9_CODE"], diagnosis)
                if hadm is not None and code not in codes[hadm]:
                    codes[hadm].append(code)
        return codes

    def _split_of(self, subject: str) -> str:
        """val / test / train for a patient, from a seeded hash (stable under any row order)."""
        digest = hashlib.sha256(f"{self.split_seed}:{subject}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        val, test = self.fractions
        return "test" if u < test else "val" if u < test + val else "train"

    def _split_ids(self, texts: dict[int, list[str]], bad: Callable[[str], None]) -> dict[str, list[int]]:
        """HADM_IDs of each split as listed in CAML's split files (those without notes are bad rows)."""
        out = {}
        for split in SPLITS:
            path, ids = self.files[f"split_{split}"], []
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    value = line.strip().split(",")[0]
                    if not value or (number == 1 and value.upper() == "HADM_ID"):
                        continue
                    hadm = _hadm(value, f"{path}:{number}", bad)
                    if hadm is None:
                        continue
                    if hadm not in texts:
                        bad(f"{path}:{number}: HADM_ID {hadm} has no discharge summary in NOTEEVENTS")
                        continue
                    ids.append(hadm)
            out[split] = ids
        return out

    def convert(self, folder: Path, bad_rows: BadRows) -> list[str]:
        """Write {train,val,test}.jsonl ({text, labels, hadm_id} per admission) into ``folder``;
        returns the label set (most frequent first)."""
        texts, subjects = self._notes(bad_rows)
        codes = self._codes(bad_rows)
        frequency = Counter(code for hadm in texts for code in codes.get(hadm, ()))
        ranked = sorted(frequency, key=lambda code: (-frequency[code], code))
        labels = ranked if self.top_k is None else ranked[: self.top_k]
        keep = set(labels)
        if "split_train" in self.files:
            ids = self._split_ids(texts, bad_rows)
        else:
            ids = {split: [] for split in SPLITS}
            for hadm in sorted(texts):
                if any(code in keep for code in codes.get(hadm, ())):
                    ids[self._split_of(subjects[hadm])].append(hadm)
        for split in SPLITS:
            rows = ({"text": clean_text("\n\n".join(texts[hadm]), self.clean),
                     "labels": [code for code in codes.get(hadm, ()) if code in keep], "hadm_id": hadm}
                    for hadm in ids[split])
            if not write_jsonl(folder / f"{split}.jsonl", tqdm(rows, total=len(ids[split]), file=sys.stderr,
                                                               desc=f"writing {split}.jsonl")):
                raise ValueError(f"MIMIC-III: the {split} split has no admissions")
        return labels
