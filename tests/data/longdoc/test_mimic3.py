"""MIMIC-III conversion on tiny files in PhysioNet's layout: codes, cleaning, joins, splits, bad rows."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from longctx.data.classify import BadRows
from longctx.data.longdoc import LongDocDataModule
from longctx.data.longdoc.mimic3 import CLEANING, Mimic3Source, clean_text, format_icd9

FIXTURES = Path(__file__).parent / "fixtures" / "mimic3"


@pytest.mark.parametrize("raw, diagnosis, expected", [
    ("4280", True, "428.0"), ("5849", True, "584.9"), ("V1046", True, "V10.46"), ("E8790", True, "E879.0"),
    ("E849", True, "E849"), ("486", True, "486"), ("99592", True, "995.92"), ("42731", True, "427.31"),
    ("3961", False, "39.61"), ("3893", False, "38.93"), ("994", False, "99.4"), ("428.0", True, "428.0"),
])
def test_icd9_decimal_points_as_caml(raw: str, diagnosis: bool, expected: str) -> None:
    assert format_icd9(raw, diagnosis) == expected


def test_cleaning_steps() -> None:
    text = ("Admission Date:  [**2151-7-16**]\nEF 25%, Lasix 40mg; seen by [**Doctor Last Name 1234**] "
            "on day 3.")
    assert clean_text(text, CLEANING) == "admission date ef lasix 40mg seen by on day"
    assert clean_text(text, ["deid"]) == "Admission Date: EF 25%, Lasix 40mg; seen by on day 3."
    assert clean_text(text, []) == " ".join(text.split())
    with pytest.raises(ValueError, match="data.clean: unknown step 'stem'; choose from: deid"):
        clean_text(text, ["stem"])


def _convert(tmp_path: Path, root: Path = FIXTURES, bad_rows: str = "error",
             **kwargs) -> tuple[dict, list, BadRows]:
    source = Mimic3Source(root, **kwargs)
    policy = BadRows(bad_rows)
    labels = source.convert(tmp_path / "out", policy)
    rows = {s: [json.loads(line) for line in (tmp_path / "out" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "val", "test")}
    return rows, labels, policy


def test_caml_splits_join_discharge_summaries_and_codes(tmp_path: Path) -> None:
    rows, labels, _ = _convert(tmp_path, split_dir=FIXTURES / "splits", clean=[])
    # Hand-counted over admissions with a discharge summary: 428.0 x3 (167853, 167118, 134727), 38.93 x2,
    # 584.9 x2 (167853, 170490); every other code once. 159647 has no discharge summary (an Echo note).
    assert labels[:3] == ["428.0", "38.93", "584.9"] and len(labels) == 11
    assert [r["hadm_id"] for r in rows["train"]] == [167853, 135453, 170490]
    assert [r["hadm_id"] for r in rows["val"]] == [107527]
    assert [r["hadm_id"] for r in rows["test"]] == [167118, 134727]
    first = rows["train"][0]
    assert first["labels"] == ["428.0", "584.9", "V10.46", "39.61"]  # diagnoses, then procedures
    assert first["text"].startswith("Admission Date: [**2151-7-16**]") and first["text"].endswith(
        "Addendum: creatinine 2.1, seen by [**Doctor Last Name 1234**] renal.")  # report + addendum, in order
    assert rows["train"][1]["labels"] == ["486"]  # the empty ICD9_CODE row is ignored, the nursing note too
    # The ISERROR=1 note of 170490 is left out.
    assert rows["train"][2]["text"] == "Acute kidney injury on CKD; hemodialysis started."
    assert rows["val"][0]["labels"] == ["038.9", "995.92", "E879.0", "38.93"]


def _patient_side(subject: str, seed: int) -> str:
    """The documented split rule, re-implemented: u = first 8 bytes of sha256("seed:subject") / 2^64;
    test below 0.3, val below 0.6, else train."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{subject}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < 0.3 else "val" if u < 0.6 else "train"


def test_top_k_and_patient_split_without_split_files(tmp_path: Path) -> None:
    patients = {167853: "22532", 107527: "13702", 167118: "13702", 134727: "20646"}
    seed = next(s for s in range(100)
                if {_patient_side(p, s) for p in patients.values()} == {"train", "val", "test"})
    rows, labels, _ = _convert(tmp_path, top_k=2, val_fraction=0.3, test_fraction=0.3, split_seed=seed)
    assert labels == ["428.0", "38.93"]
    kept = {r["hadm_id"]: r for split in rows.values() for r in split}
    # Admissions with one of the two codes: 167853, 107527, 167118, 134727 (not 135453 nor 170490).
    assert sorted(kept) == sorted(patients)
    assert kept[107527]["labels"] == ["38.93"] and kept[134727]["labels"] == ["428.0", "38.93"]
    side = {r["hadm_id"]: s for s, split in rows.items() for r in split}
    assert side == {hadm: _patient_side(subject, seed) for hadm, subject in patients.items()}
    assert kept[167853]["text"] == (
        "admission date discharge date service cardiology history of present illness the patient is a year "
        "old man with congestive heart failure ef started on lasix mg addendum creatinine seen by renal")


def test_gzipped_inputs(tmp_path: Path) -> None:
    root = tmp_path / "gz"
    root.mkdir()
    for name in ("NOTEEVENTS.csv", "DIAGNOSES_ICD.csv", "PROCEDURES_ICD.csv"):
        with gzip.open(root / f"{name}.gz", "wb") as f:
            f.write((FIXTURES / name).read_bytes())
    plain, _, _ = _convert(tmp_path / "a", split_dir=FIXTURES / "splits")
    zipped, _, _ = _convert(tmp_path / "b", root=root, split_dir=FIXTURES / "splits")
    assert zipped == plain


def _broken_copy(tmp_path: Path, name: str, old: str, new: str) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(FIXTURES, root)
    text = (root / name).read_text()
    assert old in text
    (root / name).write_text(text.replace(old, new, 1))
    return root


@pytest.mark.parametrize("name, old, new, message", [
    # A stray quote inside a quoted field breaks the record that starts on line 9.
    ("NOTEEVENTS.csv", '"Addendum: creatinine', '"Addendum: "creatinine',
     r"NOTEEVENTS\.csv:9: broken CSV record"),
    ("NOTEEVENTS.csv", '"Report",,,"Pneumonia, treated with levofloxacin 750mg x 7 days."', '"Report",,,""',
     r"NOTEEVENTS\.csv:14: discharge summary with empty TEXT"),
    ("NOTEEVENTS.csv", "178,26880,135453,", "178,26880,,",
     r"NOTEEVENTS\.csv:14: discharge summary without HADM_ID"),
    ("DIAGNOSES_ICD.csv", "8,26880,135453,1", "8,26880,135453",
     r"DIAGNOSES_ICD\.csv:9: 4 fields where the header"),
    ("PROCEDURES_ICD.csv", "2,13702,107527,1", "2,13702,1O7527,1",
     r"PROCEDURES_ICD\.csv:3: HADM_ID '1O7527'"),
])
def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path: Path, name: str, old: str, new: str,
                                                   message: str) -> None:
    root = _broken_copy(tmp_path, name, old, new)
    with pytest.raises(ValueError, match=message):
        _convert(tmp_path / "error", root=root)
    rows, _, policy = _convert(tmp_path / "skip", root=root, bad_rows="skip", split_dir=root / "splits")
    # The first skip is this row (a later one may follow from it: its admission then has no notes).
    assert policy.skipped and policy.skipped[0].startswith(f"{root / name}:")
    assert sum(len(r) for r in rows.values()) >= 5  # the other admissions are still there


def test_split_file_admission_without_notes_and_missing_columns(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIXTURES, root)
    (root / "splits" / "dev_50_hadm_ids.csv").write_text("107527\n159647\n")
    with pytest.raises(ValueError, match=r"dev_50_hadm_ids\.csv:2: HADM_ID 159647 has no discharge summary"):
        _convert(tmp_path / "a", root=root, split_dir=root / "splits")
    (root / "DIAGNOSES_ICD.csv").write_text('"ROW_ID","SUBJECT_ID","HADM_ID","SEQ_NUM"\n1,2,3,4\n')
    with pytest.raises(ValueError, match=r"DIAGNOSES_ICD\.csv:1: header has no column ICD9_CODE"):
        _convert(tmp_path / "b", root=root)
    with pytest.raises(ValueError, match="data.root: no NOTEEVENTS.csv or NOTEEVENTS.csv.gz"):
        Mimic3Source(tmp_path)


def test_cache_is_reused_until_an_input_changes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIXTURES, root)

    def module() -> LongDocDataModule:
        source = Mimic3Source(root, split_dir=root / "splits")
        return LongDocDataModule(source, seqlen=64, batch_size=2, vocab_size=200,
                                 cache_dir=tmp_path / "cache")

    first = module()
    first.setup()
    folder = first.cache_folder()
    assert first.labels[0] == "428.0" and first.num_labels == 11 and first.multi_label
    stamp = (folder / "train.jsonl").stat().st_mtime_ns
    second = module()
    second.setup()
    assert second.cache_folder() == folder and (folder / "train.jsonl").stat().st_mtime_ns == stamp
    notes = root / "NOTEEVENTS.csv"
    notes.write_text(notes.read_text().replace("metoprolol", "carvedilol"))
    assert module().cache_folder() != folder
    batch = next(iter(first.val_dataloader()))
    expected = [1.0 if code in ("038.9", "995.92", "E879.0", "38.93") else 0.0 for code in first.labels]
    assert batch["labels"][0].tolist() == expected
