"""The outer loop: run an algorithm over a batch of tasks and update φ.

:func:`meta_gradient` computes (1/T) Σ_t Δ_t either with one :func:`torch.func.vmap` call over
the task axis ("batched") or with a Python loop over tasks. Both run the very same
``task_delta`` function, and the test suite checks they agree to 1e-10 in float64.
:func:`meta_step` then gives that mean to any ``torch.optim`` optimizer as the gradient of φ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.func import vmap

from gbml.adapt import LossFn
from gbml.algorithms.base import MetaAlgorithm, TaskInfo
from gbml.errors import DivergenceError
from gbml.models import ModelLoss, has_native_batch_norm
from gbml.params import Params, detached
from gbml.tasks import Task, check_task

Batched = bool | Literal["auto"]


def choose_batched(loss: LossFn, phi: Mapping[str, Tensor], batched: Batched = "auto") -> bool:
    """Decide between the vmap path (True) and the per-task loop (False).

    ``"auto"`` batches on GPUs, where one vmapped call replaces T small launches, and loops on
    CPUs, where we measured vmap's grouped convolutions to be several times slower than a loop.
    A model with a ``torch.nn`` batch norm is never batched: its vmap rule is known to give wrong
    second-order gradients (use :class:`gbml.models.CompositeBatchNorm2d`).
    """
    native_bn = isinstance(loss, ModelLoss) and has_native_batch_norm(loss.model)
    if batched == "auto":
        on_gpu = next(iter(phi.values())).device.type != "cpu"
        return on_gpu and not native_bn
    if batched not in (True, False):
        raise ValueError(f"batched must be True, False or 'auto', got {batched!r}")
    if batched and native_bn:
        raise ValueError(
            "this model contains a torch.nn batch norm layer, whose vmap rule gives wrong "
            "second-order gradients (about 1% relative error, silently). Use "
            "gbml.models.CompositeBatchNorm2d in the model, or pass batched=False."
        )
    return batched


def meta_gradient(
    algorithm: MetaAlgorithm,
    loss: LossFn,
    phi: Mapping[str, Tensor],
    tasks: Task,
    *,
    batched: Batched = "auto",
) -> tuple[Params, TaskInfo]:
    """The meta-gradient (1/T) Σ_t Δ_t over a batch of T tasks, and per-task diagnostics.

    Args:
        algorithm: MAML, FOMAML, Reptile or IMAML (their hyperparameters).
        loss: ``ℓ(params, x, y)``, e.g. :func:`gbml.models.make_loss` of a model.
        phi: the meta-parameters (not modified; gradients are not tracked into them).
        tasks: a batch of tasks, every tensor with a leading task axis.
        batched: ``True`` for the vmap path, ``False`` for the per-task loop, ``"auto"`` to
            choose by device (see :func:`choose_batched`).

    Returns:
        ``(delta, info)``: the mean Δ as a parameter dictionary, and a dictionary of per-task
        diagnostics, each a tensor with a leading task axis (always ``"query_loss"``).

    Raises:
        ValueError: the tasks' shapes do not fit together.
        DivergenceError: a loss or Δ_t is NaN or infinite.
        ConvergenceError: (iMAML) a conjugate-gradient solve missed its tolerance.
    """
    check_task(tasks, batched=True)
    if not phi:
        raise ValueError("phi holds no parameters")
    phi = detached(phi)
    if choose_batched(loss, phi, batched):
        deltas, info = vmap(
            lambda p, task: algorithm.task_delta(loss, p, task), in_dims=(None, 0), randomness="error"
        )(phi, tasks)
    else:
        per_task = [algorithm.task_delta(loss, phi, tasks.task(t)) for t in range(tasks.num_tasks)]
        deltas = {name: torch.stack([d[name] for d, _ in per_task]) for name in phi}
        info = {key: torch.stack([i[key] for _, i in per_task]) for key in per_task[0][1]}
    _raise_if_not_finite(deltas, info)
    algorithm.diagnose(info)
    return {name: d.mean(dim=0) for name, d in deltas.items()}, info


@dataclass
class MetaStepResult:
    """What one outer update saw."""

    meta_gradient: Params
    """The mean Δ that was handed to the optimizer."""
    info: TaskInfo
    """Per-task diagnostics (see :func:`meta_gradient`)."""

    @property
    def query_loss(self) -> float:
        """Mean post-adaptation query loss over the batch."""
        return float(self.info["query_loss"].mean())


def meta_step(
    algorithm: MetaAlgorithm,
    loss: LossFn,
    params: Mapping[str, Tensor],
    tasks: Task,
    optimizer: torch.optim.Optimizer,
    *,
    batched: Batched = "auto",
) -> MetaStepResult:
    """One outer update: φ ← optimizer(φ, (1/T) Σ_t Δ_t).

    ``params`` are the leaf tensors the optimizer updates (e.g.
    ``gbml.parameters_of(model)``). Their ``.grad`` is overwritten with the meta-gradient, so
    any ``torch.optim`` optimizer (SGD, Adam, with schedulers) acts as the outer optimizer.
    Nothing is changed if the step raises.
    """
    delta, info = meta_gradient(algorithm, loss, params, tasks, batched=batched)
    for name, p in params.items():
        p.grad = delta[name].to(p.dtype)
    optimizer.step()
    return MetaStepResult(delta, info)


def _raise_if_not_finite(deltas: Params, info: TaskInfo) -> None:
    checks = {f"Δ[{name}]": d for name, d in deltas.items()}
    checks.update({key: value for key, value in info.items() if value.is_floating_point()})
    finite = torch.stack([torch.isfinite(v).all() for v in checks.values()])
    if bool(finite.all()):
        return
    bad = [key for key, ok in zip(checks, finite.tolist()) if not ok]
    losses = info["query_loss"].reshape(-1)
    raise DivergenceError(
        f"meta-training diverged: {', '.join(bad)} contain NaN or infinite values "
        f"(query losses of the batch: {losses.tolist()[:8]}{' …' if losses.numel() > 8 else ''}). "
        "The learning rates are probably too large; φ was left unchanged."
    )
