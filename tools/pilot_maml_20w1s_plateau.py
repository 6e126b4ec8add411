"""Pilot: explanations of MAML 20-way 1-shot's plateau, measured.

The committed run ``results/omniglot/maml-20w1s`` (Finn et al.'s protocol) has validated
between 90% and 93% for thousands of meta-iterations, where Finn et al. report 95.8%. Three
measurements narrow down where the missing points are, and a fourth asks whether averaging φ
closes them, each written into one JSON file (``--out``, updated in place); chapter 8 (§8.6) prints
them and asserts what it says of them:

* ``evaluate``: the run's ``final.pt`` on 600 tasks of each split: does it fit tasks of its own
  meta-training classes better than tasks of new ones (meta-overfitting)? Then on 600 validation
  tasks with other test-time loops: 10 and 20 inner steps instead of 5, and the inner step halved
  and doubled: is φ good and only the test-time adaptation short?
* ``branch``: from a resume checkpoint (``last.pt``) of the run, train on with the outer (Adam) step
  ten times smaller, everything else, the task stream included, as the run itself continued from
  that checkpoint; validate on the run's own 200 tasks. If the plateau were the noise of the outer
  step, the smaller step would lift validation within a few hundred meta-iterations.
* ``compare``: the branch's checkpoint and the run's own at the same meta-iteration, on the same
  600 validation tasks: the mean of the per-task differences with its 95% CI (tighter than the
  two accuracies' CIs, as both score the very same tasks).
* ``snapshot``: a copy of the run's ``last.pt``, taken each time it checkpoints, stripped to what
  ``load_checkpoint`` needs (a few hundred KB), as ``<meta-iteration>.pt`` in a folder.
* ``average``: consecutive checkpoints of the run and the mean of their meta-parameters (a Polyak
  average), on the same 600 validation tasks: how far accuracy swings from one checkpoint to the
  next, and whether φ wanders around a better point that no single checkpoint reaches (the average
  against the latest and the best checkpoint, paired). The average and the latest checkpoint are
  then scored on the 600 test tasks of ``run.json``. Each window of checkpoints is kept under
  ``"averages"``, keyed by its last meta-iteration, so a window measured after the run went on joins
  the earlier ones.

    GBML_DATA_DIR=... python tools/pilot_maml_20w1s_plateau.py evaluate results/omniglot/maml-20w1s \\
        --out results/omniglot/pilots/maml-20w1s-plateau.json
    git show 32d28ab:results/omniglot/maml-20w1s/last.pt > /tmp/from/last.pt   # 26,000
    GBML_DATA_DIR=... python tools/pilot_maml_20w1s_plateau.py branch /tmp/from --scratch /tmp/branch \\
        --outer-lr 1e-4 --iterations 2000 --out results/omniglot/pilots/maml-20w1s-plateau.json
    # with a copy of the run's last.pt taken when it validated at 28,000, as the branch did:
    GBML_DATA_DIR=... python tools/pilot_maml_20w1s_plateau.py compare /tmp/branch/last.pt \\
        --against /tmp/run-28000/last.pt --out results/omniglot/pilots/maml-20w1s-plateau.json
    # while the run trains on, after each checkpoint (every 250 meta-iterations):
    python tools/pilot_maml_20w1s_plateau.py snapshot results/omniglot/maml-20w1s/last.pt \\
        --out results/omniglot/pilots/maml-20w1s-checkpoints
    # a window of 2,000 meta-iterations, in bash (the committed windows are the keys of the
    # JSON's "averages"):
    GBML_DATA_DIR=... python tools/pilot_maml_20w1s_plateau.py average \\
        results/omniglot/pilots/maml-20w1s-checkpoints/{32000..34000..250}.pt \\
        --out results/omniglot/pilots/maml-20w1s-plateau.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from gbml.notebook import machine_description, source_revision
from gbml.training import (
    TrainConfig,
    defining_differences,
    evaluate,
    load_checkpoint,
    mean_and_ci95,
    meta_learned_state,
    save_checkpoint,
    train,
)

#: Test-time loops compared with the run's own, as (inner steps, factor on the inner step);
#: None keeps the run's own number of steps.
TEST_LOOPS: dict[str, tuple[int | None, float]] = {
    "10 steps": (10, 1.0),
    "20 steps": (20, 1.0),
    "inner step x0.5": (None, 0.5),
    "inner step x2": (None, 2.0),
}


def percent(summary: dict) -> dict[str, float]:
    return {"mean": round(100 * summary["mean"], 2), "ci95": round(100 * summary["ci95"], 2)}


def measure_evaluations(run_dir: Path, tasks: int) -> dict:
    """Accuracy of the run's final φ on each split, and on validation with other test-time loops."""
    config, problem, phi = load_checkpoint(run_dir / "final.pt", "cpu")
    splits = {
        split: percent(evaluate(config, phi, problem, split=split, num_tasks=tasks))
        for split in ("train", "val", "test")
    }
    loops = {"own loop": splits["val"]}
    for label, (steps, factor) in TEST_LOOPS.items():
        changed = replace(
            config, inner_lr=factor * config.inner_lr, eval_inner_steps=steps or config.eval_inner_steps
        )
        loops[label] = percent(evaluate(changed, phi, problem, split="val", num_tasks=tasks))
        print(label, loops[label], flush=True)
    iteration = json.loads((run_dir / "run.json").read_text())["iterations"]
    return {"iteration": iteration, "tasks": tasks, "splits": splits, "val_test_loops": loops}


def measure_branch(from_dir: Path, scratch: Path, outer_lr: float, iterations: int) -> dict:
    """Train on from ``from_dir/last.pt`` with outer step ``outer_lr`` for ``iterations``."""
    scratch.mkdir(parents=True, exist_ok=True)
    if not (scratch / "last.pt").exists():
        # The branch is the run's own checkpoint with another outer step: model, Adam moments and
        # task generator as saved, so it draws the tasks the run itself drew after that point.
        state = torch.load(from_dir / "last.pt", map_location="cpu", weights_only=True)
        state["config"]["outer_lr"] = outer_lr
        torch.save(state, scratch / "last.pt")
        (scratch / "fork.json").write_text(json.dumps({"from_iteration": state["iteration"]}))
    begin = json.loads((scratch / "fork.json").read_text())["from_iteration"]
    state = torch.load(scratch / "last.pt", map_location="cpu", weights_only=True)
    config = replace(TrainConfig.from_dict(state["config"]), iterations=begin + iterations)
    history = train(config, scratch, resume=True, progress=False, log=sys.stdout)
    # Each validation records the run's training time so far; the branch's is counted from the fork.
    fork_elapsed = next(v["elapsed_s"] for v in history["val"] if v["iteration"] == begin)
    return {
        "from_iteration": begin,
        "outer_lr": outer_lr,
        "iterations": iterations,
        "val": [
            {"iteration": v["iteration"], **percent(v)} for v in history["val"] if v["iteration"] > begin
        ],
        "elapsed_s": round(history["val"][-1]["elapsed_s"] - fork_elapsed, 1),
    }


def paired(ours: dict, theirs: dict) -> dict[str, float]:
    """Mean per-task difference of two evaluations on the same tasks, with its 95% half-width."""
    mean, ci95 = mean_and_ci95(torch.tensor(ours["per_task"]) - torch.tensor(theirs["per_task"]))
    return percent({"mean": mean, "ci95": ci95})


def measure_comparison(branch: Path, run: Path, tasks: int) -> dict:
    """The branch's and the run's checkpoints at one meta-iteration on the same validation tasks."""
    scored, summaries = {}, {}
    for label, path in (("branch", branch), ("run", run)):
        config, problem, phi = load_checkpoint(path, "cpu")
        iteration = torch.load(path, map_location="cpu", weights_only=True)["iteration"]
        summaries[label] = evaluate(config, phi, problem, split="val", num_tasks=tasks, per_task=True)
        scored[label] = {"iteration": iteration, "outer_lr": config.outer_lr, **percent(summaries[label])}
    if scored["branch"]["iteration"] != scored["run"]["iteration"]:
        raise ValueError(
            f"compare needs checkpoints at the same meta-iteration, got {scored['branch']['iteration']} "
            f"(branch) and {scored['run']['iteration']} (run)"
        )
    return {**scored, "tasks": tasks, "difference": paired(summaries["branch"], summaries["run"])}


def measure_average(checkpoints: list[Path], tasks: int) -> dict:
    """Each checkpoint and the mean of their meta-parameters on the same validation tasks; the mean
    and the latest checkpoint also on the test tasks (the ones ``run.json``'s test scores)."""
    states = [torch.load(path, map_location="cpu", weights_only=True) for path in checkpoints]
    states.sort(key=lambda state: state["iteration"])
    iterations = [state["iteration"] for state in states]
    if len(set(iterations)) < len(iterations):
        raise ValueError(f"average needs checkpoints at distinct meta-iterations, got {iterations}")
    for state in states[1:]:
        if defining_differences(states[0]["config"], state["config"]):
            raise ValueError("average needs checkpoints of one run; these differ in their configuration")
    # phi holds the model's own parameter tensors, so loading a state into the model replaces it
    config, problem, phi = load_checkpoint(checkpoints[0], "cpu")

    def scored(model_state: dict[str, torch.Tensor], split: str) -> dict:
        problem.model.load_state_dict(model_state)
        return evaluate(config, phi, problem, split=split, num_tasks=tasks, per_task=True)

    each = [scored(state["model"], "val") for state in states]
    for iteration, summary in zip(iterations, each):
        print(iteration, percent(summary), flush=True)
    # averaged in float64, so the mean does not depend on the order of the checkpoints
    mean_state = {
        name: torch.stack([state["model"][name].double() for state in states]).mean(0).float()
        for name in states[0]["model"]
    }
    average, latest = scored(mean_state, "val"), each[-1]
    best = max(each, key=lambda summary: summary["mean"])  # chosen on these tasks: flatters it
    steps = [abs(b["mean"] - a["mean"]) for a, b in itertools.pairwise(each)]
    average_test, latest_test = scored(mean_state, "test"), scored(states[-1]["model"], "test")
    return {
        "tasks": tasks,
        "val": {
            "checkpoints": [
                {"iteration": iteration, **percent(summary)} for iteration, summary in zip(iterations, each)
            ],
            "largest_change_between_consecutive": round(100 * max(steps), 2),
            "average": percent(average),
            "average_minus_latest": paired(average, latest),
            "average_minus_best": paired(average, best),
        },
        "test": {
            "latest": percent(latest_test),
            "average": percent(average_test),
            "average_minus_latest": paired(average_test, latest_test),
        },
    }


def strip_to_snapshot(last: Path, folder: Path) -> Path:
    """``last.pt`` as ``export`` strips it for ``final.pt`` (:func:`gbml.training.meta_learned_state`),
    saved as ``folder/<meta-iteration>.pt``: a few hundred KB a checkpoint, small enough to commit."""
    state = torch.load(last, map_location="cpu", weights_only=True)
    path = folder / f"{state['iteration']}.pt"
    save_checkpoint(path, meta_learned_state(state))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("evaluate", "branch", "compare", "average", "snapshot"))
    parser.add_argument(
        "run_dir",
        type=Path,
        help="evaluate: the run's folder; branch: a folder with its last.pt; compare: the branch's last.pt; "
        "average: the first checkpoint; snapshot: the run's last.pt",
    )
    parser.add_argument("more", type=Path, nargs="*", help="average: the other checkpoints")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the JSON file to write or update (snapshot: the folder to save in)",
    )
    parser.add_argument(
        "--tasks", type=int, default=600, help="evaluate, compare, average: tasks per measurement"
    )
    parser.add_argument("--against", type=Path, help="compare: the run's checkpoint at the branch's end")
    parser.add_argument("--scratch", type=Path, help="branch: where the branch trains (resumable)")
    parser.add_argument("--outer-lr", type=float, default=1e-4, help="branch: its outer step")
    parser.add_argument("--iterations", type=int, default=2000, help="branch: meta-iterations from the fork")
    args = parser.parse_args()
    if args.more and args.part != "average":
        parser.error(f"{args.part} takes one path")
    if args.part == "snapshot":
        print(strip_to_snapshot(args.run_dir, args.out), "written")
        return
    torch.set_num_threads(1)  # beside a training run on a 2-core machine
    record = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.part == "evaluate":
        record["evaluate"] = measure_evaluations(args.run_dir, args.tasks)
    elif args.part == "branch":
        if args.scratch is None:
            parser.error("branch needs --scratch")
        record["branch"] = measure_branch(args.run_dir, args.scratch, args.outer_lr, args.iterations)
    elif args.part == "compare":
        if args.against is None:
            parser.error("compare needs --against")
        record["compare"] = measure_comparison(args.run_dir, args.against, args.tasks)
    else:
        if not args.more:
            parser.error("average needs at least two checkpoints")
        record.setdefault("averages", {})  # keyed by each window's last meta-iteration
        measured = measure_average([args.run_dir, *args.more], args.tasks)
        window = str(measured["val"]["checkpoints"][-1]["iteration"])
        record["averages"][window] = measured
    part = f"average {window}" if args.part == "average" else args.part
    record.setdefault("machines", {})[part] = machine_description(torch.device("cpu"))
    record.setdefault("sources", {})[part] = source_revision()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
