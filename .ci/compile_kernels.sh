#!/usr/bin/env bash
# CI's kernel check (nvcc, no GPU): compile every kernels/*.cu for sm_80 and sm_90a with
# -Xptxas -v; fail on a compile error or on any register spill in the forward/backward kernels.
# binding.cpp needs torch's CUDA headers and is compiled on the GPU machine only.
#   bash .ci/compile_kernels.sh [-j N]
set -uo pipefail
cd "$(dirname "$0")/.."
JOBS=$(nproc)
[ "${1:-}" = "-j" ] && JOBS=$2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FLAGS="-c -O3 --use_fast_math -std=c++17 -Xptxas -v -Ikernels"
ARCHS=("-gencode=arch=compute_80,code=sm_80" "-gencode=arch=compute_90a,code=sm_90a")

compile() {  # $1 = source, $2 = arch flag, $3 = log
  nvcc $FLAGS "$2" "$1" -o "$WORK/$(basename "$1").$RANDOM.o" > "$3" 2>&1
  echo $? >> "$3.rc"
}
export -f compile
export FLAGS WORK

n=0
for src in kernels/*.cu; do
  for arch in "${ARCHS[@]}"; do
    log="$WORK/$(basename "$src").${arch##*code=}.log"
    compile "$src" "$arch" "$log" &
    n=$((n + 1))
    if (( n % JOBS == 0 )); then wait; fi
  done
done
wait

status=0
for log in "$WORK"/*.log; do
  if [ "$(cat "$log.rc")" != 0 ]; then
    echo "FAILED: $(basename "$log" .log)"
    grep -E "error" "$log" | head -20
    status=1
  fi
done
# Spills: per kernel entry, "N bytes spill stores, M bytes spill loads" must be 0 / 0.
python3 - "$WORK" <<'PY' || status=1
import glob, re, sys
bad, kernels = [], 0
for path in sorted(glob.glob(sys.argv[1] + "/*.log")):
    name = None
    for line in open(path, errors="replace"):
        m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if m:
            name = m.group(1) + " [" + m.group(2) + "]"
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name and ("flash_fwd" in name or "bwd" in name):
            kernels += 1
            if int(m.group(1)) or int(m.group(2)):
                bad.append(f"{name}: {m.group(0)}")
print(f"checked {kernels} forward/backward kernel compilations for spills")
for b in bad:
    print("SPILL", b)
sys.exit(1 if bad else 0)
PY
[ $status = 0 ] && echo "kernels OK" || echo "kernels FAILED"
exit $status
