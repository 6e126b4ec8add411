"""Reptile (Nichol et al., 2018): move φ towards the task's adapted parameters::

    θ_t = TASK_ADAPT(φ, D_t)      (L steps on the task's whole data, support and query)
    Δ_t = φ − θ_t

Handed to an optimizer as a gradient, φ ← φ − ε Δ_t = φ + ε (θ_t − φ). With L = 1,
Δ_t = α ∇ℓ(φ; D_t): plain joint training on all tasks. The interesting behaviour comes
from L > 1 (see the book's Reptile chapter for the Taylor expansion).
"""

from __future__ import annotations

from dataclasses import dataclass

from gbml.adapt import LossFn, task_adapt
from gbml.algorithms.base import GradientStepAlgorithm, TaskInfo
from gbml.params import Params
from gbml.tasks import Task


@dataclass(frozen=True)
class Reptile(GradientStepAlgorithm):
    """Reptile with ``inner_steps`` (L) full-batch steps of size ``inner_lr`` (α)."""

    inner_steps: int = 5

    def task_delta(self, loss: LossFn, phi: Params, task: Task) -> tuple[Params, TaskInfo]:
        x_all, y_all = task.joined()
        theta = task_adapt(
            loss, phi, x_all, y_all, lr=self.inner_lr, steps=self.inner_steps, differentiable=False
        )
        delta = {name: phi[name] - theta[name] for name in phi}
        # Reptile trains on the query set too, so this is a training loss, reported for monitoring.
        return delta, {"query_loss": loss(theta, *task.query)}
