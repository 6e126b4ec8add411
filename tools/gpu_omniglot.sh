#!/usr/bin/env bash
# Chapter 8's Omniglot runs on a lent GPU, in one device call of about ten minutes.
#
#   bash tools/gpu_omniglot.sh SECONDS       # on the device, from the repository's root
#
# Five trainings share the GPU, each a process of its own (their small kernels leave the GPU idle
# most of the time, so they overlap), and each stops at its last checkpoint within SECONDS
# (`train --time-limit`; a run continues from its last.pt at the next call):
#   * gpu/maml-5w1s (gbml.protocols.GPU_RUNS): Finn et al.'s protocol exactly (batch norm's shift
#     not a fast weight), new, towards the paper's 60,000 meta-iterations, in results/omniglot/gpu/;
#   * imaml-5w5s on Rajeswaran et al.'s protocol, in results/omniglot/imaml-5w5s, continued from its
#     CPU checkpoint (or new without one: on one CPU thread it takes about 16 s per meta-iteration, so
#     its 20,000 would take days there);
#   * maml-20w1s, fomaml-20w1s and imaml-5w1s continued from their committed checkpoints.
# Training runs with TF32 off (`gbml.training.train` computes in exact float32 and each session's
# record says "tf32": false). Nothing is evaluated on the test split here: `python -m gbml export`
# meta-tests each run afterwards on the CPU, where chapter 8 re-evaluates it.
#
# Before the call, here: `echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/data; cp -r
# ../shared/data/omniglot .gpu/data/`; then the device tool's run with carry [".gpu"] and the
# command `GBML_SOURCE_REVISION=COMMIT bash tools/gpu_omniglot.sh 500`, COMMIT being what
# `git rev-parse --short=12 HEAD` prints here (the copy there has no git history).
# After it: `tar xf runs.tar`, `python -m gbml export DIR --test-tasks 600` for each run on the CPU
# (chapter 8 re-evaluates there), and re-execute chapter 8.
#
# Environment: DEVICE (default cuda), GBML_DATA_DIR (default .gpu/data, holding omniglot/),
# GBML_SOURCE_REVISION (the commit, which the copied tree cannot tell), OUT (where the logs and
# runs.tar go; the device tool brings back what is written there).
set -u
limit=${1:?usage: tools/gpu_omniglot.sh SECONDS}
device=${DEVICE:-cuda}
out=${OUT:-/tmp/gpu-omniglot}
runs=results/omniglot
mkdir -p "$out" "$runs/gpu"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export GBML_DATA_DIR=${GBML_DATA_DIR:-$PWD/.gpu/data}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c 'import torch, gbml.notebook as n; print("torch", torch.__version__, "|", n.machine_description(n.resolve_device("'"$device"'")), "| TF32 by default:", n.tf32_enabled())'
  # Decode the zips once, before five processes want the same cache file.
  python3 -c 'import time; t = time.time(); from gbml.omniglot import load_omniglot; print(load_omniglot(), f"loaded in {time.time() - t:.0f} s")'
} 2>&1 | tee "$out/environment.log"

train() {  # train LOG OPTIONS...: in the background, stopping within the limit (timeout: a last resort)
  local log=$1
  shift
  timeout $((limit + 60)) python3 -m gbml train "$@" --device "$device" --batched compile --no-progress \
    --test-tasks 0 --time-limit "$limit" >"$out/$log.log" 2>&1 &
}
protocol() {  # protocol OUT CONFIG: train's options for the gbml.protocols expression CONFIG, into OUT
  python3 -c "from gbml.protocols import *; from gbml.training import train_command
print(train_command($2, '$1').removeprefix('python -m gbml train '))"
}
start_or_resume() {  # start_or_resume LOG OUT CONFIG: continue OUT's run, or start CONFIG's there
  if [ -e "$2/last.pt" ]; then
    train "$1" --resume "$2"
  else
    # (--device and --batched, given again by train, override the protocol's)
    train "$1" $(protocol "$2" "$3")
  fi
}
start_or_resume maml-5w1s-gpu "$runs/gpu/maml-5w1s" "GPU_RUNS['gpu/maml-5w1s']"
start_or_resume imaml-5w5s "$runs/imaml-5w5s" "OMNIGLOT_RUNS['imaml-5w5s']"
for run in maml-20w1s fomaml-20w1s imaml-5w1s; do
  train "$run" --resume "$runs/$run"
done
wait
tail -n 3 "$out"/*.log
# One file for the runs' checkpoints (the tool brings back at most eight); each last.pt holds its
# run's history, and `python -m gbml export` writes final.pt and run.json from it.
tar cf "$out/runs.tar" "$runs"/gpu/maml-5w1s/last.pt "$runs"/{imaml-5w5s,maml-20w1s,fomaml-20w1s,imaml-5w1s}/last.pt
ls -l "$out"
