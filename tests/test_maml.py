"""MAML's and FO-MAML's meta-gradients against finite differences and closed forms."""

import pytest
import torch
from torch import nn

import gbml
from conftest import make_classification_task
from reference import (
    adapted_params,
    central_difference,
    clone_params,
    linear_regression_quantities,
    loss_gradient,
    query_loss_after_adaptation,
    relative_error,
)

SINUSOIDS = gbml.SinusoidTasks()


def sinusoid_task(generator, shots=5, queries=7):
    return SINUSOIDS.sample(1, shots, queries, generator, dtype=torch.float64).task(0)


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("network", ["mlp", "conv"])
def test_maml_meta_gradient_matches_finite_differences(network, steps, generator, mlp_setup, conv_setup):
    model, criterion = mlp_setup if network == "mlp" else conv_setup
    task = sinusoid_task(generator) if network == "mlp" else make_classification_task(generator)
    lr = 0.01 if network == "mlp" else 0.1
    phi = clone_params(model)
    delta, info = gbml.MAML(inner_lr=lr, inner_steps=steps).task_delta(
        gbml.make_loss(model, criterion), phi, task
    )

    def f(params):
        return query_loss_after_adaptation(model, criterion, params, task, lr, steps)

    assert float(info["query_loss"]) == pytest.approx(f(phi), rel=1e-12)
    # ReLU and max pooling make f piecewise smooth, and with ~10⁵ units in the conv net a step of
    # 1e-5 along a random direction often crosses a kink (we saw finite differences swing by
    # orders of magnitude there). At 1e-7 rounding costs ~1e-9 relative and crossings are rare.
    eps = 1e-7
    # Directional derivatives along random directions cover every parameter at once ...
    for _ in range(3):
        v = {k: torch.randn(p.shape, generator=generator, dtype=p.dtype) for k, p in phi.items()}
        analytic = sum(float((delta[k] * v[k]).sum()) for k in phi)
        assert analytic == pytest.approx(central_difference(f, phi, v, eps), rel=1e-6, abs=1e-9)
    # ... and single coordinates of every tensor catch an error confined to one of them
    # (the conv biases before batch norm have true gradient exactly 0).
    for name, p in phi.items():
        index = int(torch.randint(p.numel(), (1,), generator=generator))
        e = {k: torch.zeros_like(q) for k, q in phi.items()}
        e[name].view(-1)[index] = 1.0
        numeric = central_difference(f, phi, e, eps)
        assert float(delta[name].reshape(-1)[index]) == pytest.approx(numeric, rel=1e-5, abs=1e-8), name


def test_maml_on_the_full_width_conv_net(generator):
    """The MAML paper's conv net at full width (64 filters), one inner step."""
    torch.manual_seed(1)
    model = gbml.ConvNet(ways=5, hidden=64).double()
    criterion = nn.functional.cross_entropy
    task = make_classification_task(generator, ways=5, shots=1, queries=2)
    phi = clone_params(model)
    delta, _ = gbml.MAML(inner_lr=0.4, inner_steps=1).task_delta(gbml.make_loss(model, criterion), phi, task)
    v = {k: torch.randn(p.shape, generator=generator, dtype=p.dtype) for k, p in phi.items()}
    analytic = sum(float((delta[k] * v[k]).sum()) for k in phi)

    def f(params):
        return query_loss_after_adaptation(model, criterion, params, task, 0.4, 1)

    assert analytic == pytest.approx(central_difference(f, phi, v, 1e-7), rel=1e-6)


def linear_setup(generator, dim=4, shots=6, queries=9):
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, dim, generator=generator, dtype=torch.float64))
    tasks = gbml.LinearRegressionTasks(dim=dim, noise_std=0.3)
    task = tasks.sample(1, shots, queries, generator, dtype=torch.float64).task(0)
    return model, task


def closed_form_linear_maml(phi, task, lr, steps, first_order=False):
    """MAML on linear regression with squared loss, in closed form.

    With ℓ_train(w) = mean((X w − y)²), the gradient is affine: ∇ℓ_train(w) = H w − b with
    H = 2XᵀX/n and b = 2Xᵀy/n. One inner step is w_{k+1} = w_k − α(H w_k − b), whose Jacobian
    dw_{k+1}/dw_k = I − αH is the same at every step because the Hessian is constant. By the chain
    rule through the L steps,

        dθ_L/dφ = (I − αH)^L,
        Δ_MAML  = (dθ_L/dφ)ᵀ ∇ℓ_val(θ_L) = (I − αH)^L (H_val θ_L − b_val)   (I − αH is symmetric),

    and FO-MAML replaces the Jacobian by the identity: Δ_FO = H_val θ_L − b_val.
    """
    h_train, b_train = linear_regression_quantities(*task.support)
    h_val, b_val = linear_regression_quantities(*task.query)
    w = phi["weight"].T  # column vector (d, 1)
    for _ in range(steps):
        w = w - lr * (h_train @ w - b_train)
    query_gradient = h_val @ w - b_val
    if first_order:
        return query_gradient.T
    jacobian = torch.linalg.matrix_power(torch.eye(len(h_train), dtype=w.dtype) - lr * h_train, steps)
    return (jacobian @ query_gradient).T


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
@pytest.mark.parametrize("lr", [0.05, 0.2])
def test_maml_matches_closed_form_on_linear_regression(steps, lr, generator):
    model, task = linear_setup(generator)
    phi = clone_params(model)
    loss = gbml.make_loss(model)
    maml, _ = gbml.MAML(inner_lr=lr, inner_steps=steps).task_delta(loss, phi, task)
    expected = closed_form_linear_maml(phi, task, lr, steps)
    assert relative_error(maml["weight"], expected) < 1e-12


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_fomaml_matches_closed_form_and_differs_from_maml(steps, generator):
    model, task = linear_setup(generator)
    phi = clone_params(model)
    loss = gbml.make_loss(model)
    fo, _ = gbml.FOMAML(inner_lr=0.1, inner_steps=steps).task_delta(loss, phi, task)
    maml, _ = gbml.MAML(inner_lr=0.1, inner_steps=steps).task_delta(loss, phi, task)
    assert (
        relative_error(fo["weight"], closed_form_linear_maml(phi, task, 0.1, steps, first_order=True)) < 1e-12
    )
    # The curvature H is non-zero, so dropping (I − αH)^L must change the answer.
    assert relative_error(fo["weight"], maml["weight"]) > 1e-2


@pytest.mark.parametrize("steps", [1, 3])
def test_fomaml_is_the_query_gradient_at_the_adapted_parameters(steps, generator, conv_setup):
    model, criterion = conv_setup
    task = make_classification_task(generator)
    phi = clone_params(model)
    fo, _ = gbml.FOMAML(inner_lr=0.1, inner_steps=steps).task_delta(
        gbml.make_loss(model, criterion), phi, task
    )
    theta = adapted_params(model, criterion, phi, *task.support, 0.1, steps)
    assert relative_error(fo, loss_gradient(model, criterion, theta, *task.query)) < 1e-12


def test_fomaml_equals_maml_when_there_is_no_curvature(generator):
    """A network linear in its parameters with a loss linear in the output has zero Hessian."""
    model = nn.Linear(3, 1).double()

    def criterion(out, y):
        return (out * y).mean()

    task = gbml.Task(*(torch.randn(5, k, generator=generator, dtype=torch.float64) for k in (3, 1, 3, 1)))
    phi = clone_params(model)
    loss = gbml.make_loss(model, criterion)
    fo, _ = gbml.FOMAML(inner_lr=0.3, inner_steps=3).task_delta(loss, phi, task)
    maml, _ = gbml.MAML(inner_lr=0.3, inner_steps=3).task_delta(loss, phi, task)
    assert relative_error(fo, maml) < 1e-14


def _batch_norm_names(model):
    from gbml.models import is_batch_norm

    return frozenset(
        f"{m}.{n}"
        for m, module in model.named_modules()
        if is_batch_norm(module)
        for n, _ in module.named_parameters()
    )


@pytest.mark.parametrize("steps", [1, 3])
def test_frozen_parameters_stay_at_phi_and_maml_differentiates_through_the_rest(steps, generator, conv_setup):
    """Finn et al.'s fast weights: batch norm left out of the inner loop. MAML's Δ against central
    finite differences of f(φ) = ℓ(θ_L(φ); D_val) with the frozen parameters never stepped, and
    FO-MAML's against the query gradient at that θ_L (torch.autograd, no torch.func)."""
    model, criterion = conv_setup
    frozen = _batch_norm_names(model)
    assert len(frozen) >= 2 and frozen < set(dict(model.named_parameters()))
    task = make_classification_task(generator)
    loss, phi = gbml.make_loss(model, criterion), clone_params(model)
    maml = gbml.MAML(inner_lr=0.1, inner_steps=steps, frozen=frozen)
    delta, _ = maml.task_delta(loss, phi, task)

    def f(params):
        return query_loss_after_adaptation(model, criterion, params, task, 0.1, steps, frozen=frozen)

    for _ in range(3):
        v = {k: torch.randn(p.shape, generator=generator, dtype=p.dtype) for k, p in phi.items()}
        analytic = sum(float((delta[k] * v[k]).sum()) for k in phi)
        assert analytic == pytest.approx(central_difference(f, phi, v, 1e-7), rel=1e-6, abs=1e-9)
    # Not the all-fast-weights gradient: freezing changes Δ (a test that could fail).
    assert (
        relative_error(delta, gbml.MAML(inner_lr=0.1, inner_steps=steps).task_delta(loss, phi, task)[0])
        > 1e-3
    )

    theta = maml.adapt(loss, phi, *task.support)
    expected = adapted_params(
        model, criterion, phi, task.x_support, task.y_support, 0.1, steps, frozen=frozen
    )
    assert relative_error(theta, expected) < 1e-12
    assert all(torch.equal(theta[name], phi[name]) for name in frozen)
    fo_delta, _ = gbml.FOMAML(inner_lr=0.1, inner_steps=steps, frozen=frozen).task_delta(loss, phi, task)
    hand = loss_gradient(model, criterion, expected, task.x_query, task.y_query)
    assert relative_error(fo_delta, hand) < 1e-12


def test_frozen_parameters_vmap_equals_loop(generator, conv_setup):
    model, criterion = conv_setup
    loss, phi = gbml.make_loss(model, criterion), clone_params(model)
    tasks = make_classification_task(generator, num_tasks=3)
    for algorithm in (gbml.MAML, gbml.FOMAML):
        frozen_algorithm = algorithm(inner_lr=0.1, inner_steps=2, frozen=_batch_norm_names(model))
        batched, _ = gbml.meta_gradient(frozen_algorithm, loss, phi, tasks, batched=True)
        looped, _ = gbml.meta_gradient(frozen_algorithm, loss, phi, tasks, batched=False)
        assert relative_error(batched, looped) < 1e-10


def test_bad_frozen_names_are_refused(generator, conv_setup):
    model, criterion = conv_setup
    task = make_classification_task(generator)
    loss, phi = gbml.make_loss(model, criterion), clone_params(model)
    with pytest.raises(ValueError, match=r"phi does not have: \['bn\.beta'\]"):
        gbml.MAML(inner_lr=0.1, frozen={"bn.beta"}).task_delta(loss, phi, task)
    with pytest.raises(ValueError, match="frozen must be a collection of parameter names"):
        gbml.FOMAML(inner_lr=0.1, frozen="features.1.bias")
    with pytest.raises(ValueError, match="Reptile learns only what its inner loop adapts"):
        gbml.Reptile(inner_lr=0.1, frozen={"features.1.bias"})
