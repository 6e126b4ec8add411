#!/usr/bin/env bash
# Everything the Performance appendix needs from a GPU, in one device call (run as
#   bash .gpu/run.sh bash benchmarks/gpu_run.sh
# after `bash ../shared/gpu/prepare.sh higher`). Results land in $OUT (or benchmarks/results).
#
# One call may run 10 minutes; the parts run most informative first, each cut to what is left of
# BUDGET seconds (default 560), and every script writes its JSON as it goes, so a part that runs
# out of time still leaves its finished rows. It writes 7 files (the device tool brings back at most
# 8): one log, five JSON files and the memory plot.
set -u
out=${OUT:-benchmarks/results}
mkdir -p "$out"
deadline=$(( $(date +%s) + ${BUDGET:-560} ))

part() {  # part SECONDS NAME COMMAND...: run COMMAND for at most SECONDS (less if the budget is short)
  local limit=$1 name=$2
  shift 2
  local left=$(( deadline - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "== $name: skipped, budget spent"; return; fi
  echo "== $name (at most $limit s)" | tee -a "$out/gpu_run.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/gpu_run.log"
}

# 1. The 40x question: MAML, L = 1, every path including the compiled ones (compiling is timed
#    apart), and bfloat16 autocast as a precision experiment.
part 240 speed_maml_l1 python3 benchmarks/meta_step_speed.py --device cuda --algorithms maml --steps 1 \
  --paths loop higher vmap vmap-bf16 graph compile compile-graphs --out "$out/meta_step_speed_gpu_maml_l1.json"
# 2. The hand-captured CUDA graph replay by replay (its Adam update against Adam written out with
#    float32 bias corrections), the float64 agreement of every path (the graph judged with SGD),
#    and float32 accuracy with TF32 on and off (no compilation: about a minute).
part 150 check_gpu python3 benchmarks/check_gpu.py --sections bisection float64 float32 --out "$out/check_gpu.json"
# 3. iMAML's memory claim: L = 1 to 100 (MAML runs out of memory before L = 100 at meta-batch 32).
part 90 memory python3 benchmarks/memory_vs_steps.py --device cuda --out "$out/memory_vs_steps_gpu.json"
# 4. The compiled step against the loop in float64 on the GPU, both modes.
part 200 check_compiled python3 benchmarks/check_gpu.py --sections compiled --out "$out/check_gpu_compiled.json"
# 5. Whatever time is left: the other algorithms and L = 5, the loop, higher and vmap.
part 600 speed_rest python3 benchmarks/meta_step_speed.py --device cuda --algorithms imaml fomaml reptile maml \
  --steps 1 5 --paths loop higher vmap --out "$out/meta_step_speed_gpu_rest.json"
