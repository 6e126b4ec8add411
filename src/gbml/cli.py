"""``python -m gbml``: meta-train and meta-test from the command line.

Examples::

    python -m gbml train --algorithm maml --dataset sinusoid --iterations 70000 --out runs/sine-maml
    python -m gbml train --algorithm maml --dataset omniglot --ways 5 --shots 1 --queries 1 \\
        --inner-steps 1 --inner-lr 2.0 --eval-inner-steps 3 --meta-batch 32 --iterations 60000 \\
        --out runs/omni-5w1s     # Finn et al.'s protocol (their α = 0.4 on Σ CE/K is 2.0 here)
    python -m gbml train --resume runs/omni-5w1s   # continue it, options read from its last.pt
    python -m gbml train --resume runs/omni-5w1s --time-limit 600   # ... for ten minutes at most
    python -m gbml train --resume runs/omni-5w1s --iterations 80000   # ... and make it longer
                                  # (refused if --outer-lr-final anneals the step over its length)
    python -m gbml export runs/omni-5w1s     # final.pt and run.json, for sharing
    python -m gbml export runs/reptile-5w1s --as reptile-5w5s --out runs/reptile-5w5s
                                             # the same meta-training, meta-tested as 5-shot
    python -m gbml evaluate --checkpoint runs/omni-5w1s/final.pt --tasks 600
    python -m gbml pretrain --out runs/pretrained.pt   # the joint-training baseline
    python -m gbml train --algorithm maml --dataset omniglot-mini --iterations 20 --out runs/try
                                             # offline: the 50-character miniature shipped with gbml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from gbml.adapt import INNER_LOOPS
from gbml.errors import ConvergenceError, DivergenceError
from gbml.omniglot import DATA_DIR_ENV
from gbml.training import (
    ALGORITHMS,
    BATCHED,
    DATASETS,
    NETWORKS,
    OUTER_OPTIMIZERS,
    TrainConfig,
    evaluate,
    export_run,
    export_shared_training,
    load_checkpoint,
    resumed_config,
    train,
)

#: Every TrainConfig field's command-line option: (type, help, choices). The one place to add a
#: new field's option; a test checks that it covers TrainConfig exactly.
TRAIN_OPTIONS: dict[str, tuple[type, str, tuple[str, ...] | None]] = {
    "algorithm": (str, "the meta-learning algorithm", ALGORITHMS),
    "dataset": (str, "the task family", DATASETS),
    "ways": (int, "classes per task (Omniglot)", None),
    "shots": (int, "support examples (per class for Omniglot)", None),
    "queries": (int, "query examples (per class for Omniglot)", None),
    "inner_steps": (int, "inner gradient steps L during meta-training", None),
    "inner_lr": (float, "inner step size α, on the mean loss", None),
    "outer_lr": (float, "the outer optimizer's step size for the meta-parameters", None),
    "meta_batch": (int, "tasks per meta-iteration", None),
    "iterations": (int, "meta-iterations", None),
    "eval_inner_steps": (int, "inner steps at meta-test time (default: --inner-steps)", None),
    "lam": (float, "iMAML's λ", None),
    "cg_steps": (int, "iMAML's conjugate-gradient steps", None),
    "cg_tol": (float, "iMAML's CG tolerance (relative residual; a miss warns)", None),
    "damping": (float, "iMAML's damping δ: solve ((1 + δ)I + H/λ)x = g", None),
    "seed": (int, "seed of the initialisation and of task sampling", None),
    "device": (str, "auto (a GPU if there is one), cpu, cuda or cuda:N", None),
    "validate_every": (int, "meta-iterations between validations (and checkpoints)", None),
    "validation_tasks": (int, "tasks per validation", None),
    "batched": (str, "vmap over tasks (true), loop (false), vmap through torch.compile, or auto", BATCHED),
    "network": (
        str,
        "Omniglot network: Finn et al.'s strided net, Rajeswaran et al.'s (strided, flattened), or the "
        "max-pooling one",
        NETWORKS,
    ),
    "test_queries": (int, "query examples per class at validation and meta-test (default: --queries)", None),
    "outer_optimizer": (
        str,
        "outer optimizer (sgd with Reptile: φ moves outer-lr of the way to θ_t)",
        OUTER_OPTIMIZERS,
    ),
    "outer_lr_final": (float, "anneal the outer step size linearly to this over --iterations", None),
    "inner_batch": (int, "Reptile: each inner step on the next INNER_BATCH examples (default: all)", None),
    "eval_inner_batch": (
        int,
        "Reptile: at validation and meta-test, each step on the next EVAL_INNER_BATCH support examples "
        "(default: all)",
        None,
    ),
    "inner_optimizer": (
        str,
        "Reptile: plain gradient steps, or Adam's (β₁ = 0)",
        ("sgd", "adam"),
    ),
    "fast_weights": (
        str,
        "MAML/FO-MAML: adapt every parameter in the inner loop, or all but batch norm's (Finn et al.'s code)",
        ("all", "no_batch_norm"),
    ),
    "outer_eps": (float, "Adam's ε in the outer optimizer", None),
    "inner_loop": (
        str,
        "iMAML's inner loop: gradient descent on the proximal objective, or steps on the loss and then "
        "one on the proximal term (Rajeswaran et al.'s code)",
        INNER_LOOPS,
    ),
    "eval_lam": (
        float,
        "iMAML's λ at validation and meta-test (default: --lam; 0: plain gradient steps)",
        None,
    ),
    "inner_state": (
        str,
        "Reptile's inner Adam: fresh moments per task, or one state carried across tasks (Nichol et al.)",
        ("fresh", "carried"),
    ),
}


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        help="folder holding omniglot/ with the two zips (default: $GBML_DATA_DIR, then the cache)",
    )


def _parser() -> argparse.ArgumentParser:
    description = __doc__.split("\n")[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="python -m gbml", description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = TrainConfig()
    run = commands.add_parser("train", help="meta-train, with periodic validation and checkpoints")
    missing = {f.name for f in fields(TrainConfig)} ^ set(TRAIN_OPTIONS)
    if missing:
        raise RuntimeError(f"gbml.cli.TRAIN_OPTIONS and TrainConfig differ in {sorted(missing)}")
    for f in fields(TrainConfig):
        kind, help_text, choices = TRAIN_OPTIONS[f.name]
        default = getattr(defaults, f.name)
        # Options default to "not given" (SUPPRESS), so that a resumed run can tell what was asked for.
        run.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            choices=choices,
            default=argparse.SUPPRESS,
            help=help_text + ("" if default is None else f" (default: {default})"),
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
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bar; print one line per validation (to stderr) instead",
    )
    run.add_argument(
        "--test-tasks", type=int, default=600, help="meta-test tasks evaluated at the end (0: none)"
    )
    run.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="end this session at the last checkpoint that fits in SECONDS (at its pace so far); "
        "continue later with --resume",
    )
    export = commands.add_parser(
        "export", help="write final.pt (meta-parameters only) and run.json (curve, provenance) of a run"
    )
    export.add_argument("run_dir", help="a folder written by train (holding last.pt)")
    export.add_argument(
        "--test-tasks", type=int, default=600, help="meta-test tasks to evaluate final.pt on (0: none)"
    )
    export.add_argument("--device", default="cpu", help="device of that evaluation")
    export.add_argument(
        "--as",
        dest="as_run",
        metavar="NAME",
        help="export the (exported) run's meta-training as the registered protocol NAME, which must "
        "train identically and differ only at meta-test, e.g. reptile-5w5s from reptile-5w1s; needs --out",
    )
    export.add_argument("--out", help="with --as: the folder for that run's final.pt and run.json")
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
    joint.add_argument(
        "--dataset",
        choices=("omniglot", "omniglot-mini"),
        default="omniglot",
        help="the full data set, or the 50-character miniature shipped with gbml (default: omniglot)",
    )
    test = commands.add_parser("evaluate", help="mean metric ± 95%% CI over meta-test tasks")
    test.add_argument("--checkpoint", required=True, help="a final.pt, best.pt or last.pt written by train")
    test.add_argument("--tasks", type=int, default=600, help="tasks to adapt to and score (default: 600)")
    test.add_argument(
        "--split", choices=("train", "val", "test"), default="test", help="whose classes (default: test)"
    )
    test.add_argument("--seed", type=int, default=12345, help="seed of the tasks (default: 12345)")
    test.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    for command in (run, export, joint, test):
        _data_dir_option(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.data_dir is not None:  # read by gbml.load_omniglot, in this process only
        os.environ[DATA_DIR_ENV] = args.data_dir
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
            history = train(
                config,
                out,
                resume=bool(args.resume),
                progress=not args.no_progress,
                log=sys.stderr if args.no_progress else None,  # one line per validation instead
                time_limit_s=args.time_limit,
            )
            summary = {"out": out, "final_validation": history["val"][-1] if history["val"] else None}
            if args.test_tasks:
                _, problem, params = load_checkpoint(f"{out}/best.pt", config.device)
                summary["test"] = evaluate(config, params, problem, num_tasks=args.test_tasks)
        elif args.command == "pretrain":
            from gbml.baselines import PretrainConfig, pretrain, save_pretrained
            from gbml.notebook import resolve_device
            from gbml.omniglot import OmniglotTasks, load_omniglot, load_omniglot_miniature

            config = PretrainConfig(
                steps=args.steps, classes_per_batch=args.classes_per_batch, lr=args.lr, seed=args.seed
            )
            data = load_omniglot_miniature() if args.dataset == "omniglot-mini" else load_omniglot()
            family = OmniglotTasks(config.split, 5, data=data)
            body, record = pretrain(config, family, resolve_device(args.device))
            save_pretrained(args.out, body, record)
            summary = {"out": args.out, **{k: v for k, v in record.items() if k != "curve"}}
            summary["last"] = record["curve"][-1]
        elif args.command == "export":
            if args.as_run is None:
                if args.out is not None:
                    raise ValueError("export writes beside the run's checkpoints; --out goes with --as")
                exported = export_run(args.run_dir, test_tasks=args.test_tasks, device=args.device)
            else:
                from gbml.protocols import OMNIGLOT_RUNS

                if args.as_run not in OMNIGLOT_RUNS or args.out is None:
                    raise ValueError(
                        f"--as takes a registered run ({', '.join(OMNIGLOT_RUNS)}) and needs --out, "
                        f"got --as {args.as_run} --out {args.out}"
                    )
                exported = export_shared_training(
                    args.run_dir,
                    OMNIGLOT_RUNS[args.as_run],
                    args.out,
                    test_tasks=args.test_tasks,
                    device=args.device,
                    command=f"python -m gbml export {args.run_dir} --as {args.as_run} --out {args.out} "
                    f"--test-tasks {args.test_tasks} --device {args.device}",
                )
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
