"""The outer update: any torch optimizer, φ ← φ − η·mean Δ, and divergence caught."""

import pytest
import torch
import torch.nn.functional as F

import gbml
from conftest import make_classification_task
from reference import adapted_params, clone_params, loss_gradient, relative_error


def test_sgd_meta_step_applies_the_mean_first_order_gradient(generator, mlp_setup):
    model, criterion = mlp_setup
    tasks = gbml.SinusoidTasks().sample(4, 5, 5, generator, dtype=torch.float64)
    before = clone_params(model)
    params = gbml.parameters_of(model)
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    gbml.meta_step(
        gbml.FOMAML(inner_lr=0.01, inner_steps=2), gbml.make_loss(model, criterion), params, tasks, optimizer
    )

    grads = []
    for t in range(4):
        task = tasks.task(t)
        theta = adapted_params(model, criterion, before, *task.support, 0.01, 2)
        grads.append(loss_gradient(model, criterion, theta, *task.query))
    expected = {k: before[k] - 0.1 * sum(g[k] for g in grads) / 4 for k in before}
    assert relative_error(clone_params(model), expected) < 1e-13


def test_reptile_meta_step_moves_towards_the_adapted_parameters(generator, mlp_setup):
    model, criterion = mlp_setup
    tasks = gbml.SinusoidTasks().sample(3, 5, 5, generator, dtype=torch.float64)
    before = clone_params(model)
    params = gbml.parameters_of(model)
    epsilon = 0.25
    gbml.meta_step(
        gbml.Reptile(inner_lr=0.01, inner_steps=3),
        gbml.make_loss(model, criterion),
        params,
        tasks,
        torch.optim.SGD(params.values(), lr=epsilon),
    )
    adapted = []
    for t in range(3):
        x_all, y_all = tasks.task(t).joined()
        adapted.append(adapted_params(model, criterion, before, x_all, y_all, 0.01, 3))
    expected = {k: before[k] + epsilon * sum(a[k] - before[k] for a in adapted) / 3 for k in before}
    assert relative_error(clone_params(model), expected) < 1e-12


def test_adam_outer_optimizer_reduces_the_query_loss(generator):
    torch.manual_seed(0)
    model = gbml.SinusoidMLP()
    loss = gbml.make_loss(model)
    params = gbml.parameters_of(model)
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    algorithm = gbml.MAML(inner_lr=0.01, inner_steps=1)
    evaluation = gbml.SinusoidTasks().sample(50, 10, 10, torch.Generator().manual_seed(99))
    start = gbml.meta_gradient(algorithm, loss, params, evaluation)[1]["query_loss"].mean()
    sampler = gbml.SinusoidTasks()
    for _ in range(200):
        result = gbml.meta_step(algorithm, loss, params, sampler.sample(10, 10, 10, generator), optimizer)
    end = gbml.meta_gradient(algorithm, loss, params, evaluation)[1]["query_loss"].mean()
    assert result.query_loss > 0
    assert float(end) < 0.6 * float(start)  # measured: 4.65 -> 1.89


def test_a_nan_loss_raises_and_leaves_the_parameters_alone(generator, mlp_setup):
    model, criterion = mlp_setup
    tasks = gbml.SinusoidTasks().sample(3, 5, 5, generator, dtype=torch.float64)
    tasks.y_query[1, 2] = float("nan")
    before = clone_params(model)
    params = gbml.parameters_of(model)
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    for algorithm in (gbml.MAML(0.01), gbml.FOMAML(0.01), gbml.Reptile(0.01), gbml.IMAML(0.01, lam=1.0)):
        with pytest.raises(gbml.DivergenceError, match="NaN or infinite"):
            gbml.meta_step(algorithm, gbml.make_loss(model, criterion), params, tasks, optimizer)
    assert relative_error(clone_params(model), before) == 0.0


def test_an_exploding_inner_loop_raises(generator, conv_setup):
    model, criterion = conv_setup
    tasks = make_classification_task(generator, num_tasks=2)
    params = gbml.parameters_of(model)
    with pytest.raises(gbml.DivergenceError):
        gbml.meta_step(
            gbml.FOMAML(inner_lr=1e200, inner_steps=3),
            gbml.make_loss(model, criterion),
            params,
            tasks,
            torch.optim.SGD(params.values(), lr=0.1),
        )


def test_meta_training_is_reproducible(mlp_setup):
    def run():
        torch.manual_seed(3)
        model = gbml.SinusoidMLP()
        params = gbml.parameters_of(model)
        optimizer = torch.optim.Adam(params.values(), lr=1e-3)
        generator = torch.Generator().manual_seed(5)
        for _ in range(5):
            tasks = gbml.SinusoidTasks().sample(4, 5, 5, generator)
            gbml.meta_step(gbml.MAML(0.01, 2), gbml.make_loss(model), params, tasks, optimizer)
        return clone_params(model)

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cross_entropy_conv_net_meta_step_runs_in_float32(generator):
    torch.manual_seed(0)
    model = gbml.ConvNet(ways=3, hidden=8)
    tasks = make_classification_task(generator, num_tasks=2).to(torch.float32)
    tasks = gbml.Task(tasks.x_support, tasks.y_support.long(), tasks.x_query, tasks.y_query.long())
    params = gbml.parameters_of(model)
    result = gbml.meta_step(
        gbml.MAML(0.1),
        gbml.make_loss(model, F.cross_entropy),
        params,
        tasks,
        torch.optim.Adam(params.values()),
    )
    assert result.meta_gradient["head.weight"].dtype == torch.float32
    assert result.info["query_loss"].shape == (2,)
