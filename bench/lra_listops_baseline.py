"""The accuracy of the root operator alone on ListOps: a classifier that sees only the first token
(MIN / MAX / MED / SM), fitted on the train split (most frequent label per operator) and scored on
every split of the same generated data (lra_listops defaults: gen_seed 0, 96k/2k/2k). Small
Transformers on ListOps largely learn this rule (LRA's published Transformer accuracy, 36-37%, is
about its level), so it is the yardstick for a run's val/test accuracy on these exact splits.

    python bench/lra_listops_baseline.py [--gen-seed 0] [--out DIR]   # CPU, about a minute
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longctx.data.lra.listops import generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gen-seed", type=int, default=0)
    parser.add_argument(
        "--sizes", nargs=3, type=int, default=[96000, 2000, 2000], metavar=("TRAIN", "VAL", "TEST")
    )
    parser.add_argument("--out", type=Path, help="write listops_root_operator.json here")
    args = parser.parse_args()
    data = generate(dict(zip(("train", "val", "test"), args.sizes)), gen_seed=args.gen_seed, progress=False)
    root = {s: d["tokens"][d["offsets"][:-1]].astype(np.int64) for s, d in data.items()}
    label = {s: d["labels"].astype(np.int64) for s, d in data.items()}
    counts = np.zeros((int(root["train"].max()) + 1, 10), dtype=np.int64)
    np.add.at(counts, (root["train"], label["train"]), 1)
    rule = counts.argmax(axis=1)  # operator token -> its most frequent label on train
    result = {"gen_seed": args.gen_seed, "sizes": args.sizes}
    for split in data:
        accuracy = float((rule[root[split]] == label[split]).mean())
        n = len(label[split])
        result[split] = {"n": n, "root_operator_accuracy": accuracy,
                         "standard_error": float(np.sqrt(accuracy * (1 - accuracy) / n)),
                         "majority_class": float(np.bincount(label[split], minlength=10).max() / n)}
        print(f"{split:>5}: n={n} root-operator rule {accuracy:.4f} (+-{result[split]['standard_error']:.4f})"
              f", majority class {result[split]['majority_class']:.4f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "listops_root_operator.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
