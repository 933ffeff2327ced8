"""ListOps (Nangia & Bowman 2018) as generated for the Long Range Arena (Tay et al. 2020).

An example is a nested expression over the digits 0-9 with the operators MIN, MAX, MED (median,
rounded down for an even count, as LRA's ``int(np.median)``) and SM (sum modulo 10); the label is
its value (10 classes). LRA's recipe, followed here:

- a node at depth d < max_depth (the root has depth 1) is an operator with probability 0.25, else
  a uniformly drawn digit; at depth max_depth it is always a digit. An operator takes a uniform
  2..max_args arguments and a uniformly drawn operator;
- trees are drawn until ``min_length < length < max_length`` tokens (defaults 500 and 2000),
  duplicates are dropped, and the pool is cut into train/val/test (96k/2k/2k by default).

Tokens: ``[MIN [MAX [MED [SM`` open an operator, ``]`` closes it, ``0``-``9`` are values, e.g.
``[MAX 2 9 [MIN 4 7 ] 0 ]`` -> 9. LRA's TSV files also hold parentheses around every binary
sub-tree, which carry no information and which its length count ignores, so they are not
emitted. (LRA's first tfds tokenizer dropped every non-alphanumeric character, ``]`` included, which
makes the nesting ambiguous; its input pipeline later (commit c209b2a) mapped ``]`` to ``X`` and dropped
the parentheses, which is the encoding used here.)

The distribution matches LRA's script (checked against a re-implementation on 20k examples: labels,
lengths, depth and arity agree within sampling noise). Note that the root operator alone predicts
the label about 36% of the time (MIN -> 0, MAX -> 9, MED -> 4, SM -> 6), about the published
Transformer accuracies; on a 2000-example test split that rule varies by about +-1 point.

Generation is seeded (``gen_seed``) and independent of the number of processes: examples are
made in fixed chunks, chunk c from its own RNG seeded by (gen_seed, c), and kept in chunk order.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from longctx.data.assets import log
from longctx.data.lra.common import (
    SPLITS,
    PathLike,
    TokenClassifyDataModule,
    cache_file,
    default_num_proc,
    load_npz,
    ordered_map,
    save_npz,
)

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
VOCAB = ("<pad>", *OPERATORS, CLOSE, *(str(v) for v in range(10)))
"""Token strings by id; id 0 pads."""
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD_ID = 0
OPERATOR_P = 0.25  # LRA's VALUE_P: a node above max_depth is an operator with this probability
CHUNK = 256  # examples per generation chunk (the unit of seeding and of multiprocessing)
FORMAT = 1  # bump when the generator or the cache layout changes
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
"""The splits each Lightning stage reads (fit validates too, and train.py validates after it)."""

_OP_IDS = tuple(TOKEN_ID[op] for op in OPERATORS)
_VALUE_IDS = tuple(TOKEN_ID[str(v)] for v in range(10))
_CLOSE_ID = TOKEN_ID[CLOSE]


def apply_operator(op: str, args: list[int]) -> int:
    """The value of ``op`` (one of OPERATORS) on its argument values."""
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[SM":
        return sum(args) % 10
    if op == "[MED":
        ordered, n = sorted(args), len(args)
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) // 2
    raise ValueError(f"unknown ListOps operator {op!r}; choose from: {', '.join(OPERATORS)}")


class _TooLong(Exception):
    """The tree being drawn already has max_length tokens: it will be rejected."""


def _draw(rng: random.Random, depth: int, max_depth: int, max_args: int, max_length: int,
          out: list[int]) -> int:
    """Append the tokens of a random sub-tree at ``depth`` to ``out`` and return its value."""
    if len(out) >= max_length:
        raise _TooLong
    if depth >= max_depth or rng.random() > OPERATOR_P:
        value = rng.randrange(10)
        out.append(_VALUE_IDS[value])
        return value
    op = rng.randrange(len(OPERATORS))
    out.append(_OP_IDS[op])
    arity = rng.randint(2, max_args)
    args = [_draw(rng, depth + 1, max_depth, max_args, max_length, out) for _ in range(arity)]
    out.append(_CLOSE_ID)
    return apply_operator(OPERATORS[op], args)


def generate_chunk(chunk: int, gen_seed: int, count: int, max_depth: int, max_args: int, min_length: int,
                   max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` accepted examples from chunk ``chunk``'s own RNG.

    Returns (tokens uint8 (total,), lengths int64 (count,), labels uint8 (count,)): example i is
    the i-th run of ``lengths[i]`` tokens of ``tokens``.
    """
    rng = random.Random(int(np.random.SeedSequence([gen_seed, chunk]).generate_state(1, np.uint64)[0]))
    tokens: list[int] = []
    lengths, labels = [], []
    while len(labels) < count:
        out: list[int] = []
        try:
            value = _draw(rng, 1, max_depth, max_args, max_length, out)
        except _TooLong:
            continue
        if min_length < len(out) < max_length:
            tokens.extend(out)
            lengths.append(len(out))
            labels.append(value)
    return (np.asarray(tokens, dtype=np.uint8), np.asarray(lengths, dtype=np.int64),
            np.asarray(labels, dtype=np.uint8))


def _chunk_task(args: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return generate_chunk(*args)


def generate(sizes: dict[str, int], gen_seed: int = 0, max_depth: int = 10, max_args: int = 10,
             min_length: int = 500, max_length: int = 2000, num_proc: int | None = None,
             progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Distinct ListOps examples dealt to the splits in ``sizes`` ({split: count}, in that order).

    Returns ``{split: {"tokens": uint8 (total,), "offsets": int64 (n + 1,), "labels": uint8 (n,)}}``
    (example i is ``tokens[offsets[i]:offsets[i + 1]]``). ``num_proc`` processes (default: the
    CPU count, at most 16) draw the chunks; the result does not depend on it.
    """
    if max_depth < 2 or max_args < 2:
        raise ValueError(f"ListOps needs max_depth >= 2 and max_args >= 2, got {max_depth} and {max_args}")
    if not 0 <= min_length < max_length - 1:
        raise ValueError(f"ListOps lengths: need 0 <= min_length < max_length - 1, got min_length="
                         f"{min_length}, max_length={max_length}")
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"ListOps split sizes must be >= 0, got {sizes}")
    total = sum(sizes.values())
    num_proc = default_num_proc(num_proc, math.ceil(total / CHUNK))
    params = (gen_seed, CHUNK, max_depth, max_args, min_length, max_length)
    seen: set[bytes] = set()
    kept_tokens: list[np.ndarray] = []
    kept_lengths: list[int] = []
    kept_labels: list[int] = []

    next_chunk = 0
    with tqdm(total=total, desc="generating ListOps", unit="ex", disable=not progress) as bar:
        while len(kept_labels) < total:  # a second round only if duplicates left a shortfall
            count = math.ceil((total - len(kept_labels)) / CHUNK)
            tasks = [(c, *params) for c in range(next_chunk, next_chunk + count)]
            next_chunk += count
            for tokens, lengths, labels in ordered_map(_chunk_task, tasks, num_proc):
                starts = np.concatenate([[0], np.cumsum(lengths)])
                for i, label in enumerate(labels):
                    example = tokens[starts[i]:starts[i + 1]]
                    if len(kept_labels) == total or example.tobytes() in seen:
                        continue
                    seen.add(example.tobytes())
                    kept_tokens.append(example)
                    kept_lengths.append(len(example))
                    kept_labels.append(int(label))
                    bar.update(1)
    out, start = {}, 0
    for split, n in sizes.items():
        lengths = np.asarray(kept_lengths[start:start + n], dtype=np.int64)
        tokens = np.concatenate(kept_tokens[start:start + n]) if n else np.zeros(0, np.uint8)
        out[split] = {"tokens": tokens, "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                      "labels": np.asarray(kept_labels[start:start + n], dtype=np.uint8)}
        start += n
    return out


def decode(ids: np.ndarray) -> str:
    """Token ids -> the expression as space-separated tokens (padding dropped)."""
    return " ".join(VOCAB[i] for i in ids.tolist() if i != PAD_ID)


class ListOpsDataModule(TokenClassifyDataModule):
    """ListOps batches for ``longctx.tasks.classify`` (10 labels, vocabulary of 16 tokens, pad 0).

    Args:
        n_train, n_val, n_test: examples per split (LRA: 96000 / 2000 / 2000).
        max_depth, max_args, min_length, max_length: the generator's limits (see the module docstring).
        gen_seed: which examples (kept apart from ``seed``, the training order).
        seqlen: tokens per batch row (examples are at most max_length - 1 long; longer rows truncate).
        num_proc: generator processes (default: CPU count, at most 16).
        cache_dir: where the .npz goes (default ``<data root>/cache/lra``).
    """

    num_labels = 10
    vocab_size = len(VOCAB)

    def __init__(self, n_train: int = 96000, n_val: int = 2000, n_test: int = 2000, max_depth: int = 10,
                 max_args: int = 10, min_length: int = 500, max_length: int = 2000, gen_seed: int = 0,
                 seqlen: int = 2000, batch_size: int = 32, num_workers: int = 0, num_proc: int | None = None,
                 cache_dir: PathLike | None = None, seed: int = 0) -> None:
        super().__init__(seqlen, batch_size, num_workers, seed, PAD_ID)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        if min(self.sizes.values()) < 0 or max(self.sizes.values()) == 0:
            raise ValueError(f"ListOps data.n_train, n_val, n_test must be >= 0 and not all 0, got "
                             f"{n_train}, {n_val}, {n_test}")
        self.limits = {"max_depth": max_depth, "max_args": max_args, "min_length": min_length,
                       "max_length": max_length}
        self.gen_seed, self.num_proc = gen_seed, num_proc
        self.path = cache_file("listops", {"format": FORMAT, "gen_seed": gen_seed, "chunk": CHUNK,
                                           **self.sizes, **self.limits}, cache_dir)
        self._splits: dict[str, dict[str, np.ndarray]] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Refuse a Lightning stage that would read an empty split (e.g. training with n_train=0,
        which Lightning would otherwise end after 0 steps without an error); a test-only set
        (n_train=0, n_val=0) is fine for ``eval.py splits=[test]``."""
        stage_name = getattr(stage, "value", stage) or ""  # Lightning passes a TrainerFn (a str enum)
        empty = [s for s in STAGE_SPLITS.get(stage_name, ()) if self.sizes[s] == 0]
        if empty:
            raise ValueError(f"ListOps: {stage_name} reads the {empty[0]} split, but data.n_{empty[0]}=0; "
                             f"set data.n_{empty[0]} > 0 (this data has {self.sizes})")
        super().setup(stage)

    def load_splits(self) -> dict[str, dict[str, np.ndarray]]:
        if self._splits is not None:
            return self._splits
        if self.path.is_file():
            log.info("longctx: using cached ListOps in %s", self.path)
            flat = load_npz(self.path)
        else:
            data = generate(self.sizes, self.gen_seed, num_proc=self.num_proc, **self.limits)
            flat = {f"{split}_{name}": array for split, arrays in data.items()
                    for name, array in arrays.items()}
            save_npz(self.path, flat)
            log.info("longctx: wrote %s", self.path)
        self._splits = {s: {k: flat[f"{s}_{k}"] for k in ("tokens", "offsets", "labels")} for s in SPLITS}
        return self._splits
