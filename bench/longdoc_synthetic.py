"""Long-document classification on the synthetic MIMIC-style task: does a longer context help?

Sweep (default): the same small BERT encoder is fine-tuned from scratch at each sequence length
(512, 1k, 2k, 4k tokens) on the same generated documents, for the same number of steps and
examples; the threshold is tuned on val (``task.threshold=tune``) and test micro/macro-F1 are
reported. Label k of a document is present iff both of its cue words occur, each placed at random
in a ~3,000-word document (see longctx.data.longdoc.synthetic), so a model truncated to 512 tokens
sees both cues of a present label only about 2% of the time.

``--oom-check``: one fine-tuning step (forward, backward, AdamW) of a BERT-base-size encoder on a
16k-token document with flash attention and with standard attention (experiments longdoc-16k and
longdoc-16k-standard); records peak memory and step time, or the out-of-memory error.

Writes bench/results/<device>/longdoc_synthetic.json (+ a markdown table in .md) or, with
--oom-check, longdoc_16k.json; --out changes the folder. ``--quick``: tiny documents, lengths and
model, for a CPU check of the trend (lengths 16..128 play 512..4k).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from longctx.cli import _precision
from longctx.config import compose
from longctx.data import build_datamodule
from longctx.tasks import build_task

SWEEP = {
    "full": {"seqlens": (512, 1024, 2048, 4096), "steps": 800, "batch_size": 16,
             "data": ["data.num_train=4000", "data.num_val=400", "data.num_test=400"],
             "model": ["model.n_layer=4", "model.n_embd=256", "model.n_head=4",
                       "model.intermediate_size=1024"]},
    "quick": {"seqlens": (16, 32, 64, 128), "steps": 400, "batch_size": 16,
              "data": ["data.num_train=1000", "data.num_val=200", "data.num_test=200", "data.min_words=90",
                       "data.max_words=110", "data.num_labels=4", "data.min_mentions=3",
                       "data.max_mentions=4", "data.max_decoys=1"],
              "model": ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.intermediate_size=128",
                        "model.attn=standard"]},  # on CPU at these lengths standard is the fastest exact one
}


def device_name() -> str:
    """bench/results/ folder name: the GPU's name lower-cased with '-' for spaces, else 'cpu'."""
    return torch.cuda.get_device_name().lower().replace(" ", "-") if torch.cuda.is_available() else "cpu"


def _atomic_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def fine_tune(seqlen: int, setting: dict[str, Any], steps: int, extra: list[str]) -> dict[str, Any]:
    """Train at ``seqlen`` for ``steps`` steps, tune the threshold on val, evaluate test."""
    argv = ["model=bert-tiny", "task=classify", "data=synthetic_longdoc", f"seqlen={seqlen}",
            f"data.batch_size={setting['batch_size']}", "data.vocab_size=2000", "model.vocab_size=2000",
            "model.dropout=0.0", "task.dropout=0.0", "task.threshold=tune", "task.lr=1e-3",
            "task.warmup_steps=30", "task.pooling=mean", f"trainer.max_steps={steps}",
            *setting["data"], *setting["model"], *extra]
    cfg = compose(argv)
    data = build_datamodule(cfg)
    data.setup()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = build_task(cfg)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=_precision(cfg),
                        max_steps=steps, max_epochs=-1, val_check_interval=steps,
                        check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(task, datamodule=data)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test = trainer.test(task, datamodule=data, verbose=False)[0]
    minutes = (time.perf_counter() - start) / 60
    full = data.datasets["test"].tensors["attention_mask"][:, -1] == 1  # documents cut at seqlen
    targets = data.datasets["test"].tensors["labels"]
    all_positive_f1 = float(2 * targets.sum() / (targets.sum() + targets.numel()))  # predict every label
    row = {"seqlen": seqlen, "micro_f1": test["test/micro_f1"], "macro_f1": test["test/macro_f1"],
           "threshold": round(test["test/threshold"], 2), "val_micro_f1": val["val/micro_f1"],
           "steps": trainer.global_step, "examples": trainer.global_step * setting["batch_size"],
           "minutes": minutes, "truncated_fraction": float(full.float().mean()),
           "all_positive_micro_f1": all_positive_f1}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| seqlen | micro_f1 | macro_f1 | threshold | steps | minutes |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['seqlen']} | {r['micro_f1']:.3f} | {r['macro_f1']:.3f} | {r['threshold']:.2f} | "
              f"{r['steps']} | {r['minutes']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def sweep(args: argparse.Namespace, out: Path) -> None:
    setting = SWEEP["quick" if args.quick else "full"]
    seqlens = args.seqlens or setting["seqlens"]
    steps = args.steps or setting["steps"]
    rows = [fine_tune(n, setting, steps, args.override) for n in seqlens]
    payload = {"device": device_name(), "torch": torch.__version__, "quick": args.quick,
               "command": " ".join(sys.argv), "rows": rows}
    _atomic_json(out / "longdoc_synthetic.json", payload)
    (out / "longdoc_synthetic.md").write_text(table(rows))
    print(table(rows))
    print(f"wrote {out / 'longdoc_synthetic.json'}")


def one_step(attn: str, seqlen: int) -> dict[str, Any]:
    """One AdamW fine-tuning step of experiment longdoc-16k's encoder (50 labels) on one document
    of ``seqlen`` random tokens under bf16 autocast; peak memory and time, or the OOM."""
    experiment = "longdoc-16k" if attn == "flash" else "longdoc-16k-standard"
    cfg = compose([f"experiment={experiment}", f"seqlen={seqlen}", "task.num_labels=50",
                   "task.multi_label=true"])
    row: dict[str, Any] = {"attn": cfg.model.attn, "experiment": experiment, "seqlen": seqlen,
                           "n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd}
    task = build_task(cfg).cuda()
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-5, fused=True)
    batch = {"input_ids": torch.randint(5, 30000, (1, seqlen), device="cuda"),
             "attention_mask": torch.ones(1, seqlen, dtype=torch.long, device="cuda"),
             "labels": (torch.rand(1, 50, device="cuda") < 0.1).float()}
    torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(2):  # the second step is timed (the first builds kernels and allocator pools)
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = task.head.loss(task(batch), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        row.update(ok=True, step_s=time.perf_counter() - start, loss=float(loss),
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    except torch.OutOfMemoryError as err:
        row.update(ok=False, error=f"OutOfMemoryError: {str(err).splitlines()[0]}",
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    del task, optimizer, batch
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def oom_check(args: argparse.Namespace, out: Path) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--oom-check needs a GPU")
    seqlen = args.seqlens[0] if args.seqlens else 16384
    rows = [one_step("flash", seqlen), one_step("standard", seqlen)]
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    _atomic_json(out / "longdoc_16k.json", {"device": device_name(), "gpu_memory_gib": total,
                                           "torch": torch.__version__, "rows": rows})
    print(f"wrote {out / 'longdoc_16k.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny documents and model (a CPU check)")
    parser.add_argument("--oom-check", action="store_true", help="16k fine-tuning step: flash vs standard")
    parser.add_argument("--seqlens", type=int, nargs="+", help="override the swept lengths")
    parser.add_argument("--steps", type=int, help="override the training steps per length")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<device>)")
    parser.add_argument("override", nargs="*", help="extra config overrides, e.g. task.lr=5e-4")
    args = parser.parse_args()
    out = args.out or Path(__file__).resolve().parent / "results" / device_name()
    (oom_check if args.oom_check else sweep)(args, out)


if __name__ == "__main__":
    main()
