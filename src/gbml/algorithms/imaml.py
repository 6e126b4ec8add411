"""iMAML (Rajeswaran et al., 2019): the meta-gradient from the implicit function theorem.

The inner problem is proximal::

    θ_t(φ) = argmin_θ  ℓ_train(θ) + λ/2 ‖θ − φ‖²,

and at its minimum ∇ℓ_train(θ_t) + λ(θ_t − φ) = 0. Differentiating that identity in φ gives
dθ_t/dφ = (I + ∇²ℓ_train(θ_t)/λ)⁻¹, which is symmetric, so::

    Δ_t = (I + H/λ)⁻¹ ∇ℓ_val(θ_t),     H = ∇²ℓ_train(θ_t).

The solve uses conjugate gradient with Hessian-vector products; nothing about the path that
reached θ_t is stored, so memory does not grow with the number of inner steps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad_and_value

from gbml.adapt import INNER_LOOPS, LossFn, check_learning_rate, check_steps, proximal_task_adapt
from gbml.algorithms.base import MetaAlgorithm, TaskInfo
from gbml.cg import conjugate_gradient, gradient_and_hessian_product
from gbml.errors import ConvergenceError
from gbml.params import Params, flatten, unflatten
from gbml.tasks import Task


@dataclass(frozen=True)
class IMAML(MetaAlgorithm):
    """Implicit MAML.

    Args:
        inner_lr: step size of the gradient descent that solves the proximal inner problem.
        lam: λ, the strength of the pull towards φ (> 0).
        inner_steps: gradient steps on the proximal inner problem.
        cg_steps: conjugate-gradient iterations (Hessian-vector products) per task.
        cg_tol: relative residual ‖b − Ax‖/‖b‖ the solve must reach.
        damping: extra δ on the diagonal, solving ((1 + δ) I + H/λ) x = g; δ > 0 keeps the
            system positive definite when H has negative eigenvalues below −λ.
        on_cg_failure: ``"raise"`` (default) raises :class:`~gbml.errors.ConvergenceError` when
            a solve misses ``cg_tol``; ``"warn"`` accepts deliberately truncated solves (as the
            iMAML paper does with 5 CG steps) and only warns.
        inner_loop: how the proximal inner problem is solved. ``"proximal"`` (default): L
            gradient steps on ℓ + λ/2 ‖θ − φ‖². ``"pull_back"``: L gradient steps on ℓ alone,
            then one step of size ``inner_lr`` on the proximal term alone (θ moves a fraction
            α·λ of the way back to φ), as Rajeswaran et al.'s released code does
            (:func:`gbml.proximal_task_adapt`).
    """

    inner_lr: float
    lam: float
    inner_steps: int = 10
    cg_steps: int = 5
    cg_tol: float = 1e-2
    damping: float = 0.0
    on_cg_failure: Literal["raise", "warn"] = "raise"
    inner_loop: Literal["proximal", "pull_back"] = "proximal"

    def __post_init__(self) -> None:
        check_learning_rate("inner_lr", self.inner_lr)
        check_learning_rate("lam", self.lam)
        check_steps("inner_steps", self.inner_steps)
        check_steps("cg_steps", self.cg_steps)
        if not self.cg_tol >= 0:
            raise ValueError(f"cg_tol must be non-negative, got {self.cg_tol!r}")
        if not self.damping >= 0:
            raise ValueError(f"damping must be non-negative, got {self.damping!r}")
        if self.on_cg_failure not in ("raise", "warn"):
            raise ValueError(f"on_cg_failure must be 'raise' or 'warn', got {self.on_cg_failure!r}")
        if self.inner_loop not in INNER_LOOPS:
            raise ValueError(f"inner_loop must be 'proximal' or 'pull_back', got {self.inner_loop!r}")

    def adapt(self, loss: LossFn, phi: Params, x: Tensor, y: Tensor) -> Params:
        """The proximal inner problem, solved as ``inner_loop`` says (the same TASK_ADAPT as training)."""
        return proximal_task_adapt(
            loss,
            phi,
            x,
            y,
            lam=self.lam,
            lr=self.inner_lr,
            steps=self.inner_steps,
            validate=False,
            inner_loop=self.inner_loop,
        )

    def task_delta(self, loss: LossFn, phi: Params, task: Task) -> tuple[Params, TaskInfo]:
        theta = self.adapt(loss, phi, *task.support)
        query_gradient, query_loss = grad_and_value(loss)(theta, *task.query)

        # H = ∇²ℓ_train(θ_t) is applied cg_steps + 1 times at the same θ_t: linearise ∇ℓ_train once.
        train_gradient, hessian_times = gradient_and_hessian_product(lambda t: loss(t, *task.support), theta)

        def system_matrix_times(v: Tensor) -> Tensor:  # ((1 + δ) I + H/λ) v
            hv = hessian_times(unflatten(v, theta))
            return (1.0 + self.damping) * v + flatten(hv) / self.lam

        cg = conjugate_gradient(
            system_matrix_times, flatten(query_gradient), max_iter=self.cg_steps, tol=self.cg_tol
        )
        # How far θ_t is from the proximal minimum (the implicit gradient assumes it is there):
        # the proximal objective's gradient, ∇ℓ_train(θ_t) + λ(θ_t − φ).
        inner_gradient = {k: train_gradient[k] + self.lam * (theta[k] - phi[k]) for k in theta}
        info = {
            "query_loss": query_loss,
            "cg_relative_residual": cg.relative_residual,
            "cg_iterations": cg.iterations,
            "inner_gradient_norm": torch.linalg.vector_norm(flatten(inner_gradient)),
        }
        return unflatten(cg.solution, theta), info

    def diagnose(self, info: TaskInfo) -> None:
        residual = info["cg_relative_residual"].reshape(-1)
        failed = residual > self.cg_tol
        if not bool(failed.any()):
            return
        message = (
            f"iMAML's conjugate gradient missed its tolerance on {int(failed.sum())} of "
            f"{residual.numel()} tasks: relative residual up to {float(residual.max()):.3g} after "
            f"cg_steps={self.cg_steps} (cg_tol={self.cg_tol:g}). Raise cg_steps, or raise lam or "
            f"damping (a better conditioned system)"
        )
        if self.on_cg_failure == "raise":
            raise ConvergenceError(message + ", or pass on_cg_failure='warn' to accept truncated solves.")
        warnings.warn(message + ".", RuntimeWarning, stacklevel=3)
