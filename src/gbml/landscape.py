"""Quadratic task landscapes: linear-regression tasks on which the meta-updates have closed forms.

Under the mean squared error a linear model's loss is a quadratic in its weights θ::

    ℓ(θ) = mean((Xθ − y)²),    ∇ℓ(θ) = Hθ − b,    H = 2XᵀX/n,    b = 2Xᵀy/n,

so every inner loop, Jacobian and meta-gradient of the four algorithms can be written down.
Chapter 6 of the book compares them on two such landscapes:

* :class:`QuadraticTask`: one task of :class:`gbml.LinearRegressionTasks` with the H and b of its
  support set, its query set and all of its data, the spectrum of the support Hessian, and an
  iMAML configured to solve its proximal problem and its linear system to float64 precision;
* :class:`ValleyTasks`: a two-dimensional family whose task optima lie on an arc of the unit
  circle and whose one-point support losses are valleys (zero on a line), with round query losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gbml.algorithms import IMAML
from gbml.params import Params
from gbml.tasks import Task


def quadratic(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(H, b)`` of the mean squared error of a linear model on the data ``(x, y)``.

    ``x`` is ``(n, d)`` and ``y`` is ``(n, 1)``; then ``∇ mean((xθ − y)²) = Hθ − b`` for a column
    θ, with ``H = 2xᵀx/n`` (``(d, d)``) and ``b = 2xᵀy/n`` (``(d, 1)``).
    """
    n = x.shape[0]
    return 2 * x.T @ x / n, 2 * x.T @ y / n


class QuadraticTask:
    """One linear-regression task (no task axis) and its closed-form quantities.

    ``H``, ``b`` belong to the support loss, ``H_val``, ``b_val`` to the query loss and ``H_all``,
    ``b_all`` to the loss on all of the task's data (what Reptile adapts on). ``eigenvalues`` and
    ``eigenvectors`` are those of ``H``, ascending.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.H, self.b = quadratic(*task.support)
        self.H_val, self.b_val = quadratic(*task.query)
        self.H_all, self.b_all = quadratic(*task.joined())
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.H)

    @property
    def h_max(self) -> float:
        """The largest eigenvalue of ``H``."""
        return float(self.eigenvalues[-1])

    @property
    def nonzero(self) -> Tensor:
        """Which eigenvalues of ``H`` are non-zero (above 1e-10 h_max, the rounding floor)."""
        return self.eigenvalues > 1e-10 * self.h_max

    @property
    def rank(self) -> int:
        """The rank of ``H``: at most the number of support points."""
        return int(self.nonzero.sum())

    @property
    def null_space_projector(self) -> Tensor:
        """P₀, the orthogonal projector onto the null space of ``H`` (zero when H is invertible)."""
        null_space = self.eigenvectors[:, ~self.nonzero]
        return null_space @ null_space.T

    def converged_imaml(self, lam: float, cg_steps: int = 30) -> IMAML:
        """:class:`gbml.IMAML` whose inner solve and CG solve reach float64 precision on this task.

        The proximal objective's Hessian is H + λI. Its components in the null space of H never
        move from φ, so gradient descent with step 1/(λ + h_max) contracts the error by at least
        1 − 1/κ per step, κ = (λ + h_max)/(λ + h₊) with h₊ the smallest non-zero eigenvalue, and
        κ·ln(10¹⁶) steps reach rounding level. Rounding in Hv keeps the computed CG residual above
        a few ε‖A‖, with ‖A‖ = 1 + h_max/λ for A = I + H/λ, so the CG tolerance is 50ε‖A‖.
        """
        smallest = float(self.eigenvalues[self.nonzero][0])
        kappa = (lam + self.h_max) / (lam + smallest)
        steps = math.ceil(kappa * math.log(1e16))
        cg_tol = 50 * torch.finfo(torch.float64).eps * (1 + self.h_max / lam)
        return IMAML(1 / (lam + self.h_max), lam, inner_steps=steps, cg_steps=cg_steps, cg_tol=cg_tol)


@dataclass(frozen=True)
class ValleyTasks:
    """Noise-free two-dimensional linear regression ``y = xᵀw_t`` with valley-shaped support losses.

    Task t's optimum ``w_t = (cos a_t, sin a_t)`` lies on the unit circle, at an angle ``a_t`` in
    ``arc``. Its support set is the single input ``r_t w_t``, with ``r_t`` growing linearly from
    ``radius[0]`` to ``radius[1]`` along the arc, so the support loss ``(r_t w_tᵀθ − r_t)²`` is a
    valley: zero on the line ``w_tᵀθ = 1`` tangent to the circle at ``w_t``, of curvature 2r_t²
    across it. Its query set is the two inputs ``query_scale · e_i``, so the query loss is the
    round bowl ``query_scale² ‖θ − w_t‖² / 2`` around ``w_t``. Parameters are ``{"w": (2,)}``.
    """

    arc: tuple[float, float] = (-0.3, 2.4)
    radius: tuple[float, float] = (0.4, 2.0)
    query_scale: float = 0.3

    @staticmethod
    def loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        """The mean squared error of the linear model ``xᵀw`` (the family's :data:`gbml.LossFn`)."""
        return ((x @ params["w"] - y) ** 2).mean()

    def angles(self, fraction: Tensor) -> Tensor:
        """The angles at fractions (in [0, 1]) of the way along the arc."""
        return self.arc[0] + (self.arc[1] - self.arc[0]) * fraction

    def optima(self, angles: Tensor) -> Tensor:
        """``w_t`` for each angle: ``(T, 2)``."""
        return torch.stack([angles.cos(), angles.sin()], dim=-1)

    def tasks(self, angles: Tensor) -> Task:
        """A batch of tasks (leading task axis) at these angles, on their dtype and device."""
        w = self.optima(angles)
        fraction = (angles - self.arc[0]) / (self.arc[1] - self.arc[0])
        r = self.radius[0] + (self.radius[1] - self.radius[0]) * fraction
        x_support = (r[:, None] * w)[:, None, :]
        eye = torch.eye(2, dtype=angles.dtype, device=angles.device)
        x_query = self.query_scale * eye.expand(len(angles), 2, 2)
        return Task(x_support, (x_support @ w[..., None])[..., 0], x_query, (x_query @ w[..., None])[..., 0])

    @staticmethod
    def valley_distance(phi: Tensor, tasks: Task) -> Tensor:
        """Distance from φ (``(2,)``) to each task's valley ``x_sᵀθ = y_s``: ``(T,)``."""
        x, y = tasks.x_support[:, 0], tasks.y_support[:, 0]
        return (x @ phi - y).abs() / x.norm(dim=-1)
