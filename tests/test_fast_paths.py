"""The speed-oriented pieces give the same numbers as the plain ones."""

import pytest
import torch
import torch.nn.functional as F
from benchmarks.graphs import GraphedMetaStep
from torch import nn

import gbml
from conftest import make_classification_task
from reference import clone_params, relative_error
from test_batched import ALGORITHMS


@pytest.mark.parametrize("stride", [1, 2])
def test_unfold_convolution_equals_the_native_one(stride, generator):
    native = nn.Conv2d(3, 5, 3, padding=1, stride=stride).double()
    unfold = gbml.UnfoldConv2d(3, 5, 3, padding=1, stride=stride).double()
    unfold.load_state_dict(native.state_dict())
    x = torch.randn(4, 3, 9, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    assert unfold(x).shape == native(x).shape
    assert relative_error(unfold(x), native(x)) < 1e-13
    (grad_unfold,) = torch.autograd.grad(unfold(x).square().sum(), x)
    (grad_native,) = torch.autograd.grad(native(x).square().sum(), x)
    assert relative_error(grad_unfold, grad_native) < 1e-13
    with pytest.raises(ValueError, match="dilation 1"):
        gbml.UnfoldConv2d(3, 5, 3, dilation=2)
    with pytest.raises(ValueError, match="conv must be 'native' or 'unfold'"):
        gbml.ConvNet(ways=5, conv="winograd")


@pytest.mark.parametrize("downsample", ["max_pool", "stride"])
@pytest.mark.parametrize("name", ["maml", "imaml"])
def test_unfold_conv_net_gives_the_same_meta_gradient(name, downsample, generator):
    torch.manual_seed(0)
    native = gbml.ConvNet(ways=3, hidden=8, downsample=downsample).double()
    unfold = gbml.ConvNet(ways=3, hidden=8, conv="unfold", downsample=downsample).double()
    unfold.load_state_dict(native.state_dict())
    tasks = make_classification_task(generator, num_tasks=3)
    phi = clone_params(native)
    looped, _ = gbml.meta_gradient(
        ALGORITHMS[name], gbml.make_loss(native, F.cross_entropy), phi, tasks, batched=False
    )
    batched, _ = gbml.meta_gradient(
        ALGORITHMS[name], gbml.make_loss(unfold, F.cross_entropy), phi, tasks, batched=True
    )
    assert relative_error(batched, looped) < 1e-10


def make_adam_setup(generator):
    torch.manual_seed(0)
    model = gbml.ConvNet(ways=3, hidden=8).double()
    params = gbml.parameters_of(model)
    return model, params, torch.optim.Adam(params.values(), lr=1e-2)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_graphed_step_equals_meta_step(name, generator):
    """The CUDA-graph step, run eagerly on the CPU: same updates as gbml.meta_step over three
    steps with Adam, and its warm-up leaves no trace."""
    batches = [make_classification_task(generator, num_tasks=2) for _ in range(3)]
    model_a, params_a, adam_a = make_adam_setup(generator)
    model_b, params_b, adam_b = make_adam_setup(generator)
    step = GraphedMetaStep(
        ALGORITHMS[name],
        gbml.make_loss(model_b, F.cross_entropy),
        params_b,
        adam_b,
        batches[0],
        capture=False,
    )
    assert relative_error(clone_params(model_b), clone_params(model_a)) == 0.0  # warm-up undone
    for tasks in batches:
        expected = gbml.meta_step(
            ALGORITHMS[name], gbml.make_loss(model_a, F.cross_entropy), params_a, tasks, adam_a, batched=False
        )
        got = step(tasks)
        assert relative_error(got.meta_gradient, expected.meta_gradient) < 1e-10
    # φ to 1e-8, not 1e-10: Adam divides by √v + ε, which turns the rounding noise in the gradient
    # of a bias before a batch norm (0 in exact arithmetic) into steps of about 1e-10 (9e-11 here).
    # A warm-up left in Adam's state shows far above that (7.5e-2 with its step count left at 3).
    assert relative_error(clone_params(model_b), clone_params(model_a)) < 1e-8


def test_graphed_step_undoes_a_diverged_update(generator):
    model, params, adam = make_adam_setup(generator)
    tasks = make_classification_task(generator, num_tasks=2)
    step = GraphedMetaStep(
        gbml.FOMAML(0.1), gbml.make_loss(model, F.cross_entropy), params, adam, tasks, capture=False
    )
    step(tasks)
    before = clone_params(model)
    state_before = {k: v.clone() for k, v in adam.state[params["head.weight"]].items()}
    poisoned = tasks._replace(x_query=tasks.x_query.clone())
    poisoned.x_query[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(gbml.DivergenceError):
        step(poisoned)
    assert relative_error(clone_params(model), before) == 0.0
    for key, value in adam.state[params["head.weight"]].items():
        assert torch.equal(value, state_before[key]), key
    with pytest.raises(ValueError, match="captured for"):
        step(make_classification_task(generator, num_tasks=3))


def test_graph_capture_needs_a_gpu(generator):
    model, params, adam = make_adam_setup(generator)
    tasks = make_classification_task(generator, num_tasks=2)
    loss = gbml.make_loss(model, F.cross_entropy)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedMetaStep(gbml.MAML(0.1), loss, params, adam, tasks, capture=True)


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "imaml"])
def test_finn_net_batched_meta_gradient_equals_the_loop(name, generator):
    """The book's Omniglot network (strided, β-only batch norm) under vmap against the loop."""
    torch.manual_seed(0)
    model = gbml.finn_omniglot_net(ways=3, hidden=8).double()
    loss = gbml.make_loss(model, F.cross_entropy)
    tasks = make_classification_task(generator, num_tasks=3)
    phi = clone_params(model)
    looped, _ = gbml.meta_gradient(ALGORITHMS[name], loss, phi, tasks, batched=False)
    batched, _ = gbml.meta_gradient(ALGORITHMS[name], loss, phi, tasks, batched=True)
    assert relative_error(batched, looped) < 1e-10
