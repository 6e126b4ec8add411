"""Bad input gets a clear ValueError, not a silently wrong answer."""

import math
import warnings

import pytest
import torch

import gbml
from gbml.params import unflatten
from reference import clone_params


@pytest.mark.parametrize("lr", [0, -0.1, math.nan, "0.1"])
@pytest.mark.parametrize("cls", [gbml.MAML, gbml.FOMAML, gbml.Reptile])
def test_non_positive_inner_learning_rate(cls, lr):
    with pytest.raises(ValueError, match="inner_lr must be a positive number"):
        cls(inner_lr=lr)


@pytest.mark.parametrize("steps", [-1, 1.5, True])
@pytest.mark.parametrize("cls", [gbml.MAML, gbml.FOMAML, gbml.Reptile])
def test_invalid_inner_steps(cls, steps):
    with pytest.raises(ValueError, match="inner_steps must be a non-negative integer"):
        cls(inner_lr=0.1, inner_steps=steps)


@pytest.mark.parametrize("lam", [0, -1.0, math.nan])
def test_non_positive_lambda(lam):
    with pytest.raises(ValueError, match="lam must be a positive number"):
        gbml.IMAML(inner_lr=0.1, lam=lam)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inner_lr": -1.0}, "inner_lr"),
        ({"cg_steps": -2}, "cg_steps"),
        ({"inner_steps": -1}, "inner_steps"),
        ({"cg_tol": -1e-3}, "cg_tol"),
        ({"damping": -0.5}, "damping"),
        ({"on_cg_failure": "ignore"}, "on_cg_failure"),
    ],
)
def test_invalid_imaml_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gbml.IMAML(**{"inner_lr": 0.1, "lam": 1.0, **kwargs})


def test_functions_check_their_own_arguments(mlp_setup):
    model, criterion = mlp_setup
    loss, phi = gbml.make_loss(model, criterion), clone_params(model)
    x = torch.zeros(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="inner learning rate"):
        gbml.task_adapt(loss, phi, x, x, lr=0.0, steps=1)
    with pytest.raises(ValueError, match="number of inner steps"):
        gbml.task_adapt(loss, phi, x, x, lr=0.1, steps=-1)
    with pytest.raises(ValueError, match="lambda"):
        gbml.proximal_task_adapt(loss, phi, x, x, lam=0.0, lr=0.1, steps=1)
    with pytest.raises(ValueError, match="max_iter"):
        gbml.conjugate_gradient(lambda v: v, torch.ones(2), max_iter=-1)
    with pytest.raises(ValueError, match="vector"):
        gbml.conjugate_gradient(lambda v: v, torch.ones(2, 2), max_iter=1)


def sinusoid_batch(num_tasks=3, shots=5, queries=6):
    return gbml.SinusoidTasks().sample(
        num_tasks, shots, queries, torch.Generator().manual_seed(0), dtype=torch.float64
    )


def _replace(task, **fields):
    return task._replace(**fields)


@pytest.mark.parametrize(
    ("make_tasks", "message"),
    [
        (
            lambda t: _replace(t, y_support=t.y_support[:, :4]),
            "support set: x_support has 5 samples but y_support has 4",
        ),
        (
            lambda t: _replace(t, y_query=t.y_query[:, :2]),
            "query set: x_query has 6 samples but y_query has 2",
        ),
        (
            lambda t: _replace(t, x_query=t.x_query.expand(3, 6, 2)),
            "support and query disagree on the shape of one x",
        ),
        (
            lambda t: _replace(t, y_query=t.y_query[..., 0]),
            "support and query disagree on the shape of one y",
        ),
        (lambda t: _replace(t, x_query=t.x_query[:2]), "disagree on the number of tasks"),
        (
            lambda t: _replace(t, x_support=t.x_support[:, :0], y_support=t.y_support[:, :0]),
            "support set is empty",
        ),
        (
            lambda t: _replace(t, x_query=t.x_query.float()),
            "x_support is torch.float64 but x_query is torch.float32",
        ),
        (lambda t: t.task(0)._replace(x_support=torch.zeros(5)), "expected \\(tasks, samples, ...\\)"),
        (lambda t: (t.x_support, t.y_support), "expected a gbml.Task"),
    ],
)
def test_tasks_that_do_not_fit_together(make_tasks, message, mlp_setup):
    model, criterion = mlp_setup
    tasks = make_tasks(sinusoid_batch())
    with pytest.raises(ValueError, match=message):
        gbml.meta_gradient(gbml.MAML(0.01), gbml.make_loss(model, criterion), clone_params(model), tasks)


def test_models_reject_inputs_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"ConvNet expects images of shape \(N, 1, 28, 28\)"):
        gbml.ConvNet(ways=5)(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"SinusoidMLP expects inputs of shape \(N, 1\)"):
        gbml.SinusoidMLP()(torch.zeros(4))
    with pytest.raises(ValueError, match="ways must be a positive integer"):
        gbml.ConvNet(ways=0)
    with pytest.raises(ValueError, match="poolings leave nothing"):
        gbml.ConvNet(ways=5, blocks=6)


def test_samplers_reject_bad_sizes():
    with pytest.raises(ValueError, match="shots must be a positive integer"):
        gbml.SinusoidTasks().sample(2, 0, 5)
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        gbml.LinearRegressionTasks().sample(0, 5, 5)
    with pytest.raises(ValueError, match="amplitude_range"):
        gbml.SinusoidTasks(amplitude_range=(5.0, 0.1))
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        gbml.LinearRegressionTasks(dim=0)


def test_other_bad_input(mlp_setup):
    model, criterion = mlp_setup
    loss = gbml.make_loss(model, criterion)
    with pytest.raises(ValueError, match="batched must be True, False or 'auto'"):
        gbml.meta_gradient(gbml.MAML(0.01), loss, clone_params(model), sinusoid_batch(), batched="yes")
    with pytest.raises(ValueError, match="phi holds no parameters"):
        gbml.meta_gradient(gbml.MAML(0.01), loss, {}, sinusoid_batch())
    with pytest.raises(ValueError, match="cannot stack an empty list"):
        gbml.stack_tasks([])
    with pytest.raises(ValueError, match="vector has 3 entries but the parameters hold 2"):
        unflatten(torch.zeros(3), {"w": torch.zeros(2)})


@pytest.mark.parametrize(
    "algorithm",
    [
        gbml.MAML(inner_lr=0.1, inner_steps=2),
        gbml.FOMAML(inner_lr=0.1, inner_steps=2),
        gbml.Reptile(inner_lr=0.1, inner_steps=2),
        gbml.IMAML(inner_lr=0.1, lam=1.0, inner_steps=2, cg_steps=3, on_cg_failure="warn"),
    ],
    ids=lambda a: type(a).__name__,
)
@pytest.mark.parametrize("batched", [True, False])
def test_an_algorithm_checks_its_arguments_once_not_per_task(algorithm, batched, mlp_setup, monkeypatch):
    """The checks run when the algorithm is built; meta_gradient (loop or vmap trace) repeats none."""
    model, criterion = mlp_setup
    tasks = gbml.SinusoidTasks().sample(4, 5, 5, torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = []
    for name in ("check_learning_rate", "check_steps"):
        monkeypatch.setattr(f"gbml.adapt.{name}", lambda *args, name=name: calls.append(name))
    with warnings.catch_warnings():  # iMAML's truncated CG solves may warn: not the point here
        warnings.simplefilter("ignore")
        gbml.meta_gradient(
            algorithm, gbml.make_loss(model, criterion), clone_params(model), tasks, batched=batched
        )
        algorithm.adapt(gbml.make_loss(model, criterion), clone_params(model), *tasks.task(0).support)
    assert calls == []
    gbml.task_adapt(
        gbml.make_loss(model, criterion), clone_params(model), *tasks.task(0).support, lr=0.1, steps=1
    )
    assert calls == ["check_learning_rate", "check_steps"]  # the public function still checks


@pytest.mark.parametrize("value", [0, -3, 2.0, True, None, "5"])
def test_counts_must_be_positive_integers(value):
    from gbml.errors import check_positive_integer

    with pytest.raises(ValueError, match="shots must be a positive integer"):
        check_positive_integer("shots", value)
    with pytest.raises(ValueError, match="shots must be a positive integer"):
        gbml.SinusoidTasks().sample(2, value, 3)


def test_a_positive_integer_passes():
    from gbml.errors import check_positive_integer

    check_positive_integer("shots", 1)
