"""The published Omniglot protocols, as ``gbml`` runs them (the book's Chapter 8).

Each entry is the :class:`~gbml.training.TrainConfig` of one committed run under
``results/omniglot/<name>/``; ``python -m gbml train`` with :func:`gbml.training.train_command`'s
options reproduces it. Finn et al.'s settings (MAML and FO-MAML) as their reference code
(cbfinn/maml) runs them:

* K support and K query images per class, in training and at test;
* their Omniglot network (``network="stride"``, :func:`gbml.models.finn_omniglot_net`), whose
  batch-norm shifts are not "fast weights": the inner loop leaves them at φ
  (``fast_weights="no_batch_norm"``). The committed 5-way MAML runs adapted them too (trained
  before gbml could freeze them; they met their targets that way), so they are registered with
  ``fast_weights="all"`` until they are retrained;
* one inner step of α = 0.4 for 5-way tasks (three at test), five of α = 0.1 for 20-way tasks.
  The reference loss is Σ_i CE_i / K over the N·K support images, whose gradient is N times that
  of the mean cross-entropy, so both are ``inner_lr`` = N·α = 2.0 on gbml's mean loss;
* meta-batches of 32 tasks (16 for 20-way), Adam with step size 10⁻³, 60,000 meta-iterations.

iMAML follows Rajeswaran et al.'s released code (:func:`rajeswaran_protocol`), Reptile Nichol et
al.'s (openai/supervised-reptile, :func:`nichol_protocol`).

Every run batches its tasks with ``vmap`` (``batched=True``; ``"compile"`` compiles that step):
on the 2-core CPU vmap is about twice as fast as the per-task loop at Finn et al.'s shape
(``benchmarks/meta_step_speed.py --finn``), and on GPUs it is the fast path. Reptile's carried
inner state makes each task depend on the one before, so its training takes the tasks in turn
and only its evaluation is batched. Validation: 200 tasks
of the 100 validation characters every 250 iterations (Reptile's cheaper iterations: every 1,000).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gbml.training import TrainConfig, reference_inner_lr

#: Finn et al.'s and Rajeswaran et al.'s budget (Reptile's is 100,000 or 200,000); a committed
#: run may have stopped earlier (its run.json says).
PAPER_ITERATIONS = 60_000


def finn_protocol(algorithm: str, ways: int, shots: int, fast_weights: str = "no_batch_norm") -> TrainConfig:
    """Finn et al.'s Omniglot protocol for ``algorithm`` ("maml" or "fomaml"); ``fast_weights="all"``
    adapts batch norm's shift too, where their code does not."""
    if algorithm not in ("maml", "fomaml"):
        raise ValueError(f"Finn et al.'s protocol is for maml and fomaml, got {algorithm!r}")
    if ways not in (5, 20):
        raise ValueError(f"Finn et al. ran 5-way and 20-way Omniglot, got ways={ways!r}")
    five_way = ways == 5
    return TrainConfig(
        algorithm=algorithm,
        dataset="omniglot",
        network="stride",
        ways=ways,
        shots=shots,
        queries=shots,
        inner_steps=1 if five_way else 5,
        eval_inner_steps=3 if five_way else 5,
        fast_weights=fast_weights,
        inner_lr=reference_inner_lr(0.4 if five_way else 0.1, ways),
        meta_batch=32 if five_way else 16,
        outer_lr=1e-3,
        iterations=PAPER_ITERATIONS,
        validate_every=250,
        validation_tasks=200,
        batched=True,
        seed=0,
    )


#: The meta-iterations Rajeswaran et al.'s code needs "to replicate the paper results", as its
#: README says (at least 20,000, at meta-batches of 32).
RAJESWARAN_ITERATIONS = 20_000

#: Adam's ε in Rajeswaran et al.'s outer optimizer.
RAJESWARAN_ADAM_EPS = 1e-3


def rajeswaran_protocol(ways: int, shots: int) -> TrainConfig:
    """iMAML as Rajeswaran et al.'s released code (aravindr93/imaml_dev) runs Omniglot: their
    network and initialisation (``network="stride_flatten"``); 16 inner gradient steps of 0.1 on
    the mean cross-entropy (25 for 20-way), then one step of 0.1 on the proximal term with λ = 2
    (``inner_loop="pull_back"``); 5 conjugate-gradient steps; meta-batches of 32; Adam with step
    10⁻³ and ε = 10⁻³; K queries per class; 20,000 meta-iterations; at test, the same 16 (25)
    steps without the proximal term (``eval_lam=0``).

    Their solve is damped: (2I + H/(λ + 10)) x = g. ``gbml.IMAML`` solves ((1 + δ)I + H/λ) x = g;
    with λ = 2 and δ = 11 that is (12I + H/2) x = g, whose solution is theirs divided by 6. Adam's
    step is the same for (g, ε) and (g/6, ε/6), so ε = 10⁻³/6 here makes every outer step theirs.
    What remains different: they draw training tasks from a fixed pool (200,000 in their README)
    where gbml draws a fresh task every time.
    """
    if ways not in (5, 20):
        raise ValueError(f"Rajeswaran et al. ran 5-way and 20-way Omniglot, got ways={ways!r}")
    steps = 16 if ways == 5 else 25
    system_scale = 6.0  # (12I + H/2) = 6 (2I + H/12)
    return TrainConfig(
        algorithm="imaml",
        dataset="omniglot",
        network="stride_flatten",
        ways=ways,
        shots=shots,
        queries=shots,
        inner_steps=steps,
        eval_inner_steps=steps,
        inner_loop="pull_back",
        inner_lr=0.1,
        lam=2.0,
        eval_lam=0.0,
        damping=11.0,
        cg_steps=5,
        meta_batch=32,
        outer_lr=1e-3,
        outer_eps=RAJESWARAN_ADAM_EPS / system_scale,
        iterations=RAJESWARAN_ITERATIONS,
        validate_every=250,
        validation_tasks=200,
        batched=True,
        seed=0,
    )


def nichol_protocol(ways: int, shots: int) -> TrainConfig:
    """Reptile as Nichol et al.'s code runs transductive Omniglot, as far as ``gbml.Reptile``
    allows: training tasks with 10 drawings per class (K support + 10 − K query; Reptile trains
    on both), inner steps on consecutive minibatches of 10 (20 for 20-way) examples, 5 of them
    (10 for 20-way), i.e. one pass over the task; meta-batches of 5 tasks; the outer step
    φ ← φ + ε (mean θ_t − φ) with ε annealed linearly from 1 to 0 (outer SGD); 100,000
    meta-iterations (200,000 for 20-way); at test, 50 steps on the K support images and one query
    image per class, predicted transductively.

    The inner optimiser is theirs, Adam with β₁ = 0 and step 10⁻³ (5·10⁻⁴ for 20-way), one
    optimiser for all tasks: its moments are carried from task to task (``inner_state="carried"``:
    the tasks of a meta-batch run in turn) and every validation and test task adapts from a copy of
    the training state, as their evaluation does. Each of the 50 test steps takes the next 5 support
    images (10 for 20-way; their ``eval_batch``), in class-interleaved order where they shuffle.
    Training does not depend on K (their 1-shot and 5-shot commands train alike), so one run's
    meta-training serves both settings (:func:`gbml.training.export_shared_training`). Two earlier
    runs are kept under ``results/omniglot/abandoned`` (the book's §8.3): plain gradient steps in
    place of Adam, and Adam with fresh moments per task.
    """
    if ways not in (5, 20):
        raise ValueError(f"Nichol et al. ran 5-way and 20-way Omniglot, got ways={ways!r}")
    five_way = ways == 5
    eval_batch = 5 if five_way else 10  # their eval_batch: None where it is the whole support set
    return TrainConfig(
        algorithm="reptile",
        dataset="omniglot",
        network="stride",
        ways=ways,
        shots=shots,
        queries=10 - shots,
        test_queries=1,
        inner_steps=5 if five_way else 10,
        inner_batch=10 if five_way else 20,
        eval_inner_steps=50,
        eval_inner_batch=eval_batch if ways * shots > eval_batch else None,
        inner_optimizer="adam",
        inner_state="carried",
        inner_lr=1e-3 if five_way else 5e-4,
        meta_batch=5,
        outer_optimizer="sgd",
        outer_lr=1.0,
        outer_lr_final=0.0,
        iterations=100_000 if five_way else 200_000,
        validate_every=1000,
        validation_tasks=200,
        batched=True,
        seed=0,
    )


def run_name(config: TrainConfig) -> str:
    """The folder name of a run, e.g. ``"maml-5w1s"``."""
    return f"{config.algorithm}-{config.ways}w{config.shots}s"


OMNIGLOT_RUNS: dict[str, TrainConfig] = (
    {
        run_name(config): config
        for config in (
            # The committed 5-way MAML runs as they were trained (see the module docstring).
            finn_protocol(
                algorithm, ways, shots, "all" if (algorithm, ways) == ("maml", 5) else "no_batch_norm"
            )
            for ways, shots in ((5, 1), (5, 5), (20, 1), (20, 5))
            for algorithm in ("maml", "fomaml")
        )
    }
    | {
        run_name(config): config
        for config in (rajeswaran_protocol(ways, shots) for ways, shots in ((5, 1), (5, 5), (20, 1), (20, 5)))
    }
    | {
        run_name(config): config
        for config in (nichol_protocol(ways, shots) for ways, shots in ((5, 1), (5, 5), (20, 1), (20, 5)))
    }
)


#: The folder under ``results/omniglot`` that holds the GPU runs.
GPU_FOLDER = "gpu"

#: Runs that only a GPU trains, under ``results/omniglot/gpu/<name>/`` beside the CPU runs: the
#: paper's protocol exactly and its whole budget, where the CPU run of the same published row differs
#: or stops short (``tools/gpu_omniglot.sh`` trains them). The name after ``gpu/`` is that row's.
GPU_RUNS: dict[str, TrainConfig] = {
    f"{GPU_FOLDER}/maml-5w1s": finn_protocol("maml", 5, 1, "no_batch_norm"),
}

#: Every registered run's protocol, by the name :func:`committed_runs` gives its folder.
REGISTERED_RUNS: dict[str, TrainConfig] = OMNIGLOT_RUNS | GPU_RUNS


def published_name(name: str) -> str:
    """The published row a committed run compares with: ``"gpu/maml-5w1s"`` → ``"maml-5w1s"``."""
    return name.removeprefix(f"{GPU_FOLDER}/")


def _runs_holding(results: Path, filename: str) -> list[Path]:
    """Every ``<name>/`` and ``gpu/<name>/`` under ``results`` that holds ``filename``."""
    found = [*results.glob(f"*/{filename}"), *results.glob(f"{GPU_FOLDER}/*/{filename}")]
    return [path.parent for path in found]


def _by_name(results: Path, folders: list[Path]) -> dict[str, Path]:
    return dict(sorted((folder.relative_to(results).as_posix(), folder) for folder in folders))


def committed_runs(results: str | Path) -> dict[str, Path]:
    """The runs exported under ``results`` (the book's ``results/omniglot``), by name, sorted: each
    ``<name>/`` and ``gpu/<name>/`` that holds a run.json (pilots and abandoned runs lie deeper)."""
    results = Path(results)
    return _by_name(results, _runs_holding(results, "run.json"))


def runs_in_training(results: str | Path) -> dict[str, Path]:
    """The runs under ``results`` that have started but are not exported yet, by name, sorted: each
    ``<name>/`` and ``gpu/<name>/`` that holds a last.pt and no run.json
    (:func:`gbml.training.training_summary` says how far one got)."""
    results = Path(results)
    started = [folder for folder in _runs_holding(results, "last.pt") if not (folder / "run.json").exists()]
    return _by_name(results, started)


def smoke_version(config: TrainConfig, iterations: int = 4) -> TrainConfig:
    """The same protocol at a tiny size, for tests and the chapter's smoke run."""
    return replace(config, iterations=iterations, validate_every=2, validation_tasks=4, meta_batch=2)


#: Published Omniglot accuracies (%, 600 test tasks, 95% CI where given), keyed by run name:
#: Finn et al. 2017, Table 1 (MAML); Nichol et al. 2018, Table 1 (first-order MAML, "1st-order MAML
#: + Transduction": Finn et al. report first-order results on miniImageNet only; and Reptile,
#: transductive); Rajeswaran et al. 2019, Table 2 (iMAML, GD inner solver, the variant gbml
#: implements).
PUBLISHED: dict[str, tuple[float, float | None, str]] = {
    "maml-5w1s": (98.7, 0.4, "Finn et al. 2017"),
    "maml-5w5s": (99.9, 0.1, "Finn et al. 2017"),
    "maml-20w1s": (95.8, 0.3, "Finn et al. 2017"),
    "maml-20w5s": (98.9, 0.2, "Finn et al. 2017"),
    "fomaml-5w1s": (98.3, 0.5, "Nichol et al. 2018, transductive"),
    "fomaml-5w5s": (99.2, 0.2, "Nichol et al. 2018, transductive"),
    "fomaml-20w1s": (89.4, 0.5, "Nichol et al. 2018, transductive"),
    "fomaml-20w5s": (97.9, 0.1, "Nichol et al. 2018, transductive"),
    "reptile-5w1s": (97.68, 0.04, "Nichol et al. 2018, transductive"),
    "reptile-5w5s": (99.48, 0.06, "Nichol et al. 2018, transductive"),
    "reptile-20w1s": (89.43, 0.14, "Nichol et al. 2018, transductive"),
    "reptile-20w5s": (97.12, 0.32, "Nichol et al. 2018, transductive"),
    "imaml-5w1s": (99.16, 0.35, "Rajeswaran et al. 2019, GD"),
    "imaml-5w5s": (99.67, 0.12, "Rajeswaran et al. 2019, GD"),
    "imaml-20w1s": (94.46, 0.42, "Rajeswaran et al. 2019, GD"),
    "imaml-20w5s": (98.69, 0.1, "Rajeswaran et al. 2019, GD"),
}

#: The accuracy (%) a committed run should reach to count as reproducing its paper: within about
#: two points of the published 5-way 1-shot numbers, one point of the 5-shot ones.
TARGETS: dict[str, float] = {
    "maml-5w1s": 97.0,
    "fomaml-5w1s": 96.0,
    "reptile-5w1s": 96.0,
    "imaml-5w1s": 96.0,
    "maml-5w5s": 99.0,
    "fomaml-5w5s": 99.0,
    "reptile-5w5s": 99.0,
    "imaml-5w5s": 99.0,
    "maml-20w1s": 93.0,
}
