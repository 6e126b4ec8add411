"""``python -m gbml``: meta-train and meta-test from the command line.

Examples::

    python -m gbml train --algorithm maml --dataset sinusoid --iterations 70000 --out runs/sine-maml
    python -m gbml train --algorithm maml --dataset omniglot --ways 5 --shots 1 --queries 1 \\
        --inner-steps 1 --inner-lr 2.0 --eval-inner-steps 3 --meta-batch 32 --iterations 60000 \\
        --out runs/omni-5w1s     # Finn et al.'s protocol (their α = 0.4 on Σ CE/K is 2.0 here)
    python -m gbml train --resume runs/omni-5w1s   # continue it, options read from its last.pt
    python -m gbml train --resume runs/omni-5w1s --iterations 80000   # ... and make it longer
    python -m gbml export runs/omni-5w1s     # final.pt and run.json, for sharing
    python -m gbml evaluate --checkpoint runs/omni-5w1s/final.pt --tasks 600
    python -m gbml pretrain --out runs/pretrained.pt   # the joint-training baseline
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from gbml.errors import ConvergenceError, DivergenceError
from gbml.training import (
    ALGORITHMS,
    DATASETS,
    TrainConfig,
    evaluate,
    export_run,
    load_checkpoint,
    resumed_config,
    train,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gbml", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = TrainConfig()
    run = commands.add_parser("train", help="meta-train, with periodic validation and checkpoints")
    # Options default to "not given" (SUPPRESS), so that a resumed run can tell what was asked for.
    run.add_argument(
        "--algorithm", choices=ALGORITHMS, default=argparse.SUPPRESS, help=f"(default: {defaults.algorithm})"
    )
    run.add_argument(
        "--dataset", choices=DATASETS, default=argparse.SUPPRESS, help=f"(default: {defaults.dataset})"
    )
    helps = {
        "ways": "classes per task (Omniglot)",
        "shots": "support examples (per class for Omniglot)",
        "queries": "query examples (per class for Omniglot)",
        "inner_steps": "inner gradient steps L during meta-training",
        "inner_lr": "inner step size α",
        "outer_lr": "Adam's step size for the meta-parameters",
        "meta_batch": "tasks per meta-iteration",
        "iterations": "meta-iterations",
        "eval_inner_steps": "inner steps at meta-test time (default: --inner-steps)",
        "lam": "iMAML's λ",
        "cg_steps": "iMAML's conjugate-gradient steps",
        "cg_tol": "iMAML's CG tolerance (relative residual; a miss warns)",
        "damping": "iMAML's damping δ: solve ((1 + δ)I + H/λ)x = g",
        "seed": "seed of the initialisation and of task sampling",
        "device": "auto (a GPU if there is one), cpu or cuda",
        "validate_every": "meta-iterations between validations (and checkpoints)",
        "validation_tasks": "tasks per validation",
        "batched": "vmap over tasks: auto, true, false, or compile (vmap through torch.compile)",
        "network": "Omniglot network: stride (Finn et al.'s Omniglot net, default) or max_pool",
        "test_queries": "query examples per class at validation and meta-test (default: --queries)",
        "outer_optimizer": "adam or sgd (SGD with Reptile: φ moves a fraction outer-lr towards θ_t)",
        "inner_batch": "Reptile: each inner step on the next INNER_BATCH examples of the task (default: all)",
        "outer_lr_final": "anneal the outer step size linearly to this over --iterations (default: constant)",
    }
    for f in fields(TrainConfig):
        if f.name in ("algorithm", "dataset"):
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], int)
        default = getattr(defaults, f.name)
        run.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            default=argparse.SUPPRESS,
            help=helps[f.name] + ("" if default is None else f" (default: {default})"),
        )
    run.add_argument("--out", help="output folder for checkpoints and history.json")
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue the run saved in RUN_DIR (or --out), with the options saved in its checkpoint; "
        "only --iterations, --device and --batched may be given, to change them",
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument(
        "--test-tasks", type=int, default=600, help="meta-test tasks evaluated at the end (0: none)"
    )
    export = commands.add_parser(
        "export", help="write final.pt (meta-parameters only) and run.json (curve, provenance) of a run"
    )
    export.add_argument("run_dir", help="a folder written by train (holding last.pt)")
    export.add_argument(
        "--test-tasks", type=int, default=600, help="meta-test tasks to evaluate final.pt on (0: none)"
    )
    export.add_argument("--device", default="cpu", help="device of that evaluation")
    joint = commands.add_parser(
        "pretrain", help="the non-meta-learned baseline: train one classifier on all meta-training classes"
    )
    joint.add_argument("--out", required=True, help="file for the body's parameters and the record (.pt)")
    joint.add_argument("--steps", type=int, default=20000, help="Adam steps")
    joint.add_argument(
        "--classes-per-batch", type=int, default=32, help="classes per batch (2 drawings each)"
    )
    joint.add_argument("--lr", type=float, default=1e-3, help="Adam's step size")
    joint.add_argument("--seed", type=int, default=0, help="initialisation and batches")
    joint.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    test = commands.add_parser("evaluate", help="mean metric ± 95%% CI over meta-test tasks")
    test.add_argument("--checkpoint", required=True)
    test.add_argument("--tasks", type=int, default=600)
    test.add_argument("--split", choices=("train", "val", "test"), default="test")
    test.add_argument("--seed", type=int, default=12345)
    test.add_argument("--device", default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
            out = args.resume if isinstance(args.resume, str) else args.out
            if out is None:
                raise ValueError("train needs --out (a new run's folder) or --resume RUN_DIR")
            if isinstance(args.resume, str) and args.out is not None and args.out != args.resume:
                raise ValueError(f"--out {args.out} and --resume {args.resume} name different runs")
            if args.resume and ((Path(out) / "last.pt").exists() or not given):
                config = resumed_config(out, given)  # (with no checkpoint and no options: an error)
            else:
                config = TrainConfig(**given)
            history = train(config, out, resume=bool(args.resume), progress=not args.no_progress)
            summary = {"out": out, "final_validation": history["val"][-1] if history["val"] else None}
            if args.test_tasks:
                _, problem, params = load_checkpoint(f"{out}/best.pt", config.device)
                summary["test"] = evaluate(config, params, problem, num_tasks=args.test_tasks)
        elif args.command == "pretrain":
            from gbml.baselines import PretrainConfig, pretrain, save_pretrained
            from gbml.notebook import resolve_device
            from gbml.omniglot import OmniglotTasks

            config = PretrainConfig(
                steps=args.steps, classes_per_batch=args.classes_per_batch, lr=args.lr, seed=args.seed
            )
            body, record = pretrain(config, OmniglotTasks(config.split, 5), resolve_device(args.device))
            save_pretrained(args.out, body, record)
            summary = {"out": args.out, **{k: v for k, v in record.items() if k != "curve"}}
            summary["last"] = record["curve"][-1]
        elif args.command == "export":
            exported = export_run(args.run_dir, test_tasks=args.test_tasks, device=args.device)
            summary = {k: v for k, v in exported.items() if k not in ("val", "train")}
            if "test" in summary:
                summary["test"] = {k: v for k, v in summary["test"].items() if k != "per_task"}
        else:
            config, problem, params = load_checkpoint(args.checkpoint, args.device)
            summary = evaluate(
                config, params, problem, split=args.split, num_tasks=args.tasks, seed=args.seed
            )
    except (ValueError, FileNotFoundError, FileExistsError, DivergenceError, ConvergenceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0
