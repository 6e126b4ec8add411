"""First-order MAML (Finn et al., 2017): MAML with the inner loop's Jacobian replaced by I::

    θ_t = TASK_ADAPT(φ, D_t^train)     (not differentiated)
    Δ_t = ∇_θ ℓ(θ_t; D_t^val)

Exact MAML multiplies this vector by Π_k (I − α∇²ℓ_train(θ_k)); dropping the product saves the
Hessian-vector products and the memory of the inner iterates, and is accurate when α∇²ℓ_train
is small along the query gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.func import grad_and_value

from gbml.adapt import LossFn, task_adapt
from gbml.algorithms.base import GradientStepAlgorithm, TaskInfo
from gbml.params import Params
from gbml.tasks import Task


@dataclass(frozen=True)
class FOMAML(GradientStepAlgorithm):
    """First-order MAML with ``inner_steps`` (L) steps of size ``inner_lr`` (α)."""

    def task_delta(self, loss: LossFn, phi: Params, task: Task) -> tuple[Params, TaskInfo]:
        theta = task_adapt(
            loss,
            phi,
            *task.support,
            lr=self.inner_lr,
            steps=self.inner_steps,
            differentiable=False,
            validate=False,  # checked once, when the algorithm was built
            frozen=self.frozen,
        )
        delta, query_loss = grad_and_value(loss)(theta, *task.query)
        return delta, {"query_loss": query_loss}
