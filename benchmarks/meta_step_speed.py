"""Time one meta-iteration of MAML, FO-MAML, Reptile and iMAML along several code paths.

The default setting is 5-way 1-shot, 28×28×1 images, 15 query images per class (the
miniImageNet count; Finn et al.'s Omniglot runs use K per class), the 4-block max-pool conv net
with 64 filters, a meta-batch of 32 tasks, an Adam outer step. ``--finn`` times Finn et al.'s
Omniglot protocol instead: their strided network, one query image per class (K = 1).
In one process, for each algorithm and number of inner steps L, it times:

  loop          gbml.meta_step(batched=False): a Python loop over tasks (the usual pattern)
  higher        a loop over tasks with the `higher` library (when installed)
  vmap          gbml.meta_step(batched=True): all tasks in one torch.func.vmap call
  vmap-unfold   the same with convolutions as im2col + matmul (gbml.UnfoldConv2d)
  vmap-bf16     the vmap step under torch.autocast to bfloat16 (a precision experiment: its
                meta-gradient is recorded against the loop's, and is far off)
  graph         benchmarks.graphs.GraphedMetaStep: the vmapped step and capturable Adam in one CUDA graph
  graph-unfold  both
  compile       gbml.compiled.CompiledMetaStep: the vmapped meta-gradient through torch.compile
  compile-graphs  the same with mode="reduce-overhead" (PyTorch's CUDA graphs; GPU only)

Compiled paths are compiled before the clock starts (the compile time is reported separately).

Each path's first meta-gradient is compared with the loop's before timing; the clock is read
with the GPU synchronised, the median of --iterations timed steps after warm-up is reported
with the peak GPU memory. A table of ms/iteration and speed-ups is printed last and everything
goes to a JSON file.

    python benchmarks/meta_step_speed.py --device cuda
    python benchmarks/meta_step_speed.py --small          # a CPU run that takes a few minutes
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import gbml
from benchmarks.common import (
    ALGORITHM_NAMES,
    Setting,
    configure,
    machine_description,
    make_algorithm,
    make_model,
    make_tasks,
    result_grids,
    synchronize,
    time_step,
    time_steps_interleaved,
    write_json,
)
from benchmarks.graphs import GraphedMetaStep
from gbml.compiled import CompiledMetaStep
from gbml.notebook import resolve_device

GPU_PATHS = (
    "loop",
    "higher",
    "vmap",
    "vmap-unfold",
    "vmap-bf16",
    "graph",
    "graph-unfold",
    "compile",
    "compile-graphs",
)
CPU_PATHS = ("loop", "higher", "vmap", "auto")  # compile: ask for it with --paths (1.5 min per compile)


def build_step(path: str, algorithm, setting: Setting, device: torch.device, tasks: gbml.Task):
    """A zero-argument function doing one meta-iteration along ``path``, and a function giving
    the meta-gradient of its first step (for the agreement check)."""
    conv = "unfold" if path.endswith("unfold") else "native"
    model, loss = make_model(setting, device, conv=conv)
    params = gbml.parameters_of(model)
    if path == "higher":
        from benchmarks.higher_baseline import higher_meta_step

        optimizer = torch.optim.Adam(params.values(), lr=1e-3)

        def step():
            return higher_meta_step(algorithm, model, torch.nn.functional.cross_entropy, tasks, optimizer)

        def first_gradient():
            return dict(zip(params, step()))

        return step, first_gradient
    if path.startswith("graph"):
        optimizer = torch.optim.Adam(params.values(), lr=1e-3, capturable=device.type == "cuda")
        graphed = GraphedMetaStep(algorithm, loss, params, optimizer, tasks, capture=device.type == "cuda")

        def step():
            return graphed(tasks)

        return step, lambda: step().meta_gradient
    if path.startswith("compile"):
        optimizer = torch.optim.Adam(params.values(), lr=1e-3, fused=device.type == "cuda")
        mode = "reduce-overhead" if path == "compile-graphs" else "default"
        compiled = CompiledMetaStep(algorithm, loss, params, optimizer, mode=mode)

        def step():
            return compiled(tasks)

        return step, lambda: step().meta_gradient
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    batched = {"loop": False, "vmap": True, "vmap-unfold": True, "vmap-bf16": True, "auto": "auto"}[path]
    # bfloat16 keeps 8 significant bits; autocast runs convolutions and matrix products in it.
    precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=path.endswith("bf16"))

    def step():
        with precision:
            return gbml.meta_step(algorithm, loss, params, tasks, optimizer, batched=batched)

    return step, lambda: step().meta_gradient


def relative_difference(a: dict, b: dict) -> float:
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    den = sum(float((b[k].double() ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5], help="inner steps L")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHM_NAMES), choices=ALGORITHM_NAMES)
    parser.add_argument("--paths", nargs="+", help="code paths to time (default: all for the device)")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--network", choices=("max_pool", "stride"), default="max_pool")
    parser.add_argument(
        "--finn",
        action="store_true",
        help="Finn et al.'s Omniglot shape: strided network, K = 1 query per class, L = 1",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    parser.add_argument(
        "--small", action="store_true", help="CPU preset: meta-batch 4, L = 1, MAML and FO-MAML, 5 iterations"
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="alternate the paths call by call (for close comparisons; no memory figures)",
    )
    parser.add_argument("--note", default="", help="conditions of the run, printed above its tables")
    parser.add_argument("--out", default="benchmarks/results/meta_step_speed.json")
    args = parser.parse_args(argv)
    if args.small:
        args.meta_batch, args.steps, args.iterations, args.warmup = 4, [1], 5, 1
        args.algorithms = ["maml", "fomaml"]
    if args.finn:
        args.network, args.queries, args.steps = "stride", args.shots, [1]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    configure(device)
    setting = Setting(args.ways, args.shots, args.queries, args.meta_batch, args.hidden, args.network)
    paths = args.paths or (GPU_PATHS if device.type == "cuda" else CPU_PATHS)
    try:
        import higher  # noqa: F401
    except ImportError:
        paths = [p for p in paths if p != "higher"]
        print("higher is not installed (pip install -e '.[bench]'): skipping that baseline")
    results = {"machine": machine_description(device), "setting": setting, "rows": [], "note": args.note}
    print(results["machine"])
    tasks = make_tasks(setting, device)
    warnings.filterwarnings("ignore", message="iMAML's conjugate gradient missed")
    for name in args.algorithms:
        for steps in args.steps:
            algorithm = make_algorithm(name, steps)
            rows, built, reference = {}, {}, None
            for path in paths:
                rows[path] = row = {"algorithm": name, "inner_steps": steps, "path": path}
                try:
                    step, first_gradient = build_step(path, algorithm, setting, device, tasks)
                    started = time.perf_counter()
                    gradient = first_gradient()  # compiles the compiled paths
                    synchronize(device)
                    row["first_call_s"] = time.perf_counter() - started
                    reference = gradient if path == "loop" else reference
                    if reference is not None:
                        row["relative_difference_to_loop"] = relative_difference(gradient, reference)
                    if args.interleave:
                        built[path] = step
                    else:
                        row.update(time_step(step, device, args.iterations, args.warmup))
                        del step, first_gradient  # free this path's model before the next one
                except Exception as error:  # record and go on: one failing path must not lose the rest
                    row["error"] = f"{type(error).__name__}: {error}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if args.interleave:
                for path, timing in time_steps_interleaved(
                    built, device, args.iterations, args.warmup
                ).items():
                    rows[path].update(timing)
            for row in rows.values():
                results["rows"].append(row)
                print(_row_line(row), flush=True)
            write_json(args.out, results)
    print_table(results)
    return results


def _row_line(row: dict) -> str:
    if "error" in row:
        return (
            f"{row['algorithm']:8s} L={row['inner_steps']:<3d} {row['path']:13s} ERROR {row['error'][:200]}"
        )
    memory = f"{row['peak_memory_mib']:8.0f} MiB" if row.get("peak_memory_mib") is not None else ""
    diff = row.get("relative_difference_to_loop")
    diff_text = f"  Δ vs loop {diff:.1e}" if diff is not None else ""
    head = f"{row['algorithm']:8s} L={row['inner_steps']:<3d} {row['path']:13s}"
    return f"{head} {row['median_ms']:10.1f} ms{memory}{diff_text}"


def print_table(results: dict) -> None:
    """ms per meta-iteration, and speed-ups of every path over the loop and over higher."""
    print(f"\non {results['machine'].get('gpu', results['machine']['cpu'])}")
    for title, paths, rows in result_grids(results):
        print(f"\n{title}\n{'algorithm':10s}{'L':>4s}" + "".join(f"{p:>14s}" for p in paths))
        for algorithm, steps, cells in rows:
            print(f"{algorithm:10s}{steps:>4d}" + "".join(f"{c:>14s}" for c in cells))


if __name__ == "__main__":
    main()
