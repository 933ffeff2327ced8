#!/usr/bin/env bash
# LRA ListOps: train several configurations at once on one GPU, then evaluate each on val, test and a
# larger fresh test set.
#
#   bash bench/lra_listops_sweep.sh OUT_DIR [OVERRIDE ...]
#
# Each line of RUNS below is one run: a name, then its train.py arguments. The OVERRIDEs given on the
# command line are appended to every run (and to the data check), e.g. trainer.max_steps=2 for a smoke test;
# SWEEP_RUNS="NAME ..." runs only the named lines.
# The runs are tiny (2 layers, width 64: about 0.3 GiB of GPU memory each), so they share the GPU; they
# run concurrently, each in its own run directory OUT_DIR/NAME/run, its log in OUT_DIR/NAME/train.log and
# OUT_DIR/NAME/eval.log, and its eval.py result (val and test of checkpoints/last.ckpt) in
# OUT_DIR/NAME/eval.json. The 2000-example test split has a standard error of about 1 point, so the same
# checkpoint is also evaluated on a larger fresh test set: the same generator with another gen_seed,
# FRESH_TEST="GEN_SEED:COUNT" examples (default 1:20000; FRESH_TEST="" skips it), i.e.
#   eval.py splits=[test] data.gen_seed=GEN_SEED data.n_train=0 data.n_val=0 data.n_test=COUNT
# into OUT_DIR/NAME/eval_fresh.json (log: eval_fresh.log; its "fresh_test" field records GEN_SEED:COUNT).
# At the end: one line per run (name, step, val, test and fresh-test accuracy, arguments), also written
# to OUT_DIR/summary.tsv. Checkpoints are deleted after the evaluations (LONGCTX_KEEP_CKPT=1 keeps
# them), so OUT_DIR holds only small files. Run again with the same OUT_DIR, the sweep skips the runs that
# have eval.json (and eval_fresh.json) and resumes the others from their last checkpoint (saved every
# trainer.ckpt_every_n_steps).
#
# The generated ListOps data is cached under the data root (data/cache/lra/, or $LONGCTX_DATA); the runs
# would each generate it if it were missing (written atomically, so no corruption, but wasted CPU), so
# every run's data, and its fresh test set, is generated or found first, one run at a time, before any
# training starts. The fresh set has a cache file of its own (gen_seed and the split sizes are in the key).
set -euo pipefail

RUNS=(
  "preln-lr1e-4  experiment=lra-listops-preln task.lr=1e-4"
  "preln-lr5e-4  experiment=lra-listops-preln task.lr=5e-4"
  "preln-lr1e-3  experiment=lra-listops-preln task.lr=1e-3"
  "postln-lr1e-3-seed1  experiment=lra-listops task.lr=1e-3 seed=1"
  # The runs of bench/results/*/lra_listops_sweep/summary_seed{2,3}.tsv (run there as preln-lr5e-4 and
  # preln-lr1e-3 with the common override seed=N); the lines without seed= use the default, 1337.
  "preln-lr5e-4-seed2  experiment=lra-listops-preln task.lr=5e-4 seed=2"
  "preln-lr1e-3-seed2  experiment=lra-listops-preln task.lr=1e-3 seed=2"
  "preln-lr5e-4-seed3  experiment=lra-listops-preln task.lr=5e-4 seed=3"
  "preln-lr1e-3-seed3  experiment=lra-listops-preln task.lr=1e-3 seed=3"
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
fresh_test=${FRESH_TEST-1:20000}  # unset: the default; set but empty: no fresh test set
fresh=()  # the eval.py overrides that turn a run's data into the fresh test set
if [[ -n $fresh_test ]]; then
  [[ $fresh_test =~ ^([0-9]+):([1-9][0-9]*)$ ]] ||
    { echo "FRESH_TEST=$fresh_test: expected GEN_SEED:COUNT (e.g. 1:20000), or empty for none" >&2; exit 2; }
  fresh=("data.gen_seed=${BASH_REMATCH[1]}" data.n_train=0 data.n_val=0 "data.n_test=${BASH_REMATCH[2]}")
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
shift
common=("$@")
cd "$(dirname "$0")/.."  # train.py and eval.py are at the repository root
python=${PYTHON:-python3}
start=$SECONDS

# Generate (or find) the cache of the data that these train.py arguments select and, with FRESH_TEST, of
# the fresh test set as eval.py will build it: the run's config (its arguments, then the common
# overrides), then the fresh overrides. Runs with the same generator limits share the cache files.
prepare_data() {
  "$python" -c '
import sys
from longctx.config import ConfigError, compose
from longctx.data import build_datamodule
n_fresh, args = int(sys.argv[1]), sys.argv[2:]
try:
    build_datamodule(compose(args[:len(args) - n_fresh])).prepare_data()
    if n_fresh:
        build_datamodule(compose(args)).prepare_data()
except (ConfigError, ValueError, FileNotFoundError) as err:
    sys.exit(f"error: {err}")
' "${#fresh[@]}" "$@" "${fresh[@]}"
}

echo "== data: generating or finding the cache of each run's data${fresh_test:+ and fresh test set}," \
  "one run at a time"
for run in "${RUNS[@]}"; do
  read -r -a words <<<"$run"
  prepare_data "${words[@]:1}" "${common[@]}"
done
echo "data ready after $((SECONDS - start)) s"

if "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "== building the CUDA kernels once (for attn=flash), before the runs start"
  "$python" -m longctx.ops.build 2>&1 | tail -3 ||
    echo "warning: the kernel build failed; runs with attn=flash will fail (model.attn=standard avoids" \
      "the kernels, about 5x slower; sdpa has no padding-free path)" >&2
fi

# One run: train, then evaluate its last checkpoint on val and test (eval.py writes eval.json) and on the
# fresh test set (eval_fresh.json). A run that has both is done and skipped; one with a checkpoint but no
# eval.json (the sweep was killed) resumes from it, with the config it started with; one with eval.json
# and its checkpoint but no eval_fresh.json is only evaluated on the fresh set.
train_and_eval() {
  local dir=$out/$1
  shift
  mkdir -p "$dir"
  local ckpt=$dir/run/checkpoints/last.ckpt
  if [[ -f $dir/eval.json && (${#fresh[@]} -eq 0 || -f $dir/eval_fresh.json) ]]; then
    echo "$dir: done already"
    return 0
  fi
  if [[ ! -f $dir/eval.json ]]; then
    local args=("$@" "${common[@]}" run_dir="$dir/run")
    if [[ -f $ckpt ]]; then
      echo "$dir: resuming from its last checkpoint"
      args=(resume=true run_dir="$dir/run")
    else
      rm -rf "$dir/run"  # a run killed before its first checkpoint starts afresh
    fi
    "$python" train.py "${args[@]}" trainer.progress_bar=false >>"$dir/train.log" 2>&1 ||
      { echo "training failed: see $dir/train.log" >&2; return 1; }
    "$python" eval.py ckpt="$ckpt" "splits=[val,test]" out="$dir/eval.json" \
      trainer.progress_bar=false >"$dir/eval.log" 2>&1 ||
      { echo "evaluation failed: see $dir/eval.log" >&2; return 1; }
  fi
  if [[ ${#fresh[@]} -gt 0 ]]; then
    [[ -f $ckpt ]] || { echo "$dir: has eval.json but no checkpoint left for the fresh test set (deleted by" \
      "an earlier sweep; LONGCTX_KEEP_CKPT=1 keeps checkpoints)" >&2; return 1; }
    # Written under a temporary name and renamed once it records FRESH_TEST: eval_fresh.json is complete.
    "$python" eval.py ckpt="$ckpt" "splits=[test]" "${fresh[@]}" out="$dir/.eval_fresh.json" \
      trainer.progress_bar=false >"$dir/eval_fresh.log" 2>&1 ||
      { echo "fresh-test evaluation failed: see $dir/eval_fresh.log" >&2; return 1; }
    "$python" -c '
import json, sys
from pathlib import Path
path = Path(sys.argv[1])
path.write_text(json.dumps({**json.loads(path.read_text()), "fresh_test": sys.argv[2]}, indent=2) + "\n")
' "$dir/.eval_fresh.json" "$fresh_test"
    mv "$dir/.eval_fresh.json" "$dir/eval_fresh.json"
  fi
  [[ ${LONGCTX_KEEP_CKPT:-0} == 1 ]] || rm -rf "$dir/run/checkpoints"
}

echo "== training and evaluating ${#RUNS[@]} runs concurrently (logs: $out/NAME/train.log," \
  "eval.log${fresh_test:+, eval_fresh.log})"
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

echo "== results after $((SECONDS - start)) s (accuracy of checkpoints/last.ckpt; common overrides:" \
  "${common[*]:-none}; fresh test set GEN_SEED:COUNT ${fresh_test:-none})"
"$python" - "$out" "$fresh_test" "${RUNS[@]}" <<'EOF' | tee "$out/summary.tsv"
import json
import sys
from pathlib import Path

out, fresh_test = Path(sys.argv[1]), sys.argv[2]


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def fresh_accuracy(result: dict) -> str:
    if not fresh_test:
        return "-"
    if "test_accuracy" not in result:
        return "failed"
    if result.get("fresh_test") != fresh_test:  # left by an earlier sweep with another FRESH_TEST
        return f"other-set-{result.get('fresh_test')}"
    return f"{result['test_accuracy']:.4f}"


print("name\tstep\tval_acc\ttest_acc\tfresh_test_accuracy\targuments")
for run in sys.argv[3:]:
    name, *args = run.split()
    result = load(out / name / "eval.json")
    accuracy = {split: f"{result[f'{split}_accuracy']:.4f}" if f"{split}_accuracy" in result else "failed"
                for split in ("val", "test")}
    fresh = fresh_accuracy(load(out / name / "eval_fresh.json"))
    print(f"{name}\t{result.get('step', '-')}\t{accuracy['val']}\t{accuracy['test']}\t{fresh}\t{' '.join(args)}")
EOF
exit "$failed"
