"""TASK_ADAPT: the inner loop that turns meta-parameters φ into task parameters θ_t.

Both functions are written with :func:`torch.func.grad`, so they compose with an outer
``grad`` (MAML differentiates straight through them) and with ``vmap`` (one call adapts a whole
batch of tasks).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from torch import Tensor
from torch.func import grad

from gbml.params import Params, detached, squared_distance

LossFn = Callable[[Params, Tensor, Tensor], Tensor]
"""``ℓ(params, x, y) -> scalar``: the loss of a network with ``params`` on the batch ``(x, y)``."""

#: How :func:`proximal_task_adapt` solves iMAML's inner problem.
INNER_LOOPS = ("proximal", "pull_back")


def check_learning_rate(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_steps(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def task_adapt(
    loss: LossFn,
    phi: Params,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    steps: int,
    differentiable: bool = True,
    validate: bool = True,
    frozen: Collection[str] = (),
) -> Params:
    """L steps of gradient descent on ``ℓ(·; x, y)`` from φ::

        θ_0 = φ,    θ_{k+1}[n] = θ_k[n] − α ∇ℓ(θ_k)[n]  for n ∉ frozen,  φ[n] for n ∈ frozen,
        return θ_L.

    The parameters named in ``frozen`` are not stepped: they stay at φ (still a function of φ
    for an outer transform) and only the outer loop learns them. Finn et al.'s code does this with
    batch norm's shift, which is not among its "fast weights". Raises ``ValueError`` if ``frozen``
    names a parameter that φ does not have.

    With ``differentiable=True`` the result stays a differentiable function of φ under an outer
    ``torch.func`` transform (what MAML needs). With ``differentiable=False`` every iterate is
    cut from the graph (a stop-gradient), as first-order methods assume: dθ_L/dφ is then taken
    to be the identity by whoever uses the result, never computed.

    ``validate=False`` skips the checks of ``lr`` and ``steps``: the algorithms check them once,
    when they are built, so nothing is re-checked per task or inside a ``vmap`` trace.
    """
    if validate:
        check_learning_rate("inner learning rate", lr)
        check_steps("number of inner steps", steps)
    # (A comprehension, not set(frozen) - phi.keys(): TorchDynamo in torch 2.11 cannot trace that.)
    unknown = [name for name in frozen if name not in phi]
    if unknown:
        raise ValueError(f"frozen names parameters that phi does not have: {sorted(unknown)}")
    gradient = grad(loss)
    theta = phi if differentiable else detached(phi)
    for _ in range(steps):
        g = gradient(theta, x, y)
        theta = {name: theta[name] if name in frozen else theta[name] - lr * g[name] for name in theta}
        if not differentiable:
            theta = detached(theta)
    return theta


def proximal_task_adapt(
    loss: LossFn,
    phi: Params,
    x: Tensor,
    y: Tensor,
    *,
    lam: float,
    lr: float,
    steps: int,
    validate: bool = True,
    inner_loop: str = "proximal",
) -> Params:
    """iMAML's inner problem, solved approximately by L steps of gradient descent from φ::

        θ_t ≈ argmin_θ  ℓ(θ; x, y) + λ/2 ‖θ − φ‖².

    ``inner_loop="proximal"`` (default) descends that objective: θ_{k+1} = θ_k − α(∇ℓ(θ_k) +
    λ(θ_k − φ)). ``inner_loop="pull_back"`` is the loop of Rajeswaran et al.'s released code: L
    steps on ℓ alone, then one step of the same size on the proximal term alone, which pulls θ a
    fraction αλ of the way back to φ::

        θ_{k+1} = θ_k − α ∇ℓ(θ_k),    θ_t = θ_L − αλ (θ_L − φ).

    The result is never differentiated with respect to φ (iMAML gets its meta-gradient from
    the implicit function theorem instead), so it is returned cut from the graph. ``validate``
    as for :func:`task_adapt`.
    """
    if validate:
        check_learning_rate("lambda (proximal regularisation)", lam)
        check_learning_rate("inner learning rate", lr)
        check_steps("number of inner steps", steps)
    if inner_loop not in INNER_LOOPS:
        raise ValueError(f"inner_loop must be 'proximal' or 'pull_back', got {inner_loop!r}")
    anchor = detached(phi)
    if inner_loop == "pull_back":
        theta = task_adapt(loss, anchor, x, y, lr=lr, steps=steps, differentiable=False, validate=False)
        return {name: theta[name] - lr * lam * (theta[name] - anchor[name]) for name in theta}

    def proximal_objective(theta: Params) -> Tensor:
        return loss(theta, x, y) + 0.5 * lam * squared_distance(theta, anchor)

    gradient = grad(proximal_objective)
    theta = anchor
    for _ in range(steps):
        g = gradient(theta)
        theta = detached({name: theta[name] - lr * g[name] for name in theta})
    return theta
