"""Turn the JSON results in benchmarks/results/ into the tables and the plot of the book's
Performance appendix (book/_generated/). Run after the benchmark scripts:

    python benchmarks/report.py
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import result_grids  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "book" / "_generated"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def gpu_speed_results() -> list[tuple[str, dict]]:
    """The GPU speed tables, newest run first, each with a caption. benchmarks/gpu_run.sh
    writes MAML at L = 1 with every path, then the other rows; where that run did not reach the
    other rows, the earlier run's full table (meta_step_speed_gpu.json) is shown as well."""
    latest, rest = load("meta_step_speed_gpu_maml_l1.json"), load("meta_step_speed_gpu_rest.json")
    parts = [p for p in (latest, rest) if p]
    tables = []
    if parts:
        merged, seen = dict(parts[0], rows=[]), set()
        for part in parts:  # a row measured in the first file is not replaced by the second's
            for row in part["rows"]:
                key = (row["algorithm"], row["inner_steps"], row["path"])
                if key not in seen:
                    seen.add(key)
                    merged["rows"].append(row)
        tables.append(("latest run", merged))
    earlier = load("meta_step_speed_gpu.json")
    if earlier and not rest:
        tables.append(("earlier run, the other algorithms and L = 5", earlier))
    return tables


def compiled_rows_from_log() -> list[dict]:
    """Rows of check_gpu.py's compiled section printed to gpu_run.log: a section cut short by the
    time limit prints the rows it finished but writes no JSON file."""
    log = RESULTS / "gpu_run.log"
    if not log.exists():
        return []
    rows = (
        ast.literal_eval(line) for line in log.read_text().splitlines() if line.startswith("{'algorithm'")
    )
    return [r for r in rows if "compiled_vs_loop_meta_gradient_3_steps" in r]


def machine_line(machine: dict) -> str:
    where = machine.get("gpu") or f"CPU ({machine['cpu']}, {machine['cpu_threads']} threads)"
    return f"{where}, torch {machine['torch']}, Python {machine['python']}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def speed_tables(results: dict, *, skip_algorithms=()) -> str:
    text = ""
    for title, paths, rows in result_grids(results, skip_algorithms):
        header = ["algorithm", "L", *paths]
        text += f"\n{title}:\n\n" + markdown_table(header, [[a, steps, *cells] for a, steps, cells in rows])
    errors = [r for r in results["rows"] if "error" in r]
    if errors:
        failures = (f"{r['algorithm']} L={r['inner_steps']} {r['path']}: {r['error'][:120]}" for r in errors)
        text += "\nPaths that failed: " + "; ".join(failures) + "\n"
    return text


def check_table(check: dict) -> str:
    """The agreement checks of benchmarks/check_gpu.py, as far as the run got."""

    def cell(row, key):  # a check cut short by the time limit leaves some keys out
        return f"{row[key]:.1e}" if key in row else "–"

    text = ""
    if check.get("bisection"):
        rows = []
        for r in check["bisection"]:
            for stage in [k for k in r if k.startswith("replay") and ":" not in k]:
                count = r.get(f"{stage}: adam step count before")
                rows.append(
                    [
                        r["algorithm"],
                        r["optimizer"],
                        stage,
                        "–" if count is None else f"{count:.0f}",
                        f"{r[stage]:.1e}",
                        cell(r, f"{stage}: update"),
                        cell(r, f"{stage}: update vs float32 corrections"),
                    ]
                )
        text += (
            "Each replay of the captured step (float64) against the eager vmap step at the same φ, "
            "and the update it applied against the optimizer's step written out by hand:\n\n"
        )
        header = [
            "algorithm",
            "optimizer",
            "replay",
            "Adam's step count before",
            "meta-gradient",
            "update",
            "update vs Adam with float32 corrections",
        ]
        text += markdown_table(header, rows)
    if check.get("float64"):
        header = [
            "algorithm",
            "vmap vs loop",
            "graph vs loop, Adam (meta-gradient, 3 steps)",
            "graph vs loop, Adam (φ after 3 steps)",
            "graph vs loop, SGD (meta-gradient, 3 steps)",
        ]
        rows = [
            [
                r["algorithm"],
                cell(r, "vmap_vs_loop"),
                cell(r, "graph_vs_loop_meta_gradient_3_steps"),
                cell(r, "graph_vs_loop_parameters_after_3_steps"),
                cell(r, "graph_sgd_vs_loop_meta_gradient_3_steps"),
            ]
            for r in check["float64"]
        ]
        text += "\nRelative differences in float64 on the GPU (conv net with 8 filters, 4 tasks):\n\n"
        text += markdown_table(header, rows)
    if check.get("compiled"):
        rows = [
            [
                r["algorithm"],
                r["mode"],
                f"{r['compiled_vs_loop_meta_gradient_3_steps']:.1e}",
                f"{r['compiled_vs_loop_parameters_after_3_steps']:.1e}",
            ]
            for r in check["compiled"]
        ]
        text += "\nThe compiled step against the loop in float64 (3 steps of SGD with momentum):\n\n"
        text += markdown_table(["algorithm", "mode", "meta-gradient", "φ after 3 steps"], rows)
    if check.get("float32"):
        rows = [
            [
                r["algorithm"],
                r["conv"],
                {True: "on", False: "off", None: "none (CPU)"}[r.get("tf32", True)],
                f"{r['relative_error_vs_float64']:.1e}",
            ]
            for r in check["float32"]
        ]
        text += "\nThe float32 batched path at the benchmark's size against the float64 loop:\n\n"
        text += markdown_table(
            ["algorithm", "convolution", "TF32", "relative error of the float32 vmap path"], rows
        )
    return text


def emulation_table(gpu_rows: list[dict], emulation: dict) -> str:
    """The graph's float64 disagreement on the GPU beside its CPU reproduction by
    benchmarks/capturable_adam.py (eager Adam with its bias corrections in float32)."""
    cpu = {r["algorithm"]: r for r in emulation["float32_corrections"]}
    rows = [
        [
            r["algorithm"],
            f"{r['graph_vs_loop_meta_gradient_3_steps']:.2e}",
            f"{cpu[r['algorithm']]['meta_gradient_3_steps']:.2e}",
            f"{r['graph_vs_loop_parameters_after_3_steps']:.2e}",
            f"{cpu[r['algorithm']]['parameters_after_3_steps']:.2e}",
        ]
        for r in gpu_rows
        if r["algorithm"] in cpu
    ]
    header = [
        "algorithm",
        "meta-gradient: graph vs loop, GPU",
        "meta-gradient: float32 vs float64 corrections, CPU",
        "φ: graph vs loop, GPU",
        "φ: float32 vs float64 corrections, CPU",
    ]
    scaled = "; ".join(
        f"1 + {r['lr_scale_minus_1']:.0e}: {r['meta_gradient_3_steps']:.1e}" for r in emulation["lr_scaled"]
    )
    return (
        "\nThe graph's disagreement over three Adam steps (GPU, above) beside the same check run eagerly "
        "on the CPU with Adam's bias corrections computed in float32 instead of float64 "
        f"(`benchmarks/capturable_adam.py`, {machine_line(emulation['machine'])}):\n\n"
        + markdown_table(header, rows)
        + f"\nMAML's meta-gradient after three eager Adam steps with the learning rate scaled by {scaled}.\n"
    )


def memory_plot(gpu: dict | None, cpu: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (gpu, "peak_memory_mib", "peak GPU memory (MiB)"),
        (cpu, "peak_rss_growth_mib", "peak RSS growth (MiB)"),
    ]
    panels = [p for p in panels if p[0] is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (results, metric, ylabel) in zip(axes[0], panels):
        for name, marker, label in (("maml", "o", "MAML"), ("imaml", "s", "iMAML")):
            rows = [r for r in results["rows"] if r["algorithm"] == name and metric in r]
            ax.plot([r["inner_steps"] for r in rows], [r[metric] for r in rows], marker=marker, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("inner steps L")
        ax.set_ylabel(ylabel)
        where = results["machine"].get("gpu") or "2-core CPU"
        ax.set_title(f"{where}, meta-batch {results['setting']['meta_batch']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        "Memory of one meta-gradient of the conv net (5-way 1-shot, 15 queries per class)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def memory_table(results: dict, metric: str) -> str:
    steps = sorted({r["inner_steps"] for r in results["rows"]})
    rows = []
    for name in ("maml", "imaml"):
        by_steps = {r["inner_steps"]: r for r in results["rows"] if r["algorithm"] == name}
        cells = [
            "–" if s not in by_steps else f"{by_steps[s][metric]:.0f}" if metric in by_steps[s] else "failed"
            for s in steps
        ]
        rows.append([name, *cells])
    return markdown_table(["algorithm", *(f"L={s}" for s in steps)], rows)


def meta_test_table(results: dict) -> str:
    """One row per committed run and tasks per call: median time of one chunk of test tasks, its
    ratio to the whole chunk at once, the kernel's share, and whether the scores agree."""
    rows = []
    for run, r in results["runs"].items():
        for k, p in r["paths"].items():
            rows.append(
                [
                    run,
                    k,
                    f"{p['median_s']:.2f}",
                    f"{p['ratio_to_whole_chunk']:.2f}",
                    f"{p['system_s']:.2f}",
                    "yes" if p["same_scores"] else "**no**",
                ]
            )
    header = ["run", "tasks per call", "s per chunk", "÷ whole chunk", "s in the kernel", "same scores"]
    return markdown_table(header, rows)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    parts = []
    gpu_speed, gpu_memory, check = (
        gpu_speed_results(),
        load("memory_vs_steps_gpu.json"),
        load("check_gpu.json"),
    )
    if check:
        # Later, shorter runs of single sections supersede the main run's rows.
        bisection = load("check_gpu_bisection_adam.json")
        if bisection:
            check["bisection"] = bisection["bisection"]
        compiled = compiled_rows_from_log() + (load("check_gpu_compiled.json") or {}).get("compiled", [])
        if compiled:
            check["compiled"] = list({(r["algorithm"], r["mode"]): r for r in compiled}.values())
    cpu_memory = load("memory_vs_steps_cpu.json")
    for caption, results in gpu_speed:
        parts.append(f"### GPU, {caption}: {machine_line(results['machine'])}\n")
        parts.append(speed_tables(results, skip_algorithms=("imaml",)))
    for name, caption in (
        ("meta_step_speed_cpu_mb4.json", "CPU, meta-batch 4"),
        ("meta_step_speed_cpu_mb4_others.json", "CPU, meta-batch 4, the other algorithms"),
        ("meta_step_speed_cpu_mb32.json", "CPU, meta-batch 32"),
    ):
        cpu = load(name)
        if cpu:
            parts.append(f"### {caption}: {machine_line(cpu['machine'])}\n")
            parts.append(speed_tables(cpu))
    for path in sorted(RESULTS.glob("meta_step_speed_cpu_finn*.json")):
        finn = load(path.name)
        s = finn["setting"]
        parts.append(
            f"### CPU, Finn et al.'s Omniglot protocol ({s['ways']}-way {s['shots']}-shot, strided network, "
            f"{s['queries']} query per class, meta-batch {s['meta_batch']}, "
            f"{finn['machine']['cpu_threads']} thread(s)): {machine_line(finn['machine'])}\n"
        )
        if finn.get("note"):
            parts.append(finn["note"] + "\n")
        parts.append(speed_tables(finn))
    if check:
        parts.append(f"### Agreement on the GPU: {machine_line(check['machine'])}\n")
        parts.append(check_table(check))
    emulation = load("capturable_adam_cpu.json")
    if check and check.get("float64") and emulation:
        parts.append(emulation_table(check["float64"], emulation))
    cpu_float32 = load("check_cpu_float32.json")
    if cpu_float32:
        parts.append(f"### float32 accuracy on the CPU: {machine_line(cpu_float32['machine'])}\n")
        parts.append(check_table(cpu_float32))
    if gpu_memory:
        parts.append(f"### Memory against inner steps, GPU: {machine_line(gpu_memory['machine'])}\n")
        parts.append(
            "Peak GPU memory one meta-gradient adds (MiB):\n\n" + memory_table(gpu_memory, "peak_memory_mib")
        )
    if cpu_memory:
        parts.append(f"\n### Memory against inner steps, CPU: {machine_line(cpu_memory['machine'])}\n")
        parts.append(
            "Growth of the peak resident set size (MiB):\n\n"
            + memory_table(cpu_memory, "peak_rss_growth_mib")
        )
    meta_test = load("meta_test_speed_cpu.json")
    if meta_test:
        parts.append(
            f"\n### Meta-testing on the CPU, {meta_test['tasks']} test tasks of each committed run: "
            f"{machine_line(meta_test['machine'])}\n"
        )
        if meta_test.get("note"):
            parts.append(meta_test["note"] + "\n")
        parts.append(meta_test_table(meta_test))
    (OUT / "performance_tables.md").write_text("\n".join(parts))
    memory_plot(gpu_memory, cpu_memory, OUT / "memory_vs_steps.png")
    print(f"wrote {OUT / 'performance_tables.md'} and {OUT / 'memory_vs_steps.png'}")


if __name__ == "__main__":
    main()
