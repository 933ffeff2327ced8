#!/usr/bin/env bash
# LRA ListOps: train several configurations at once on one GPU, then evaluate each on val and test.
#
#   bash bench/lra_listops_sweep.sh OUT_DIR [OVERRIDE ...]
#
# Each line of RUNS below is one run: a name, then its train.py arguments. The OVERRIDEs given on the
# command line are appended to every run (and to the data check), e.g. trainer.max_steps=2 for a smoke test;
# SWEEP_RUNS="NAME ..." runs only the named lines.
# The runs are tiny (2 layers, width 64: about 0.3 GiB of GPU memory each), so they share the GPU; they
# run concurrently, each in its own run directory OUT_DIR/NAME/run, its log in OUT_DIR/NAME/train.log and
# OUT_DIR/NAME/eval.log, and its eval.py result (val and test of checkpoints/last.ckpt) in
# OUT_DIR/NAME/eval.json. At the end: one line per run (name, arguments, val and test accuracy), also
# written to OUT_DIR/summary.tsv. Checkpoints are deleted after the evaluation (LONGCTX_KEEP_CKPT=1 keeps
# them), so OUT_DIR holds only small files. Run again with the same OUT_DIR, the sweep skips the runs that
# have eval.json and resumes the others from their last checkpoint (saved every trainer.ckpt_every_n_steps).
#
# The generated ListOps data is cached under the data root (data/cache/lra/, or $LONGCTX_DATA); the runs
# would each generate it if it were missing (written atomically, so no corruption, but wasted CPU), so
# every run's data is generated or found first, one run at a time, before any training starts.
set -euo pipefail

RUNS=(
  "preln-lr1e-4  experiment=lra-listops-preln task.lr=1e-4"
  "preln-lr5e-4  experiment=lra-listops-preln task.lr=5e-4"
  "preln-lr1e-3  experiment=lra-listops-preln task.lr=1e-3"
  "postln-lr1e-3-seed1  experiment=lra-listops task.lr=1e-3 seed=1"
)

if [[ -n ${SWEEP_RUNS:-} ]]; then  # e.g. SWEEP_RUNS="preln-lr1e-4 preln-lr5e-4": only these names
  picked=()
  for run in "${RUNS[@]}"; do
    if [[ " $SWEEP_RUNS " == *" ${run%% *} "* ]]; then picked+=("$run"); fi
  done
  [[ ${#picked[@]} -gt 0 ]] || { echo "SWEEP_RUNS=$SWEEP_RUNS names none of the runs in RUNS" >&2; exit 2; }
  RUNS=("${picked[@]}")
fi
if [[ $# -lt 1 ]]; then
  echo "usage: bash $0 OUT_DIR [OVERRIDE ...]   (e.g. trainer.max_steps=2)" >&2
  exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
shift
common=("$@")
cd "$(dirname "$0")/.."  # train.py and eval.py are at the repository root
python=${PYTHON:-python3}
start=$SECONDS

echo "== data: generating or finding the cache of each run's data, one run at a time"
for run in "${RUNS[@]}"; do
  read -r -a words <<<"$run"
  "$python" -c '
import sys
from longctx.config import ConfigError, compose
from longctx.data import build_datamodule
try:
    build_datamodule(compose(sys.argv[1:])).prepare_data()
except (ConfigError, ValueError, FileNotFoundError) as err:
    sys.exit(f"error: {err}")
' "${words[@]:1}" "${common[@]}"
done
echo "data ready after $((SECONDS - start)) s"

if "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "== building the CUDA kernels once (for attn=flash), before the runs start"
  "$python" -m longctx.ops.build 2>&1 | tail -3 ||
    echo "warning: the kernel build failed; runs with attn=flash will fail (model.attn=standard avoids" \
      "the kernels, about 5x slower; sdpa has no padding-free path)" >&2
fi

# One run: train, then evaluate its last checkpoint on val and test (eval.py writes eval.json). A run
# that has eval.json is done and skipped; one with a checkpoint but no eval.json (the sweep was killed)
# resumes from it, with the config it started with.
train_and_eval() {
  local dir=$out/$1
  shift
  mkdir -p "$dir"
  if [[ -f $dir/eval.json ]]; then
    echo "$dir: done already (eval.json)"
    return 0
  fi
  local args=("$@" "${common[@]}" run_dir="$dir/run")
  if [[ -f $dir/run/checkpoints/last.ckpt ]]; then
    echo "$dir: resuming from its last checkpoint"
    args=(resume=true run_dir="$dir/run")
  else
    rm -rf "$dir/run"  # a run killed before its first checkpoint starts afresh
  fi
  "$python" train.py "${args[@]}" trainer.progress_bar=false >>"$dir/train.log" 2>&1 ||
    { echo "training failed: see $dir/train.log" >&2; return 1; }
  "$python" eval.py ckpt="$dir/run/checkpoints/last.ckpt" "splits=[val,test]" out="$dir/eval.json" \
    trainer.progress_bar=false >"$dir/eval.log" 2>&1 ||
    { echo "evaluation failed: see $dir/eval.log" >&2; return 1; }
  [[ ${LONGCTX_KEEP_CKPT:-0} == 1 ]] || rm -rf "$dir/run/checkpoints"
}

echo "== training and evaluating ${#RUNS[@]} runs concurrently (logs: $out/NAME/train.log, eval.log)"
pids=()
for run in "${RUNS[@]}"; do
  read -r -a words <<<"$run"
  train_and_eval "${words[@]}" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do
  wait "$pid" || failed=1
done

echo "== results after $((SECONDS - start)) s (accuracy of checkpoints/last.ckpt; common overrides: ${common[*]:-none})"
"$python" - "$out" "${RUNS[@]}" <<'EOF' | tee "$out/summary.tsv"
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
print("name\tstep\tval_acc\ttest_acc\targuments")
for run in sys.argv[2:]:
    name, *args = run.split()
    path = out / name / "eval.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    accuracy = {split: f"{result[f'{split}_accuracy']:.4f}" if f"{split}_accuracy" in result else "failed"
                for split in ("val", "test")}
    print(f"{name}\t{result.get('step', '-')}\t{accuracy['val']}\t{accuracy['test']}\t{' '.join(args)}")
EOF
exit "$failed"
