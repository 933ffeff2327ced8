"""The synthetic generator: labels follow the stated rule (recounted from the text here), and the
evidence is spread so that a 512-token prefix rarely decides a document while 4k tokens do."""

from __future__ import annotations

import bisect
import re

import pytest

from longctx.data.classify import wordpiece_tokenizer
from longctx.data.longdoc.synthetic import CUES, SECTIONS, SyntheticSpec, generate


def _mention_offsets(text: str, first: str, second: str) -> list[int]:
    """Character offsets of every mention of a label's two cue words (whole words, any case)."""
    return [m.start() for m in re.finditer(rf"\b(?:{first}|{second})\b", text, flags=re.IGNORECASE)]


def test_labels_follow_the_rule_recounted_from_the_text() -> None:
    spec = SyntheticSpec()
    docs = generate(30, spec, seed=1)
    present = absent = 0
    for doc in docs:
        assert all(f"{title}:" in doc.text for title in SECTIONS)
        assert spec.min_words <= len(doc.text.split()) <= spec.max_words + 40  # the last sentence may overrun
        for code, first, second in CUES[: spec.num_labels]:
            count = len(_mention_offsets(doc.text, first, second))
            assert (code in doc.labels) == (count >= spec.min_mentions), (code, count)
            assert count <= spec.max_decoys or spec.min_mentions <= count <= spec.max_mentions
            present, absent = present + (code in doc.labels), absent + (code not in doc.labels)
    assert present > 30 and absent > 100  # label_prob 0.3 over 240 (document, label) pairs


def test_cue_words_occur_only_as_cues_and_seeds_reproduce() -> None:
    silent = SyntheticSpec(num_labels=len(CUES), label_prob=0.0, max_decoys=0, min_words=400, max_words=500)
    for doc in generate(20, silent, seed=3):
        assert doc.labels == []
        assert all(not _mention_offsets(doc.text, a, b) for _, a, b in CUES)
    spec = SyntheticSpec(min_words=200, max_words=300)
    assert [d.text for d in generate(3, spec, seed=5)] == [d.text for d in generate(3, spec, seed=5)]
    assert generate(1, spec, seed=5)[0].text != generate(1, spec, seed=6)[0].text


def test_a_512_token_prefix_rarely_decides_a_document_and_4k_does() -> None:
    spec = SyntheticSpec()
    docs = generate(30, spec, seed=2)
    tokenizer = wordpiece_tokenizer(None, (d.text for d in docs), vocab_size=2000)
    decided = {512: 0, 2048: 0, 4096: 0}
    positives = {512: 0, 2048: 0, 4096: 0}
    total_positive = 0
    for doc in docs:
        encoding = tokenizer.encode(doc.text)
        starts = [start for start, _ in encoding.offsets]  # [CLS] and [SEP] are (0, 0)
        n_tokens = len(encoding.ids)
        for length in decided:
            settled = True
            for code, first, second in CUES[: spec.num_labels]:
                # Token index of each mention (the last token starting at or before its offset).
                seen = sum(bisect.bisect_right(starts, offset) - 1 < length - 1
                           for offset in _mention_offsets(doc.text, first, second))
                if code in doc.labels:
                    positives[length] += seen >= spec.min_mentions
                    total_positive += length == 512
                # A label is settled by a prefix once it holds min_mentions, or once the document ends.
                settled &= seen >= spec.min_mentions or n_tokens <= length
            decided[length] += settled
    assert decided[4096] / len(docs) >= 0.95 and decided[512] / len(docs) <= 0.05
    assert positives[512] / total_positive <= 0.05 < 0.95 <= positives[4096] / total_positive
    assert positives[512] < positives[2048] < positives[4096]


@pytest.mark.parametrize("kwargs, message", [
    ({"num_labels": 0}, "data.num_labels must be in 1..16"),
    ({"min_words": 500, "max_words": 100}, "min_words <= max_words"),
    ({"max_decoys": 10, "min_mentions": 10}, "max_decoys < min_mentions"),
    ({"label_prob": 1.5}, r"data.label_prob must be in \[0, 1\]"),
])
def test_bad_spec_is_a_one_line_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticSpec(**kwargs)
