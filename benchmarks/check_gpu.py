"""Correctness of the batched, graphed and compiled paths ON THE GPU (the test suite runs on the CPU).

1. bisection (float64): where the hand-captured CUDA graph (benchmarks.graphs.GraphedMetaStep) departs
   from the eager step: replays on the capture batch, at updated φ, on a new batch, and the
   update it applies (with SGD, whose update is checkable by hand);
2. float64: vmap path and CUDA-graph step against the per-task loop, all four algorithms, the conv
   net with its batch norm (must agree to 1e-10, as the CPU tests require; the graph is judged
   with SGD, since capturable Adam's float32 bias corrections move the Adam rows, see benchmarks/graphs.py);
3. compiled (float64): gbml.compiled.CompiledMetaStep, modes "default" and "reduce-overhead"
   (PyTorch's CUDA graphs), against the per-task loop over three steps;
4. float32 at the benchmark's size (MAML at L = 1 and 5, iMAML): the vmap path against the
   float64 loop, with TF32 allowed in cuDNN's convolutions (PyTorch's default on Ampere and newer
   GPUs) and with it forbidden.

    python benchmarks/check_gpu.py --out benchmarks/results/check_gpu.json
    python benchmarks/check_gpu.py --device cpu --sections bisection compiled   # the code paths, eagerly
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gbml
from benchmarks.common import (
    ALGORITHM_NAMES,
    Setting,
    configure,
    machine_description,
    make_model,
    make_tasks,
    write_json,
)
from benchmarks.graphs import GraphedMetaStep
from benchmarks.meta_step_speed import relative_difference
from gbml.compiled import CompiledMetaStep

SMALL = Setting(meta_batch=4, hidden=8)  # the float64 checks' conv net (8 filters) and batch size


def three_new_batches(device, first_seed: int = 10) -> list[gbml.Task]:
    """The batches of the three-step comparisons: seeds 10 to 12 for the float64 section (which
    benchmarks/capturable_adam.py reruns on the CPU), 20 to 22 for the compiled section."""
    return [make_tasks(SMALL, device, torch.float64, seed=first_seed + s) for s in range(3)]


EXACT = {  # small enough for float64, λ large enough that CG converges at a random initialisation
    "maml": gbml.MAML(inner_lr=0.1, inner_steps=2),
    "fomaml": gbml.FOMAML(inner_lr=0.1, inner_steps=2),
    "reptile": gbml.Reptile(inner_lr=0.1, inner_steps=2),
    "imaml": gbml.IMAML(inner_lr=0.01, lam=200.0, inner_steps=3, cg_steps=25, cg_tol=1e-8),
}


def graph_bisection(device) -> list[dict]:
    """Relative differences between each replay of the captured step and the eager vmap path at
    the same φ, step by step (agreement is ~1e-15 in float64)."""
    rows = []
    capture_batch, new_batch = (make_tasks(SMALL, device, torch.float64, seed=s) for s in (1, 2))
    for name in ("maml", "fomaml"):
        for optimizer_name in ("adam", "sgd"):
            algorithm = EXACT[name]
            model, loss = make_model(SMALL, device, torch.float64)
            params = gbml.parameters_of(model)
            if optimizer_name == "adam":
                optimizer = torch.optim.Adam(params.values(), lr=1e-2, capturable=device.type == "cuda")
            else:
                optimizer = torch.optim.SGD(params.values(), lr=0.1)
            graphed = GraphedMetaStep(
                algorithm,
                loss,
                params,
                optimizer,
                capture_batch,
                capture=device.type == "cuda",
            )
            row = {"algorithm": name, "optimizer": optimizer_name}
            stages = (
                ("replay 1, capture batch", capture_batch),
                ("replay 2, capture batch, updated phi", capture_batch),
                ("replay 3, new batch", new_batch),
                ("replay 4, new batch again", new_batch),
            )
            for stage, batch in stages:
                expected, _ = gbml.meta_gradient(algorithm, loss, params, batch, batched=True)
                before = {k: p.detach().clone() for k, p in params.items()}
                state = {k: {s: v.clone() for s, v in optimizer.state[p].items()} for k, p in params.items()}
                got = graphed(batch).meta_gradient
                row[stage] = relative_difference(got, expected)
                if optimizer_name == "sgd":  # φ ← φ − 0.1 Δ, checkable by hand
                    stepped = {k: before[k] - 0.1 * got[k] for k in before}
                else:
                    stepped, _ = adam_by_hand(before, got, state, lr=1e-2)
                    # capturable Adam computes its bias corrections in float32 (see benchmarks/graphs.py)
                    as_captured, _ = adam_by_hand(
                        before, got, state, lr=1e-2, corrections_dtype=torch.float32
                    )
                    row[stage + ": update vs float32 corrections"] = relative_difference(
                        dict(params), as_captured
                    )
                    row[stage + ": adam step count before"] = float(next(iter(state.values()))["step"])
                row[stage + ": update"] = relative_difference(dict(params), stepped)
            rows.append(row)
            print(row, flush=True)
    return rows


def adam_by_hand(
    phi: dict, gradient: dict, state: dict, lr: float, betas=(0.9, 0.999), eps=1e-8, corrections_dtype=None
) -> tuple[dict, dict]:
    """One Adam step from ``state`` (exp_avg, exp_avg_sq, step), written out: the reference for
    the update a captured step applies. Returns the new φ and the new state. The bias corrections
    1 − β^t are computed in float64 (as eager Adam does, in Python floats) unless
    ``corrections_dtype`` says otherwise."""
    stepped, new_state = {}, {}
    for k, g in gradient.items():
        m = betas[0] * state[k]["exp_avg"] + (1 - betas[0]) * g
        v = betas[1] * state[k]["exp_avg_sq"] + (1 - betas[1]) * g * g
        t = float(state[k]["step"]) + 1
        dtype = corrections_dtype or torch.float64
        c1, c2 = (float(1 - torch.tensor(beta, dtype=dtype) ** t) for beta in betas)
        stepped[k] = phi[k] - lr * (m / c1) / ((v / c2).sqrt() + eps)
        new_state[k] = {"exp_avg": m, "exp_avg_sq": v, "step": t}
    return stepped, new_state


def compiled_agreement(device, names=("maml",), modes=None) -> list[dict]:
    """CompiledMetaStep against gbml.meta_step's loop over three steps (SGD with momentum: Adam
    would turn rounding noise in gradients that are exactly zero into 1e-10 steps)."""
    rows = []
    batches = three_new_batches(device, first_seed=20)
    if modes is None:
        modes = ("default", "reduce-overhead") if device.type == "cuda" else ("default",)
    # MAML only by default: each compilation takes a minute or more, and the CPU test suite
    # checks the compiled step of all four algorithms.
    for name in names:
        # iMAML with five CG steps, as the benchmark takes: compile time grows with every step.
        algorithm = EXACT[name]
        if name == "imaml":
            algorithm = dataclasses.replace(algorithm, cg_steps=5, on_cg_failure="warn")
        for mode in modes:
            model_l, loss_l = make_model(SMALL, device, torch.float64)
            params_l = gbml.parameters_of(model_l)
            sgd_l = torch.optim.SGD(params_l.values(), lr=0.1, momentum=0.9)
            model_c, loss_c = make_model(SMALL, device, torch.float64)
            params_c = gbml.parameters_of(model_c)
            sgd_c = torch.optim.SGD(params_c.values(), lr=0.1, momentum=0.9)
            compiled = CompiledMetaStep(algorithm, loss_c, params_c, sgd_c, mode=mode)
            worst = 0.0
            for batch in batches:
                expected = gbml.meta_step(algorithm, loss_l, params_l, batch, sgd_l, batched=False)
                got = compiled(batch)
                worst = max(worst, relative_difference(got.meta_gradient, expected.meta_gradient))
            after = relative_difference(dict(params_c), dict(params_l))
            row = {
                "algorithm": name,
                "mode": mode,
                "compiled_vs_loop_meta_gradient_3_steps": worst,
                "compiled_vs_loop_parameters_after_3_steps": after,
                "pass": max(worst, after) < 1e-10,
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def graph_against_loop(algorithm, device, tasks, optimizer_name: str) -> tuple[float, float]:
    """Three steps of the graphed step and of the loop from the same φ on new batches: the worst
    meta-gradient difference and the difference in φ after them. Adam is captured as PyTorch's
    capturable Adam (float32 bias corrections, see benchmarks/graphs.py); SGD with momentum is exact."""

    def setup(capturable: bool):
        model, loss = make_model(SMALL, device, torch.float64)
        params = gbml.parameters_of(model)
        if optimizer_name == "adam":
            return params, loss, torch.optim.Adam(params.values(), lr=1e-2, capturable=capturable)
        return params, loss, torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)

    capture = device.type == "cuda"
    params_g, loss_g, optimizer_g = setup(capturable=capture)
    graphed = GraphedMetaStep(algorithm, loss_g, params_g, optimizer_g, tasks, capture=capture)
    params_l, loss_l, optimizer_l = setup(capturable=False)
    worst = 0.0
    for batch in three_new_batches(device):
        expected = gbml.meta_step(algorithm, loss_l, params_l, batch, optimizer_l, batched=False)
        worst = max(worst, relative_difference(graphed(batch).meta_gradient, expected.meta_gradient))
    return worst, relative_difference(dict(params_g), dict(params_l))


def float64_agreement(device) -> list[dict]:
    rows = []
    for name in ALGORITHM_NAMES:
        algorithm = EXACT[name]
        tasks = make_tasks(SMALL, device, torch.float64, seed=1)
        model, loss = make_model(SMALL, device, torch.float64)
        phi = gbml.parameters_of(model)
        looped, _ = gbml.meta_gradient(algorithm, loss, phi, tasks, batched=False)
        batched, _ = gbml.meta_gradient(algorithm, loss, phi, tasks, batched=True)
        sgd = torch.optim.SGD(phi.values(), lr=0.0)  # a step that leaves φ as it is
        graphed = GraphedMetaStep(algorithm, loss, phi, sgd, tasks, capture=device.type == "cuda")
        same_batch = relative_difference(graphed(tasks).meta_gradient, batched)
        adam_gradient, adam_phi = graph_against_loop(algorithm, device, tasks, "adam")
        sgd_gradient, sgd_phi = graph_against_loop(algorithm, device, tasks, "sgd")
        rows.append(
            {
                "algorithm": name,
                "vmap_vs_loop": relative_difference(batched, looped),
                "graph_first_step_on_capture_batch_vs_vmap": same_batch,
                "graph_vs_loop_meta_gradient_3_steps": adam_gradient,
                "graph_vs_loop_parameters_after_3_steps": adam_phi,
                "graph_sgd_vs_loop_meta_gradient_3_steps": sgd_gradient,
                "graph_sgd_vs_loop_parameters_after_3_steps": sgd_phi,
                # Judged with SGD: capturable Adam's float32 bias corrections move the Adam rows
                # (reproduced eagerly on the CPU by benchmarks/capturable_adam.py).
                "pass": max(relative_difference(batched, looped), same_batch, sgd_gradient, sgd_phi) < 1e-10,
            }
        )
        print(rows[-1], flush=True)
    return rows


@contextlib.contextmanager
def tf32(allowed: bool):
    """Allow or forbid TF32 tensor-core arithmetic in cuDNN convolutions and float32 matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def float32_accuracy(device) -> list[dict]:
    rows = []
    setting = Setting()
    algorithms = {
        "maml": gbml.MAML(0.4, 1),
        # Five inner steps of size 0.4 compound rounding errors: the GPU benchmark's float32
        # paths differed from each other by up to 2e-1 here (with TF32 allowed).
        "maml L=5": gbml.MAML(0.4, 5),
        "imaml": gbml.IMAML(0.1, lam=50.0, inner_steps=5, cg_steps=5, on_cg_failure="warn"),
    }
    for name, algorithm in algorithms.items():
        tasks64 = make_tasks(setting, device, torch.float64)
        model, loss = make_model(setting, device, torch.float64)
        reference, _ = gbml.meta_gradient(algorithm, loss, gbml.parameters_of(model), tasks64, batched=False)
        tasks32 = make_tasks(setting, device, torch.float32)
        variants = [("native", True), ("native", False), ("unfold", True)]
        if device.type != "cuda":  # no TF32 on a CPU: one row per convolution
            variants = [("native", None), ("unfold", None)]
        for conv, allow_tf32 in variants:
            model32, loss32 = make_model(setting, device, torch.float32, conv=conv)
            with tf32(bool(allow_tf32)) if allow_tf32 is not None else contextlib.nullcontext():
                delta, _ = gbml.meta_gradient(
                    algorithm, loss32, gbml.parameters_of(model32), tasks32, batched=True
                )
            rows.append(
                {
                    "algorithm": name,
                    "conv": conv,
                    "tf32": allow_tf32,
                    "relative_error_vs_float64": relative_difference(delta, reference),
                }
            )
            print(rows[-1], flush=True)
    return rows


SECTIONS = {
    "bisection": graph_bisection,
    "float64": float64_agreement,
    "compiled": compiled_agreement,
    "float32": float32_accuracy,
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument(
        "--compiled-modes",
        nargs="+",
        choices=("default", "reduce-overhead"),
        help="torch.compile modes to check",
    )
    parser.add_argument("--out", default="benchmarks/results/check_gpu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message="iMAML's conjugate gradient missed")
    results = {"machine": machine_description(device)}
    for section in args.sections:
        if section == "float32":
            configure(device)  # the float32 part runs under the benchmark's settings
        if section == "compiled":
            results[section] = compiled_agreement(device, modes=args.compiled_modes)
        else:
            results[section] = SECTIONS[section](device)
        write_json(args.out, results)
    for section in ("float64", "compiled"):
        if section in results:
            print(f"all {section} checks pass:", all(r["pass"] for r in results[section]))
    return results


if __name__ == "__main__":
    main()
