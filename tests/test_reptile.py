"""Reptile's Δ = φ − θ_t against plain gradients and the closed form on a quadratic."""

import pytest
import torch
from torch import nn

import gbml
from reference import clone_params, linear_regression_quantities, loss_gradient, relative_error


def test_one_step_on_the_whole_data_is_a_scaled_gradient(generator, mlp_setup):
    model, criterion = mlp_setup
    task = gbml.SinusoidTasks().sample(1, 5, 10, generator, dtype=torch.float64).task(0)
    phi = clone_params(model)
    delta, _ = gbml.Reptile(inner_lr=0.02, inner_steps=1).task_delta(
        gbml.make_loss(model, criterion), phi, task
    )
    x_all = torch.cat([task.x_support, task.x_query])
    y_all = torch.cat([task.y_support, task.y_query])
    expected = {k: 0.02 * g for k, g in loss_gradient(model, criterion, phi, x_all, y_all).items()}
    assert relative_error(delta, expected) < 1e-12


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_matches_closed_form_on_a_quadratic(steps, generator):
    """On ℓ(w) = mean((Xw − y)²) over all the task's data, gradient descent contracts towards the
    least-squares solution w*: w_L − w* = (I − αH)^L (φ − w*), so Δ = φ − w_L = (I − (I − αH)^L)(φ − w*)."""
    dim = 4
    model = nn.Linear(dim, 1, bias=False).double()
    task = gbml.LinearRegressionTasks(dim=dim).sample(1, 6, 8, generator, dtype=torch.float64).task(0)
    phi = clone_params(model)
    delta, _ = gbml.Reptile(inner_lr=0.1, inner_steps=steps).task_delta(gbml.make_loss(model), phi, task)

    x_all = torch.cat([task.x_support, task.x_query])
    y_all = torch.cat([task.y_support, task.y_query])
    hessian, b = linear_regression_quantities(x_all, y_all)
    w_star = torch.linalg.solve(hessian, b)
    contraction = torch.linalg.matrix_power(torch.eye(dim, dtype=torch.float64) - 0.1 * hessian, steps)
    expected = (torch.eye(dim, dtype=torch.float64) - contraction) @ (phi["weight"].T - w_star)
    assert relative_error(delta["weight"], expected.T) < 1e-12


def test_zero_steps_give_zero_update(generator, mlp_setup):
    model, criterion = mlp_setup
    task = gbml.SinusoidTasks().sample(1, 5, 5, generator, dtype=torch.float64).task(0)
    delta, _ = gbml.Reptile(inner_lr=0.1, inner_steps=0).task_delta(
        gbml.make_loss(model, criterion), clone_params(model), task
    )
    assert all(float(d.abs().max()) == 0.0 for d in delta.values())
