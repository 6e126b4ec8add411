"""Meta-training and meta-testing runs: what ``python -m gbml train/evaluate`` does, as functions
that notebooks can call too.

A run is described by a :class:`TrainConfig`. :func:`train` meta-trains with periodic validation
and writes checkpoints atomically (so an interrupted run loses at most one validation period and
can be resumed with the same result as an uninterrupted one); :func:`evaluate` reports the mean
post-adaptation metric over many meta-test tasks with a 95% confidence interval, the papers'
protocol (600 tasks for Omniglot in Finn et al. 2017).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from gbml.adapt import LossFn
from gbml.algorithms import FOMAML, IMAML, MAML, InnerAdamState, MetaAlgorithm, Reptile
from gbml.compiled import CompiledMetaStep
from gbml.errors import check_positive_integer
from gbml.meta import MetaStepResult, apply_meta_gradient, carried_meta_gradient, choose_batched, meta_step
from gbml.models import (
    ConvNet,
    SinusoidMLP,
    finn_omniglot_net,
    is_batch_norm,
    make_loss,
    rajeswaran_omniglot_net,
)
from gbml.notebook import exact_float32, machine_description, resolve_device, source_revision, tf32_enabled
from gbml.params import Params, detached, parameters_of
from gbml.tasks import SinusoidTasks, Task

ALGORITHMS = ("maml", "fomaml", "reptile", "imaml")
#: "omniglot-mini" is the 50-character miniature shipped with gbml (tests, offline trials).
DATASETS = ("sinusoid", "omniglot", "omniglot-mini")
NETWORKS = ("stride", "stride_flatten", "max_pool")
#: TrainConfig.batched: the API's ``True`` / ``False`` / ``"auto"`` (:func:`gbml.choose_batched`),
#: plus ``"compile"`` (the vmap step through torch.compile). On the command line and in saved
#: records, ``True`` and ``False`` are spelt "true" and "false".
BATCHED = ("auto", "true", "false", "compile")


def batched_value(value: bool | str) -> bool | str:
    """``batched`` as the API takes it: "true"/"false" (the command line's spelling) become bools."""
    return {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value


def batched_name(value: bool | str) -> str:
    """``batched`` as the command line spells it."""
    return {True: "true", False: "false"}.get(value, value) if isinstance(value, bool) else value


OUTER_OPTIMIZERS = ("adam", "sgd")
#: TrainConfig.inner_state: Reptile's inner Adam started afresh for every task, or one carried
#: from task to task through training and into evaluation (Nichol et al.'s code).
INNER_STATES = ("fresh", "carried")
#: TrainConfig.fast_weights: which parameters MAML's and FO-MAML's inner loop adapts. Finn et al.'s
#: code adapts all but batch norm's shift ("no_batch_norm"), which only the outer loop learns.
FAST_WEIGHTS = ("all", "no_batch_norm")
#: The options a resumed run may change: its length (unless the outer step is annealed over it),
#: and where and along which code path it runs (every path computes the same meta-gradient up to
#: rounding; the test suite checks this).
EXECUTION_OPTIONS = ("iterations", "device", "batched")
#: The options that change only how a run is validated and meta-tested, never its meta-training.
EVALUATION_OPTIONS = (
    "eval_inner_steps",
    "eval_inner_batch",
    "eval_lam",
    "test_queries",
    "validate_every",
    "validation_tasks",
)


@dataclass
class TrainConfig:
    """Everything that defines a meta-training run (the command line's options).

    ``inner_lr`` is the step size on the *mean* loss over the support set. Finn et al.'s reference
    code divides each example's cross-entropy by K and differentiates the *sum*, i.e. N times the
    mean's gradient for N-way tasks: their α = 0.4 (5-way) and 0.1 (20-way) are ``inner_lr`` =
    N·α = 2.0 here (see :func:`reference_inner_lr`).

    ``network`` (Omniglot): ``"stride"`` is Finn et al.'s Omniglot network with their
    initialisation (:func:`gbml.models.finn_omniglot_net`); ``"stride_flatten"`` is Rajeswaran et
    al.'s, with theirs (:func:`gbml.models.rajeswaran_omniglot_net`); ``"max_pool"`` is
    ``ConvNet(ways)``: max pooling, batch norm with γ and β, PyTorch's default initialisation.

    ``outer_eps`` is Adam's ε (PyTorch's default 10⁻⁸). Adam's step is unchanged when the
    meta-gradient and ε are scaled together, but not when only one is: a large ε makes the step
    depend on the meta-gradient's scale.

    iMAML: ``inner_loop`` solves the proximal inner problem by gradient descent on it
    (``"proximal"``) or as Rajeswaran et al.'s code does (``"pull_back"``, see
    :class:`gbml.IMAML`); ``eval_lam`` is λ at validation and meta-test (None: ``lam``; 0: no
    proximal term, plain gradient steps from φ, as their code meta-tests).

    ``inner_state="carried"`` (Reptile with ``inner_optimizer="adam"``) keeps one inner Adam for
    all tasks, as Nichol et al.'s code does: training takes a meta-batch's tasks in turn
    (:func:`gbml.meta.carried_meta_gradient`), the state is checkpointed with the run, and
    validation and meta-test tasks each adapt from a copy of it (:attr:`Problem.inner_state`).
    ``batched`` then applies to evaluation only.

    ``fast_weights="no_batch_norm"`` (MAML, FO-MAML) leaves batch norm's parameters at φ in the
    inner loop, at training and at test, as Finn et al.'s code does (:attr:`Problem.frozen`).
    """

    algorithm: str = "maml"
    dataset: str = "sinusoid"
    ways: int = 5
    shots: int = 5
    queries: int = 10
    inner_steps: int = 1
    inner_lr: float = 0.01
    outer_lr: float = 1e-3
    meta_batch: int = 25
    iterations: int = 1000
    eval_inner_steps: int | None = None
    lam: float = 2.0
    cg_steps: int = 5
    cg_tol: float = 1e-2
    damping: float = 0.0
    seed: int = 0
    device: str = "auto"
    validate_every: int = 100
    validation_tasks: int = 100
    batched: bool | str = "auto"
    network: str = "stride"
    test_queries: int | None = None
    outer_optimizer: str = "adam"
    outer_lr_final: float | None = None
    inner_batch: int | None = None
    inner_optimizer: str = "sgd"
    inner_state: str = "fresh"
    fast_weights: str = "all"
    eval_inner_batch: int | None = None
    outer_eps: float = 1e-8
    inner_loop: str = "proximal"
    eval_lam: float | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        for name in (
            "ways",
            "shots",
            "queries",
            "meta_batch",
            "iterations",
            "validate_every",
            "validation_tasks",
        ):
            check_positive_integer(name, getattr(self, name))
        if self.eval_inner_steps is not None and self.eval_inner_steps < 0:
            raise ValueError(f"eval_inner_steps must be non-negative, got {self.eval_inner_steps!r}")
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be positive, got {self.outer_lr!r}")
        if self.test_queries is not None and (
            isinstance(self.test_queries, bool)
            or not isinstance(self.test_queries, int)
            or self.test_queries < 1
        ):
            raise ValueError(f"test_queries must be a positive integer or None, got {self.test_queries!r}")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(f"outer_optimizer must be 'adam' or 'sgd', got {self.outer_optimizer!r}")
        if self.outer_lr_final is not None and not self.outer_lr_final >= 0:
            raise ValueError(f"outer_lr_final must be non-negative or None, got {self.outer_lr_final!r}")
        for name in ("inner_batch", "eval_inner_batch"):
            if getattr(self, name) is not None and self.algorithm != "reptile":
                raise ValueError(f"{name} is Reptile's (minibatch inner steps), not {self.algorithm}'s")
        if self.dataset != "sinusoid":  # a minibatch must fit in a task's N·K images (N·(K+Q) in training)
            sizes = {
                "inner_batch": self.ways * (self.shots + self.queries),
                "eval_inner_batch": self.ways * self.shots,
            }
            for name, size in sizes.items():
                if getattr(self, name) is not None and getattr(self, name) > size:
                    raise ValueError(
                        f"{name} {getattr(self, name)} is more than the {size} images it is drawn from"
                    )
        if self.inner_optimizer != "sgd" and self.algorithm != "reptile":
            raise ValueError(f"inner_optimizer {self.inner_optimizer!r} is Reptile's, not {self.algorithm}'s")
        if self.inner_state not in INNER_STATES:
            raise ValueError(f"inner_state must be 'fresh' or 'carried', got {self.inner_state!r}")
        if self.inner_state == "carried" and (self.algorithm != "reptile" or self.inner_optimizer != "adam"):
            raise ValueError("inner_state='carried' is for Reptile with inner_optimizer='adam'")
        if self.inner_state == "carried" and self.batched == "compile":
            raise ValueError(
                "inner_state='carried' takes a meta-batch's tasks in turn: there is no batched step to "
                "compile; use batched true (vmap at evaluation) or false"
            )
        if self.fast_weights not in FAST_WEIGHTS:
            raise ValueError(f"fast_weights must be 'all' or 'no_batch_norm', got {self.fast_weights!r}")
        if self.fast_weights != "all" and self.algorithm not in ("maml", "fomaml"):
            raise ValueError(
                f"fast_weights={self.fast_weights!r} is for MAML and FO-MAML: {self.algorithm} learns "
                "only what its inner loop adapts (Reptile) or adapts every parameter (iMAML)"
            )
        if not (isinstance(self.outer_eps, (int, float)) and self.outer_eps > 0):
            raise ValueError(f"outer_eps (Adam's ε) must be positive, got {self.outer_eps!r}")
        if self.outer_eps != 1e-8 and self.outer_optimizer != "adam":
            raise ValueError(f"outer_eps is Adam's ε; outer_optimizer {self.outer_optimizer!r} has none")
        for name in ("inner_loop", "eval_lam"):
            if getattr(self, name) != getattr(TrainConfig, name) and self.algorithm != "imaml":
                raise ValueError(f"{name} is iMAML's, not {self.algorithm}'s")
        if self.eval_lam is not None and not (isinstance(self.eval_lam, (int, float)) and self.eval_lam >= 0):
            raise ValueError(f"eval_lam must be non-negative or None, got {self.eval_lam!r}")
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, got {self.network!r}")
        if not isinstance(self.batched, bool) and self.batched not in BATCHED:
            raise ValueError(f"batched must be True, False, 'auto' or 'compile', got {self.batched!r}")
        self.batched = batched_value(self.batched)  # one vocabulary: "true" (a saved run's) is True
        # Validates inner_lr, inner_steps, lam, cg_steps (and iMAML's inner_loop).
        self._algorithm(self.inner_steps, None, frozenset())

    @property
    def evaluation_queries(self) -> int:
        """Query images (per class for Omniglot) of validation and meta-test tasks."""
        return self.queries if self.test_queries is None else self.test_queries

    def outer_lr_at(self, iteration: int) -> float:
        """The outer step size of meta-iteration ``iteration`` (0-based): ``outer_lr``, or with
        ``outer_lr_final`` set, linearly annealed from ``outer_lr`` to it over ``iterations``."""
        if self.outer_lr_final is None:
            return self.outer_lr
        return self.outer_lr + (self.outer_lr_final - self.outer_lr) * iteration / self.iterations

    def make_outer_optimizer(self, params) -> torch.optim.Optimizer:
        """Adam, or plain SGD (with which Reptile's φ ← φ − ε Δ is its interpolation towards θ_t)."""
        if self.outer_optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.outer_lr)
        return torch.optim.Adam(params, lr=self.outer_lr, eps=self.outer_eps)

    @property
    def test_inner_steps(self) -> int:
        return self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps

    def make_test_algorithm(self, problem: Problem | None = None) -> MetaAlgorithm:
        """The algorithm whose TASK_ADAPT validates and meta-tests this run: ``test_inner_steps``
        steps, and for iMAML λ = ``eval_lam`` where it is set. With ``eval_lam=0`` there is no
        proximal term: adaptation is plain gradient descent from φ, which is FO-MAML's TASK_ADAPT,
        so that is what this returns. ``problem`` as for :meth:`make_algorithm`."""
        algorithm = self.make_algorithm(self.test_inner_steps, problem)
        if self.algorithm != "imaml" or self.eval_lam is None:
            return algorithm
        if self.eval_lam == 0:
            return FOMAML(self.inner_lr, self.test_inner_steps)
        return replace(algorithm, lam=self.eval_lam)

    def make_algorithm(self, inner_steps: int | None = None, problem: Problem | None = None) -> MetaAlgorithm:
        """The algorithm with this run's hyperparameters (``inner_steps`` steps if given, e.g. at
        meta-test) for ``problem``: its frozen parameters (``fast_weights``) stay at φ in the inner
        loop, and Reptile's inner Adam starts from its carried state. Without ``problem``: every
        parameter adapted, fresh inner state; refused (``ValueError``) where the run's protocol
        needs the problem: ``fast_weights`` other than "all", or a carried inner state."""
        steps = self.inner_steps if inner_steps is None else inner_steps
        if problem is not None:
            return self._algorithm(steps, problem.inner_state, problem.frozen)
        if self.fast_weights != "all":
            raise ValueError(
                f"fast_weights={self.fast_weights!r} depends on the network's parameter names: pass "
                "problem=make_problem(config, device) (or a loaded run's problem)"
            )
        if self.inner_state == "carried":
            raise ValueError(
                "inner_state='carried': meta-test adaptation starts from the run's carried inner state; "
                "pass the run's problem (load_checkpoint gives it), or replace inner_state by 'fresh'"
            )
        return self._algorithm(steps, None, frozenset())

    def _algorithm(
        self, steps: int, start_state: InnerAdamState | None, frozen: frozenset[str]
    ) -> MetaAlgorithm:
        if self.algorithm == "maml":
            return MAML(self.inner_lr, steps, frozen=frozen)
        if self.algorithm == "fomaml":
            return FOMAML(self.inner_lr, steps, frozen=frozen)
        if self.algorithm == "reptile":
            return Reptile(
                self.inner_lr,
                steps,
                inner_batch=self.inner_batch,
                adapt_batch=self.eval_inner_batch,
                inner_optimizer=self.inner_optimizer,
                start_state=start_state,
            )
        # Truncated solves are iMAML's normal regime in training, so a missed tolerance warns.
        return IMAML(
            self.inner_lr,
            self.lam,
            inner_steps=steps,
            cg_steps=self.cg_steps,
            cg_tol=self.cg_tol,
            damping=self.damping,
            on_cg_failure="warn",
            inner_loop=self.inner_loop,
        )

    @property
    def batched_option(self) -> bool | str:
        """``batched`` for :func:`gbml.meta_step` and evaluation ("compile" compiles the training
        step only; evaluation then runs the vmap path uncompiled)."""
        return True if self.batched == "compile" else self.batched

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _as_config(config: TrainConfig | dict[str, Any]) -> TrainConfig:
    """``config`` itself, or the configuration a saved dict describes (see :meth:`TrainConfig.from_dict`)."""
    return config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)


def defining_differences(
    first: TrainConfig | dict[str, Any], second: TrainConfig | dict[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """The options that define a run in which two configurations differ, as
    ``{name: (first's value, second's value)}``.

    Every option but those of :data:`EXECUTION_OPTIONS` defines a run: two runs that agree on them
    train the same problem from the same φ0 on the same task stream. ``iterations`` defines it too
    when the outer step size is annealed over them (``outer_lr_final``): the length then sets every
    step's size. A dict (a checkpoint's or a ``run.json``'s ``config``) that lacks an option, having
    been written before it existed, is read at the option's default, which is the behaviour every
    option was added to keep."""
    first, second = _as_config(first), _as_config(second)
    differences = {
        f.name: (getattr(first, f.name), getattr(second, f.name))
        for f in fields(TrainConfig)
        if f.name not in EXECUTION_OPTIONS and getattr(first, f.name) != getattr(second, f.name)
    }
    annealed = first.outer_lr_final is not None or second.outer_lr_final is not None
    if annealed and first.iterations != second.iterations:
        differences["iterations"] = (first.iterations, second.iterations)
    return differences


def training_differences(
    first: TrainConfig | dict[str, Any], second: TrainConfig | dict[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """The options in which two configurations' *meta-training* differs, as
    ``{name: (first's value, second's value)}``; empty when both train the same sequence of φ
    from the same φ0 on the same task stream, and differ at most in how they are validated and
    meta-tested.

    That is :func:`defining_differences` less :data:`EVALUATION_OPTIONS`, with one refinement.
    Reptile trains on each task's support and query images together (``Task.joined``), so its
    ``shots`` and ``queries`` count only through their sum: Nichol et al. meta-train 5-way 1-shot
    and 5-shot alike, on 10 drawings per class, and differ only at test. (The test suite checks
    that two such runs of their protocol give the same φ bit for bit; with full-batch inner steps
    the same images are summed in another order, so φ agrees up to rounding.)"""
    first, second = _as_config(first), _as_config(second)
    differences = {
        name: values
        for name, values in defining_differences(first, second).items()
        if name not in EVALUATION_OPTIONS
    }
    if (
        first.algorithm == second.algorithm == "reptile"
        and first.shots + first.queries == second.shots + second.queries
    ):
        differences.pop("shots", None)
        differences.pop("queries", None)
    return differences


def resumed_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The configuration of the run saved in ``run_dir/last.pt``, for continuing it.

    ``overrides`` may change the options of :data:`EXECUTION_OPTIONS` (how long and how the run
    goes on; not how long when the outer step is annealed over the run's length); any other option
    given must equal the saved value, or this raises ``ValueError`` naming the differences."""
    last = Path(run_dir) / "last.pt"
    if not last.exists():
        raise FileNotFoundError(f"no checkpoint at {last}: nothing to resume")
    saved = TrainConfig.from_dict(torch.load(last, map_location="cpu", weights_only=True)["config"])
    overrides = overrides or {}
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; TrainConfig has no such fields")
    conflicting = defining_differences(saved, replace(saved, **overrides))
    if conflicting:
        raise ValueError(
            f"{last} was written with other options (saved, given): {conflicting}; a resumed run may "
            f"change only {', '.join(EXECUTION_OPTIONS)} (not iterations when outer_lr_final anneals "
            "the outer step over them)"
        )
    return replace(saved, **{k: v for k, v in overrides.items() if k in EXECUTION_OPTIONS})


def reference_inner_lr(alpha: float, ways: int) -> float:
    """The ``inner_lr`` (on the mean loss) equivalent to step size ``alpha`` in Finn et al.'s
    reference code, whose inner gradient is that of Σ_i CE_i / K over the N·K support examples,
    i.e. N × the gradient of the mean cross-entropy."""
    return alpha * ways


@dataclass
class Problem:
    """The network, its loss, the per-task metric and where tasks come from."""

    model: nn.Module
    loss: LossFn
    metric_name: str
    metric: Any  # (params, x, y) -> Tensor, higher is better for accuracy, lower for mse
    tasks: dict[
        str, Any
    ]  # split name -> object with .sample(num_tasks, shots, queries, generator, device=...)
    higher_is_better: bool = field(default=False)
    frozen: frozenset[str] = frozenset()
    """Parameters the inner loop leaves at φ (``TrainConfig.fast_weights``)."""
    inner_state: InnerAdamState | None = None
    """The inner optimiser's state of a run with ``inner_state="carried"`` (None otherwise):
    evaluation adapts every task from a copy of it, as Nichol et al.'s code does."""


def make_problem(config: TrainConfig, device: torch.device) -> Problem:
    """Build the model, loss, metric and task sources of ``config``'s dataset."""
    torch.manual_seed(config.seed)
    if config.dataset == "sinusoid":
        model = SinusoidMLP().to(device)
        loss = make_loss(model, F.mse_loss)
        family = SinusoidTasks()
        splits = {"train": family, "val": family, "test": family}
        return Problem(model, loss, "mse", loss, splits, frozen=frozen_parameters(config, model))
    from gbml.omniglot import OmniglotTasks, load_omniglot, load_omniglot_miniature  # reads files

    if config.network == "stride":
        model = finn_omniglot_net(config.ways).to(device)
    elif config.network == "stride_flatten":
        model = rajeswaran_omniglot_net(config.ways).to(device)
    else:
        model = ConvNet(ways=config.ways).to(device)
    loss = make_loss(model, F.cross_entropy)

    def accuracy(params: Params, x: Tensor, y: Tensor) -> Tensor:
        logits = torch.func.functional_call(model, params, (x,))
        return (logits.argmax(dim=-1) == y).to(logits.dtype).mean()

    # Loaded once, shared by the three splits.
    data = load_omniglot_miniature() if config.dataset == "omniglot-mini" else load_omniglot()
    tasks = {split: OmniglotTasks(split, config.ways, data=data) for split in ("train", "val", "test")}
    return Problem(
        model,
        loss,
        "accuracy",
        accuracy,
        tasks,
        higher_is_better=True,
        frozen=frozen_parameters(config, model),
    )


def frozen_parameters(config: TrainConfig, model: nn.Module) -> frozenset[str]:
    """The names of the parameters ``config.fast_weights`` keeps out of the inner loop (empty for
    "all"; batch norm's parameters for "no_batch_norm", or ``ValueError`` if ``model`` has none)."""
    if config.fast_weights == "all":
        return frozenset()
    frozen = frozenset(
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if is_batch_norm(module)
        for name, _ in module.named_parameters(recurse=False)
    )
    if not frozen:
        raise ValueError(
            f"fast_weights={config.fast_weights!r}, but the network has no batch norm parameters"
        )
    return frozen


def adapt_for_evaluation(algorithm: MetaAlgorithm, loss: LossFn, phi: Params, task: Task) -> Params:
    """Meta-test adaptation: the algorithm's own TASK_ADAPT (``algorithm.adapt``) on the support
    set only (iMAML's is proximal; Reptile's uses only the support set, since a test task's query
    set is unseen)."""
    return algorithm.adapt(loss, phi, *task.support)


def evaluate_tasks(
    algorithm: MetaAlgorithm, problem: Problem, phi: Params, tasks: Task, *, batched: bool | str = "auto"
) -> Tensor:
    """The metric after adaptation for every task of a batch (shape (T,))."""
    phi = detached(phi)

    def one(task: Task) -> Tensor:
        theta = adapt_for_evaluation(algorithm, problem.loss, phi, task)
        return problem.metric(theta, *task.query).detach()

    if choose_batched(problem.loss, phi, batched):
        return vmap(one, randomness="error")(tasks)
    return torch.stack([one(tasks.task(t)) for t in range(tasks.num_tasks)])


#: Tasks a CPU meta-test adapts per vectorised call. Fifty 5-way 5-shot or 20-way 1-shot tasks
#: make activations of 50 MB and more, which glibc maps afresh and the kernel zero-fills at every
#: allocation: on the 2-core CPU, ten at a time halved those evaluations' time.
CPU_TASKS_PER_CALL = 10


def groups_of_tasks(tasks: Task, tasks_per_call: int | None = None) -> Iterator[Task]:
    """``tasks`` in consecutive groups of ``tasks_per_call`` (None: all of them on a GPU,
    :data:`CPU_TASKS_PER_CALL` on a CPU), each to be adapted in one vectorised call."""
    if tasks_per_call is None:
        tasks_per_call = tasks.num_tasks if tasks.x_support.device.type != "cpu" else CPU_TASKS_PER_CALL
    check_positive_integer("tasks_per_call", tasks_per_call)
    for first in range(0, tasks.num_tasks, tasks_per_call):
        yield Task(*(part[first : first + tasks_per_call] for part in tasks))


def mean_and_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    values = values.double()
    n = values.numel()
    std = float(values.std(unbiased=True)) if n > 1 else 0.0
    return float(values.mean()), 1.96 * std / math.sqrt(n)


@exact_float32()
def evaluate(
    config: TrainConfig,
    phi: Params,
    problem: Problem,
    *,
    split: str = "test",
    num_tasks: int = 600,
    seed: int = 12345,
    chunk: int = 50,
    device: torch.device | None = None,
    per_task: bool = False,
    tasks_per_call: int | None = None,
) -> dict[str, Any]:
    """Mean post-adaptation metric over ``num_tasks`` tasks of ``split`` with its 95% CI
    (computed in :func:`gbml.notebook.exact_float32`: no TF32 on a GPU).

    Tasks are drawn ``chunk`` at a time from a generator seeded with ``seed``, so evaluations with
    the same seed and chunk share their first whole chunks of tasks. ``per_task=True`` adds every
    task's metric (``"per_task"``, a list of floats). Each chunk is adapted ``tasks_per_call``
    tasks at a time (one vmap each; None: the whole chunk on a GPU, :data:`CPU_TASKS_PER_CALL`
    on a CPU); this changes the speed, not which tasks are drawn.
    """
    device = device or next(iter(phi.values())).device
    algorithm = config.make_test_algorithm(problem)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for start in range(0, num_tasks, chunk):
        size = min(chunk, num_tasks - start)
        tasks = problem.tasks[split].sample(
            size, config.shots, config.evaluation_queries, generator, device=device
        )
        for group in groups_of_tasks(tasks, tasks_per_call):
            values.append(evaluate_tasks(algorithm, problem, phi, group, batched=config.batched_option))
    values = torch.cat(values)
    mean, ci = mean_and_ci95(values)
    result = {"metric": problem.metric_name, "mean": mean, "ci95": ci, "tasks": num_tasks, "split": split}
    if per_task:
        result["per_task"] = values.double().tolist()
    return result


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` with torch.save to a temporary file, then rename it over ``path``: a crash
    mid-write never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@exact_float32()
def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: TextIO | None = None,
    time_limit_s: float | None = None,
) -> dict:
    """Meta-train, validating every ``validate_every`` iterations; returns the history. Runs in
    :func:`gbml.notebook.exact_float32` (no TF32 on a GPU), and each session's record says so.

    ``out_dir`` receives ``last.pt`` (written at every validation), ``best.pt`` (best validation
    metric so far) and ``history.json``. With ``resume=True`` an existing ``last.pt`` is continued:
    the model, the optimizer, the task generator, the history (and a carried inner state) are
    restored, so the resumed run ends exactly where an uninterrupted one would. ``log`` (a text
    stream, e.g. ``sys.stderr``) receives one line per validation: what a run in the background,
    without its progress bar, has to show.

    ``time_limit_s`` ends this session early, at the last validation (and checkpoint) that the
    time allows: training stops once the next validation period, at this session's pace so far,
    would end after ``time_limit_s`` seconds. The run then continues with ``resume=True``, as
    after any interruption. It is for leased machines (a GPU lent for ten minutes), where a
    killed process would lose the work since its last checkpoint.
    """
    from tqdm.auto import tqdm

    if time_limit_s is not None and not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be positive seconds, got {time_limit_s}")

    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    problem = make_problem(config, device)
    params = parameters_of(problem.model)
    optimizer = config.make_outer_optimizer(params.values())
    algorithm = config.make_algorithm(problem=problem)
    generator = torch.Generator().manual_seed(config.seed)
    if config.inner_state == "carried":
        problem.inner_state = InnerAdamState.zeros(detached(params))
    history: dict[str, Any] = {"config": asdict(config), "train": [], "val": []}
    start = 0
    last = out_dir / "last.pt"
    if resume and last.exists():
        # On the CPU: the task generator's state must stay there (the model's and the optimizer's
        # tensors move to the run's device as they are loaded).
        state = torch.load(last, map_location="cpu", weights_only=True)
        # Only how long and how it runs may change (a finished run may be extended, or moved to
        # another device or code path); everything that defines the problem must match.
        requested = asdict(config)
        differences = defining_differences(state["config"], config)
        if differences:
            raise ValueError(
                f"{last} was written by a run with other options (saved, requested): {differences}; "
                "resume with the same options or use another output folder"
            )
        problem.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if config.inner_state == "carried":
            problem.inner_state = InnerAdamState.from_state_dict(state["inner_state"], device)
        history, start = state["history"], state["iteration"]
        history["config"] = requested
    elif last.exists() and not resume:
        raise FileExistsError(
            f"{last} exists: pass resume=True (--resume) to continue it, or choose another folder"
        )

    def checkpoint(iteration: int, name: str = "last.pt") -> None:
        state = {
            "config": asdict(config),
            "iteration": iteration,
            "model": problem.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "history": history,
        }
        if problem.inner_state is not None:
            state["inner_state"] = problem.inner_state.state_dict()
        save_checkpoint(out_dir / name, state)

    if config.inner_state == "carried":

        def step(tasks: Task) -> MetaStepResult:
            delta, info, problem.inner_state = carried_meta_gradient(
                algorithm, problem.loss, params, tasks, problem.inner_state
            )
            return apply_meta_gradient(params, delta, info, optimizer)

    elif config.batched == "compile":
        step = CompiledMetaStep(algorithm, problem.loss, params, optimizer)
    else:

        def step(tasks: Task) -> MetaStepResult:
            return meta_step(algorithm, problem.loss, params, tasks, optimizer, batched=config.batched_option)

    # Wall time is counted across resumptions: each entry's elapsed_s is the training time so far.
    elapsed_before = history["val"][-1].get("elapsed_s", 0.0) if history["val"] else 0.0
    clock = time.perf_counter()
    # Each call of train() is a session; its record says what ran it (a run may span machines).
    session = {
        "from_iteration": start,
        "to_iteration": start,
        "elapsed_s": 0.0,
        "machine": machine_description(device),
        "tf32": tf32_enabled(),  # off: train runs in exact_float32
        # A carried inner state makes training take the tasks in turn; batched then applies to evaluation.
        "batched": "in turn (carried state)"
        if config.inner_state == "carried"
        else batched_name(config.batched),
        "torch": str(torch.__version__),
        "source": source_revision(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    history.setdefault("sessions", []).append(session)
    bar = tqdm(range(start, config.iterations), initial=start, total=config.iterations, disable=not progress)
    for iteration in bar:
        tasks = problem.tasks["train"].sample(
            config.meta_batch, config.shots, config.queries, generator, device=device
        )
        for group in optimizer.param_groups:  # a function of the iteration: resumes exactly
            group["lr"] = config.outer_lr_at(iteration)
        result = step(tasks)
        history["train"].append({"iteration": iteration + 1, "query_loss": result.query_loss})
        if (iteration + 1) % config.validate_every == 0 or iteration + 1 == config.iterations:
            val = evaluate(
                config, params, problem, split="val", num_tasks=config.validation_tasks, seed=config.seed + 1
            )
            elapsed = elapsed_before + time.perf_counter() - clock
            history["val"].append({"iteration": iteration + 1, **val, "elapsed_s": round(elapsed, 1)})
            session.update(to_iteration=iteration + 1, elapsed_s=round(time.perf_counter() - clock, 1))
            bar.set_postfix(
                query_loss=f"{result.query_loss:.3f}", **{f"val_{val['metric']}": f"{val['mean']:.3f}"}
            )
            checkpoint(iteration + 1)
            if log is not None:
                done = iteration + 1 - start
                print(
                    f"{out_dir}: meta-iteration {iteration + 1:,} of {config.iterations:,}, validation "
                    f"{val['metric']} {val['mean']:.4f} ± {val['ci95']:.4f}, {elapsed / 3600:.2f} h in all, "
                    f"{session['elapsed_s'] / done:.2f} s per meta-iteration this session; last.pt written",
                    file=log,
                    flush=True,
                )
            scores = [v["mean"] for v in history["val"]]
            best = max(scores) if problem.higher_is_better else min(scores)
            if val["mean"] == best:
                checkpoint(iteration + 1, "best.pt")
            # Written at every validation too, so an interrupted run keeps its curve in plain text.
            (out_dir / "history.json").write_text(json.dumps(history, indent=1))
            if time_limit_s is not None and iteration + 1 < config.iterations:
                session_s = time.perf_counter() - clock
                next_period_s = session_s / (iteration + 1 - start) * config.validate_every
                if session_s + next_period_s > time_limit_s:
                    if log is not None:
                        print(
                            f"{out_dir}: stopped at meta-iteration {iteration + 1:,}: another "
                            f"{config.validate_every:,} would pass the time limit of {time_limit_s:g} s; "
                            "continue with --resume",
                            file=log,
                            flush=True,
                        )
                    break
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    return history


def load_checkpoint(path: str | Path, device: str = "auto") -> tuple[TrainConfig, Problem, Params]:
    """The configuration, problem and meta-parameters stored in a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    config = TrainConfig.from_dict(state["config"])
    target = resolve_device(device)
    problem = make_problem(config, target)
    problem.model.load_state_dict(state["model"])
    if "inner_state" in state:
        problem.inner_state = InnerAdamState.from_state_dict(state["inner_state"], target)
    return config, problem, parameters_of(problem.model)


def train_command(config: TrainConfig, out: str | Path) -> str:
    """The ``python -m gbml train`` command line that runs ``config`` into ``out``."""
    options = []
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if value is not None:
            options.append(
                f"--{f.name.replace('_', '-')} {batched_name(value) if f.name == 'batched' else value}"
            )
    return f"python -m gbml train {' '.join(options)} --out {out}"


def meta_learned_state(state: dict[str, Any]) -> dict[str, Any]:
    """A resume checkpoint (``last.pt``) less its optimizer state and history: the configuration,
    meta-iteration and meta-parameters that :func:`load_checkpoint` needs, a few hundred KB."""
    # The carried inner Adam state (if any) is part of the meta-learned result: evaluation starts from it.
    kept = ("config", "iteration", "model", "inner_state")
    return {key: state[key] for key in kept if key in state}


def training_summary(run_dir: str | Path) -> dict[str, Any]:
    """What ``run_dir/last.pt`` says of its run's training so far, writing nothing: the command that
    continues it, the configuration, meta-iterations, tasks seen, wall time, the sessions that
    trained it (machine, torch, code commit), the validation curve and the training query loss
    averaged over each validation period. :func:`export_run` records this in ``run.json``; a run
    still in training (no ``run.json`` yet) is described by it as far as it got.
    """
    return _training_summary(_last_checkpoint(run_dir), Path(run_dir))


def _last_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    last = Path(run_dir) / "last.pt"
    if not last.exists():
        raise FileNotFoundError(f"no checkpoint at {last}: train the run first")
    return torch.load(last, map_location="cpu", weights_only=True)


def _training_summary(state: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    config, history, iteration = TrainConfig.from_dict(state["config"]), state["history"], state["iteration"]
    train_losses, bins, start = [v["query_loss"] for v in history["train"]], [], 0
    for val in history["val"]:
        window = train_losses[start : val["iteration"]]
        bins.append({"iteration": val["iteration"], "query_loss": sum(window) / max(len(window), 1)})
        start = val["iteration"]
    return {
        "command": train_command(config, run_dir) + " --resume",
        "config": asdict(config),
        "iterations": iteration,
        "tasks_seen": iteration * config.meta_batch,
        "elapsed_s": history["val"][-1].get("elapsed_s") if history["val"] else None,
        "sessions": history.get("sessions", []),
        "val": history["val"],
        "train": bins,
    }


def export_run(run_dir: str | Path, *, test_tasks: int = 600, device: str = "cpu") -> dict[str, Any]:
    """Write a run's shareable results beside its checkpoints, and return the summary.

    From ``run_dir/last.pt`` this writes ``final.pt`` (the configuration and the final
    meta-parameters, without optimizer state: what :func:`load_checkpoint` needs) and
    ``run.json``: :func:`training_summary` and (unless ``test_tasks=0``) the meta-test result of
    the final meta-parameters on ``test_tasks`` tasks with every task's accuracy, evaluated on
    ``device``.
    """
    run_dir = Path(run_dir)
    state = _last_checkpoint(run_dir)
    save_checkpoint(run_dir / "final.pt", meta_learned_state(state))
    summary = _training_summary(state, run_dir)
    if test_tasks:
        config, problem, phi = load_checkpoint(run_dir / "final.pt", device)
        summary["test"] = evaluate(config, phi, problem, num_tasks=test_tasks, per_task=True)
    (run_dir / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def export_shared_training(
    run_dir: str | Path,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    test_tasks: int = 600,
    device: str = "cpu",
    command: str | None = None,
) -> dict[str, Any]:
    """Export the meta-training of the exported run in ``run_dir`` as a run of ``config``, a
    protocol that trains identically and differs only in how it is meta-tested
    (:func:`training_differences` is empty): Reptile 5-way 5-shot from the 5-way 1-shot run, say.

    Writes ``out_dir/final.pt`` (the run's final φ, and its carried inner state if any, under
    ``config``) and ``out_dir/run.json`` as :func:`export_run` does, with ``trained_by`` naming the
    run, whose sessions, meta-iterations and wall time it shares. It has no validation curve of its
    own: the run's was measured on the run's setting. ``command`` (recorded in ``run.json``) is
    the command line that writes this export, if there is one (``python -m gbml export --as``
    names registered protocols only). Raises ``FileNotFoundError`` if the run is not exported,
    ``ValueError`` naming the options in which the two train differently, and ``FileExistsError``
    if ``out_dir`` holds a run of its own (a checkpoint, or a ``run.json`` not exported from this
    run), the run itself included: an export must not overwrite what it exports or another run."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"no run.json in {run_dir}: export the run first (python -m gbml export)")
    source = json.loads((run_dir / "run.json").read_text())
    previous = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").exists() else None
    if (out_dir / "last.pt").exists() or (
        previous is not None and previous.get("trained_by") != run_dir.name
    ):
        raise FileExistsError(
            f"{out_dir} holds a run of its own; export {run_dir}'s training to a new folder or to one "
            "it was exported to before"
        )
    state = torch.load(run_dir / "final.pt", map_location="cpu", weights_only=True)
    differences = training_differences(state["config"], config)
    if differences:
        raise ValueError(
            f"{run_dir} was meta-trained differently (its value, the requested one): {differences}; only "
            f"options of evaluation ({', '.join(EVALUATION_OPTIONS)}) and Reptile's split of a task's "
            "drawings into support and query may differ"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / "final.pt", {**state, "config": asdict(config)})
    summary = {
        "command": command,
        "trained_by": run_dir.name,
        "config": asdict(config),
        "iterations": source["iterations"],
        "tasks_seen": source["tasks_seen"],
        "elapsed_s": source["elapsed_s"],
        "sessions": source["sessions"],
        "val": [],
        "train": source["train"],
    }
    if test_tasks:
        _, problem, phi = load_checkpoint(out_dir / "final.pt", device)
        summary["test"] = evaluate(config, phi, problem, num_tasks=test_tasks, per_task=True)
    (out_dir / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
