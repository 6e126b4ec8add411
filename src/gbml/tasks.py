"""Tasks: a support (train) set and a query (validation) set, and two families to sample them from.

A :class:`Task` holds four tensors. For a single task each has the sample axis first
(``x_support`` is ``(K, *features)``); for a batch of tasks every tensor gets one more leading
axis, the task axis (``(T, K, *features)``), which is what :func:`torch.func.vmap` maps over.

Sampling happens on the CPU with an explicit :class:`torch.Generator` and is moved to the
requested device afterwards, so a seed gives the same tasks on every device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from gbml.errors import check_positive_integer


class Task(NamedTuple):
    """One task (or a batch of tasks): support set ``(x_support, y_support)``, query set
    ``(x_query, y_query)``. In the book's notation these are D_t^train and D_t^val."""

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    @property
    def support(self) -> tuple[Tensor, Tensor]:
        return self.x_support, self.y_support

    @property
    def query(self) -> tuple[Tensor, Tensor]:
        return self.x_query, self.y_query

    @property
    def num_tasks(self) -> int:
        """Length of the leading task axis (only meaningful for a batch of tasks)."""
        return self.x_support.shape[0]

    def task(self, i: int) -> Task:
        """The ``i``-th task of a batch."""
        return Task(*(t[i] for t in self))

    def to(self, *args, **kwargs) -> Task:
        """Move every tensor, as :meth:`torch.Tensor.to`."""
        return Task(*(t.to(*args, **kwargs) for t in self))

    def joined(self, *, batched: bool = False) -> tuple[Tensor, Tensor]:
        """Support and query concatenated along the sample axis: the whole task data D_t.

        For a batch of tasks pass ``batched=True`` (the sample axis is then the second one).
        """
        axis = 1 if batched else 0
        return (
            torch.cat([self.x_support, self.x_query], dim=axis),
            torch.cat([self.y_support, self.y_query], dim=axis),
        )


def check_task(task: Task, *, batched: bool) -> None:
    """Raise ``ValueError`` with a precise message if ``task``'s shapes do not fit together.

    ``batched`` says whether the tensors carry a leading task axis.
    """
    if not isinstance(task, Task):
        raise ValueError(f"expected a gbml.Task, got {type(task).__name__}")
    for name, tensor in zip(Task._fields, task):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"task.{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() < (2 if batched else 1):
            what = "(tasks, samples, ...)" if batched else "(samples, ...)"
            raise ValueError(f"task.{name} has shape {tuple(tensor.shape)}; expected {what}")
    sample_axis = 1 if batched else 0
    if batched:
        counts = {name: t.shape[0] for name, t in zip(Task._fields, task)}
        if len(set(counts.values())) != 1:
            raise ValueError(f"the tensors of a task batch disagree on the number of tasks: {counts}")
    for split in ("support", "query"):
        x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
        if x.shape[sample_axis] != y.shape[sample_axis]:
            raise ValueError(
                f"{split} set: x_{split} has {x.shape[sample_axis]} samples but y_{split} has "
                f"{y.shape[sample_axis]} (shapes {tuple(x.shape)} and {tuple(y.shape)})"
            )
        if x.shape[sample_axis] == 0:
            raise ValueError(f"the {split} set is empty")
    for kind in ("x", "y"):
        s, q = getattr(task, f"{kind}_support"), getattr(task, f"{kind}_query")
        if s.shape[sample_axis + 1 :] != q.shape[sample_axis + 1 :]:
            raise ValueError(
                f"support and query disagree on the shape of one {kind}: {kind}_support is "
                f"{tuple(s.shape)} and {kind}_query is {tuple(q.shape)}"
            )
        if s.dtype != q.dtype:
            raise ValueError(f"{kind}_support is {s.dtype} but {kind}_query is {q.dtype}")


def stack_tasks(tasks: list[Task]) -> Task:
    """Stack single tasks (all of the same shapes) into a batch with a leading task axis."""
    if not tasks:
        raise ValueError("cannot stack an empty list of tasks")
    for task in tasks:
        check_task(task, batched=False)
    return Task(*(torch.stack(tensors) for tensors in zip(*tasks)))


def check_counts(num_tasks: int, shots: int, queries: int) -> None:
    """Raise ValueError unless the task, shot and query counts are positive integers."""
    for name, value in (("num_tasks", num_tasks), ("shots", shots), ("queries", queries)):
        check_positive_integer(name, value)


class TaskFamily(ABC):
    """A distribution over tasks: draw each task's hidden parameters, then its data.

    Subclasses say how to draw the parameters (a tuple of tensors with a leading task axis) and
    the data given them; splitting into support and query sets and moving to a device is shared.
    """

    @abstractmethod
    def sample_parameters(
        self, num_tasks: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, ...]:
        """Draw the hidden parameters of ``num_tasks`` tasks (float64, leading task axis)."""

    @abstractmethod
    def draw_data(
        self, parameters: tuple[Tensor, ...], num_points: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Inputs and targets, shapes (T, num_points, ...), for tasks with these parameters."""

    def make_tasks(
        self,
        parameters: tuple[Tensor, ...],
        shots: int,
        queries: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Task:
        """A batch of tasks with the given parameters: ``shots`` support and ``queries`` query
        points each."""
        check_counts(len(parameters[0]), shots, queries)
        x, y = self.draw_data(parameters, shots + queries, generator)
        task = Task(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
        return task.to(device=device, dtype=dtype)

    def sample(
        self,
        num_tasks: int,
        shots: int,
        queries: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Task:
        """Draw a batch of ``num_tasks`` new tasks with ``shots`` support and ``queries`` query
        points each."""
        check_counts(num_tasks, shots, queries)
        parameters = self.sample_parameters(num_tasks, generator)
        return self.make_tasks(parameters, shots, queries, generator, device=device, dtype=dtype)


@dataclass(frozen=True)
class SinusoidTasks(TaskFamily):
    """The sinusoid regression family of Finn et al. (2017): y = A sin(x − b).

    Amplitude A ~ U[0.1, 5], phase b ~ U[0, π], inputs x ~ U[−5, 5]; K support and Q query
    points per task. Inputs and targets have shape ``(..., 1)``. A task's parameters are
    ``(amplitude, phase)``.
    """

    amplitude_range: tuple[float, float] = (0.1, 5.0)
    phase_range: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        for name in ("amplitude_range", "phase_range", "x_range"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")

    def sample_parameters(
        self, num_tasks: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``num_tasks`` (amplitude, phase) pairs, each a float64 tensor of shape (T,)."""
        check_counts(num_tasks, 1, 1)
        amplitude = _uniform(self.amplitude_range, (num_tasks,), generator)
        phase = _uniform(self.phase_range, (num_tasks,), generator)
        return amplitude, phase

    def draw_data(
        self, parameters: tuple[Tensor, ...], num_points: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        amplitude, phase = parameters
        x = _uniform(self.x_range, (len(amplitude), num_points, 1), generator)
        return x, self.evaluate(amplitude, phase, x)

    @staticmethod
    def evaluate(amplitude: Tensor, phase: Tensor, x: Tensor) -> Tensor:
        """The task functions at ``x`` of shape (T, N, 1): A_t sin(x − b_t)."""
        return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))


@dataclass(frozen=True)
class LinearRegressionTasks(TaskFamily):
    """Linear regression tasks whose answers have closed forms.

    Task t has weights w_t = w̄ + σ_w ε (ε ~ N(0, I)); inputs x ~ N(0, I_d) and targets
    y = x·w_t + σ_y η. Targets have shape ``(..., 1)`` so that ``nn.Linear(dim, 1, bias=False)``
    is the matching model. A task's parameters are ``(weights,)``, weights of shape (T, dim).
    """

    dim: int = 5
    weight_mean: float = 1.0
    weight_std: float = 0.5
    noise_std: float = 0.1

    def __post_init__(self) -> None:
        check_positive_integer("dim", self.dim)
        if self.weight_std < 0 or self.noise_std < 0:
            raise ValueError("weight_std and noise_std must be non-negative")

    def sample_parameters(self, num_tasks: int, generator: torch.Generator | None = None) -> tuple[Tensor]:
        """Draw ``num_tasks`` weight vectors: a one-tuple holding a (T, dim) float64 tensor."""
        check_counts(num_tasks, 1, 1)
        noise = torch.randn(num_tasks, self.dim, generator=generator, dtype=torch.float64)
        return (self.weight_mean + self.weight_std * noise,)

    def draw_data(
        self, parameters: tuple[Tensor, ...], num_points: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        (weights,) = parameters
        x = torch.randn(len(weights), num_points, self.dim, generator=generator, dtype=torch.float64)
        noise = torch.randn(len(weights), num_points, 1, generator=generator, dtype=torch.float64)
        return x, x @ weights.to(torch.float64).unsqueeze(-1) + self.noise_std * noise


def _uniform(
    bounds: tuple[float, float], shape: tuple[int, ...], generator: torch.Generator | None
) -> Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)
