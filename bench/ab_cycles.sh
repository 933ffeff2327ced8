#!/usr/bin/env bash
# A / B of one kernel's cycles at Nsight Compute's locked clocks, across source trees.
#
# Under the board's power limit do_bench times move by about ±4% between rounds and machines (the SM
# clock follows the power draw); ncu locks the clocks, so two rounds of the same kernel agree within
# ~0.3% and changes of 1% can be read (kernels/NOTES_sm90.md, session 10).
#
#   git archive <rev> kernels src bench | tar -x -C /tmp/base      # a tree per variant
#   bash bench/ab_cycles.sh dkdv_sm90 2 /tmp/base .                  # the dK/dV kernel, two rounds
#   CASES="128 2048|64 4096 --causal" BACKWARD=0 bash bench/ab_cycles.sh flash_fwd_sm90 3 /tmp/base .
#
# Each tree is built into its own LONGCTX_BUILD_DIR, then each case runs bench/profile_fwd.py of that
# tree (head dim, seqlen and its flags from CASES, + --backward unless BACKWARD=0) under ncu; the
# variants alternate within a round. Prints one line per (round, case, tree): sm__cycles_elapsed.avg.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash bench/ab_cycles.sh KERNEL_REGEX ROUNDS TREE [TREE...]" >&2
  exit 2
fi
kernel=$1 rounds=$2
shift 2
trees=("$@")
IFS='|' read -r -a cases <<< "${CASES:-128 2048|128 8192|128 2048 --causal}"
extra=$([ "${BACKWARD:-1}" = 0 ] || echo --backward)
site=${LONGCTX_SITE:-}  # extra PYTHONPATH entries (the device's wheels), if any

for i in "${!trees[@]}"; do
  t=$(cd "${trees[$i]}" && pwd)
  (PYTHONPATH=$site:$t/src LONGCTX_BUILD_DIR=/tmp/ab_cycles_build_$i MAX_JOBS=${MAX_JOBS:-6} \
    python3 -m longctx.ops.build > /tmp/ab_cycles_build_$i.log 2>&1 || echo "build of ${trees[$i]} failed" >&2) &
done
wait

for r in $(seq "$rounds"); do
  for c in "${cases[@]}"; do
    read -r -a args <<< "$c"
    for i in "${!trees[@]}"; do
      t=$(cd "${trees[$i]}" && pwd)
      cycles=$(PYTHONPATH=$site:$t/src LONGCTX_BUILD_DIR=/tmp/ab_cycles_build_$i timeout 180 \
        ncu --profile-from-start off --kernel-name "regex:$kernel" --metrics sm__cycles_elapsed.avg \
        python3 "$t/bench/profile_fwd.py" --head-dim "${args[0]}" --seqlen "${args[1]}" "${args[@]:2}" $extra 2>&1 |
        awk '/sm__cycles_elapsed.avg/ {print $NF}' | tr '\n' ' ')
      echo "round $r | D${args[0]} S${args[1]} ${args[*]:2} | ${trees[$i]} | cycles ${cycles:-none}"
    done
  done
done
