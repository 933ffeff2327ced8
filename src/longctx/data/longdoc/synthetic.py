"""Synthetic MIMIC-style discharge summaries whose labels need the whole document.

Why: real clinical notes cannot ship, and a demo of long context needs a task where reading more
of the document measurably helps. Each document is a discharge summary made of section headings
(HISTORY OF PRESENT ILLNESS, MEDICATIONS ON ADMISSION, HOSPITAL COURSE, DISCHARGE DIAGNOSIS, ...)
and filler sentences drawn from clinical templates.

The rule: label k (an ICD-9-like code) has two cue words (a finding and a treatment); it is present
iff its cue words are mentioned at least ``min_mentions`` times in all. A present label gets
``min_mentions``..``max_mentions`` mentions, an absent one 0..``max_decoys`` (< min_mentions), each
mention one of the two words in its own sentence, inserted at a uniformly random sentence boundary
of the document, independently of the others. A prefix covering a fraction f of the document holds
about f of the mentions, so a truncated model sees counts that overlap between present and absent
labels (at f = 1/8: about 1.5 mentions against at most 0.5), while the whole document separates
them cleanly: truncation hurts and a longer context helps, as when a diagnosis is mentioned again
and again across a real discharge summary.

Cue words occur nowhere else: the filler vocabulary and the cue words are disjoint, and the cue
sentences use the same neutral frames for every cue ("Exam was notable for X.").
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longctx.data.classify import SPLITS, BadRows
from longctx.data.longdoc.jsonl import write_jsonl

# (label, first cue, second cue): a finding and a treatment per code.
CUES: tuple[tuple[str, str, str], ...] = (
    ("428.0", "cardiomegaly", "furosemide"),
    ("584.9", "oliguria", "hemodialysis"),
    ("518.81", "hypercapnia", "intubation"),
    ("038.9", "bacteremia", "vancomycin"),
    ("427.31", "palpitations", "amiodarone"),
    ("250.00", "polyuria", "glipizide"),
    ("486", "consolidation", "levofloxacin"),
    ("599.0", "pyuria", "ceftriaxone"),
    ("285.9", "pallor", "transfusion"),
    ("276.1", "confusion", "tolvaptan"),
    ("995.92", "lactate", "norepinephrine"),
    ("410.71", "troponin", "clopidogrel"),
    ("507.0", "aspiration", "piperacillin"),
    ("578.9", "melena", "pantoprazole"),
    ("434.91", "aphasia", "alteplase"),
    ("415.19", "tachypnea", "enoxaparin"),
)
MAX_LABELS = len(CUES)

SECTIONS = ("CHIEF COMPLAINT", "HISTORY OF PRESENT ILLNESS", "PAST MEDICAL HISTORY", "SOCIAL HISTORY",
            "MEDICATIONS ON ADMISSION", "PHYSICAL EXAM", "PERTINENT RESULTS", "HOSPITAL COURSE",
            "DISCHARGE MEDICATIONS", "DISCHARGE DIAGNOSIS", "DISCHARGE CONDITION", "DISCHARGE INSTRUCTIONS")

_CUE_FRAMES = ("Exam was notable for {}.", "The team documented {} on hospital day {}.",
               "Notes from the night team mention {}.", "Review of the chart shows {} as of day {}.")

_WORDS = {
    "sex": ("male", "female", "man", "woman"),
    "symptom": ("fatigue", "nausea", "dizziness", "cough", "fever", "chest pain", "shortness of breath",
                "abdominal pain", "weakness", "back pain", "chills", "vomiting"),
    "history": ("hypertension", "hyperlipidemia", "obesity", "osteoarthritis", "gout", "asthma",
                "depression", "hypothyroidism", "migraine", "anemia of chronic disease", "cataracts"),
    "drug": ("aspirin", "lisinopril", "atorvastatin", "metoprolol", "omeprazole", "simvastatin", "docusate",
             "senna", "acetaminophen", "levothyroxine", "sertraline", "gabapentin", "albuterol"),
    "organ": ("lungs", "heart", "abdomen", "extremities", "skin", "neck", "head"),
    "finding": ("clear to auscultation", "regular in rate and rhythm", "soft and nontender",
                "without edema", "warm and dry", "supple", "atraumatic"),
    "lab": ("sodium", "potassium", "chloride", "bicarbonate", "creatinine", "glucose", "hemoglobin",
            "platelets", "white count", "magnesium", "phosphate", "calcium"),
    "service": ("medicine", "cardiology", "surgery", "neurology", "the intensive care unit"),
    "plan": ("follow up with the primary care physician", "continue home medications",
             "return for worsening symptoms", "keep all scheduled appointments", "maintain a low salt diet",
             "walk daily as tolerated", "call the clinic with questions"),
    "social": ("lives with family", "lives alone", "is retired", "works as a teacher", "quit smoking",
               "drinks alcohol socially", "denies illicit drug use"),
}
_FILLER = (
    "The patient is a {age} year old {sex} with a history of {history} who presented with {symptom}.",
    "The patient reports {symptom} for {n} days prior to admission.",
    "Past history is significant for {history} and {history}.",
    "The patient {social} and {social}.",
    "On admission the patient was taking {drug} {n} mg daily and {drug} {n} mg twice daily.",
    "On exam the {organ} were {finding} and the {organ} were {finding}.",
    "Admission {lab} was {n} and {lab} was {n}.",
    "Repeat {lab} on day {n} was {n} and trended down.",
    "The patient was admitted to {service} for further management of {symptom}.",
    "{symptom} improved over the following {n} days with supportive care.",
    "Home {drug} was held on admission and restarted on day {n}.",
    "The patient was seen by {service} who recommended {plan}.",
    "Vital signs were stable with a heart rate of {n} and a blood pressure of {n} over {n}.",
    "The patient was discharged on {drug} and {drug}.",
    "Instructions were given to {plan} and to {plan}.",
    "Physical therapy evaluated the patient and recommended that the patient {plan}.",
)


@dataclass(frozen=True)
class SyntheticSpec:
    """What the generator makes.

    num_labels: labels 0..num_labels-1 of CUES (at most MAX_LABELS).
    min_words, max_words: document length in words, uniform between them (headings and cue
        sentences included).
    label_prob: probability that each label is present.
    min_mentions, max_mentions: mentions of a present label's cue words, uniform between them.
    max_decoys: mentions of an absent label's cue words are uniform in 0..max_decoys.
    """

    num_labels: int = 8
    min_words: int = 3200
    max_words: int = 3700
    label_prob: float = 0.3
    min_mentions: int = 10
    max_mentions: int = 14
    max_decoys: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.num_labels <= MAX_LABELS:
            raise ValueError(f"data.num_labels must be in 1..{MAX_LABELS}, got {self.num_labels}")
        if not 50 <= self.min_words <= self.max_words:
            raise ValueError(f"data.min_words/max_words need 50 <= min_words <= max_words, got "
                             f"{self.min_words}, {self.max_words}")
        if not 0.0 <= self.label_prob <= 1.0:
            raise ValueError(f"data.label_prob must be in [0, 1], got {self.label_prob}")
        if not 0 <= self.max_decoys < self.min_mentions <= self.max_mentions:
            raise ValueError(f"data.max_decoys/min_mentions/max_mentions need 0 <= max_decoys < "
                             f"min_mentions <= max_mentions, got {self.max_decoys}, {self.min_mentions}, "
                             f"{self.max_mentions}")

    @property
    def labels(self) -> list[str]:
        """The label codes, in label-index order."""
        return [code for code, _, _ in CUES[: self.num_labels]]


@dataclass
class SyntheticDocument:
    """One generated discharge summary and its present labels (codes, in label order)."""

    text: str
    labels: list[str]


def _fill(template: str, rng: random.Random) -> str:
    """A template with each {slot} drawn from its word list ({age}, {n}: numbers)."""
    parts = template.split("{")
    out = [parts[0]]
    for part in parts[1:]:
        slot, _, rest = part.partition("}")
        if slot == "age":
            value = str(rng.randint(25, 95))
        elif slot in ("n", ""):
            value = str(rng.randint(1, 160))
        else:
            value = rng.choice(_WORDS[slot])
        out.append(value + rest)
    sentence = "".join(out)
    return sentence[0].upper() + sentence[1:]


def generate_document(rng: random.Random, spec: SyntheticSpec) -> SyntheticDocument:
    """One document drawn with ``rng`` per the rule of the module docstring."""
    target = rng.randint(spec.min_words, spec.max_words)
    cues: list[str] = []
    labels: list[str] = []
    for code, first, second in CUES[: spec.num_labels]:
        if rng.random() < spec.label_prob:
            labels.append(code)
            mentions = rng.randint(spec.min_mentions, spec.max_mentions)
        else:
            mentions = rng.randint(0, spec.max_decoys)
        cues += [rng.choice((first, second)) for _ in range(mentions)]
    cue_sentences = [rng.choice(_CUE_FRAMES).format(cue, rng.randint(1, 30)) for cue in cues]
    words = sum(len(s.split()) for s in cue_sentences) + 3 * len(SECTIONS)
    body: list[str] = []
    while words < target:
        sentence = _fill(rng.choice(_FILLER), rng)
        body.append(sentence)
        words += len(sentence.split())
    for sentence in cue_sentences:  # each at a uniformly random sentence boundary, independently
        body.insert(rng.randint(0, len(body)), sentence)
    # Headings at evenly spaced sentence boundaries, so every section holds some text.
    step = len(body) / len(SECTIONS)
    chunks = [body[round(i * step): round((i + 1) * step)] for i in range(len(SECTIONS))]
    text = "\n\n".join(f"{title}:\n" + " ".join(chunk) for title, chunk in zip(SECTIONS, chunks))
    return SyntheticDocument(text, labels)


def generate(count: int, spec: SyntheticSpec, seed: int) -> list[SyntheticDocument]:
    """``count`` documents from ``random.Random(seed)`` (the same seed gives the same documents)."""
    rng = random.Random(seed)
    return [generate_document(rng, spec) for _ in range(count)]



class SyntheticSource:
    """Generated train/val/test documents (``num_train``, ``num_val``, ``num_test`` of them, from
    ``generator_seed``) under the :class:`SyntheticSpec` of the remaining arguments."""

    name = "synthetic"

    def __init__(self, num_train: int = 2000, num_val: int = 300, num_test: int = 300,
                 generator_seed: int = 0, num_labels: int = 8, min_words: int = 3200, max_words: int = 3700,
                 label_prob: float = 0.3, min_mentions: int = 10, max_mentions: int = 14,
                 max_decoys: int = 4) -> None:
        self.spec = SyntheticSpec(num_labels, min_words, max_words, label_prob, min_mentions, max_mentions,
                                  max_decoys)
        self.counts = {"train": num_train, "val": num_val, "test": num_test}
        bad = [s for s, n in self.counts.items() if n < 1]
        if bad:
            raise ValueError(f"data.num_{bad[0]} must be positive, got {self.counts[bad[0]]}")
        self.labels = self.spec.labels
        self.generator_seed = generator_seed

    def identity(self) -> dict[str, Any]:
        return {"spec": dataclasses.asdict(self.spec), "counts": self.counts, "seed": self.generator_seed}

    def convert(self, folder: Path, bad_rows: BadRows) -> list[str]:
        """Write {train,val,test}.jsonl ({text, labels}) into ``folder``; returns the label codes.
        Each split has its own seed, so its documents do not depend on the other splits' counts."""
        for index, split in enumerate(SPLITS):
            docs = generate(self.counts[split], self.spec, seed=self.generator_seed * len(SPLITS) + index)
            write_jsonl(folder / f"{split}.jsonl", ({"text": d.text, "labels": d.labels} for d in docs))
        return self.labels
