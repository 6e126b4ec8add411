"""What every meta-learning algorithm provides: its contribution Δ_t for one task.

Algorithm 1 of the book, in code::

    for each meta-iteration:
        for each task t in the meta-batch:                  # a loop, or one vmap call
            θ_t = TASK_ADAPT(φ, D_t^train)
            Δ_t = the algorithm's meta-update
        φ ← outer_optimizer(φ, mean_t Δ_t)

An algorithm is a small frozen dataclass of hyperparameters whose :meth:`task_delta` does the
two middle lines for one task. :func:`gbml.meta_gradient` runs it over a batch and
:func:`gbml.meta_step` hands the mean to a torch optimizer as if it were a gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from torch import Tensor

from gbml.adapt import LossFn, check_learning_rate, check_steps, task_adapt
from gbml.params import Params
from gbml.tasks import Task

TaskInfo = dict[str, Tensor]
"""Per-task diagnostics returned beside Δ_t, e.g. ``{"query_loss": ℓ(θ_t; D_t^val)}``."""


class MetaAlgorithm(ABC):
    """Base class of MAML, FO-MAML, Reptile and iMAML."""

    @abstractmethod
    def task_delta(self, loss: LossFn, phi: Params, task: Task) -> tuple[Params, TaskInfo]:
        """Δ_t for a single task (no task axis), plus diagnostics.

        Must be free of data-dependent Python control flow so that ``vmap`` can batch it.
        """

    @abstractmethod
    def adapt(self, loss: LossFn, phi: Params, x: Tensor, y: Tensor) -> Params:
        """TASK_ADAPT at meta-test time: θ from φ and a support set, cut from the graph."""

    def diagnose(self, info: TaskInfo) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Inspect a batch's diagnostics after the fact and raise if something went wrong.

        Runs outside ``vmap``, so it may look at values. Non-finite losses and meta-gradients are
        caught by :func:`gbml.meta.meta_gradient` for every algorithm; subclasses add their own
        checks (iMAML: did conjugate gradient converge?).
        """


@dataclass(frozen=True)
class GradientStepAlgorithm(MetaAlgorithm):
    """An algorithm whose TASK_ADAPT is ``inner_steps`` (L) gradient steps of size ``inner_lr`` (α):
    MAML, FO-MAML and Reptile. The parameters named in ``frozen`` are left at φ by the inner loop
    (see :func:`gbml.task_adapt`); only the outer loop learns them."""

    inner_lr: float
    inner_steps: int = 1
    frozen: frozenset[str] = field(default=frozenset(), kw_only=True)

    def __post_init__(self) -> None:
        check_learning_rate("inner_lr", self.inner_lr)
        check_steps("inner_steps", self.inner_steps)
        if not isinstance(self.frozen, (set, frozenset, list, tuple)) or not all(
            isinstance(name, str) for name in self.frozen
        ):
            raise ValueError(f"frozen must be a collection of parameter names, got {self.frozen!r}")
        object.__setattr__(self, "frozen", frozenset(self.frozen))  # hashable, order-free

    def adapt(self, loss: LossFn, phi: Params, x: Tensor, y: Tensor) -> Params:
        """L plain gradient steps of α on the support set (Reptile's too: at test the query set is
        unseen)."""
        return task_adapt(
            loss,
            phi,
            x,
            y,
            lr=self.inner_lr,
            steps=self.inner_steps,
            differentiable=False,
            validate=False,
            frozen=self.frozen,
        )
