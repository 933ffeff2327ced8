#!/usr/bin/env bash
# The one script the GPU machine runs (see kernels/README.md): build the kernels, read the
# compiler's register/spill report and the SASS, run the GPU tests, time the forward tile
# variants (kernels/tune), benchmark against the peers, run compute-sanitizer on a tiny case, and
# print a short table last. Everything worth keeping lands in $OUT (at most 8 files).
#
#   bash bench/gpu_check.sh [--quick] [--no-tests] [--no-bench] [--tune] [--no-sanitizer] [--no-train]
#                           [--pytest "ARGS"] [--bench "ARGS"] [--flex "BENCH ARGS"] [--ncu "PROFILE ARGS"]
#                           [--sparse "BLOCKSPARSE BENCH ARGS"] [--extra "COMMAND"]...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LONGCTX_BUILD_DIR=${LONGCTX_BUILD_DIR:-/tmp/longctx_build} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
LOG=$OUT/gpu_check.log
QUICK="" TESTS=1 BENCH=1 TUNE=0 SAN=1 TRAIN=1 NCU="" PYTEST_ARGS="" BENCH_ARGS="" FLEX="" SPARSE="-" EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK="--quick" ;;
    --no-tests) TESTS=0 ;;
    --no-bench) BENCH=0 ;;
    --tune) TUNE=1 ;;
    --no-sanitizer) SAN=0 ;;
    --no-train) TRAIN=0 ;;
    --pytest) PYTEST_ARGS=$2; shift ;;
    --bench) BENCH_ARGS=$2; shift ;;
    --flex) FLEX=$2; shift ;;  # e.g. --flex "--seqlens 1024 4096 16384"
    --ncu) NCU=$2; shift ;;    # bench/profile_fwd.py args, e.g. --ncu "--head-dim 128 --seqlen 1024"
    --sparse) SPARSE=$2; shift ;;  # bench/blocksparse.py args ("" = its full sweep)
    --extra) EXTRA+=("$2"); shift ;;  # any further command (run after the tests), e.g. another bench script
    *) echo "unknown option $1"; exit 2 ;;
  esac
  shift
done
step() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
SUMMARY=()

step "device"
nvidia-smi -L 2>&1 | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

if [ $TUNE = 1 ]; then  # compile the tile-variant harness while the extension builds
  for d in 64 128; do
    nvcc -O3 --use_fast_math -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DHDIM=$d -I kernels \
      kernels/tune/fwd_tune.cu -o /tmp/fwd_tune$d > /tmp/fwd_tune$d.log 2>&1 &
  done
fi

step "build"
t0=$(date +%s)
python3 -m longctx.ops.build 2>&1 | tail -5 | tee -a "$LOG"
BUILD=$(python3 -c "from longctx.ops import build; print(build.build_dir())")
cp "$BUILD/ptxas.log" "$OUT/ptxas.log" 2>/dev/null
SUMMARY+=("build: $(( $(date +%s) - t0 ))s, $(ls "$BUILD"/*.so 2>/dev/null | wc -l) .so")
python3 - "$OUT/ptxas.log" <<'PY' 2>&1 | tee -a "$LOG"
import re, sys
name = None
worst = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
    if m:
        name, arch = m.groups()
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        spill = int(m.group(1)) + int(m.group(2))
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        kind = "fwd" if "flash_fwd" in name else ("bwd" if "bwd" in name else "other")
        key = (kind, arch)
        regs = int(m.group(1))
        w = worst.setdefault(key, [0, 0, 0])
        w[0], w[1], w[2] = max(w[0], regs), w[1] + (spill > 0), w[2] + 1
        if spill:
            print(f"SPILL {arch} {spill}B {name[:140]}")
for (kind, arch), (regs, spills, n) in sorted(worst.items()):
    print(f"ptxas {kind} {arch}: {n} kernels, max {regs} registers, {spills} with spills")
PY
SO=$(ls "$BUILD"/*.so 2>/dev/null | head -1)
if [ -n "$SO" ] && command -v cuobjdump > /dev/null; then
  cuobjdump -sass "$SO" > /tmp/sass.txt 2>/dev/null
  python3 - <<'PY' 2>&1 | tee -a "$LOG"
import re
counts, name = {}, None
for line in open("/tmp/sass.txt", errors="replace"):
    m = re.search(r"Function : (\S+)", line)
    if m:
        name = m.group(1)
        counts[name] = {k: 0 for k in ("HMMA", "HGMMA", "LDSM", "LDGSTS", "LDL", "STL", "MUFU.EX2")}
    elif name:
        for k in counts[name]:
            if re.search(r"\b" + re.escape(k) + r"\b", line):
                counts[name][k] += 1
for n, c in counts.items():
    if "flash_fwd_kernel" in n and "FwdTraitsILi128" in n and "__nv_bfloat16" in n:
        print("sass", n[:90], c)
fwd = [c for n, c in counts.items() if "flash_fwd_kernel" in n]
hopper = [c for n, c in counts.items() if "sm90_kernel" in n]  # the attention kernels (not the dQ conversion)
print(f"sass Hopper kernels: {len(hopper)}; all with HGMMA: {all(c['HGMMA'] for c in hopper)}; "
      f"any LDL/STL: {any(c['LDL'] or c['STL'] for c in hopper)}")
print(f"sass fwd kernels: {len(fwd)}; all with HMMA/LDSM/LDGSTS: "
      f"{all(c['HMMA'] and c['LDSM'] and c['LDGSTS'] for c in fwd)}; any LDL/STL: {any(c['LDL'] or c['STL'] for c in fwd)}")
PY
fi

if [ $TESTS = 1 ]; then
  step "tests"
  tests=tests/ops/test_flash_gpu.py
  [ -f tests/ops/test_flash_bwd_gpu.py ] && tests="$tests tests/ops/test_flash_bwd_gpu.py"
  [ -f tests/ops/test_blocksparse_gpu.py ] && tests="$tests tests/ops/test_blocksparse_gpu.py"
  [ -f tests/ops/test_cross_entropy.py ] && tests="$tests tests/ops/test_cross_entropy.py"
  timeout 400 python3 -m pytest -q -p no:cacheprovider $tests $PYTEST_ARGS > "$OUT/pytest.log" 2>&1
  tail -40 "$OUT/pytest.log" | tee -a "$LOG"
  SUMMARY+=("tests: $(tail -1 "$OUT/pytest.log")")
fi

if [ $TUNE = 1 ]; then
  step "tune"
  wait
  for d in 64 128; do
    grep -E "error" /tmp/fwd_tune$d.log | head -5 | tee -a "$LOG"
    [ -x /tmp/fwd_tune$d ] && timeout 120 /tmp/fwd_tune$d 2>&1 | tee -a "$LOG"
  done
fi

if [ $BENCH = 1 ]; then
  step "bench"
  timeout 420 python3 bench/attention.py $QUICK --out "$OUT" $BENCH_ARGS 2>&1 | tee -a "$LOG" > /tmp/bench.log
  if [ -n "$FLEX" ]; then  # compiled FlexAttention: one compile per shape, so a shorter sweep
    step "bench flex"
    timeout 400 python3 bench/attention.py --merge --impls flex --no-memory --out "$OUT" $FLEX 2>&1 \
      | tee -a "$LOG" > /tmp/bench.log
  fi
fi

if [ "$SPARSE" != "-" ]; then
  step "bench blocksparse $SPARSE"
  timeout 500 python3 bench/blocksparse.py --out "$OUT" $SPARSE 2>&1 | tee -a "$LOG" > /tmp/sparse.log
  SUMMARY+=("blocksparse bench: $(grep -c ms /tmp/sparse.log) lines (table at the end)")
fi

for cmd in "${EXTRA[@]}"; do
  step "extra: $cmd"
  bash -c "$cmd" 2>&1 | tee -a "$LOG" | tail -40
  SUMMARY+=("extra rc=${PIPESTATUS[0]}: $cmd")
done

if [ -n "$NCU" ] && command -v ncu > /dev/null; then  # longctx vs sdpa's FA2, same shape, key sections
  step "ncu $NCU"
  timeout 300 ncu --kernel-name regex:flash_fwd --launch-skip 2 --launch-count 2 --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
    --section LaunchStats --section MemoryWorkloadAnalysis python3 bench/profile_fwd.py $NCU 2>&1 \
    | grep -vE "^\s*(-+|=+)\s*$|^==PROF==|^\s*$|OPT |INF " | cut -c1-150 | tee -a "$LOG" > /dev/null
fi

if [ $SAN = 1 ] && command -v compute-sanitizer > /dev/null; then
  # Forward and backward (atomic and deterministic dQ), dropout, GQA, odd lengths, varlen.
  cat > /tmp/san_case.py <<'PY'
import torch
from longctx.ops import flash
torch.manual_seed(0)
def run(q, k, v, **kw):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    flash.flash_attention(q, k, v, **kw).float().square().sum().backward()
for d, causal, sq, sk, det in ((64, True, 97, 203, False), (80, False, 130, 65, True), (128, True, 160, 96, False)):
    q = torch.randn(1, sq, 4, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, sk, 2, d, device="cuda", dtype=torch.bfloat16)
    run(q, k, k.clone(), causal=causal, dropout_p=0.1 if d == 64 else 0.0, deterministic=det)
cu = torch.tensor([0, 5, 100, 133], dtype=torch.int32, device="cuda")
for d in (32, 64, 128):  # stage-1 and Hopper kernels (sequence ends inside tiles: rows zeroed)
    q = torch.randn(133, 4, d, device="cuda", dtype=torch.float16)
    run(q, q, q, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=95, max_seqlen_k=95)
from longctx.ops.blocksparse import block_mask_from_pattern  # block-sparse forward + backward
q = torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16)
for det in (False, True):
    run(q, q, q, causal=True, deterministic=det, block_mask=block_mask_from_pattern("local:1", 300, 300, device="cuda"))
torch.cuda.synchronize()
print("sanitizer case done")
PY
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool (tiny forward + backward cases)"
    timeout 300 compute-sanitizer --tool $tool --error-exitcode 3 python3 /tmp/san_case.py > /tmp/san.log 2>&1
    rc=$?
    tail -4 /tmp/san.log | tee -a "$LOG"
    SUMMARY+=("compute-sanitizer $tool: rc=$rc, $(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/san.log)")
  done
fi

if [ $TRAIN = 1 ]; then  # end to end: GPT-2 small on the flash kernels in bf16-mixed (default attn=auto)
  step "train: GPT-2 small, seqlen 1024, 40 steps, attn=auto"
  timeout 400 python3 train.py model=gpt2 seqlen=1024 data.batch_size=16 data.num_workers=4 \
    trainer.max_steps=40 trainer.val_every_n_steps=40 trainer.limit_val_batches=4 trainer.log_every_n_steps=10 \
    trainer.ckpt_every_n_steps=1000 trainer.progress_bar=false run_dir=/tmp/gpu_train > /tmp/train.log 2>&1
  rc=$?
  grep -E "tokens_per_s|perplexity" /tmp/gpu_train/metrics.jsonl /tmp/train.log 2>/dev/null | tail -4 | tee -a "$LOG"
  [ $rc = 0 ] || tail -20 /tmp/train.log | tee -a "$LOG"
  SUMMARY+=("train GPT-2 small (flash, bf16-mixed): rc=$rc, $(grep -o '"train/tokens_per_s": [0-9.]*' /tmp/gpu_train/metrics.jsonl 2>/dev/null | tail -1)")
fi

step "summary"
for s in "${SUMMARY[@]}"; do echo "$s" | tee -a "$LOG"; done
grep -E "^ptxas|^sass (fwd|Hopper)" "$LOG" | tail -7
[ -f /tmp/bench.log ] && sed -n '/ impl  *D causal/,$p' /tmp/bench.log
[ -f /tmp/sparse.log ] && sed -n '/^   D      S/,$p' /tmp/sparse.log
exit 0
