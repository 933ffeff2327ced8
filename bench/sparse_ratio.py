"""Block-sparse / dense forward time ratio, repeated and interleaved (GPU only).

Times dense attention and several block masks of one density back to back, `--repeats` rounds, and
prints each mask's ratio to dense (median, min, max over rounds), so that masks whose kept blocks are
arranged differently (same count) can be compared (bench/blocksparse.py --repeats gives the medians of
its random masks over densities):

  random   bench/blocksparse.py's masks (random blocks of the whole matrix, one mask per head)
  checker  key block n of query block m kept when n + m is even (every row keeps half, rows differ)
  stripes  key block n kept when n is even (every row keeps the same half)
  ones     every block kept, through the block-sparse kernel (its walk's cost against dense)

    python bench/sparse_ratio.py --head-dims 64 128 --seqlen 16384 --repeats 5 [--bwd] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import HIDDEN, ROOT, bench_ms, device_slug, write_json  # noqa: E402
from blocksparse import head_masks  # noqa: E402

from longctx.ops import attention  # noqa: E402
from longctx.ops.blocksparse import num_blocks  # noqa: E402

PATTERNS = ("random", "checker", "stripes", "ones")


def pattern_mask(name: str, seqlen: int, heads: int, density: float) -> torch.Tensor:
    if name == "random":
        return head_masks(seqlen, heads, density)
    period = round(1 / density)
    if name != "ones" and abs(period * density - 1) > 1e-6:
        raise ValueError(f"pattern {name!r} needs a density of 1/k (1/2, 1/4, ...), got {density}")
    n = num_blocks(seqlen)
    m_idx = torch.arange(n, device="cuda")[:, None]
    n_idx = torch.arange(n, device="cuda")[None, :]
    if name == "checker":
        keep = (m_idx + n_idx) % period == 0
    elif name == "stripes":
        keep = (n_idx % period == 0).expand(n, n)
    elif name == "ones":
        keep = torch.ones(n, n, dtype=torch.bool, device="cuda")
    else:
        raise ValueError(f"unknown pattern {name!r}; allowed: {', '.join(PATTERNS)}")
    return keep[None, None].expand(1, heads, n, n).contiguous()


def time_masks(head_dim: int, seqlen: int, masks: dict, repeats: int, bwd: bool) -> dict:
    """{(mask name, phase): [ms per round]}; each round times every mask once, in turn."""
    heads = HIDDEN // head_dim
    q, k, v = (
        torch.randn(1, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    times: dict[tuple[str, str], list[float]] = {}
    for rep in range(repeats):
        for name, mask in masks.items():

            def fwd(mask=mask):
                return attention(q, k, v, block_mask=mask, impl="flash")

            with torch.no_grad():
                times.setdefault((name, "fwd"), []).append(bench_ms(fwd))
            if bwd:
                out = fwd()
                grad = torch.randn_like(out)
                ms = bench_ms(
                    lambda out=out, grad=grad: out.backward(grad, retain_graph=True), grad_to_none=[q, k, v]
                )
                times.setdefault((name, "bwd"), []).append(ms)
        print(
            f"D={head_dim} round {rep + 1}: "
            + " ".join(f"{n}/{ph} {t[-1]:.3f}" for (n, ph), t in times.items()),
            flush=True,
        )
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bwd", action="store_true", help="also time the backward")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<device>)")
    args = parser.parse_args()
    if not 0 < args.density <= 1:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    out_dir = args.out or ROOT / "bench" / "results" / device_slug()
    out_dir.mkdir(parents=True, exist_ok=True)

    rows, lines = [], []
    for d in args.head_dims:
        s = args.seqlen
        masks = {"dense": None} | {p: pattern_mask(p, s, HIDDEN // d, args.density) for p in args.patterns}
        times = time_masks(d, s, masks, args.repeats, args.bwd)
        for (name, phase), ts in times.items():
            ratios = [t / t_dense for t, t_dense in zip(ts, times[("dense", phase)])]
            kept = 1.0 if masks[name] is None else masks[name].float().mean().item()
            rows.append(
                {
                    "head_dim": d,
                    "seqlen": s,
                    "pattern": name,
                    "phase": phase,
                    "kept_fraction": kept,
                    "ms": ts,
                    "ratio_to_dense": ratios,
                }
            )
            lines.append(
                f"{d:>4} {name:>8} {phase} kept {kept:.3f} | ms median {statistics.median(ts):7.3f} "
                f"| /dense median {statistics.median(ratios):.3f} min {min(ratios):.3f} "
                f"max {max(ratios):.3f}"
            )
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "hidden": HIDDEN,
        "batch": 1,
        "density": args.density,
        "repeats": args.repeats,
        "timing": "triton.testing.do_bench median per round; rounds interleave the masks",
        "command": "python " + " ".join(sys.argv),
    }
    path = out_dir / "sparse_ratio.json"
    write_json(path, {"meta": meta, "rows": rows})
    print("wrote", path)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
