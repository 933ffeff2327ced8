"""Block-sparse attention: time against mask density, longctx flash vs FlexAttention (GPU only).

Masks: seeded random 128 x 128 block masks (longctx.ops.blocksparse.random_blocks) of density
1, 1/2, 1/4, 1/8, 1/16 — a different mask per head, non-causal, so the work is exactly the kept
fraction. FlexAttention runs the same masks (to_flex_block_mask: every kept block a full block)
under torch.compile. Batch 1, bf16, hidden 2048 (16 heads at head dim 128, 32 at 64); forward
and backward timed separately (triton.testing.do_bench median, as bench/attention.py).

With --repeats R every (head dim, seqlen) runs R rounds, each round all densities and impls in
turn, and a case's time is the median over the rounds (each round's time is kept in the row): on
the H100 one do_bench median of the same case moves by several percent between runs (the clock
follows the power draw), enough to move a ratio across its target either way. The order inside a
round (--order): "impl" (the default) times all of one impl's densities back to back, so a ratio's
numerator and denominator follow the same kind of work; "density" times each density's impls one
after the other (longctx, flex, next density), so every longctx case but the dense one follows a
FlexAttention case. On one build (run s15-1, `ab_s15.txt`) the head dim 128 1/2 forward read 0.557
of dense in impl order and 0.587 in density order (head dim 64: 0.529 / 0.530).

Writes bench/results/<device>/blocksparse.json (rows: impl, head_dim, seqlen, density, fwd_ms,
bwd_ms) and blocksparse.png, then prints time(d) / time(dense) against the target d + 0.05 and
the ratio to FlexAttention.

    python bench/blocksparse.py                       # 16k and 64k, head dims 64 and 128
    python bench/blocksparse.py --seqlens 16384 --repeats 5
    python bench/blocksparse.py --seqlens 65536 --merge   # add to the existing blocksparse.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import (  # noqa: E402
    HIDDEN,
    ROOT,
    bench_ms,
    compiled_flex,
    device_slug,
    is_oom,
    median_row,
    merge_rows,
    write_json,
)

from longctx.ops import attention  # noqa: E402
from longctx.ops.blocksparse import random_blocks, to_flex_block_mask  # noqa: E402

DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.0625)
SEQLENS = (16384, 65536)
IMPLS = ("longctx", "flex")


def head_masks(seqlen: int, heads: int, density: float) -> torch.Tensor:
    """bool (1, heads, n, n): an independent seeded random mask of the given density per head."""
    masks = [random_blocks(seqlen, seqlen, density, seed=h, device="cuda") for h in range(heads)]
    return torch.cat(masks, dim=1)


def round_order(densities: list[float], impls: list[str], order: str) -> list[tuple[str, float]]:
    """The (impl, density) cases of one round in the order they run (see --order)."""
    if order == "density":
        return [(impl, dens) for dens in densities for impl in impls]
    if order == "impl":
        return [(impl, dens) for impl in impls for dens in densities]
    raise ValueError(f"order must be 'density' or 'impl', got {order!r}")


def make_fn(impl: str, mask: torch.Tensor | None, seqlen: int):
    if impl == "longctx":
        return lambda q, k, v: attention(q, k, v, block_mask=mask, impl="flash")
    fn = compiled_flex()
    block_mask = to_flex_block_mask(mask, seqlen, seqlen) if mask is not None else None

    def run(q, k, v):
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)

    return run


def run_case(impl: str, head_dim: int, seqlen: int, density: float) -> dict:
    heads = HIDDEN // head_dim
    row = {"impl": impl, "head_dim": head_dim, "seqlen": seqlen, "density": density, "heads": heads,
           "batch": 1}
    try:
        mask = None if density == 1.0 else head_masks(seqlen, heads, density)
        if mask is not None:
            row["kept_fraction"] = mask.float().mean().item()
        fn = make_fn(impl, mask, seqlen)
        q, k, v = (
            torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        with torch.no_grad():
            fn(q, k, v)
            row["fwd_ms"] = bench_ms(lambda: fn(q, k, v))
        out = fn(q, k, v)
        grad = torch.randn_like(out)
        out.backward(grad, retain_graph=True)
        row["bwd_ms"] = bench_ms(lambda: out.backward(grad, retain_graph=True), grad_to_none=[q, k, v])
        torch.cuda.synchronize()
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as err:
        row["error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {str(err)[:300]}"
    finally:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def timed_case(impl: str, head_dim: int, seqlen: int, density: float, round_no: int) -> dict:
    t0 = time.time()
    row = run_case(impl, head_dim, seqlen, density)
    msg = row.get("error") or f"fwd {row['fwd_ms']:.2f} ms bwd {row.get('bwd_ms', 0):.2f} ms"
    print(f"{impl:>8} D={head_dim} S={seqlen} density={density:g} round {round_no}: {msg} "
          f"({time.time() - t0:.1f}s)", flush=True)
    return row


def summarise(rows: list[dict]) -> list[str]:
    """Lines of the table: per (head_dim, seqlen, density) our time / dense time and / flex."""
    by = {(r["impl"], r["head_dim"], r["seqlen"], r["density"]): r for r in rows}
    lines = [f"{'D':>4} {'S':>6} {'dens':>6} | {'fwd ms':>8} {'/dense':>6} {'target':>6} {'xflex':>6} | "
             f"{'bwd ms':>8} {'/dense':>6} {'xflex':>6}"]
    for (impl, d, s, dens), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], -kv[0][3])):
        if impl != "longctx":
            continue
        dense, flex = by.get(("longctx", d, s, 1.0), {}), by.get(("flex", d, s, dens), {})
        cells = [f"{d:>4} {s:>6} {dens:>6.4g} |"]
        for phase in ("fwd", "bwd"):
            key = f"{phase}_ms"
            if key not in r:
                cells.append(f"{r.get('error', '-')[:30]:>30} |")
                continue
            rel = f"{r[key] / dense[key]:.3f}" if key in dense else "-"
            xflex = f"{flex[key] / r[key]:.2f}" if key in flex else flex.get("error", "-")[:6]
            target = f"{dens + 0.05:.3f}" if phase == "fwd" else ""
            cells.append(f"{r[key]:>8.2f} {rel:>6} {target:>6} {xflex:>6} |" if phase == "fwd"
                         else f"{r[key]:>8.2f} {rel:>6} {xflex:>6} |")
        lines.append(" ".join(cells)[:-2])
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["head_dim"], r["seqlen"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.6), squeeze=False)
    for ax, (d, s) in zip(axes[0], combos):
        for impl, style in (("longctx", "-o"), ("flex", "--s")):
            for phase in ("fwd", "bwd"):
                pts = sorted((r["density"], r[f"{phase}_ms"]) for r in rows if f"{phase}_ms" in r
                             and (r["impl"], r["head_dim"], r["seqlen"]) == (impl, d, s))
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{impl} {phase}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"head dim {d}, seqlen {s // 1024}k")
        ax.set_xlabel("density (kept blocks)")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--seqlens", nargs="+", type=int, default=list(SEQLENS))
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeats", type=int, default=1, help="rounds per (head dim, seqlen); median")
    parser.add_argument("--order", choices=("density", "impl"), default="impl",
                        help="inside a round: per density every impl, or per impl every density")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<device>)")
    parser.add_argument(
        "--merge", action="store_true", help="add to an existing blocksparse.json (same keys replaced)"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    out_dir = args.out or ROOT / "bench" / "results" / device_slug()
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for d in args.head_dims:
        for s in args.seqlens:
            rounds: dict[tuple, list[dict]] = {}
            for r in range(args.repeats):
                for impl, dens in round_order(args.densities, args.impls, args.order):
                    rounds.setdefault((impl, dens), []).append(timed_case(impl, d, s, dens, r + 1))
            rows += [median_row(case) for case in rounds.values()]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
            "hidden": HIDDEN, "batch": 1, "masks": "random 128x128 blocks, one per head, non-causal",
            "timing": "triton.testing.do_bench median; with --repeats the median of the rounds (*_rounds)",
            "order": args.order}
    path = out_dir / "blocksparse.json"
    if args.merge and path.exists():
        old = json.loads(path.read_text())["rows"]
        rows = merge_rows(old, rows, ("impl", "head_dim", "seqlen", "density"))
    write_json(path, {"meta": meta, "rows": rows})
    plot(rows, out_dir / "blocksparse.png")
    print("wrote", path, out_dir / "blocksparse.png")
    print("\n".join(summarise(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
