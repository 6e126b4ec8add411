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
from gbml.algorithms.reptile import InnerAdamState, Reptile
from gbml.distributed import mean_over_processes
from gbml.errors import DivergenceError, non_finite_entries, raise_if_not_finite
from gbml.models import ModelLoss, has_convolutions, has_native_batch_norm, has_running_statistics
from gbml.params import Params, detached
from gbml.tasks import Task, check_task

Batched = bool | Literal["auto"]


def choose_batched(loss: LossFn, phi: Mapping[str, Tensor], batched: Batched = "auto") -> bool:
    """Decide between the vmap path (True) and the per-task loop (False).

    ``"auto"`` batches on GPUs, where one vmapped call replaces T small launches. On the CPU it
    batches models without convolutions (the sinusoid MLP: 12× faster than the loop with 25
    tasks, measured on a 2-core CPU) and loops over models with them (the conv net: vmap's
    per-task weights turn convolutions into grouped ones, 1.5-2× slower than the loop there), as
    well as over losses it cannot inspect (anything but :func:`gbml.make_loss`).
    A model with a ``torch.nn`` batch norm is never batched: its vmap rule is known to give wrong
    second-order gradients (use :class:`gbml.models.CompositeBatchNorm2d`).
    """
    model = loss.model if isinstance(loss, ModelLoss) else None
    native_bn = model is not None and has_native_batch_norm(model)
    if native_bn and has_running_statistics(model):
        raise ValueError(
            "this model contains a torch.nn batch norm layer that updates running statistics in "
            "training mode, an in-place update that torch.func's transforms refuse on every path. "
            "Use gbml.models.CompositeBatchNorm2d (batch statistics, exact second order, batchable), "
            "or construct the layer with track_running_stats=False and pass batched=False."
        )
    if batched == "auto":
        if native_bn:
            return False
        if next(iter(phi.values())).device.type != "cpu":
            return True
        return model is not None and not has_convolutions(model)
    if batched not in (True, False):
        raise ValueError(f"batched must be True, False or 'auto', got {batched!r}")
    if batched and native_bn:
        raise ValueError(
            "this model contains a torch.nn batch norm layer, whose vmap rule gives wrong "
            "second-order gradients (about 1% relative error, silently). Use "
            "gbml.models.CompositeBatchNorm2d in the model, or pass batched=False (the per-task loop)."
        )
    return batched


def meta_gradient(
    algorithm: MetaAlgorithm,
    loss: LossFn,
    phi: Mapping[str, Tensor],
    tasks: Task,
    *,
    batched: Batched = "auto",
    distributed: bool = False,
) -> tuple[Params, TaskInfo]:
    """The meta-gradient (1/T) Σ_t Δ_t over a batch of T tasks, and per-task diagnostics.

    Args:
        algorithm: MAML, FOMAML, Reptile or IMAML (their hyperparameters).
        loss: ``ℓ(params, x, y)``, e.g. :func:`gbml.models.make_loss` of a model.
        phi: the meta-parameters (not modified; gradients are not tracked into them).
        tasks: a batch of tasks, every tensor with a leading task axis.
        batched: ``True`` for the vmap path, ``False`` for the per-task loop, ``"auto"`` to
            choose by device (see :func:`choose_batched`).
        distributed: inside an initialised ``torch.distributed`` process group, ``tasks`` is
            this process's share of the meta-batch and the mean is over every process's tasks
            (one all-reduce, see :mod:`gbml.distributed`); the diagnostics are then the whole
            meta-batch's, in rank order, and errors are raised on every process alike.

    Returns:
        ``(delta, info)``: the mean Δ as a parameter dictionary, and a dictionary of per-task
        diagnostics, each a tensor with a leading task axis (always ``"query_loss"``).

    Raises:
        ValueError: the tasks' shapes do not fit together.
        DivergenceError: a loss or Δ_t is NaN or infinite.
        ConvergenceError: (iMAML) a conjugate-gradient solve missed its tolerance.
    """
    phi = checked_inputs(phi, tasks)
    deltas, info = per_task_deltas(algorithm, loss, phi, tasks, batched=choose_batched(loss, phi, batched))
    if distributed:  # every process learns of a NaN anywhere, through the all-reduced count
        mean, info, bad_count = mean_over_processes(deltas, info)
        raise_if_not_finite(mean, info, bad_count)
    else:
        raise_if_not_finite(deltas, info)
        mean = {name: d.mean(dim=0) for name, d in deltas.items()}
    algorithm.diagnose(info)
    return mean, info


def per_task_deltas(
    algorithm: MetaAlgorithm, loss: LossFn, phi: Params, tasks: Task, *, batched: bool
) -> tuple[Params, TaskInfo]:
    """Every task's Δ_t (stacked on a leading task axis) and diagnostics, without any checks.

    The building block of :func:`meta_gradient`, the CUDA-graph step and the distributed step;
    it makes no host synchronisation, so it can be captured in a CUDA graph.
    """
    if batched:
        return vmap(
            lambda p, task: algorithm.task_delta(loss, p, task), in_dims=(None, 0), randomness="error"
        )(phi, tasks)
    return stacked_per_task([algorithm.task_delta(loss, phi, tasks.task(t)) for t in range(tasks.num_tasks)])


def stacked_per_task(per_task: list[tuple[Params, TaskInfo]]) -> tuple[Params, TaskInfo]:
    """Tasks' (Δ_t, diagnostics) pairs from a loop, stacked on a leading task axis as vmap gives them."""
    deltas = {name: torch.stack([d[name] for d, _ in per_task]) for name in per_task[0][0]}
    info = {key: torch.stack([i[key] for _, i in per_task]) for key in per_task[0][1]}
    return deltas, info


def carried_meta_gradient(
    algorithm: Reptile, loss: LossFn, phi: Mapping[str, Tensor], tasks: Task, state: InnerAdamState
) -> tuple[Params, TaskInfo, InnerAdamState]:
    """(1/T) Σ_t Δ_t with the tasks taken in turn and one inner Adam carried through them.

    Nichol et al.'s Reptile: task t's inner loop starts from the optimiser state in which task
    t − 1's ended (the first from ``state``). Returns the mean Δ, the per-task diagnostics and the
    state after the last task, which the next meta-iteration continues. The same checks as
    :func:`meta_gradient`; a non-finite Δ_t, loss or carried moment raises ``DivergenceError``.

    Raises:
        TypeError: ``algorithm`` is not a :class:`gbml.Reptile`.
        ValueError: it is, but its inner optimiser is not Adam (there is no state to carry).
        DivergenceError: as above.
    """
    if not isinstance(algorithm, Reptile):
        raise TypeError(
            f"a carried inner state is Reptile's (with inner Adam), not {type(algorithm).__name__}'s"
        )
    phi = checked_inputs(phi, tasks)
    per_task = []
    for t in range(tasks.num_tasks):
        delta, info, state = algorithm.carried_task_delta(loss, phi, tasks.task(t), state)
        per_task.append((delta, info))
    stacked, info = stacked_per_task(per_task)
    raise_if_not_finite(stacked, info)
    if not all(bool(torch.isfinite(v).all()) for v in state.v.values()):  # would poison later tasks
        raise DivergenceError("the carried inner Adam's second moments overflowed; φ was left unchanged")
    algorithm.diagnose(info)
    return {name: d.mean(dim=0) for name, d in stacked.items()}, info, state


def checked_inputs(phi: Mapping[str, Tensor], tasks: Task) -> Params:
    """φ cut from any graph, after checking that ``tasks`` is a well-formed batch and φ not empty."""
    check_task(tasks, batched=True)
    if not phi:
        raise ValueError("phi holds no parameters")
    return detached(phi)


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
    distributed: bool = False,
) -> MetaStepResult:
    """One outer update: φ ← optimizer(φ, (1/T) Σ_t Δ_t).

    ``params`` are the leaf tensors the optimizer updates (e.g.
    ``gbml.parameters_of(model)``). Their ``.grad`` is overwritten with the meta-gradient, so
    any ``torch.optim`` optimizer (SGD, Adam, with schedulers) acts as the outer optimizer.
    Nothing is changed if the step raises.

    With ``distributed=True`` (inside an initialised ``torch.distributed`` process group, e.g.
    launched by ``torchrun``), ``tasks`` is this process's share of the meta-batch and the
    meta-gradient is averaged over all processes (see :func:`meta_gradient`).
    """
    delta, info = meta_gradient(algorithm, loss, params, tasks, batched=batched, distributed=distributed)
    return apply_meta_gradient(params, delta, info, optimizer)


def apply_meta_gradient(
    params: Mapping[str, Tensor], delta: Params, info: TaskInfo, optimizer: torch.optim.Optimizer
) -> MetaStepResult:
    """Hand the mean Δ to ``optimizer`` as the gradient of ``params`` and take its step."""
    for name, p in params.items():
        p.grad = delta[name].to(p.dtype)
    optimizer.step()
    return MetaStepResult(delta, info)


def mean_delta_unchecked(
    algorithm: MetaAlgorithm, loss: LossFn, phi: Params, tasks: Task
) -> tuple[Params, TaskInfo, Tensor]:
    """The batched mean Δ, the diagnostics and the count of non-finite entries, with no host
    synchronisation: what the CUDA-graph and compiled steps run (they raise afterwards)."""
    deltas, info = per_task_deltas(algorithm, loss, phi, tasks, batched=True)
    mean = {name: d.mean(dim=0) for name, d in deltas.items()}
    return mean, info, non_finite_entries(deltas, info)
