"""ListOps generator: labels against an independent stack evaluator, LRA's limits, seeding, batches."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from longctx.data.lra.listops import VOCAB, ListOpsDataModule, decode, generate


def evaluate(expression: str) -> tuple[int, int, int]:
    """(value, tree depth with the root at 1 and digits counted as nodes, largest arity) of a
    ListOps expression, by a stack machine written from the task's definition."""
    ops = {
        "[MIN": min,
        "[MAX": max,
        "[SM": lambda xs: sum(xs) % 10,
        "[MED": lambda xs: int(statistics.median(xs)),  # the mean of the middle two, truncated
    }
    stack: list[tuple[str, list[int]]] = []
    result, depth, arity = None, 0, 0
    for token in expression.split():
        if token in ops:
            stack.append((token, []))
            depth = max(depth, len(stack))
            continue
        if token == "]":
            op, args = stack.pop()
            arity = max(arity, len(args))
            value = ops[op](args)
        else:
            value = int(token)
            depth = max(depth, len(stack) + 1)
        if stack:
            stack[-1][1].append(value)
        else:
            assert result is None, "more than one top-level expression"
            result = value
    assert not stack and result is not None, "unbalanced expression"
    return result, depth, arity


def examples(split: dict[str, np.ndarray]) -> list[tuple[np.ndarray, int]]:
    o = split["offsets"]
    return [(split["tokens"][o[i]:o[i + 1]], int(split["labels"][i])) for i in range(len(split["labels"]))]


def test_evaluator_on_hand_made_expressions():
    assert evaluate("[MAX 2 9 [MIN 4 7 ] 0 ]") == (9, 3, 4)
    assert evaluate("[MED 1 2 6 7 ]") == (4, 2, 4)  # (2 + 6) / 2
    assert evaluate("[MED 1 2 7 7 ]") == (4, 2, 4)  # 4.5 truncated
    assert evaluate("[SM 9 8 [SM 5 ] ]")[0] == 2
    assert evaluate("3") == (3, 1, 0)


def test_labels_lengths_and_limits_follow_lra():
    data = generate({"train": 40, "val": 5, "test": 5}, gen_seed=3, num_proc=1, progress=False)
    assert {s: len(d["labels"]) for s, d in data.items()} == {"train": 40, "val": 5, "test": 5}
    seen = set()
    for split in data.values():
        for tokens, label in examples(split):
            value, depth, arity = evaluate(decode(tokens))
            assert label == value
            assert 500 < len(tokens) < 2000
            assert depth <= 10 and 2 <= arity <= 10
            assert tokens.max() < len(VOCAB) and tokens.min() > 0  # no padding inside
            seen.add(tokens.tobytes())
    assert len(seen) == 50  # distinct examples, none shared between splits


def test_small_limits_are_respected():
    data = generate({"train": 60, "val": 0, "test": 0}, gen_seed=1, max_depth=3, max_args=3, min_length=5,
                    max_length=15, num_proc=1, progress=False)
    stats = [evaluate(decode(t)) + (len(t), label) for t, label in examples(data["train"])]
    assert all(v == label and d <= 3 and a <= 3 and 5 < n < 15 for v, d, a, n, label in stats)
    assert max(d for _, d, _, _, _ in stats) == 3  # the limit is reached, not just respected


def test_seeded_and_independent_of_process_count():
    kwargs = {"max_depth": 6, "max_args": 5, "min_length": 20, "max_length": 200, "progress": False}
    one = generate({"train": 300, "val": 10, "test": 10}, gen_seed=7, num_proc=1, **kwargs)
    two = generate({"train": 300, "val": 10, "test": 10}, gen_seed=7, num_proc=2, **kwargs)
    other = generate({"train": 300, "val": 10, "test": 10}, gen_seed=8, num_proc=1, **kwargs)
    for split in one:
        for name in one[split]:
            np.testing.assert_array_equal(one[split][name], two[split][name])
    assert not np.array_equal(one["train"]["labels"], other["train"]["labels"])


def test_bad_limits_are_one_line_errors():
    with pytest.raises(ValueError, match="max_depth >= 2"):
        generate({"train": 1}, max_depth=1)
    with pytest.raises(ValueError, match="min_length < max_length - 1"):
        generate({"train": 1}, min_length=50, max_length=40)


def test_datamodule_batches_and_cache(tmp_path):
    kwargs = {"n_train": 12, "n_val": 4, "n_test": 4, "min_length": 30, "max_length": 120, "seqlen": 100,
              "batch_size": 4, "num_proc": 1, "cache_dir": tmp_path, "gen_seed": 5}
    dm = ListOpsDataModule(**kwargs)
    dm.prepare_data()
    assert dm.path.is_file() and dm.path.parent == tmp_path
    mtime = dm.path.stat().st_mtime_ns
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == (4, 100) and batch["input_ids"].dtype == torch.long
    for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any() and (ids[n:] == 0).all()
        if n < 100:  # not truncated: the row is the whole expression
            assert evaluate(decode(ids[:n].numpy()))[0] == int(label)
    assert dm.num_labels == 10 and dm.tokenizer_vocab_size == len(VOCAB)
    again = ListOpsDataModule(**kwargs)
    again.setup()  # reads the cache rather than generating
    assert dm.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.datasets["test"].labels, dm.datasets["test"].labels)
    train = next(iter(dm.train_dataloader()))
    assert train["input_ids"].shape == (4, 100)


def test_test_only_data_for_a_fresh_evaluation_set(tmp_path):
    """eval.py data.gen_seed=1 data.n_train=0 data.n_val=0 data.n_test=N: a test split of its own,
    cached apart from the training data, and stages that would read an empty split are refused."""
    limits = {"min_length": 30, "max_length": 120, "seqlen": 100, "batch_size": 4, "num_proc": 1,
              "cache_dir": tmp_path}
    training = ListOpsDataModule(n_train=12, n_val=4, n_test=4, gen_seed=0, **limits)
    fresh = ListOpsDataModule(n_train=0, n_val=0, n_test=10, gen_seed=1, **limits)
    assert fresh.path != training.path
    fresh.setup("test")
    test = fresh.load_splits()["test"]
    assert len(test["labels"]) == 10 and len(fresh.datasets["train"]) == 0
    expected = generate({"test": 10}, gen_seed=1, min_length=30, max_length=120, num_proc=1, progress=False)
    for name in ("tokens", "offsets", "labels"):
        np.testing.assert_array_equal(test[name], expected["test"][name])
    batches = list(fresh.test_dataloader())
    assert sum(len(b["labels"]) for b in batches) == 10
    training.setup("fit")
    seen = {t.tobytes() for split in training.load_splits().values() for t, _ in examples(split)}
    assert not seen & {t.tobytes() for t, _ in examples(test)}  # another seed, other examples

    for stage, split in (("fit", "train"), ("validate", "val")):
        with pytest.raises(ValueError, match=f"{stage} reads the {split} split, but data.n_{split}=0"):
            ListOpsDataModule(n_train=0, n_val=0, n_test=10, gen_seed=1, **limits).setup(stage)
    with pytest.raises(ValueError, match="fit reads the val split, but data.n_val=0"):
        ListOpsDataModule(n_train=12, n_val=0, n_test=4, **limits).setup("fit")
    with pytest.raises(ValueError, match="must be >= 0 and not all 0"):
        ListOpsDataModule(n_train=0, n_val=0, n_test=0, **limits)
    with pytest.raises(ValueError, match="must be >= 0 and not all 0"):
        ListOpsDataModule(n_train=-1, n_val=4, n_test=4, **limits)
