"""Reptile (Nichol et al., 2018): move φ towards the task's adapted parameters::

    θ_t = TASK_ADAPT(φ, D_t)      (L steps on the task's whole data, support and query)
    Δ_t = φ − θ_t

Handed to an optimizer as a gradient, φ ← φ − ε Δ_t = φ + ε (θ_t − φ). With L = 1,
Δ_t = α ∇ℓ(φ; D_t): plain joint training on all tasks. The interesting behaviour comes
from L > 1 (see the book's Reptile chapter for the Taylor expansion).

Nichol et al. take each inner step on a *minibatch* of D_t (``inner_batch``): step k uses the
k-th block of ``inner_batch`` examples, cycling (Nichol et al. choose L · inner_batch equal to the
task's number of examples: one pass over its data). The examples are first put in class-interleaved
order (the first drawing of every class, then the second, ...), so each minibatch holds every class
about equally often.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad_and_value

from gbml.adapt import LossFn, task_adapt
from gbml.algorithms.base import GradientStepAlgorithm, TaskInfo
from gbml.params import Params, detached
from gbml.tasks import Task


def interleaved_by_class(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The examples reordered as (first example of each class, in class order), (second of each),
    ...: the order in which consecutive blocks are balanced across classes. Needs integer labels;
    free of data-dependent Python control flow, so it works under ``vmap``."""
    if y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"inner_batch needs integer class labels, got labels of dtype {y.dtype}")
    one_hot = torch.nn.functional.one_hot(y.long(), num_classes=y.shape[0])  # labels < #examples
    occurrence = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # how many earlier of this class
    order = torch.argsort(occurrence * y.shape[0] + y, stable=True)
    return x[order], y[order]


@dataclass(frozen=True)
class Reptile(GradientStepAlgorithm):
    """Reptile with ``inner_steps`` (L) steps of size ``inner_lr`` (α), each on all of D_t
    (``inner_batch=None``) or on the next ``inner_batch`` examples of it (Nichol et al.'s
    minibatches)."""

    inner_steps: int = 5
    inner_batch: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_batch is not None and (
            isinstance(self.inner_batch, bool)
            or not isinstance(self.inner_batch, int)
            or self.inner_batch < 1
        ):
            raise ValueError(f"inner_batch must be a positive integer or None, got {self.inner_batch!r}")

    def task_delta(self, loss: LossFn, phi: Params, task: Task) -> tuple[Params, TaskInfo]:
        x_all, y_all = task.joined()
        if self.inner_batch is None:
            theta = task_adapt(
                loss, phi, x_all, y_all, lr=self.inner_lr, steps=self.inner_steps, differentiable=False
            )
            # Reptile trains on the query set too, so this is a training loss, reported for monitoring.
            return self._delta(phi, theta), {"query_loss": loss(theta, *task.query)}
        theta, last_batch_loss = self._minibatch_adapt(loss, phi, x_all, y_all)
        # The loss of the last inner minibatch comes with its gradient: monitoring at no extra
        # forward pass (it is a training loss either way, since Reptile trains on D_t's query set).
        return self._delta(phi, theta), {"query_loss": last_batch_loss}

    def _minibatch_adapt(self, loss: LossFn, phi: Params, x: Tensor, y: Tensor) -> tuple[Params, Tensor]:
        size = x.shape[0]
        if self.inner_batch > size:
            raise ValueError(f"inner_batch = {self.inner_batch} is more than the task's {size} examples")
        x, y = interleaved_by_class(x, y)
        gradient_and_loss = grad_and_value(loss)
        theta = detached(phi)
        if self.inner_steps == 0:
            return theta, loss(theta, x[: self.inner_batch], y[: self.inner_batch]).detach()
        for step in range(self.inner_steps):
            block = [(step * self.inner_batch + i) % size for i in range(self.inner_batch)]
            g, batch_loss = gradient_and_loss(theta, x[block], y[block])
            theta = detached({name: theta[name] - self.inner_lr * g[name] for name in theta})
        return theta, batch_loss.detach()

    @staticmethod
    def _delta(phi: Params, theta: Params) -> Params:
        return {name: phi[name] - theta[name] for name in phi}
