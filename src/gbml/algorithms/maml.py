"""MAML (Finn et al., 2017): differentiate the query loss through the whole inner loop::

    θ_t(φ) = TASK_ADAPT(φ, D_t^train)          (L differentiable gradient steps)
    Δ_t    = ∇_φ ℓ(θ_t(φ); D_t^val)
           = (I − α∇²ℓ_train(θ_0)) ⋯ (I − α∇²ℓ_train(θ_{L−1})) ∇ℓ_val(θ_L)

The product of Jacobians is never formed: reverse-mode autodiff through the inner steps applies
each factor to a vector, i.e. one Hessian-vector product per step, and keeps all L iterates in
memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.func import grad

from gbml.adapt import LossFn, task_adapt
from gbml.algorithms.base import GradientStepAlgorithm, TaskInfo
from gbml.params import Params
from gbml.tasks import Task


@dataclass(frozen=True)
class MAML(GradientStepAlgorithm):
    """Second-order MAML with ``inner_steps`` (L) steps of size ``inner_lr`` (α)."""

    def task_delta(self, loss: LossFn, phi: Params, task: Task) -> tuple[Params, TaskInfo]:
        def query_loss_after_adaptation(phi: Params) -> tuple[Tensor, Tensor]:
            theta = task_adapt(
                loss,
                phi,
                *task.support,
                lr=self.inner_lr,
                steps=self.inner_steps,
                validate=False,
                frozen=self.frozen,
            )
            query_loss = loss(theta, *task.query)
            return query_loss, query_loss.detach()

        delta, query_loss = grad(query_loss_after_adaptation, has_aux=True)(phi)
        return delta, {"query_loss": query_loss}
