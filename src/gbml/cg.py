"""Conjugate gradient with Hessian-vector products: the linear solve inside iMAML.

iMAML needs x = (I + H/λ)⁻¹ g without ever forming the Hessian H. Conjugate gradient (CG) solves
A x = b for symmetric positive definite A using only products A v, and A v = v + H v / λ costs
one Hessian-vector product: one more backward pass through the gradient.
CG needs A positive definite, that is λ > −h_min for the smallest eigenvalue h_min of H;
:func:`extreme_eigenvalues` estimates h_min and h_max from a few Hessian-vector products.

:func:`conjugate_gradient` has no data-dependent Python control flow, so it also runs under
:func:`torch.func.vmap` (one solve per task, all at once): once a solve has converged its
later iterations are masked to no-ops instead of breaking out of the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad, vjp

from gbml.errors import check_positive_integer
from gbml.params import Params


class CGResult(NamedTuple):
    """Outcome of :func:`conjugate_gradient`."""

    solution: Tensor
    """The approximate solution x."""
    relative_residual: Tensor
    """‖b − A x‖ / ‖b‖, recomputed from x at the end (0 when b = 0)."""
    iterations: Tensor
    """How many iterations changed x (the rest found the solve already converged)."""


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    max_iter: int,
    tol: float = 1e-10,
) -> CGResult:
    """Solve A x = b for symmetric positive definite A, given only v ↦ A v.

    Starting from x₀ = 0 with residual r₀ = p₀ = b, each iteration moves along the search
    direction p by the step that minimises ½xᵀAx − bᵀx on that line, then makes the next
    direction A-conjugate to the previous ones::

        γ = rᵀr / pᵀAp,   x ← x + γ p,   r ← r − γ A p,   ω = r_newᵀr_new / rᵀr,   p ← r + ω p.

    Iterations stop changing x once ‖r‖ ≤ tol·‖b‖, or if the curvature pᵀAp is not positive
    (A is not positive definite along p; the residual then stays large and says so).
    ``max_iter`` products with A are made either way, plus one to report the true residual.
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol!r}")
    if b.dim() != 1:
        raise ValueError(f"b must be a vector, got shape {tuple(b.shape)}")
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    threshold = (tol * torch.linalg.vector_norm(b)) ** 2
    iterations = torch.zeros((), dtype=torch.long, device=b.device)
    for _ in range(max_iter):
        Ap = matvec(p)
        pAp = p @ Ap
        active = (rr > threshold) & (pAp > 0)
        # Masked updates (rather than `break`) keep the loop free of data-dependent control flow.
        gamma = torch.where(active, rr / torch.where(active, pAp, 1.0), 0.0)
        x = x + gamma * p
        r = r - gamma * Ap
        rr_new = r @ r
        omega = torch.where(active, rr_new / torch.where(active, rr, 1.0), 0.0)
        p = torch.where(active, r + omega * p, p)
        rr = torch.where(active, rr_new, rr)
        iterations = iterations + active.long()
    b_norm = torch.linalg.vector_norm(b)
    residual = torch.linalg.vector_norm(b - matvec(x)) if max_iter > 0 else b_norm
    relative = torch.where(b_norm > 0, residual / torch.where(b_norm > 0, b_norm, 1.0), 0.0)
    return CGResult(x, relative, iterations)


def extreme_eigenvalues(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    k: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """The smallest and the largest eigenvalue of a symmetric n × n operator, from k products v ↦ A v.

    The Lanczos method: from a random start q (drawn on the CPU with ``generator``), build an
    orthonormal basis V of the Krylov space span{q, Aq, …, A^{k−1}q}, in which VᵀAV is
    tridiagonal, and return the extreme eigenvalues of VᵀAV (the Ritz values). They converge to
    A's extreme eigenvalues first, so k is usually tens even for n in the hundreds of thousands.
    Every vector is orthogonalised twice against the whole basis, so V stays orthonormal to
    rounding (k + 1 vectors of size n are kept), and then, because VᵀAV is a compression of A,
    the smallest Ritz value is at least A's smallest eigenvalue and the largest at most its
    largest: a negative smallest value *proves* that A has an eigenvalue at least as negative.

    For iMAML, pass the Hessian-vector product of the support loss (on flat vectors): a
    returned smallest value h with λ ≤ −h means that I + H/λ is indefinite and conjugate
    gradient will fail. The iteration stops early, with exact Ritz values of an invariant
    subspace, if the Krylov space stops growing (at most k = n steps are taken).
    """
    check_positive_integer("n", n)
    check_positive_integer("k", k)
    k = min(k, n)
    start = torch.randn(n, generator=generator, dtype=dtype).to(device)
    basis = torch.empty(k, n, dtype=dtype, device=start.device)
    basis[0] = start / torch.linalg.vector_norm(start)
    diagonal, off_diagonal = [], []
    for j in range(k):
        w = matvec(basis[j])
        diagonal.append(w @ basis[j])
        scale = torch.linalg.vector_norm(w)
        for _ in range(2):  # Gram-Schmidt twice against the whole basis: orthogonal to rounding
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        norm = torch.linalg.vector_norm(w)
        if j + 1 == k or norm <= 1e3 * torch.finfo(dtype).eps * scale:
            break  # k steps done, or the Krylov space is invariant: the Ritz values are exact
        off_diagonal.append(norm)
        basis[j + 1] = w / norm
    tridiagonal = torch.diag(torch.stack(diagonal))
    if off_diagonal:
        off = torch.stack(off_diagonal)
        tridiagonal = tridiagonal + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(tridiagonal)
    return float(ritz[0]), float(ritz[-1])


def hessian_vector_product(f: Callable[[Params], Tensor], params: Params, v: Params) -> Params:
    """∇²f(params) · v without materialising the Hessian.

    Computed as the vector-Jacobian product of ∇f with v (reverse over reverse), which equals
    H v because the Hessian is symmetric; it costs a small multiple of one gradient evaluation
    (about three gradients' worth of matrix products, counted on the sinusoid MLP). (Forward over
    reverse, ``jvp(grad(f))``, would be cheaper but fails with "ZeroTensors are immutable" for
    some models on torch 2.14, e.g. a bias-free ``nn.Linear`` under mean squared error.)
    For several products at the same point use :func:`gradient_and_hessian_product`.
    """
    _, hessian_times = gradient_and_hessian_product(f, params)
    return hessian_times(v)


def gradient_and_hessian_product(
    f: Callable[[Params], Tensor], params: Params
) -> tuple[Params, Callable[[Params], Params]]:
    """∇f(params), and the function v ↦ ∇²f(params) · v.

    The gradient is computed once, with its graph kept; each product is then one backward pass
    through it, instead of a new forward and backward pass per product as in
    :func:`hessian_vector_product`. Conjugate gradient makes several products at one point.
    """
    gradient, vjp_fn = vjp(grad(f), params)

    def hessian_times(v: Params) -> Params:
        (hv,) = vjp_fn(v)
        return hv

    return gradient, hessian_times
