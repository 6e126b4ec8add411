"""A controlled comparison of MAML, FO-MAML, Reptile, iMAML and a pretrained network (book §6.8).

Only the meta-update differs between the methods. For each seed, every method starts from the
same initialisation (``torch.manual_seed(seed)`` before the model is built), sees the same stream
of training tasks (a generator seeded with ``seed``) for the same number of outer Adam steps, and
is tested on the same held-out tasks (a generator seeded with ``test_seed``, shared by all seeds)
after the same inner loop. Repeating over seeds gives a mean and a 95% confidence interval, and
because the tasks are shared, the per-seed differences between two methods are paired.

The pretrained network is trained jointly: Adam on the mean loss of all of each task's points at
φ itself, with no inner loop. At test it is fine-tuned with MAML's loop (L steps of α on the
support set), the comparison Finn et al. (2017) make.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import vmap

from gbml.adapt import LossFn, check_learning_rate, check_steps
from gbml.algorithms import FOMAML, IMAML, MAML, MetaAlgorithm, Reptile
from gbml.errors import DivergenceError, check_positive_integer
from gbml.meta import meta_step
from gbml.models import SinusoidMLP, make_loss
from gbml.notebook import synchronize
from gbml.params import Params, detached, parameters_of
from gbml.tasks import SinusoidTasks, Task, TaskFamily

METHODS = ("MAML", "FO-MAML", "Reptile", "iMAML", "pretrained")


@dataclass(frozen=True)
class ComparisonConfig:
    """One budget for every method.

    ``inner_lr`` (α) and ``inner_steps`` (L) define the inner loop at training and at test for
    all methods; iMAML's proximal strength ``lam`` defaults to 1/(αL), the correspondence of
    §6.4. Each seed trains every method for ``iterations`` outer Adam steps of size ``outer_lr``
    on ``meta_batch`` tasks of ``shots`` support and ``queries`` query points, then tests it on
    ``test_tasks`` held-out tasks with ``test_queries`` query points each.
    """

    inner_lr: float = 0.01
    inner_steps: int = 5
    lam: float | None = None
    cg_steps: int = 5
    shots: int = 10
    queries: int = 10
    meta_batch: int = 10
    iterations: int = 1000
    outer_lr: float = 1e-3
    test_tasks: int = 500
    test_queries: int = 100
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    test_seed: int = 2**20
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        check_learning_rate("inner_lr", self.inner_lr)
        check_learning_rate("outer_lr", self.outer_lr)
        check_steps("inner_steps", self.inner_steps)
        if self.lam is not None:
            check_learning_rate("lam", self.lam)
        for name in (
            "cg_steps",
            "shots",
            "queries",
            "meta_batch",
            "iterations",
            "test_tasks",
            "test_queries",
        ):
            check_positive_integer(name, getattr(self, name))
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(
                f"seeds must be at least two distinct seeds (a CI needs two), got {self.seeds!r}"
            )
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty selection of {METHODS}, got {self.methods!r}")

    @property
    def proximal_strength(self) -> float:
        """iMAML's λ: ``lam``, or 1/(αL)."""
        return self.lam if self.lam is not None else 1.0 / (self.inner_lr * self.inner_steps)

    def algorithm(self, method: str) -> MetaAlgorithm:
        """The algorithm a method trains with; for ``"pretrained"``, the fine-tuning loop it is
        tested with (MAML's: L plain steps of α)."""
        if method in ("MAML", "pretrained"):
            return MAML(self.inner_lr, self.inner_steps)
        if method == "FO-MAML":
            return FOMAML(self.inner_lr, self.inner_steps)
        if method == "Reptile":
            return Reptile(self.inner_lr, self.inner_steps)
        if method == "iMAML":
            return IMAML(
                self.inner_lr,
                self.proximal_strength,
                inner_steps=self.inner_steps,
                cg_steps=self.cg_steps,
                on_cg_failure="warn",  # truncated CG is iMAML's normal training regime
            )
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@dataclass
class ComparisonResult:
    """Per method, one number per seed (in ``config.seeds`` order): the mean held-out query loss
    after adaptation (``after``) and at φ itself (``before``), and the training time in seconds."""

    config: ComparisonConfig
    after: dict[str, list[float]] = field(default_factory=dict)
    before: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def summary(self, method: str, *, adapted: bool = True) -> tuple[float, float]:
        """Mean over seeds and the half-width of its 95% CI (Student's t)."""
        return student_ci95(self.after[method] if adapted else self.before[method])

    def difference(self, method: str, baseline: str) -> tuple[float, float]:
        """Mean and 95% CI half-width of ``method`` minus ``baseline`` after adaptation, paired by seed."""
        return student_ci95([a - b for a, b in zip(self.after[method], self.after[baseline])])


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a 95% two-sided CI).

    Solves CDF(t) = 0.975 by bisection, with the CDF integrated from the density by Simpson's rule
    (accurate to about 1e-6 here; the standard library has no t distribution).
    """
    check_positive_integer("df", df)  # before the cache, which would take True for 1
    return _t_quantile_975(df)


@functools.cache  # a pure function of df, costly (about 2·10⁵ density evaluations), asked often
def _t_quantile_975(df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    def mass_from_zero(t: float, intervals: int = 4000) -> float:  # Simpson's rule on [0, t]
        h = t / intervals
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
        return h / 3 * (density(0.0) + inner + density(t))

    low, high = 0.0, 20.0  # the quantile is 12.7 for df = 1 and falls towards 1.96
    for _ in range(50):
        middle = (low + high) / 2
        if mass_from_zero(middle) < 0.475:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def student_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean of a few independent runs and its 95% CI half-width, t₀.₉₇₅(n − 1)·s/√n."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a confidence interval needs at least two values, got {n}")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * std / math.sqrt(n)


def initial_params(make_model: Callable[[], nn.Module], seed: int, device, dtype) -> tuple[nn.Module, Params]:
    """The model and its initial parameters for one seed (the same for every method)."""
    torch.manual_seed(seed)
    model = make_model().to(device=device, dtype=dtype)
    return model, detached(parameters_of(model))


def meta_train(
    method: str,
    config: ComparisonConfig,
    loss: LossFn,
    phi: Params,
    family: TaskFamily,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Params:
    """Train one method from ``phi`` on the task stream of ``seed``: ``config.iterations`` Adam
    steps on the mean Δ_t of ``config.meta_batch`` tasks (or, pretrained, on the joint loss).

    Raises :class:`~gbml.DivergenceError` if a loss or update turns NaN or infinite.
    """
    params = {name: p.clone().requires_grad_() for name, p in phi.items()}
    optimizer = torch.optim.Adam(params.values(), lr=config.outer_lr)
    generator = torch.Generator().manual_seed(seed)
    algorithm = None if method == "pretrained" else config.algorithm(method)
    for iteration in range(config.iterations):
        tasks = family.sample(
            config.meta_batch, config.shots, config.queries, generator, device=device, dtype=dtype
        )
        if algorithm is not None:
            meta_step(algorithm, loss, params, tasks, optimizer, batched=True)  # raises on NaN
            continue
        x, y = tasks.joined(batched=True)  # every point of every task, as one batch: the mean loss over tasks
        joint = loss(params, x.flatten(0, 1), y.flatten(0, 1))
        if not torch.isfinite(joint):
            raise DivergenceError(f"pretraining diverged at iteration {iteration}: loss {float(joint)}")
        optimizer.zero_grad()
        joint.backward()
        optimizer.step()
    return detached(params)


def test_losses(method: str, config: ComparisonConfig, loss: LossFn, phi: Params, tasks: Task) -> Tensor:
    """Each test task's query loss after the method's test-time adaptation on its support set."""
    algorithm = config.algorithm(method)

    def one(task: Task) -> Tensor:
        return loss(algorithm.adapt(loss, phi, *task.support), *task.query)

    losses = vmap(one, randomness="error")(tasks)
    if not torch.isfinite(losses).all():
        raise DivergenceError(f"{method}: a test task's adapted loss is NaN or infinite")
    return losses.detach()


def query_losses_at(loss: LossFn, phi: Params, tasks: Task) -> Tensor:
    """Each task's query loss at φ itself, before any adaptation."""
    return vmap(lambda task: loss(phi, *task.query))(tasks).detach()


def run_comparison(
    config: ComparisonConfig,
    family: TaskFamily | None = None,
    make_model: Callable[[], nn.Module] = SinusoidMLP,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    log: Callable[[str], None] | None = None,
) -> ComparisonResult:
    """Train and test every method of ``config.methods`` for every seed (default: sinusoids with
    Finn et al.'s MLP and the mean squared error). ``log`` receives one line per trained method."""
    family = family if family is not None else SinusoidTasks()
    test_tasks = family.sample(
        config.test_tasks,
        config.shots,
        config.test_queries,
        torch.Generator().manual_seed(config.test_seed),
        device=device,
        dtype=dtype,
    )
    result = ComparisonResult(config)
    for seed in config.seeds:
        model, phi0 = initial_params(make_model, seed, device, dtype)
        loss = make_loss(model) if loss_fn is None else make_loss(model, loss_fn)
        for method in config.methods:
            start = time.perf_counter()
            phi = meta_train(method, config, loss, phi0, family, seed, device=device, dtype=dtype)
            synchronize(device)
            seconds = time.perf_counter() - start
            after = float(test_losses(method, config, loss, phi, test_tasks).mean())
            before = float(query_losses_at(loss, phi, test_tasks).mean())
            result.after.setdefault(method, []).append(after)
            result.before.setdefault(method, []).append(before)
            result.seconds.setdefault(method, []).append(seconds)
            if log is not None:
                log(
                    f"seed {seed} {method:10s} loss after adaptation {after:.4f}, "
                    f"at φ {before:.4f} ({seconds:.1f} s)"
                )
    return result
