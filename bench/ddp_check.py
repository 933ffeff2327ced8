"""Two-GPU check of issue 8 (run on nvidia-h200-x2): DDP matches one GPU, scales, and FSDP trains gpt2-xl.

(a) GPT-2 small at seqlen 1024 trained twice from the same seed with the same global batch
    (16 sequences a step): on one GPU (micro-batch 8, accumulation 2) and with DDP on two
    (micro-batch 8 per GPU). The loss curves are compared after a moving average; "within noise"
    means the largest gap between the two smoothed curves is at most three times the one-GPU run's
    own scatter around its smoothed curve (the logged losses are of different micro-batches of
    the same steps: the last on one GPU, rank 0's under DDP). Validation losses (same batches, same steps)
    are compared too, and the DDP / one-GPU tokens/s ratio (target >= 1.8).
(b) GPT-2 XL at seqlen 4096 with FSDP2 (experiment gpt2-xl-4k-fsdp) on both GPUs for a few steps:
    tokens/s, MFU and peak memory.

Writes <out>/ddp_check.json (the summary) and each run's metrics as <out>/ddp_check_<run>.jsonl.
Default out: bench/results/<device>/.

    python bench/ddp_check.py            # GPU: ~4-5 minutes on 2 x H200 (kernel build included)
    python bench/ddp_check.py --quick    # CPU smoke run: gpt2-tiny on 2 gloo processes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_SPEEDUP = 1.8


def runs(quick: bool, steps: int) -> dict[str, list[str]]:
    """train.py arguments of the three runs."""
    if quick:
        small = ["model=gpt2-tiny", "seqlen=64", "data.batch_size=4", "trainer.global_batch_size=8",
                 "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.log_every_n_steps=1",
                 f"trainer.val_every_n_steps={steps // 2}", "trainer.limit_val_batches=2"]
        xl = ["model=gpt2-tiny", "seqlen=64", "data.batch_size=4", "trainer=fsdp", "trainer.accelerator=cpu",
              "trainer.devices=2", "trainer.precision=32-true", "trainer.global_batch_size=8",
              "trainer.log_every_n_steps=1", "trainer.max_steps=3"]
    else:
        small = ["model=gpt2", "seqlen=1024", "model.dropout=0.0", "model.attn=flash", "data.batch_size=8",
                 "data.num_workers=2", "trainer.global_batch_size=16", "task.lr=6e-4", "task.warmup_steps=20",
                 "trainer.log_every_n_steps=5", f"trainer.val_every_n_steps={steps // 3}",
                 "trainer.limit_val_batches=8"]
        xl = ["experiment=gpt2-xl-4k-fsdp", "data=shakespeare", "seqlen=4096", "data.batch_size=4",
              "data.num_workers=2", "trainer.devices=2", "trainer.global_batch_size=16",
              "trainer.max_steps=12", "trainer.log_every_n_steps=3", "trainer.limit_val_batches=2"]
    common = [f"trainer.max_steps={steps}", "trainer.ckpt_every_n_steps=100000", "trainer.progress_bar=false"]
    one_gpu = [] if quick else ["trainer=gpu"]
    return {
        "one": [*one_gpu, *small, *common, "trainer.devices=1"],
        "two": [*small, *common, "trainer.strategy=ddp", "trainer.devices=2"]
        + ([] if quick else ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"]),
        "fsdp": [*xl, "trainer.ckpt_every_n_steps=100000", "trainer.progress_bar=false",
                 "trainer.val_every_n_steps=100000"],
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def series(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    """step -> value (the last line for a step wins)."""
    return {r["step"]: r[key] for r in rows if key in r}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (shorter at the start)."""
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def compare(one: list[dict[str, Any]], two: list[dict[str, Any]], window: int) -> dict[str, Any]:
    """Loss curves and throughput of the one-device and the DDP run."""
    a, b = series(one, "train/loss"), series(two, "train/loss")
    steps = sorted(set(a) & set(b))
    sa, sb = smooth([a[s] for s in steps], window), smooth([b[s] for s in steps], window)
    gap = max((abs(x - y) for x, y in zip(sa[window:], sb[window:])), default=float("nan"))
    scatter = statistics.pstdev([a[s] - m for s, m in zip(steps, sa)][window:] or [0.0])
    va, vb = series(one, "val/loss"), series(two, "val/loss")
    val_gaps = {s: abs(va[s] - vb[s]) for s in sorted(set(va) & set(vb))}

    def rate(rows: list[dict[str, Any]]) -> float:
        values = list(series(rows, "train/tokens_per_s").values())[1:]  # the first window holds warmup
        return statistics.median(values) if values else float("nan")

    speedup = rate(two) / rate(one)
    return {"steps_compared": len(steps), "smoothing_window": window,
            "max_abs_diff_smoothed_loss": gap, "one_device_loss_scatter": scatter,
            "losses_within_noise": gap <= 3 * scatter, "val_loss_abs_diff": val_gaps,
            "tokens_per_s_one": rate(one), "tokens_per_s_two": rate(two), "speedup": speedup,
            "speedup_target": TARGET_SPEEDUP, "speedup_ok": speedup >= TARGET_SPEEDUP}


def run_command(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int | str, str]:
    """(exit status or "timeout", stderr); on timeout the whole process group is killed, the
    ranks that Lightning launched included."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        return "timeout", stderr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of the DDP comparison")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run (gloo, gpt2-tiny)")
    parser.add_argument("--only", nargs="+", choices=["one", "two", "fsdp"], help="run only these")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<device>)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed to each run")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 6)
    import torch
    from training import device_slug

    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    out = args.out or ROOT / "bench" / "results" / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("DDP_CHECK_WORK", "/tmp/ddp_check_runs"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    summary: dict[str, Any] = {"device": device_name, "runs": {}}
    metrics = {}
    for name, extra in runs(args.quick, args.steps).items():
        if args.only and name not in args.only:
            continue
        run_dir = work / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        cmd = [sys.executable, str(ROOT / "train.py"), *extra, f"run_dir={run_dir}"]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc, stderr = run_command(cmd, env, args.timeout)
        metrics[name] = read_metrics(run_dir / "metrics.jsonl")
        (out / f"ddp_check_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics[name]))
        last = {k: v for r in metrics[name] for k, v in r.items() if k != "step"}
        summary["runs"][name] = {"rc": rc, "wall_s": time.perf_counter() - start,
                                 "args": extra, **{k: last.get(k) for k in (
                                     "train/tokens_per_s", "train/mfu", "train/tflops_per_device",
                                     "train/peak_mem_gib", "train/loss", "val/loss")}}
        print(json.dumps(summary["runs"][name]), flush=True)
        if rc:
            print(stderr[-3000:], flush=True)
        if name == "two" and "one" in metrics:
            summary["ddp_vs_one"] = compare(metrics["one"], metrics["two"], window=5)
            print(json.dumps(summary["ddp_vs_one"], indent=1))
        write_summary(summary, out / "ddp_check.json")  # after every run: a later hang loses nothing


def write_summary(summary: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
