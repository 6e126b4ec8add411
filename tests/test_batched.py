"""The vmap path against the per-task loop, with the conv net's batch norm in the model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gbml
from conftest import make_classification_task
from reference import clone_params, relative_error

ALGORITHMS = {
    "maml": gbml.MAML(inner_lr=0.1, inner_steps=2),
    "fomaml": gbml.FOMAML(inner_lr=0.1, inner_steps=2),
    "reptile": gbml.Reptile(inner_lr=0.1, inner_steps=2),
    # λ large enough that I + H/λ is positive definite at this random initialisation
    "imaml": gbml.IMAML(inner_lr=0.01, lam=200.0, inner_steps=3, cg_steps=25, cg_tol=1e-8),
}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_vmap_equals_loop_on_the_conv_net(name, generator, conv_setup):
    model, criterion = conv_setup
    loss = gbml.make_loss(model, criterion)
    tasks = make_classification_task(generator, num_tasks=4)
    phi = clone_params(model)
    batched, batched_info = gbml.meta_gradient(ALGORITHMS[name], loss, phi, tasks, batched=True)
    looped, looped_info = gbml.meta_gradient(ALGORITHMS[name], loss, phi, tasks, batched=False)
    assert relative_error(batched, looped) < 1e-10
    for key in looped_info:
        assert torch.allclose(
            batched_info[key].double(), looped_info[key].double(), rtol=1e-10, atol=1e-12
        ), key
    # The loop itself is the mean of the single-task contributions.
    singles = [ALGORITHMS[name].task_delta(loss, phi, tasks.task(t))[0] for t in range(4)]
    mean = {k: sum(s[k] for s in singles) / 4 for k in phi}
    assert relative_error(looped, mean) < 1e-14


@pytest.mark.parametrize("name", ALGORITHMS)
def test_vmap_equals_loop_on_the_sinusoid_mlp(name, generator, mlp_setup):
    model, criterion = mlp_setup
    loss = gbml.make_loss(model, criterion)
    tasks = gbml.SinusoidTasks().sample(5, 10, 10, generator, dtype=torch.float64)
    phi = clone_params(model)
    algorithm = ALGORITHMS[name]
    if name == "imaml":
        algorithm = gbml.IMAML(inner_lr=0.01, lam=100.0, inner_steps=5, cg_steps=30, cg_tol=1e-12)
    batched, _ = gbml.meta_gradient(algorithm, loss, phi, tasks, batched=True)
    looped, _ = gbml.meta_gradient(algorithm, loss, phi, tasks, batched=False)
    assert relative_error(batched, looped) < 1e-10


def native_batch_norm_net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    ).double()


def test_native_batch_norm_is_refused_on_the_vmap_path(generator):
    model = native_batch_norm_net()
    loss = gbml.make_loss(model, F.cross_entropy)
    tasks = make_classification_task(generator, image_size=8, num_tasks=2)
    with pytest.raises(ValueError, match="CompositeBatchNorm2d"):
        gbml.meta_gradient(gbml.MAML(0.1), loss, clone_params(model), tasks, batched=True)
    assert gbml.choose_batched(loss, clone_params(model), "auto") is False


def test_running_statistics_get_gbmls_error_and_the_advice_works(generator):
    """A default torch.nn batch norm updates running statistics in place, which torch.func
    refuses on the loop path too: gbml says so and names the two ways out, which both work."""
    tracking = native_batch_norm_net()
    tracking[1] = nn.BatchNorm2d(4).double()  # track_running_stats=True, the default
    tasks = make_classification_task(generator, image_size=8, num_tasks=2)
    for batched in (True, False, "auto"):
        with pytest.raises(ValueError, match="track_running_stats=False and pass batched=False"):
            gbml.meta_gradient(
                gbml.MAML(0.1),
                gbml.make_loss(tracking, F.cross_entropy),
                clone_params(tracking),
                tasks,
                batched=batched,
            )
    untracked = native_batch_norm_net()  # the advice: track_running_stats=False, batched=False
    result, _ = gbml.meta_gradient(
        gbml.MAML(0.1),
        gbml.make_loss(untracked, F.cross_entropy),
        clone_params(untracked),
        tasks,
        batched=False,
    )
    assert all(torch.isfinite(g).all() for g in result.values())


def test_composite_batch_norm_matches_torch_in_the_forward_pass(generator):
    bn = gbml.CompositeBatchNorm2d(6).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(6, generator=generator, dtype=torch.float64))
        bn.bias.copy_(torch.randn(6, generator=generator, dtype=torch.float64))
    x = 3 + 2 * torch.randn(5, 6, 7, 7, generator=generator, dtype=torch.float64)
    expected = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    assert relative_error(bn(x), expected) < 1e-14


def test_auto_choice_on_cpu(mlp_setup, conv_setup):
    mlp, criterion = mlp_setup
    assert gbml.choose_batched(gbml.make_loss(mlp, criterion), clone_params(mlp)) is True
    conv, criterion = conv_setup
    assert gbml.choose_batched(gbml.make_loss(conv, criterion), clone_params(conv)) is False

    def plain_function(params, x, y):
        return ((x @ params["w"] - y) ** 2).mean()

    assert gbml.choose_batched(plain_function, {"w": torch.zeros(3, 1)}) is False
