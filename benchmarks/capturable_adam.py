"""Why the hand-captured CUDA graph disagreed with the loop: a CPU reproduction.

On an H100 (benchmarks/check_gpu.py) every replay of benchmarks.graphs.GraphedMetaStep gave the same
meta-gradient as the eager step at the same φ (1e-15, float64) and applied SGD's update exactly,
yet over three Adam steps it differed from the loop by up to 2.9e-1. A graph needs Adam with
``capturable=True``, which keeps its step count t as a float32 tensor and so computes the bias
corrections 1 − β^t in float32 (1 − 0.999 comes out 1.3e-5 too small), where eager Adam uses
Python floats. This script runs the float64 check of check_gpu.py eagerly on the CPU twice,
with Adam's bias corrections in float64 and in float32, and reports how far apart the two runs
are. It also shows why so small a change matters: the check's small problem is not smooth in the
step size (scaling Adam's learning rate by 1 + ε changes the meta-gradient in proportion to ε
up to ε = 1e-6, then jumps).

    python benchmarks/capturable_adam.py --out benchmarks/results/capturable_adam_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gbml
from benchmarks.check_gpu import EXACT, SMALL, adam_by_hand, three_new_batches
from benchmarks.common import (
    ALGORITHM_NAMES,
    machine_description,
    make_model,
    write_json,
)
from benchmarks.meta_step_speed import relative_difference

LR = 1e-2


def adam_run(algorithm, corrections_dtype, lr=LR):
    """Three meta-steps from the same φ on the same batches as check_gpu.py's float64 section,
    with Adam written out; returns the meta-gradients and the final φ."""
    model, loss = make_model(SMALL, torch.device("cpu"), torch.float64)
    params = gbml.parameters_of(model)
    state = {
        k: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), "step": 0}
        for k, p in params.items()
    }
    gradients = []
    for batch in three_new_batches(torch.device("cpu")):
        delta, _ = gbml.meta_gradient(algorithm, loss, params, batch, batched=False)
        stepped, state = adam_by_hand(params, delta, state, lr, corrections_dtype=corrections_dtype)
        params = {k: v.detach() for k, v in stepped.items()}
        gradients.append(delta)
    return gradients, params


def difference(run_a, run_b) -> tuple[float, float]:
    (grads_a, phi_a), (grads_b, phi_b) = run_a, run_b
    return max(map(relative_difference, grads_a, grads_b)), relative_difference(phi_a, phi_b)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/capturable_adam_cpu.json")
    args = parser.parse_args(argv)
    results = {
        "machine": machine_description(torch.device("cpu")),
        "float32_corrections": [],
        "lr_scaled": [],
    }
    for name in ALGORITHM_NAMES:
        reference = adam_run(EXACT[name], torch.float64)
        gradient, phi = difference(adam_run(EXACT[name], torch.float32), reference)
        row = {"algorithm": name, "meta_gradient_3_steps": gradient, "parameters_after_3_steps": phi}
        results["float32_corrections"].append(row)
        print(row, flush=True)
    reference = adam_run(EXACT["maml"], torch.float64)
    for epsilon in (1e-8, 1e-7, 1e-6, 1e-5):
        gradient, phi = difference(adam_run(EXACT["maml"], torch.float64, lr=LR * (1 + epsilon)), reference)
        row = {"algorithm": "maml", "lr_scale_minus_1": epsilon, "meta_gradient_3_steps": gradient}
        results["lr_scaled"].append(row)
        print(row, flush=True)
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
