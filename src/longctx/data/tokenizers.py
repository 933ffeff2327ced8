"""GPT-2's byte-level BPE tokenizer, built with `tokenizers` from the original vocabulary files.

No hub download is needed: the vocabulary (encoder.json) and merges (vocab.bpe) resolve offline
through :func:`longctx.data.assets.gpt2_bpe_files`.
"""

from __future__ import annotations

import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from longctx.data.assets import gpt2_bpe_files

EOT = "<|endoftext|>"
"""GPT-2's end-of-text token (id 50256); separates documents in packed LM data."""


def gpt2_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """GPT-2's tokenizer: byte-level BPE over GPT-2's pre-tokenizer regex, 50257 ids.

    ``path``: folder with encoder.json + vocab.bpe (or vocab.json + merges.txt); None resolves
    them offline (see longctx.data.assets). The pre-tokenizer splits with GPT-2's regex
    (contractions, letter runs, digit runs, punctuation runs, whitespace) and no prefix space, so
    ids match OpenAI's encoder; every byte has a token, so any unicode text round-trips through
    ``decode(encode(text).ids, skip_special_tokens=False)``. ``<|endoftext|>`` is a special token:
    the literal string in text encodes to 50256.
    """
    vocab, merges = gpt2_bpe_files(path)
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tokenizer
