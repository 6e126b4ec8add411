"""How many tasks a CPU meta-test should adapt per vmap: the committed Omniglot runs, one chunk of
50 test tasks each, adapted 50, 25, 10 or 5 tasks per call (``evaluate(..., tasks_per_call=k)``).

Reports each path's wall time as a ratio against the whole chunk (50, the GPU default) timed in
the same process, alternating the paths call by call, with the system (kernel) CPU time of each
call: on the 2-core CPU the whole chunk of a 5-way 5-shot or 20-way 1-shot run spent most of
its time zero-filling freshly mapped memory. It also checks that every path scores the 50 tasks
alike. Needs the full Omniglot data set (GBML_DATA_DIR) and the committed runs.

    python benchmarks/meta_test_speed.py --threads 1 --out benchmarks/results/meta_test_speed_cpu.json
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_description, write_json
from gbml.training import evaluate, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 50  # evaluate's default chunk: the tasks drawn at once


def timed(fn) -> tuple[float, float, object]:
    """Wall and system CPU seconds of one call of ``fn``, and its result."""
    system = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_stime - system, result


def measure(run: str, groups: list[int], repeats: int) -> dict:
    config, problem, phi = load_checkpoint(ROOT / "results" / "omniglot" / run / "final.pt", "cpu")

    def path(k):
        return lambda: evaluate(config, phi, problem, num_tasks=CHUNK, per_task=True, tasks_per_call=k)

    scores = {k: path(k)() for k in groups}  # also the warm-up call of each path
    walls, systems = {k: [] for k in groups}, {k: [] for k in groups}
    for i in range(repeats):  # alternate the paths, in a rotating order, so drift hits all alike
        for k in groups[i % len(groups) :] + groups[: i % len(groups)]:
            wall, system, _ = timed(path(k))
            walls[k].append(wall)
            systems[k].append(system)
    whole = statistics.median(walls[CHUNK])
    return {
        "config": {"ways": config.ways, "shots": config.shots, "algorithm": config.algorithm},
        "paths": {
            str(k): {
                "median_s": statistics.median(walls[k]),
                "system_s": statistics.median(systems[k]),
                "ratio_to_whole_chunk": statistics.median(walls[k]) / whole,
                "same_scores": scores[k]["per_task"] == scores[CHUNK]["per_task"],
            }
            for k in groups
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="maml-5w1s,maml-5w5s,maml-20w1s,reptile-5w1s")
    parser.add_argument("--groups", default="50,25,10,5", help="tasks per call; 50 is the baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--note", default=None, help="what else ran on the machine, for the table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    groups = [int(k) for k in args.groups.split(",")]
    if CHUNK not in groups:
        raise ValueError(f"--groups must include {CHUNK}, the whole chunk every path is compared with")
    results = {}
    for run in args.runs.split(","):
        results[run] = measure(run, groups, args.repeats)
        for k, p in results[run]["paths"].items():
            print(
                f"{run:13s} {k:>2s} tasks per call: {p['median_s']:6.2f} s "
                f"({p['ratio_to_whole_chunk']:.2f}× the whole chunk), {p['system_s']:5.2f} s of it in the "
                f"kernel, same scores: {p['same_scores']}",
                flush=True,
            )
    if args.out:
        machine = machine_description(torch.device("cpu"))
        write_json(args.out, {"machine": machine, "tasks": CHUNK, "note": args.note, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
