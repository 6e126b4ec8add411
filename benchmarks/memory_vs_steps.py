"""Memory of one meta-gradient against the number of inner steps L: MAML keeps every inner
iterate for its backward pass, iMAML keeps none (its meta-gradient needs only θ_t).

Reports, for L in --steps, the memory one meta-gradient adds above what the model and tasks
already hold (peak GPU memory on CUDA, growth of the peak resident set size on the CPU), then
writes JSON and a plot.

    python benchmarks/memory_vs_steps.py --device cuda
    python benchmarks/memory_vs_steps.py --small        # CPU: meta-batch 2, L up to 20
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gbml
from benchmarks.common import (
    Setting,
    configure,
    machine_description,
    make_algorithm,
    make_model,
    make_tasks,
    write_json,
)
from gbml.notebook import resolve_device


def measure(name: str, steps: int, setting: Setting, device: torch.device) -> dict:
    """Memory one meta-gradient needs above what the model and the tasks already hold: the CUDA
    allocator's peak on a GPU; on the CPU, the growth of the peak resident set size, measured in
    a fresh process (torch.func does not support saved-tensor hooks, and the CPU allocator keeps
    no statistics)."""
    if device.type != "cuda":
        child = subprocess.run(
            [sys.executable, __file__, "--child", name, str(steps), str(setting.meta_batch)],
            capture_output=True,
            text=True,
            check=True,
        )
        return {
            "algorithm": name,
            "inner_steps": steps,
            "peak_rss_growth_mib": float(child.stdout.split()[-1]),
        }
    model, loss = make_model(setting, device)
    tasks = make_tasks(setting, device)
    params = gbml.parameters_of(model)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    gbml.meta_gradient(make_algorithm(name, steps), loss, params, tasks, batched=True)
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return {"algorithm": name, "inner_steps": steps, "peak_memory_mib": peak}


def _child(name: str, steps: int, meta_batch: int) -> None:
    """Run in a fresh process: print how much one CPU meta-gradient raises the peak RSS (MiB)."""
    warnings.filterwarnings("ignore", message="iMAML's conjugate gradient missed")
    setting = Setting(meta_batch=meta_batch)
    model, loss = make_model(setting, torch.device("cpu"))
    tasks = make_tasks(setting, torch.device("cpu"))
    algorithm = make_algorithm(name, steps)
    params = gbml.parameters_of(model)
    before = _peak_resident_kib()
    gbml.meta_gradient(algorithm, loss, params, tasks, batched=False)
    print((_peak_resident_kib() - before) / 1024)


def _peak_resident_kib() -> int:
    """This process's peak resident set size in KiB: VmHWM, which starts afresh with the process
    (ru_maxrss can carry a parent's larger peak into a child on Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100])
    parser.add_argument("--small", action="store_true", help="CPU preset: meta-batch 2, L in 1 2 5 10 20")
    parser.add_argument("--out", default="benchmarks/results/memory_vs_steps.json")
    parser.add_argument("--plot", default=None, help="where to save the plot (default: beside --out)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]), int(args.child[2]))
        return {}
    if args.small:
        args.meta_batch, args.steps = 2, [1, 2, 5, 10, 20]
    device = resolve_device(args.device)
    configure(device)
    setting = Setting(meta_batch=args.meta_batch)
    results = {"machine": machine_description(device), "setting": setting, "rows": []}
    warnings.filterwarnings("ignore", message="iMAML's conjugate gradient missed")
    for name in ("maml", "imaml"):
        for steps in args.steps:
            try:
                row = measure(name, steps, setting, device)
            except torch.cuda.OutOfMemoryError as error:
                row = {"algorithm": name, "inner_steps": steps, "error": f"out of memory: {error}"[:300]}
            results["rows"].append(row)
            print(row, flush=True)
            write_json(args.out, results)
    plot(results, args.plot or str(Path(args.out).with_suffix(".png")))
    return results


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = (
        "peak_memory_mib" if any("peak_memory_mib" in r for r in results["rows"]) else "peak_rss_growth_mib"
    )
    label = {
        "peak_memory_mib": "peak GPU memory of one meta-gradient (MiB)",
        "peak_rss_growth_mib": "growth of peak resident memory (MiB)",
    }[metric]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, marker in (("maml", "o"), ("imaml", "s")):
        rows = [r for r in results["rows"] if r["algorithm"] == name and metric in r]
        ax.plot(
            [r["inner_steps"] for r in rows],
            [r[metric] for r in rows],
            marker=marker,
            label={"maml": "MAML", "imaml": "iMAML"}[name],
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("inner steps L")
    ax.set_ylabel(label)
    where = results["machine"].get("gpu", "CPU")
    setting = results["setting"]
    meta_batch = setting.meta_batch if isinstance(setting, Setting) else setting["meta_batch"]
    ax.set_title(f"Meta-batch {meta_batch}, conv net, {where}", fontsize=9)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
