#!/usr/bin/env bash
# Everything the Performance appendix needs from a GPU, in one go (run by the device tool as
#   bash .gpu/run.sh bash benchmarks/gpu_run.sh
# after `bash ../shared/gpu/prepare.sh higher`). Results land in $OUT (or benchmarks/results).
set -u
# Time limits keep the whole run inside one device call; every script writes its JSON as it goes.
out=${OUT:-benchmarks/results}
mkdir -p "$out"
timeout 330 python3 benchmarks/meta_step_speed.py --device cuda --out "$out/meta_step_speed_gpu.json" 2>&1 | tee "$out/meta_step_speed_gpu.log"
timeout 90 python3 benchmarks/memory_vs_steps.py --device cuda --out "$out/memory_vs_steps_gpu.json" 2>&1 | tee "$out/memory_vs_steps_gpu.log"
timeout 60 python3 benchmarks/check_gpu.py --out "$out/check_gpu.json" 2>&1 | tee "$out/check_gpu.log"
