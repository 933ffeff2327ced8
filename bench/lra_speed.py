"""Long Range Arena training speed: steps/s of each task's encoder with flash vs standard attention.

Every task trains the model, head and batch size of its experiment config (configs/experiment/lra-*.yaml)
on random tokens of the task's full length (no padding, so both attentions see the same dense batch):
ListOps 2000, Text 4000, Retrieval 2 x 4000 (two documents through one encoder), Image 1024,
Pathfinder 1024, Path-X 16384 and Path-256 65536 (also block-sparse, the experiment's pattern).
A few warmup steps, then timed optimizer steps (AdamW, bf16 autocast) between two cuda
synchronizes. A configuration that runs out of memory is a row with status "oom" (Path-X and
Path-256 under standard attention, where the N x N scores do not fit); Path-X and Path-256 time
--long-steps single steps.

Writes bench/results/<device>/lra_speed.json (rows: task, impl, attn (the model.attn that ran: --quick
runs the flash rows on the tiled reference), seqlen, batch, steps_per_s, ms_per_step, peak_mem_gib,
status) and prints a table with each implementation's speedup over standard attention per task.

    python bench/lra_speed.py                    # GPU: every task
    python bench/lra_speed.py --tasks listops image
    python bench/lra_speed.py --quick            # CPU smoke run: short sequences, batch 2, one step
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import seconds_per_step  # noqa: E402

from longctx.config import compose  # noqa: E402
from longctx.tasks import build_task  # noqa: E402

# task -> (experiment, number of labels, implementations compared)
TASKS = {
    "listops": ("lra-listops", 10, ("flash", "standard")),
    "text": ("lra-text", 2, ("flash", "standard")),
    "retrieval": ("lra-retrieval", 2, ("flash", "standard")),
    "image": ("lra-image", 10, ("flash", "standard")),
    "pathfinder": ("lra-pathfinder", 2, ("flash", "standard")),
    "pathx": ("lra-pathx", 2, ("flash", "standard")),
    "path256": ("lra-path256", 2, ("blocksparse", "flash", "standard")),
}
LONG = ("pathx", "path256")


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build(task: str, impl: str, quick: bool) -> tuple[torch.nn.Module, int, int, bool]:
    """(the Classify task of the experiment with model.attn=impl, seqlen, batch, pair). --quick: the
    flash rows run the tiled reference (CPU), sequences of at most 256 tokens, batch 2."""
    experiment, labels, _ = TASKS[task]
    overrides = [f"experiment={experiment}", f"task.num_labels={labels}", "model.dropout=0.0"]
    if impl != "blocksparse":
        overrides.append(f"model.attn={'reference' if quick and impl == 'flash' else impl}")
    cfg = compose(overrides)
    if impl != "blocksparse" and "attn_pattern" in cfg.model:
        cfg.model.attn_pattern = None
    seqlen, batch = cfg.data.seqlen, cfg.data.batch_size
    if quick:
        seqlen, batch = min(seqlen, 256), 2
    return build_task(cfg), seqlen, batch, bool(cfg.task.get("pair"))


def time_steps(net: torch.nn.Module, seqlen: int, batch: int, pair: bool, warmup: int, steps: int,
               device: torch.device) -> float:
    """Seconds per optimizer step of net (a Classify task) on random full-length batches."""
    vocab, labels = net.encoder.config.vocab_size, net.head.classifier.out_features
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch * (2 if pair else 1), seqlen), device=device, generator=generator)
    targets = torch.randint(0, labels, (batch,), device=device, generator=generator)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            # dense: no attention mask, no padding; a pair head takes both documents stacked (2 batch rows)
            loss = net.head.loss(net.head(net.encoder(ids), None), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return seconds_per_step(step, warmup, steps, device)


def run(task: str, impl: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {"task": task, "impl": impl}
    try:
        net, seqlen, batch, pair = build(task, impl, args.quick)
        row.update(attn=net.encoder.config.attn, seqlen=seqlen * (2 if pair else 1), batch=batch)
        net = net.to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        long = task in LONG
        seconds = time_steps(net, seqlen, batch, pair, 1 if long or args.quick else args.warmup,
                             args.long_steps if long else args.steps, device)
        row.update(status="ok", steps_per_s=1.0 / seconds, ms_per_step=1000.0 * seconds)
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.cuda.OutOfMemoryError:
        row.update(status="oom")
    finally:
        net = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'task':<11}{'impl':<12}{'tokens':>8}{'batch':>7}{'steps/s':>10}{'ms/step':>10}{'GiB':>8}"
             f"{'vs standard':>13}"]
    standard = {r["task"]: r.get("steps_per_s") for r in rows if r["impl"] == "standard"}
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['task']:<11}{r['impl']:<12}{r.get('seqlen', ''):>8}{r.get('batch', ''):>7}"
                         f"{r['status'].upper():>10}")
            continue
        base = standard.get(r["task"])
        ratio = f"{r['steps_per_s'] / base:.2f}x" if base and r["impl"] != "standard" else ""
        mem = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
        lines.append(f"{r['task']:<11}{r['impl']:<12}{r['seqlen']:>8}{r['batch']:>7}{r['steps_per_s']:>10.2f}"
                     f"{r['ms_per_step']:>10.1f}{mem:>8}{ratio:>13}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (short tasks)")
    parser.add_argument("--long-steps", type=int, default=3, help="timed steps per row (Path-X, Path-256)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<device>)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if args.quick:
        args.steps = args.long_steps = 1
    rows = [run(task, impl, args, device) for task in args.tasks for impl in TASKS[task][2]]
    out = (args.out or ROOT / "bench" / "results" / device_slug(device)) / "lra_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "quick": args.quick}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
