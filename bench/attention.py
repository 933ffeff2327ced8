"""Attention kernels side by side: longctx flash vs PyTorch's and other peers (GPU only).

FlashAttention's benchmark convention: 16k tokens per batch (batch = 16384 // seqlen), hidden 2048
(heads = 2048 // head_dim), bf16; forward FLOPs 4 * B * H * S^2 * D, halved when causal; backward
2.5x that; the median of triton.testing.do_bench. Also the extra peak memory of forward+backward
(batch 1, 16 heads, head dim 128) against seqlen, for flash and standard attention.

Writes bench/results/<device-slug>/attention.json (one row per impl, head_dim, causal, seqlen) and
PNG plots in the style of the FlashAttention paper's Figure 3, then prints a table of ratios.

    python bench/attention.py            # the full sweep
    python bench/attention.py --quick    # head dims 64/128, seqlen 1k/4k/16k, main peers
    python bench/attention.py --impls longctx sdpa_cudnn --seqlens 2048 4096 --repeats 5

With --repeats R every case (head dim, causal, seqlen) runs R rounds back to back, each round every
impl in turn (reversed in odd rounds), and a case's time is the median over its rounds (each round's
time kept in the row as fwd_ms_rounds / bwd_ms_rounds). On the H100 one do_bench median of the same
kernel moves by several percent between runs, because the clock follows the power draw (run s9-3,
power_probe_s9.json); the ratio of two impls timed in the same round moves less, and the table also
prints the lowest and highest per-round ratio to cuDNN.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TOKENS = 16384
HIDDEN = 2048
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
MEMORY_SEQLENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
ALL_IMPLS = (
    "longctx",
    "longctx_sm80",
    "sdpa_flash",
    "sdpa_cudnn",
    "sdpa_efficient",
    "flex",
    "flash_attn",
    "standard",
)
QUICK_IMPLS = ("longctx", "sdpa_flash", "sdpa_cudnn", "flex")
CAUSAL_CHOICES = {"both": (False, True), "yes": (True,), "no": (False,)}  # --causal

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# implementations: each takes q, k, v as (B, S, H, D) (views are fine) and returns (B, S, H, D)


_SM90_ENV = os.environ.get("LONGCTX_SM90")


def _longctx_path(stage1: bool) -> Callable[[bool], Fn]:
    """longctx's kernels; stage1=True forces the mma.sync (sm_80) kernels on Hopper too
    (LONGCTX_SM90=0, read by the binding at every call; run_speed times one impl at a time)."""

    def make(causal: bool) -> Fn:
        from longctx.ops import flash

        if not flash.is_available():
            raise RuntimeError(flash._load_error())
        if stage1:
            os.environ["LONGCTX_SM90"] = "0"
        elif _SM90_ENV is None:
            os.environ.pop("LONGCTX_SM90", None)
        else:
            os.environ["LONGCTX_SM90"] = _SM90_ENV
        return lambda q, k, v: flash.flash_attention(q, k, v, causal=causal)

    return make


def _sdpa(backend_name: str) -> Callable[[bool], Fn]:
    def make(causal: bool) -> Fn:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def fn(q, k, v):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
                )
            return out.transpose(1, 2)

        return fn

    return make


def _standard(causal: bool) -> Fn:
    """The paper's baseline: bf16 matmuls with the (S, S) scores in memory."""

    def fn(q, k, v):
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        s = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        if causal:
            n = q.shape[1]
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        return (torch.softmax(s, dim=-1) @ vh).transpose(1, 2)

    return fn


_FLEX_CACHE: dict = {}


def compiled_flex() -> Callable:
    """torch.compile(flex_attention), with dynamo's recompile limits raised: one compiled graph per
    shape, or dynamo silently falls back to the unfused (very slow) path after a few shapes."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.cache_size_limit = 1000
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 1000
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 10000
    return _FLEX_CACHE.setdefault("fn", torch.compile(flex_attention, dynamic=False))


def _flex(causal: bool) -> Fn:
    from torch.nn.attention.flex_attention import create_block_mask

    compiled = compiled_flex()

    def fn(q, k, v):
        mask = None
        if causal:
            key = (q.shape[1], str(q.device))
            if key not in _FLEX_CACHE:
                _FLEX_CACHE[key] = create_block_mask(
                    lambda b, h, i, j: i >= j, None, None, q.shape[1], q.shape[1], device=q.device
                )
            mask = _FLEX_CACHE[key]
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
        return out.transpose(1, 2)

    return fn


def _flash_attn(causal: bool) -> Fn:
    from flash_attn import flash_attn_func

    return lambda q, k, v: flash_attn_func(q, k, v, causal=causal)


MAKERS: dict[str, Callable[[bool], Fn]] = {
    "longctx": _longctx_path(stage1=False),
    "longctx_sm80": _longctx_path(stage1=True),
    "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"),
    "flex": _flex,
    "flash_attn": _flash_attn,
    "standard": _standard,
}


# --------------------------------------------------------------------------------------------
# measurement


def flops_fwd(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool) -> float:
    return 4.0 * batch * heads * seqlen * seqlen * head_dim / (2.0 if causal else 1.0)


def write_json(path: Path, payload: dict) -> None:
    """Writes payload to path atomically (a temporary file, then a rename): a killed run leaves the
    previous file, which --merge reads back, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def merge_rows(old: list[dict], new: list[dict], key: tuple[str, ...]) -> list[dict]:
    """--merge: the old rows whose key no new row has, then the new rows (same keys replaced)."""
    fresh = {tuple(r[k] for k in key) for r in new}
    return [r for r in old if tuple(r[k] for k in key) not in fresh] + new


def median_row(rounds: list[dict]) -> dict:
    """One case over its rounds: the first round's row with fwd_ms / bwd_ms the median of the rounds
    that have it (and every round's value kept as <key>_rounds); a case that failed in every round
    keeps its error, one that failed in some rounds lists their errors as error_rounds."""
    keys = ("fwd_ms", "bwd_ms")
    row = dict(rounds[0])
    for key in keys:
        values = [r[key] for r in rounds if key in r]
        if values:
            row[key] = statistics.median(values)
            if len(rounds) > 1:
                row[f"{key}_rounds"] = values
    if len(rounds) > 1:
        row["rounds"] = len(rounds)
        errors = [r["error"] for r in rounds if "error" in r]
        if errors and any(key in row for key in keys):
            row["error_rounds"] = errors
            row.pop("error", None)
    return row


def round_impls(impls: list[str], round_no: int) -> list[str]:
    """The impls of one round of a case: in the given order in even rounds, reversed in odd ones, so
    that no impl always runs right after the same other one (the clock follows the power draw of what
    ran just before)."""
    return list(impls) if round_no % 2 == 0 else list(reversed(impls))


def with_tflops(row: dict) -> dict:
    """Fills the TF/s columns from the row's (median) times: forward 4 B H S^2 D (halved when causal),
    backward 2.5x that, forward + backward the sum of the two times."""
    fwd_flops = flops_fwd(row["batch"], row["heads"], row["seqlen"], row["head_dim"], row["causal"])
    if "fwd_ms" in row:
        row["fwd_tflops"] = fwd_flops / row["fwd_ms"] * 1e-9
    if "fwd_ms" in row and "bwd_ms" in row:
        row["bwd_tflops"] = 2.5 * fwd_flops / row["bwd_ms"] * 1e-9
        row["fwdbwd_ms"] = row["fwd_ms"] + row["bwd_ms"]
        row["fwdbwd_tflops"] = 3.5 * fwd_flops / row["fwdbwd_ms"] * 1e-9
    return row


def bench_ms(fn: Callable[[], object], grad_to_none: list | None = None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_speed(impl: str, head_dim: int, causal: bool, seqlen: int, backward: bool) -> dict:
    batch, heads = max(1, TOKENS // seqlen), HIDDEN // head_dim
    row = {
        "impl": impl,
        "head_dim": head_dim,
        "causal": causal,
        "seqlen": seqlen,
        "batch": batch,
        "heads": heads,
    }
    try:
        fn = MAKERS[impl](causal)
        shape = (batch, seqlen, heads, head_dim)
        q, k, v = (
            torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=backward) for _ in range(3)
        )
        with torch.no_grad():
            fn(q, k, v)  # compile / build / warm
        with torch.no_grad():
            row["fwd_ms"] = bench_ms(lambda: fn(q, k, v))
        if backward:
            try:
                out = fn(q, k, v)
                grad = torch.randn_like(out)
                out.backward(grad, retain_graph=True)  # warm
                row["bwd_ms"] = bench_ms(
                    lambda: out.backward(grad, retain_graph=True), grad_to_none=[q, k, v]
                )
            except Exception as err:  # e.g. no backward kernel yet
                row["bwd_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    except Exception as err:
        row["error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {str(err)[:300]}"
    finally:
        torch.cuda.empty_cache()
    return with_tflops(row)


def run_memory(impl: str, seqlen: int) -> dict:
    """Extra peak memory of forward+backward beyond the inputs (batch 1, 16 heads, D 128)."""
    row = {"impl": impl, "seqlen": seqlen, "head_dim": 128, "heads": 16, "batch": 1}
    torch.cuda.empty_cache()
    try:
        fn = MAKERS[impl](False)
        q, k, v = (
            torch.randn(1, seqlen, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        grad = torch.randn_like(q)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(q, k, v).backward(grad)
        torch.cuda.synchronize()
        row["extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception as err:
        row["error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {str(err)[:300]}"
    finally:
        q = k = v = grad = None
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------
# output


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def plot(rows: list[dict], memory: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for phase in ("fwd", "bwd", "fwdbwd"):
        configs = sorted({(r["head_dim"], r["causal"]) for r in rows})
        if not any(f"{phase}_tflops" in r for r in rows):
            continue
        fig, axes = plt.subplots(1, len(configs), figsize=(4.5 * len(configs), 3.8), squeeze=False)
        for ax, (d, causal) in zip(axes[0], configs):
            impls = [i for i in ALL_IMPLS if any(r["impl"] == i for r in rows)]
            seqlens = sorted({r["seqlen"] for r in rows})
            width = 0.8 / max(1, len(impls))
            for n, impl in enumerate(impls):
                vals = []
                for s in seqlens:
                    match = [
                        r
                        for r in rows
                        if (r["impl"], r["head_dim"], r["causal"], r["seqlen"]) == (impl, d, causal, s)
                    ]
                    vals.append(match[0].get(f"{phase}_tflops", 0.0) if match else 0.0)
                ax.bar([x + n * width for x in range(len(seqlens))], vals, width, label=impl)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(seqlens))])
            ax.set_xticklabels([f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
            ax.set_title(f"{phase}, head dim {d}, {'causal' if causal else 'non-causal'}")
            ax.set_ylabel("TFLOP/s")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"attention_{phase}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if memory:
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for impl in sorted({r["impl"] for r in memory}):
            pts = [(r["seqlen"], r["extra_mib"]) for r in memory if r["impl"] == impl and "extra_mib" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("seqlen")
        ax.set_ylabel("extra MiB (fwd+bwd)")
        ax.legend()
        fig.tight_layout()
        path = out_dir / "attention_memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def round_ratios(a: dict, b: dict, phase: str) -> list[float]:
    """b's time over a's in each round of a case (speed-up of a over b), when both rows kept every
    round's time of `phase` ("fwd" / "bwd"); empty otherwise."""
    ta, tb = a.get(f"{phase}_ms_rounds", []), b.get(f"{phase}_ms_rounds", [])
    if len(ta) < 2 or not len(ta) == len(tb) == a.get("rounds") == b.get("rounds"):
        return []
    return [y / x for x, y in zip(ta, tb)]


def ratio_spread(a: dict, b: dict, phase: str) -> str:
    """'lowest-highest' of round_ratios, or '-'."""
    values = round_ratios(a, b, phase)
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def print_table(rows: list[dict]) -> None:
    """Ratios of longctx to sdpa flash and cuDNN per config (the stage-1 target lines); with rounds,
    also the lowest and highest per-round ratio to cuDNN."""
    by_key = {(r["impl"], r["head_dim"], r["causal"], r["seqlen"]): r for r in rows}
    print(
        f"{'impl':>12} {'D':>4} {'causal':>6} {'seqlen':>6} | {'fwd TF/s':>8} {'x fa2':>6} {'x cudnn':>7} "
        f"{'rounds':>9} | {'bwd TF/s':>8} {'x fa2':>6} {'x cudnn':>7} {'rounds':>9}"
    )
    for (impl, d, causal, s), r in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3])):
        if impl not in ("longctx", "longctx_sm80"):
            continue
        fa2, cudnn = (
            by_key.get(("sdpa_flash", d, causal, s), {}),
            by_key.get(("sdpa_cudnn", d, causal, s), {}),
        )

        def ratio(a: dict, b: dict, key: str) -> str:
            return f"{a[key] / b[key]:.2f}" if key in a and key in b else "-"

        def val(a: dict, key: str) -> str:
            return f"{a[key]:.0f}" if key in a else a.get("error", "-")[:8]

        cells = [f"{impl:>12} {d:>4} {causal!s:>6} {s:>6} |"]
        for phase in ("fwd", "bwd"):
            key = f"{phase}_tflops"
            spread = ratio_spread(r, cudnn, phase)
            cells.append(f"{val(r, key):>8} {ratio(r, fa2, key):>6} {ratio(r, cudnn, key):>7} {spread:>9} |")
        print(" ".join(cells)[:-2])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="head dims 64/128, seqlen 1k/4k/16k, main peers")
    parser.add_argument("--impls", nargs="+", choices=ALL_IMPLS)
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--seqlens", nargs="+", type=int)
    parser.add_argument("--causal", choices=list(CAUSAL_CHOICES), default="both")
    parser.add_argument("--no-bwd", action="store_true", help="forward only")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory sweep")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<device>)")
    parser.add_argument(
        "--merge", action="store_true", help="add to an existing attention.json (same keys replaced)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds per case, impls interleaved; the median is kept"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    impls = args.impls or (QUICK_IMPLS if args.quick else ALL_IMPLS)
    seqlens = args.seqlens or ((1024, 4096, 16384) if args.quick else SEQLENS)
    causals = CAUSAL_CHOICES[args.causal]
    out_dir = args.out or ROOT / "bench" / "results" / device_slug()
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for d in args.head_dims:
        for causal in causals:
            for s in seqlens:
                rounds: dict[str, list[dict]] = {impl: [] for impl in impls}
                for r in range(args.repeats):
                    for impl in round_impls(impls, r):
                        t0 = time.time()
                        row = run_speed(impl, d, causal, s, backward=not args.no_bwd)
                        rounds[impl].append(row)
                        msg = row.get("error") or (
                            f"fwd {row['fwd_tflops']:.0f} bwd {row.get('bwd_tflops', 0):.0f}"
                        )
                        tag = f" round {r + 1}" if args.repeats > 1 else ""
                        print(
                            f"{impl:>15} D={d} causal={causal} S={s}{tag}: {msg} ({time.time() - t0:.1f}s)",
                            flush=True,
                        )
                rows += [with_tflops(median_row(case)) for case in rounds.values()]
    memory = []
    if not args.no_memory:
        for impl in ("longctx", "standard"):
            for s in MEMORY_SEQLENS:
                memory.append(run_memory(impl, s))
                print(
                    f"memory {impl} S={s}: {memory[-1].get('extra_mib', memory[-1].get('error'))}", flush=True
                )
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "tokens": TOKENS,
        "hidden": HIDDEN,
        "timing": "triton.testing.do_bench median; with --repeats the median of the rounds (*_rounds)",
        "repeats": args.repeats,
    }
    path = out_dir / "attention.json"
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        rows = merge_rows(old["speed"], rows, ("impl", "head_dim", "causal", "seqlen"))
        memory = memory or old.get("memory", [])
    write_json(path, {"meta": meta, "speed": rows, "memory": memory})
    print("wrote", path, *plot(rows, memory, out_dir))
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
