"""iMAML and its conjugate-gradient solver against closed forms on ridge regression."""

from itertools import pairwise

import pytest
import torch
from torch import nn

import gbml
from gbml.params import flatten
from reference import clone_params, linear_regression_quantities, relative_error


def ridge_setup(generator, dim=5, shots=8, queries=12):
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, dim, generator=generator, dtype=torch.float64))
    task = gbml.LinearRegressionTasks(dim=dim, noise_std=0.3).sample(
        1, shots, queries, generator, dtype=torch.float64
    )
    return model, task.task(0)


def exact_ridge_meta_gradient(phi, task, lam):
    """The proximal inner problem min_w mean((Xw − y)²) + λ/2‖w − φ‖² has gradient
    Hw − b + λ(w − φ) with H = 2XᵀX/n, b = 2Xᵀy/n, so its minimiser is

        θ*(φ) = (H + λI)⁻¹ (b + λφ),     dθ*/dφ = λ (H + λI)⁻¹ = (I + H/λ)⁻¹,

    and the true meta-gradient is (dθ*/dφ)ᵀ ∇ℓ_val(θ*) = λ (H + λI)⁻¹ (H_val θ* − b_val)."""
    h, b = linear_regression_quantities(*task.support)
    h_val, b_val = linear_regression_quantities(*task.query)
    eye = torch.eye(len(h), dtype=h.dtype)
    theta_star = torch.linalg.solve(h + lam * eye, b + lam * phi["weight"].T)
    meta_gradient = lam * torch.linalg.solve(h + lam * eye, h_val @ theta_star - b_val)
    return theta_star.T, meta_gradient.T


def pulled_back_ridge_theta(phi_column, task, lam, lr, steps):
    """Rajeswaran et al.'s inner loop on ridge regression, in closed form. L gradient steps on
    mean((Xw − y)²), whose gradient is Hw − b, leave w_L = w* + (I − αH)^L (φ − w*) with Hw* = b;
    the pull-back step gives θ = w_L − αλ(w_L − φ). Column vectors in and out."""
    h, b = linear_regression_quantities(*task.support)
    w_star = torch.linalg.solve(h, b)
    eye = torch.eye(len(h), dtype=h.dtype)
    w_steps = w_star + torch.linalg.matrix_power(eye - lr * h, steps) @ (phi_column - w_star)
    return w_steps - lr * lam * (w_steps - phi_column)


@pytest.mark.parametrize("lam", [0.5, 2.0, 10.0])
def test_imaml_matches_the_exact_ridge_meta_gradient(lam, generator):
    model, task = ridge_setup(generator)
    phi = clone_params(model)
    loss = gbml.make_loss(model)
    theta_star, expected = exact_ridge_meta_gradient(phi, task, lam)

    # A converged inner solve: step 1/(λ + ‖H‖) makes gradient descent a contraction.
    h, _ = linear_regression_quantities(*task.support)
    inner_lr = 1.0 / (lam + float(torch.linalg.eigvalsh(h).max()))
    theta = gbml.proximal_task_adapt(loss, phi, *task.support, lam=lam, lr=inner_lr, steps=2000)
    assert relative_error(theta["weight"], theta_star) < 1e-12

    algorithm = gbml.IMAML(inner_lr=inner_lr, lam=lam, inner_steps=2000, cg_steps=10, cg_tol=1e-12)
    delta, info = algorithm.task_delta(loss, phi, task)
    assert relative_error(delta["weight"], expected) < 1e-8
    assert float(info["cg_relative_residual"]) <= 1e-12
    assert float(info["inner_gradient_norm"]) < 1e-12


def test_imaml_error_shrinks_with_cg_steps(generator):
    model, task = ridge_setup(generator, dim=12, shots=14)
    phi = clone_params(model)
    loss = gbml.make_loss(model)
    lam = 0.2  # small λ: a poorly conditioned system that CG needs many steps for
    _, expected = exact_ridge_meta_gradient(phi, task, lam)
    h, _ = linear_regression_quantities(*task.support)
    inner_lr = 1.0 / (lam + float(torch.linalg.eigvalsh(h).max()))
    errors = []
    for cg_steps in (1, 2, 4, 8, 12):
        algorithm = gbml.IMAML(
            inner_lr, lam, inner_steps=1500, cg_steps=cg_steps, on_cg_failure="warn", cg_tol=0
        )
        delta, _ = algorithm.task_delta(loss, phi, task)
        errors.append(relative_error(delta["weight"], expected))
    assert errors[0] > 1e-2, errors  # one step is far off ...
    assert all(later < earlier for earlier, later in pairwise(errors)), errors
    assert errors[-1] < 1e-8, errors  # ... and d = 12 steps solve a 12-dimensional system


def test_pulled_back_inner_loop_and_its_meta_gradient_match_the_closed_form(generator):
    """Rajeswaran et al.'s inner loop on ridge regression against its closed form
    (:func:`pulled_back_ridge_theta`), and iMAML's meta-gradient at that θ:
    (I + H/λ)⁻¹ ∇ℓ_val(θ) = λ (H + λI)⁻¹ (H_val θ − b_val)."""
    model, task = ridge_setup(generator)
    phi = clone_params(model)
    loss = gbml.make_loss(model)
    lam, lr, steps = 2.0, 0.05, 7
    h, _ = linear_regression_quantities(*task.support)
    h_val, b_val = linear_regression_quantities(*task.query)
    eye = torch.eye(len(h), dtype=h.dtype)
    theta_expected = pulled_back_ridge_theta(phi["weight"].T, task, lam, lr, steps)

    theta = gbml.proximal_task_adapt(
        loss, phi, *task.support, lam=lam, lr=lr, steps=steps, inner_loop="pull_back"
    )
    assert relative_error(theta["weight"], theta_expected.T) < 1e-12
    assert not theta["weight"].requires_grad

    algorithm = gbml.IMAML(lr, lam, inner_steps=steps, cg_steps=10, cg_tol=1e-12, inner_loop="pull_back")
    assert relative_error(algorithm.adapt(loss, phi, *task.support)["weight"], theta_expected.T) < 1e-12
    delta, _ = algorithm.task_delta(loss, phi, task)
    expected = lam * torch.linalg.solve(h + lam * eye, h_val @ theta_expected - b_val)
    assert relative_error(delta["weight"], expected.T) < 1e-10
    # ... and the proximal inner loop (the default) reaches another θ with the same steps.
    proximal = gbml.IMAML(lr, lam, inner_steps=steps, cg_steps=10, cg_tol=1e-12)
    assert relative_error(proximal.adapt(loss, phi, *task.support)["weight"], theta_expected.T) > 1e-3


def test_rajeswaran_protocol_takes_their_outer_steps(generator):
    """gbml.protocols.rajeswaran_protocol claims its outer steps are those of Rajeswaran et al.'s
    code: they solve (2I + H/(λ + 10)) x = g and step Adam with ε = 10⁻³; gbml solves
    ((1 + δ)I + H/λ) x = g with δ = 11 and steps Adam with ε = 10⁻³/6. On ridge regression
    (H constant) their steps are written out with closed forms, ours run through gbml and the
    registered options; three Adam steps must agree."""
    from gbml.protocols import rajeswaran_protocol

    config = rajeswaran_protocol(5, 1)
    model, task = ridge_setup(generator)
    loss = gbml.make_loss(model)
    lam, lr, steps = config.lam, 0.05, 4  # the protocol's inner step 0.1 is too long for this H
    h, _ = linear_regression_quantities(*task.support)
    h_val, b_val = linear_regression_quantities(*task.query)
    eye = torch.eye(len(h), dtype=h.dtype)

    def their_meta_gradient(phi):  # their inner loop, then their damped system, solved exactly
        theta = pulled_back_ridge_theta(phi.T, task, lam, lr, steps)
        return torch.linalg.solve(2 * eye + h / (lam + 10), h_val @ theta - b_val).T

    def outer_steps(meta_gradient, eps):
        phi = clone_params(model)["weight"].requires_grad_()
        adam = torch.optim.Adam([phi], lr=config.outer_lr, eps=eps)
        for _ in range(3):
            phi.grad = meta_gradient(phi.detach())
            adam.step()
        return phi.detach()

    theirs = outer_steps(their_meta_gradient, eps=1e-3)
    algorithm = gbml.IMAML(
        lr,
        lam,
        inner_steps=steps,
        cg_steps=20,
        cg_tol=1e-13,
        damping=config.damping,
        inner_loop=config.inner_loop,
    )

    def our_meta_gradient(phi):
        return algorithm.task_delta(loss, {"weight": phi}, task)[0]["weight"]

    assert relative_error(outer_steps(our_meta_gradient, eps=config.outer_eps), theirs) < 1e-10
    # ε matters at this scale: with PyTorch's default, the same solves take other steps.
    assert relative_error(outer_steps(our_meta_gradient, eps=1e-8), theirs) > 1e-6


def test_imaml_refuses_an_unknown_inner_loop():
    with pytest.raises(ValueError, match="inner_loop must be 'proximal' or 'pull_back'"):
        gbml.IMAML(0.1, 2.0, inner_loop="pullback")


def random_spd(generator, n, condition):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(float(condition))), n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


def test_cg_solves_an_spd_system_to_tolerance(generator):
    a = random_spd(generator, 60, condition=1e3)
    b = torch.randn(60, generator=generator, dtype=torch.float64)
    result = gbml.conjugate_gradient(lambda v: a @ v, b, max_iter=300, tol=1e-10)
    true_residual = torch.linalg.vector_norm(b - a @ result.solution) / torch.linalg.vector_norm(b)
    assert float(true_residual) <= 1e-10
    assert float(result.relative_residual) == pytest.approx(float(true_residual), rel=1e-6)
    assert relative_error(result.solution, torch.linalg.solve(a, b)) < 1e-7
    assert 0 < int(result.iterations) < 300  # stopped updating once converged


def test_cg_error_in_the_energy_norm_never_grows(generator):
    """A theorem of CG: ‖x_k − x*‖_A is non-increasing in k. (In floating point, convergence takes
    somewhat more than n = 30 steps; we measured 2.5e-5 relative after 30 and 1e-12 after 40.)"""
    a = random_spd(generator, 30, condition=1e2)
    b = torch.randn(30, generator=generator, dtype=torch.float64)
    x_star = torch.linalg.solve(a, b)
    errors = []
    for k in range(1, 41):
        e = gbml.conjugate_gradient(lambda v: a @ v, b, max_iter=k, tol=0).solution - x_star
        errors.append(float(e @ a @ e) ** 0.5)
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in pairwise(errors))
    assert errors[-1] < 1e-6 * errors[0]


def test_cg_under_vmap_equals_separate_solves(generator):
    matrices = torch.stack([random_spd(generator, 10, condition=c) for c in (1.0, 10.0, 1e3)])
    rhs = torch.randn(3, 10, generator=generator, dtype=torch.float64)

    def solve(a, b):
        return gbml.conjugate_gradient(lambda v: a @ v, b, max_iter=15, tol=1e-9)

    batched = torch.func.vmap(solve)(matrices, rhs)
    for i in range(3):
        single = solve(matrices[i], rhs[i])
        assert relative_error(batched.solution[i], single.solution) < 1e-10
        # the stopping test compares a residual with the tolerance; batched and single matrix
        # products round differently, which may move that comparison by one iteration
        assert abs(int(batched.iterations[i]) - int(single.iterations)) <= 1
    # the identity converges in one step; masked iterations must leave it there
    assert int(batched.iterations[0]) == 1


def test_cg_with_zero_right_hand_side():
    result = gbml.conjugate_gradient(lambda v: 2 * v, torch.zeros(4, dtype=torch.float64), max_iter=3)
    assert float(result.solution.abs().max()) == 0.0
    assert float(result.relative_residual) == 0.0


def test_cg_reports_an_indefinite_system():
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    result = gbml.conjugate_gradient(lambda v: a @ v, b, max_iter=10, tol=1e-10)
    assert float(result.relative_residual) > 1e-3  # did not pretend to converge


def symmetric_with_eigenvalues(generator, eigenvalues):
    """Q diag(eigenvalues) Qᵀ with a random orthogonal Q, in float64."""
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("kind", ["positive definite", "indefinite"])
def test_extreme_eigenvalues_match_eigvalsh(kind, generator):
    from gbml.cg import extreme_eigenvalues

    n = 40
    b = torch.randn(n, n, generator=generator, dtype=torch.float64)
    if kind == "positive definite":
        a = b @ b.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    else:
        a = (b + b.T) / 2  # a symmetric Gaussian matrix: eigenvalues of both signs
    expected = torch.linalg.eigvalsh(a)
    assert (expected[0] > 0) == (kind == "positive definite")
    scale = float(expected.abs().max())
    # the whole Krylov space (k = n, or more, clamped to n): the extreme eigenvalues exactly
    for k in (n, n + 5):
        low, high = extreme_eigenvalues(lambda v: a @ v, n, k, generator)
        assert abs(low - float(expected[0])) < 1e-10 * scale, (low, expected[0])
        assert abs(high - float(expected[-1])) < 1e-10 * scale, (high, expected[-1])
    # fewer steps: estimates from inside the spectrum, never beyond it
    low, high = extreme_eigenvalues(lambda v: a @ v, n, 8, generator)
    assert float(expected[0]) - 1e-12 * scale <= low < high <= float(expected[-1]) + 1e-12 * scale
    not_yet_exact = low > float(expected[0]) + 1e-6 * scale or high < float(expected[-1]) - 1e-6 * scale
    assert not_yet_exact  # 8 steps of a 40-dimensional space: the test above is not trivial


def test_extreme_eigenvalues_find_isolated_extremes_in_few_steps(generator):
    """A negative outlier and a positive one around a bulk, like a network's Hessian: 20 products
    of a 300 × 300 operator pin both down."""
    from gbml.cg import extreme_eigenvalues

    bulk = torch.linspace(0.0, 1.0, 298, dtype=torch.float64)
    outliers = torch.tensor([-5.0, 10.0], dtype=torch.float64)
    a = symmetric_with_eigenvalues(generator, torch.cat([outliers, bulk]))
    low, high = extreme_eigenvalues(lambda v: a @ v, 300, 20, generator)
    assert low == pytest.approx(-5.0, rel=1e-8)
    assert high == pytest.approx(10.0, rel=1e-8)


def test_extreme_eigenvalues_stop_when_the_krylov_space_is_invariant(generator):
    """Three distinct eigenvalues: the Krylov space has dimension 3, and asking for more steps
    must neither divide by a vanishing vector nor invent eigenvalues."""
    from gbml.cg import extreme_eigenvalues

    a = symmetric_with_eigenvalues(generator, [-2.0] * 10 + [0.0] * 20 + [3.0] * 10)
    low, high = extreme_eigenvalues(lambda v: a @ v, 40, 25, generator)
    assert low == pytest.approx(-2.0, rel=1e-12)
    assert high == pytest.approx(3.0, rel=1e-12)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        extreme_eigenvalues(lambda v: a @ v, 40, 0, generator)


def quartic_with_coupling(params):
    """f(w) = Σ w⁴ + w₀w₁w₂, whose gradient and Hessian are written out below."""
    w = params["w"]
    return (w**4).sum() + w[0] * w[1] * w[2]


def quartic_gradient_and_hessian(w):
    gradient = 4 * w**3 + torch.stack([w[1] * w[2], w[0] * w[2], w[0] * w[1]])
    hessian = torch.diag(12 * w**2)
    hessian[0, 1] = hessian[1, 0] = w[2]
    hessian[0, 2] = hessian[2, 0] = w[1]
    hessian[1, 2] = hessian[2, 1] = w[0]
    return gradient, hessian


def test_hessian_vector_product_matches_the_hessian(generator):
    w = torch.randn(3, generator=generator, dtype=torch.float64)
    v = torch.randn(3, generator=generator, dtype=torch.float64)
    _, hessian = quartic_gradient_and_hessian(w)
    hv = gbml.hessian_vector_product(quartic_with_coupling, {"w": w}, {"w": v})["w"]
    assert relative_error(hv, hessian @ v) < 1e-14


def test_one_linearisation_gives_the_gradient_and_repeated_hessian_products(generator):
    from gbml.cg import gradient_and_hessian_product

    w = torch.randn(3, generator=generator, dtype=torch.float64)
    gradient, hessian = quartic_gradient_and_hessian(w)
    got_gradient, hessian_times = gradient_and_hessian_product(quartic_with_coupling, {"w": w})
    assert relative_error(got_gradient["w"], gradient) < 1e-14
    for _ in range(3):  # conjugate gradient calls it again and again at the same point
        v = torch.randn(3, generator=generator, dtype=torch.float64)
        assert relative_error(hessian_times({"w": v})["w"], hessian @ v) < 1e-14


def test_unconverged_cg_raises_or_warns(generator):
    model, task = ridge_setup(generator, dim=12, shots=14)
    loss = gbml.make_loss(model)
    tasks = gbml.stack_tasks([task, task])
    strict = gbml.IMAML(inner_lr=0.05, lam=0.2, inner_steps=20, cg_steps=1, cg_tol=1e-10)
    with pytest.raises(gbml.ConvergenceError, match="conjugate gradient missed its tolerance") as raised:
        gbml.meta_gradient(strict, loss, clone_params(model), tasks, batched=False)
    assert "on_cg_failure='warn'" in str(raised.value)  # the way to accept truncated solves
    lenient = gbml.IMAML(
        inner_lr=0.05, lam=0.2, inner_steps=20, cg_steps=1, cg_tol=1e-10, on_cg_failure="warn"
    )
    with pytest.warns(RuntimeWarning, match="conjugate gradient missed its tolerance") as warned:
        gbml.meta_gradient(lenient, loss, clone_params(model), tasks, batched=False)
    assert not any("on_cg_failure" in str(w.message) for w in warned)  # already passed: no advice


def test_flatten_orders_parameters_consistently(generator):
    model, _ = ridge_setup(generator)
    params = clone_params(model)
    assert flatten(params).shape == (5,)
