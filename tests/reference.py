"""Independent reference computations for the tests.

Nothing here calls gbml's algorithms: the inner loop is re-written with plain
``torch.autograd.grad`` (gbml uses ``torch.func``), finite differences evaluate only forward
passes, and the closed forms are written out from their derivations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


def clone_params(model: nn.Module) -> Params:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def relative_error(a: Params | Tensor, b: Params | Tensor) -> float:
    """‖a − b‖ / ‖b‖ over all entries."""
    if isinstance(a, Tensor):
        a, b = a.detach(), b.detach()
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b)
    den = sum(float((b[k] ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def adapted_params(model, criterion, params, x, y, lr, steps, create_graph=False, frozen=()) -> Params:
    """L plain gradient steps with torch.autograd (none for the parameters named in ``frozen``)."""
    theta = dict(params)
    for _ in range(steps):
        if not any(v.requires_grad for v in theta.values()):
            theta = {k: v.detach().requires_grad_() for k, v in theta.items()}
        value = criterion(functional_call(model, theta, (x,)), y)
        grads = torch.autograd.grad(value, list(theta.values()), create_graph=create_graph)
        theta = {k: v if k in frozen else v - lr * g for (k, v), g in zip(theta.items(), grads)}
        if not create_graph:
            theta = {k: v.detach() for k, v in theta.items()}
    return theta


def query_loss_after_adaptation(model, criterion, params, task, lr, steps, frozen=()) -> float:
    """f(φ) = ℓ(θ_L(φ); D_val): the function whose gradient MAML computes (forward only)."""
    xs, ys, xq, yq = task
    theta = adapted_params(model, criterion, params, xs, ys, lr, steps, frozen=frozen)
    with torch.no_grad():
        return float(criterion(functional_call(model, theta, (xq,)), yq))


def loss_gradient(model, criterion, params, x, y) -> Params:
    """∇ℓ(params; x, y) by torch.autograd."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    value = criterion(functional_call(model, leaves, (x,)), y)
    grads = torch.autograd.grad(value, list(leaves.values()))
    return dict(zip(leaves, grads))


def central_difference(f, params: Params, direction: Params, eps: float) -> float:
    """(f(φ + εv) − f(φ − εv)) / 2ε."""
    plus = {k: params[k] + eps * direction[k] for k in params}
    minus = {k: params[k] - eps * direction[k] for k in params}
    return (f(plus) - f(minus)) / (2 * eps)


def linear_regression_quantities(x: Tensor, y: Tensor):
    """For ℓ(w) = mean((x w − y)²) with w of shape (1, d) (nn.Linear(d, 1, bias=False)):
    ∇ℓ(w) = H wᵀ − b with H = 2xᵀx/n and b = 2xᵀy/n (as column vectors)."""
    n = x.shape[0]
    return 2 * x.T @ x / n, 2 * x.T @ y / n
