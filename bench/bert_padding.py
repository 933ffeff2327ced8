"""BERT training steps on half-padded batches: the padding-free path against padded ones.

What one step is: forward, masked-LM loss on 15% of the real tokens, backward (no optimizer
step), under bf16 autocast on CUDA (fp32 on CPU). Batches have random lengths in antithetic pairs
(l, seqlen - l), so exactly half of the batch's positions are padding. Throughput counts real
(non-pad) tokens only. Rows (impl, path):

- ``flash, unpad``: the model given the attention_mask, i.e. its padding-free path: real tokens
  are packed into (total_tokens, n_embd), every layer runs on them only, attention through the
  varlen flash kernels (cu_seqlens).
- ``flash, padded``: the same model given the padded batch without a mask: every layer runs on all
  batch x seqlen positions and attention over all seqlen keys, the work and memory of a padded
  batch. ``longctx.ops.attention`` takes no key-padding mask, so pads are attended here: these rows
  measure the cost of padding, not a model output.
- ``standard, padded``: as above with the N x N attention matrix in memory: the classic BERT.

impl="flash" is passed explicitly, so a row cannot silently fall back to another implementation
(attention() raises when the kernels are missing). Before timing, the unpad path's hidden states
of the first two rows are checked against each row run alone without padding.

Writes bench/results/<device>/bert_padding.json (rows: impl, path, seqlen, batch, fill,
real_tokens_per_s, ms_per_step, peak_mem_gib) and prints a table.

    python bench/bert_padding.py            # BERT-base, seqlen 512 (batch 32) and 2048 (batch 8), GPU
    python bench/bert_padding.py --quick    # a 2-layer BERT, seqlen 64 and 128, runs on CPU in seconds
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from longctx.models import build_model  # noqa: E402
from longctx.models.bert import Bert  # noqa: E402

BATCH = {512: 32, 2048: 8}  # 16k padded positions per batch
MASK_PROB = 0.15


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def half_padded_batch(batch: int, seqlen: int, vocab: int, generator: torch.Generator,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded int64 (batch, seqlen) input_ids / attention_mask / labels with lengths drawn in
    pairs (l, seqlen - l), l uniform in [1, seqlen - 1]: the fill is exactly 1/2 for an even batch.
    labels: the input id at 15% of the real positions (at least one per row), -100 elsewhere."""
    if batch % 2 or seqlen < 2:
        raise ValueError(f"a 50% fill needs an even batch and seqlen >= 2, got batch={batch}, "
                         f"seqlen={seqlen}")
    first = torch.randint(1, seqlen, (batch // 2,), generator=generator)
    lengths = torch.cat([first, seqlen - first])[torch.randperm(batch, generator=generator)]
    mask = torch.arange(seqlen)[None] < lengths[:, None]
    ids = torch.randint(5, vocab, (batch, seqlen), generator=generator).masked_fill(~mask, 0)
    picked = (torch.rand(batch, seqlen, generator=generator) < MASK_PROB) & mask
    picked[:, 0] = True  # every row has a real first token
    labels = ids.masked_fill(~picked, -100)
    batch_dict = {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}
    return {k: v.to(device) for k, v in batch_dict.items()}


def mlm_step(model: Bert, batch: dict[str, torch.Tensor], unpad: bool, autocast: bool) -> None:
    """Forward, masked-LM cross-entropy on the labeled positions, backward."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = model(batch["input_ids"], batch["attention_mask"] if unpad else None)
        labeled = batch["labels"] != -100
        logits = model.mlm_logits(hidden[labeled])
    F.cross_entropy(logits.float(), batch["labels"][labeled]).backward()
    for p in model.parameters():
        p.grad = None


def check_unpad(model: Bert, batch: dict[str, torch.Tensor], autocast: bool) -> float:
    """Max abs difference between the unpad path's hidden states of rows 0 and 1 and each row run
    alone at its own length (no padding, no mask); raises when it exceeds the dtype's tolerance."""
    tol = 5e-2 if autocast else 1e-4
    worst = 0.0
    model.eval()  # no dropout
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        packed = model(batch["input_ids"][:2], batch["attention_mask"][:2]).float()
        for i in range(2):
            n = int(batch["attention_mask"][i].sum())
            alone = model(batch["input_ids"][i : i + 1, :n]).float()
            worst = max(worst, (packed[i, :n] - alone[0]).abs().max().item())
    model.train()
    if worst > tol:
        raise RuntimeError(f"the padding-free path differs from per-row forwards by {worst:.3g} (> {tol})")
    return worst


def build_bert(model_cfg: dict, impl: str, seqlen: int, device: torch.device) -> Bert:
    cfg = {**model_cfg, "attn": impl, "max_positions": max(seqlen, model_cfg["max_positions"])}
    return build_model(cfg).to(device).train()


def run_row(model_cfg: dict, impl: str, path: str, seqlen: int, batch: int, steps: int,
            device: torch.device) -> dict:
    row: dict = {"impl": impl, "path": path, "seqlen": seqlen, "batch": batch}
    autocast = device.type == "cuda"
    generator = torch.Generator().manual_seed(seqlen)
    data = half_padded_batch(batch, seqlen, model_cfg["vocab_size"], generator, device)
    real = int(data["attention_mask"].sum())
    row["fill"] = real / data["attention_mask"].numel()
    torch.manual_seed(0)
    try:
        model = build_bert(model_cfg, impl, seqlen, device)
        if path == "unpad":
            row["unpad_check_max_abs"] = check_unpad(model, data, autocast)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(max(2, steps // 4)):  # warm-up (kernel selection, allocator)
            mlm_step(model, data, path == "unpad", autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            mlm_step(model, data, path == "unpad", autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / steps
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        return row
    finally:
        model = None  # free before the next row
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["ms_per_step"] = 1e3 * seconds
    row["real_tokens_per_s"] = real / seconds
    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'impl':>9} {'path':>7} {'seqlen':>6} {'batch':>5} {'fill':>5} {'real tok/s':>11} "
          f"{'ms/step':>8} {'peak GiB':>8} {'vs unpad':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['impl']:>9} {row['path']:>7} {row['seqlen']:>6} {row['batch']:>5}  {row['error']}")
            continue
        unpad = next((r for r in rows if r["seqlen"] == row["seqlen"] and r["path"] == "unpad"
                      and "error" not in r), None)
        ratio = f"{unpad['real_tokens_per_s'] / row['real_tokens_per_s']:.2f}x" if unpad else "-"
        mem = f"{row['peak_mem_gib']:.1f}" if row["peak_mem_gib"] is not None else "-"
        print(f"{row['impl']:>9} {row['path']:>7} {row['seqlen']:>6} {row['batch']:>5} {row['fill']:>5.2f} "
              f"{row['real_tokens_per_s']:>11,.0f} {row['ms_per_step']:>8.1f} {mem:>8} {ratio:>8}")
    print("vs unpad: the padding-free row's real tokens/s over this row's")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a 2-layer BERT (n_embd 64), seqlen 64 and 128, batch 8, reference attention "
                             "for the unpad path: seconds on CPU")
    parser.add_argument("--model", default="bert-base", help="configs/model/<name>.yaml (default bert-base)")
    parser.add_argument("--seqlens", nargs="+", type=int, help="default 512 2048 (quick: 64 128)")
    parser.add_argument("--batch", type=int,
                        help="sequences per batch, even (default 32 at 512, 8 at 2048; quick 8)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (default 20)")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<device>)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{args.model}.yaml"))
    seqlens = args.seqlens or ((64, 128) if args.quick else (512, 2048))
    fast = "flash" if device.type == "cuda" else "reference"
    if args.quick:
        model_cfg.update(n_layer=2, n_head=2, n_embd=64, intermediate_size=128, vocab_size=1000)
    elif device.type != "cuda":
        parser.error("the full benchmark needs a CUDA device; use --quick on CPU")
    cases = [(fast, "unpad"), (fast, "padded"), ("standard", "padded")]

    rows = []
    for seqlen, (impl, path) in tqdm([(s, c) for s in seqlens for c in cases], desc="bert_padding"):
        batch = args.batch or (8 if args.quick else BATCH.get(seqlen, max(2, 16384 // seqlen // 2 * 2)))
        rows.append(run_row(model_cfg, impl, path, seqlen, batch, args.steps, device))
        tqdm.write(json.dumps(rows[-1]))

    out_dir = args.out or ROOT / "bench" / "results" / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "model": args.model if not args.quick else "quick (2 layers, 64 wide)",
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32", "steps": args.steps,
            "step": "forward + masked-LM loss (15% of real tokens) + backward, no optimizer step",
            "padded": "model fed the padded batch without a mask: pads computed and attended (cost only)"}
    path = out_dir / "bert_padding.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    tmp.replace(path)
    print_table(rows)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
